"""Federated OMC against federated float32 on SynthSpeech; writes the record.

::

    python benchmarks/federated_synthspeech.py

runs the main job (:mod:`speechbrain_omc.federated.demo`: the embedded
federated recipe with ``fed_omc.yaml`` and ``fed_fp32.yaml``, same seed,
rounds and clients, the two runs side by side, one thread each) into
``results/benchmark_federated`` and writes
``benchmarks/results/federated_synthspeech.{md,json}``: test WER on the
held-out speakers, bytes communicated (``len()`` of the messages), parameter
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

from speechbrain_omc.federated import demo  # noqa: E402

OUT = REPO / "benchmarks" / "results"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


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
    args = parser.parse_args(argv)
    command = f"python benchmarks/federated_synthspeech.py --output {args.output}"
    if args.rounds:
        command += f" --rounds {args.rounds}"
    before = _uptime()
    start = time.perf_counter()
    demo_argv = ["--output", args.output]
    if args.rounds:
        demo_argv += ["--rounds", str(args.rounds)]
    results = demo.main(demo_argv)
    wall = (time.perf_counter() - start) / 60
    after = _uptime()
    omc, f32 = results["OMC"], results["float32"]
    output = Path(args.output).resolve()
    logs = {
        name: _rows(output / demo.RUNS[name] / str(omc["seed"]) / "rounds.csv")
        for name in ("OMC", "float32")
    }
    record = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "uptime_before": before,
        "uptime_after": after,
        "wall_minutes": round(wall, 2),
        "OMC": omc,
        "float32": f32,
        "wer_difference_points": omc["test_WER"] - f32["test_WER"],
        "bytes_reduction": 1 - omc["bytes_total"] / f32["bytes_total"],
        "parameter_memory_reduction": 1
        - omc["parameter_bytes"] / f32["parameter_bytes"],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "federated_synthspeech.json").write_text(json.dumps(record, indent=2) + "\n")

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

    md = f"""# Federated OMC against federated float32 on SynthSpeech

Written by `{command}` (the README's main job,
`python -m speechbrain_omc.federated.demo`, plus this record). Both runs use the
same seed ({omc["seed"]}), rounds ({omc["rounds"]}), clients ({omc["num_clients"]}
speaker groups of the 24 training speakers, {omc["clients_per_round"]} sampled per
round) and local training ({omc["local_epochs"]} local epochs of SGD); they differ only
in the `omc:` entry of the hparams (`recipes/SynthSpeech/federated/hparams/fed_omc.yaml`
against `fed_fp32.yaml`). The two ran side by side, one torch thread each.

Machine: {record["machine"]}; shared with other jobs, so minutes are noisy:

- before: `{before}`
- after: `{after}`

## Result

{demo.format_table(results)}

- Test WER is measured on the 4 held-out test speakers (48 utterances) with the
  final global model as clients receive it: **{record["wer_difference_points"]:+.2f}
  points** for OMC (Done-when: within 2 points).
- Bytes communicated are the summed `len()` of every message, server to clients
  and back, over all rounds: OMC sends **{record["bytes_reduction"]:.1%} fewer**
  (Done-when: at least 55 %). The float32-equivalent bytes of the OMC run's own
  messages: {omc["float32_bytes_total"]:,} (its measured total: {omc["bytes_total"]:,}).
- Parameter memory is the client model's parameter storage, counted exactly
  (packed codes + transforms + float32 parameters):
  {record["parameter_memory_reduction"]:.1%} less under OMC.
- Wall time of the whole job: {record["wall_minutes"]:.1f} minutes.

Raw numbers: `benchmarks/results/federated_synthspeech.json`.

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
