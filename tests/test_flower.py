"""Flower app pieces without a Flower runtime: records, strategy, query handler.

The strategy runs against a fake grid that answers each message in-process,
so the whole ``Strategy.start`` loop (query, train, aggregate, evaluate) is
exercised in a second; the real engines are in test_flower_deployment.py,
hostile nodes in test_hostile_clients.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flower_harness import FakeGrid, app_handler, app_run_config, honest_reply
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.flower import client_app
from speechbrain_omc.federated.flower.records import (
    PAYLOAD_KEY,
    payload_from_record,
    payload_to_record,
)
from speechbrain_omc.federated.flower.strategy import (
    CLIENT_ID_KEY,
    QUERY_KEY,
    OMCFedAvg,
    discover_clients,
)
from speechbrain_omc.federated.flower.streaming import StreamingGrid
from speechbrain_omc.federated.server import FedAvgServer

OMC = OMCConfig(format="e3m7", fp32_fraction=0.3, fp32_policy="random", seed=5)
CLIENTS = ["client_000", "client_001", "client_002"]
NODES = {"client_000": 101, "client_001": 102, "client_002": 103}


def _model():
    gen = torch.Generator().manual_seed(0)
    return {
        "lin1.weight": torch.randn(16, 8, generator=gen),
        "lin1.bias": torch.randn(16, generator=gen),
        "lin2.weight": torch.randn(4, 16, generator=gen),
    }


def _server(**kwargs):
    settings = dict(clients_per_round=2, omc=OMC, seed=11, max_examples=10)
    settings.update(kwargs)
    return FedAvgServer(_model(), CLIENTS, **settings)


def _client_of(node):
    return {n: c for c, n in NODES.items()}[node]


def make_handler(bad=None):
    """Nodes answer queries, train honestly (shift = node index) and evaluate."""
    bad = bad or {}

    def handler(node, message):
        client = _client_of(node)
        kind = message.metadata.message_type
        if kind == MessageType.QUERY:
            return RecordDict({QUERY_KEY: ConfigRecord({CLIENT_ID_KEY: client})})
        data = payload_from_record(message.content)
        if kind == MessageType.EVALUATE:
            k = node - 100
            metrics = {"num-examples": 10 * k, "loss": float(k), "WER": 10.0 * k}
            return RecordDict({"metrics": MetricRecord({**metrics, "CER": 5.0 * k})})
        if client in bad:
            return bad[client](data)
        reply = honest_reply(data, shift=float(node - 100), num_examples=node - 100)
        return RecordDict({"arrays": payload_to_record(reply)})

    return handler


# ------------------------------------------------------------------ records
def test_payload_round_trip_is_exact_and_uint8():
    data = bytes(range(256)) * 3
    record = payload_to_record(data)
    assert record[PAYLOAD_KEY].dtype == "uint8"
    assert record[PAYLOAD_KEY].shape == (len(data),)
    view = payload_from_record(RecordDict({"arrays": record}))
    assert bytes(view) == data
    # A view into Flower's buffer, not a copy of a possibly huge reply.
    assert view.obj is record[PAYLOAD_KEY].data


@pytest.mark.parametrize(
    "record",
    [
        ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
        ArrayRecord({PAYLOAD_KEY: Array(np.zeros(3, np.float32))}),
        ArrayRecord({PAYLOAD_KEY: Array(np.zeros((2, 2), np.uint8))}),
        ArrayRecord(
            {
                PAYLOAD_KEY: Array(np.zeros(2, np.uint8)),
                "extra": Array(np.zeros(2, np.uint8)),
            }
        ),
        # Metadata that lies about the data, and data that is not .npy.
        ArrayRecord({PAYLOAD_KEY: Array("uint8", (5,), "numpy.ndarray", b"\0" * 99)}),
        ArrayRecord({PAYLOAD_KEY: Array("uint8", (3,), "torch.Tensor", b"abc")}),
        ArrayRecord(
            {
                PAYLOAD_KEY: Array(
                    "uint8",
                    (4,),
                    "numpy.ndarray",
                    payload_to_record(b"abc")[PAYLOAD_KEY].data,
                )
            }
        ),
    ],
)
def test_payload_from_record_rejects_other_records(record):
    with pytest.raises(ValueError):
        payload_from_record(record)
    with pytest.raises(ValueError):
        payload_from_record(RecordDict({"arrays": record}))


# ----------------------------------------------------------------- strategy
def test_discover_clients_maps_nodes(task_identity):
    grid = FakeGrid(NODES.values(), make_handler())
    assert discover_clients(grid, min_nodes=3, timeout=5) == NODES
    assert {m.metadata.message_type for m in grid.sent} == {MessageType.QUERY}


def test_discover_clients_accepts_only_the_listed_clients(task_identity):
    """A resumed run: a node naming a client of no partition is ignored."""
    claims = {101: "client_000", 102: "admin", 103: "client_002"}
    grid = FakeGrid(claims, app_handler(claims))
    node_of = discover_clients(grid, 3, timeout=5, clients=CLIENTS)
    assert node_of == {"client_000": 101, "client_002": 103}


def test_discover_clients_times_out_without_nodes(task_identity):
    grid = FakeGrid([101], make_handler())
    with pytest.raises(TimeoutError):
        discover_clients(grid, min_nodes=2, timeout=0.1)


def test_strategy_matches_the_embedded_server_exactly(task_identity):
    """Flower carries the bytes: same sampling, bytes and model as FedAvgServer."""
    rounds = 3
    flower_server = _server()
    grid = FakeGrid(NODES.values(), make_handler())
    strategy = OMCFedAvg(flower_server, NODES, num_rounds=rounds, evaluate_every=2)
    result = strategy.start(
        grid=grid,
        initial_arrays=payload_to_record(flower_server.message_for("eval")),
        num_rounds=rounds,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord({"split": "valid"}),
    )

    # The embedded loop over the same server code, clients answering alike
    # (same run id: the bytes are then equal to the byte).
    embedded = _server(run_id=flower_server.run_id)
    reports = []
    for _ in range(rounds):
        messages = embedded.configure_round()
        replies = {
            c: honest_reply(m, float(NODES[c] - 100), NODES[c] - 100)
            for c, m in messages.items()
        }
        reports.append(embedded.aggregate(replies))

    timing = ("seconds", "rss")  # the server's own clock differs, nothing else
    for got, want in zip(strategy.reports, reports):
        got, want = got.to_dict(), want.to_dict()
        assert {k: v for k, v in got.items() if k not in timing} == {
            k: v for k, v in want.items() if k not in timing
        }
    for name, value in embedded.model.items():
        assert torch.equal(flower_server.model[name], value)
    # Flower's result holds the final model as the evaluating nodes get it.
    final = wire.decode(payload_from_record(result.arrays))
    assert final.meta["round"] == rounds + 1 and final.meta["client"] == "eval"
    # Train messages go to the sampled clients' nodes, as uint8 payloads.
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(train) == 2 * rounds
    for message in train:
        client = message.content["config"]["client-id"]
        assert message.metadata.dst_node_id == NODES[client]
        assert message.content["arrays"][PAYLOAD_KEY].dtype == "uint8"
    # Evaluation after rounds 2 and 3 (the last) only, on one node, which
    # got the compressed model of the round.
    assert sorted(strategy.evaluations) == [2, 3]
    evaluate = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(evaluate) == 2
    for message, round_ in zip(evaluate, (2, 3)):
        meta = wire.decode(payload_from_record(message.content)).meta
        assert meta["round"] == round_ + 1 and meta["client"] == "eval"
    node = evaluate[-1].metadata.dst_node_id - 100
    assert strategy.evaluations[3] == {
        "loss": node,
        "WER": 10.0 * node,
        "CER": 5.0 * node,
    }


def test_bad_replies_are_left_out_and_the_run_goes_on(task_identity):
    """An error reply, a non-OMC record and a NaN update: logged, not averaged."""

    def nan_update(data):
        # Formats kept, NaN in the float32 entries (the biases).
        received = wire.decode(data)
        entries = {
            n: v if isinstance(v, CompressedTensor) else v * float("nan")
            for n, v in received.entries.items()
        }
        meta = {k: received.meta[k] for k in ("round", "client", "run", "nonce")}
        meta.update(type="update", num_examples=3)
        return RecordDict({"arrays": payload_to_record(wire.encode(entries, meta))})

    def float_arrays(data):
        return RecordDict(
            {"arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))})}
        )

    server = _server(clients_per_round=3)
    before = {n: v.clone() for n, v in server.model.items()}
    handler = make_handler({"client_000": nan_update, "client_001": float_arrays})
    grid = FakeGrid(NODES.values(), handler)
    strategy = OMCFedAvg(server, NODES, num_rounds=1, evaluate_nodes=0)
    strategy.start(grid, payload_to_record(server.message_for("eval")), num_rounds=1)
    report = strategy.reports[0]
    assert report.accepted == ["client_002"]
    assert "non-finite" in report.rejected["client_000"]
    assert "not an OMC reply" in report.rejected["client_001"]
    assert not torch.equal(server.model["lin1.bias"], before["lin1.bias"])
    assert all(torch.isfinite(v).all() for v in server.model.values())


def test_error_and_missing_nodes_are_left_out(task_identity):
    """A node that raises (error reply) and a client without a node."""

    server = _server(clients_per_round=3)
    nodes = {"client_000": 101, "client_002": 103}  # client_001 has no node

    class ErrorGrid(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for message in messages:
                if message.metadata.dst_node_id == 101:
                    replies.append(
                        Message(Error(code=0, reason="boom"), reply_to=message)
                    )
                else:
                    content = self.handler(message.metadata.dst_node_id, message)
                    replies.append(Message(content=content, reply_to=message))
            return replies

    grid = ErrorGrid(nodes.values(), make_handler())
    strategy = OMCFedAvg(server, nodes, num_rounds=1, evaluate_nodes=0)
    strategy.start(grid, payload_to_record(server.message_for("eval")), num_rounds=1)
    report = strategy.reports[0]
    assert report.accepted == ["client_002"]
    assert "boom" in report.rejected["client_000"]
    assert "no SuperNode" in report.rejected["client_001"]


# ---------------------------------------------------------------- client app
def test_query_handler_names_the_node_client(task_identity):
    query = Message(
        content=RecordDict({QUERY_KEY: ConfigRecord({"want": CLIENT_ID_KEY})}),
        message_type=MessageType.QUERY,
        dst_node_id=5,
    )
    context = Context(
        run_id=7,
        node_id=5,
        node_config={"partition-id": 3, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )
    reply = client_app.query(query, context)
    assert reply.content[QUERY_KEY][CLIENT_ID_KEY] == "client_003"


def test_a_node_that_does_not_answer_is_left_out(task_identity):
    """A reply that does not come within the round's timeout: the round goes on."""
    server = _server(clients_per_round=3)
    handler = make_handler()

    def silent_001(node, message):
        if message.metadata.message_type == MessageType.TRAIN and node == 102:
            return None  # never answers (Grid.send_and_receive timed out)
        return handler(node, message)

    strategy = OMCFedAvg(server, NODES, num_rounds=2, evaluate_nodes=0)
    grid = FakeGrid(NODES.values(), silent_001)
    strategy.start(grid, payload_to_record(server.message_for("eval")), num_rounds=2)
    assert [r.rejected for r in strategy.reports] == [{"client_001": "no reply"}] * 2
    assert all(r.model_updated for r in strategy.reports)


