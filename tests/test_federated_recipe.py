"""The embedded federated recipe: hparams, a failing client, logs, kill-and-resume."""

import csv
import difflib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "SynthSpeech" / "federated"
TRAIN = RECIPE / "train.py"

# A tiny model and federation: the recipe's machinery at test speed.
TINY = {
    "rounds": 3,
    "num_clients": 4,
    "clients_per_round": 2,
    "max_local_steps": 2,
    "batch_size": 4,
    "d_model": 16,
    "nhead": 2,
    "num_encoder_layers": 1,
    "d_ffn": 32,
    "cnn_channels": 4,
    "cnn_out_channels": 4,
    "n_mels": 20,
    "eval_every": 2,
}


def _cli(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += [
            f"--{key}",
            json.dumps(value) if isinstance(value, list) else str(value),
        ]
    return out


def test_recipe_hparams_are_the_packaged_ones():
    """The library (main job, paper table, Flower app) runs the packaged
    files; the recipe's hparams folder holds the same ones."""
    from speechbrain_omc.asr import HPARAMS_DIR

    for name in ("fed_omc.yaml", "fed_fp32.yaml", "fed_scale.yaml"):
        recipe = (RECIPE / "hparams" / name).read_text(encoding="utf-8")
        assert recipe == (HPARAMS_DIR / name).read_text(encoding="utf-8"), name


def test_hparams_file_resolves_bare_names_only(tmp_path, monkeypatch):
    from speechbrain_omc.asr import HPARAMS_DIR, hparams_file

    monkeypatch.chdir(tmp_path)  # no fed_omc.yaml here
    assert hparams_file("fed_omc") == hparams_file("fed_omc.yaml")
    assert hparams_file("fed_omc.yaml") == HPARAMS_DIR / "fed_omc.yaml"
    mine = tmp_path / "fed_omc.yaml"
    mine.write_text("rounds: 1\n")
    assert hparams_file("fed_omc.yaml") == mine.resolve()  # a file here wins
    # A mistyped path is an error, not the packaged file of the same name.
    with pytest.raises(FileNotFoundError, match="no hparams file"):
        hparams_file("recipes/typo/fed_omc.yaml")
    with pytest.raises(FileNotFoundError, match="packaged: fed_fp32.yaml"):
        hparams_file("fed_nothing")


def test_fp32_twin_differs_only_by_omc():
    omc = (RECIPE / "hparams" / "fed_omc.yaml").read_text().splitlines()
    fp32 = (RECIPE / "hparams" / "fed_fp32.yaml").read_text().splitlines()

    def code(lines):
        return [line for line in lines if line.strip() and not line.startswith("#")]

    changed = [
        line
        for line in difflib.unified_diff(code(omc), code(fp32), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert "-experiment_name: fed_omc" in changed
    assert "+experiment_name: fed_fp32" in changed
    rest = [line for line in changed if "experiment_name" not in line]
    assert rest and all(line.startswith("-") for line in rest)
    # The OMC section only: its flat omc_* keys, then the omc: entry.
    start = rest.index("-omc: !new:speechbrain_omc.OMCConfig")
    assert start > 0 and all(line.startswith("-omc_") for line in rest[:start])
    assert all(line.startswith("-    ") for line in rest[start + 1 :])


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("fed_omc.yaml", {}),
        ("fed_fp32.yaml", {}),
        ("fed_librispeech_omc.yaml", {"data_folder": "/data/LibriSpeech"}),
        ("fed_scale.yaml", {}),
    ],
)
def test_hparams_load(name, overrides, tmp_path):
    overrides = {"output_folder": str(tmp_path), **overrides}
    with open(RECIPE / "hparams" / name, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    assert hparams["clients_per_round"] <= (hparams["num_clients"] or 10**9)
    omc = hparams.get("omc")
    if name == "fed_fp32.yaml":
        assert omc is None
    else:
        assert (omc.format, omc.transform, omc.weights_only) == ("e3m7", "scale", True)
        assert omc.fp32_fraction == 0.1 and omc.fp32_policy == "random"
    if name == "fed_scale.yaml":
        assert hparams["partition_mode"] == "utterance"
        assert hparams["num_clients"] == 1000 and hparams["dropout"] == 0.1
    if "librispeech" in name:
        assert hparams["partition_mode"] == "speaker"
        assert hparams["train_split"] == "train-clean-100"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"client_optimizer": "sgd", "lr": 0.05}, ("SGD", 0.05, 0.9)),
        ({"client_optimizer": "adam", "lr": 0.002}, ("Adam", 0.002, None)),
    ],
)
def test_client_optimizer_is_chosen_by_name(overrides, expected, tmp_path):
    with open(RECIPE / "hparams" / "fed_omc.yaml", encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"output_folder": str(tmp_path), **overrides})
    optimizer = hparams["opt_class"]([torch.nn.Parameter(torch.zeros(2))])
    name, lr, momentum = expected
    assert type(optimizer).__name__ == name
    assert optimizer.defaults["lr"] == lr
    assert optimizer.defaults.get("momentum") == momentum


