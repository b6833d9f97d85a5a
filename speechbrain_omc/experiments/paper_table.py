"""Reproduce the paper's table on the bundled corpus, with seeds and intervals.

::

    python -m speechbrain_omc.experiments.paper_table          # the full grid
    python -m speechbrain_omc.experiments.paper_table --quick  # 2 cells, 2 rounds

runs the main job's federation for every cell of
:func:`~speechbrain_omc.experiments.grid.paper_grid` and every seed, two runs
at a time, and writes to ``--output`` (default ``results/paper_table``):
``paper_table.{md,csv,png}`` (the table with intervals over seeds and paired
differences to float32, its figure), ``runs.csv`` and each run's own folder
``runs/<cell>/<seed>/``. Finished runs are skipped and interrupted ones
resume, so the command can be rerun. Other options are overrides for every
run (``--clients_per_round 2``); ``--rounds``, ``--seeds`` and ``--cells``
change the grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from speechbrain_omc.experiments import report
from speechbrain_omc.experiments.grid import (
    FULL_SETTINGS,
    QUICK_SETTINGS,
    Cell,
    GridSettings,
    paper_grid,
    quick_grid,
)
from speechbrain_omc.experiments.runner import (
    GridMismatch,
    Run,
    adopt_finished,
    plan_runs,
    run_grid,
)

logger = logging.getLogger(__name__)

STATE = "grid_state.json"
#: An invocation's end until it ends (what a stopped one keeps).
STOPPED = (
    "not recorded (running, or stopped before its end; seconds to its last "
    "finished run)"
)
#: A reading kept beside the runs, rendered into the report when present.
READING = "reading.md"


@dataclass(frozen=True)
class Experiment:
    """A grid of cells over seeds, run and reported by :func:`main`.

    Arguments
    ---------
    name : str
        Module name under ``speechbrain_omc.experiments`` and report stem.
    title : str
        The report's heading.
    cells : callable
        The full grid's cells.
    settings : GridSettings
        The full grid's rounds and seeds.
    plot : callable
        ``plot(rows, path, title)`` draws the report's figure.
    """

    name: str
    title: str
    cells: Callable[[], list[Cell]]
    settings: GridSettings
    plot: Callable[..., None] = report.plot_table

    @property
    def prog(self) -> str:
        """The command that runs it."""
        return f"python -m speechbrain_omc.experiments.{self.name}"


PAPER_TABLE = Experiment(
    "paper_table", "Paper table: OMC against float32", paper_grid, FULL_SETTINGS
)


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            names = [
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import speechbrain

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}), Python "
        f"{platform.python_version()}, torch {torch.__version__}, speechbrain "
        f"{speechbrain.__version__}"
    )


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def parse_args(argv: Sequence[str] | None = None, prog: str = PAPER_TABLE.prog):
    """The command line (known options, and hparams overrides for every run).

    Arguments
    ---------
    argv : sequence of str, optional
    prog : str
        The command's name in its help.

    Returns
    -------
    tuple
        ``(args, overrides)``.

    Example
    -------
    >>> args, overrides = parse_args(["--quick", "--d_model", "16"])
    >>> args.quick, overrides
    (True, {'d_model': 16})
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a grid of federated configurations over seeds, resumably.",
    )
    parser.add_argument("--output", default=None, help="grid folder")
    parser.add_argument("--quick", action="store_true", help="2 cells, 2 rounds (CI)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--cells", nargs="+", default=None, help="subset, by name")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report, run nothing"
    )
    parser.add_argument("--noprogressbar", action="store_true")
    parser.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        metavar="FOLDER",
        help="another grid's folder whose finished runs of the same settings "
        "are taken instead of run again (e.g. benchmarks/results/parity)",
    )
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    key = None
    for item in rest:
        if item.startswith("--"):
            if "=" in item:
                name, value = item[2:].split("=", 1)
                overrides[name] = _parse_value(value)
                key = None
            else:
                key = item[2:]
                overrides[key] = True
        elif key is not None:
            overrides[key] = _parse_value(item)
            key = None
        else:
            parser.error(f"unexpected argument {item!r}")
    return args, overrides


