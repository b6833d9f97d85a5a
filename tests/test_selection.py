"""Selection: WMOQ, patterns, partial parameter quantization, plan bytes."""

import math

import pytest
import torch

from speechbrain_omc import OMCConfig, make_plan
from speechbrain_omc.engine.selection import (
    POSITION_BIAS_PATTERNS,
    keep_fp32,
    parameter_roles,
    resolve_roles,
    role_of,
)

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


# --------------------------------------------------------------- roles, why


def test_roles_from_modules_keep_norms_and_position_biases_float32():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.pos_bias_u = torch.nn.Parameter(torch.zeros(2, 4))
            self.pos_bias_v = torch.nn.Parameter(torch.zeros(2, 4))

    class GlobalLayerNorm(torch.nn.Module):  # a model's own norm, named like one
        def __init__(self):
            super().__init__()
            self.gamma = torch.nn.Parameter(torch.ones(1, 1, 8))

    model = torch.nn.ModuleDict(
        {
            "att": Attention(),
            "ln": torch.nn.LayerNorm((5, 8)),  # 2-D gain and shift
            "bn": torch.nn.BatchNorm1d(8),
            "gn": torch.nn.GroupNorm(2, 8),
            "gln": GlobalLayerNorm(),
            "emb": torch.nn.Embedding(10, 8),
        }
    )
    roles = parameter_roles(model)
    assert roles == {
        "att.proj.weight": "matrix",
        "att.proj.bias": "vector",
        "att.pos_bias_u": "position bias",
        "att.pos_bias_v": "position bias",
        "ln.weight": "normalisation",
        "ln.bias": "normalisation",
        "bn.weight": "normalisation",
        "bn.bias": "normalisation",
        "gn.weight": "normalisation",
        "gn.bias": "normalisation",
        "gln.gamma": "normalisation",
        "emb.weight": "matrix",
    }
    plan = make_plan(model, OMCConfig())
    assert {e.name for e in plan.compressed} == {"att.proj.weight", "emb.weight"}
    assert plan["ln.weight"].reason == "WMOQ: normalisation"
    assert plan["att.pos_bias_u"].reason == "WMOQ: position bias"
    assert plan["att.proj.bias"].reason == "WMOQ: vector"
    assert plan["emb.weight"].reason == "matrix"
    # Shapes alone cannot see the 2-D LayerNorm: it would be compressed.
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert make_plan(shapes, OMCConfig())["ln.weight"].compressed
    assert make_plan(shapes, OMCConfig(), roles=roles) == plan
    # Without weights-only quantization every role may be compressed.
    everything = make_plan(model, OMCConfig(weights_only=False))
    assert len(everything.compressed) == len(roles)
    assert everything["ln.weight"].reason == "normalisation"


def test_position_biases_are_recognised_by_name_without_a_module():
    assert role_of("enc.layers.3.mha.pos_bias_v", (4, 36)) == "position bias"
    assert role_of("enc.layers.3.mha.my_pos_bias_v", (4, 36)) == "matrix"
    assert all(
        role_of(f"x.{p}", (2, 2)) == "position bias" for p in POSITION_BIAS_PATTERNS
    )


def test_tied_weight_takes_its_first_owners_name_and_role():
    lin = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    assert parameter_roles(model) == {"0.weight": "matrix", "0.bias": "vector"}


def test_bad_roles_are_clear_errors():
    with pytest.raises(ValueError, match="not parameters of the model: 'dec.w'"):
        make_plan(SHAPES, OMCConfig(), roles={"dec.w": "matrix"})
    with pytest.raises(ValueError, match="role 'norm', not one of"):
        make_plan(SHAPES, OMCConfig(), roles={"enc.1.norm.weight": "norm"})
    with pytest.raises(ValueError, match="1 dimension.* cannot be a 'matrix'"):
        make_plan(SHAPES, OMCConfig(), roles={"enc.0.w.bias": "matrix"})
    with pytest.raises(ValueError, match="2 dimension.* cannot be a 'vector'"):
        make_plan(SHAPES, OMCConfig(), roles={"out.weight": "vector"})
    with pytest.raises(TypeError, match="roles must be a mapping"):
        make_plan(SHAPES, OMCConfig(), roles=["out.weight"])
    with pytest.raises(ValueError, match="given twice"):
        make_plan([*SHAPES, SHAPES[0]], OMCConfig())


def test_partial_roles_complete_from_names_and_shapes():
    roles = resolve_roles(SHAPES, {"out.weight": "normalisation"})
    assert roles["out.weight"] == "normalisation"
    assert roles["enc.0.w.weight"] == "matrix" and roles["enc.0.w.bias"] == "vector"
    assert list(roles) == [n for n, _ in SHAPES]


def test_every_reason_in_the_why_column():
    config = OMCConfig(
        include=["enc.*", "emb.*", "extra.*"],
        exclude=["enc.1.*"],
        fp32_patterns=["emb.*"],
        fp32_fraction=0.66,  # of 2048 + 4096 + 64 candidate values: the 4096
        format_overrides={"extra.*": "bf16"},
    )
    shapes = [*SHAPES, ("extra.big.weight", (64, 64)), ("extra.small.weight", (8, 8))]
    plan = make_plan(shapes, config)
    why = {e.name: e.reason for e in plan.entries}
    assert why == {
        "enc.0.w.weight": "matrix",
        "enc.0.w.bias": "WMOQ: vector",
        "enc.1.w.weight": "pattern: exclude",
        "enc.1.norm.weight": "WMOQ: vector",
        "emb.weight": "fp32 pattern",
        "out.weight": "pattern: not included",
        "extra.big.weight": "PPQ: float32 fraction (largest)",
        "extra.small.weight": "matrix; override 'extra.*'",
    }
    assert plan["extra.small.weight"].format == "e8m7"
    assert all(e.compressed == (e.reason.split(";")[0] == e.role) for e in plan.entries)
    table = plan.table()
    header, *rows = table.splitlines()
    assert header.split()[-1] == "why"
    for name, reason in why.items():
        row = next(r for r in rows if r.startswith(name + " "))
        assert row.endswith(reason), row
    assert "float32 because: WMOQ: vector 2, pattern: exclude 1" in table
