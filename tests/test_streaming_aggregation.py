"""Streaming aggregation: one model of memory whatever the clients per round.

The server folds each reply into running float32 values as it arrives
(FedAvg, FedAvgM, norm_clip with a fixed limit), in sorted client order
whatever the arrival order; rules that need every update hold them within a
budget. Both runners stream: the embedded round (``run_round``) and the
Flower strategy over a ``StreamingGrid``.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from federated_fixtures import pinned_fold, small_model, small_server
from flower_harness import FakeGrid, honest_reply
from flwr.app import ConfigRecord, RecordDict

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.data.partition import partition_rows
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.aggregation import (
    Aggregation,
    BufferedAggregator,
    MemoryBudgetExceeded,
    StreamingAggregator,
)
from speechbrain_omc.federated.availability import simulated_dropouts
from speechbrain_omc.federated.defence import reference_order
from speechbrain_omc.federated.flower.records import (
    payload_from_record,
    payload_to_record,
)
from speechbrain_omc.federated.flower.strategy import OMCFedAvg
from speechbrain_omc.federated.flower.streaming import StreamingGrid
from speechbrain_omc.federated.server import FedAvgServer
from speechbrain_omc.federated.simulation import run_round

OMC = OMCConfig(format="e3m7", fp32_fraction=0.3, fp32_policy="random", seed=5)
JOB = Path(__file__).parent / "jobs" / "streaming_memory.py"


def _model():
    return small_model(((24, 16), (8, 24)), seed=1, names=("a", "b"))


def _server(n=16, per_round=None, **kwargs):
    clients = [f"c{i:02d}" for i in range(n)]
    # One reference key for all: rounds of more than 8 clients are compared
    # across servers bit for bit.
    settings = dict(
        clients_per_round=per_round or n,
        omc=OMC,
        seed=11,
        max_examples=50,
        reference_key=bytes(32),
    )
    return small_server(_model(), clients, **{**settings, **kwargs})


def _weight(client: str) -> int:
    return 1 + int(client[1:]) * 7 % 41


def _reply(data, client, shift=None):
    shift = 0.01 * (int(client[1:]) + 1) if shift is None else shift
    return honest_reply(data, shift=shift, num_examples=_weight(client))


def _replies(server, round_=None) -> dict[str, bytes]:
    return {c: _reply(m, c) for c, m in server.configure_round(round_).items()}


# -------------------------------------------------- the previous averaging
def _previous_combination(replies):
    """FedAvg as the server computed it before streaming: every reply decoded,
    then sum_i (w_i / W) x_i in sorted order."""
    decoded = [wire.decode(replies[c]) for c in sorted(replies)]
    total = sum(m.meta["num_examples"] for m in decoded)
    out = {}
    for name in decoded[0].entries:
        acc = torch.zeros_like(decoded[0].decompressed()[name])
        for m in decoded:
            acc.add_(m.decompressed()[name], alpha=m.meta["num_examples"] / total)
        out[name] = acc
    return out


def _previous_step(master, momentum, combined, lr, beta, buffers):
    """The previous server step (FedAvgM), on whole models."""
    model, new_momentum = {}, dict(momentum)
    for name, value in master.items():
        if name in buffers or (lr == 1.0 and beta == 0.0):
            model[name] = combined[name]
            continue
        delta = combined[name] - value
        if beta > 0:
            previous = new_momentum.get(name)
            delta = delta if previous is None else previous * beta + delta
            new_momentum[name] = delta
        model[name] = value + lr * delta
    return model, new_momentum


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"omc": None},
        {"server_lr": 0.7, "server_momentum": 0.9},
        {"server_lr": 1.5},
    ],
    ids=["fedavg", "fedavg float32", "fedavgm", "server lr"],
)
def test_streaming_equals_the_previous_average_within_float_tolerance(settings):
    server = _server(n=24, per_round=20, **settings)
    master = {n: v.clone() for n, v in server.model.items()}
    momentum = {}
    for _ in range(3):
        replies = _replies(server)
        combined = _previous_combination(replies)
        master, momentum = _previous_step(
            master,
            momentum,
            combined,
            server.server_lr,
            server.server_momentum,
            server.buffers,
        )
        report = server.aggregate(replies)
        assert report.model_updated and len(report.accepted) == 20
        for name, value in master.items():
            # float32 summation order: a few units in the last place
            assert torch.allclose(server.model[name], value, rtol=1e-5, atol=1e-6)
        master = {n: v.clone() for n, v in server.model.items()}  # no drift
        momentum = {n: v.clone() for n, v in server.momentum.items()}


def test_norm_clip_with_a_fixed_limit_streams_and_matches_combine():
    from speechbrain_omc.federated.aggregation import combine

    aggregation = Aggregation("norm_clip", clip_norm=0.05)
    server = _server(n=8, omc=None, aggregation=aggregation)
    start = {n: v.clone() for n, v in server.model.items()}
    replies = _replies(server)
    decoded = [wire.decode(replies[c]) for c in sorted(replies)]
    expected = combine(
        [m.decompressed() for m in decoded],
        [m.meta["num_examples"] for m in decoded],
        start,
        aggregation,
    )
    server.aggregate(replies)
    for name, value in expected.items():
        assert torch.allclose(server.model[name], value, rtol=1e-5, atol=1e-6)
    moved = torch.sqrt(
        sum(((server.model[n] - start[n]) ** 2).sum() for n in start)
    ).item()
    assert moved <= 0.05 * (1 + 1e-4)  # every update clipped to 0.05


def _fold_order(server, clients, round_=1):
    """The documented fold order: the key's reference clients first."""
    return reference_order(
        server.state.reference_key, round_, clients, server.aggregation.norm_reference
    )