# ------------------------------------------------------------- server app
@pytest.fixture
def server_app():
    from speechbrain_omc.federated.flower import server_app

    return server_app


NODES_OF = {201: "client_000", 202: "client_001", 203: "client_002"}


def test_server_app_plans_equal_the_models_plans(tmp_path):
    """The app's server has shapes only; with the task's roles its plans are
    the model's own: normalisation weights and position biases stay float32."""
    from speechbrain_omc import make_plan
    from speechbrain_omc.federated.flower.task import initial_model, load_task

    model, buffers, hparams, roles = initial_model(app_run_config(tmp_path))
    assert "normalisation" in roles.values() and "position bias" in roles.values()
    assert set(roles) == set(model) - set(buffers)
    server = load_task(None).build_server(
        hparams, model, ["a", "b"], buffers, 10, roles=roles
    )
    modules = torch.nn.ModuleDict(hparams["modules"])
    for round in (1, 2):
        for client in ("a", "b"):
            plan = make_plan(modules, hparams["omc"], round=round, client=client)
            formats = server.formats(round, client)
            assert formats == {
                **dict.fromkeys(buffers, "float32"),
                **{e.name: e.format or "float32" for e in plan.entries},
            }
            for name, role in roles.items():
                if role in ("normalisation", "position bias"):
                    assert formats[name] == "float32", name


