"""Federated OMC over Flower's engines, checked against the embedded simulation.

``test_engine_matches_the_embedded_run`` runs two rounds of the Flower app
in the Deployment Engine (a real ``flower-superlink`` and two
``flower-supernode`` processes on 127.0.0.1, each told its client's
manifest) and in the Simulation Engine (Ray), and compares with the
embedded simulation: bytes down equal round by round; bytes up and the
final model bitwise in the Deployment Engine. In the Simulation Engine Ray
runs each client on one thread, so float sums (and the training loss in a
reply's JSON metadata) may differ in their last digits: bytes up are
compared with the clients' metrics set aside.

``test_deployment_engine_resumes_after_kills`` (not ``slow``) kills the
ServerApp after round 1, then the SuperLink during round 2, and starts
both again: the final model is bitwise the uninterrupted embedded run's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
import yaml
from flower_harness import LocalDeployment

from speechbrain_omc.federated.client import OMCClient
from speechbrain_omc.federated.flower.task import initial_model, load_hparams, load_task
from speechbrain_omc.federated.server import FedAvgServer

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "recipes" / "SynthSpeech" / "federated" / "flower"
HPARAMS = REPO / "recipes" / "SynthSpeech" / "federated" / "hparams" / "fed_omc.yaml"
TINY = {
    "rounds": 2,
    "num_clients": 2,
    "clients_per_round": 2,
    "max_local_steps": 2,
    "batch_size": 4,
    "d_model": 32,
    "d_ffn": 64,
    "num_encoder_layers": 1,
    "cnn_channels": 8,
    "cnn_out_channels": 8,
    "eval_every": 2,
    "server_momentum": 0.5,
    # SGD: the simulation engine sums replies in arrival order, and Adam's
    # normalised steps would turn those last-bit differences into steps of
    # the learning rate, which would say nothing about the engine.
    "client_optimizer": "sgd",
    "lr": 0.05,
}
RUN_TIMEOUT = 900  # seconds for one Flower run; typically 1-4 minutes


def _run_config(output_folder: Path, result_dir: Path) -> dict:
    overrides = dict(TINY, output_folder=str(output_folder))
    return {
        "hparams": str(HPARAMS),
        "overrides": yaml.safe_dump(overrides, default_flow_style=True).strip(),
        "result-dir": str(result_dir),
    }


def _metrics_nbytes(report: dict) -> int:
    """Bytes of the clients' metrics inside the replies' JSON metadata."""
    return sum(
        len(json.dumps(m, sort_keys=True, separators=(",", ":")))
        for m in report["client_metrics"].values()
    )


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded simulation of the tiny configuration, with its reports."""
    out = tmp_path_factory.mktemp("embedded")
    hparams = load_hparams(_run_config(out, out))
    hparams["noprogressbar"] = True
    reports = []
    original = FedAvgServer.close_round

    def recording_close_round(self, failures=None):
        report = original(self, failures)
        reports.append(report.to_dict())
        return report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FedAvgServer, "close_round", recording_close_round)
        summary = load_task().run_federation(hparams)
    logging.getLogger().handlers.clear()  # run_federation's SpeechBrain logging
    return {
        "out": out,
        "reports": reports,
        "summary": summary,
        "model": torch.load(out / "final_model.pt"),
    }