def test_the_fold_order_is_pinned_whatever_the_arrival_order():
    """Bit for bit: any arrival order gives the fold order's fold (12
    clients: the key's 8 reference clients first), which is the pinned
    formula (what a resumed or re-run round must reproduce)."""
    results = []
    for seed in range(4):
        server = _server(n=12, run_id="same-run")
        messages = server.configure_round()
        replies = {c: _reply(m, c) for c, m in messages.items()}
        order = list(replies)
        random.Random(seed).shuffle(order)
        for client in order:
            server.receive(client, replies[client])
        report = server.close_round()
        fold_order = _fold_order(server, replies)
        assert report.accepted == fold_order  # reported in fold order
        results.append(server.model)
    expected = pinned_fold(replies, fold_order)
    for model in results:
        for name, value in expected.items():
            assert torch.equal(model[name], value), name


def test_a_resumed_run_gives_the_same_bits_with_replies_in_another_order(tmp_path):
    reference = _server(n=10, per_round=6, server_momentum=0.5, server_lr=0.8)
    for _ in range(3):
        reference.aggregate(_replies(reference))

    first = _server(n=10, per_round=6, server_momentum=0.5, server_lr=0.8)
    first.run_id = reference.run_id
    first.aggregate(_replies(first))
    first.save(tmp_path / "server.ckpt")
    resumed = _server(n=10, per_round=6, server_momentum=0.5, server_lr=0.8)
    resumed.load(tmp_path / "server.ckpt")
    for _ in range(2):
        resumed.open_round()
        # Arrivals in reverse fold order: every reply but the last waits.
        order = resumed.fold_order()
        replies = {c: _reply(resumed.broadcast(c), c) for c in order}
        for client in reversed(order):
            resumed.receive(client, replies[client])
        resumed.close_round()
    for name, value in reference.model.items():
        assert torch.equal(resumed.model[name], value), name
    for name, value in reference.momentum.items():
        assert torch.equal(resumed.momentum[name], value), name


