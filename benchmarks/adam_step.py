"""Speed of one fused Adam step of one compressed weight, native vs torch.

A weight of 2.4M values (a conformer-large feed-forward matrix, 1024 x 2344)
in e3m7 takes AdamW steps (weight decay 0.01) in fused mode, its moments
block-wise e4m3 (one scale per 256 values, the second moment as its square
root) or float32. Cases, one thread:

* ``native``: ``fused_step_`` with the kernels (``kernels.adam_step``: the
  weight and moments decoded, stepped and the moments re-encoded in one
  pass);
* ``torch slices``: the torch path of the same step (``_torch_adam_step_``:
  the native codec decodes weight and moments into scratch, torch's
  functional single-tensor Adam steps 64K-value slices, the codec encodes);
* ``torch.optim.AdamW`` on a float32 parameter of the same size,
  ``foreach=True`` and ``fused=True``: the step alone, no codes.

The ``+ encode`` column adds the caller's re-encoding of the weight
(``CompressedTensor.assign_``, stochastic rounding), the same for both fused
cases. Every case runs once per repeat, in turn, so that load on a shared
machine hits all alike; each reports the median and minimum over repeats of
the thread's CPU time (one thread does all the work, so time spent waiting
for a core on a loaded machine does not count), and the minimum wall time.

With ``--against REV`` the native cases also run with the kernels of git
revision ``REV`` (its ``codec.cpp``, built into a library of its own and
called in turn with this checkout's): a kernel change timed against its
predecessor in one process.

Usage::

    python benchmarks/adam_step.py [--repeats 15] [--numel 2400000] [--against REV]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from codec import cpu_name  # benchmarks/codec.py, beside this script

from speechbrain_omc import CompressedTensor
from speechbrain_omc.codec import kernels
from speechbrain_omc.engine import rules
from speechbrain_omc.engine.rules import AdamSettings, StateStorage

SETTINGS = AdamSettings(lr=1e-3, weight_decay=0.01, decoupled=True)
STORAGES = {
    "e4m3 state": StateStorage({"exp_avg": "e4m3", "exp_avg_sq": "e4m3"}),
    "float32 state": StateStorage(),
}


class FusedCase:
    """One compressed weight, its state and a step function."""

    def __init__(self, step, storage: StateStorage, start, grad):
        self.step, self.storage, self.grad = step, storage, grad
        self.codes = CompressedTensor.compress(start, "e3m7")
        self.state: dict = {}
        self.value = torch.empty_like(start)
        self.scratch = [torch.empty_like(start) for _ in range(2)]
        self.run(encode=True)  # the state exists: steady-state steps

    def run(self, encode: bool) -> None:
        spare = iter(self.scratch)
        result = self.step(
            self.value,
            self.codes,
            self.grad,
            self.state,
            SETTINGS,
            self.storage,
            lambda: next(spare),
            lambda buffer: 17,
        )
        assert result.nonfinite_grad == 0
        if encode:
            self.codes.assign_(self.value, rounding="stochastic", generator=5)


def library_of(revision: str):
    """The kernel library built from ``codec.cpp`` at git ``revision``."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{revision}:speechbrain_omc/codec/_native/codec.cpp"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="omc-codec-") as folder:
        path = Path(folder) / "codec.cpp"  # compiled into the kernels' cache
        path.write_text(source)
        return kernels._build(path)


@contextmanager
def kernels_of(library):
    """Inside the block, the codec calls ``library`` (another revision's)."""
    own = kernels._library
    kernels._library = lambda: library
    try:
        yield
    finally:
        kernels._library = own


def timed(fn) -> tuple[float, float]:
    """``(thread CPU time, wall time)`` of ``fn()``, in seconds."""
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


def cell(samples: list) -> str:
    if not samples:
        return "-"
    cpu = [c for c, _ in samples]
    wall = min(w for _, w in samples)
    return (
        f"{1e3 * statistics.median(cpu):.1f} / {1e3 * min(cpu):.1f} / {1e3 * wall:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=2_400_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--against", metavar="REV", help="git revision's kernels")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not (kernels.available() and kernels.torch_sqrt()[1]):
        raise SystemExit("native Adam unavailable here: " + kernels.status())
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(args.numel, generator=gen) * 0.05
    grad = torch.randn(args.numel, generator=gen) * 1e-3

    cases: dict[str, tuple] = {}
    for label, storage in STORAGES.items():
        for name, step in (
            ("native", rules._adam_step_),
            ("torch slices", rules._torch_adam_step_),
        ):
            case = FusedCase(step, storage, start, grad)
            cases[f"{name}, {label}"] = (
                lambda c=case: c.run(encode=False),
                lambda c=case: c.run(encode=True),
            )
        if args.against:
            old = library_of(args.against)
            with kernels_of(old):
                case = FusedCase(rules._adam_step_, storage, start, grad)

            def run(case=case, old=old, encode=False):
                with kernels_of(old):
                    case.run(encode=encode)

            cases[f"native at {args.against}, {label}"] = (
                run,
                lambda run=run: run(encode=True),
            )
    for flag in ("foreach", "fused"):
        param = torch.nn.Parameter(start.clone())
        param.grad = grad.clone()
        opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, **{flag: True})
        opt.step()
        cases[f"torch.optim.AdamW({flag}=True), float32"] = (opt.step, None)

    times: dict[str, list] = {name: ([], []) for name in cases}
    for _ in range(args.repeats):
        for name, (step, with_encode) in cases.items():
            times[name][0].append(timed(step))
            if with_encode is not None:
                times[name][1].append(timed(with_encode))

    print(f"{args.numel:,} values, e3m7 weight, AdamW, 1 thread, {cpu_name()}")
    print(f"torch {torch.__version__}; {kernels.status()}; {args.repeats} repeats")
    print()
    print("ms: CPU median / CPU min / wall min")
    print()
    print("| case | step | + encode |")
    print("|---|---|---|")
    for name, (plain, encoded) in times.items():
        print(f"| {name} | {cell(plain)} | {cell(encoded)} |")


if __name__ == "__main__":
    main()