def _check_against_embedded(result_dir: Path, embedded: dict, exact: bool) -> None:
    history = json.loads((result_dir / "flower_history.json").read_text())
    summary = json.loads((result_dir / "summary.json").read_text())
    rows = []
    assert len(history) == len(embedded["reports"]) == TINY["rounds"]
    for got, want in zip(history, embedded["reports"]):
        assert got["round"] == want["round"]
        assert got["sampled"] == want["sampled"]
        assert got["accepted"] == want["accepted"] == sorted(want["sampled"])
        assert got["rejected"] == {}
        assert got["num_examples"] == want["num_examples"]
        assert got["bytes_down"] == want["bytes_down"]
        assert got["float32_bytes_down"] == want["float32_bytes_down"]
        if exact:
            assert got["bytes_up"] == want["bytes_up"]
            assert got["float32_bytes_up"] == want["float32_bytes_up"]
            assert got["client_metrics"] == want["client_metrics"]
        assert got["bytes_up"] - _metrics_nbytes(got) == want["bytes_up"] - (
            _metrics_nbytes(want)
        )
        assert got["float32_bytes_up"] - _metrics_nbytes(got) == (
            want["float32_bytes_up"] - _metrics_nbytes(want)
        )
        for client, metrics in got["client_metrics"].items():
            other = want["client_metrics"][client]
            assert set(metrics) == set(other)
            assert metrics["steps"] == other["steps"] == TINY["max_local_steps"]
        rows.append(
            f"round {got['round']}: down {got['bytes_down']} / {want['bytes_down']}, "
            f"up {got['bytes_up']} / {want['bytes_up']} (metrics JSON "
            f"{_metrics_nbytes(got)} / {_metrics_nbytes(want)})"
        )
    # The last round was evaluated on the validation speakers, and the final
    # model on the test speakers, by a SuperNode.
    assert history[-1]["evaluation"]["WER"] >= 0
    assert summary["test_loss"] is not None and summary["test_WER"] >= 0
    print("\n".join(["Flower / embedded bytes:", *rows]))

    # The global model changed, and it is the embedded run's model: bitwise
    # in the Deployment Engine, up to the order of float sums in simulation.
    model = torch.load(result_dir / "final_model.pt")
    start, _, _, _ = initial_model(_run_config(embedded["out"], embedded["out"]))
    reference = embedded["model"]
    assert list(model) == list(reference) == list(start)
    change = max((reference[n] - start[n]).abs().max().item() for n in start)
    assert change > 0, "the federation did not move the model"
    assert any(not torch.equal(model[n], start[n]) for n in start)
    gap = max((model[n] - reference[n]).abs().max().item() for n in start)
    bitwise = all(torch.equal(model[n], reference[n]) for n in start)
    print(
        f"largest change {change:.4g}, largest gap to embedded {gap:.3g}, "
        f"bitwise equal: {bitwise}"
    )
    assert gap <= 0.05 * change
    if exact:
        assert bitwise


