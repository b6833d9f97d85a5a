"""Federated OMC against federated float32 on SynthSpeech; writes the record.

::

    python benchmarks/federated_synthspeech.py

runs the main job (:mod:`speechbrain_omc.experiments.main_job`: the embedded
federated simulation with the packaged ``fed_omc.yaml`` and ``fed_fp32.yaml``,
same seed, rounds and clients, the two runs side by side, one thread each)
into ``results/benchmark_federated`` and writes
``benchmarks/results/federated_synthspeech.{md,json}``: test WER on the
held-out speakers with 95 % bootstrap intervals (and the paired interval of
the difference), bytes communicated (``len()`` of the messages), parameter
memory, minutes, the machine's load average, and the per-round logs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from speechbrain_omc.experiments import main_job  # noqa: E402

OUT = REPO / "benchmarks" / "results"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _time_entry(record: dict) -> dict | None:
    """One run's minutes and WERs, for the record's list of runs (None for a
    record from before these were kept)."""
    omc, f32 = record.get("OMC", {}), record.get("float32", {})
    cpu = "cpu_minutes_this_process"
    try:
        return {
            "started": record.get("started") or record["uptime_before"].split()[0],
            "command": record["command"],
            "commit": record.get("commit"),
            "float32_minutes": round(f32["minutes"], 3),
            "OMC_minutes": round(omc["minutes"], 3),
            "wall_ratio": round(omc["minutes"] / f32["minutes"], 3),
            "cpu_ratio": round(omc[cpu] / f32[cpu], 3),
            "test_WER": [f32["test_WER"], omc["test_WER"]],
        }
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _history(path: Path) -> list[dict]:
    """The runs recorded so far in ``path`` (empty without a record)."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    history = previous.get("time_history")
    if history is None:  # a record from before the list: its own run
        history = [_time_entry(previous)]
    return [h for h in history if h]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> None:
    """Run and record.

    Arguments
    ---------
    argv : list of str, optional
        ``--output`` (run folder), ``--rounds`` (override).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="results/benchmark_federated")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the .md from the recorded .json and the run's logs",
    )
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    if args.render_only:
        record = json.loads((OUT / "federated_synthspeech.json").read_text())
    else:
        record = run(args)
    render(record, output)


def run(args) -> dict:
    """Run the main job and record its numbers in the .json.

    Arguments
    ---------
    args : argparse.Namespace
        ``output``, ``rounds``.

    Returns
    -------
    dict
        The record.
    """
    command = f"python benchmarks/federated_synthspeech.py --output {args.output}"
    if args.rounds:
        command += f" --rounds {args.rounds}"
    # Minutes vary from run to run on a shared machine: every recorded run of
    # the same command is kept (read now: a broken record fails before the run).
    path = OUT / "federated_synthspeech.json"
    history = [h for h in _history(path) if h.get("command") == command]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    before = _uptime()
    start = time.perf_counter()
    job_argv = ["--output", args.output]
    if args.rounds:
        job_argv += ["--rounds", str(args.rounds)]
    results = main_job.main(job_argv)
    wall = (time.perf_counter() - start) / 60
    after = _uptime()
    omc, f32 = results["OMC"], results["float32"]
    seed = str(omc["seed"])
    output = Path(args.output).resolve()
    difference = main_job.wer_difference(
        {n: output / main_job.RUNS[n] / seed for n in ("OMC", "float32")}
    )
    record = {
        "command": command,
        "started": started,
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "uptime_before": before,
        "uptime_after": after,
        "wall_minutes": round(wall, 2),
        "OMC": omc,
        "float32": f32,
        "wer_difference_points": omc["test_WER"] - f32["test_WER"],
        "wer_difference_ci95": None
        if difference is None
        else [difference.low, difference.high],
        "bytes_reduction": 1 - omc["bytes_total"] / f32["bytes_total"],
        "parameter_memory_reduction": 1
        - omc["parameter_bytes"] / f32["parameter_bytes"],
    }
    record["time_history"] = [*history, _time_entry(record)]
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def render(record: dict, output: Path) -> None:
    """Write ``federated_synthspeech.md`` from a record and the run's logs.

    Arguments
    ---------
    record : dict
        What :func:`run` recorded.
    output : Path
        The run folder (its ``rounds.csv`` files become the per-round tables).
    """
    from speechbrain_omc.asr.stats import Interval

    omc, f32 = record["OMC"], record["float32"]
    results = {"OMC": omc, "float32": f32}
    ci = record.get("wer_difference_ci95")
    difference = (
        None
        if ci is None
        else Interval(record["wer_difference_points"], ci[0], ci[1], 0.0, 0)
    )
    command, before, after = (
        record["command"],
        record["uptime_before"],
        record["uptime_after"],
    )
    logs = {
        name: _rows(output / main_job.RUNS[name] / str(omc["seed"]) / "rounds.csv")
        for name in ("OMC", "float32")
    }
    output = os.path.relpath(output, REPO)

    def time_table(history: list[dict]) -> str:
        lines = [
            "| started | code at | float32 min | OMC min | wall ratio | CPU ratio "
            "| test WER % float32 / OMC |",
            "|---|---|---|---|---|---|---|",
        ]
        for h in history:
            lines.append(
                f"| {h['started']} | {h.get('commit') or '-'} "
                f"| {h['float32_minutes']:.2f} | {h['OMC_minutes']:.2f} "
                f"| {h['wall_ratio']:.3f} | {h['cpu_ratio']:.3f} "
                f"| {h['test_WER'][0]:.2f} / {h['test_WER'][1]:.2f} |"
            )
        return "\n".join(lines)

    def log_table(rows: list[dict]) -> str:
        keys = [
            "round",
            "clients",
            "bytes_down",
            "bytes_up",
            "float32_bytes_down",
            "float32_bytes_up",
            "train_loss",
            "valid_WER",
            "seconds",
            "load1",
        ]
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in rows:
            cells = []
            for key in keys:
                value = row.get(key, "")
                if key in ("train_loss", "valid_WER") and value:
                    value = f"{float(value):.2f}"
                cells.append(value)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    verdict = (
        "within the test set's noise: this seed cannot tell OMC from float32"
        if difference is not None and difference.contains(0.0)
        else "beyond the test set's noise for this seed"
    )
    md = f"""# Federated OMC against federated float32 on SynthSpeech (the main job)