def test_replies_wait_their_turn_undecoded_and_within_a_bound(monkeypatch, caplog):
    parsed = []
    original = wire.decode

    def counting(data, *args, **kwargs):
        parsed.append(len(data))
        return original(data, *args, **kwargs)

    server = _server(n=6)
    replies = _replies(server)
    order = server.fold_order()
    monkeypatch.setattr(wire, "decode", counting)
    for client in order[1:]:
        server.receive(client, replies[client])
    assert parsed == []  # all wait for the first client, none decoded
    server.receive(order[0], replies[order[0]])
    assert len(parsed) == len(order)  # its arrival releases them all, in order
    server.close_round()

    # Over max_held_bytes, the oldest waiting reply is folded out of order.
    size = max(len(r) for r in replies.values())
    server = _server(n=6, max_held_bytes=2 * size)
    replies = _replies(server)
    order = server.fold_order()
    for client in order[1:]:
        server.receive(client, replies[client])
    report = server.close_round({order[0]: "never came"})
    assert report.accepted == order[1:]
    assert "folding out of order" in caplog.text


def test_a_failed_client_does_not_hold_up_the_fold():
    server = _server(n=5)
    replies = _replies(server)
    first, *rest = server.fold_order()
    for client in rest:
        server.receive(client, replies[client])
    assert server.current.held  # waiting for the first client
    server.fail(first, "crashed")
    assert not server.current.held  # folded as soon as it was known
    report = server.close_round()
    assert report.rejected == {first: "failed: crashed"}
    assert report.accepted == rest


def test_second_replies_and_strangers_are_not_folded():
    server = _server(n=4, per_round=3)
    replies = _replies(server)
    client = server.fold_order()[0]
    server.receive(client, replies[client])
    server.receive(client, replies[client])  # again: ignored, counted
    stranger = next(c for c in server.clients if c not in replies)
    server.receive(stranger, replies[client])
    report = server.close_round()
    assert report.accepted == [client]
    assert report.rejected[stranger].startswith("not sampled")
    assert report.bytes_up == 3 * len(replies[client])


def test_round_protocol_of_the_streaming_calls():
    server = _server(n=4, per_round=2)
    with pytest.raises(RuntimeError, match="no round is open"):
        server.broadcast("c00")
    with pytest.raises(RuntimeError, match="no round is open"):
        server.receive("c00", b"")
    sampled = server.open_round()
    stranger = next(c for c in server.clients if c not in sampled)
    with pytest.raises(ValueError, match="not sampled"):
        server.broadcast(stranger)
    report = server.close_round()
    assert set(report.rejected.values()) == {"no reply"} and not report.model_updated
    assert server.round == 1


# ------------------------------------------------------------- the memory
def _large_model():
    # Entries of several sizes above MAPPED_MIN_BYTES: decoded into the
    # workspace's mappings, not into tensors of the heap.
    gen = torch.Generator().manual_seed(2)
    return {
        "a.weight": torch.randn(256, 256, generator=gen) * 0.1,
        "a.bias": torch.randn(256, generator=gen),
        "b.weight": torch.randn(64, 512, generator=gen) * 0.1,
        "c.weight": torch.randn(300, 100, generator=gen) * 0.1,
        "norm.running_mean": torch.zeros(8),
    }


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"server_lr": 0.7, "server_momentum": 0.9},
        {"aggregation": Aggregation("norm_clip", clip_norm=0.5)},
    ],
    ids=["fedavg", "fedavgm", "norm_clip"],
)
def test_decoding_into_the_workspace_changes_no_bit(settings):
    """Replies decoded into the server's reused buffers fold to the same bits
    as replies decoded into tensors of their own (the path before the
    workspace), round after round; the workspace ends with one buffer of the
    largest entry for the values and one for the codes."""
    clients = [f"c{i:02d}" for i in range(8)]
    servers = [
        FedAvgServer(
            _large_model(),
            clients,
            6,
            omc=OMC,
            seed=3,
            max_examples=50,
            buffers=["norm.running_mean"],
            run_id="run",
            **settings,
        )  # fmt: skip
        for _ in range(2)
    ]
    servers[1]._workspace = None  # each entry in a tensor of its own
    for _ in range(3):
        for server in servers:
            server.open_round()
            for client in server.fold_order():
                server.receive(client, _reply(server.broadcast(client), client))
            assert server.close_round().model_updated
    for name, value in servers[1].model.items():
        assert torch.equal(servers[0].model[name], value), name
    for name, value in servers[1].momentum.items():
        assert torch.equal(servers[0].momentum[name], value), name
    largest = max(v.numel() for v in _large_model().values())
    assert 4 * largest < servers[0]._workspace.nbytes <= 4 * largest + 2 * largest