def grid_from_args(
    args, overrides: dict, experiment: Experiment = PAPER_TABLE
) -> tuple[list[Cell], GridSettings]:
    """The ``(cells, settings)`` that :func:`parse_args`' result asks for."""
    cells = quick_grid() if args.quick else experiment.cells()
    settings = QUICK_SETTINGS if args.quick else experiment.settings
    if args.cells:
        known = {c.name: c for c in experiment.cells()}
        unknown = [n for n in args.cells if n not in known]
        if unknown:
            raise SystemExit(f"unknown cells {unknown}; known: {sorted(known)}")
        cells = [known[n] for n in args.cells]
        if not any(c.is_reference for c in cells):
            cells.insert(0, known["float32"])  # ratios need the reference
    # Further seeds only for the cells that run, and none when only the
    # reference has them (its alone would pair with nothing).
    names = {c.name for c in cells}
    more = {n: s for n, s in settings.more_seeds.items() if n in names}
    paired = any(not c.is_reference and c.name in more for c in cells)
    settings = replace(settings, more_seeds=more if paired else {})
    if args.rounds:
        settings = replace(settings, rounds=args.rounds)
    if args.seeds:  # every cell on these seeds, no more
        settings = replace(settings, seeds=tuple(args.seeds), more_seeds={})
    if overrides:
        settings = replace(settings, overrides={**settings.overrides, **overrides})
    return cells, settings


def collect(runs: Sequence[Run]) -> dict[Cell, dict[int, dict]]:
    """The finished runs' summaries, by cell and seed (cells in grid order)."""
    results: dict[Cell, dict[int, dict]] = {}
    for run in runs:
        results.setdefault(run.cell, {})
        if run.done:
            results[run.cell][run.seed] = run.summary()
    return results


def _wall(state: dict) -> str:
    seconds = sum(i.get("seconds", 0) for i in state.get("invocations", []))
    return f"{seconds / 3600:.2f} h ({seconds / 60:.0f} min)"


def write_report(
    output: Path,
    runs: Sequence[Run],
    settings: GridSettings,
    state: dict,
    extra_sections: Sequence[str] = (),
    experiment: Experiment = PAPER_TABLE,
) -> list[dict]:
    """Write ``<name>.{md,csv,png}`` and ``runs.csv`` from finished runs
    (with ``reading.md`` of ``output`` as a section, when there is one).

    Arguments
    ---------
    output : Path
    runs : sequence of Run
    settings : GridSettings
    state : dict
        The grid's invocations (command, times, load averages).
    extra_sections : sequence of str
        More Markdown sections (the analytic columns).
    experiment : Experiment
        Which grid (names the files and the heading).

    Returns
    -------
    list of dict
        The table's rows.
    """
    name = experiment.name
    results = collect(runs)
    rows = report.cell_rows(results)
    per_run = report.run_rows(results)
    report.write_csv(rows, output / f"{name}.csv")
    report.write_csv(
        per_run, output / "runs.csv", list(per_run[0]) if per_run else ["cell"]
    )
    finished = sum(len(v) for v in results.values())
    if finished:
        experiment.plot(
            rows,
            output / f"{name}.png",
            f"SynthSpeech federated, {settings.rounds} rounds, "
            f"{_seed_count(settings)} seeds",
        )
    header = _report_header(experiment, settings, state, finished, len(runs))
    reading = output / READING
    sections = [
        header,
        "## Table\n\n" + report.format_table(rows),
        f"![test WER against bytes per round]({name}.png)",
        *extra_sections,
        *([reading.read_text(encoding="utf-8").strip()] if reading.is_file() else []),
        "## Every run\n\nTest WER with its 95 % bootstrap interval over the test "
        "utterances (10,000 resamples).\n\n" + report.format_runs(per_run),
    ]
    report.write_markdown(output / f"{name}.md", sections)
    return rows


def _seed_count(settings: GridSettings) -> str:
    """How many seeds a cell has, in words (``3``, ``3-8``)."""
    counts = [len(settings.seeds_of(name)) for name in settings.more_seeds]
    low, high = len(settings.seeds), max(counts, default=len(settings.seeds))
    return str(low) if low == high else f"{low}-{high}"


def _seed_text(settings: GridSettings) -> str:
    """The grid's seeds, in words, for the report's header.

    Example
    -------
    >>> more = {"float32": (3, 4), "default": (3, 4), "x": (2,)}
    >>> _seed_text(GridSettings(rounds=2, seeds=(1, 2), more_seeds=more))[:67]
    '[1, 2] for every configuration, and [3, 4] too for float32, default'
    """
    text = f"{list(settings.seeds)} for every configuration"
    further: dict[tuple[int, ...], list[str]] = {}
    for name in settings.more_seeds:
        seeds = settings.seeds_of(name)[len(settings.seeds) :]
        if seeds:
            further.setdefault(seeds, []).append(name)
    for seeds, names in further.items():
        text += f", and {list(seeds)} too for {', '.join(names)}"
    if further:
        text += (
            " (differences to float32 pair over the seeds both have; every other "
            "column is a mean over the cell's own seeds)"
        )
    return text


