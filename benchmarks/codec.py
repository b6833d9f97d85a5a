"""Codec speed at weight-matrix sizes: kernels and torch reference vs native casts.

For every size (256K, 1M and 4M values by default) and thread count, one loop
runs every compared case once per repeat, in turn, so that load on a shared
machine hits all of them alike; each case reports the median and the minimum
of its repeats. Cases:

* native casts of the same tensor: ``float32 -> bfloat16`` (down) and
  ``bfloat16 -> float32`` (up), ``float16`` likewise, into preallocated
  outputs (``copy_``), as our decoding writes into one (``out=``): the
  figures are the codecs', not the allocator's first touch of fresh pages;
* per format, with the native kernels: ``decompress`` (the forward and
  backward path) and ``assign_`` with stochastic rounding (the per-step
  re-compression: range, transform fit, rounding and packing);
* the same with the torch reference (kernels disabled in-process), in a
  loop of its own afterwards (a third of the repeats): its large temporaries
  would leave the next case in the loop with cold caches.

Ratios divide by the native cast of the same size and thread count: decoding
by ``bfloat16 -> float32``, encoding by ``float32 -> bfloat16``. The targets
(1M values, one thread): e3m7 decode <= 3x, e3m7 stochastic
encode <= 10x, 8- and 16-bit decode <= 1.5x.

Usage::

    python benchmarks/codec.py [--sizes 262144 1048576 4194304] [--threads 1 2]
                               [--repeats 15] [--out benchmarks/results/codec.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from speechbrain_omc import CompressedTensor
from speechbrain_omc.codec import kernels

FORMATS = ["e3m7", "e4m7", "e4m3", "int8", "e5m10", "bf16"]
TARGETS = {  # (operation, format) at 1M values and one thread: max ratio
    ("decode", "e3m7"): 3.0,
    ("encode", "e3m7"): 10.0,
    ("decode", "e4m3"): 1.5,
    ("decode", "int8"): 1.5,
    ("decode", "e5m10"): 1.5,
    ("decode", "bf16"): 1.5,
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cases_for(x: torch.Tensor, reference: bool) -> dict:
    """The timed cases on one tensor, as zero-argument callables.

    ``reference=False``: native casts and our kernels, the cases that are
    compared (interleaved with each other only: the torch reference's large
    temporaries would leave every following case with cold caches).
    ``reference=True``: the torch reference of every format.
    """
    cases = {}
    # Every output is preallocated, so that the figures are the codecs' own,
    # not the allocator's first touch of fresh pages.
    out = torch.empty_like(x)
    if not reference:
        bf16, f16 = x.to(torch.bfloat16), x.to(torch.float16)
        low = torch.empty_like(bf16)
        cases[("native", "bf16", "down")] = lambda: low.copy_(x)
        cases[("native", "bf16", "up")] = lambda: out.copy_(bf16)
        cases[("native", "fp16", "down")] = lambda: low.view(torch.float16).copy_(x)
        cases[("native", "fp16", "up")] = lambda: out.copy_(f16)
    impl = "torch" if reference else "kernel"
    for name in FORMATS:
        ct = CompressedTensor.compress(x, name)
        cases[(impl, name, "decode")] = lambda c=ct: _run(
            lambda: c.decompress(out=out), reference
        )
        cases[(impl, name, "encode")] = lambda c=ct: _run(
            lambda: c.assign_(x, "stochastic", 7), reference
        )
    return cases


def _run(fn, reference: bool):
    if not reference:
        return fn()
    with kernels.disabled():
        return fn()


def measure(numel: int, threads: int, repeats: int) -> dict:
    """``{case: (median s, min s)}``; cases interleaved in every repeat."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen) * 0.05  # weight-like values
    result = {}
    for reference, runs in ((False, repeats), (True, max(3, repeats // 3))):
        cases = cases_for(x, reference)
        times = {key: [] for key in cases}
        for fn in cases.values():  # warm-up: first touch, lazy initialisation
            fn()
        for _ in range(runs):
            for key, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        result.update({key: (statistics.median(v), min(v)) for key, v in times.items()})
    return result


def report(res: dict, numel: int, threads: int) -> list[str]:
    """Markdown table for one size and thread count."""
    up, down = res[("native", "bf16", "up")], res[("native", "bf16", "down")]
    lines = [
        f"### {numel:,} values, {threads} thread{'s' if threads > 1 else ''}",
        "",
        f"Native casts: bf16 -> f32 {up[0] * 1e3:.3f} ms (min {up[1] * 1e3:.3f}), "
        f"f32 -> bf16 {down[0] * 1e3:.3f} ms (min {down[1] * 1e3:.3f}); "
        f"fp16 -> f32 {res[('native', 'fp16', 'up')][0] * 1e3:.3f} ms.",
        "",
        "| format | decode ms (min) | ratio | torch ref. ms | encode SR ms (min) "
        "| ratio | torch ref. ms | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in FORMATS:
        dec, enc = res[("kernel", name, "decode")], res[("kernel", name, "encode")]
        rd, re = dec[0] / up[0], enc[0] / down[0]
        notes = []
        if numel == 1 << 20 and threads == 1:
            for op, ratio in (("decode", rd), ("encode", re)):
                target = TARGETS.get((op, name))
                if target is not None:
                    verdict = "met" if ratio <= target else "MISSED"
                    notes.append(f"{op} <= {target:g}x {verdict}")
        lines.append(
            f"| {name} | {dec[0] * 1e3:.3f} ({dec[1] * 1e3:.3f}) | {rd:.2f} "
            f"| {res[('torch', name, 'decode')][0] * 1e3:.3f} "
            f"| {enc[0] * 1e3:.3f} ({enc[1] * 1e3:.3f}) | {re:.2f} "
            f"| {res[('torch', name, 'encode')][0] * 1e3:.3f} | {'; '.join(notes)} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1 << 18, 1 << 20, 1 << 22]
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not kernels.available():
        sys.exit(kernels.status())

    load_before = os.getloadavg()
    started = time.time()
    sections = []
    for threads in args.threads:
        for numel in args.sizes:
            sections += report(measure(numel, threads, args.repeats), numel, threads)
    load_after = os.getloadavg()
    lines = [
        "# Codec benchmark",
        "",
        "Command:",
        "",
        "```",
        "python " + " ".join(sys.argv),
        "```",
        "",
        f"- float32 values randn * 0.05; transform `scale`; median (and minimum) of "
        f"{args.repeats} repeats, native casts and kernels once per repeat, in "
        "turn; the torch reference in a loop of its own",
        "- decode = `CompressedTensor.decompress`; encode SR = `assign_` with "
        "stochastic rounding (range, fit, rounding, packing: the per-step path); "
        "ratios against the native bf16 casts of the same size and threads",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} logical CPUs; "
        f"{kernels.status()}",
        f"- load average (1/5/15 min) before: {load_before[0]:.2f} / "
        f"{load_before[1]:.2f} / {load_before[2]:.2f}; after: {load_after[0]:.2f} / "
        f"{load_after[1]:.2f} / {load_after[2]:.2f}; {time.time() - started:.0f} s",
        "",
        *sections,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