def _job(n: int, rule: str, *options: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(JOB), str(n), rule, *options],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_server_memory_does_not_grow_with_the_number_of_replies():
    """4 and 64 replies of a 4M-parameter model (16 MiB), each in a fresh
    process: the peak RSS while aggregating rises by the same amount (60 more
    replies held would add 330 MiB, 60 more decoded models 960 MiB).

    Measured from a trimmed heap, the rise is about 24.7 MiB: the running
    sums (one model, 16 MiB), one reply (5.5 MiB) and the workspace the
    entries are decoded into (one buffer of the largest entry, 2 MiB, and
    one of its codes); within issue 13's 1.5x the model plus the largest
    reply (29.6 MiB). Decoded into the heap instead, each entry's
    temporaries landed in other free chunks, whose pages the last trim had
    given back, and the rise was 38 to 40 MiB.

    That is the fold without the update-norm bound. With it (the default)
    the round's first ``norm_reference`` (8) replies wait as bytes until
    their norms are all known: at 64 replies the rise was 68.0 MiB, the same
    plus 8 replies (44 MiB), and it stays so whatever the number of
    replies."""
    # The torch fallback decodes with model-sized temporaries that glibc's heap
    # keeps: at 64 replies its rise measured 20 MiB above the 4-reply one (CI's
    # kernels-off pass, once), and 45 to 60 MiB either way. The property is the
    # native codec's.
    from speechbrain_omc.codec import kernels

    if not kernels.available():
        pytest.skip("server memory is flat with the native codec kernels only")
    streamed = {n: _job(n, "fedavg", "unbounded") for n in (4, 64)}
    rise = {n: r["peak"] - r["before"] for n, r in streamed.items()}
    model, reply = streamed[4]["model_float32"], streamed[4]["largest_reply"]
    bounded = _job(64, "fedavg")
    rise["64, bounded"] = bounded["peak"] - bounded["before"]
    print({n: round(v / 2**20, 2) for n, v in rise.items()}, model, reply)
    assert rise[64] <= rise[4] + 0.75 * model
    assert max(rise[4], rise[64]) <= 1.5 * model + reply
    # The bound holds its 8 reference replies, no more.
    assert rise["64, bounded"] <= rise[64] + 8 * reply + 0.75 * model


@pytest.mark.slow
def test_the_memory_measurement_sees_a_rule_that_buffers():
    """The same measurement with the buffered median: it grows by a model
    per reply (so the flat streaming figures are not the probe's blindness)."""
    buffered = {n: _job(n, "median") for n in (4, 16)}
    grown = (buffered[16]["peak"] - buffered[16]["before"]) - (
        buffered[4]["peak"] - buffered[4]["before"]
    )
    model = buffered[4]["model_float32"]
    assert grown >= 10 * model  # 12 more decoded models, at least


# ------------------------------------------------------------ the budget
def test_rules_that_need_every_update_are_held_to_a_budget():
    model_nbytes = sum(4 * v.numel() for v in _model().values())
    with pytest.raises(MemoryBudgetExceeded, match="10 clients per round"):
        _server(n=10, aggregation="median", memory_budget=9 * model_nbytes)
    with pytest.raises(MemoryBudgetExceeded, match="trimmed_mean"):
        _server(n=10, aggregation="trimmed_mean", memory_budget=9 * model_nbytes)
    with pytest.raises(MemoryBudgetExceeded, match="norm_clip"):
        _server(n=10, aggregation="norm_clip", memory_budget=9 * model_nbytes)
    # At the budget: built and run; streaming rules ignore it.
    server = _server(n=10, aggregation="median", memory_budget=10 * model_nbytes)
    assert server.aggregate(_replies(server)).model_updated
    for aggregation in ("fedavg", Aggregation("norm_clip", clip_norm=1.0)):
        server = _server(n=10, aggregation=aggregation, memory_budget=1)
        assert server.aggregate(_replies(server)).model_updated


