"""Federated averaging server for OMC: it speaks bytes and knows no SpeechBrain.

A :class:`FedAvgServer` composes a
:class:`~speechbrain_omc.federated.planning.Planner` (sampling, plans and the
round's compressed broadcast), a :class:`~speechbrain_omc.federated.round.Round`
(each reply validated, bounded and folded in a fixed order) and a
:class:`~speechbrain_omc.federated.server_state.ServerState` (the float32
global model, the server optimizer, checkpoints). A round streams one client
at a time (:meth:`~FedAvgServer.open_round`, :meth:`~FedAvgServer.broadcast`,
:meth:`~FedAvgServer.receive`, :meth:`~FedAvgServer.close_round`), so its
memory does not grow with the clients; :meth:`~FedAvgServer.configure_round`
and :meth:`~FedAvgServer.aggregate` take every message at once. See
docs/federated_server.md.

Example
-------
>>> from speechbrain_omc.codec.compressed import CompressedTensor
>>> from speechbrain_omc.engine.config import OMCConfig
>>> from speechbrain_omc.federated import wire
>>> model = {"lin.weight": torch.ones(4, 4), "lin.bias": torch.zeros(4)}
>>> server = FedAvgServer(model, ["a", "b", "c"], clients_per_round=2,
...                       omc=OMCConfig(format="e3m7"), seed=0, max_examples=10)
>>> messages = server.configure_round()
>>> sorted(messages)
['a', 'b']
>>> def train(data):  # a client: add 1 to everything, answer in kind
...     received = wire.decode(data)
...     entries = {}
...     for name, value in received.entries.items():
...         if isinstance(value, torch.Tensor):
...             entries[name] = value + 1
...         else:
...             new = value.decompress() + 1
...             entries[name] = CompressedTensor.compress(new, value.format)
...     meta = {key: received.meta[key] for key in ("round", "client", "run", "nonce")}
...     meta.update(type="update", num_examples=10)
...     return wire.encode(entries, meta)
>>> report = server.aggregate({c: train(m) for c, m in messages.items()})
>>> report.accepted, server.round
(['a', 'b'], 1)
>>> server.model["lin.bias"]
tensor([1., 1., 1., 1.])

The same, streaming (the embedded recipe's loop):

>>> sampled = server.open_round()
>>> for client in server.fold_order():  # sorted ids: no reply waits
...     server.receive(client, train(server.broadcast(client)))
>>> report = server.close_round()
>>> report.accepted, sorted(report.seconds)
(['a', 'b'], ['aggregate', 'decode', 'encode', 'validate'])
>>> server.model["lin.bias"]
tensor([2., 2., 2., 2.])
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from speechbrain_omc.codec.memory import Workspace, trim_heap
from speechbrain_omc.engine.accounting import (
    peak_rss_since_reset,
    reset_peak_rss,
    rss_bytes,
)
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.aggregation import (
    DEFAULT_MEMORY_BUDGET,
    Aggregation,
    check_memory_budget,
)
from speechbrain_omc.federated.checkpoint import CheckpointStore, plain
from speechbrain_omc.federated.planning import Planner
from speechbrain_omc.federated.round import SECONDS, Round, RoundReport
from speechbrain_omc.federated.server_optimizer import ServerOptimizer
from speechbrain_omc.federated.server_state import (
    ServerState,
    load_checkpoint,
    save_checkpoint,
    saved_clients,
)
from speechbrain_omc.federated.validation import (
    MAX_EXAMPLES,
    Update,
    UpdateRejected,
    check_metrics,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_EXAMPLES",
    "SECONDS",
    "FedAvgServer",
    "RoundReport",
    "Update",
    "UpdateRejected",
    "check_metrics",  # re-exported from validation, where they live
    "saved_clients",
]

#: Default bound of the replies waiting for their turn in the fold order.
DEFAULT_MAX_HELD_BYTES = 2**30
# The settings' keys, in the order a checkpoint stores them.
_SETTINGS = (
    "clients",
    "clients_per_round",
    "seed",
    "server_lr",
    "server_momentum",
    "server_optimizer",
    "server_betas",
    "server_eps",
    "omc",
    "buffers",
    "client_config",
    "max_examples",
    "aggregation",
    "model",
    "run",
    "roles",
    "wire_mode",
)


def _part(part: str, name: str, doc: str) -> property:
    # An attribute of one of the server's parts, read and written through it.
    def get(self):
        return getattr(getattr(self, part), name)

    def set_(self, value):
        setattr(getattr(self, part), name, value)

    return property(get, set_, doc=doc)


class FedAvgServer:
    """FedAvg over compressed messages, with a float32 master model.

    Arguments
    ---------
    model : mapping
        Initial global model, in wire order.
    clients : sequence of str
    clients_per_round : int
    omc : OMCConfig, optional
        Compression of the broadcast; ``None`` sends float32.
    seed : int
        Seed of every draw, a function of ``(seed, round, client)``.
    server_lr, server_momentum : float
        The server step (1 and 0: FedAvg); the momentum is FedAvgM's.
    server_optimizer : str
        ``sgd`` (FedAvg, FedAvgM), ``adam`` (FedAdam) or ``yogi`` (FedYogi).
    server_betas : pair of float
        ``adam``, ``yogi``: the moments' decays, in ``[0, 1)``.
    server_eps : float
        ``adam``, ``yogi``: the adaptivity ``tau`` (> 0).
    buffers : iterable of str
        Entries that are not parameters (never compressed nor stepped).
    client_config : mapping, optional
        Local-training settings sent to every client.
    max_examples : int or mapping, optional
        Largest ``num_examples`` a client may claim; ``None``: equal weights.
    aggregation : str or Aggregation
    run_id : str, optional
        Bound into every message; random by default.
    run_settings : mapping, optional
        More settings a checkpoint must match (never sent).
    roles : mapping, optional
        Parameter name to role.
    memory_budget, max_held_bytes : int
        Bytes the buffered rules may keep; bytes of replies that may wait.
    measure_memory : bool
        Report each round's resident memory.
    wire_mode : str
        ``"both"``, ``"download"`` or ``"upload"``.
    reference_key : bytes, optional
        The secret of the reference draw (give one only to re-run a run bit for
        bit, never to a client).
    """

    model = _part("state", "model", "The float32 global model.")
    momentum = _part("state", "momentum", "FedAvgM's momentum, or the first moment.")
    second_moment = _part("state", "second_moment", "FedAdam's or FedYogi's.")
    optimizer = _part("state", "optimizer", "The server optimizer's settings.")
    round = _part("state", "round", "Completed rounds.")
    run_id = _part("state", "run_id", "The run's id.")
    buffers = _part("state", "buffers", "The entries that are not parameters.")
    server_lr = _part("state", "server_lr", "The server learning rate.")
    server_momentum = _part("state", "server_momentum", "The momentum factor.")
    clients = _part("planner", "clients", "Ids of all clients.")
    clients_per_round = _part("planner", "clients_per_round", "Sampled per round.")
    seed = _part("planner", "seed", "Seed of every draw.")
    omc = _part("planner", "omc", "Compression of the broadcast.")
    roles = _part("planner", "roles", "Parameter name to role.")
    wire_mode = _part("planner", "wire_mode", "Which directions are compressed.")
    client_config = _part("planner", "client_config", "Sent to every client.")
    max_examples = _part("planner", "max_examples", "Client to its bound.")

    def __init__(
        self,
        model: Mapping[str, torch.Tensor],
        clients: Sequence[str],
        clients_per_round: int,
        omc: OMCConfig | None = None,
        seed: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_optimizer: str = "sgd",
        server_betas: Sequence[float] = (0.9, 0.99),
        server_eps: float = 1e-3,
        buffers: Iterable[str] = (),
        client_config: Mapping | None = None,
        max_examples: int | Mapping[str, int] | None = None,
        aggregation: str | Aggregation = "fedavg",
        run_id: str | None = None,
        run_settings: Mapping | None = None,
        roles: Mapping[str, str] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        measure_memory: bool = False,
        wire_mode: str = "both",
        reference_key: bytes | None = None,
    ) -> None:
        optimizer = ServerOptimizer(server_optimizer, server_betas, server_eps)
        self.state = ServerState(
            model, buffers, server_lr, server_momentum, run_id, reference_key, optimizer
        )
        self.planner = Planner(
            self.state,
            clients,
            clients_per_round,
            omc=omc,
            seed=seed,
            roles=roles,
            wire_mode=wire_mode,
            client_config=client_config,
            max_examples=max_examples,
        )
        if isinstance(aggregation, str):
            aggregation = Aggregation(aggregation)
        self.aggregation = aggregation
        self.memory_budget = int(memory_budget)
        # Refused now, not by running out of memory in round one.
        check_memory_budget(
            aggregation, self.clients_per_round, self.model_nbytes(), self.memory_budget
        )
        self.max_held_bytes = int(max_held_bytes)
        self.measure_memory = bool(measure_memory)
        self.run_settings = plain(dict(run_settings or {}))
        self.current: Round | None = None  # the open round
        # Replies' entries are decoded into these reused buffers.
        self._workspace = Workspace(exact=False)

    def model_nbytes(self) -> int:
        """Bytes of the float32 global model (parameters and buffers)."""
        return self.state.model_nbytes()

    # ------------------------------------------------------------- planning
    def sample_clients(self, round: int) -> list[str]:
        """The clients of a round, in sampled order (a seeded draw)."""
        return self.planner.sample_clients(round)

    def formats(self, round: int, client: str) -> dict[str, str]:
        """One client's plan in one round: entry name to wire format."""
        return self.planner.formats(round, client)

    def client_seed(self, round: int, client: str) -> int:
        """Seed of a client's randomness in a round."""
        return self.planner.client_seed(round, client)

    def nonce(self, round: int, client: str) -> str:
        """The nonce a reply of ``client`` in ``round`` must echo."""
        return self.planner.nonce(round, client)

    def message_for(self, client: str, round: int | None = None) -> bytes:
        """Encode the global model for one client under its plan.

        Arguments
        ---------
        client : str
            Any id for evaluation (e.g. ``"eval"``).
        round : int, optional
            The next round by default.

        Returns
        -------
        bytes
        """
        round = self.round + 1 if round is None else int(round)
        return self.planner.message(str(client), round)[0]

    # ---------------------------------------------------------------- rounds
    def open_round(self, round: int | None = None) -> list[str]:
        """Sample the next round's clients and open it (nothing is encoded).

        Arguments
        ---------
        round : int, optional
            Must be the next round (the default).

        Returns
        -------
        list of str
            The sampled clients, in sampled order.
        """
        expected = self.round + 1
        round = expected if round is None else int(round)
        if round != expected:
            raise ValueError(f"open_round: next round is {expected}, got {round}")
        if self.current is not None:
            logger.warning(
                "round %d opened again; its replies so far are dropped", round
            )
        self.current = None
        self.planner.keep_round(round)
        before = _reset_peak_rss() if self.measure_memory else None
        sampled = self.sample_clients(round)
        report = RoundReport(round, list(sampled))
        if before is not None:
            report.rss = {"before": before, "peak": before}
        self.current = Round(
            report,
            self.aggregation,
            self.model,
            lambda client: self.planner.expectation(round, client),
            reference_key=self.state.reference_key,
            carried=self.state.carried,
            memory_budget=self.memory_budget,
            weighted=self.max_examples is not None,
            max_held_bytes=self.max_held_bytes,
            workspace=self._workspace,
        )
        return list(sampled)

    def fold_order(self) -> list[str]:
        """The open round's clients in the order their replies are combined."""
        return list(self._open("fold_order").order)

    def _open(self, what: str) -> Round:
        if self.current is None:
            raise RuntimeError(f"{what}: no round is open (open_round first)")
        return self.current

    def broadcast(self, client: str) -> bytes:
        """Encode (and count) the open round's message for one of its clients."""
        current, client = self._open("broadcast"), str(client)
        if client not in current.sampled:
            raise ValueError(
                f"broadcast: {client!r} is not sampled in round {current.number}"
            )
        # The previous message or reply, freed, goes back to the system: the
        # round's RSS holds one at a time, not the holes of all of them.
        trim_heap()
        start = time.perf_counter()
        data, entries, meta = self.planner.message(client, current.number)
        report = current.report
        report.bytes_down += len(data)
        shapes = {name: tuple(value.shape) for name, value in entries.items()}
        report.float32_bytes_down += wire.encoded_nbytes(shapes, meta)
        report.seconds["encode"] += time.perf_counter() - start
        return data

    def configure_round(self, round: int | None = None) -> dict[str, bytes]:
        """Open the round and encode every sampled client's message."""
        return {client: self.broadcast(client) for client in self.open_round(round)}

    def validate(self, client: str, data: bytes) -> Update:
        """Decode and check one reply of the open round (nothing is combined)."""
        if self.current is None:
            raise UpdateRejected("no round is open")
        return self.current.validate(str(client), data)

    def receive(self, client: str, data: Any) -> None:
        """Take one reply of the open round, folded when its turn comes."""
        current = self._open("receive")
        trim_heap()  # the message sent to this client, dropped
        current.receive(str(client), data)

    def fail(self, client: str, reason: str) -> None:
        """Record that a client of the open round will not reply, and why."""
        self._open("fail").fail(str(client), reason)

    def close_round(self, failures: Mapping[str, str] | None = None) -> RoundReport:
        """Fold what still waits, combine, commit and close the round.

        Arguments
        ---------
        failures : mapping, optional
            Client id to why it did not reply.

        Returns
        -------
        RoundReport
        """
        current = self._open("close_round")
        trim_heap()  # the last reply, dropped
        for client, reason in (failures or {}).items():
            self.fail(client, reason)
        combined = current.close()
        report = current.report
        if combined is not None:
            start = time.perf_counter()
            report.model_updated = self.state.apply(combined, current.number)
            if report.model_updated and self.aggregation.norm_bound is not None:
                self.state.carried = current.limit.carry()
            del combined
            report.seconds["aggregate"] += time.perf_counter() - start
        self.round = current.number
        self.current = None
        self.planner.keep_round(None)
        trim_heap()  # freed decoded entries and messages back to the system
        if report.rss is not None:
            report.rss["peak"] = max(peak_rss_since_reset(), report.rss["before"])
        return report

    def aggregate(
        self, replies: Mapping[str, Any], failures: Mapping[str, str] | None = None
    ) -> RoundReport:
        """:meth:`receive` every reply (in sorted order), then :meth:`close_round`."""
        if self.current is None:
            raise RuntimeError("aggregate: configure_round first")
        for client, reason in (failures or {}).items():
            self.fail(client, reason)
        for client in sorted(replies, key=str):
            self.receive(client, replies[client])
        return self.close_round()

    # ---------------------------------------------------------- checkpoints
    def settings(self) -> dict:
        """What a checkpoint must match to be resumed by this server (plain data)."""
        parts = {
            **self.planner.settings(),
            **self.state.settings(),
            "aggregation": asdict(self.aggregation),
            "run": self.run_settings,
        }
        return plain({key: parts[key] for key in _SETTINGS if key in parts})

    def state_dict(self) -> dict:
        """Everything needed to continue after the last completed round."""
        return self.state.state_dict(self.settings())

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` after checking all of it."""
        self.state.load_state_dict(
            state, self.settings(), self.aggregation.norm_reference
        )
        self.current = None
        self.planner.keep_round(None)

    def save(self, path: str | Path | CheckpointStore, extra: Mapping | None = None):
        """Checkpoint atomically, with ``extra`` plain data (a run's log)."""
        save_checkpoint(path, self.state_dict(), extra)

    def load(self, path: str | Path | CheckpointStore) -> dict | None:
        """Restore the newest usable checkpoint; its ``extra`` data or ``None``."""
        loaded = load_checkpoint(path, self.load_state_dict)
        if loaded is None:
            return None
        extra, used = loaded
        logger.info("resumed from %s after round %d", used, self.round)
        return extra


def _reset_peak_rss() -> int | None:
    # The resident bytes a round starts from (None where the peak cannot be
    # reset); the previous round's garbage is not this round's peak.
    gc.collect()
    return rss_bytes() if reset_peak_rss() else None