def _node_configs(prepared: Path) -> list[dict]:
    """Each SuperNode is told its partition: the client's manifest, the
    federation's label encoder and the validation/test speakers."""
    return [
        {
            "manifest": str(prepared / "partition" / f"client_{i:03d}.csv"),
            "label-encoder": str(prepared / "save" / "label_encoder.txt"),
            "valid-csv": str(prepared / "manifests" / "dev.csv"),
            "test-csv": str(prepared / "manifests" / "test.csv"),
        }
        for i in range(2)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("simulation", [False, True], ids=["deployment", "simulation"])
def test_engine_matches_the_embedded_run(tmp_path, embedded, simulation):
    """Two rounds in the Deployment Engine (SuperLink and two SuperNodes on
    loopback, each told its partition) or the Simulation Engine (Ray, virtual
    SuperNodes that prepare the recipe's partition): bytes as embedded."""
    configs = [{}, {}] if simulation else _node_configs(embedded["out"])
    result_dir = tmp_path / "result"
    run_config = _run_config(tmp_path / "flower", result_dir)
    with LocalDeployment(tmp_path / "engine", configs, simulation=simulation) as d:
        d.run(APP_DIR, run_config, timeout=RUN_TIMEOUT)
    assert d.leftover_pids() == []
    _check_against_embedded(result_dir, embedded, exact=not simulation)


def test_client_builds_from_a_manifest_node_config(embedded):
    """The Deployment Engine's node config: manifest plus the shared encoder."""
    from speechbrain_omc.federated.flower.task import build_node

    prepared = embedded["out"]
    node = build_node(
        _run_config(prepared, prepared),
        {
            "manifest": str(prepared / "partition" / "client_001.csv"),
            "label-encoder": str(prepared / "save" / "label_encoder.txt"),
            "valid-csv": str(prepared / "manifests" / "dev.csv"),
        },
    )
    assert node.client_id == "client_001"
    assert isinstance(node.client, OMCClient)
    assert node.num_examples > 0 and set(node.eval_data) == {"valid"}
    with pytest.raises(FileNotFoundError, match="label-encoder"):
        build_node(
            _run_config(prepared, prepared),
            {"manifest": str(prepared / "partition" / "client_001.csv")},
        )


def _checkpoint_round(result_dir: Path) -> int:
    path = result_dir / "server.ckpt"
    if not path.is_file():
        return 0
    return int(torch.load(path, weights_only=True)["server"]["round"])


def _wait_for(condition, what: str, deployment, timeout: float = RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p for p in deployment.runs[-1:] if p.poll() is not None]
        assert not dead, f"the run ended before {what}:\n{deployment.logs()}"
        assert time.monotonic() < deadline, f"no {what} in time:\n{deployment.logs()}"
        time.sleep(0.2)


def test_deployment_engine_resumes_after_kills(tmp_path, embedded):
    """Kill the ServerApp, then the SuperLink, mid-run; the final model is exact."""
    started = time.monotonic()
    result_dir = tmp_path / "result"
    run_config = _run_config(tmp_path / "flower", result_dir)
    with LocalDeployment(
        tmp_path / "deployment", _node_configs(embedded["out"])
    ) as deployment:
        # 1. The first ServerApp dies right after saving round 1.
        deployment.submit(APP_DIR, run_config)
        _wait_for(lambda: _checkpoint_round(result_dir) >= 1, "round 1", deployment)
        assert deployment.kill("serverapp"), "no ServerApp process found"
        assert _checkpoint_round(result_dir) == 1
        # 2. Started again, it resumes with one round to go; the SuperLink
        # (and with it the ServerApp) dies during that round.
        second = deployment.submit(APP_DIR, run_config)
        log = deployment.workdir / f"flwr-run-{deployment.runs.index(second)}.log"
        _wait_for(
            lambda: "[ROUND 1/1]" in log.read_text(errors="replace"),
            "resumed round",
            deployment,
        )
        deployment.kill("superlink")
        assert _checkpoint_round(result_dir) == 1, "round 2 ended before the kill"
        assert not (result_dir / "final_model.pt").exists()
        # 3. SuperLink back on its port; the SuperNodes reconnect by themselves.
        deployment.restart_superlink()
        deployment.run(APP_DIR, run_config, timeout=RUN_TIMEOUT)
    assert deployment.leftover_pids() == []
    history = json.loads((result_dir / "flower_history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]  # each round logged once
    assert [h["accepted"] for h in history] == [["client_000", "client_001"]] * 2
    model = torch.load(result_dir / "final_model.pt", weights_only=True)
    reference = embedded["model"]
    assert list(model) == list(reference)
    for name in reference:
        assert torch.equal(model[name], reference[name]), name
    summary = json.loads((result_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["test_WER"] is not None
    print(f"kill, kill, resume: {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_simulation_engine_with_hostile_nodes(tmp_path):
    """Three virtual SuperNodes, two of them hostile (``hostile_task``: one
    answers a lone surrogate as ``round``, one FLT_MAX everywhere), every
    round: the run finishes, final_model.pt is written, both are refused
    every round with their reasons, and the model is the honest node's
    (the embedded run in which the other two fail), up to the order of
    float sums in simulation."""
    config = {**TINY, "num_clients": 3, "clients_per_round": 3}
    out = tmp_path / "embedded"
    embedded_hparams = load_hparams(
        {
            "hparams": str(HPARAMS),
            "overrides": yaml.safe_dump(
                {
                    **config,
                    "output_folder": str(out),
                    "fail_clients": ["client_001", "client_002"],
                },
                default_flow_style=True,
            ).strip(),
        }
    )
    embedded_hparams["noprogressbar"] = True
    load_task().run_federation(embedded_hparams)
    logging.getLogger().handlers.clear()
    reference = torch.load(out / "final_model.pt")

    result_dir = tmp_path / "result"
    run_config = {
        "hparams": str(HPARAMS),
        "overrides": yaml.safe_dump(
            {**config, "output_folder": str(tmp_path / "flower")},
            default_flow_style=True,
        ).strip(),
        "result-dir": str(result_dir),
        "task": "hostile_task",
    }
    # The app's processes import the hostile task, and this tree's package.
    path = f"{REPO}:{REPO / 'tests'}"
    env = {"PYTHONPATH": path}
    nodes = [{}, {}, {}]
    with LocalDeployment(tmp_path / "sim", nodes, simulation=True, env=env) as sim:
        sim.run(APP_DIR, run_config, timeout=RUN_TIMEOUT)
    assert sim.leftover_pids() == []
    history = json.loads((result_dir / "flower_history.json").read_text())
    assert len(history) == config["rounds"]
    for entry in history:
        assert entry["accepted"] == ["client_000"]
        assert "round '\\udcff'" in entry["rejected"]["client_001"]
        # FLT_MAX in every value: refused by the range check of the first
        # entry on the wire, compressed (transform) or float32 (values).
        reason = entry["rejected"]["client_002"]
        assert "transform reaches" in reason or "values reach" in reason
    (result_dir / "rounds.csv").read_text(encoding="ascii")
    model = torch.load(result_dir / "final_model.pt")
    # Not the hostile task here: importing it would change this process's client.
    honest = {k: v for k, v in run_config.items() if k != "task"}
    start, _, _, _ = initial_model(honest)
    change = max((reference[n] - start[n]).abs().max().item() for n in start)
    gap = max((model[n] - reference[n]).abs().max().item() for n in start)
    print(f"largest change {change:.4g}, largest gap to embedded {gap:.3g}")
    assert change > 0 and gap <= 0.05 * change
