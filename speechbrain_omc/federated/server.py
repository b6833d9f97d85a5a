"""Federated averaging server for OMC: it speaks bytes and knows no SpeechBrain.

The server keeps the global model in float32 (a server is not memory bound,
and a float32 master keeps the rounding of every broadcast from accumulating
over rounds). A round goes:

1. :meth:`FedAvgServer.configure_round` samples clients, a seeded function of
   ``(seed, round)``, and encodes for each one the global model under *its*
   plan: which variables travel compressed and in which format, drawn per
   ``(seed, round, client)`` when the partial-quantization policy is
   ``random`` (see :func:`~speechbrain_omc.selection.make_plan`). The message
   itself is the plan: the client trains each variable in the form it
   received and must send it back in the same form. The metadata tells the
   client its round, id, RNG seed and local-training settings.
2. Clients train and reply (see :mod:`speechbrain_omc.federated.client`).
3. :meth:`FedAvgServer.aggregate` decodes and validates every reply (message
   integrity, round and client, number of examples, entry names, shapes and
   formats, finite values); a bad one is dropped with a logged reason, never
   averaged. The accepted ones are decompressed and averaged in float32,
   weighted by their number of examples (FedAvg). Optionally a server
   learning rate and server momentum (FedAvgM) apply the averaged change.

Bytes are counted from the messages: ``len()`` of every broadcast and every
reply. :meth:`FedAvgServer.state_dict` / :meth:`FedAvgServer.save` checkpoint
the server between rounds (the save is atomic).

Example
-------
>>> from speechbrain_omc.config import OMCConfig
>>> from speechbrain_omc.federated import wire
>>> model = {"lin.weight": torch.ones(4, 4), "lin.bias": torch.zeros(4)}
>>> server = FedAvgServer(model, ["a", "b", "c"], clients_per_round=2,
...                       omc=OMCConfig(format="e3m7"), seed=0)
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
...     meta = {"type": "update", "round": received.meta["round"],
...             "client": received.meta["client"], "num_examples": 10}
...     return wire.encode(entries, meta)
>>> report = server.aggregate({c: train(m) for c, m in messages.items()})
>>> report.accepted, server.round
(['a', 'b'], 1)
>>> server.model["lin.bias"]
tensor([1., 1., 1., 1.])
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from speechbrain_omc.compressed import CompressedTensor
from speechbrain_omc.config import OMCConfig
from speechbrain_omc.federated import wire
from speechbrain_omc.selection import make_plan, round_seed

logger = logging.getLogger(__name__)

__all__ = ["FedAvgServer", "RoundReport", "Update", "UpdateRejected", "atomic_save"]

_STATE_VERSION = 1


class UpdateRejected(ValueError):
    """A client reply that the server refuses; the message says why."""


@dataclass
class Update:
    """A validated client reply.

    Arguments
    ---------
    client : str
        Client id.
    num_examples : int
        Training examples the client used (its FedAvg weight).
    values : dict
        Entry name to float32 tensor (compressed entries decompressed).
    metrics : dict
        The client's reported metrics.
    nbytes : int
        Length of the reply message.
    float32_nbytes : int
        Length of the same reply with every entry in float32.
    """

    client: str
    num_examples: int
    values: dict[str, torch.Tensor]
    metrics: dict
    nbytes: int
    float32_nbytes: int


@dataclass
class RoundReport:
    """What happened in one round.

    Arguments
    ---------
    round : int
        Round number (1-based).
    sampled : list of str
        Clients sent the model.
    accepted : list of str
        Clients whose update was averaged.
    rejected : dict
        Client to the reason it was left out (failure, no reply, invalid).
    bytes_down, bytes_up : int
        Bytes of the broadcasts and of the replies (rejected ones included).
    float32_bytes_down, float32_bytes_up : int
        The same messages' length with every entry in float32.
    num_examples : int
        Examples behind the accepted updates.
    client_metrics : dict
        Client to its reported metrics (accepted clients).
    """

    round: int
    sampled: list[str]
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    float32_bytes_down: int = 0
    float32_bytes_up: int = 0
    num_examples: int = 0
    client_metrics: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-data copy (JSON-serialisable).

        Returns
        -------
        dict
        """
        return asdict(self)