class CrashingGrid(FakeGrid):
    """Dies (as the SuperLink would) when round ``crash_round`` sends ``kind``."""

    def __init__(self, nodes, handler, crash_round, kind=MessageType.TRAIN):
        super().__init__(nodes, handler)
        self.crash_round, self.kind = crash_round, kind

    def _check(self, messages):
        for message in messages:
            if message.metadata.message_type == self.kind:
                config = message.content["config"]
                if config.get("server-round") == self.crash_round:
                    raise ConnectionError("the SuperLink went away")

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self._check(messages)
        return super().send_and_receive(messages, timeout=timeout)

    def push_messages(self, messages):
        messages = list(messages)
        self._check(messages)
        return super().push_messages(messages)


def test_server_app_resumes_where_it_stopped(tmp_path, server_app, task_identity):
    """The ServerApp killed in round 3, started again: the uninterrupted model."""
    handler = app_handler(NODES_OF)
    straight = server_app.run_server(
        FakeGrid(NODES_OF, handler), app_run_config(tmp_path / "straight")
    )
    resumed_config = app_run_config(tmp_path / "resumed")
    with pytest.raises(ConnectionError):
        server_app.run_server(CrashingGrid(NODES_OF, handler, 3), resumed_config)
    result = tmp_path / "resumed" / "result"
    assert not (result / "final_model.pt").exists()
    resumed = server_app.run_server(FakeGrid(NODES_OF, handler), resumed_config)

    a = torch.load(tmp_path / "straight" / "result" / "final_model.pt")
    b = torch.load(result / "final_model.pt")
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    history = __import__("json").loads((result / "flower_history.json").read_text())
    assert [h["round"] for h in history] == [1, 2, 3]
    assert [h["evaluation"] is not None for h in history] == [False, True, True]
    for key in ("bytes_down", "bytes_up", "rounds", "test_WER", "valid_WER"):
        assert straight[key] == resumed[key], key
    # A run config with other settings is refused, naming them.
    other = app_run_config(tmp_path / "resumed", **{"max-examples-per-client": 7})
    with pytest.raises(ValueError, match="max_examples.client_000: checkpoint 1000"):
        server_app.run_server(FakeGrid(NODES_OF, handler), other)
    # ... unless told to start fresh.
    fresh = {**other, "fresh-start": True}
    assert server_app.run_server(FakeGrid(NODES_OF, handler), fresh)["rounds"] == 3
    assert (result / "server.ckpt.discarded").is_file()


