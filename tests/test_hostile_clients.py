"""A client that tries to crash or take over the server, and fails.

Every row of issue 11's table, against the embedded server
(:class:`FedAvgServer`) and through the Flower strategy (:class:`OMCFedAvg`
over a fake grid): the round completes, the hostile reply is left out with
its reason, the model stays finite and is the combination of the honest
replies (or moves by no more than the hostile client's bounded weight).
Flower's evaluation replies and the ServerApp's final test are the Flower
rows; the checkpoint rows are in test_server_checkpoint.py.
"""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from federated_fixtures import (
    pinned_fold,
    reply_meta,
    shifted,
)
from federated_fixtures import small_server as _server
from flower_harness import FakeGrid, app_handler, app_run_config
from flwr.app import (
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.transform import Transform
from speechbrain_omc.federated import round as round_module
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.aggregation import Aggregation
from speechbrain_omc.federated.flower.records import (
    payload_from_record,
    payload_to_record,
)
from speechbrain_omc.federated.flower.strategy import OMCFedAvg
from speechbrain_omc.federated.server import UpdateRejected

BOUND = 10  # every client's max_examples (its partition size)
METRICS = {"train_loss": 1.0, "steps": 3}
JOB = Path(__file__).parent / "jobs" / "reject_large_reply.py"


def _meta(received: wire.Message, num_examples=BOUND, **overrides) -> dict:
    return reply_meta(received, num_examples, **{"metrics": dict(METRICS), **overrides})


def honest_reply(data: bytes, shift: float = 1.0, **overrides) -> bytes:
    """Every value + shift, in the form received, bound to the broadcast."""
    received = wire.decode(data)
    return wire.encode(shifted(received, shift), _meta(received, **overrides))


def raw_message(entries: list[tuple[str, int, bytes]], meta: bytes) -> bytes:
    """A wire message with any entries and metadata bytes (what an attacker
    writes: :func:`wire.encode` refuses what the server must survive)."""
    body = struct.pack("<I", len(meta)) + meta + struct.pack("<I", len(entries))
    for name, kind, payload in entries:
        raw = name.encode()
        body += (
            struct.pack("<H", len(raw)) + raw + struct.pack("<BQ", kind, len(payload))
        )
        body += payload
    total = 14 + len(body) + 4
    head = struct.pack("<4sHQ", b"OMCW", wire.WIRE_VERSION, total) + body
    return head + struct.pack("<I", zlib.crc32(head))


def _raw_entries(received: wire.Message, shift: float = 1.0) -> list:
    out = []
    for name, value in shifted(received, shift).items():
        if isinstance(value, CompressedTensor):
            out.append((name, wire.COMPRESSED, value.to_bytes()))
        else:
            out.append((name, wire.FLOAT32, wire.float32_payload(value)))
    return out


def _with_meta_text(data: bytes, text: str) -> bytes:
    """The honest reply with its metadata replaced by raw JSON text."""
    return raw_message(_raw_entries(wire.decode(data)), text.encode())


def _honest_meta_text(data: bytes, **replace: str) -> str:
    """The honest reply's metadata as JSON, some values swapped for raw text."""
    meta = _meta(wire.decode(data))
    marks = {key: f"@@{key}@@" for key in replace}
    meta.update(marks)
    text = json.dumps(meta, sort_keys=True)
    for key, value in replace.items():
        text = text.replace(json.dumps(marks[key]), value)
    return text


# ------------------------------------------------------------ the hostile rows
def huge_dimension_float32(server, client, data):
    # A float32 entry of shape (2**63, 0): zero elements, one absurd dimension.
    received = wire.decode(data)
    entries = _raw_entries(received)
    name = next(n for n, k, _ in entries if k == wire.FLOAT32)
    payload = struct.pack("<B2Q", 2, 2**63, 0)
    return raw_message(
        [(n, k, payload if n == name else p) for n, k, p in entries],
        json.dumps(_meta(received)).encode(),
    )


def huge_dimension_compressed(server, client, data):
    # A compressed entry of shape (2**63 - 1, 0), written by our own encoder.
    received = wire.decode(data)
    entries = shifted(received, 1.0)
    name = next(n for n, v in entries.items() if isinstance(v, CompressedTensor))
    entries[name] = CompressedTensor(
        torch.empty(0, dtype=torch.uint8),
        "e3m7",
        (2**63 - 1, 0),
        Transform.from_params("scale", (1.0,)),
    )
    return wire.encode(entries, _meta(received))


def oversized_deep_metadata(server, client, data):
    # 100,000 levels (json.loads would raise RecursionError) in 200 KB: the
    # size cap refuses it first; the depth limit is the next row's.
    depth = 100_000
    return _with_meta_text(data, '{"a":' + "[" * depth + "]" * depth + "}")


def deep_metadata_within_size(server, client, data):
    # 30,000 levels in 60 KB: under the size limit, over the depth limit.
    depth = 30_000
    return _with_meta_text(data, '{"a":' + "[" * depth + "]" * depth + "}")


def examples_10e400(server, client, data):
    return _with_meta_text(data, _honest_meta_text(data, num_examples="1" + "0" * 400))


def infinite_number(server, client, data):
    text = _honest_meta_text(data, metrics='{"steps": 3, "train_loss": 1e999}')
    return _with_meta_text(data, text)


def shifted_with_10e15_examples(server, client, data):
    return honest_reply(data, shift=100.0, num_examples=10**15)


def unchanged_with_10e9_examples(server, client, data):
    return honest_reply(data, shift=0.0, num_examples=10**9)


def reply_of_another_run(server, client, data):
    # Same seed, clients and settings: only the run differs.
    other = _server()
    return honest_reply(other.configure_round()[client])


def huge_train_loss(server, client, data):
    text = _honest_meta_text(
        data, metrics='{"steps": 3, "train_loss": 1' + "0" * 400 + "}"
    )
    return _with_meta_text(data, text)


def metrics_not_numbers(server, client, data):
    return honest_reply(data, metrics={"train_loss": [1.0, 2.0]})


def metadata_keys_unknown(server, client, data):
    return honest_reply(data, admin=True)


ROWS = {
    "float32 dimension 2**63, zero elements": (
        huge_dimension_float32,
        r"declares a dimension above 2\*\*40",
    ),
    "compressed dimension 2**63-1, zero elements": (
        huge_dimension_compressed,
        r"has shape \(9223372036854775807, 0\), expected",
    ),
    "metadata of 200 KB (100,000 levels): the size cap": (
        oversized_deep_metadata,
        r"exceeds the (65536-byte limit|\d+ bytes it may have)",
    ),
    "metadata nested 30,000 deep": (deep_metadata_within_size, "nested 30001 deep"),
    "num_examples = 10**400": (examples_10e400, "does not fit in 64 bits"),
    "1e999 in the metadata": (infinite_number, "1e999 is not a finite float"),
    "num_examples = 10**15, shifted model": (
        shifted_with_10e15_examples,
        r"num_examples must be an integer in \[1, 10\], got 1000000000000000",
    ),
    "unchanged model, num_examples = 10**9": (
        unchanged_with_10e9_examples,
        r"num_examples must be an integer in \[1, 10\]",
    ),
    "reply from another run": (reply_of_another_run, "not this run"),
    "train_loss = 10**400": (huge_train_loss, "does not fit in 64 bits"),
    "metrics that are not numbers": (metrics_not_numbers, "list, not a number"),
    "unknown metadata keys": (metadata_keys_unknown, r"unexpected metadata keys"),
}


def _embedded_round(server, make_reply):
    messages = server.configure_round()
    replies = {c: make_reply(server, c, m) for c, m in messages.items()}
    return server.aggregate(replies), replies


def _flower_round(server, make_reply):
    """The same round through OMCFedAvg: replies arrive as Flower messages."""
    nodes = {c: 100 + i for i, c in enumerate(server.clients)}
    strategy = OMCFedAvg(server, nodes, evaluate_nodes=0)
    messages = strategy.configure_train(1, None, ConfigRecord(), grid=None)
    replies, out = {}, []
    for message in messages:
        client = message.content["config"]["client-id"]
        data = bytes(payload_from_record(message.content))
        replies[client] = make_reply(server, client, data)
        content = RecordDict({"arrays": payload_to_record(replies[client])})
        # Flower's own train metrics are never read: they cannot crash it.
        content["metrics"] = MetricRecord({"num-examples": 10**400, "x": [1.0]})
        out.append(Message(content=content, reply_to=message))
    strategy.aggregate_train(1, out)
    return strategy.reports[-1], replies


@pytest.mark.parametrize("channel", ["embedded", "flower"])
@pytest.mark.parametrize("row", list(ROWS))
def test_hostile_reply_is_left_out(row, channel, task_identity, caplog):
    make_bad, reason = ROWS[row]
    server = _server()
    sampled = server.sample_clients(1)
    bad = sampled[0]

    def reply(server, client, data):
        if client == bad:
            return make_bad(server, client, data)
        return honest_reply(data)

    run_round = _embedded_round if channel == "embedded" else _flower_round
    report, replies = run_round(server, reply)
    assert report.accepted == sorted(sampled[1:])
    assert list(report.rejected) == [bad]
    assert re.search(reason, report.rejected[bad]), report.rejected[bad]
    assert report.model_updated
    # The hostile reply moved nothing: the model is the honest replies' average.
    expected = pinned_fold({c: replies[c] for c in sampled[1:]})
    for name, value in expected.items():
        assert torch.equal(server.model[name], value), name
    # The bytes were counted, and the next round runs as usual.
    assert report.bytes_up == sum(len(r) for r in replies.values())
    assert server.round == 1
    messages = server.configure_round()
    assert server.aggregate({c: honest_reply(m) for c, m in messages.items()}).accepted


def test_generic_decode_raises_only_value_error():
    """Without expectations (a client decoding), the same bytes: ValueError."""
    server = _server()
    messages = server.configure_round()
    client, data = next(iter(messages.items()))
    for name, (make_bad, _) in ROWS.items():
        bad = make_bad(server, client, data)
        try:
            wire.decode(bad)
        except ValueError:
            continue
        # Decodable: the row is about meaning (bounds, binding), not syntax.
        assert name in {
            "compressed dimension 2**63-1, zero elements",
            "num_examples = 10**15, shifted model",
            "unchanged model, num_examples = 10**9",
            "reply from another run",
            "metrics that are not numbers",
            "unknown metadata keys",
        }, name


@pytest.mark.parametrize("shift", [100.0, 0.0])
def test_influence_is_bounded_by_the_clients_weight(shift):
    """At its bound, a shifted (or unchanged) model counts as its bounded share
    (without the update-norm bound, which the next test adds)."""
    server = _server(omc=None, aggregation=Aggregation(norm_bound=None))
    messages = server.configure_round()
    bad, *good = list(messages)
    replies = {
        c: honest_reply(messages[c], shift=1.0, num_examples=BOUND) for c in good
    }
    replies[bad] = honest_reply(messages[bad], shift=shift, num_examples=BOUND)
    start = {n: v.clone() for n, v in server.model.items()}
    report = server.aggregate(replies)
    assert sorted(report.accepted) == sorted(messages)
    # Three clients at weight 10 each: the hostile one moves a third.
    moved = server.model["layer1.weight"] - start["layer1.weight"]
    assert torch.allclose(moved, torch.full_like(moved, (2.0 + shift) / 3), atol=1e-5)


@pytest.mark.parametrize("shift, hostile_share", [(100.0, 4.0), (0.0, 0.0)])
def test_the_default_bound_clips_an_update_to_4x_the_upper_median(shift, hostile_share):
    """By default the shifted model's update is scaled to 4x the upper median
    of the round's update norms (here the honest clients'): its third of
    the move is 4, not 100; an unchanged model is not scaled."""
    server = _server(omc=None)
    messages = server.configure_round()
    bad, *good = list(messages)
    replies = {c: honest_reply(messages[c], shift=1.0) for c in good}
    replies[bad] = honest_reply(messages[bad], shift=shift)
    start = {n: v.clone() for n, v in server.model.items()}
    report = server.aggregate(replies)
    assert sorted(report.accepted) == sorted(messages)
    assert list(report.clipped) == ([bad] if shift else [])
    moved = server.model["layer1.weight"] - start["layer1.weight"]
    expected = (2.0 + hostile_share) / 3
    assert torch.allclose(moved, torch.full_like(moved, expected), atol=1e-5)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "norm_clip"])