Written by `{command}` (the README's main job,
`python -m speechbrain_omc.experiments.main_job`, plus this record). Both runs use the
same seed ({omc["seed"]}), rounds ({omc["rounds"]}), clients ({omc["num_clients"]}
speaker groups of the 24 training speakers, {omc["clients_per_round"]} sampled per
round) and local training ({omc["local_epochs"]} local epochs of the packaged client
optimizer, Adam at lr 1e-3, on a four-layer Conformer); they differ only
in the `omc:` entry of the hparams (the packaged `fed_omc.yaml` against
`fed_fp32.yaml`, the same files as `recipes/SynthSpeech/federated/hparams/`). The
two ran side by side, one torch thread each.

Machine: {record["machine"]}; shared with other jobs, so minutes are noisy:

- before: `{before}`
- after: `{after}`

The job ran these two commands at once (one torch thread each):

```
python -m speechbrain_omc.asr.federation fed_omc.yaml \\
    --output_folder {output}/fed_omc/{omc["seed"]} --noprogressbar
python -m speechbrain_omc.asr.federation fed_fp32.yaml \\
    --output_folder {output}/fed_fp32/{omc["seed"]} --noprogressbar
```

## Result

```text
{main_job.format_table(results, difference)}
```

- Test WER is measured on the {omc["test_utterances"]} utterances
  ({omc["test_words"]} words) of the 28 held-out test speakers with the final
  global model as clients receive it. Intervals are 95 % percentile bootstrap
  intervals over the test utterances (10,000 resamples); the difference is a
  paired bootstrap over the same utterances: **{record["wer_difference_points"]:+.2f}
  points**, {verdict}.
- One seed: these intervals hold the test set's sampling noise only, not the
  training noise (initialisation, client sampling, stochastic rounding). The
  same two configurations and bf16 + stochastic rounding over eight seeds are
  `benchmarks/results/parity/parity.md` (`python -m
  speechbrain_omc.experiments.parity`); the job prints that record's
  paired difference beside its own verdict.
- Bytes communicated are the summed `len()` of every message, server to clients
  and back, over all rounds: OMC sends **{record["bytes_reduction"]:.1%} fewer**.
  The float32-equivalent bytes of the OMC run's own messages:
  {omc["float32_bytes_total"]:,} (its measured total: {omc["bytes_total"]:,}).
- Parameter memory is the client model's parameter storage, counted exactly
  (packed codes + transforms + float32 parameters):
  {record["parameter_memory_reduction"]:.1%} less under OMC.
- Wall time of the whole job: {record["wall_minutes"]:.1f} minutes.

Raw numbers: `benchmarks/results/federated_synthspeech.json`.

## Notes

- Same seed, same everything else: client sampling, data order, dropout masks
  and the clients' RNG seeds are functions of `(seed, round, client)`, so the two
  runs differ only by compression (and the OMC run's per-client float32 draws).
- A run is deterministic on one machine: repeated, it gives the same numbers.
  Another machine, library build or thread count changes the float
  arithmetic and so the numbers (within the intervals above), not the
  conclusions; nothing here claims the same digits elsewhere.
- Validation WER (12 dev speakers, 144 utterances, 843 words) is logged
  every `eval_every` rounds.
- Bytes are whole messages: every parameter (compressed payloads with their
  headers, transforms and CRCs, or float32 arrays), names, metadata and
  checksums. Constant buffers (positional encodings) are not sent.
- Parameter memory counts parameter storage only, not activations,
  gradients or optimizer state.
- Time: OMC took {omc["minutes"] / f32["minutes"]:.3f}x float32's wall minutes
  and {omc["cpu_minutes_this_process"] / f32["cpu_minutes_this_process"]:.3f}x its
  CPU minutes in this run (decompression in forward and backward, stochastic
  rounding in every update); both ran at once on the same cores, so other
  jobs on the machine slow both. The step alone, without federation:
  `benchmarks/results/main_job_step.md`. Every recorded run of this command
  (*code at*: the commit the run's code was at):

{time_table(record.get("time_history") or [])}

## Per-round logs

### OMC (`fed_omc.yaml`)

{log_table(logs["OMC"])}

### float32 (`fed_fp32.yaml`)

{log_table(logs["float32"])}
"""
    (OUT / "federated_synthspeech.md").write_text(md)
    print(f"\nwrote {OUT / 'federated_synthspeech.md'}")


if __name__ == "__main__":
    main()
