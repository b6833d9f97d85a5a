"""The main job: federated OMC against federated float32 on the bundled corpus.

Run with ``python -m speechbrain_omc.federated.demo``. It runs the embedded
federated recipe (``recipes/SynthSpeech/federated/train.py``) twice with the
same seed, rounds and clients: ``fed_omc.yaml`` (e3m7, per-variable scale,
weight-matrices-only, 10 % float32) and ``fed_fp32.yaml`` (no compression).
The two runs are separate processes started together, one CPU thread each,
so that they share a two-core machine fairly. Progress bars follow their
rounds; at the end a table compares test WER on the held-out speakers,
parameter memory of the client model and bytes communicated (``len()`` of
every message, both directions).

Other options are passed to both runs as hparams overrides
(``--clients_per_round 2``). ``--baseline recorded`` runs only OMC and takes
the float32 column from the recorded run in
``benchmarks/results/federated_synthspeech.json`` (the table says so).
Outputs go to ``results/main_job/<experiment>/<seed>/`` (CSV log, PNG plot,
summary); a run that is interrupted resumes where it stopped when started
again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "SynthSpeech" / "federated"
RECORDED = REPO / "benchmarks" / "results" / "federated_synthspeech.json"
RUNS = {"OMC": "fed_omc", "float32": "fed_fp32"}


def _rounds_done(folder: Path) -> tuple[int, str]:
    path = folder / "rounds.csv"
    if not path.is_file():
        return 0, ""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return 0, ""
    wer = next((r["valid_WER"] for r in reversed(rows) if r.get("valid_WER")), "")
    return len(rows), wer


def _launch(name: str, folder: Path, args, extra: list[str]) -> subprocess.Popen:
    command = [
        sys.executable,
        str(RECIPE / "train.py"),
        str(RECIPE / "hparams" / f"{RUNS[name]}.yaml"),
        "--output_folder",
        str(folder),
        "--noprogressbar",
    ]
    if args.rounds:
        command += ["--rounds", str(args.rounds)]
    command += extra
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "stderr.txt", "ab")  # noqa: SIM115 (closed by the caller)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, env=env
    )
    process.log = log
    return process


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def format_table(results: dict[str, dict], recorded: bool = False) -> str:
    """The comparison table of the main job.

    Arguments
    ---------
    results : dict
        ``{"OMC": summary, "float32": summary}`` (``summary.json`` contents).
    recorded : bool
        Whether the float32 column comes from a recorded run.

    Returns
    -------
    str

    Example
    -------
    >>> omc = {"test_WER": 20.0, "parameter_bytes": 4e5, "bytes_total": 4e6,
    ...        "bytes_down": 2e6, "bytes_up": 2e6, "minutes": 1.0}
    >>> f32 = {"test_WER": 19.0, "parameter_bytes": 1e6, "bytes_total": 1e7,
    ...        "bytes_down": 5e6, "bytes_up": 5e6, "minutes": 1.0}
    >>> print(format_table({"OMC": omc, "float32": f32}).splitlines()[2])
    test WER, held-out speakers   19.00 %          20.00 %          +1.00 points
    """
    omc, f32 = results["OMC"], results["float32"]

    def ratio(key):
        return f"{omc[key] / f32[key]:.1%} ({1 - omc[key] / f32[key]:.1%} less)"

    rows = [
        ("", "float32" + (" (recorded)" if recorded else ""), "OMC", "OMC vs float32"),
        (
            "test WER, held-out speakers",
            f"{f32['test_WER']:.2f} %",
            f"{omc['test_WER']:.2f} %",
            f"{omc['test_WER'] - f32['test_WER']:+.2f} points",
        ),
        (
            "parameter memory (client)",
            _mb(f32["parameter_bytes"]),
            _mb(omc["parameter_bytes"]),
            ratio("parameter_bytes"),
        ),
        (
            "bytes communicated",
            _mb(f32["bytes_total"]),
            _mb(omc["bytes_total"]),
            ratio("bytes_total"),
        ),
        ("  server -> clients", _mb(f32["bytes_down"]), _mb(omc["bytes_down"]), ""),
        ("  clients -> server", _mb(f32["bytes_up"]), _mb(omc["bytes_up"]), ""),
        (
            "minutes (wall)",
            f"{f32.get('minutes', float('nan')):.1f}",
            f"{omc.get('minutes', float('nan')):.1f}",
            "",
        ),
    ]
    if "cpu_minutes_this_process" in omc and "cpu_minutes_this_process" in f32:
        rows.append(
            (
                "CPU minutes",
                f"{f32['cpu_minutes_this_process']:.1f}",
                f"{omc['cpu_minutes_this_process']:.1f}",
                "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 6))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the main job and print the table.

    Arguments
    ---------
    argv : list of str, optional
        Command-line arguments.

    Returns
    -------
    dict
        The two summaries.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="results/main_job")
    parser.add_argument("--rounds", type=int, default=None, help="override rounds")
    parser.add_argument(
        "--baseline",
        choices=("run", "recorded"),
        default="run",
        help="run the float32 federation too (default) or read the recorded one",
    )
    # Other options go to both runs as hparams overrides (``--lr 0.1``).
    args, extra = parser.parse_known_args(argv)
    output = Path(args.output).resolve()
    names = ["OMC"] if args.baseline == "recorded" else ["OMC", "float32"]
    seed = 1986
    folders = {n: output / RUNS[n] / str(seed) for n in names}
    rounds = args.rounds or _default_rounds()
    start = time.perf_counter()
    processes = {n: _launch(n, folders[n], args, extra) for n in names}
    bars = {
        n: tqdm(total=rounds, desc=f"{n:>7} rounds", position=i, dynamic_ncols=True)
        for i, n in enumerate(names)
    }
    minutes = {}
    try:
        while any(p.poll() is None for p in processes.values()):
            for n, bar in bars.items():
                done, wer = _rounds_done(folders[n])
                bar.update(done - bar.n)
                if wer:
                    bar.set_postfix(valid_WER=f"{float(wer):.1f}")
                if processes[n].poll() is not None and n not in minutes:
                    minutes[n] = (time.perf_counter() - start) / 60
            time.sleep(1.0)
    except KeyboardInterrupt:
        for process in processes.values():
            process.terminate()
        raise
    finally:
        for n, bar in bars.items():
            bar.update(_rounds_done(folders[n])[0] - bar.n)
            bar.close()
            processes[n].log.close()
    for n, process in processes.items():
        minutes.setdefault(n, (time.perf_counter() - start) / 60)
        if process.returncode != 0:
            tail = (folders[n] / "stderr.txt").read_text(errors="replace")[-3000:]
            raise SystemExit(f"the {n} run failed ({process.returncode}):\n{tail}")
    results = {}
    for n in names:
        results[n] = json.loads((folders[n] / "summary.json").read_text())
        results[n]["minutes"] = minutes[n]
    recorded = args.baseline == "recorded"
    if recorded:
        results["float32"] = json.loads(RECORDED.read_text())["float32"]
    print()
    print(
        f"Federated training on SynthSpeech: {results['OMC']['num_clients']} clients "
        f"(speaker groups), {results['OMC']['clients_per_round']} per round, "
        f"{results['OMC']['rounds']} rounds, seed {seed}; "
        + (
            "OMC measured now, float32 from the recorded run"
            if recorded
            else "both measured now, side by side"
        )
        + f" (load average {os.getloadavg()[0]:.1f})"
    )
    print(format_table(results, recorded))
    print(
        f"\nlogs and plots: {output}/<run>/{seed}/rounds.csv, rounds.png, summary.json"
    )
    return results


def _default_rounds() -> int:
    text = (RECIPE / "hparams" / "fed_omc.yaml").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("rounds:"):
            return int(line.split(":")[1].split("#")[0])
    return 0


if __name__ == "__main__":
    main()