def test_robust_rules_resist_a_client_at_its_bound(rule):
    aggregation = Aggregation(rule, trim_fraction=0.25)
    server = _server(omc=None, clients_per_round=4, aggregation=aggregation)
    messages = server.configure_round()
    bad, *good = list(messages)
    replies = {c: honest_reply(messages[c], shift=1.0) for c in good}
    replies[bad] = honest_reply(messages[bad], shift=1000.0)
    start = {n: v.clone() for n, v in server.model.items()}
    server.aggregate(replies)
    moved = server.model["layer1.weight"] - start["layer1.weight"]
    # FedAvg would move everything by (3 + 1000) / 4 = 250.75; these move it
    # by the honest shift.
    assert torch.allclose(moved, torch.ones_like(moved), atol=1e-4), rule


def test_replayed_and_relabelled_replies_are_refused():
    server = _server(omc=None)  # same plan every round: only the binding differs
    first = server.configure_round()
    round1 = {c: honest_reply(m) for c, m in first.items()}
    server.aggregate(round1)
    second = server.configure_round()
    replies = {c: honest_reply(m) for c, m in second.items()}
    # A round-1 reply of a client sampled again: replayed as is, and relabelled.
    again = sorted(set(first) & set(second))
    assert len(again) >= 2, "pick a seed that samples two clients twice"
    replayed, relabelled = again[:2]
    replies[replayed] = round1[replayed]
    old = wire.decode(round1[relabelled])
    replies[relabelled] = wire.encode(old.entries, {**old.meta, "round": 2})
    report = server.aggregate(replies)
    assert "update for round 1, expected 2" in report.rejected[replayed]
    assert "wrong nonce" in report.rejected[relabelled]
    assert sorted(report.accepted) == sorted(set(second) - {replayed, relabelled})


