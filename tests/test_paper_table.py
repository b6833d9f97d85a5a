"""The paper-table runner: ``--quick`` end to end, skip on rerun, resume.

The runner is started as a user starts it (``python -m
speechbrain_omc.experiments.paper_table --quick``) with a tiny model (the
grid's machinery at test speed), killed with SIGKILL while its second run is
between rounds, and started again: the finished run is skipped (its files
untouched), the interrupted one resumes from its checkpoint, the others run,
and the report holds every cell and seed. A third start runs nothing; a
start with other settings is refused.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = [
    "--d_model", "16", "--nhead", "2", "--num_encoder_layers", "1",
    "--d_ffn", "32", "--cnn_channels", "4", "--cnn_out_channels", "4",
    "--n_mels", "20", "--max_local_steps", "12",
]  # fmt: skip


def _command(output: Path, *more: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "speechbrain_omc.experiments.paper_table",
        "--quick",
        "--jobs",
        "1",
        "--noprogressbar",
        "--output",
        str(output),
        *TINY,
        *more,
    ]


def _round_of(folder: Path) -> int:
    path = folder / "save" / "server.ckpt"
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, weights_only=True)["server"]["round"])
    except Exception:  # being replaced right now
        return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_quick_grid_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path):
    out = tmp_path / "grid"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first, second = out / "runs/float32/1986", out / "runs/default/1986"
    grid = subprocess.Popen(
        _command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    deadline = time.monotonic() + 300
    children = []
    # The invocation is in the record from its start, before any run ends.
    from speechbrain_omc.experiments.paper_table import STOPPED

    state = out / "grid_state.json"
    while not state.is_file():
        assert grid.poll() is None, grid.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no grid_state.json at the start"
        time.sleep(0.05)
    (started,) = json.loads(state.read_text())["invocations"]
    assert started["load_after"] == STOPPED and "seconds" not in started
    assert not (first / "summary.json").is_file()
    # Killed while the second run (OMC, seed 1986) is between rounds 1 and 2.
    while _round_of(second) < 1:
        assert grid.poll() is None, grid.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the second run never completed a round"
        children = _children(grid.pid) or children
        time.sleep(0.05)
    children = _children(grid.pid) or children
    os.kill(grid.pid, signal.SIGKILL)
    grid.wait()
    assert (first / "summary.json").is_file()
    assert not (second / "summary.json").is_file(), "finished before the kill"
    # The run does not outlive the grid (it would race a restarted grid).
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in children):
        assert time.monotonic() < deadline, "a run outlived the killed grid"
        time.sleep(0.2)
    stamp = (first / "summary.json").stat().st_mtime_ns
    done = _round_of(second)
    # The killed invocation stays in the record, timed to its finished run.
    (killed,) = json.loads((out / "grid_state.json").read_text())["invocations"]
    assert killed["load_after"] == STOPPED and killed["seconds"] > 0

    again = subprocess.run(
        _command(out), capture_output=True, text=True, env=env, timeout=600
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert f"finished already, skipped: {first}" in log
    assert "1 runs skipped (finished before), 3 run now, 0 failed" in log
    invocations = json.loads((out / "grid_state.json").read_text())["invocations"]
    assert invocations[0] == killed and len(invocations) == 2
    assert invocations[1]["load_after"] != STOPPED
    assert (first / "summary.json").stat().st_mtime_ns == stamp
    # The interrupted run went on from its checkpoint, not from round 0.
    assert f"after round {done}" in (second / "log.txt").read_text()
    for cell in ("float32", "default"):
        for seed in (1986, 1987):
            summary = json.loads((out / f"runs/{cell}/{seed}/summary.json").read_text())
            assert summary["rounds"] == 2 and summary["seed"] == seed
            assert summary["test_utterances"] == 816

    with open(out / "paper_table.csv", newline="") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"float32", "default"}
    assert rows["float32"]["seeds"] == rows["default"]["seeds"] == "2"
    assert float(rows["float32"]["parameter_ratio"]) == 1.0
    assert 0.3 < float(rows["default"]["parameter_ratio"]) < 0.6
    assert 0.3 < float(rows["default"]["bytes_down_ratio"]) < 0.7
    assert float(rows["default"]["peak_train_rss_bytes"]) > 100e6
    report = (out / "paper_table.md").read_text()
    assert "| OMC default" in report and "Runs finished:\n4 of 4" in report
    assert (out / "paper_table.png").stat().st_size > 10_000
    with open(out / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4

    # Started again: nothing to run.
    third = subprocess.run(
        _command(out), capture_output=True, text=True, env=env, timeout=300
    )
    assert third.returncode == 0
    assert "4 runs skipped (finished before), 0 run now" in third.stdout + third.stderr
    # Other settings in the same folder: refused, naming the difference.
    other = subprocess.run(
        _command(out, "--rounds", "3"), capture_output=True, text=True, env=env
    )
    assert other.returncode != 0
    assert "rounds: folder 2, this grid 3" in other.stderr


def _summary(wer: float, parameter_bytes: int) -> dict:
    return {
        "test_WER": wer,
        "parameter_bytes": parameter_bytes,
        "bytes_down": 2 * parameter_bytes,
        "bytes_up": 2 * parameter_bytes,
        "rounds": 2,
        "train_minutes": 1.0,
    }


def test_the_ablation_ladder_reports_paired_differences(tmp_path):
    from speechbrain_omc.experiments import ablation, report

    cells = {c.name: c for c in ablation.ablation_ladder()}
    # Every rung but float32 is an OMC run of the packaged hparams, and the
    # rungs differ from the default in one setting each (the lossless
    # clippings: in two, format and clipping).
    default = dict(cells["default"].overrides)
    for name, cell in cells.items():
        if name in ("float32", "default"):
            continue
        changed = {k for k, v in cell.overrides.items() if default.get(k) != v}
        assert 1 <= len(changed) <= (2 if name.startswith("lossless_") else 1), name
    # The wire rungs: the default's plan on one direction only.
    for way in ("download", "upload"):
        assert cells[f"wire_{way}"].overrides["omc_wire"] == way
    results = {
        cells["float32"]: {1: _summary(20.0, 100), 2: _summary(22.0, 100)},
        cells["default"]: {1: _summary(21.0, 40), 2: _summary(24.0, 40)},
    }
    rows = report.cell_rows(results)
    assert rows[1]["wer_delta"] == 1.5  # paired by seed: (1 + 2) / 2
    assert rows[1]["wer_delta_ci_low"] < 1.5 < rows[1]["wer_delta_ci_high"]
    report.plot_differences(rows, tmp_path / "ablation.png", "ladder")
    assert (tmp_path / "ablation.png").stat().st_size > 5_000


def test_finished_runs_of_the_same_settings_are_adopted_not_rerun(tmp_path):
    from speechbrain_omc.experiments.grid import GridSettings, quick_grid
    from speechbrain_omc.experiments.runner import adopt_finished, plan_runs

    cells = quick_grid()
    other = plan_runs(cells, GridSettings(2, (1, 2, 3)), tmp_path / "other")
    for run in other:
        run.folder.mkdir(parents=True)
        (run.folder / "run.json").write_text(json.dumps(run.spec))
        if run.seed != 3:  # seed 3 is still running there
            (run.folder / "summary.json").write_text(json.dumps({"seed": run.seed}))
    (other[0].folder / "run.json").write_text(  # another lr: another run
        json.dumps({**other[0].spec, "overrides": {"lr": 9}})
    )
    mine = plan_runs(cells, GridSettings(2, (1, 2, 3)), tmp_path / "mine")
    busy = mine[-3]  # a seed-2 run of this grid under way: left alone
    busy.folder.mkdir(parents=True)
    (busy.folder / "run.json").write_text(json.dumps(busy.spec))
    adopted = adopt_finished(mine, tmp_path / "other")
    names = {(r.cell.name, r.seed) for r in adopted}
    expected = {(r.cell.name, r.seed) for r in mine if r.seed != 3}
    expected -= {(other[0].cell.name, 1), (busy.cell.name, busy.seed)}
    assert names == expected and expected
    for run in adopted:
        assert run.done and run.summary() == {"seed": run.seed}
        assert json.loads((run.folder / "run.json").read_text()) == run.spec
        run.check_spec()
    assert not busy.done and not mine[0].done
    assert adopt_finished(mine, tmp_path / "other") == []  # nothing twice
    assert adopt_finished(mine, tmp_path / "absent") == []
    # A summary being written (truncated) is not a finished run.
    (other[-1].folder / "summary.json").write_text('{"seed": 3')
    assert adopt_finished(mine, tmp_path / "other") == []
    assert not mine[-1].done


def test_a_report_only_adopts_nothing(tmp_path):
    from speechbrain_omc.experiments.paper_table import (
        grid_from_args,
        main,
        parse_args,
    )
    from speechbrain_omc.experiments.runner import adopt_finished, plan_runs

    argv = ["--quick", "--seeds", "1986", "--output", str(tmp_path / "mine")]
    cells, settings = grid_from_args(*parse_args(argv))
    other = plan_runs(cells, settings, tmp_path / "other")[0]
    other.folder.mkdir(parents=True)
    (other.folder / "run.json").write_text(json.dumps(other.spec))
    (other.folder / "summary.json").write_text("{}")
    main([*argv, "--report-only", "--reuse", str(tmp_path / "other")])
    assert not (tmp_path / "mine" / "runs").exists()
    # The same run is adopted by a grid that runs (checked without running).
    mine = plan_runs(cells, settings, tmp_path / "mine")
    assert adopt_finished(mine, tmp_path / "other") == [mine[0]]


def test_cells_with_more_seeds_run_them_and_pair_over_shared_seeds(tmp_path):
    from speechbrain_omc.experiments import report
    from speechbrain_omc.experiments.grid import (
        EIGHT_SEED_CELLS,
        FULL_SETTINGS,
        PARITY_SEEDS,
        GridSettings,
        paper_grid,
        quick_grid,
    )
    from speechbrain_omc.experiments.paper_table import grid_from_args, parse_args
    from speechbrain_omc.experiments.runner import plan_runs

    settings = GridSettings(2, (1, 2), more_seeds={"float32": (2, 3, 4)})
    runs = plan_runs(quick_grid(), settings, tmp_path)
    assert [(r.cell.name, r.seed) for r in runs] == [
        ("float32", 1), ("default", 1), ("float32", 2), ("default", 2),
        ("float32", 3), ("float32", 4),
    ]  # fmt: skip
    # float32 over four seeds, the default over two: paired over 1 and 2.
    cells = {c.name: c for c in quick_grid()}
    results = {
        cells["float32"]: {s: _summary(20.0 + s, 100) for s in (1, 2, 3, 4)},
        cells["default"]: {1: _summary(22.0, 40), 2: _summary(24.0, 40)},
    }
    rows = report.cell_rows(results)
    assert rows[0]["seeds"] == 4 and rows[1]["seeds"] == 2
    assert rows[1]["wer_delta"] == 1.5  # (22 - 21 + 24 - 22) / 2
    # The recorded grid: three seeds a cell, the parity record's cells eight.
    full = plan_runs(paper_grid(), FULL_SETTINGS, tmp_path)
    per_cell: dict[str, list[int]] = {}
    for run in full:
        per_cell.setdefault(run.cell.name, []).append(run.seed)
    assert {n: s for n, s in per_cell.items() if len(s) == 8} == {
        n: list(PARITY_SEEDS) for n in EIGHT_SEED_CELLS
    }
    assert {"float32", "default", "bf16_sr"} < set(EIGHT_SEED_CELLS)
    assert len(full) == 16 * 3 + len(EIGHT_SEED_CELLS) * 5
    # Seeds given on the command line are every cell's, no more.
    _, chosen = grid_from_args(*parse_args(["--seeds", "7"]))
    assert len(plan_runs(paper_grid(), chosen, tmp_path)) == 16
    # A subset of cells keeps the further seeds of its own cells, and none
    # for float32 alone (they would pair with nothing).
    cells, subset = grid_from_args(*parse_args(["--cells", "pvt_none"]))
    assert [c.name for c in cells] == ["float32", "pvt_none"]
    assert subset.more_seeds == {} and len(plan_runs(cells, subset, tmp_path)) == 6
    cells, subset = grid_from_args(*parse_args(["--cells", "default", "pvt_none"]))
    assert set(subset.more_seeds) == {"float32", "default"}
    assert len(plan_runs(cells, subset, tmp_path)) == 8 + 8 + 3
