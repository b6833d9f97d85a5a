"""Clients whose replies are valid on the wire but try to steer, freeze or wedge
the server (the embedded server; the Flower app's runs are in test_flower.py,
the client's recovery in test_federated_client.py, the folder lock in
test_server_checkpoint.py).

* Client text (a lone surrogate as ``round``, ANSI escapes in an exception,
  odd metric names) reaches reports, logs and CSV rows only escaped and
  bounded: a round row can always be written.
* With default settings one client of four moves no weight by more than 10x
  an honest round's move, whatever it sends (1e30, FLT_MAX, a 60x
  sign-flipped update, a relabelled or inflated transform).
* A round whose combination is not finite leaves no trace in the server
  momentum; honest rounds after it move the model again.
* The robust rules keep their promise at four clients a round, without
  overflow; a server without ``max_examples`` weighs every client the same;
  a flood of strangers' replies leaves a small report.
"""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
from federated_fixtures import CLIENTS, OMC, reply_meta, small_model, small_server

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.transform import Transform
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.aggregation import Aggregation, combine
from speechbrain_omc.federated.defence import (
    MAX_LIMIT_GROWTH,
    MAX_PEAK_GROWTH,
    MAX_REASONS,
    MAX_TEXT,
    is_clean,
)
from speechbrain_omc.federated.round_log import round_row, write_csv
from speechbrain_omc.federated.server import FedAvgServer

FLT_MAX = torch.finfo(torch.float32).max
BOUND = 10


def _server(**kwargs) -> FedAvgServer:
    return small_server(**{"clients_per_round": 4, "run_id": "run", **kwargs})


def _delta(client: str, round_: int, name: str, shape) -> torch.Tensor:
    """An honest client's update: a shared direction plus its own noise."""
    common = torch.Generator().manual_seed(1000 * round_ + len(name))
    own = torch.Generator().manual_seed(
        zlib.crc32(f"{client}/{round_}/{name}".encode())
    )
    return 0.01 * torch.randn(shape, generator=common) + 0.005 * torch.randn(
        shape, generator=own
    )


def _meta(received: wire.Message, **overrides) -> dict:
    metrics = {"train_loss": 1.0, "steps": 3}
    return {**reply_meta(received, BOUND, metrics=metrics), **overrides}


def _encode_like(received: wire.Message, values: dict, **meta) -> bytes:
    """``values`` (float32) in the form each entry was received."""
    entries = {}
    for name, value in values.items():
        sent = received.entries[name]
        if isinstance(sent, CompressedTensor):
            entries[name] = CompressedTensor.compress(value, sent.format)
        else:
            entries[name] = value
    return wire.encode(entries, _meta(received, **meta))


def honest(data: bytes, scale: float = 1.0, **meta) -> bytes:
    """The broadcast plus ``scale`` times this client's honest update."""
    received = wire.decode(data)
    client, round_ = received.meta["client"], received.meta["round"]
    values = {
        name: value + scale * _delta(client, round_, name, value.shape)
        for name, value in received.decompressed().items()
    }
    return _encode_like(received, values, **meta)


def everything(value: float):
    def reply(data: bytes) -> bytes:
        received = wire.decode(data)
        values = {
            n: torch.full_like(v, value) for n, v in received.decompressed().items()
        }
        return _encode_like(received, values)

    return reply


def filled(value: float, which=lambda name, sent: True):
    """The honest reply with the entries ``which`` selects full of ``value``."""

    def reply(data: bytes) -> bytes:
        received = wire.decode(honest(data))
        values = {
            n: torch.full_like(v, value) if which(n, received.entries[n]) else v
            for n, v in received.decompressed().items()
        }
        return _encode_like(received, values)

    return reply


def float32_entries(name: str, sent) -> bool:
    return not isinstance(sent, CompressedTensor)


def sign_flipped(data: bytes) -> bytes:
    return honest(data, scale=-60.0)


def _with_transforms(data: bytes, make) -> bytes:
    """The honest reply with each compressed entry's transform replaced."""
    received = wire.decode(honest(data))
    entries = dict(received.entries)
    for name, value in entries.items():
        if isinstance(value, CompressedTensor):
            entries[name] = CompressedTensor(
                value.packed, value.format, value.shape, make(value.transform)
            )
    return wire.encode(entries, received.meta)


def relabelled(data: bytes) -> bytes:
    return _with_transforms(data, lambda t: Transform("affine", t.scale, 1e30))