def _checkpoint_round(result) -> int:
    state = torch.load(result / "server.ckpt", weights_only=True)
    return state["server"]["round"]


def test_a_round_is_saved_before_its_evaluation(tmp_path, server_app, task_identity):
    """The SuperLink dies while round 2 (an evaluating round) evaluates: its
    training is in the checkpoint already, and the resumed run goes on from
    round 3 with the uninterrupted run's final model."""
    handler = app_handler(NODES_OF)
    straight = server_app.run_server(
        FakeGrid(NODES_OF, handler), app_run_config(tmp_path / "straight")
    )
    config = app_run_config(tmp_path / "resumed")
    grid = CrashingGrid(NODES_OF, handler, 2, kind=MessageType.EVALUATE)
    with pytest.raises(ConnectionError):
        server_app.run_server(grid, config)
    result = tmp_path / "resumed" / "result"
    assert _checkpoint_round(result) == 2
    resumed = server_app.run_server(FakeGrid(NODES_OF, handler), config)
    a = torch.load(tmp_path / "straight" / "result" / "final_model.pt")
    b = torch.load(result / "final_model.pt")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed["bytes_up"] == straight["bytes_up"]
    history = __import__("json").loads((result / "flower_history.json").read_text())
    # Round 2's evaluation never came back; round 3's did, once.
    assert [h["round"] for h in history] == [1, 2, 3]
    assert [h["evaluation"] is not None for h in history] == [False, False, True]


