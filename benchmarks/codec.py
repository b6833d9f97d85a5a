"""Codec throughput: compress/decompress of a 16M-value tensor vs native casts.

Measures, in one run and interleaved (so that load on a shared machine hits
every case alike), the median time of:

* ``CompressedTensor.compress`` (round to nearest and stochastic) and
  ``CompressedTensor.decompress`` for each format, with the default
  per-variable ``scale`` transform (its multiply is folded into decoding);
* native casts ``x.to(dtype)`` and back ``.to(torch.float32)`` for float16,
  bfloat16 and float8_e4m3fn.

Ratios compare our decompression with the native widening cast of the same
run. Results go to ``benchmarks/results/codec.md``.

Usage::

    python benchmarks/codec.py [--numel 16777216] [--repeats 9] [--threads 2 [1]]
                               [--device cpu|cuda] [--out PATH]
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

from speechbrain_omc import CompressedTensor, get_format

FORMATS = ["e5m10", "e8m7", "e4m3", "e3m7", "e4m7", "int8"]
NATIVE = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
# The native cast each format is judged against, and the target ratio.
REFERENCE = {
    "e5m10": ("float16", 2.0),
    "e8m7": ("bfloat16", 2.0),
    "e4m3": ("float8_e4m3fn", 2.0),
    "int8": ("float8_e4m3fn", 2.0),
    "e3m7": ("bfloat16", 6.0),
    "e4m7": ("bfloat16", 6.0),
}


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(x, threads, repeats, sync):
    """Median seconds of every case, cases interleaved within each repeat."""
    torch.set_num_threads(threads)
    device = x.device
    cases = {}
    for name, dtype in NATIVE.items():
        low = x.to(dtype)
        cases[("native", name, "down")] = lambda d=dtype: x.to(d)
        cases[("native", name, "up")] = lambda t=low: t.to(torch.float32)
    for name in FORMATS:
        fmt = get_format(name)
        ct = CompressedTensor.compress(x, fmt)
        g = torch.Generator(device=device).manual_seed(1)
        cases[("ours", name, "compress")] = lambda f=fmt: CompressedTensor.compress(
            x, f
        )
        cases[("ours", name, "compress_sr")] = lambda f=fmt, g=g: (
            CompressedTensor.compress(x, f, rounding="stochastic", generator=g)
        )
        cases[("ours", name, "decompress")] = lambda c=ct: c.decompress()
        cases[("ours", name, "assign_sr")] = lambda c=ct, g=g: c.assign_(
            x, "stochastic", g
        )
    times = {key: [] for key in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(repeats):
        for key, fn in cases.items():
            times[key].append(timed(fn, sync))
    return {key: statistics.median(v) for key, v in times.items()}


def report(med, n, threads):
    """Markdown tables for one thread setting."""
    rate = lambda s: n / s / 1e6  # noqa: E731  (million values per second)
    lines = [
        f"## CPU threads: {threads}",
        "",
        "Native casts (same run):",
        "",
        "| dtype | f32 -> dtype ms | dtype -> f32 ms | Mvalues/s (up) |",
        "|---|---:|---:|---:|",
    ]
    for name in NATIVE:
        down, up = med[("native", name, "down")], med[("native", name, "up")]
        lines.append(f"| {name} | {down * 1e3:.1f} | {up * 1e3:.1f} | {rate(up):.0f} |")
    lines += [
        "",
        "Ours (transform `scale`; SR = stochastic rounding; `assign_` = in-place "
        "re-compression, the per-step path). The ratio is our decompression "
        "time over the native widening cast (`dtype -> float32`) of the row; the "
        "last column compares with bfloat16's.",
        "",
        "| format | bits | compress ms | compress SR ms | assign_ SR ms | "
        "decompress ms | Mvalues/s | vs native | ratio | target | ratio vs bf16 |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    bf16_up = med[("native", "bfloat16", "up")]
    for name in FORMATS:
        ref, target = REFERENCE[name]
        dec = med[("ours", name, "decompress")]
        ratio = dec / med[("native", ref, "up")]
        ok = "ok" if ratio <= target else "MISSED"
        lines.append(
            f"| {name} | {get_format(name).bits} "
            f"| {med[('ours', name, 'compress')] * 1e3:.1f} "
            f"| {med[('ours', name, 'compress_sr')] * 1e3:.1f} "
            f"| {med[('ours', name, 'assign_sr')] * 1e3:.1f} "
            f"| {dec * 1e3:.1f} | {rate(dec):.0f} | {ref} | {ratio:.2f} "
            f"| {target:.0f}x {ok} | {dec / bf16_up:.2f} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[2], help="one run per value"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "codec.md"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(args.numel, generator=gen) * 0.05).to(device)  # weight-like

    load_before = os.getloadavg()
    results = [(t, measure(x, t, args.repeats, sync)) for t in args.threads]
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
        f"- values: {args.numel} float32 (randn * 0.05)",
        f"- device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f"; repeats: {args.repeats} (median; cases interleaved in every repeat)",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} logical CPUs",
        f"- load average (1 min) before / after: {load_before[0]:.1f} / "
        f"{load_after[0]:.1f}",
        "",
    ]
    for threads, med in results:
        lines += report(med, args.numel, threads)
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
