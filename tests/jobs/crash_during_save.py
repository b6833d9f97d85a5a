"""A server killed (SIGKILL) halfway through writing its third checkpoint.

Run by tests/test_server_checkpoint.py with a folder: saves rounds 1 and 2
through :class:`CheckpointStore`, notes that in ``before_crash.json``, then
makes ``torch.save`` write half of the next checkpoint and kill the process,
as a power cut or the OOM killer would, in the middle of ``save``.
"""

import io
import json
import os
import signal
import sys
from pathlib import Path

import torch

from speechbrain_omc.federated import wire
from speechbrain_omc.federated.checkpoint import CheckpointStore
from speechbrain_omc.federated.server import FedAvgServer


def one_round(server: FedAvgServer) -> None:
    replies = {}
    for client, data in server.configure_round().items():
        received = wire.decode(data)
        entries = {name: value + 1 for name, value in received.entries.items()}
        meta = {k: received.meta[k] for k in ("round", "client", "run", "nonce")}
        meta.update(type="update", num_examples=1)
        replies[client] = wire.encode(entries, meta)
    assert server.aggregate(replies).model_updated


def main(folder: Path) -> None:
    model = {"w": torch.zeros(256, 256), "b": torch.zeros(256)}
    server = FedAvgServer(model, ["a", "b"], 2, max_examples=1, server_momentum=0.5)
    store = CheckpointStore(folder / "server.ckpt")
    for _ in range(2):
        one_round(server)
        server.save(store)
    (folder / "before_crash.json").write_text(json.dumps({"rounds_saved": 2}))
    one_round(server)
    real_save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data)
        else:
            f.write(data)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_half_then_die
    server.save(store)
    raise SystemExit("not reached: the process was to be killed")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