def test_an_unknown_client_optimizer_is_refused(tmp_path):
    with open(RECIPE / "hparams" / "fed_fp32.yaml", encoding="utf-8") as f:
        hparams = load_hyperpyyaml(
            f, {"output_folder": str(tmp_path), "client_optimizer": "rmsprop"}
        )
    with pytest.raises(ValueError, match="one of adam, sgd, got 'rmsprop'"):
        hparams["opt_class"]([torch.nn.Parameter(torch.zeros(2))])


def test_server_plans_equal_the_client_models_plans(tmp_path):
    """build_server with the client's roles: the plans make_plan gives on the
    Brain's modules, round by round and client by client."""
    from speechbrain_omc import asr as recipe
    from speechbrain_omc import make_plan
    from speechbrain_omc.federated.client import OMCClient

    with open(RECIPE / "hparams" / "fed_omc.yaml", encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {**TINY, "output_folder": str(tmp_path)})
    brain = recipe.build_brain(hparams)
    client = OMCClient(brain, {})
    roles = client.parameter_roles()
    model, buffers = client.get_model(), client.buffer_names()
    server = recipe.build_server(
        hparams, model, ["a", "b", "c"], buffers, 10, roles=roles
    )
    norms = [n for n, r in roles.items() if r == "normalisation" and "CNN" in n]
    assert norms and all(model[n].dim() == 2 for n in norms)  # (time, channels)
    assert sum(r == "position bias" for r in roles.values()) == 2
    for round in (1, 2, 3):
        for cid in ("a", "b", "c"):
            plan = make_plan(brain.modules, hparams["omc"], round=round, client=cid)
            formats = server.formats(round, cid)
            assert {n: formats[n] for n in roles} == {
                e.name: e.format or "float32" for e in plan.entries
            }
            assert all(formats[n] == "float32" for n in norms)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_failing_client_is_left_out_and_the_run_goes_on(tmp_path, caplog):
    from speechbrain_omc.asr import read_test_errors, run_federation

    overrides = {**TINY, "output_folder": str(tmp_path), "fail_clients": ["client_001"]}
    with open(RECIPE / "hparams" / "fed_omc.yaml", encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    hparams["noprogressbar"] = True
    summary = run_federation(hparams)

    rows = _rows(tmp_path / "rounds.csv")
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    failed = [r for r in rows if "client_001" in r["rejected"]]
    assert failed, "client_001 was never sampled; pick another seed"
    for row in failed:
        assert "injected failure" in row["rejected"]
        assert int(row["clients"]) == int(row["sampled"]) - 1
    assert any("client_001 raised" in r.getMessage() for r in caplog.records)
    assert summary["left_out"] == len(failed)
    # Bytes in the log are the messages' lengths; OMC sends less than float32.
    for row in rows:
        assert 0 < int(row["bytes_down"]) < int(row["float32_bytes_down"])
        assert 0 < int(row["bytes_up"]) < int(row["float32_bytes_up"])
    assert rows[1]["valid_WER"] != "" and rows[0]["valid_WER"] == ""  # eval_every 2
    assert (tmp_path / "rounds.png").stat().st_size > 1000
    assert summary["bytes_total"] == sum(
        int(r["bytes_down"]) + int(r["bytes_up"]) for r in rows
    )
    assert summary["parameter_bytes"] < summary["float32_parameter_bytes"]
    assert 0 <= summary["test_WER"] and summary["test_CER"] is not None
    # The test WER's bootstrap interval, from the per-utterance errors.
    errors = read_test_errors(tmp_path / "test_errors.csv")
    assert len(errors) == summary["test_utterances"] > 0
    assert sum(w for _, w in errors.values()) == summary["test_words"]
    assert summary["test_WER"] == pytest.approx(
        100 * sum(e for e, _ in errors.values()) / summary["test_words"]
    )
    low, high = summary["test_WER_ci95"]
    assert low <= summary["test_WER"] <= high and summary["test_WER_se"] >= 0
    # Peak RSS of the training steps and CPU seconds per round, measured.
    assert 100e6 < summary["peak_train_rss_bytes"] < 8e9
    assert summary["train_cpu_seconds_per_round"] > 0
    final = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in final.values())


