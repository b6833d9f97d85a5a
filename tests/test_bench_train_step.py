"""Helpers of benchmarks/train_step.py: the Adam rows and their accounting."""

import os

import pytest
import torch
from conftest import load_benchmark

from speechbrain_omc.codec.blockwise import BlockwiseTensor


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train_step")


TINY = dict(d_model=32, nhead=2, layers=1, d_ffn=64, batch=1, seconds=0.3)


@pytest.fixture
def tiny(bench, monkeypatch):
    """A tiny setting of the benchmark's model, on this process's threads."""

    def setting(**changes) -> str:
        monkeypatch.setitem(bench.SETTINGS, "tiny", {**TINY, **changes})
        monkeypatch.setenv("OMC_BENCH_THREADS", str(torch.get_num_threads()))
        return "tiny"

    return setting


def test_sgd_configurations(bench):
    runs = bench.configurations("large")
    assert [(r["mode"], r["bits"], r["ckpt"]) for r in runs] == [
        (mode, bits, ckpt)
        for ckpt in (False, True)
        for mode, bits in [("fp32", 32), ("fp32-hook", 32)]
        + [("fused", b) for b in (16, 11, 8)]
        + [("loop", 11), ("fp32-brain", 32), ("brain", 11)]
    ]
    assert {r["optimizer"] for r in runs} == {"sgd"}
    assert all("fp32_fraction" not in r for r in runs)
    assert len(bench.configurations("small")) == 8
    assert {r["mode"] for r in runs} <= set(bench.PATHS)


def test_user_paths_train_as_float32_does(bench, tiny, monkeypatch):
    """The plain loop and the Brains run, record their path, and (OMC with
    lossless codes) take float32's steps."""
    tiny()
    monkeypatch.setitem(bench.FORMATS, 32, "fp32")
    spec = dict(setting="tiny", optimizer="sgd", ckpt=False)
    rows = {
        mode: bench.run_one(dict(spec, mode=mode, bits=bits), steps=2)
        for mode, bits in [
            ("fp32", 32),
            ("loop", 32),
            ("fp32-brain", 32),
            ("brain", 32),
        ]
    }
    for mode, row in rows.items():
        assert row["path"] == bench.PATHS[mode]
        assert len(row["losses"]) == 3
    assert rows["loop"]["losses"] == rows["fp32"]["losses"]
    assert rows["brain"]["losses"] == rows["fp32-brain"]["losses"]
    table = bench.table(list(rows.values()))
    assert bench.PATHS["brain"] in table


def test_adam_configurations(bench):
    runs = bench.configurations("large", "adam")
    plain = [r for r in runs if not r["ckpt"]]
    assert [(r["mode"], r["bits"], r.get("fp32_fraction")) for r in plain] == [
        ("fp32", 32, None),
        ("fp32-hook", 32, None),
        ("fp32-fused", 32, None),
        ("torchao", 32, None),
        ("bnb", 32, None),
        ("bnb-hook", 32, None),
        ("fused", 11, 0.1),
        ("fused", 11, 0.0),
        ("fp32-brain", 32, None),
        ("brain", 11, 0.1),
    ]
    assert all(bench.ADAM_PATHS.get(r["mode"]) for r in runs)
    with pytest.raises(ValueError, match="unknown optimizer"):
        bench.configurations("large", "lamb")


def test_tensor_bytes_counts_each_block_once(bench):
    t = torch.zeros(10)
    codes = BlockwiseTensor.compress(torch.rand(512), "e4m3", block=256)
    assert codes.nbytes == 512 + 2 * 4
    total = bench.tensor_bytes(
        {"a": t, "b": [t, t[:5]], "c": (codes, None, 7)}, torch.zeros(3, 2)
    )
    # t once; t[:5] starts where t does but is smaller: its own key.
    assert total == 40 + 20 + codes.nbytes + 24
    assert bench.tensor_bytes(torch.empty(0), {}, []) == 0


def test_tensor_bytes_flattens_a_tensor_subclass(bench):
    class Pair(torch.Tensor):
        """A wrapper subclass holding two inner tensors (as torchao's state)."""

        @staticmethod
        def __new__(cls, codes, scale):
            return torch.Tensor._make_wrapper_subclass(cls, codes.shape)

        def __init__(self, codes, scale):
            self.codes, self.scale = codes, scale

        def __tensor_flatten__(self):
            return ["codes", "scale"], None

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError(func)

    state = Pair(torch.zeros(256, dtype=torch.uint8), torch.zeros(1))
    assert bench.tensor_bytes({"exp_avg": state}) == 256 + 4