def test_the_budget_is_enforced_while_a_round_runs():
    master = {"w": torch.zeros(4)}
    agg = BufferedAggregator(master, Aggregation("median"), budget=32)
    agg.add([("w", torch.ones(4))], 1)
    agg.add([("w", torch.ones(4))], 1)
    consumed = []

    def tensors():
        consumed.append(True)
        yield "w", torch.ones(4)

    with pytest.raises(MemoryBudgetExceeded):
        agg.add(tensors(), 1)
    assert not consumed  # refused before anything was decoded
    with pytest.raises(ValueError, match="does not stream"):
        StreamingAggregator(master, Aggregation("median"))


# ---------------------------------------------------------------- runners
def _train(client, data):
    return _reply(data, client)


def test_the_embedded_round_streams_with_seeded_dropouts():
    server = _server(n=40, per_round=30)
    report = run_round(server, _train, dropout=0.2)
    dropped = simulated_dropouts(report.sampled, 0.2, server.seed, 1)
    assert len(dropped) == 6
    assert set(report.rejected) == dropped
    assert all(r.startswith("failed: dropped out") for r in report.rejected.values())
    order = _fold_order(server, report.sampled)
    assert report.accepted == [c for c in order if c not in dropped]
    # No message for a dropped client: bytes down are the others' only.
    other = _server(n=40, per_round=30, run_id=server.run_id)
    other.open_round()
    assert report.bytes_down == sum(len(other.broadcast(c)) for c in report.accepted)
    # Another round draws other dropouts; the run goes on.
    again = run_round(server, _train, dropout=0.2)
    assert set(again.rejected) != dropped and again.model_updated


def _strategy_round(server, window, reverse, dropout=0.0):
    nodes = {c: 100 + i for i, c in enumerate(server.clients)}

    def handler(node, message):
        client = message.content["config"]["client-id"]
        reply = _reply(bytes(payload_from_record(message.content)), client)
        return RecordDict({"arrays": payload_to_record(reply)})

    grid = FakeGrid(
        nodes.values(), handler, reply_order=(lambda r: r[::-1]) if reverse else None
    )
    strategy = OMCFedAvg(server, nodes, evaluate_nodes=0, dropout=dropout)
    stream = StreamingGrid(grid, window=window, poll_interval=0.0)
    messages = strategy.configure_train(1, None, ConfigRecord(), stream)
    assert not isinstance(messages, list)  # built lazily, as they go
    strategy.aggregate_train(1, stream.send_and_receive(messages, timeout=60))
    return strategy.reports[-1], grid


@pytest.mark.parametrize("window", [1, 3, 0])
def test_flower_streams_within_its_window_and_equals_the_embedded_round(
    window, task_identity
):
    embedded = _server(n=20, per_round=12, run_id="run")
    want = run_round(embedded, _train, dropout=0.25)
    flower = _server(n=20, per_round=12, run_id="run")
    got, grid = _strategy_round(flower, window, reverse=True, dropout=0.25)
    assert grid.most_open <= (window or 12)
    assert got.accepted == want.accepted and got.rejected == want.rejected
    assert got.bytes_down == want.bytes_down and got.bytes_up == want.bytes_up
    for name, value in embedded.model.items():
        assert torch.equal(flower.model[name], value), name


def test_flower_with_a_plain_grid_still_folds_one_reply_at_a_time(task_identity):
    server = _server(n=6, omc=None)
    nodes = {c: 100 + i for i, c in enumerate(server.clients)}
    strategy = OMCFedAvg(server, nodes, evaluate_nodes=0)
    messages = strategy.configure_train(1, None, ConfigRecord(), grid=None)
    assert isinstance(messages, list) and len(messages) == 6


