"""Run a grid of federated configurations over seeds, resumably.

Each run (a cell and a seed) is one process of
``python -m speechbrain_omc.asr.federation`` in ``<output>/runs/<cell>/<seed>/``
with one PyTorch thread (so its peak RSS is its own); ``jobs`` run at once. A
run with a ``summary.json`` is skipped when the grid starts again, an
interrupted one resumes from its server checkpoint. ``run.json`` records
each run's settings: a grid restarted with others refuses to mix them.

Example
-------
>>> from speechbrain_omc.experiments.grid import GridSettings, quick_grid
>>> runs = plan_runs(quick_grid(), GridSettings(2, (1, 2)), Path("/tmp/grid"))
>>> [(r.cell.name, r.seed) for r in runs]
[('float32', 1), ('default', 1), ('float32', 2), ('default', 2)]
>>> command_line(runs[1])[1:3]
['-m', 'speechbrain_omc.asr.federation']
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from speechbrain_omc.asr import hparams_file
from speechbrain_omc.experiments.grid import Cell, GridSettings

logger = logging.getLogger(__name__)

__all__ = [
    "GridMismatch",
    "Run",
    "adopt_finished",
    "command_line",
    "plan_runs",
    "run_grid",
]

SUMMARY = "summary.json"
SPEC = "run.json"


class GridMismatch(RuntimeError):
    """A run folder holds a run started with other settings."""


@dataclass(frozen=True)
class Run:
    """One federated run of the grid: a cell with a seed, its folder and overrides."""

    cell: Cell
    seed: int
    folder: Path
    overrides: Mapping[str, object]

    def __hash__(self) -> int:
        return hash((self.cell.name, self.seed, str(self.folder)))

    @property
    def spec(self) -> dict:
        """What the run is: its hparams file and overrides (``run.json``)."""
        return {
            "cell": self.cell.name,
            "hparams": self.cell.hparams,
            "overrides": json.loads(json.dumps(dict(self.overrides))),
        }

    @property
    def done(self) -> bool:
        """Whether the run finished (its summary is written)."""
        return (self.folder / SUMMARY).is_file()

    def summary(self) -> dict:
        """The finished run's ``summary.json``."""
        return json.loads((self.folder / SUMMARY).read_text(encoding="utf-8"))

    def write_spec(self) -> None:
        """Record what the run is (``run.json``) in its folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / SPEC).write_text(json.dumps(self.spec, indent=2) + "\n")

    def check_spec(self) -> None:
        """Raise :class:`GridMismatch` if the folder holds a run with other settings."""
        path = self.folder / SPEC
        if not path.is_file():
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved == self.spec:
            return
        mine, theirs = self.spec["overrides"], saved.get("overrides", {})
        diffs = [
            f"{k}: folder {theirs.get(k)!r}, this grid {mine.get(k)!r}"
            for k in sorted(set(mine) | set(theirs))
            if mine.get(k) != theirs.get(k)
        ]
        if saved.get("hparams") != self.spec["hparams"]:
            diffs.insert(0, f"hparams: {saved.get('hparams')} vs {self.cell.hparams}")
        raise GridMismatch(
            f"{self.folder} holds a run with other settings ("
            + "; ".join(diffs)
            + "): use another --output, or delete the folder"
        )


def plan_runs(cells: Sequence[Cell], settings: GridSettings, output: Path) -> list[Run]:
    """Every run of the grid, seed-major, so complete seeds finish early."""
    return [
        Run(
            cell,
            seed,
            Path(output) / "runs" / cell.name / str(seed),
            settings.run_overrides(cell, seed),
        )
        for seed in settings.all_seeds
        for cell in cells
        if seed in settings.seeds_of(cell.name)
    ]


def adopt_finished(runs: Sequence[Run], other: Path) -> list[Run]:
    """Take the finished runs of another grid's folder that are these runs.

    A run of ``other`` (``<other>/runs/<cell>/<seed>/``) with the same
    ``run.json`` (hparams file and every override, seed and rounds included)
    is the same computation: its ``run.json`` and ``summary.json`` are
    copied, so it is not run twice. Runs with other settings are left alone.

    Arguments
    ---------
    runs : sequence of Run
        This grid's runs; finished ones are not touched.
    other : Path
        The other grid's output folder.

    Returns
    -------
    list of Run
        The runs adopted.
    """
    adopted = []
    for run in runs:
        source = Path(other) / "runs" / run.cell.name / str(run.seed)
        if run.done or not (source / SUMMARY).is_file():
            continue
        try:
            spec = json.loads((source / SPEC).read_text(encoding="utf-8"))
            summary = (source / SUMMARY).read_text(encoding="utf-8")
            if not isinstance(json.loads(summary), dict):
                continue
        except (OSError, ValueError):
            continue  # unreadable, or a summary being written
        if spec != run.spec or (run.folder / SPEC).is_file():
            continue  # another run, or a run of this grid started here
        run.write_spec()
        partial = run.folder / (SUMMARY + ".tmp")
        partial.write_text(summary, encoding="utf-8")
        os.replace(partial, run.folder / SUMMARY)  # done only when whole
        logger.info("adopted from %s: %s", source, run.folder)
        adopted.append(run)
    return adopted


def _cli_value(value: object) -> str:
    # SpeechBrain reads each override as YAML: JSON is YAML, plain strings
    # stay plain (e3m7, random).
    return value if isinstance(value, str) else json.dumps(value)


def command_line(run: Run) -> list[str]:
    """The command of one run."""
    command = [
        sys.executable,
        "-m",
        "speechbrain_omc.asr.federation",
        str(hparams_file(run.cell.hparams)),
        "--output_folder",
        str(run.folder),
        "--noprogressbar",
    ]
    for key, value in run.overrides.items():
        command += [f"--{key}", _cli_value(value)]
    return command


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    # A run must not outlive the grid that started it: killed, the grid
    # would otherwise leave it running, and a restarted grid would start a
    # second process on the same folder.
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start(run: Run) -> subprocess.Popen:
    run.write_spec()
    log = open(run.folder / "stderr.txt", "ab")  # noqa: SIM115 (closed on exit)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command_line(run),
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def run_grid(
    runs: Sequence[Run],
    jobs: int = 2,
    progress: bool = True,
    on_finish: Callable[[Run], None] | None = None,
) -> dict[str, object]:
    """Run every unfinished run, ``jobs`` processes at a time; skip finished ones.

    Arguments
    ---------
    runs : sequence of Run
        Checked with :meth:`Run.check_spec` before anything starts.
    jobs : int
        Processes at once (one PyTorch thread each).
    progress : bool
        A progress bar over the runs.
    on_finish : callable, optional
        Called with each run that finishes here (e.g. to redraw the table).

    Returns
    -------
    dict
        ``skipped`` and ``ran`` (run folders), ``failed`` (folder to the tail
        of its log) and ``seconds``.
    """
    from tqdm import tqdm

    for run in runs:
        run.check_spec()
    start = time.perf_counter()
    skipped = [run for run in runs if run.done]
    todo = [run for run in runs if not run.done]
    for run in skipped:
        logger.info("finished already, skipped: %s", run.folder)
    bar = tqdm(
        total=len(runs),
        initial=len(skipped),
        desc="paper table runs",
        dynamic_ncols=True,
        disable=not progress,
    )
    active: dict[Run, subprocess.Popen] = {}
    ran: list[str] = []
    failed: dict[str, str] = {}
    try:
        while todo or active:
            while todo and len(active) < max(1, jobs):
                run = todo.pop(0)
                logger.info("starting %s seed %d", run.cell.name, run.seed)
                active[run] = _start(run)
            bar.set_postfix_str(
                ", ".join(f"{r.cell.name}/{r.seed}" for r in active), refresh=True
            )
            time.sleep(0.5)
            for run, returncode in _reap(active):
                if returncode == 0 and run.done:
                    ran.append(str(run.folder))
                    if on_finish is not None:
                        on_finish(run)
                else:
                    failed[str(run.folder)] = _log_failure(run, returncode)
                bar.update(1)
    finally:
        _stop(active.values())
        bar.close()
    return {
        "skipped": [str(r.folder) for r in skipped],
        "ran": ran,
        "failed": failed,
        "seconds": time.perf_counter() - start,
    }


def _reap(active: dict[Run, subprocess.Popen]) -> list[tuple[Run, int]]:
    """Remove the runs whose process ended from ``active``; their exit codes."""
    ended = []
    for run, process in list(active.items()):
        if process.poll() is None:
            continue
        process.log.close()
        del active[run]
        ended.append((run, process.returncode))
    return ended


def _log_failure(run: Run, returncode: int) -> str:
    """Log a failed run; return the tail of its stderr."""
    tail = (run.folder / "stderr.txt").read_text(errors="replace")[-3000:]
    logger.error(
        "%s seed %d failed (%s):\n%s", run.cell.name, run.seed, returncode, tail
    )
    return tail


def _stop(processes) -> None:
    """Terminate the processes still running, then kill those that linger."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        process.log.close()
