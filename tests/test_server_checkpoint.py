"""Server checkpoints: refused when the settings differ, fallback when corrupt.

Two tests here are the ones a weaker implementation fails (issue 11 ran them
as mutants): ``test_a_crash_during_save_leaves_the_last_checkpoint_whole``
fails with a plain ``torch.save(obj, path)``, and
``test_momentum_survives_a_checkpoint`` with a load that drops momentum.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from federated_fixtures import shifted_reply, small_model, small_server

from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.federated.aggregation import Aggregation
from speechbrain_omc.federated.checkpoint import (
    CheckpointCorrupt,
    CheckpointLocked,
    CheckpointMismatch,
    CheckpointStore,
)
from speechbrain_omc.federated.server import FedAvgServer

JOB = Path(__file__).parent / "jobs" / "crash_during_save.py"


def _model():
    return small_model(shapes=((16, 8), (4, 16)))


def _server(model=None, **kwargs) -> FedAvgServer:
    settings = dict(
        server_momentum=0.9,
        client_config={"local_epochs": 2},
        run_settings={"lr": 0.05, "batch_size": 4},
    )
    return small_server(model or _model(), **{**settings, **kwargs})


def _reply(data: bytes, shift: float) -> bytes:
    return shifted_reply(data, shift, num_examples=5)


def _round(server: FedAvgServer, shift: float = 1.0):
    messages = server.configure_round()
    return server.aggregate(
        {c: _reply(m, shift * (1 + i)) for i, (c, m) in enumerate(messages.items())}
    )


def _trained(rounds: int = 2, **kwargs) -> FedAvgServer:
    server = _server(**kwargs)
    for _ in range(rounds):
        assert _round(server).model_updated
    return server


def test_momentum_survives_a_checkpoint(tmp_path):
    server = _trained()
    assert server.momentum, "the test needs server momentum"
    server.save(tmp_path / "server.ckpt")
    other = _server()
    other.load(tmp_path / "server.ckpt")
    assert other.run_id == server.run_id and other.round == 2
    assert sorted(other.momentum) == sorted(server.momentum)
    for name, value in server.momentum.items():
        assert torch.equal(other.momentum[name], value), name
    # Both continue alike: the momentum of rounds 1-2 shapes round 3.
    _round(server), _round(other)
    for name, value in server.model.items():
        assert torch.equal(other.model[name], value), name


@pytest.mark.parametrize(
    "change, named",
    [
        (
            {
                "omc": OMCConfig(
                    format="e4m3", fp32_fraction=0.4, fp32_policy="random", seed=3
                )
            },
            ["omc.format: checkpoint 'e3m7', this run 'e4m3'"],
        ),
        (
            {"omc": None},
            [
                "omc.format: checkpoint 'e3m7', this run '<absent>'",
                "omc: checkpoint '<absent>', this run None",
            ],
        ),
        (
            {"client_config": {"local_epochs": 1}},
            ["client_config.local_epochs: checkpoint 2, this run 1"],
        ),
        (
            {"run_settings": {"lr": 0.1, "batch_size": 4}},
            ["run.lr: checkpoint 0.05, this run 0.1"],
        ),
        ({"server_momentum": 0.0}, ["server_momentum: checkpoint 0.9, this run 0.0"]),
        ({"max_examples": 20}, ["max_examples.c0: checkpoint 10, this run 20"]),
        (
            {"aggregation": "median"},
            ["aggregation.rule: checkpoint 'fedavg', this run 'median'"],
        ),
        ({"seed": 8}, ["seed: checkpoint 7, this run 8"]),
    ],
)
def test_a_checkpoint_of_other_settings_is_refused_naming_them(tmp_path, change, named):
    path = tmp_path / "server.ckpt"
    _trained(1).save(path)
    other = _server(**change)
    before = {n: v.clone() for n, v in other.model.items()}
    with pytest.raises(CheckpointMismatch) as error:
        other.load(path)
    for line in named:
        assert line in str(error.value), str(error.value)
    # Refused: nothing changed, and no fallback to the previous file either.
    assert other.round == 0
    assert all(torch.equal(before[n], other.model[n]) for n in before)


def _older(state: dict) -> dict:
    """A state as a version without the update-norm bound saved it."""
    aggregation = dict(state["settings"]["aggregation"])
    del aggregation["norm_bound"], aggregation["norm_reference"]
    return {**state, "settings": {**state["settings"], "aggregation": aggregation}}


def test_an_older_checkpoint_resumes_as_the_undefended_run():
    """Saved before the bound existed: the run was undefended, and resumes
    as such; with the bound on, the refusal says how to go on."""
    state = _older(_trained(1, aggregation=Aggregation(norm_bound=None)).state_dict())
    undefended = _server(aggregation=Aggregation(norm_bound=None))
    undefended.load_state_dict(state)
    assert undefended.round == 1
    with pytest.raises(CheckpointMismatch) as error:
        _server().load_state_dict(state)
    message = str(error.value)
    assert "aggregation.norm_bound: checkpoint None, this run 4.0" in message
    assert "--norm_bound null" in message and "--fresh_start True" in message


def test_a_checkpoint_with_other_roles_is_refused(tmp_path):
    # Roles change the plans: a run resumed with others is another run. A
    # checkpoint of a server without roles is refused by one with them.
    path = tmp_path / "server.ckpt"
    _trained(1).save(path)
    other = _server(roles={"layer2.weight": "normalisation"})
    with pytest.raises(CheckpointMismatch) as error:
        other.load(path)
    line = "roles.layer2.weight: checkpoint '<absent>', this run 'normalisation'"
    assert line in str(error.value)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "server.ckpt"
    _trained(1).save(path)
    model = _model()
    model["layer2.weight"] = torch.zeros(8, 16)
    model["extra.bias"] = torch.zeros(3)
    other = _server(model)
    with pytest.raises(CheckpointMismatch) as error:
        other.load(path)
    text = str(error.value)
    assert "model.layer2.weight: checkpoint [4, 16], this run [8, 16]" in text
    assert "model.extra.bias: checkpoint '<absent>', this run [3]" in text


def test_starting_fresh_sets_old_checkpoints_aside(tmp_path):
    store = CheckpointStore(tmp_path / "server.ckpt")
    server = _trained(1)
    server.save(store)
    server.save(store)
    store.discard()
    assert not store.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "server.ckpt.discarded",
        "server.ckpt.prev.discarded",
    ]
    assert _server(omc=None).load(store) is None  # nothing to refuse any more


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)


def _not_a_checkpoint(path: Path) -> None:
    torch.save({"hello": "world"}, path)


def _nan_weights(path: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["server"]["model"]["layer1.weight"][0, 0] = float("nan")
    torch.save(checkpoint, path)


def _wrong_momentum(path: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["server"]["momentum"]["layer1.weight"] = torch.zeros(3, 3)
    torch.save(checkpoint, path)


def _unknown_momentum(path: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["server"]["momentum"]["nope"] = torch.zeros(3)
    torch.save(checkpoint, path)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_truncate, "cannot be read"),
        (_zero, "cannot be read"),
        (_not_a_checkpoint, "is invalid (KeyError"),
        (_nan_weights, "model layer1.weight is not finite"),
        (_wrong_momentum, "momentum layer1.weight has shape (3, 3), expected (16, 8)"),
        (_unknown_momentum, "momentum entry 'nope' is not ours"),
    ],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(
    tmp_path, damage, problem, caplog
):
    store = CheckpointStore(tmp_path / "server.ckpt")
    server = _server()
    _round(server)
    server.save(store)  # round 1, becomes server.ckpt.prev
    after_one = {n: v.clone() for n, v in server.model.items()}
    momentum_one = {n: v.clone() for n, v in server.momentum.items()}
    _round(server)
    server.save(store)  # round 2
    damage(store.path)

    other = _server()
    with caplog.at_level(logging.ERROR, logger="speechbrain_omc.federated.checkpoint"):
        other.load(store)
    assert other.round == 1
    assert all(torch.equal(after_one[n], other.model[n]) for n in after_one)
    assert all(torch.equal(momentum_one[n], other.momentum[n]) for n in momentum_one)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert str(store.path) in logged and problem in logged, logged
    assert "previous checkpoint" in logged


def test_a_fallback_sets_the_bad_file_aside_and_keeps_two_good_ones(tmp_path):
    """After a fallback the next save must not rotate the bad file into
    ``.prev``: the bad one is moved to ``.corrupt``, and after one more round
    a second damage still finds a good previous checkpoint."""
    store = CheckpointStore(tmp_path / "server.ckpt")
    server = _server()
    _round(server)
    server.save(store)  # round 1
    _round(server)
    server.save(store)  # round 2
    _zero(store.path)

    resumed = _server()
    resumed.load(store)
    assert resumed.round == 1
    assert not store.path.exists()
    assert store.corrupt.read_bytes() == b"\0" * store.corrupt.stat().st_size
    _round(resumed)
    resumed.save(store)  # round 2 again; round 1 must stay the previous one
    assert torch.load(store.previous, weights_only=True)["server"]["round"] == 1

    _truncate(store.path)  # the new newest fails too: round 1 is still there
    again = _server()
    again.load(store)
    assert again.round == 1


def test_a_refused_checkpoint_is_not_set_aside(tmp_path):
    """Other settings are the run's problem, not the file's: nothing moves."""
    store = CheckpointStore(tmp_path / "server.ckpt")
    _trained(1).save(store)
    with pytest.raises(CheckpointMismatch):
        _server(seed=8).load(store)
    assert store.path.is_file() and not store.corrupt.exists()


def test_two_damaged_checkpoints_are_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path / "server.ckpt")
    server = _trained(1)
    server.save(store)
    server.save(store)
    _zero(store.path)
    _truncate(store.previous)
    with pytest.raises(CheckpointCorrupt) as error:
        _server().load(store)
    text = str(error.value)
    assert str(store.path) in text and str(store.previous) in text
    assert "start fresh" in text
    # Nothing usable: both are left where they are, for whoever looks.
    assert store.path.is_file() and not store.corrupt.exists()


def test_stale_temporary_files_are_removed(tmp_path):
    store = CheckpointStore(tmp_path / "server.ckpt")
    _trained(1).save(store)
    stale = [tmp_path / ".server.ckpt.tmp-abc123", tmp_path / ".server.ckpt.tmp-x"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    other = tmp_path / ".notes.tmp-keep"
    other.write_text("not ours")
    assert _server().load(store) is not None
    assert not any(p.exists() for p in stale) and other.exists()


def test_a_crash_during_save_leaves_the_last_checkpoint_whole(tmp_path):
    """SIGKILL halfway through writing round 3: round 2 loads, from server.ckpt
    itself (no fallback needed), and the half-written file is cleaned up."""
    result = subprocess.run(
        [sys.executable, str(JOB), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]  # killed, as meant
    state = json.loads((tmp_path / "before_crash.json").read_text())
    assert state["rounds_saved"] == 2
    store = CheckpointStore(tmp_path / "server.ckpt")
    stale = list(tmp_path.glob(".server.ckpt.tmp-*"))

    def round_of(checkpoint):
        return checkpoint["server"]["round"]

    loaded = store.load(round_of)
    assert loaded == (2, store.path)
    assert not list(tmp_path.glob(".server.ckpt.tmp-*"))
    assert stale, "the crash should have left a temporary file to clean"


# A second process that holds a folder's lock (a server running there).
_HOLDER = """
import sys, time
from speechbrain_omc.federated.checkpoint import CheckpointStore
store = CheckpointStore(sys.argv[1]).lock()
open(sys.argv[2], "w").write("locked")
time.sleep(120)
"""


def _hold_lock(path):
    ready = path.parent / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), str(ready)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert holder.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return holder


def test_a_second_server_on_one_folder_is_refused(tmp_path):
    """Another process runs a server on the folder: this one is refused with
    its process id named, and nothing of the folder is touched (its save in
    progress, a temporary file, stays); once it is gone the folder is free."""
    store = CheckpointStore(tmp_path / "server.ckpt")
    _trained(1).save(store)
    holder = _hold_lock(store.path)
    try:
        live = tmp_path / ".server.ckpt.tmp-live"
        live.write_bytes(b"a save in progress")
        second = CheckpointStore(tmp_path / "server.ckpt")
        with pytest.raises(CheckpointLocked, match=f"process {holder.pid}"):
            second.lock()
        # Reading alone (saved_clients, a resume check) leaves it too.
        assert _server().load(second) is not None
        assert live.exists()
    finally:
        holder.kill()
        holder.wait()
    with CheckpointStore(tmp_path / "server.ckpt") as third:
        assert third.locked
        assert _server().load(third) is not None
        assert not live.exists()  # stale now: removed
    assert not third.locked


def test_two_stores_of_one_process_exclude_each_other(tmp_path):
    first = CheckpointStore(tmp_path / "server.ckpt").lock()
    with pytest.raises(CheckpointLocked, match="another server"):
        CheckpointStore(tmp_path / "server.ckpt").lock()
    first.unlock()
    CheckpointStore(tmp_path / "server.ckpt").lock().unlock()
    # A store that only reads creates no lock file.
    CheckpointStore(tmp_path / "other.ckpt").load(lambda state: state)
    assert not (tmp_path / "other.ckpt.lock").exists()
