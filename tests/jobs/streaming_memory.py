"""Peak memory of aggregating N replies (run by tests/test_streaming_aggregation.py).

Usage: ``python streaming_memory.py N RULE [unbounded]``. In this fresh
process: a server
with a 4M-parameter model (16 MiB in float32) under OMC (e3m7, 10 % of the
values float32, re-drawn per client) opens a round of N clients and
writes every client's broadcast to a file; a child process makes each
client's honest reply from it (so that this process never held a reply
before measuring). Then the
kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the server
takes the replies one at a time (each read from its file, handed to
``receive`` and dropped, as the embedded runner does) and closes the round.
Prints one JSON line (bytes): the RSS before aggregating, the peak while
aggregating, the model's float32 size and the largest reply.
"""

import gc
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.memory import trim_heap
from speechbrain_omc.engine.accounting import (
    peak_rss_since_reset,
    reset_peak_rss,
    rss_bytes,
)
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.aggregation import Aggregation
from speechbrain_omc.federated.server import FedAvgServer


def model() -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in range(8):
        out[f"layer{i}.weight"] = torch.randn(1024, 512, generator=gen) * 0.05
        out[f"layer{i}.bias"] = torch.zeros(1024)
    return out


def reply(data: bytes, shift: float) -> bytes:
    received = wire.decode(data)
    entries = {}
    for name, value in received.entries.items():
        if isinstance(value, CompressedTensor):
            entries[name] = CompressedTensor.compress(
                value.decompress() + shift, value.format
            )
        else:
            entries[name] = value + shift
    meta = {k: received.meta[k] for k in ("round", "client", "run", "nonce")}
    meta.update(type="update", num_examples=1 + int(shift * 100) % 7)
    return wire.encode(entries, meta)


def make_replies(folder: Path) -> None:
    """The child: each ``<client>.msg`` answered as ``<client>.reply``."""
    for k, path in enumerate(sorted(folder.glob("*.msg"))):
        data = reply(path.read_bytes(), shift=0.01 * (k + 1))
        path.with_suffix(".reply").write_bytes(data)


def main() -> None:
    if sys.argv[1] == "--replies":
        make_replies(Path(sys.argv[2]))
        return
    n, rule = int(sys.argv[1]), sys.argv[2]
    unbounded = sys.argv[3:] == ["unbounded"]  # without the update-norm bound
    aggregation = Aggregation(rule, norm_bound=None) if unbounded else rule
    torch.set_num_threads(1)
    clients = [f"client_{i:03d}" for i in range(n)]
    omc = OMCConfig(format="e3m7", fp32_fraction=0.1, fp32_policy="random", seed=1)
    server = FedAvgServer(
        model(),
        clients,
        n,
        omc=omc,
        seed=3,
        max_examples=10,
        aggregation=aggregation,
        memory_budget=2**31,
    )
    folder = Path(tempfile.mkdtemp())
    server.open_round()
    for client in server.fold_order():
        (folder / f"{client}.msg").write_bytes(server.broadcast(client))
    subprocess.run([sys.executable, __file__, "--replies", str(folder)], check=True)
    largest = max(p.stat().st_size for p in folder.glob("*.reply"))
    # From a trimmed heap: free memory left by making the broadcasts would
    # otherwise be reused unseen (a rise measured from an untrimmed heap
    # reads low, and by chance).
    gc.collect()  # before the trim, so that what it frees is given back too
    trim_heap()
    reset_peak_rss()
    before = rss_bytes()
    for client in server.fold_order():
        data = (folder / f"{client}.reply").read_bytes()
        server.receive(client, data)
        del data
    report = server.close_round()
    peak = peak_rss_since_reset()
    shutil.rmtree(folder)
    assert len(report.accepted) == n, report.rejected
    print(
        json.dumps(
            {
                "n": n,
                "rule": rule,
                "unbounded": unbounded,
                "before": before,
                "peak": peak,
                "model_float32": server.model_nbytes(),
                "largest_reply": largest,
            }
        )
    )


if __name__ == "__main__":
    main()