def _report_header(
    experiment: Experiment,
    settings: GridSettings,
    state: dict,
    finished: int,
    total: int,
) -> str:
    """The report's opening: the grid, its commands, machine and wall time."""
    invocations = state.get("invocations", [])
    commands = sorted({i["command"] for i in invocations})
    loads = [
        f"- {i['started']}: load average {i['load_before']} at the start, "
        f"{i.get('load_after', '?')} at the end ({i.get('seconds', 0) / 60:.0f} min)"
        for i in invocations
    ]
    header = f"""# {experiment.title}, federated SynthSpeech

Written by `{experiment.prog}`. Runs finished:
{finished} of {total}. Each run: the main job's federation (packaged
`fed_omc.yaml` / `fed_fp32.yaml`: 8 clients of 3 training speakers, 4 per round,
2 local epochs, client optimizer and model as the packaged files say unless
overridden below) for {settings.rounds} rounds, validation only after the
last round, test on the held-out test speakers; seeds {_seed_text(settings)}.
Further overrides for every run:
`{json.dumps(dict(settings.overrides))}`.

Commands: {"; ".join(f"`{c}`" for c in commands) or "-"}

Machine: {state.get("machine", "?")}. Wall time of the grid (all
invocations): {_wall(state)}.
{chr(10).join(loads)}

Ratios are to the float32 row of this grid. Test WER: mean over seeds with a
95 % Student-t interval over the seeds; the difference to float32 is paired
by seed (same initial model, client sampling and data order). Parameter
memory is counted exactly from storage at the end of the run; peak RSS is the
high-water mark of the training steps (reset before each client's local
training); bytes are `len()` of the messages.
"""
    return header


def _invocation(experiment: Experiment, argv: Sequence[str]) -> dict:
    """This invocation's entry in the grid's state: command, start, load."""
    return {
        "command": shlex.join(experiment.prog.split() + list(argv)),
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "load_after": STOPPED,
    }


def main(
    argv: Sequence[str] | None = None, experiment: Experiment = PAPER_TABLE
) -> int:
    """Run (or resume) the grid and write the report.

    Arguments
    ---------
    argv : sequence of str, optional
    experiment : Experiment
        Which grid.

    Returns
    -------
    int
        0, or 1 when a run failed.
    """
    name = experiment.name
    args, overrides = parse_args(argv, experiment.prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cells, settings = grid_from_args(args, overrides, experiment)
    output = Path(
        args.output or (f"results/{name}_quick" if args.quick else f"results/{name}")
    ).resolve()
    output.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(cells, settings, output)
    try:
        for run in runs:
            run.check_spec()
    except GridMismatch as error:
        raise SystemExit(f"{name}: {error}") from None
    state_path = output / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    state["machine"] = _machine()
    invocation = _invocation(experiment, sys.argv[1:] if argv is None else argv)

    def save_state():
        report.write_text(state_path, json.dumps(state, indent=2) + "\n")

    start = time.perf_counter()

    def refresh(_run=None):
        # Kept current after every finished run: a grid stopped by a signal
        # (SIGTERM, SIGKILL) leaves its invocation in the record.
        invocation["seconds"] = round(time.perf_counter() - start, 1)
        save_state()
        write_report(output, runs, settings, state, experiment=experiment)

    outcome = {"failed": {}}
    if not args.report_only:  # a report changes no run folder
        for other in args.reuse:
            adopt_finished(runs, other)
        state.setdefault("invocations", []).append(invocation)
        save_state()
        try:
            outcome = run_grid(
                runs,
                jobs=args.jobs,
                progress=not args.noprogressbar,
                on_finish=refresh,
            )
        finally:
            invocation["seconds"] = round(time.perf_counter() - start, 1)
            invocation["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            save_state()
        logger.info(
            "%d runs skipped (finished before), %d run now, %d failed",
            len(outcome["skipped"]),
            len(outcome["ran"]),
            len(outcome["failed"]),
        )
    rows = write_report(output, runs, settings, state, experiment=experiment)
    print(report.format_table(rows))
    print(f"\nreport: {output / (name + '.md')}")
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