def _start(folder: Path, rounds: int, **more) -> subprocess.Popen:
    # Server momentum: a resume that dropped it would change the final model.
    overrides = {**TINY, "server_momentum": 0.5, "rounds": rounds, **more}
    overrides["output_folder"] = str(folder)
    command = [sys.executable, str(TRAIN), str(RECIPE / "hparams" / "fed_omc.yaml")]
    return subprocess.Popen(
        command + _cli(overrides) + ["--noprogressbar"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _finish(process: subprocess.Popen, timeout: float = 300) -> None:
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err.decode()[-3000:]


def _completed_rounds(folder: Path) -> int:
    path = folder / "save" / "server.ckpt"
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, weights_only=True)["server"]["round"])
    except Exception:  # being replaced right now
        return 0


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_final_model(tmp_path):
    rounds = 6
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _start(straight, rounds)  # both run at once: two cores
    victim = _start(killed, rounds)
    deadline = time.monotonic() + 240
    while _completed_rounds(killed) < 2:
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no round completed in time"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done = _completed_rounds(killed)
    assert victim.returncode == -signal.SIGKILL and 2 <= done < rounds
    assert not (killed / "final_model.pt").exists()

    resumed = _start(killed, rounds)
    _finish(resumed)
    _finish(reference)
    # The restarted run resumed from the checkpoint, it did not start over.
    assert f"after round {done}" in (killed / "log.txt").read_text()

    a = torch.load(straight / "final_model.pt", weights_only=True)
    b = torch.load(killed / "final_model.pt", weights_only=True)
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The logs agree too, timings aside; no round was logged twice.
    keep = ["round", "clients", "bytes_down", "bytes_up", "valid_WER", "train_loss"]
    rows_a, rows_b = _rows(straight / "rounds.csv"), _rows(killed / "rounds.csv")
    assert [int(r["round"]) for r in rows_b] == list(range(1, rounds + 1))
    assert [{k: r[k] for k in keep} for r in rows_a] == [
        {k: r[k] for k in keep} for r in rows_b
    ]
    summary_a = json.loads((straight / "summary.json").read_text())
    summary_b = json.loads((killed / "summary.json").read_text())
    assert summary_a["test_WER"] == summary_b["test_WER"]
    assert summary_a["bytes_total"] == summary_b["bytes_total"]
    assert (killed / "save" / "server.ckpt.prev").is_file()  # two are kept

    # Started again with another client learning rate: refused, named.
    other = _start(killed, rounds + 1, lr=0.1)
    other.communicate(timeout=300)
    assert other.returncode != 0
    log = (killed / "log.txt").read_text()  # SpeechBrain logs the exception
    assert "CheckpointMismatch" in log
    assert "run.lr: checkpoint 0.001, this run 0.1" in log


@pytest.mark.slow
def test_main_job_runs_both_federations_and_prints_the_table(tmp_path):
    overrides = {k: v for k, v in TINY.items() if k != "rounds"}
    result = subprocess.run(
        [sys.executable, "-m", "speechbrain_omc.experiments.main_job"]
        + ["--output", str(tmp_path), "--rounds", "2"]
        + _cli(overrides),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for row in (
        "test WER [95 % CI], held-out speakers",
        "parameter memory",
        "bytes communicated",
    ):
        assert row in out
    omc = json.loads((tmp_path / "fed_omc" / "1986" / "summary.json").read_text())
    f32 = json.loads((tmp_path / "fed_fp32" / "1986" / "summary.json").read_text())
    assert omc["rounds"] == f32["rounds"] == 2
    assert omc["num_clients"] == f32["num_clients"] == 4
    assert omc["bytes_total"] < f32["bytes_total"] == f32["float32_bytes_total"]
    assert f"{omc['test_WER']:.2f} %" in out and f"{f32['test_WER']:.2f} %" in out
    # Each WER with its interval; the difference with its paired interval and
    # a verdict; the pointer to the multi-seed figure; no determinism claim.
    low, high = omc["test_WER_ci95"]
    assert f"{omc['test_WER']:.2f} % [{low:.2f}, {high:.2f}]" in out
    assert "within noise" in out or "beyond the test noise" in out
    assert "benchmarks/results/parity/parity.md" in out
    assert "benchmarks/results/paper_table/paper_table.md" in out
    assert "another machine" in out


def test_the_scale_configuration_runs_utterance_clients_with_dropouts(tmp_path):
    """fed_scale.yaml at test size: utterance-level clients, seeded dropouts,
    the server's time and memory logged per round."""
    from speechbrain_omc.asr import HPARAMS_DIR, run_federation

    overrides = {
        **{k: v for k, v in TINY.items() if k not in ("batch_size",)},
        "output_folder": str(tmp_path),
        "num_clients": 600,
        "clients_per_round": 10,
        "rounds": 2,
        "max_local_steps": 1,
        "eval_every": 1000,
        "measure_server_memory": True,
    }
    with open(HPARAMS_DIR / "fed_scale.yaml", encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    hparams["noprogressbar"] = True
    summary = run_federation(hparams)
    assert summary["num_clients"] == 600  # more than the 480 utterances
    rows = _rows(tmp_path / "rounds.csv")
    for row in rows:
        assert int(row["sampled"]) == 10 and int(row["clients"]) == 9  # 10 % out
        assert "dropped out (simulated unavailability)" in row["rejected"]
        assert float(row["server_encode_s"]) > 0 and float(row["server_decode_s"]) > 0
        assert float(row["server_rss_peak_mb"]) >= float(row["server_rss_before_mb"])
    assert rows[0]["rejected"] != rows[1]["rejected"]  # drawn per round
    manifests = sorted((tmp_path / "partition").glob("client_*.csv"))
    assert len(manifests) == 600
    assert all(len(_rows(path)) == 1 for path in manifests[:20])