def test_a_resumed_run_keeps_the_clients_of_its_checkpoint(
    tmp_path, server_app, task_identity
):
    """Resumed with one node gone and a new one claiming a new client id: the
    run goes on with the checkpoint's clients (no settings mismatch), the
    newcomer is never sent a model, the missing client is left out."""
    config = app_run_config(tmp_path)
    handler = app_handler(NODES_OF)
    with pytest.raises(ConnectionError):
        server_app.run_server(CrashingGrid(NODES_OF, handler, 2), config)
    changed = {201: "client_000", 202: "client_001", 204: "client_999"}
    grid = FakeGrid(changed, app_handler(changed))
    summary = server_app.run_server(grid, config)
    assert summary["rounds"] == 3
    assert summary["clients"] == ["client_000", "client_001", "client_002"]
    to_newcomer = {
        m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == 204
    }
    assert to_newcomer == {MessageType.QUERY}
    history = __import__("json").loads(
        (tmp_path / "result" / "flower_history.json").read_text()
    )
    resumed = [h for h in history if h["round"] >= 2]
    assert resumed and all(h["accepted"] for h in resumed)
    for h in resumed:
        if "client_002" in h["sampled"]:
            assert h["rejected"]["client_002"].startswith("failed: no SuperNode")


@pytest.mark.parametrize("max_eval, evaluated", [(4, True), (3, False)])
def test_the_run_config_reaches_the_grid_and_the_checks(
    tmp_path, server_app, task_identity, max_eval, evaluated, monkeypatch
):
    """``round-timeout`` is every call's timeout; ``max-eval-examples`` bounds
    the evaluation replies (the nodes claim 4 examples)."""
    config = app_run_config(
        tmp_path,
        **{"num-server-rounds": 2, "round-timeout": 7, "max-eval-examples": max_eval},
    )
    grid = FakeGrid(NODES_OF, app_handler(NODES_OF))
    original = StreamingGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        # Train and evaluate go through the app's StreamingGrid: record them
        # as the fake grid records its own calls.
        messages = list(messages)
        grid.calls.append(([m.metadata.message_type for m in messages], timeout))
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(StreamingGrid, "send_and_receive", recording)
    summary = server_app.run_server(grid, config)
    sends = [(set(kinds), timeout) for kinds, timeout in grid.calls if kinds]
    assert {MessageType.TRAIN, MessageType.EVALUATE} <= set().union(
        *(k for k, _ in sends)
    )
    for kinds, timeout in sends:
        if kinds == {MessageType.QUERY}:  # what is left of the timeout
            assert 0 < timeout <= 7
        else:
            assert timeout == 7, kinds
    assert (summary["valid_WER"] is not None) is evaluated
    assert (summary["test_WER"] == 20.0) is evaluated


# ------------------------------------------------------- hostile app runs
def _surrogate_round(data: bytes) -> RecordDict:
    """An honest reply whose ``round`` is a lone surrogate (JSON ``"\\udcff"``)."""

    reply = wire.decode(honest_reply(data, shift=0.02, num_examples=5))
    return RecordDict(
        {
            "arrays": payload_to_record(
                wire.encode(reply.entries, {**reply.meta, "round": "\udcff"})
            )
        }
    )


