"""The main job's training step: float32 against OMC, per batch, same process.

The main job (``python -m speechbrain_omc.experiments.main_job``) trains a small
Conformer (0.5 M parameters, 17 weight matrices, d_model 96): at that size an
OMC step costs what Python does per compressed parameter (the linear
layers' decoding, the fused update's calls), not what the codec does per
value. This benchmark isolates the step: both Brains are built from the
packaged ``fed_fp32.yaml`` / ``fed_omc.yaml`` on the same training batches,
and ``fit_batch`` runs in rounds, the two alternating, one torch thread.
Reported per Brain: CPU milliseconds per batch (``time.process_time``, which
other jobs on a shared machine disturb less than wall time; median and
minimum over rounds) and the Python-level calls per batch (``sys.setprofile``,
a count that load does not change), with their ratios.

Usage::

    python benchmarks/main_job_step.py [--rounds 15] [--batches 12]
                                       [--out benchmarks/results/main_job_step.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_omc.asr import hparams_file
from speechbrain_omc.asr.data import build_label_encoder, dataset_from_csv
from speechbrain_omc.asr.federation import build_brain, prepare_federation

CONFIGS = ("fed_fp32.yaml", "fed_omc.yaml")


def make(name: str, folder: Path, batches: int):
    """A training-mode Brain of one packaged hparams file and its batches."""
    with open(hparams_file(name), encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"output_folder": str(folder / name)})
    _, csvs = prepare_federation(hparams)
    train_csv = csvs[hparams["train_split"]]
    encoder = build_label_encoder(train_csv, folder / name / "label_encoder.txt")
    data = dataset_from_csv(train_csv, hparams, encoder)
    loader = sb.dataio.dataloader.make_dataloader(
        data, batch_size=hparams["batch_size"], shuffle=False
    )
    brain = build_brain(hparams)
    brain.on_fit_start()  # optimizers, and the compression of the OMC Brain
    brain.modules.train()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    return brain, [b for _, b in zip(range(batches), loader)]


def calls_per_batch(brain, batches) -> float:
    """Python-level calls (Python and C functions) made per ``fit_batch``."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        for batch in batches:
            brain.fit_batch(batch)
    finally:
        sys.setprofile(None)
    return count / len(batches)


def run(rounds: int, batches: int) -> dict:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        brains = {name: make(name, Path(folder), batches) for name in CONFIGS}
        for brain, data in brains.values():  # warm-up: first steps allocate
            for batch in data[:2]:
                brain.fit_batch(batch)
        ms = {name: [] for name in CONFIGS}
        for _ in range(rounds):
            for name, (brain, data) in brains.items():
                start = time.process_time()
                for batch in data:
                    brain.fit_batch(batch)
                ms[name].append((time.process_time() - start) / len(data) * 1e3)
        calls = {name: calls_per_batch(*brains[name]) for name in CONFIGS}
    return {"ms": ms, "calls": calls}


def report(result: dict, command: str, before: str, after: str) -> str:
    ms, calls = result["ms"], result["calls"]
    fp32, omc = CONFIGS
    rows = []
    for name in CONFIGS:
        rows.append(
            f"| {name} | {statistics.median(ms[name]):.1f} | {min(ms[name]):.1f} "
            f"| {calls[name]:,.0f} |"
        )
    median = statistics.median(ms[omc]) / statistics.median(ms[fp32])
    best = min(ms[omc]) / min(ms[fp32])
    return "\n".join(
        [
            "# The main job's training step: float32 against OMC",
            "",
            f"Written by `{command}`.",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, torch {torch.__version__}; "
            "one torch thread.",
            f"Load before: `{before}`; after: `{after}`.",
            "",
            "| Brain | CPU ms/batch, median | min | Python calls/batch |",
            "|---|---|---|---|",
            *rows,
            "",
            f"OMC / float32: **{median:.3f}x** CPU time (median over "
            f"{len(ms[omc])} rounds), {best:.3f}x (minimum); "
            f"{calls[omc] / calls[fp32]:.2f}x the Python calls "
            f"(+{calls[omc] - calls[fp32]:,.0f} per batch).",
            "",
        ]
    )


def _load() -> str:
    return os.popen("uptime").read().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    before = _load()
    result = run(args.rounds, args.batches)
    command = "python benchmarks/main_job_step.py " + " ".join(sys.argv[1:])
    text = report(result, command.strip(), before, _load())
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
