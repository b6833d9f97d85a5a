"""Where the main job's extra time goes: a sampling profile of both federations.

``benchmarks/main_job_step.py`` measures how much slower OMC's training step
is; this says where the difference is spent. Each federation of the main
job (the packaged ``fed_fp32.yaml`` and ``fed_omc.yaml``, seed 1986, a few
rounds) runs under py-spy (``pip install py-spy``), the two side by side as
the main job runs them, and
every sample is charged to the first of :data:`PARTS` whose function is on
its stack. A sample is 1 / ``rate`` seconds of the process: the table gives
seconds per part for float32 and OMC, and the difference.

Sampling is statistical and the machine may be shared; the parts' shares
hold better than their seconds. Python's own cost shows as the OMC parts'
seconds outside the native kernels they call (the ``...: kernel`` rows).

Usage::

    python benchmarks/main_job_profile.py [--rounds 3] [--rate 100] \
        [--output benchmarks/results/main_job_profile.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from speechbrain_omc.asr import hparams_file

CONFIGS = ("fed_fp32.yaml", "fed_omc.yaml")

#: (part, functions that mark it, a leaf function that is its native kernel):
#: a sample belongs to the first part one of whose functions is on its stack.
#: Functions are ``name (file`` prefixes of py-spy's frames.
PARTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "OMC fused updates (handle.step)",
        ("UpdatePolicy.step (speechbrain_omc/engine/updates.py",),
        ("adam_step (", "sgd_step (", "encode (speechbrain_omc/codec/kernels.py"),
    ),
    ("OMC gradient hook (held for clipping)", ("UpdatePolicy._on_grad (",), ()),
    (
        "OMC weight decoding (training and evaluation)",
        ("OMCHandle._decode (",),
        ("decode_prepared (",),
    ),
    ("evaluation (validation and test)", ("Brain.evaluate (",), ()),
    ("float32 optimizer step", ("Optimizer.profile_hook_step", "torch/optim/"), ()),
    ("gradient clipping", ("clip_grad_norm_",), ()),
    ("backward", ("_engine_run_backward",), ()),
    ("forward and loss (training)", ("fit_batch (",), ()),
    ("the rest (data, federation, setup, imports)", ("",), ()),
)


def profile(rounds: int, rate: int, folder: Path) -> dict[str, list[tuple[str, int]]]:
    """``(stack, samples)`` pairs of each federation, both run at once under
    py-spy (side by side, as the main job runs them: load falls on both)."""
    running = {}
    for config in CONFIGS:
        command = [
            "py-spy", "record", "--rate", str(rate), "--format", "raw",
            "--output", str(folder / f"{config}.txt"), "--",
            sys.executable, "-m", "speechbrain_omc.asr.federation",
            str(hparams_file(config)), "--output_folder", str(folder / config),
            "--rounds", str(rounds), "--eval_every", str(rounds),
            "--seed", "1986", "--noprogressbar",
        ]  # fmt: skip
        running[config] = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    stacks: dict[str, list[tuple[str, int]]] = {}
    for config, process in running.items():
        _, err = process.communicate()
        if process.returncode:
            raise RuntimeError(f"{config} failed:\n{err[-3000:]}")
        stacks[config] = []
        for line in (folder / f"{config}.txt").read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack:
                stacks[config].append((stack, int(count)))
    return stacks


def attribute(stacks: list[tuple[str, int]]) -> Counter:
    """Samples per part, and per part's kernel (key ``(part, "kernel")``).

    Example
    -------
    >>> step = "UpdatePolicy.step (speechbrain_omc/engine/updates.py:3)"
    >>> fused = f"fit_batch (b.py:1);{step};adam_step (k.py:9)"
    >>> counts = attribute([(fused, 3), ("main (m.py:1)", 2)])
    >>> counts[PARTS[0][0]], counts[(PARTS[0][0], "kernel")], counts[PARTS[-1][0]]
    (3, 3, 2)
    """
    counts: Counter = Counter()
    for stack, n in stacks:
        frames = stack.split(";")
        for name, marks, kernels in PARTS:
            if any(mark in frame for frame in frames for mark in marks):
                counts[name] += n
                if kernels and frames[-1].startswith(kernels):
                    counts[(name, "kernel")] += n
                break
    return counts


def table(counts: dict[str, Counter], rate: int) -> str:
    """Seconds per part, float32 and OMC, and the difference."""
    fp32, omc = (counts[c] for c in CONFIGS)
    lines = [
        "| part | float32 s | OMC s | OMC - float32 s |",
        "|---|---|---|---|",
    ]
    for name, _, kernels in PARTS:
        a, b = fp32[name] / rate, omc[name] / rate
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
        if kernels:
            k = omc[(name, "kernel")] / rate
            lines.append(f"| {name}: kernel | - | {k:.1f} | |")
            lines.append(f"| {name}: the rest (Python, copies) | - | {b - k:.1f} | |")
    a, b = (
        sum(v for k, v in fp32.items() if isinstance(k, str)),
        sum(v for k, v in omc.items() if isinstance(k, str)),
    )
    lines.append(
        f"| **total** | {a / rate:.1f} | {b / rate:.1f} | {(b - a) / rate:+.1f} "
        f"({b / a:.3f}x) |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=100, help="samples a second")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("main_job_profile.py needs py-spy: pip install py-spy")
    before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        stacks = profile(args.rounds, args.rate, Path(folder))
    counts = {config: attribute(stacks[config]) for config in CONFIGS}
    after = os.getloadavg()
    command = " ".join(["python", *sys.argv])
    text = (
        "# Where the main job's extra time goes\n\n"
        f"Written by `{command}` (py-spy, {args.rate} samples a second; "
        f"seed 1986, {args.rounds} rounds of each federation, the two side by "
        f"side). Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; load average {before[0]:.2f} "
        f"before, {after[0]:.2f} after.\n\n{table(counts, args.rate)}\n"
    )
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
