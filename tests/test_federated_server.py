"""FedAvg server: sampling, plans, exact bytes, averaging, rejecting bad updates."""

import ast
import logging
from pathlib import Path

import pytest
import torch
from federated_fixtures import (  # test_wire_directions imports OMC from here
    CLIENTS,
    OMC,  # noqa: F401
    pinned_fold,
    shifted_reply,
)
from federated_fixtures import small_model as _model
from federated_fixtures import small_server as _server

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.server import FedAvgServer, UpdateRejected


def honest_reply(data, shift=1.0, num_examples=10, **meta_overrides):
    """What a well-behaved client sends: every value + shift, in the same form."""
    changes = {"metrics": {"train_loss": 1.0}, **meta_overrides}
    return shifted_reply(data, shift, num_examples, **changes)


def test_server_imports_no_speechbrain():
    # The server and the wire format speak bytes: no SpeechBrain in them.
    root = Path(__file__).resolve().parents[1] / "speechbrain_omc" / "federated"
    for name in ("server.py", "round.py", "planning.py", "server_state.py", "wire.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] == "speechbrain" for m in modules), name


def test_sampling_is_seeded_per_round():
    a, b = _server(), _server()
    draws = [a.sample_clients(r) for r in range(1, 6)]
    assert draws == [b.sample_clients(r) for r in range(1, 6)]
    assert len({tuple(d) for d in draws}) > 1
    assert all(len(set(d)) == 3 for d in draws)
    assert (
        _server(seed=8).sample_clients(1) != draws[0]
        or _server(seed=8).sample_clients(2) != draws[1]
    )


def test_plans_per_round_and_client():
    server = _server()
    plans = {(r, c): server.formats(r, c) for r in (1, 2, 3) for c in CLIENTS}
    # Biases and buffers never travel compressed (weights-only, buffers).
    for formats in plans.values():
        assert formats["layer1.bias"] == formats["norm.running_mean"] == "float32"
        assert sorted(formats.values()).count("e3m7") >= 1
    # The random policy gives different clients different float32 variables.
    assert len({tuple(f.values()) for f in plans.values()}) > 1
    assert plans == {
        (r, c): _server().formats(r, c) for r in (1, 2, 3) for c in CLIENTS
    }
    assert set(_server(omc=None).formats(1, "c0").values()) == {"float32"}


def test_roles_keep_a_2d_normalisation_weight_float32_in_every_plan():
    # layer2 is a 2-D LayerNorm gain: by shape alone it would be compressed.
    roles = {"layer2.weight": "normalisation"}
    server = _server(roles=roles)
    blind = _server()
    plans = [server.formats(r, c) for r in (1, 2, 3) for c in CLIENTS]
    assert all(f["layer2.weight"] == "float32" for f in plans)
    assert any(blind.formats(r, "c0")["layer2.weight"] == "e3m7" for r in (1, 2, 3))
    assert server.roles == {
        "layer1.weight": "matrix",
        "layer1.bias": "vector",
        "layer2.weight": "normalisation",
        "layer3.weight": "matrix",
    }
    # A resumed run must have the same roles: they change the plans.
    assert server.settings()["roles"] == roles
    assert "roles" not in blind.settings()


@pytest.mark.parametrize(
    "roles, error, match",
    [
        ({"decoder.weight": "matrix"}, ValueError, "not parameters of the model"),
        ({"layer1.weight": "gain"}, ValueError, "role 'gain', not one of"),
        ({"norm.running_mean": "normalisation"}, ValueError, "buffers have no role"),
        (["layer1.weight"], TypeError, "roles must be a mapping"),
    ],
)
def test_bad_roles_are_refused_when_the_server_is_built(roles, error, match):
    with pytest.raises(error, match=match):
        _server(roles=roles)


def test_messages_carry_plan_seed_and_config():
    server = _server(client_config={"local_epochs": 2})
    messages = server.configure_round()
    assert list(messages) == server.sample_clients(1)
    for client, data in messages.items():
        message = wire.decode(data)
        assert message.meta["client"] == client and message.meta["round"] == 1
        assert message.meta["config"] == {"local_epochs": 2}
        assert message.meta["seed"] == server.client_seed(1, client)
        assert message.formats() == server.formats(1, client)


def test_bytes_are_counted_from_messages():
    server = _server()
    messages = server.configure_round()
    replies = {c: honest_reply(m) for c, m in messages.items()}
    report = server.aggregate(replies)
    assert report.bytes_down == sum(len(m) for m in messages.values())
    assert report.bytes_up == sum(len(r) for r in replies.values())

    def float32_len(data):
        message = wire.decode(data)
        return len(wire.encode(message.decompressed(), message.meta))

    assert report.float32_bytes_down == sum(float32_len(m) for m in messages.values())
    assert report.float32_bytes_up == sum(float32_len(r) for r in replies.values())
    assert report.bytes_down < report.float32_bytes_down


def test_fedavg_weighted_by_examples_in_float32():
    server = _server(omc=None, clients_per_round=4)
    messages = server.configure_round()
    weights = {"c0": 1, "c1": 3, "c2": 6, "c3": 10}
    replies = {
        c: honest_reply(m, shift=float(i), num_examples=weights[c])
        for i, (c, m) in enumerate(sorted(messages.items()))
    }
    expected = pinned_fold(replies)
    report = server.aggregate(replies)
    assert report.accepted == sorted(replies) and report.num_examples == 20
    for name, value in expected.items():
        assert server.model[name].dtype == torch.float32
        assert torch.equal(server.model[name], value)
    # Shift i for client ci: the mean shift is (0*1 + 1*3 + 2*6 + 3*10) / 20.
    assert torch.allclose(server.model["layer1.bias"], _model()["layer1.bias"] + 2.25)


def test_compressed_replies_are_decompressed_and_averaged():
    server = _server()
    messages = server.configure_round()
    replies = {c: honest_reply(m, shift=0.5) for c, m in messages.items()}
    expected = pinned_fold(replies)
    server.aggregate(replies)
    for name, value in expected.items():
        assert torch.equal(server.model[name], value)
    assert (
        server.model["layer2.weight"] - _model()["layer2.weight"] - 0.5
    ).abs().max() < 0.05


def test_server_learning_rate_and_momentum():
    server = _server(omc=None, server_lr=0.5, server_momentum=0.9)
    start = server.model["layer1.weight"].clone()
    for expected_total in (0.5, 0.5 + 0.5 * 1.9):
        messages = server.configure_round()
        server.aggregate({c: honest_reply(m, shift=1.0) for c, m in messages.items()})
        assert torch.allclose(server.model["layer1.weight"], start + expected_total)
    # Buffers are averaged, not moved by the server optimizer.
    assert torch.allclose(server.model["norm.running_mean"], torch.full((4,), 2.0))


def _replace_entry(data, name, value):
    message = wire.decode(data)
    entries = dict(message.entries)
    entries[name] = value
    return wire.encode(entries, message.meta)


def _drop_entry(data, name):
    message = wire.decode(data)
    return wire.encode(
        {n: v for n, v in message.entries.items() if n != name}, message.meta
    )


def _compressed_name(server, round, client):
    return next(n for n, f in server.formats(round, client).items() if f == "e3m7")


def _recompressed(server, client, data, fmt):
    """The reply with its first compressed entry in another format."""
    name = _compressed_name(server, 1, client)
    value = wire.decode(data).decompressed()[name]
    return _replace_entry(data, name, CompressedTensor.compress(value, fmt))


MALFORMED = {
    "wrong shape": (
        lambda s, c, d: _replace_entry(d, "layer1.bias", torch.zeros(15)),
        "layer1.bias has shape \\(15,\\), expected \\(16,\\)",
    ),
    "wrong shape, compressed": (
        lambda s, c, d: _replace_entry(
            d,
            _compressed_name(s, 1, c),
            CompressedTensor.compress(torch.zeros(2, 2), "e3m7"),
        ),
        "has shape \\(2, 2\\)",
    ),
    "wrong format: float32 for compressed": (
        lambda s, c, d: _replace_entry(
            d,
            _compressed_name(s, 1, c),
            wire.decode(d).decompressed()[_compressed_name(s, 1, c)],
        ),
        "arrived as float32, expected e3m7",
    ),
    "wrong format: another format": (
        lambda s, c, d: _recompressed(s, c, d, "e4m3"),
        "arrived as e4m3, expected e3m7",
    ),
    "wrong format: a wider one": (
        lambda s, c, d: _recompressed(s, c, d, "bf16"),
        "payload of \\d+ bytes, at most \\d+ expected",
    ),
    "wrong format: compressed bias": (
        lambda s, c, d: _replace_entry(
            d, "layer1.bias", CompressedTensor.compress(torch.zeros(16), "e3m7")
        ),
        "layer1.bias arrived compressed, expected float32",
    ),
    "NaN values": (
        lambda s, c, d: _replace_entry(
            d, "layer1.bias", torch.full((16,), float("nan"))
        ),
        "layer1.bias has 16 non-finite values",
    ),
    "infinite values": (
        lambda s, c, d: _replace_entry(
            d, "norm.running_mean", torch.tensor([0.0, float("inf"), 0.0, 0.0])
        ),
        "norm.running_mean has 1 non-finite values",
    ),
    "truncated payload": (lambda s, c, d: d[:-10], "malformed message: truncated"),
    "truncated to the header": (lambda s, c, d: d[:20], "malformed message"),
    "flipped bit": (
        lambda s, c, d: d[:100] + bytes([d[100] ^ 1]) + d[101:],
        "malformed message: corrupted.*CRC32",
    ),
    "garbage": (lambda s, c, d: b"\x00" * 64, "malformed message: not an OMC"),
    "not bytes": (lambda s, c, d: "a string", "not bytes"),
    "missing entry": (
        lambda s, c, d: _drop_entry(d, "layer3.weight"),
        "missing entries: layer3.weight",
    ),
    "unexpected entry": (
        lambda s, c, d: _replace_entry(d, "extra.weight", torch.zeros(2)),
        "unexpected entries: extra.weight",
    ),
    "stale round": (
        lambda s, c, d: honest_reply(s.message_for(c, 1), round=0),
        "update for round 0, expected 1",
    ),
    "signed by another client": (
        lambda s, c, d: honest_reply(s.message_for(c, 1), client="intruder"),
        "signed by client 'intruder'",
    ),
    "zero examples": (
        lambda s, c, d: honest_reply(s.message_for(c, 1), num_examples=0),
        "num_examples must be an integer in \\[1, ",
    ),
    "boolean examples": (
        lambda s, c, d: honest_reply(s.message_for(c, 1), num_examples=True),
        "num_examples must be an integer in \\[1, ",
    ),
    "a global model sent back": (
        lambda s, c, d: s.message_for(c, 1),
        "message type 'global'",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_update_is_rejected_and_the_round_goes_on(case, caplog):
    corrupt, reason = MALFORMED[case]
    server = _server()
    messages = server.configure_round()
    bad_client, *good_clients = list(messages)
    replies = {c: honest_reply(messages[c], shift=1.0) for c in good_clients}
    replies[bad_client] = corrupt(
        server, bad_client, honest_reply(messages[bad_client])
    )
    expected = pinned_fold({c: replies[c] for c in good_clients})

    with caplog.at_level(logging.WARNING, logger="speechbrain_omc.federated.round"):
        report = server.aggregate(replies)

    assert report.accepted == sorted(good_clients)
    assert list(report.rejected) == [bad_client]
    assert pytest.importorskip("re").search(reason, report.rejected[bad_client])
    assert any(
        bad_client in r.message and "rejected" in r.message for r in caplog.records
    )
    # The bad update poisoned nothing: the model is the average of the good ones.
    for name, value in expected.items():
        assert torch.equal(server.model[name], value)
        assert bool(torch.isfinite(server.model[name]).all())
    # And the next round runs as usual.
    assert server.round == 1
    messages = server.configure_round()
    assert server.aggregate({c: honest_reply(m) for c, m in messages.items()}).accepted


def test_validate_raises_update_rejected():
    server = _server()
    messages = server.configure_round()
    client = next(iter(messages))
    with pytest.raises(UpdateRejected, match="truncated"):
        server.validate(client, honest_reply(messages[client])[:-1])
    with pytest.raises(UpdateRejected, match="not sampled"):
        server.validate("nobody", honest_reply(messages[client]))


def test_failed_and_silent_clients_are_left_out(caplog):
    server = _server()
    messages = server.configure_round()
    failed, silent, good = list(messages)
    with caplog.at_level(logging.WARNING, logger="speechbrain_omc.federated.round"):
        report = server.aggregate(
            {good: honest_reply(messages[good])},
            failures={failed: "RuntimeError: boom"},
        )
    assert report.accepted == [good]
    assert report.rejected == {failed: "failed: RuntimeError: boom", silent: "no reply"}
    assert any("boom" in r.message for r in caplog.records)


def test_no_accepted_update_keeps_the_model():
    server = _server()
    before = {n: v.clone() for n, v in server.model.items()}
    messages = server.configure_round()
    report = server.aggregate({c: b"junk" for c in messages})
    assert report.accepted == [] and len(report.rejected) == 3
    assert server.round == 1
    assert all(torch.equal(before[n], server.model[n]) for n in before)


def test_round_protocol_errors():
    server = _server()
    with pytest.raises(RuntimeError, match="configure_round first"):
        server.aggregate({})
    with pytest.raises(ValueError, match="next round is 1"):
        server.configure_round(3)
    with pytest.raises(ValueError, match="clients_per_round"):
        FedAvgServer(_model(), CLIENTS, clients_per_round=5)
    with pytest.raises(ValueError, match="unknown buffers"):
        FedAvgServer(_model(), CLIENTS, 1, buffers=["nope"])


def test_state_dict_round_trip(tmp_path):
    # Atomicity, fallback and refusals: tests/test_server_checkpoint.py.
    server = _server(server_momentum=0.5)
    for _ in range(2):
        messages = server.configure_round()
        server.aggregate({c: honest_reply(m) for c, m in messages.items()})
    path = tmp_path / "server.ckpt"
    server.save(path, extra={"log": [{"round": 1}, {"round": 2}]})
    assert [p.name for p in tmp_path.iterdir()] == ["server.ckpt"]  # no temporaries

    other = _server(server_momentum=0.5)
    assert other.load(path) == {"log": [{"round": 1}, {"round": 2}]}
    assert other.round == 2
    assert all(torch.equal(other.model[n], server.model[n]) for n in server.model)
    # Both continue identically (the nonce aside: each server draws its own).
    m1, m2 = server.configure_round(), other.configure_round()
    assert list(m1) == list(m2)
    for client in m1:
        a, b = wire.decode(m1[client]), wire.decode(m2[client])
        assert a.meta["run"] == b.meta["run"] and a.meta["nonce"] != b.meta["nonce"]
        assert {**a.meta, "nonce": ""} == {**b.meta, "nonce": ""}
        assert wire.encode(a.entries) == wire.encode(b.entries)
    with pytest.raises(ValueError, match="other settings"):
        _server(seed=99).load(path)
