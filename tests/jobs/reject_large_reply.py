"""Peak memory of rejecting a 256 MiB reply (run by tests/test_hostile_clients.py).

Six cases, each in this fresh process one after the other: a 256 MiB model
whose reply carries one extra (tiny) entry, a small model whose reply
carries a 256 MiB extra entry, and a 256 MiB model whose reply is exactly
right but echoes a wrong nonce (refused on its metadata, before any payload
is parsed); each given to the embedded server and to the Flower strategy.
Before each rejection the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``), so the peak measured is the rejection's own.
Prints one JSON line per case (MiB): RSS before the reply was built, with
the reply in memory, and the peak while rejecting it.
"""

import gc
import json
import re

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from speechbrain_omc.federated import wire
from speechbrain_omc.federated.flower.records import payload_to_record
from speechbrain_omc.federated.flower.strategy import OMCFedAvg
from speechbrain_omc.federated.server import FedAvgServer

SIZE = 256 * 2**20
MIB = 2**20


def status(key: str) -> float:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024


def reset_peak() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


#: case -> (a 256 MiB model?, what the rejection must say)
CASES = {
    "256 MiB model + tiny extra entry": (True, "unexpected entries: extra.weight"),
    "small model + 256 MiB extra entry": (False, "exceeds the \\d+ bytes"),
    "256 MiB model, wrong nonce": (True, "wrong nonce"),
}


def hostile_reply(server: FedAvgServer, data: bytes, case: str) -> bytes:
    received = wire.decode(data)
    entries = dict(received.entries)
    meta = {k: received.meta[k] for k in ("round", "client", "run", "nonce")}
    meta.update(type="update", num_examples=1)
    if case == "256 MiB model, wrong nonce":
        meta["nonce"] = "0" * len(meta["nonce"])
    else:
        big_extra = case == "small model + 256 MiB extra entry"
        entries["extra.weight"] = torch.zeros(SIZE // 4 if big_extra else 1)
    return wire.encode(entries, meta)


def measure(channel: str, case: str) -> dict:
    big_model, expected = CASES[case]
    numel = SIZE // 4 if big_model else 16
    server = FedAvgServer({"w": torch.zeros(numel)}, ["a"], 1, max_examples=1)
    if channel == "flower":
        strategy = OMCFedAvg(server, {"a": 1}, evaluate_nodes=0)
        (message,) = strategy.configure_train(1, None, ConfigRecord(), grid=None)
        del message.content["arrays"]  # the broadcast is not ours to measure
    else:
        server.configure_round()
    reset_peak()
    before = status("VmRSS")
    data = hostile_reply(server, server.message_for("a", 1), case)
    nbytes = len(data)
    if channel == "flower":
        record = payload_to_record(data)
        del data
        data = Message(content=RecordDict({"arrays": record}), reply_to=message)
        del record
    reset_peak()
    with_reply = status("VmRSS")
    if channel == "embedded":
        report = server.aggregate({"a": data})
    else:
        strategy.aggregate_train(1, [data])
        report = strategy.reports[-1]
    peak = status("VmHWM")
    return {
        "case": f"{channel}: {case}",
        "reason": report.rejected.get("a", "accepted!"),
        "expected": expected,
        "reply_mib": round(nbytes / MIB, 1),
        "before_reply_mib": round(before, 1),
        "with_reply_mib": round(with_reply, 1),
        "peak_mib": round(peak, 1),
    }


def main() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0
    torch.set_num_threads(1)
    for channel in ("embedded", "flower"):
        for case in CASES:
            print(json.dumps(measure(channel, case)), flush=True)
            gc.collect()


if __name__ == "__main__":
    main()