def test_each_reply_is_decoded_once(monkeypatch):
    calls = []
    original = wire.decode

    def counting(data, *args, **kwargs):
        calls.append(len(data))
        return original(data, *args, **kwargs)

    server = _server()
    messages = server.configure_round()
    bad, *good = list(messages)
    replies = {c: honest_reply(m) for c, m in messages.items()}
    replies[bad] = honest_reply(messages[bad], num_examples=BOUND + 1)
    monkeypatch.setattr(wire, "decode", counting)
    report = server.aggregate(replies)
    assert list(report.rejected) == [bad]
    assert sorted(calls) == sorted(len(r) for r in replies.values())


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"nonce": "0" * 32}, "wrong nonce"),
        ({"run": "another run"}, "not this run"),
        ({"round": 2}, "update for round 2"),
        ({"num_examples": BOUND + 1}, "num_examples must be"),
        ({"metrics": {"train_loss": 1e30}}, "bad metrics"),
    ],
)
def test_the_binding_is_checked_before_any_payload_is_parsed(
    change, reason, monkeypatch
):
    """A reply bound to another run or round (or claiming too much) is refused
    on its metadata: no payload is parsed, so its size costs no copy."""
    parsed = []
    float32, compressed = wire.parse_float32_payload, CompressedTensor.from_bytes

    def count_float32(payload, *args, **kwargs):
        parsed.append("float32")
        return float32(payload, *args, **kwargs)

    def count_compressed(payload, *args, **kwargs):
        parsed.append("compressed")
        return compressed(payload, *args, **kwargs)

    monkeypatch.setattr(wire, "parse_float32_payload", count_float32)
    monkeypatch.setattr(CompressedTensor, "from_bytes", count_compressed)
    server = _server()
    messages = server.configure_round()
    bad, good = list(messages)[:2]
    parsed.clear()  # honest_reply below decodes the broadcast
    replies = {
        bad: honest_reply(messages[bad], **change),
        good: honest_reply(messages[good]),
    }
    parsed.clear()
    with pytest.raises(UpdateRejected, match=reason):
        server.validate(bad, replies[bad])
    assert parsed == []
    server.validate(good, replies[good])  # the counters do count
    assert sorted(set(parsed)) == ["compressed", "float32"]