def test_a_stream_ends_at_the_round_timeout(task_identity):
    server = _server(n=6, omc=None)
    nodes = {c: 100 + i for i, c in enumerate(server.clients)}
    first, second, third = sorted(server.sample_clients(1))[:3]  # fold order
    silent = {nodes[first], nodes[third]}

    def handler(node, message):
        if node in silent:
            return None  # never answers
        client = message.content["config"]["client-id"]
        reply = _reply(bytes(payload_from_record(message.content)), client)
        return RecordDict({"arrays": payload_to_record(reply)})

    grid = FakeGrid(nodes.values(), handler)
    strategy = OMCFedAvg(server, nodes, evaluate_nodes=0)
    stream = StreamingGrid(grid, window=2, poll_interval=0.01)
    messages = strategy.configure_train(1, None, ConfigRecord(), stream)
    # The timeout leaves room for a busy machine to fold the one reply and push
    # the third message before it (the deadline is checked after each pull).
    strategy.aggregate_train(1, stream.send_and_receive(messages, timeout=2.0))
    report = strategy.reports[-1]
    # Two silent nodes fill the window: the three others were never sent
    # (no bytes down for them), and the round closed at the timeout with
    # the one reply that came.
    assert len(grid.sent) == 3
    assert report.bytes_down == sum(
        len(payload_from_record(m.content)) for m in grid.sent
    )
    assert report.rejected[first] == report.rejected[third] == "no reply"
    assert report.accepted == [second] and report.model_updated


# ------------------------------------------------------- many small clients
def test_a_thousand_utterance_clients_from_480_utterances():
    rows = [
        {"ID": f"{s}-{s}0-{k:04d}", "duration": "1.5"}
        for s in range(100, 124)
        for k in range(20)
    ]
    clients = partition_rows(rows, mode="utterance", num_clients=1000, seed=3)
    assert len(clients) == 1000 and {len(c.rows) for c in clients} == {1}
    uses = {}
    for client in clients:
        uses[client.rows[0]["ID"]] = uses.get(client.rows[0]["ID"], 0) + 1
    assert len(uses) == 480 and set(uses.values()) == {2, 3}
    again = partition_rows(rows, mode="utterance", num_clients=1000, seed=3)
    assert [c.rows for c in again] == [c.rows for c in clients]
    with pytest.raises(ValueError, match="min_utterances=1"):
        partition_rows(rows, mode="utterance", num_clients=10, min_utterances=2)
    first = partition_rows(rows, mode="utterance", seed=3)
    assert len({c.rows[0]["ID"] for c in first}) == 480  # no reuse


def test_compressed_replies_wait_as_bytes_not_tensors():
    """A waiting reply is the caller's bytes (no copy, nothing decoded)."""
    server = _server(n=3)
    replies = _replies(server)
    first, second, third = server.fold_order()
    view = memoryview(replies[third])
    server.receive(third, view)
    assert server.current.held[third] is view
    for client in (first, second):
        server.receive(client, replies[client])
    assert not server.current.held
    server.close_round()


def test_every_streaming_rule_combination(task_identity):
    """fedavg / norm_clip(limit) x momentum: Flower, embedded and a shuffled
    arrival order give the same bits."""
    for aggregation, momentum in itertools.product(
        ["fedavg", Aggregation("norm_clip", clip_norm=0.02)], [0.0, 0.6]
    ):
        a = _server(n=9, aggregation=aggregation, server_momentum=momentum, run_id="r")
        b = _server(n=9, aggregation=aggregation, server_momentum=momentum, run_id="r")
        for _ in range(2):
            run_round(a, _train)
            _strategy_round(b, window=2, reverse=True)
        for name, value in a.model.items():
            assert torch.equal(b.model[name], value), (aggregation, momentum, name)


def test_compressed_entries_are_decoded_one_at_a_time(monkeypatch):
    """While a reply is checked and folded, at most one of its entries is
    decompressed and alive at a time."""
    alive, most = [0], [0]
    original = CompressedTensor.decompress

    class Counted(torch.Tensor):
        def __del__(self):
            alive[0] -= 1

    def decompress(self, *args, **kwargs):
        value = original(self, *args, **kwargs).as_subclass(Counted)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        return value

    server = _server(n=4, omc=OMCConfig(format="e3m7"))
    replies = _replies(server)
    monkeypatch.setattr(CompressedTensor, "decompress", decompress)
    for client in server.fold_order():
        server.receive(client, replies[client])
    monkeypatch.undo()
    server.close_round()
    assert most[0] == 1
