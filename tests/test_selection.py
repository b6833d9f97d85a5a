"""Selection: WMOQ, patterns, partial parameter quantization, plan bytes."""

import math

import pytest
import torch

from speechbrain_omc import OMCConfig, make_plan
from speechbrain_omc.selection import keep_fp32

SHAPES = [
    ("enc.0.w.weight", (64, 32)),
    ("enc.0.w.bias", (64,)),
    ("enc.1.w.weight", (32, 64)),
    ("enc.1.norm.weight", (32,)),
    ("emb.weight", (100, 16)),
    ("out.weight", (10, 32)),
]


def test_weights_only_compresses_matrices_and_nothing_else():
    plan = make_plan(SHAPES, OMCConfig())
    compressed = {e.name for e in plan.compressed}
    assert compressed == {
        "enc.0.w.weight",
        "enc.1.w.weight",
        "emb.weight",
        "out.weight",
    }
    plan_all = make_plan(SHAPES, OMCConfig(weights_only=False))
    assert len(plan_all.compressed) == len(SHAPES)


def test_plan_bytes_are_exact():
    plan = make_plan(SHAPES, OMCConfig(format="e3m7", transform="scale"))
    for entry in plan.entries:
        if entry.compressed:
            assert entry.nbytes == math.ceil(entry.numel * 11 / 8) + 4
        else:
            assert entry.nbytes == 4 * entry.numel
    assert plan.float32_nbytes == 4 * sum(math.prod(s) for _, s in SHAPES)
    affine = make_plan(SHAPES, OMCConfig(format="int8", transform="affine"))
    assert affine["emb.weight"].nbytes == 1600 + 8
    none = make_plan(SHAPES, OMCConfig(format="e4m3", transform="none"))
    assert none["emb.weight"].nbytes == 1600


def test_include_exclude_and_overrides():
    config = OMCConfig(
        include=["enc.*"],
        exclude=["*.1.*"],
        format_overrides={"enc.0.*": "bf16"},
    )
    plan = make_plan(SHAPES, config)
    assert [(e.name, e.format) for e in plan.compressed] == [("enc.0.w.weight", "e8m7")]


@pytest.mark.parametrize("field", ["include", "exclude", "fp32_patterns"])
def test_pattern_that_matches_nothing_is_an_error(field):
    config = OMCConfig(**{field: ["decoder.*"]})
    with pytest.raises(ValueError, match="'decoder.\\*' matches no parameter"):
        make_plan(SHAPES, config)


def test_override_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="format_overrides"):
        make_plan(SHAPES, OMCConfig(format_overrides={"nope*": "bf16"}))


def test_bad_config_values_are_clear_errors():
    with pytest.raises(ValueError, match="format"):
        OMCConfig(format="e9m9")
    with pytest.raises(ValueError, match="fp32_fraction"):
        OMCConfig(fp32_fraction=1.5)
    with pytest.raises(ValueError, match="transform"):
        OMCConfig(transform="log")
    with pytest.raises(TypeError, match="include"):
        OMCConfig(include=[1, 2])
    with pytest.raises(ValueError, match="fp32_patterns"):
        OMCConfig(fp32_policy="fixed", fp32_fraction=0.1)


def test_fp32_fraction_is_counted_in_values_and_never_exceeded():
    sizes = [(f"p{i}", n) for i, n in enumerate([500, 300, 100, 60, 40])]
    total = sum(n for _, n in sizes)
    for policy in ("largest", "smallest", "random"):
        for fraction in (0.05, 0.1, 0.25, 0.5):
            kept = keep_fp32(sizes, fraction, policy, seed=3)
            used = sum(n for name, n in sizes if name in kept)
            assert used <= fraction * total
    assert keep_fp32(sizes, 0.1, "largest") == {"p2"}  # 500 and 300 overshoot
    assert keep_fp32(sizes, 0.1, "smallest") == {"p3", "p4"}  # 40 + 60
    assert keep_fp32(sizes, 0.35, "largest") == {"p1", "p4"}  # 300 + 40


def test_random_policy_is_deterministic_and_redrawn_per_round_and_client():
    sizes = [(f"p{i}", 10) for i in range(40)]
    draw = keep_fp32(sizes, 0.25, "random", seed=1, round=2, client="spk7")
    assert draw == keep_fp32(sizes, 0.25, "random", seed=1, round=2, client="spk7")
    assert len(draw) == 10
    others = {
        frozenset(keep_fp32(sizes, 0.25, "random", seed=1, round=r, client=c))
        for r in range(3)
        for c in ("spk7", "spk8")
    }
    assert len(others) == 6


def test_fixed_policy_and_plan_totals():
    config = OMCConfig(fp32_policy="fixed", fp32_patterns=["emb.*"], fp32_fraction=0)
    plan = make_plan(SHAPES, config)
    assert not plan["emb.weight"].compressed
    table = plan.table()
    assert "emb.weight" in table and "fp32" in table and "saved" in table


def test_plan_of_a_module_follows_named_parameters():
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3), torch.nn.Embedding(10, 4))
    plan = make_plan(model, OMCConfig())
    assert [e.name for e in plan.entries] == [n for n, _ in model.named_parameters()]
    assert plan["0.weight"].shape == (8, 4, 3)


def test_conformer_small_shape_saves_at_least_55_percent():
    """e3m7 + WMOQ + 10 % fp32 on a conformer-small-like set of matrices."""
    shapes = []
    for layer in range(12):
        for name, shape in [
            ("att.in_proj", (432, 144)),
            ("att.out", (144, 144)),
            ("ffn1.w1", (1024, 144)),
            ("ffn1.w2", (144, 1024)),
            ("ffn2.w1", (1024, 144)),
            ("ffn2.w2", (144, 1024)),
            ("conv.pw1", (288, 144, 1)),
            ("conv.pw2", (144, 144, 1)),
            ("conv.dw", (144, 1, 31)),
        ]:
            shapes.append((f"layers.{layer}.{name}.weight", shape))
            shapes.append((f"layers.{layer}.{name}.bias", (shape[0],)))
    plan = make_plan(shapes, OMCConfig(format="e3m7", fp32_fraction=0.1))
    assert plan.nbytes <= 0.45 * plan.float32_nbytes