def test_validation_failures_never_escape(monkeypatch, caplog):
    """A bug in the validation itself: validate() still raises only
    UpdateRejected and aggregate() leaves the reply out, both with the
    traceback logged."""
    server = _server()
    messages = server.configure_round()
    replies = {c: honest_reply(m) for c, m in messages.items()}

    def broken(data, expected):
        raise RuntimeError("a bug")

    monkeypatch.setattr(round_module, "open_reply", broken)
    client = next(iter(messages))
    with pytest.raises(UpdateRejected, match="internal error while validating"):
        server.validate(client, replies[client])
    report = server.aggregate(replies)
    assert report.accepted == [] and not report.model_updated
    assert set(report.rejected.values()) == {
        "internal error while validating: RuntimeError"
    }
    # One traceback per failure: validate() once, aggregate() for 3 replies.
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 4
    assert all("RuntimeError: a bug" in r.exc_text for r in tracebacks)


def test_norm_clip_bounds_one_client_of_two():
    """The default limit is the lower median of the norms: of two clients the
    honest one's, so the other moves the model no further than it does."""
    server = _server(omc=None, clients_per_round=2, aggregation="norm_clip")
    messages = server.configure_round()
    bad, good = list(messages)
    start = {n: v.clone() for n, v in server.model.items()}
    server.aggregate(
        {
            good: honest_reply(messages[good], shift=1.0),
            bad: honest_reply(messages[bad], shift=1000.0),
        }
    )
    # The hostile update is scaled to the honest one's norm (both shift every
    # value, so it becomes the honest update): the model moves by 1. With the
    # plain median (the mean of the two norms) it would move by about 250.
    for name, value in server.model.items():
        moved = value - start[name]
        assert torch.allclose(moved, torch.ones_like(moved), atol=1e-3), name


