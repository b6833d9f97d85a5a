"""The main job: federated OMC against federated float32 on the bundled corpus.

Runs the embedded simulation (:mod:`speechbrain_omc.asr.federation`) twice
with the same seed, rounds and clients, ``fed_omc.yaml`` and
``fed_fp32.yaml``, as two processes side by side with one CPU thread each,
then prints a table: test WER on the held-out speakers with 95 % bootstrap
intervals over utterances, the paired OMC minus float32 difference, client
parameter memory and bytes communicated. One seed's intervals leave out the
training noise; the comparison over seeds is the paper table's. Other
options go to both runs as hparams overrides (``--clients_per_round 2``);
outputs go to ``results/main_job/<experiment>/<seed>/``, and an interrupted
run resumes when started again.
::

    python -m speechbrain_omc.experiments.main_job
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from speechbrain_omc.asr import hparams_file, paired_difference, read_test_errors
from speechbrain_omc.asr.stats import Interval, mean_ci

RUNS = {"OMC": "fed_omc", "float32": "fed_fp32"}
#: Where the multi-seed comparisons are recorded (in the source repository):
#: this job's two configurations over seeds, and every factor of the paper.
MULTI_SEED_RECORD = "benchmarks/results/parity/parity.md"
PAPER_TABLE_RECORD = "benchmarks/results/paper_table/paper_table.md"
#: The multi-seed record's runs, one row per configuration and seed.
MULTI_SEED_RUNS = "benchmarks/results/parity/runs.csv"
#: The record's names of this job's two configurations.
RECORD_CELLS = {"OMC": "default", "float32": "float32"}


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
        "-m",
        "speechbrain_omc.asr.federation",
        str(hparams_file(RUNS[name])),
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
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
    process.log = log
    return process


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def _wer(summary: dict) -> str:
    low, high = summary.get("test_WER_ci95") or (float("nan"), float("nan"))
    return f"{summary['test_WER']:.2f} % [{low:.2f}, {high:.2f}]"


def wer_difference(folders: dict[str, Path]) -> Interval | None:
    """OMC minus float32 test WER, paired bootstrap over the test utterances.

    Arguments
    ---------
    folders : dict
        ``{"OMC": folder, "float32": folder}``, each with ``test_errors.csv``.

    Returns
    -------
    Interval or None
        None when the two runs were not scored on the same utterances.
    """
    omc = read_test_errors(folders["OMC"] / "test_errors.csv")
    f32 = read_test_errors(folders["float32"] / "test_errors.csv")
    if set(omc) != set(f32) or not omc:
        return None
    ids = sorted(omc)
    if any(omc[u][1] != f32[u][1] for u in ids):
        return None
    return paired_difference(
        [f32[u][0] for u in ids], [omc[u][0] for u in ids], [omc[u][1] for u in ids]
    )


@dataclass(frozen=True)
class SeedComparison:
    """The multi-seed record of this job's two configurations: each one's
    test WER over seeds and OMC minus float32 paired by seed (95 % Student-t
    intervals over seeds)."""

    float32: Interval
    omc: Interval
    difference: Interval

    def verdict(self) -> str:
        """What the paired interval says, in words."""
        d = self.difference
        if d.contains(0.0):
            return "over seeds, OMC cannot be told from float32"
        side = "above" if d.value > 0 else "below"
        return f"over seeds, OMC ends {abs(d.value):.2f} points {side} float32"


def read_seed_comparison(runs_csv: Path) -> SeedComparison | None:
    """This job's two configurations in the multi-seed record (``runs.csv``).

    Arguments
    ---------
    runs_csv : Path
        The record's runs (``cell``, ``seed``, ``test_WER`` columns).

    Returns
    -------
    SeedComparison or None
        None without the file or without two seeds run by both.

    Example
    -------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "runs.csv"
    >>> _ = path.write_text("cell,seed,test_WER\\nfloat32,1,10\\ndefault,1,10.5\\n"
    ...                     "float32,2,11\\ndefault,2,11.5\\n")
    >>> read_seed_comparison(path).difference.value
    0.5
    """
    try:
        with open(runs_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    wer: dict[str, dict[int, float]] = {}
    for row in rows:
        try:
            seed, value = int(row["seed"]), float(row["test_WER"])
        except (KeyError, TypeError, ValueError):
            continue  # an unfinished or malformed row
        runs = wer.setdefault(row.get("cell", ""), {})
        if not math.isfinite(value) or seed in runs:
            return None  # a record that contradicts itself says nothing
        runs[seed] = value
    f32 = wer.get(RECORD_CELLS["float32"], {})
    omc = wer.get(RECORD_CELLS["OMC"], {})
    seeds = sorted(set(f32) & set(omc))
    if len(seeds) < 2:
        return None
    return SeedComparison(
        mean_ci([f32[s] for s in seeds]),
        mean_ci([omc[s] for s in seeds]),
        mean_ci([omc[s] - f32[s] for s in seeds]),
    )


def _seed_lines(record: SeedComparison | None, difference: Interval | None) -> list:
    if record is None:
        return []
    d = record.difference
    lines = [
        f"The record over {d.n} seeds ({MULTI_SEED_RECORD}), this job's setting: "
        f"float32 {record.float32.format()}, OMC {record.omc.format()}; OMC minus "
        f"float32, paired by seed, {d.value:+.2f} points [{d.low:+.2f}, "
        f"{d.high:+.2f}]: {record.verdict()}."
    ]
    if difference is not None:
        agrees = d.low <= difference.value <= d.high or difference.contains(d.value)
        lines.append(
            f"This run's difference ({difference.value:+.2f}; its seed is one of "
            "the record's) "
            + (
                "agrees with it."
                if agrees
                else "lies outside the record's interval and its own: another "
                "machine or code than the record's, or an outlying seed."
            )
        )
    return lines


def _delta(results: dict[str, dict], difference: Interval | None) -> str:
    omc, f32 = results["OMC"], results["float32"]
    if difference is None:
        return f"{omc['test_WER'] - f32['test_WER']:+.2f} points"
    verdict = "within noise" if difference.contains(0.0) else "beyond the test noise"
    return (
        f"{difference.value:+.2f} points [{difference.low:+.2f}, "
        f"{difference.high:+.2f}]: {verdict}"
    )


def _table_rows(results: dict[str, dict], delta: str) -> list[tuple[str, ...]]:
    omc, f32 = results["OMC"], results["float32"]

    def ratio(key):
        return f"{omc[key] / f32[key]:.1%} ({1 - omc[key] / f32[key]:.1%} less)"

    def both(key, show, note=""):
        return (show(f32[key]), show(omc[key]), note)

    def minutes(summary):
        return f"{summary.get('minutes', float('nan')):.1f}"

    rows = [
        ("", "float32", "OMC", "OMC vs float32"),
        ("test WER [95 % CI], held-out speakers", _wer(f32), _wer(omc), delta),
        ("parameter memory (client)",)
        + both("parameter_bytes", _mb, ratio("parameter_bytes")),
        ("bytes communicated",) + both("bytes_total", _mb, ratio("bytes_total")),
        ("  server -> clients",) + both("bytes_down", _mb),
        ("  clients -> server",) + both("bytes_up", _mb),
        ("minutes (wall)", minutes(f32), minutes(omc), ""),
    ]
    if "cpu_minutes_this_process" in omc and "cpu_minutes_this_process" in f32:
        rows.append(
            ("CPU minutes",) + both("cpu_minutes_this_process", "{:.1f}".format)
        )
    return rows


def format_table(results: dict[str, dict], difference: Interval | None = None) -> str:
    """The comparison table of the main job.

    Arguments
    ---------
    results : dict
        ``{"OMC": summary, "float32": summary}`` (``summary.json`` contents,
        plus ``minutes``).
    difference : Interval, optional
        OMC minus float32 test WER with its paired interval.

    Returns
    -------
    str

    Example
    -------
    >>> omc = {"test_WER": 20.0, "test_WER_ci95": [18.0, 22.1],
    ...        "parameter_bytes": 4e5, "bytes_total": 4e6,
    ...        "bytes_down": 2e6, "bytes_up": 2e6, "minutes": 1.0}
    >>> f32 = {"test_WER": 19.0, "test_WER_ci95": [17.0, 21.0],
    ...        "parameter_bytes": 1e6, "bytes_total": 1e7,
    ...        "bytes_down": 5e6, "bytes_up": 5e6, "minutes": 1.0}
    >>> d = Interval(1.0, -0.5, 2.5, 0.8, 700)
    >>> print(format_table({"OMC": omc, "float32": f32}, d).splitlines()[2])
    test WER [95 % CI], held-out speakers  19.00 % [17.00, 21.00]  20.00 % [18.00, 22.10]  +1.00 points [-0.50, +2.50]: within noise
    """  # noqa: E501
    rows = _table_rows(results, _delta(results, difference))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 6))
    return "\n".join(lines)


def reading(
    results: dict[str, dict],
    difference: Interval | None,
    record: SeedComparison | None = None,
) -> str:
    """What the table can and cannot tell, in words.

    Example
    -------
    >>> r = {"OMC": {"test_utterances": 700, "test_words": 4000}}
    >>> "700 utterances" in reading(r, Interval(0.3, -0.9, 1.5, 0.6, 700))
    True
    """
    omc = results["OMC"]
    lines = [
        f"Test set: {omc.get('test_utterances', '?')} utterances, "
        f"{omc.get('test_words', '?')} words; intervals are 95 % bootstrap "
        "intervals over utterances (the difference: paired, same utterances)."
    ]
    if difference is not None:
        if difference.contains(0.0):
            lines.append(
                f"The difference ({difference.value:+.2f} points) is within the test "
                "set's noise: this run cannot tell OMC from float32."
            )
        else:
            lines.append(
                f"The difference ({difference.value:+.2f} points) is beyond the test "
                "set's noise for this seed."
            )
    lines += _seed_lines(record, difference)
    lines.append(
        "One seed: training noise (initialisation, client sampling, stochastic "
        "rounding) is not in these intervals. These two configurations over "
        "eight seeds (95 % CI over seeds, paired by seed) are in "
        f"{MULTI_SEED_RECORD} in the repository (python -m "
        "speechbrain_omc.experiments.parity); every factor of the paper in "
        f"{PAPER_TABLE_RECORD} (python -m speechbrain_omc.experiments.paper_table)."
    )
    lines.append(
        "Runs are deterministic on one machine; another machine, library build "
        "or thread count gives other numbers (within these intervals), not the "
        "same digits."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the main job (``argv``: its command line) and print the table;
    the two summaries."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="results/main_job")
    parser.add_argument("--rounds", type=int, default=None, help="override rounds")
    # Other options go to both runs as hparams overrides (``--lr 0.1``).
    args, extra = parser.parse_known_args(argv)
    output = Path(args.output).resolve()
    names = ["OMC", "float32"]
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
    difference = wer_difference(folders)
    print()
    print(
        f"Federated training on SynthSpeech: {results['OMC']['num_clients']} clients "
        f"(speaker groups), {results['OMC']['clients_per_round']} per round, "
        f"{results['OMC']['rounds']} rounds, seed {seed}; both measured now, side "
        f"by side (load average {os.getloadavg()[0]:.1f})"
    )
    print(format_table(results, difference))
    print()
    print(reading(results, difference, _record_for(args, extra)))
    print(
        f"\nlogs and plots: {output}/<run>/{seed}/rounds.csv, rounds.png, "
        "test_errors.csv, summary.json"
    )
    return results


def _record_for(args, extra: list[str]) -> SeedComparison | None:
    """The multi-seed record, when this run is its setting (packaged files,
    default rounds, no overrides) and the source repository is at hand."""
    if extra or args.rounds not in (None, _default_rounds()):
        return None
    repository = Path(__file__).resolve().parents[2]
    return read_seed_comparison(repository / MULTI_SEED_RUNS)


def _default_rounds() -> int:
    text = hparams_file(RUNS["OMC"]).read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("rounds:"):
            return int(line.split(":")[1].split("#")[0])
    return 0


if __name__ == "__main__":
    main()