def test_adam_in_backward_matches_torch_adam(bench):
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    optimizers = bench.adam_in_backward(list(b.parameters()), lr=0.1)
    reference = torch.optim.Adam(a.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(5, 4)
        a(x).square().sum().backward()
        reference.step()
        reference.zero_grad()
        b(x).square().sum().backward()
        assert all(p.grad is None for p in b.parameters())
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert len(optimizers) == 2


def test_last_error(bench):
    stderr = (
        "Traceback (most recent call last):\n  File 'x', line 1\n"
        "ImportError: cannot import name 'ScalingType' from 'torch.nn.functional'\n"
    )
    assert bench._last_error(stderr).startswith("ImportError: cannot import")
    assert bench._last_error("") == "no output"


def _row(mode, state_per_param, peak_mb, sec, **extra):
    numel = 1_000_000
    return {
        "setting": "large",
        "optimizer": "adam",
        "ckpt": False,
        "mode": mode,
        "bits": 11 if mode == "fused" else 32,
        "numel": numel,
        "param_bytes": 4 * numel,
        "training_state_bytes": int(state_per_param * numel),
        "peak_rss": peak_mb * 1e6,
        "steady_peak_rss": peak_mb * 1e6,
        "sec_per_step": sec,
        "losses": [2.0, 1.0],
        **extra,
    }


def test_adam_table_reports_shares_and_failures(bench):
    results = [
        _row("fp32", 16, 100, 1.0),
        _row("fp32-hook", 12, 90, 0.5),
        _row("fused", 4, 76, 2.0, fp32_fraction=0.0),
        {
            "setting": "large",
            "optimizer": "adam",
            "ckpt": False,
            "mode": "torchao",
            "bits": 32,
            "error": "ModuleNotFoundError: No module named 'torchao'",
        },
    ]
    lines = bench.adam_table(results).splitlines()
    assert len(lines) == 2 + 4
    fp32, hook, fused, torchao = lines[2:]
    assert "| 16.00 | 100.0% |" in fp32
    assert "| 12.00 | 75.0% |" in hook
    # OMC: 4 B/param is 25 % of 16; it saves 12 MB of state (1e6 params),
    # 24 MB of peak RSS: 200 % of the state saving.
    assert "| 4.00 | 25.0% |" in fused
    assert "| 0.760 | 200% |" in fused
    assert "| 2.00 | 4.00 |" in fused  # s/step vs fp32 Adam, vs in-backward
    assert "e3m7 (0% float32)" in fused
    assert "not run: `ModuleNotFoundError: No module named 'torchao'`" in torchao


def test_run_one_adam_accounts_the_training_state(bench, tiny):
    tiny()
    spec = dict(setting="tiny", optimizer="adam", ckpt=False, bits=32)
    fp32 = bench.run_one(dict(spec, mode="fp32"), steps=1)
    n = fp32["numel"]
    steps = 4 * len(list(bench.build_model(32, 2, 1, 64, False).parameters()))
    assert fp32["training_state_bytes"] == 16 * n + steps  # + Adam's step scalars
    hook = bench.run_one(dict(spec, mode="fp32-hook"), steps=1)
    assert hook["grad_bytes"] == 0
    assert hook["training_state_bytes"] == 12 * n + steps
    assert hook["losses"] == fp32["losses"]

    fused = bench.run_one(dict(spec, mode="fused", bits=11, fp32_fraction=0.0), 1)
    report = fused["memory_report"]["omc"]
    assert fused["param_bytes"] == report["parameters"]
    assert fused["grad_bytes"] == report["gradients"]
    # The report leaves out the float32 parameters' step scalars.
    extra = fused["state_bytes"] - report["optimizer_state"]
    assert 0 < extra < steps and extra % 4 == 0
    assert fused["training_state_bytes"] == report["total"] + extra
    assert fused["training_state_bytes"] < 0.4 * fp32["training_state_bytes"]
    assert len(fused["step_times"]) == 1 and len(fused["losses"]) == 2


def test_bitsandbytes_rows_account_8bit_state(bench, tiny):
    """AdamW8bit stepped inside backward takes the same steps as after it,
    without gradients alive at the step; its 8-bit state is counted."""
    pytest.importorskip("bitsandbytes")
    tiny(d_model=64, d_ffn=128)
    spec = dict(setting="tiny", optimizer="adam", ckpt=False, bits=32)
    after = bench.run_one(dict(spec, mode="bnb"), steps=1)
    inside = bench.run_one(dict(spec, mode="bnb-hook"), steps=1)
    assert inside["losses"] == after["losses"]
    assert after["grad_bytes"] == 4 * after["numel"] and inside["grad_bytes"] == 0
    # The 8-bit moments of the tensors of 4096 values or more, float32
    # ones below: between 2 and 8 bytes per parameter of state.
    assert 2 * after["numel"] < after["state_bytes"] < 8 * after["numel"]
    # Each optimizer of the in-backward pattern keeps its own two 256-entry
    # quantization maps (float32).
    extra = inside["state_bytes"] - after["state_bytes"]
    assert extra > 0 and extra % (2 * 256 * 4) == 0
    assert after["path"] == bench.ADAM_PATHS["bnb"]
    assert inside["bitsandbytes"] == after["bitsandbytes"]


@pytest.mark.parametrize(
    "stub, absent",
    [
        ("raise ImportError('bitsandbytes: no CPU backend here')", True),
        ("import sys\noptim = sys  # AdamW8bit is missing: a broken peer", False),
    ],
)
def test_a_peer_that_cannot_import_is_a_row_a_broken_one_raises(
    bench, tmp_path, monkeypatch, stub, absent
):
    (tmp_path / "bitsandbytes.py").write_text(stub + "\n__version__ = '0'\n")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    spec = dict(setting="small", optimizer="adam", ckpt=False, mode="bnb", bits=32)
    if absent:
        row = bench.spawn(spec, steps=1)
        assert row["error"].startswith("ImportError: bitsandbytes: no CPU backend")
        assert "python" not in row  # no interpreter path in records
        table = bench.adam_table([row])
        assert "not run: `ImportError" in table
    else:
        with pytest.raises(RuntimeError, match="AttributeError"):
            bench.spawn(spec, steps=1)