def test_a_huge_reply_is_rejected_without_copying_it():
    """256 MiB replies (an extra entry after a 256 MiB model, a small model
    and a 256 MiB extra entry, or a 256 MiB model and a wrong nonce),
    embedded and through Flower: the peak memory of the rejection stays far
    under the reply's size (measured as the rise of the process's peak RSS,
    in a fresh process)."""
    result = subprocess.run(
        [sys.executable, str(JOB)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 6
    for line in result.stdout.splitlines():
        case = json.loads(line)
        print(case)
        assert re.search(case["expected"], case["reason"]), case
        # Under 2x the reply's size in all (the reply itself included)...
        assert case["peak_mib"] - case["before_reply_mib"] < 2 * case["reply_mib"]
        # ... and in fact under a quarter of it above what the reply holds.
        assert case["peak_mib"] - case["with_reply_mib"] < case["reply_mib"] / 4


# -------------------------------------------------- Flower evaluation replies
EVAL_NODES = {"c0": 100, "c1": 101, "c2": 102, "c3": 103}
HOSTILE_NODE = 103
GOOD = {"loss": 2.0, "WER": 40.0, "CER": 10.0}


def _metrics(**change):
    return RecordDict({"metrics": MetricRecord({"num-examples": 8, **GOOD, **change})})


EVALUATION_ROWS = {
    "num-examples a list": (_metrics(**{"num-examples": [8.0, 8.0]}), "num-examples"),
    "negative num-examples": (_metrics(**{"num-examples": -8}), "num-examples"),
    "num-examples 10**400": (_metrics(**{"num-examples": 10**400}), "num-examples"),
    "fractional num-examples": (_metrics(**{"num-examples": 2.5}), "not an integer"),
    "loss 1e30": (_metrics(loss=1e30), "'loss' = 1e\\+30"),
    "WER NaN": (_metrics(WER=float("nan")), "'WER' = nan"),
    "WER negative": (_metrics(WER=-5.0), "'WER' = -5.0"),
    "WER infinite": (_metrics(WER=float("inf")), "'WER' = inf"),
    "no MetricRecord": (RecordDict({}), "expected one MetricRecord, got 0"),
    "two MetricRecords": (
        RecordDict({"a": MetricRecord(GOOD), "b": MetricRecord(GOOD)}),
        "expected one MetricRecord, got 2",
    ),
    "a metric missing": (
        RecordDict({"m": MetricRecord({"num-examples": 8, "loss": 1.0})}),
        "expected \\['CER', 'WER', 'loss', 'num-examples'\\]",
    ),
    "an extra metric": (_metrics(admin=1.0), "expected"),
    "NaN WER under another record name": (
        RecordDict({"x": MetricRecord({"num-examples": 8, **GOOD, "WER": math.nan})}),
        "'WER' = nan",
    ),
    "two MetricRecords, one of them bad": (
        RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 8, **GOOD}),
                "more": MetricRecord({"num-examples": 10**6, "WER": 0.0}),
            }
        ),
        "expected one MetricRecord, got 2",
    ),
}


@pytest.mark.parametrize("row", list(EVALUATION_ROWS))
def test_hostile_evaluation_reply_is_left_out(row, task_identity, caplog):
    hostile, reason = EVALUATION_ROWS[row]
    server = _server(omc=None)

    def handler(node, message):
        kind = message.metadata.message_type
        data = payload_from_record(message.content)
        if kind == "train":
            return RecordDict({"arrays": payload_to_record(honest_reply(data))})
        if node == HOSTILE_NODE:
            return hostile
        return _metrics()

    strategy = OMCFedAvg(server, EVAL_NODES, evaluate_nodes=4, num_rounds=1)
    grid = FakeGrid(EVAL_NODES.values(), handler)
    start = payload_to_record(server.message_for("eval"))
    strategy.start(grid, start, num_rounds=1)
    evaluated = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(evaluated) == 4  # every node, the hostile one among them
    # The three honest nodes' metrics, nothing of the hostile one's.
    assert strategy.evaluations == {1: GOOD}
    logged = [
        r.getMessage() for r in caplog.records if "evaluation of" in r.getMessage()
    ]
    assert len(logged) == 1 and f"node {HOSTILE_NODE}" in logged[0]
    assert re.search(reason, logged[0]), logged[0]