@dataclass
class _Pending:
    round: int
    sampled: list[str]
    formats: dict[str, dict[str, str]]  # client -> name -> "float32" or format
    bytes_down: int = 0
    float32_bytes_down: int = 0


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename.

    A reader (or a restart after SIGKILL) sees the old or the new file, never
    a partial one.

    Arguments
    ---------
    obj : object
        What to save.
    path : str or Path
        Destination.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class FedAvgServer:
    """FedAvg over compressed messages, with a float32 master model.

    Arguments
    ---------
    model : mapping
        Initial global model: name to float tensor, in the order entries
        travel (for example a client's ``get_model()``).
    clients : sequence of str
        Ids of all clients.
    clients_per_round : int
        Clients sampled per round (at most all of them).
    omc : OMCConfig, optional
        Compression of the broadcast (format, transform, weights-only,
        partial quantization and its policy); ``None`` sends float32.
    seed : int
        Seed of client sampling, of the per-client plans and of the clients'
        RNG seeds: every draw is a function of ``(seed, round, client)``.
    server_lr : float
        Server learning rate applied to the averaged change (1 is FedAvg).
    server_momentum : float
        Server momentum (FedAvgM); 0 disables.
    buffers : iterable of str
        Entries that are not parameters (running statistics): averaged but
        never compressed and not moved by the server optimizer.
    client_config : mapping, optional
        Local-training settings sent to every client in the metadata
        (for example ``{"local_epochs": 1}``).
    """

    def __init__(
        self,
        model: Mapping[str, torch.Tensor],
        clients: Sequence[str],
        clients_per_round: int,
        omc: OMCConfig | None = None,
        seed: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        buffers: Iterable[str] = (),
        client_config: Mapping | None = None,
    ) -> None:
        if not clients:
            raise ValueError("FedAvgServer: no clients")
        clients = [str(c) for c in clients]
        if len(set(clients)) != len(clients):
            raise ValueError("FedAvgServer: duplicate client ids")
        if not 1 <= int(clients_per_round) <= len(clients):
            raise ValueError(
                f"FedAvgServer: clients_per_round={clients_per_round} must be "
                f"between 1 and the {len(clients)} clients"
            )
        if server_lr <= 0 or not 0 <= server_momentum < 1:
            raise ValueError("FedAvgServer: need server_lr > 0 and 0 <= momentum < 1")
        self.model: dict[str, torch.Tensor] = {}
        for name, value in model.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"FedAvgServer: {name} is not a float tensor")
            self.model[name] = value.detach().to("cpu", torch.float32).clone()
        self.buffers = frozenset(buffers)
        unknown = self.buffers - set(self.model)
        if unknown:
            raise ValueError(f"FedAvgServer: unknown buffers {sorted(unknown)}")
        self.clients = clients
        self.clients_per_round = int(clients_per_round)
        self.omc = omc
        self.seed = int(seed)
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.client_config = dict(client_config or {})
        self.momentum: dict[str, torch.Tensor] = {}
        self.round = 0  # completed rounds
        self._pending: _Pending | None = None
        self._cache: dict[tuple[int, str, str], CompressedTensor] = {}

    # ------------------------------------------------------------- planning
    def sample_clients(self, round: int) -> list[str]:
        """The clients of a round: a seeded draw without replacement.

        Arguments
        ---------
        round : int
            Round number.

        Returns
        -------
        list of str
            In sampled order.
        """
        rng = random.Random(round_seed(self.seed, round, "sample"))
        return rng.sample(self.clients, self.clients_per_round)

    def formats(self, round: int, client: str) -> dict[str, str]:
        """The plan of one client in one round: each entry's wire format.

        Arguments
        ---------
        round : int
            Round number.
        client : str
            Client id (any string; evaluation uses its own).

        Returns
        -------
        dict
            Name to ``"float32"`` or a format name such as ``"e3m7"``.
        """
        out = dict.fromkeys(self.model, "float32")
        if self.omc is None:
            return out
        shapes = [
            (name, tuple(value.shape))
            for name, value in self.model.items()
            if name not in self.buffers
        ]
        plan = make_plan(shapes, self.omc, round=round, client=client)
        for entry in plan.compressed:
            out[entry.name] = entry.format
        return out

    def client_seed(self, round: int, client: str) -> int:
        """Seed of a client's randomness in a round (data order, dropout...).

        Arguments
        ---------
        round : int
        client : str

        Returns
        -------
        int
        """
        return round_seed(self.seed, round, f"client:{client}")

    def _compressed(self, round: int, name: str, fmt: str) -> CompressedTensor:
        # The same variable in the same format is shared by all clients of a
        # round: compress it once.
        key = (round, name, fmt)
        if key not in self._cache:
            config = self.omc or OMCConfig()
            self._cache[key] = CompressedTensor.compress(
                self.model[name],
                fmt,
                transform=config.transform,
                rounding=config.rounding,
                clip=config.clip,
            )
        return self._cache[key]

    def message_for(self, client: str, round: int | None = None) -> bytes:
        """Encode the global model for one client under its plan.

        Arguments
        ---------
        client : str
            Client id (for evaluation any id, e.g. ``"eval"``).
        round : int, optional
            Round number; the next round by default.

        Returns
        -------
        bytes
            A :mod:`~speechbrain_omc.federated.wire` message whose metadata is
            ``{"type": "global", "round", "client", "seed", "config"}``.
        """
        round = self.round + 1 if round is None else int(round)
        client = str(client)
        entries = {}
        for name, fmt in self.formats(round, client).items():
            if fmt == "float32":
                entries[name] = self.model[name]
            else:
                entries[name] = self._compressed(round, name, fmt)
        meta = {
            "type": "global",
            "round": round,
            "client": client,
            "seed": self.client_seed(round, client),
            "config": self.client_config,
        }
        return wire.encode(entries, meta)

    def configure_round(self, round: int | None = None) -> dict[str, bytes]:
        """Sample the round's clients and encode each one's message.

        Arguments
        ---------
        round : int, optional
            Must be the next round (the default); given for callers that
            track rounds themselves (Flower).

        Returns
        -------
        dict
            Client id to its message, in sampled order.
        """
        expected = self.round + 1
        round = expected if round is None else int(round)
        if round != expected:
            raise ValueError(f"configure_round: next round is {expected}, got {round}")
        self._cache = {k: v for k, v in self._cache.items() if k[0] == round}
        sampled = self.sample_clients(round)
        pending = _Pending(round, sampled, {})
        messages = {}
        for client in sampled:
            data = self.message_for(client, round)
            message = wire.decode(data)  # cheap, and checks what leaves
            pending.formats[client] = message.formats()
            pending.bytes_down += len(data)
            pending.float32_bytes_down += message.float32_nbytes()
            messages[client] = data
        self._pending = pending
        return messages

    # ------------------------------------------------------------ validation
    def validate(self, client: str, data: bytes) -> Update:
        """Decode and check one reply of the pending round.

        Arguments
        ---------
        client : str
            Who sent it.
        data : bytes
            The reply message.

        Returns
        -------
        Update

        Raises
        ------
        UpdateRejected
            With the reason: malformed message, wrong round or client,
            missing or bad ``num_examples``, missing, unexpected, misshapen
            or wrongly formatted entries, non-finite values.
        """
        pending = self._pending
        if pending is None:
            raise UpdateRejected("no round is open")
        if client not in pending.formats:
            raise UpdateRejected(f"not sampled in round {pending.round}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UpdateRejected(f"reply is {type(data).__name__}, not bytes")
        try:
            message = wire.decode(data)
        except ValueError as error:
            raise UpdateRejected(f"malformed message: {error}") from None
        meta = message.meta
        if meta.get("type") != "update":
            raise UpdateRejected(
                f"message type {meta.get('type')!r}, expected 'update'"
            )
        if meta.get("round") != pending.round:
            raise UpdateRejected(
                f"update for round {meta.get('round')!r}, expected {pending.round}"
            )
        if meta.get("client") != client:
            raise UpdateRejected(f"update signed by client {meta.get('client')!r}")
        examples = meta.get("num_examples")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples <= 0:
            raise UpdateRejected(
                f"num_examples must be a positive int, got {examples!r}"
            )
        metrics = meta.get("metrics", {})
        if not isinstance(metrics, dict):
            raise UpdateRejected("metrics must be a JSON object")
        expected = pending.formats[client]
        missing = [n for n in expected if n not in message.entries]
        if missing:
            raise UpdateRejected(f"missing entries: {', '.join(missing[:5])}")
        extra = [n for n in message.entries if n not in expected]
        if extra:
            raise UpdateRejected(f"unexpected entries: {', '.join(extra[:5])}")
        got_formats = message.formats()
        values = {}
        for name, fmt in expected.items():
            shape = tuple(self.model[name].shape)
            entry = message.entries[name]
            if tuple(entry.shape) != shape:
                raise UpdateRejected(
                    f"{name} has shape {tuple(entry.shape)}, expected {shape}"
                )
            if got_formats[name] != fmt:
                raise UpdateRejected(
                    f"{name} arrived as {got_formats[name]}, expected {fmt}"
                )
            value = entry.decompress() if isinstance(entry, CompressedTensor) else entry
            if not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise UpdateRejected(f"{name} has {bad} non-finite values")
            values[name] = value
        return Update(
            client, examples, values, metrics, len(data), message.float32_nbytes()
        )

    # ----------------------------------------------------------- aggregation
    def aggregate(
        self,
        replies: Mapping[str, bytes],
        failures: Mapping[str, str] | None = None,
    ) -> RoundReport:
        """Validate the replies, average the good ones, close the round.

        Arguments
        ---------
        replies : mapping
            Client id to its reply message.
        failures : mapping, optional
            Client id to why it did not reply (an exception, a timeout):
            recorded in the report.

        Returns
        -------
        RoundReport
            The model is unchanged when no reply was accepted.
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError("aggregate: configure_round first")
        report = RoundReport(
            pending.round,
            list(pending.sampled),
            bytes_down=pending.bytes_down,
            float32_bytes_down=pending.float32_bytes_down,
        )
        for client, reason in (failures or {}).items():
            report.rejected[str(client)] = f"failed: {reason}"
        updates = []
        # Sorted: the average does not depend on the order replies arrived.
        for client in sorted(replies):
            data = replies[client]
            size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0
            report.bytes_up += size
            try:
                update = self.validate(client, data)
            except UpdateRejected as error:
                report.float32_bytes_up += self._float32_reply_nbytes(data, size)
                report.rejected[client] = str(error)
                logger.warning(
                    "round %d: update of client %s rejected: %s",
                    pending.round,
                    client,
                    error,
                )
                continue
            report.float32_bytes_up += update.float32_nbytes
            updates.append(update)
        for client in pending.sampled:
            if client not in replies and client not in report.rejected:
                report.rejected[client] = "no reply"
        for client, reason in report.rejected.items():
            if reason.startswith(("failed", "no reply")):
                logger.warning(
                    "round %d: client %s left out: %s", pending.round, client, reason
                )
        if updates:
            self._apply(updates)
            report.accepted = [u.client for u in updates]
            report.num_examples = sum(u.num_examples for u in updates)
            report.client_metrics = {u.client: u.metrics for u in updates}
        else:
            logger.warning(
                "round %d: no update accepted; the model is unchanged", pending.round
            )
        self.round = pending.round
        self._pending = None
        self._cache.clear()
        return report

    def _float32_reply_nbytes(self, data, size: int) -> int:
        # A reply that cannot be decoded has no float32 equivalent: count it as is.
        try:
            return wire.decode(data).float32_nbytes()
        except (ValueError, TypeError):
            return size

    def _apply(self, updates: list[Update]) -> None:
        total = float(sum(u.num_examples for u in updates))
        for name, master in self.model.items():
            average = torch.zeros_like(master)
            for update in updates:
                average.add_(update.values[name], alpha=update.num_examples / total)
            if name in self.buffers or (
                self.server_lr == 1.0 and self.server_momentum == 0.0
            ):
                self.model[name] = average
                continue
            delta = average - master
            if self.server_momentum > 0:
                buf = self.momentum.get(name)
                buf = (
                    delta if buf is None else buf.mul_(self.server_momentum).add_(delta)
                )
                self.momentum[name] = buf
                delta = buf
            self.model[name] = master + self.server_lr * delta

    # ---------------------------------------------------------- checkpoints
    def _settings(self) -> dict:
        return {
            "clients": list(self.clients),
            "clients_per_round": self.clients_per_round,
            "seed": self.seed,
            "server_lr": self.server_lr,
            "server_momentum": self.server_momentum,
        }

    def state_dict(self) -> dict:
        """Everything needed to continue after the last completed round.

        Returns
        -------
        dict
            ``version``, ``round``, ``model``, ``momentum`` and ``settings``.
        """
        return {
            "version": _STATE_VERSION,
            "round": self.round,
            "model": {n: v.clone() for n, v in self.model.items()},
            "momentum": {n: v.clone() for n, v in self.momentum.items()},
            "settings": self._settings(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; the settings must match this server's.

        Arguments
        ---------
        state : mapping
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported server state version {state.get('version')}")
        if state["settings"] != self._settings():
            raise ValueError(
                "server state was saved with other settings "
                f"({state['settings']} != {self._settings()}); resuming would "
                "not reproduce the run"
            )
        model = state["model"]
        if list(model) != list(self.model):
            raise ValueError("server state holds other model entries")
        for name, value in model.items():
            if value.shape != self.model[name].shape:
                raise ValueError(f"server state: {name} has another shape")
        self.model = {n: v.to(torch.float32).clone() for n, v in model.items()}
        self.momentum = {n: v.clone() for n, v in state["momentum"].items()}
        self.round = int(state["round"])
        self._pending = None
        self._cache.clear()

    def save(self, path: str | Path, extra: Mapping | None = None) -> None:
        """Checkpoint atomically (see :func:`atomic_save`).

        Arguments
        ---------
        path : str or Path
        extra : mapping, optional
            More plain data stored alongside (a run's log), under ``extra``.
        """
        atomic_save({"server": self.state_dict(), "extra": dict(extra or {})}, path)

    def load(self, path: str | Path) -> dict:
        """Restore a checkpoint written by :meth:`save`.

        Arguments
        ---------
        path : str or Path

        Returns
        -------
        dict
            The ``extra`` data saved with it.
        """
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(checkpoint["server"])
        return checkpoint.get("extra", {})