def _poisoned(data: bytes) -> RecordDict:
    """FLT_MAX in every value, in the form received."""
    sent = wire.decode(data)
    big = torch.finfo(torch.float32).max
    entries = {}
    for name, value in sent.entries.items():
        if isinstance(value, CompressedTensor):
            entries[name] = CompressedTensor.compress(
                torch.full(tuple(value.shape), big), value.format
            )
        else:
            entries[name] = torch.full_like(value, big)
    meta = {k: sent.meta[k] for k in ("round", "client", "run", "nonce")}
    meta.update(type="update", num_examples=5)
    return RecordDict({"arrays": payload_to_record(wire.encode(entries, meta))})


def _app_with(replies):
    """The app's nodes; ``replies[node](data)`` answers its train messages."""
    honest = app_handler(NODES_OF)

    def handler(node, message):
        if message.metadata.message_type == MessageType.TRAIN and node in replies:
            return replies[node](payload_from_record(message.content))
        return honest(node, message)

    return handler


def _error(data):
    return Error(code=0, reason="left out")


def test_a_surrogate_and_a_poisoned_reply_leave_the_honest_run(
    tmp_path, server_app, task_identity
):
    """One node answers with a lone surrogate as ``round``, another with
    FLT_MAX everywhere, every round: the ServerApp finishes, writes
    rounds.csv (ASCII, the reason escaped) and final_model.pt, and the model
    is the one the honest node alone makes (the hostile nodes as failed)."""
    hostile = {202: _surrogate_round, 203: _poisoned}
    summary = server_app.run_server(
        FakeGrid(NODES_OF, _app_with(hostile)), app_run_config(tmp_path / "hostile")
    )
    assert summary["rounds"] == 3
    result = tmp_path / "hostile" / "result"
    text = (result / "rounds.csv").read_text(encoding="ascii")
    assert "update for round '\\udcff'" in text
    history = json.loads((result / "flower_history.json").read_text())
    rejected = {c: r for h in history for c, r in h["rejected"].items()}
    # Refused by the range check (a float32 entry or a transform, whichever
    # comes first on the wire).
    assert "reach" in rejected["client_002"], rejected
    silent = {202: _error, 203: _error}
    server_app.run_server(
        FakeGrid(NODES_OF, _app_with(silent)), app_run_config(tmp_path / "silent")
    )
    a = torch.load(result / "final_model.pt")
    b = torch.load(tmp_path / "silent" / "result" / "final_model.pt")
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_a_checkpoint_with_raw_client_text_resumes(tmp_path, server_app, task_identity):
    """Rows an older version saved with a client's raw text (a lone
    surrogate, an ANSI escape): the resumed run writes them escaped and
    finishes."""
    from speechbrain_omc.federated.checkpoint import CheckpointStore

    config = app_run_config(tmp_path)
    handler = app_handler(NODES_OF)
    with pytest.raises(ConnectionError):
        server_app.run_server(CrashingGrid(NODES_OF, handler, 2), config)
    store = CheckpointStore(tmp_path / "result" / "server.ckpt")
    state = torch.load(store.path, weights_only=True)
    state["extra"]["rows"][0]["rejected"] = "client_001: round \udcff \x1b[31m"
    state["extra"]["history"][0]["rejected"] = {"client_001": "round \udcff"}
    store.save(state)
    assert server_app.run_server(FakeGrid(NODES_OF, handler), config)["rounds"] == 3
    text = (tmp_path / "result" / "rounds.csv").read_text(encoding="ascii")
    assert "round \\udcff \\x1b[31m" in text


def test_a_second_server_app_on_one_folder_is_refused(
    tmp_path, server_app, task_identity
):
    """Before it discards or reads anything (here with fresh-start)."""
    from speechbrain_omc.federated.checkpoint import CheckpointLocked, CheckpointStore

    config = app_run_config(tmp_path, **{"num-server-rounds": 1})
    server_app.run_server(FakeGrid(NODES_OF, app_handler(NODES_OF)), config)
    result = tmp_path / "result"
    with CheckpointStore(result / "server.ckpt"):
        with pytest.raises(CheckpointLocked, match="another server"):
            server_app.run_server(
                FakeGrid(NODES_OF, app_handler(NODES_OF)),
                {**config, "fresh-start": True},
            )
    assert (result / "server.ckpt").is_file()
    assert not (result / "server.ckpt.discarded").exists()