ODD = {"num-examples": 8, "loss": 2.0, "WER": 80.0, "CER": 10.0}
ODD_BUT_VALID = {
    "metrics under another record name": RecordDict({"x": MetricRecord(ODD)}),
    "metrics and a ConfigRecord": RecordDict(
        {"metrics": MetricRecord(ODD), "extra": ConfigRecord({"note": "hi"})}
    ),
    "metrics named 'arrays' and an ArrayRecord": RecordDict(
        {"arrays": payload_to_record(b"junk"), "m": MetricRecord(ODD)}
    ),
}


@pytest.mark.parametrize("row", list(ODD_BUT_VALID))
def test_evaluation_replies_are_read_by_content_not_by_name(row, task_identity):
    """The right metrics under another MetricRecord name, or beside other
    records: counted, and no crash (FedAvg's aggregate_evaluate raised
    InconsistentMessageReplies here, ending the ServerApp)."""
    server = _server(omc=None)

    def handler(node, message):
        kind = message.metadata.message_type
        data = payload_from_record(message.content)
        if kind == "train":
            return RecordDict({"arrays": payload_to_record(honest_reply(data))})
        return ODD_BUT_VALID[row] if node == HOSTILE_NODE else _metrics()

    strategy = OMCFedAvg(server, EVAL_NODES, evaluate_nodes=4, num_rounds=1)
    strategy.start(
        FakeGrid(EVAL_NODES.values(), handler),
        payload_to_record(server.message_for("eval")),
        num_rounds=1,
    )
    # Three nodes at WER 40 and one at 80, 8 examples each.
    assert strategy.evaluations == {1: {"loss": 2.0, "WER": 50.0, "CER": 10.0}}


class _TestFailsGrid(FakeGrid):
    """The SuperLink goes away when the final test is sent."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            if message.metadata.message_type == MessageType.EVALUATE:
                if message.content["config"].get("split") == "test":
                    raise ConnectionError("the SuperLink went away")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize(
    "answer",
    [
        RecordDict({}),
        _metrics(WER=float("nan")),
        Error(code=0, reason="boom"),
        None,
        "the grid fails",
    ],
    ids=["no MetricRecord", "NaN WER", "error reply", "no reply", "grid fails"],
)
def test_a_bad_final_test_reply_loses_nothing(answer, tmp_path, task_identity):
    """The final test's answer is missing or bad, or the grid dies sending the
    test: the final model is on disk before the test is asked (and the
    summary is written whenever the app gets that far)."""
    from speechbrain_omc.federated.flower import server_app

    result = tmp_path / "result"
    on_disk_at_test = []

    def test_reply(node):
        on_disk_at_test.append((result / "final_model.pt").is_file())
        return answer

    nodes = {201: "client_000", 202: "client_001", 203: "client_002"}
    handler = app_handler(nodes, test_reply=test_reply)
    config = app_run_config(tmp_path, **{"num-server-rounds": 1})
    if isinstance(answer, str):  # "the grid fails"
        with pytest.raises(ConnectionError):
            server_app.run_server(_TestFailsGrid(nodes, handler), config)
        assert not (result / "summary.json").exists()
    else:
        summary = server_app.run_server(FakeGrid(nodes, handler), config)
        assert on_disk_at_test == [True]
        written = json.loads((result / "summary.json").read_text())
        assert written["rounds"] == summary["rounds"] == 1
        assert written["test_WER"] is None and written["test_loss"] is None
    # The final model is the checkpoint's: round 1's, finite.
    model = torch.load(result / "final_model.pt", weights_only=True)
    saved = torch.load(result / "server.ckpt", weights_only=True)["server"]
    assert saved["round"] == 1 and list(model) == list(saved["model"])
    assert all(torch.equal(model[n], saved["model"][n]) for n in model)
    assert all(bool(torch.isfinite(v).all()) for v in model.values())