def inflated(data: bytes) -> bytes:
    return _with_transforms(data, lambda t: Transform(t.kind, 1e30, t.shift))


ATTACKS = {
    "1e3": everything(1e3),  # within the range check: the bounds must hold
    "1e30": everything(1e30),
    "FLT_MAX": everything(FLT_MAX),
    "60x sign-flipped": sign_flipped,
    "relabelled transform": relabelled,
    "scale 1e30": inflated,
}


def _move(server, hostile=None, attacker="c2"):
    """Largest change of any weight in one round (``hostile`` sent by one)."""
    start = {n: v.clone() for n, v in server.model.items()}
    messages = server.configure_round()
    replies = {
        c: hostile(m) if hostile and c == attacker else honest(m)
        for c, m in messages.items()
    }
    report = server.aggregate(replies)
    moved = max(float((server.model[n] - start[n]).abs().max()) for n in start)
    return moved, report


@pytest.mark.parametrize("omc", [OMC, None], ids=["e3m7", "float32"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_one_client_of_four_moves_the_model_at_most_10x_an_honest_round(attack, omc):
    if omc is None and attack in ("relabelled transform", "scale 1e30"):
        pytest.skip("no compressed entry to relabel")
    honest_move, _ = _move(_server(omc=omc))
    attacked, report = _move(_server(omc=omc), ATTACKS[attack])
    ratio = attacked / honest_move
    print(f"{attack}, {'e3m7' if omc else 'float32'}: {ratio:.3f}x an honest round")
    assert math.isfinite(attacked) and ratio <= 10, ratio
    assert report.model_updated and len(report.accepted) >= 3
    # Undefended, the same reply steers the model (the test has teeth);
    # 1e30 and FLT_MAX are beyond the broadcast's range: refused anyway.
    if attack in ("1e3", "60x sign-flipped") and omc is None:
        off = _server(omc=omc, aggregation=Aggregation(norm_bound=None))
        undefended, _ = _move(off, ATTACKS[attack])
        assert undefended / honest_move > 10


def test_a_clipped_update_is_reported_and_the_rest_is_unchanged():
    """Honest rounds keep their bits: the same model with the bound as
    without it while no update reaches it; a clipped one is named."""
    defended, undefended = _server(), _server(aggregation=Aggregation(norm_bound=None))
    for _ in range(2):
        for server in (defended, undefended):
            _, report = _move(server)
            assert report.clipped == {}
    for name, value in undefended.model.items():
        assert torch.equal(defended.model[name], value), name
    _, report = _move(defended, sign_flipped)
    assert list(report.clipped) == ["c2"] and 0 < report.clipped["c2"] < 1


def test_colluding_zero_updates_do_not_throttle_training():
    """Two of four clients echo the broadcast: the limit is the *upper*
    median of the norms, so the honest updates pass unclipped."""
    server = _server(omc=None)
    messages = server.configure_round()
    zero = sorted(messages)[:2]
    replies = {
        c: honest(m, scale=0.0 if c in zero else 1.0) for c, m in messages.items()
    }
    assert server.aggregate(replies).clipped == {}


POISONS = {
    "one FLT_MAX": (1, None, everything(FLT_MAX)),
    "two FLT_MAX": (2, None, everything(FLT_MAX)),
    "two FLT_MAX, e3m7, float32 entries only": (
        2,
        OMC,
        filled(FLT_MAX, float32_entries),
    ),
    "two 1e3 (within range)": (2, None, everything(1e3)),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_momentum_recovers_from_a_poisoned_round(poison):
    """FedAvgM at 0.9: a poisoned round, then three honest rounds: the model
    is finite, bounded and moves in each. FLT_MAX is beyond the broadcast's
    range (float32 entries too): refused. Two colluders of four sending 1e3,
    within range, are half the round, beyond what the bounds promise: their
    round may move the model far, but never freezes the server."""
    hostile, omc, attack = POISONS[poison]
    server = _server(omc=omc, server_momentum=0.9)
    start = {n: v.clone() for n, v in server.model.items()}
    messages = server.configure_round()
    bad = sorted(messages)[:hostile]
    replies = {c: attack(m) if c in bad else honest(m) for c, m in messages.items()}
    server.aggregate(replies)
    poisoned = {n: v.clone() for n, v in server.model.items()}
    for _ in range(3):
        before = {n: v.clone() for n, v in server.model.items()}
        _, report = _move(server)
        assert report.model_updated
        assert all(bool(torch.isfinite(v).all()) for v in server.model.values())
        assert all(bool(torch.isfinite(v).all()) for v in server.momentum.values())
        changed = sum(
            int((before[n] != server.model[n]).sum())
            for n in before
            if n not in server.buffers
        )
        weights = sum(v.numel() for n, v in before.items() if n not in server.buffers)
        assert changed > weights // 2, (changed, weights)
    if "FLT_MAX" in poison:
        drift = max(float((server.model[n] - start[n]).abs().max()) for n in start)
        assert drift < 1.0  # four rounds of updates of about 0.03
    else:  # moved far by half the round, but finite and moving
        drift = max(float((server.model[n] - poisoned[n]).abs().max()) for n in start)
        assert 0 < drift < 1e4


def test_a_discarded_round_resets_the_momentum(caplog):
    """Undefended, two colluders of four fill an entry near 1e36 with 3e38
    (within its range): committed (finite), then the momentum's next steps
    overflow: that round is discarded, the momentum reset, and the honest
    round after it moves the model."""
    model = small_model()
    model["layer1.weight"][0, 0] = 1e36
    server = FedAvgServer(
        model,
        CLIENTS,
        clients_per_round=4,
        seed=7,
        buffers=["norm.running_mean"],
        max_examples=BOUND,
        server_momentum=0.9,
        aggregation=Aggregation(norm_bound=None),
    )
    messages = server.configure_round()
    bad = sorted(messages)[:2]
    attack = filled(3e38, lambda name, sent: name == "layer1.weight")
    report = server.aggregate(
        {c: attack(m) if c in bad else honest(m) for c, m in messages.items()}
    )
    assert report.accepted == sorted(messages) and report.model_updated
    updated = [_move(server)[1].model_updated for _ in range(3)]
    assert False in updated and updated[-1], updated
    assert "momentum is reset" in caplog.text


# ------------------------------------------------------- rounds of twenty
MANY = [f"c{i:02d}" for i in range(20)]
KEY = bytes(32)  # a fixed reference key: the draws below are pinned


def _twenty(**kwargs) -> FedAvgServer:
    """A server of twenty clients a round, with the fixed reference key."""
    settings = dict(
        seed=7, buffers=["norm.running_mean"], max_examples=BOUND, reference_key=KEY
    )
    settings.update(kwargs)
    return FedAvgServer(small_model(), MANY, clients_per_round=20, **settings)


def _large_round(attackers, attack, seed=7, **kwargs):
    """One round of twenty clients, ``attackers`` sending ``attack``: the
    largest weight move, the report and the round's reference clients."""
    server = _twenty(seed=seed, **kwargs)
    start = {n: v.clone() for n, v in server.model.items()}
    messages = server.configure_round()
    reference = server.fold_order()[: server.aggregation.norm_reference]
    replies = {
        c: attack(m) if c in attackers else honest(m) for c, m in messages.items()
    }
    report = server.aggregate(replies)
    moved = max(float((server.model[n] - start[n]).abs().max()) for n in start)
    return moved, report, reference


@pytest.mark.parametrize(
    "attackers",
    [MANY[:4], MANY[8:16]],
    ids=["4 of 20 with the first ids", "8 of 20 folded after the first 8 ids"],
)
def test_a_minority_of_a_large_round_cannot_move_the_model(attackers):
    """Rounds larger than the reference set: the limits come from replies
    the key draws (not the ids that sort first), then stay frozen (the
    replies folded later do not raise them)."""
    honest_move, _, _ = _large_round([], None)
    moved, report, reference = _large_round(attackers, everything(1e3))
    hostile_references = len(set(reference) & set(attackers))
    assert hostile_references < len(reference) / 2  # the guarantee's premise
    ratio = moved / honest_move
    print(f"{len(attackers)} attackers of 20: {ratio:.3f}x an honest round")
    assert ratio <= 10, ratio
    assert set(attackers) <= set(report.clipped)
    assert set(report.clipped) - set(attackers) == set()


def test_the_reference_clients_are_drawn_by_a_secret_key(tmp_path):
    """The broadcast's seeds are functions of the (guessable) run seed: the
    draw is keyed by a secret instead, which a resumed server restores."""
    orders = []
    for key in (KEY, KEY, None, None):
        server = FedAvgServer(
            small_model(), MANY, clients_per_round=20, seed=7, reference_key=key
        )
        server.open_round()
        orders.append(server.fold_order())
    keyed, again, first_secret, second_secret = orders
    assert keyed == again  # the same key: the same draw
    assert first_secret != second_secret  # the same seed, other secrets
    assert keyed[:8] != MANY[:8] and sorted(keyed) == MANY
    server = FedAvgServer(small_model(), MANY, clients_per_round=20, seed=7)
    server.save(tmp_path / "server.ckpt")
    server.open_round()
    resumed = FedAvgServer(small_model(), MANY, clients_per_round=20, seed=7)
    resumed.load(tmp_path / "server.ckpt")
    resumed.open_round()
    assert resumed.fold_order() == server.fold_order()


def _captured_rounds(attacks=None, max_held_bytes=None):
    """Rounds of twenty; in each, the reference clients send ``attacks[i]``
    (``None``: honest; a draw can make a minority all of them, some round),
    arriving first. Returns each round's largest weight move, the limits
    carried after each round, and the server."""
    attacks = attacks or [None, everything(1e3)]
    settings = {} if max_held_bytes is None else {"max_held_bytes": max_held_bytes}
    server = _twenty(**settings)
    moves, carried = [], []
    for attack in attacks:
        start = {n: v.clone() for n, v in server.model.items()}
        messages = server.configure_round()
        hostile = set(server.fold_order()[:8]) if attack else set()
        for client in sorted(messages, key=lambda c: (c not in hostile, c)):
            reply = attack if client in hostile else honest
            server.receive(client, reply(messages[client]))
        assert server.close_round().model_updated
        moves.append(
            max(float((server.model[n] - start[n]).abs().max()) for n in start)
        )
        carried.append(server.state_dict()["limits"])
    return moves, carried, server


def _scaled(scale: float):
    def reply(data: bytes) -> bytes:
        return honest(data, scale=scale)

    return reply


def test_a_captured_round_moves_the_limits_by_a_bounded_factor():
    """Without the carried limits the captured round's upper median would
    be the attackers' (1e3 in every weight)."""
    (honest_move, captured_move), (before, after), _ = _captured_rounds()
    ratio = captured_move / honest_move
    print(f"a round with hostile reference replies: {ratio:.2f}x an honest round")
    assert ratio <= 2 * 10, ratio
    assert after["norm"] <= MAX_LIMIT_GROWTH * before["norm"]
    growth = [after["peaks"][n] / p for n, p in before["peaks"].items()]
    assert max(growth) <= MAX_PEAK_GROWTH


def test_captured_tiny_or_zero_updates_neither_stall_nor_uncap_training():
    """Reference replies of 1e-4 of an honest update, or of nothing, lower
    the limits at most twofold (the next honest round moves as usual) and
    keep a cap in place (a later capture still moves the model little)."""
    for attack in (_scaled(1e-4), _scaled(0.0)):
        moves, carried, _ = _captured_rounds([None, attack, None, everything(1e3)])
        honest_move, _, after, captured = moves
        assert after >= 0.5 * honest_move, moves
        assert carried[1]["norm"] >= carried[0]["norm"] / 2
        assert captured <= 2 * 10 * honest_move, moves


def test_over_budget_the_limits_are_the_previous_rounds(caplog):
    """Replies that cannot wait for the reference clients (over
    ``max_held_bytes``) are folded under the last round's limits, not under
    those of the replies that came first, and such rounds do not compound
    them."""
    caplog.set_level("WARNING")
    moves, carried, _ = _captured_rounds(
        [None] * 6 + [everything(1e3)], max_held_bytes=1
    )
    assert "starts from the previous round's limits" in caplog.text
    assert carried[-1] == carried[0]
    assert moves[-1] / moves[0] <= 2 * 10, moves


def test_the_carried_limits_survive_a_checkpoint(tmp_path):
    _, _, server = _captured_rounds()
    server.save(tmp_path / "server.ckpt")
    resumed = _twenty(reference_key=None)
    resumed.load(tmp_path / "server.ckpt")
    assert resumed.state_dict()["limits"] == server.state_dict()["limits"]
    assert resumed.state_dict()["limits"]["norm"] > 0
    state = server.state_dict()
    state["limits"] = {"norm": math.inf, "peaks": {}}
    with pytest.raises(ValueError, match="bad carried limit"):
        resumed.load_state_dict(state)
    state["limits"] = {"norm": 1.0, "peaks": {"nowhere": 1.0}}
    with pytest.raises(ValueError, match="unknown entries"):
        resumed.load_state_dict(state)


# ---------------------------------------------------------- one weight
def _wide_model():
    gen = torch.Generator().manual_seed(0)
    return {
        "wide.weight": torch.randn(400, 300, generator=gen),
        "wide.bias": torch.randn(400, generator=gen),
        "out.weight": torch.randn(8, 400, generator=gen),
    }


def spiked(value: float):
    """The honest reply plus ``value`` in one weight."""

    def reply(data: bytes) -> bytes:
        received = wire.decode(honest(data))
        values = received.decompressed()
        values["wide.weight"][7, 11] += value
        return _encode_like(received, values)

    return reply


@pytest.mark.parametrize("value", [4e3, 1e30], ids=["4e3 (within range)", "1e30"])
@pytest.mark.parametrize("omc", [OMC, None], ids=["e3m7", "float32"])
def test_one_weight_moves_at_most_10x_an_honest_round(value, omc):
    """An L2 bound alone lets an update put its whole norm on one weight
    (about sqrt(model size) times an honest move): each update value is
    bounded too."""

    def server():
        return FedAvgServer(
            _wide_model(), CLIENTS, 4, seed=7, omc=omc, max_examples=BOUND
        )

    honest_move, _ = _move(server())
    attacked, report = _move(server(), spiked(value))
    ratio = attacked / honest_move
    print(f"one weight +{value:g}, {'e3m7' if omc else 'float32'}: {ratio:.3f}x")
    assert ratio <= 10, ratio
    assert report.model_updated and len(report.accepted) >= 3


def test_honest_rounds_of_a_wide_model_keep_their_bits():
    """Nothing over the limits: the same model as without the bounds."""
    defended = FedAvgServer(_wide_model(), CLIENTS, 4, seed=7, max_examples=BOUND)
    undefended = FedAvgServer(
        _wide_model(),
        CLIENTS,
        4,
        seed=7,
        max_examples=BOUND,
        aggregation=Aggregation(norm_bound=None),
    )
    for server in (defended, undefended):
        for _ in range(2):
            assert _move(server)[1].clipped == {}
    for name, value in undefended.model.items():
        assert torch.equal(defended.model[name], value), name


# ------------------------------------------------------------ small weights
def test_an_entry_broadcast_near_zero_may_be_refitted():
    """A compressed entry broadcast at 1e-6 (a layer initialised near zero)
    that training moves to 0.01: the reach is floored, the reply accepted."""
    model = small_model()
    model["layer2.weight"] = torch.full((16, 16), 1e-6)
    omc = OMCConfig(format="e3m7", fp32_fraction=0.0, seed=3)
    server = FedAvgServer(model, CLIENTS, 4, seed=7, omc=omc, max_examples=BOUND)
    messages = server.configure_round()
    assert isinstance(
        wire.decode(messages["c0"]).entries["layer2.weight"], CompressedTensor
    )
    refit = filled(0.01, lambda name, sent: name == "layer2.weight")
    report = server.aggregate({c: refit(m) for c, m in messages.items()})
    assert report.accepted == CLIENTS, report.rejected
    refitted = server.model["layer2.weight"]
    assert torch.allclose(refitted, torch.full((16, 16), 0.01), rtol=1e-2)


# ------------------------------------------------------------ robust rules
def test_trimmed_mean_trims_one_of_four_by_default():
    models = [{"w": torch.tensor([1.0])} for _ in range(3)] + [
        {"w": torch.tensor([1e30])}
    ]
    master = {"w": torch.tensor([0.0])}
    out = combine(models, [1] * 4, master, Aggregation("trimmed_mean"))
    assert out["w"].item() == 1.0


@pytest.mark.parametrize("k", [4, 5])
@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "norm_clip"])
def test_robust_rules_do_not_overflow(rule, k):
    """Of four, the median is the mean of the middle two: summed, they
    would overflow."""
    big = {"w": torch.full((3,), FLT_MAX)}
    models = [big] * (k - 1) + [{"w": torch.ones(3)}]
    master = {"w": -torch.full((3,), FLT_MAX)}
    out = combine(models, [1] * k, master, Aggregation(rule, norm_bound=None))
    assert bool(torch.isfinite(out["w"]).all()), out


# ------------------------------------------------------------------ weights
def test_without_max_examples_every_client_weighs_the_same():
    server = FedAvgServer(
        small_model(), CLIENTS, 3, seed=7, aggregation=Aggregation(norm_bound=None)
    )
    start = server.model["layer1.bias"].clone()
    messages = server.configure_round()
    liar, *others = sorted(messages)
    replies = {c: _shifted(m, 1.0, num_examples=1) for c, m in messages.items()}
    replies[liar] = _shifted(messages[liar], 100.0, num_examples=2**53)
    report = server.aggregate(replies)
    assert report.accepted == sorted(messages)
    moved = server.model["layer1.bias"] - start
    assert torch.allclose(moved, torch.full_like(moved, 102.0 / 3), atol=1e-4)


def _shifted(data, shift, **meta):
    received = wire.decode(data)
    values = {n: v + shift for n, v in received.decompressed().items()}
    return _encode_like(received, values, **meta)


# -------------------------------------------------------------------- text
def _raw(data: bytes, meta_text: str) -> bytes:
    """The honest reply with its metadata replaced by raw JSON text."""
    from test_hostile_clients import raw_message

    entries = []
    for name, value in wire.decode(honest(data)).entries.items():
        if isinstance(value, CompressedTensor):
            entries.append((name, wire.COMPRESSED, value.to_bytes()))
        else:
            entries.append((name, wire.FLOAT32, wire.float32_payload(value)))
    return raw_message(entries, meta_text.encode())


def _meta_text(data: bytes, **raw: str) -> str:
    meta = _meta(wire.decode(data))
    text = json.dumps({k: v for k, v in meta.items() if k not in raw})
    fields = ", ".join(f'"{k}": {v}' for k, v in raw.items())
    return text[:-1] + ", " + fields + "}"


SURROGATE = '"\\udcff"'  # JSON for a lone surrogate, in ASCII bytes
TEXT_ROWS = {
    "round is a lone surrogate": {"round": SURROGATE},
    "num_examples is a lone surrogate": {"num_examples": SURROGATE},
    "client is an ANSI escape": {"client": '"\\u001b[31mc0"'},
    "metric named with a control character": {"metrics": '{"loss\\u0007\\udcff": 1.0}'},
}


@pytest.mark.parametrize("row", list(TEXT_ROWS))
def test_client_text_is_escaped_and_the_round_row_is_written(row, tmp_path, caplog):
    server = _server()
    messages = server.configure_round()
    bad = sorted(messages)[0]
    replies = {c: honest(m) for c, m in messages.items()}
    replies[bad] = _raw(messages[bad], _meta_text(messages[bad], **TEXT_ROWS[row]))
    report = server.aggregate(replies)
    assert list(report.rejected) == [bad]
    reason = report.rejected[bad]
    assert is_clean(reason), reason
    write_csv([round_row(report, None, 1.0)], tmp_path / "rounds.csv")
    text = (tmp_path / "rounds.csv").read_text(encoding="ascii")
    assert "\x1b" not in text and "\x07" not in text
    logged = [r.getMessage() for r in caplog.records]
    assert all(is_clean(m, limit=10**6) for m in logged if bad in m)


def test_failure_reasons_are_escaped_and_bounded():
    server = _server()
    server.open_round()
    client = server.fold_order()[0]
    server.fail(client, "\x1b[2J\x1b[31mboom\udcff" + "x" * 10_000)
    report = server.close_round()
    reason = report.rejected[client]
    assert is_clean(reason) and len(reason) <= MAX_TEXT, reason
    assert reason.startswith("failed: \\x1b[2J")


def test_poisoned_rows_of_an_older_run_are_written(tmp_path):
    """Rows resumed from a checkpoint that an older version wrote with raw
    client text: written escaped rather than raising UnicodeEncodeError."""
    row = {"round": 1, "rejected": "c0: update for round \udcff, \x1b[31m"}
    write_csv([row], tmp_path / "rounds.csv")
    text = (tmp_path / "rounds.csv").read_text(encoding="ascii")
    assert "\\udcff" in text and "\\x1b[31m" in text


def test_a_flood_of_strangers_leaves_a_small_report(caplog):
    server = _server()
    messages = server.configure_round()
    for i in range(20_000):
        server.receive(f"stranger-{i}", b"x")
    report = server.aggregate({c: honest(m) for c, m in messages.items()})
    assert report.accepted == sorted(messages)
    assert report.ignored == 20_000
    assert len(report.rejected) == MAX_REASONS
    assert len(json.dumps(report.to_dict())) < 20_000
    assert len(caplog.records) < 2 * MAX_REASONS + 10
