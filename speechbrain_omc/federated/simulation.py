"""One round of the embedded simulation: the clients one at a time, streaming.

Each sampled client's message is encoded, trained on by ``train`` (a client
in this process, or in another) and its reply folded into the server's
running sums before the next client starts, so a round's memory does not
grow with the clients per round.

Example
-------
>>> import torch
>>> from speechbrain_omc.federated import wire
>>> from speechbrain_omc.federated.server import FedAvgServer
>>> server = FedAvgServer({"w": torch.zeros(2)}, ["a", "b", "c", "d"], 4,
...                       max_examples=1)
>>> def train(client, data):  # add 1, answer in kind
...     received = wire.decode(data)
...     meta = {k: received.meta[k] for k in ("round", "client", "run", "nonce")}
...     meta.update(type="update", num_examples=1)
...     return wire.encode({"w": received.entries["w"] + 1}, meta)
>>> report = run_round(server, train, dropout=0.25)
>>> report.accepted, report.rejected
(['a', 'c', 'd'], {'b': 'failed: dropped out (simulated unavailability)'})
>>> server.model["w"]
tensor([1., 1.])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from speechbrain_omc.federated.availability import DROPOUT_REASON, simulated_dropouts
from speechbrain_omc.federated.server import FedAvgServer, RoundReport

logger = logging.getLogger(__name__)

__all__ = ["run_round"]


def run_round(
    server: FedAvgServer,
    train: Callable[[str, bytes], bytes],
    dropout: float = 0.0,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> RoundReport:
    """Run the server's next round with the clients one at a time.

    Arguments
    ---------
    server : FedAvgServer
    train : callable
        ``(client id, message) -> reply``; one that raises is left out.
    dropout : float
        Seeded fraction of the sampled clients that drop out.
    progress : callable, optional
        Wraps the iteration over the clients (e.g. a progress bar).

    Returns
    -------
    RoundReport
    """
    sampled = server.open_round()
    dropped = simulated_dropouts(sampled, dropout, server.seed, server.round + 1)
    clients: Iterable[str] = server.fold_order()
    if progress is not None:
        clients = progress(clients)
    for client in clients:
        if client in dropped:
            server.fail(client, DROPOUT_REASON)
            continue
        try:
            # The message is the callee's alone (no reference kept here): a
            # train() that drops it once sent holds one message at a time.
            reply = train(client, server.broadcast(client))
        except Exception as error:  # a client's failure must not end the run
            logger.error(
                "client %s raised; left out of this round", client, exc_info=True
            )
            server.fail(client, f"{type(error).__name__}: {error}")
            continue
        server.receive(client, reply)
        del reply
    return server.close_round()
