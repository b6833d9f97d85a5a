"""Federated averaging server for OMC: it speaks bytes and knows no SpeechBrain.

The server keeps the global model in float32 (a server is not memory bound,
and a float32 master keeps the rounding of every broadcast from accumulating
over rounds). A round goes:

1. :meth:`FedAvgServer.configure_round` samples clients, a seeded function of
   ``(seed, round)``, and encodes for each one the global model under *its*
   plan: which variables travel compressed and in which format, drawn per
   ``(seed, round, client)`` when the partial-quantization policy is
   ``random`` (see :func:`~speechbrain_omc.engine.selection.make_plan`). The server
   has shapes, not modules: the parameters' roles (which are normalisation
   layers or position biases, kept float32 by weights-only quantization) come
   from whoever built the model (``roles``, see
   :func:`~speechbrain_omc.engine.selection.parameter_roles`), so that its plans
   equal the ones :func:`~speechbrain_omc.engine.selection.make_plan` gives on the
   model itself. The message itself is the plan: the client trains each
   variable in the form it received and must send it back in the same form
   (unless ``wire_mode`` compresses one direction only: see
   :mod:`~speechbrain_omc.federated.directions`).
   The metadata tells the client its round, id, RNG seed and local-training
   settings, and binds the reply: the run's id and a nonce of this round and
   client, which the reply must echo (a reply from another run or round is
   refused).
2. Clients train and reply (see :mod:`speechbrain_omc.federated.client`).
3. :meth:`FedAvgServer.aggregate` validates every reply; a bad one is left
   out with its reason, never averaged, and nothing a client sends can raise
   out of :meth:`~FedAvgServer.aggregate`. Each accepted update is scaled
   down to the round's update-norm limit and its values clamped to the
   round's value limits (on by default: 4 x the upper median of the
   reference replies' update norms and largest values, see
   :mod:`~speechbrain_omc.federated.defence`), then they are combined in
   float32 (FedAvg weighted by examples, or a robust rule, see
   :mod:`~speechbrain_omc.federated.aggregation`); optionally a server
   learning rate and server momentum (FedAvgM) apply the change. The new
   model is committed only if it is finite; a round that is not committed
   also resets the server momentum.

Streaming: the same round, one client at a time
-----------------------------------------------
:meth:`~FedAvgServer.configure_round` returns every client's message and
:meth:`~FedAvgServer.aggregate` takes every reply: clients per round times a
message. At scale a runner uses the streaming form instead, which both
runners (the embedded recipe and the Flower strategy) do:
:meth:`~FedAvgServer.open_round` samples, :meth:`~FedAvgServer.broadcast`
encodes one client's message when it is sent, :meth:`~FedAvgServer.receive`
validates one reply and folds it into running float32 sums (FedAvg, FedAvgM,
``norm_clip`` with a fixed limit; the reply is dropped at once), and
:meth:`~FedAvgServer.close_round` combines and commits. The server's extra
memory is then one float32 model, the compressed broadcast of the round
(each variable compressed once per round and format, shared by all clients),
the message in hand and one decoded entry, whatever the number of clients.
Each entry is decoded into the same reused buffers (a
:class:`~speechbrain_omc.codec.memory.Workspace`, outside malloc's heap) and the
heap is trimmed before each message and reply: decoded into the heap, the
temporaries of a thousand replies would each land in another free chunk and
keep its pages resident until the next trim. Rules that need every update
(``median``, ``trimmed_mean``, ``norm_clip`` without ``clip_norm``) keep the
decoded updates until the round closes, within ``memory_budget`` (checked
when the server is built).

The fold order is fixed for a run (see
:func:`~speechbrain_omc.federated.defence.reference_order`): up to
``norm_reference`` (8) clients a round, sorted client ids; beyond, the 8
reference clients drawn under the server's secret key (sorted; a
checkpoint keeps the key), then the rest in the draw's order. A reply
that arrives before those earlier in the order waits (as the bytes the
runner handed over, nothing decoded) until they have arrived,
failed or the round closes, so that the result does not depend on arrival
order and a resumed or re-run round gives the same bits. With the
update-norm bound, nothing is folded before the round's first
``norm_reference`` good replies in fold order (the reference replies) are
measured: those replies are checked as they come and wait, as bytes, for
the rest of them; the limits are then frozen (capped at twice the last
committed round's) and every reply is folded with them, which again does
not depend on arrival order. The server's extra
memory grows by those 8 replies, whatever the number of clients. Without
the bound (``norm_bound: None``) a reply is folded as soon as its turn
comes. ``max_held_bytes`` bounds what waits: beyond it the oldest waiting
reply is folded out of order (logged; the round's bits then depend on
timing, as they already do when a straggler misses the round), under the
previous round's limits if the reference replies are not all in (in the
first round, which has none, under those of the replies at hand).

What a reply must be, and in which order it is checked (cheapest first, the
binding before any payload is parsed, each reply decoded once), is
:mod:`~speechbrain_omc.federated.validation`'s.

Bytes are counted from the messages: ``len()`` of every broadcast and every
reply. :meth:`FedAvgServer.state_dict` holds what a resumed run needs,
including the settings it must match (see
:mod:`~speechbrain_omc.federated.checkpoint`).

Example
-------
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
import hashlib
import hmac
import logging
import math
import random
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.memory import Workspace, trim_heap
from speechbrain_omc.engine.accounting import (
    peak_rss_since_reset,
    reset_peak_rss,
    rss_bytes,
)
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.selection import (
    make_plan,
    resolve_roles,
    role_of,
    round_seed,
)
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.aggregation import (
    DEFAULT_MEMORY_BUDGET,
    Aggregation,
    MemoryBudgetExceeded,
    StreamingAggregator,
    check_memory_budget,
    clamp_update,
    make_aggregator,
)
from speechbrain_omc.federated.checkpoint import (
    CheckpointMismatch,
    CheckpointStore,
    diff_settings,
    plain,
)
from speechbrain_omc.federated.defence import (
    MAX_REASONS,
    NormLimit,
    check_carried,
    clean_text,
    clip_scale,
    reference_order,
)
from speechbrain_omc.federated.directions import (
    check_wire_mode,
    first_compression,
    wire_formats,
)
from speechbrain_omc.federated.validation import (
    MAX_EXAMPLES,
    ReplyExpectation,
    Update,
    UpdateRejected,
    check_metrics,
    is_int,
    nonfinite,
    open_reply,
    reply_nbytes,
    squared_distance,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_EXAMPLES",
    "FedAvgServer",
    "RoundReport",
    "Update",
    "UpdateRejected",
    "check_metrics",  # re-exported from validation, where they live
    "saved_clients",
]

_STATE_VERSION = 2
#: Default bound of the replies waiting for their turn in the fold order.
DEFAULT_MAX_HELD_BYTES = 2**30
#: The server's time in a round, by kind (see :class:`RoundReport`).
SECONDS = ("encode", "decode", "validate", "aggregate")


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
        Clients whose update was combined.
    rejected : dict
        Client to the reason it was left out (failure, no reply, invalid),
        escaped and bounded (see
        :func:`~speechbrain_omc.federated.defence.clean_text`): every
        sampled client's, and those of the first
        :data:`~speechbrain_omc.federated.defence.MAX_REASONS` replies from
        clients that were not sampled.
    bytes_down, bytes_up : int
        Bytes of the broadcasts and of the replies (rejected ones included).
    float32_bytes_down, float32_bytes_up : int
        The same messages' length with every entry in float32 (a reply
        refused before its entries were read counts as its length).
    num_examples : int
        Examples behind the accepted updates.
    client_metrics : dict
        Client to its reported metrics (accepted clients).
    model_updated : bool
        Whether the global model changed (no update accepted, or a combined
        model that was not finite, leaves it as it was).
    clipped : dict
        Client to the factor its update was scaled by to keep within the
        round's update-norm limit (only those scaled).
    ignored : int
        Replies not taken: from clients not sampled in the round, and
        second replies.
    seconds : dict
        The server's own time in the round: ``encode`` (compressing and
        encoding broadcasts), ``decode`` (checksums, parsing, decompressing
        replies), ``validate`` (binding, metadata, finiteness) and
        ``aggregate`` (folding, combining, the server step, committing).
    rss : dict, optional
        With ``measure_memory``: the process's resident bytes when the round
        opened (``before``) and its peak until it closed (``peak``).
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
    model_updated: bool = False
    clipped: dict[str, float] = field(default_factory=dict)
    ignored: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(SECONDS, 0.0)
    )
    rss: dict[str, int] | None = None

    def to_dict(self) -> dict:
        """Plain-data copy (JSON-serialisable).

        Returns
        -------
        dict
        """
        return asdict(self)


@dataclass
class _Pending:
    """An open round: its report so far and what the fold is waiting for."""

    report: RoundReport
    order: list[str]  # the fold order: see defence.reference_order
    aggregator: Any
    sampled: frozenset[str] = frozenset()
    done: set[str] = field(default_factory=set)  # folded, rejected or failed
    held: dict[str, Any] = field(default_factory=dict)  # waiting replies
    held_bytes: int = 0
    position: int = 0  # index in order of the next client to fold
    out_of_order: bool = False
    broken: bool = False  # a fold failed half-way: nothing may be committed
    rank: dict[str, int] = field(default_factory=dict)  # client -> fold position
    limit: NormLimit | None = None  # the update-norm bound's, this round
    # Replies checked before their fold (the limits' reference), with norms.
    checked: dict[str, tuple[Any, float | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rank = {client: i for i, client in enumerate(self.order)}

    @property
    def round(self) -> int:
        return self.report.round


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
        Server learning rate applied to the combined change (1 is FedAvg).
    server_momentum : float
        Server momentum (FedAvgM); 0 disables.
    buffers : iterable of str
        Entries that are not parameters (running statistics): combined but
        never compressed and not moved by the server optimizer.
    client_config : mapping, optional
        Local-training settings sent to every client in the metadata
        (for example ``{"local_epochs": 1}``).
    max_examples : int or mapping, optional
        Largest ``num_examples`` a client may claim: one bound for all, or
        client id to its own (its partition size). A reply claiming more is
        rejected. Without it (``None``) the server cannot know what a claim
        is worth: every accepted client weighs the same (claims up to
        ``2**53`` are accepted, and reported, but weigh nothing more).
    aggregation : str or Aggregation
        How accepted models are combined (``fedavg``, ``median``,
        ``trimmed_mean``, ``norm_clip``), and the update-norm bound applied
        before any of them (on by default, see
        :class:`~speechbrain_omc.federated.aggregation.Aggregation`).
    run_id : str, optional
        Id of this run, sent in every broadcast and required in every reply;
        random by default (a checkpoint restores it).
    run_settings : mapping, optional
        More settings a checkpoint must match to be resumed (for example the
        clients' training hyperparameters); stored, never sent.
    roles : mapping, optional
        Parameter name to role (``"matrix"``, ``"vector"``,
        ``"normalisation"``, ``"position bias"``), as
        :func:`~speechbrain_omc.engine.selection.parameter_roles` gives them for the
        model; names left out are inferred from name and shape, which cannot
        tell a 2-D normalisation gain from a matrix. Never sent (the message
        is the plan); a checkpoint must match them.
    wire_mode : str
        Which directions travel in the plan's formats: ``"both"`` (OMC),
        ``"download"`` (replies float32) or ``"upload"`` (broadcasts
        float32); see :mod:`~speechbrain_omc.federated.directions`.
    reference_key : bytes, optional
        The 32-byte secret that draws each round's reference clients (see
        :func:`~speechbrain_omc.federated.defence.reference_order`); random
        by default (a checkpoint restores it). Give one only to re-run a
        run's rounds of more than ``norm_reference`` clients bit for bit,
        and never to a client.
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
        if not server_lr > 0 or not 0 <= server_momentum < 1:
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
        if roles is not None and not isinstance(roles, Mapping):
            raise TypeError(f"FedAvgServer: roles must be a mapping, got {roles!r}")
        wrong = sorted(self.buffers & set(roles or {}))
        if wrong:
            raise ValueError(f"FedAvgServer: buffers have no role: {wrong[:5]}")
        # Checked now (unknown names or roles), not at the first broadcast.
        self.roles = resolve_roles(self._shapes(), roles)
        self.clients = clients
        self.clients_per_round = int(clients_per_round)
        self.omc = omc
        self.wire_mode = check_wire_mode(wire_mode, omc)
        self.seed = int(seed)
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.client_config = dict(client_config or {})
        self.max_examples = self._bounds(max_examples)
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
        self.run_id = str(run_id) if run_id is not None else secrets.token_hex(16)
        self.run_settings = plain(dict(run_settings or {}))
        self._nonce_key = secrets.token_bytes(32)
        # Keys the reference draw (never sent; a checkpoint keeps it, so a
        # resumed run draws as the saved one would have).
        if reference_key is None:
            reference_key = secrets.token_bytes(32)
        if not isinstance(reference_key, bytes) or len(reference_key) != 32:
            raise ValueError("FedAvgServer: reference_key must be 32 bytes")
        self._reference_key = reference_key
        self._carried: dict | None = None  # the last committed round's limits
        self.momentum: dict[str, torch.Tensor] = {}
        self.round = 0  # completed rounds
        self._pending: _Pending | None = None
        # (round, name, format) -> the compressed broadcast and its expectation
        self._cache: dict[tuple, tuple[CompressedTensor, wire.Expected]] = {}
        self._float32_expected = wire.expect_like(self.model)
        # The replies' entries are decoded into these reused buffers, one
        # entry at a time, not into the heap (see _fold): one buffer of the
        # largest entry's values and one of its codes.
        self._workspace = Workspace(exact=False)

    def model_nbytes(self) -> int:
        """Bytes of the float32 global model (parameters and buffers).

        Returns
        -------
        int
        """
        return sum(4 * value.numel() for value in self.model.values())

    def _bounds(self, max_examples) -> dict[str, int] | None:
        if max_examples is None:
            return None  # every client weighs the same
        if isinstance(max_examples, Mapping):
            bounds = {str(c): max_examples.get(c) for c in self.clients}
            missing = [c for c, b in bounds.items() if b is None]
            if missing:
                raise ValueError(f"FedAvgServer: no max_examples for {missing[:5]}")
        else:
            bounds = dict.fromkeys(self.clients, max_examples)
        for client, bound in bounds.items():
            if not is_int(bound) or not 1 <= bound <= MAX_EXAMPLES:
                raise ValueError(
                    f"FedAvgServer: max_examples of {client} must be an integer "
                    f"in [1, 2**53], got {bound!r}"
                )
        return bounds

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
        plan = make_plan(
            self._shapes(), self.omc, round=round, client=client, roles=self.roles
        )
        for entry in plan.compressed:
            out[entry.name] = entry.format
        return out

    def _shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        # The parameters, the entries a plan is about (buffers never travel
        # compressed).
        return [
            (name, tuple(value.shape))
            for name, value in self.model.items()
            if name not in self.buffers
        ]

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

    def nonce(self, round: int, client: str) -> str:
        """The nonce a reply of ``client`` in ``round`` must echo.

        Derived from a secret that this server drew when it started, and that
        no checkpoint keeps: a client cannot forge the nonce of a round it was
        not sent, and after a resume the round that is done again has other
        nonces than the broadcast before the crash, whose late replies are
        refused.

        Arguments
        ---------
        round : int
        client : str

        Returns
        -------
        str
            32 hex digits.
        """
        text = f"{self.run_id}/{round}/{client}".encode()
        return hmac.new(self._nonce_key, text, hashlib.sha256).hexdigest()[:32]

    def _compressed(self, round: int, name: str, fmt: str):
        # The same variable in the same format is shared by all clients of a
        # round: compress it (and size its expected reply) once.
        key = (round, name, fmt)
        if key not in self._cache:
            value = first_compression(self.model[name], fmt, self.omc or OMCConfig())
            self._cache[key] = (value, wire.expect_like({name: value})[name])
        return self._cache[key]

    def _wire_formats(self, round: int, client: str, way: str) -> dict[str, str]:
        # The plan, or float32 where the wire mode leaves that way float32.
        return wire_formats(self.formats(round, client), self.wire_mode, way)

    def _broadcast(self, client: str, round: int):
        entries = {}
        for name, fmt in self._wire_formats(round, client, "down").items():
            if fmt == "float32":
                entries[name] = self.model[name]
            else:
                entries[name] = self._compressed(round, name, fmt)[0]
        meta = {
            "type": "global",
            "round": round,
            "client": client,
            "seed": self.client_seed(round, client),
            "config": self.client_config,
            "run": self.run_id,
            "nonce": self.nonce(round, client),
        }
        return wire.encode(entries, meta), entries, meta

    def _reach(self, round: int, name: str) -> float:
        # The largest magnitude of a float32 entry as broadcast this round
        # (what a reply's values are checked against), once per round.
        key = (round, name, "reach")
        if key not in self._cache:
            value = self.model[name]
            low, high = torch.aminmax(value) if value.numel() else (0.0, 0.0)
            self._cache[key] = max(-float(low), float(high))
        return self._cache[key]

    def _expectation(self, round: int, client: str) -> ReplyExpectation:
        # Rebuilt when a reply comes (the plan is a function of round and
        # client): a round of a thousand clients keeps no per-client tables.
        expect, sent, reaches = {}, {}, {}
        for name, fmt in self._wire_formats(round, client, "up").items():
            if fmt == "float32":
                expect[name] = self._float32_expected[name]
                reaches[name] = self._reach(round, name)
            else:
                sent[name], expect[name] = self._compressed(round, name, fmt)
        return ReplyExpectation(
            self.run_id,
            round,
            client,
            self.nonce(round, client),
            MAX_EXAMPLES if self.max_examples is None else self.max_examples[client],
            expect,
            sent=sent,
            reaches=reaches,
        )

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
            ``{"type": "global", "round", "client", "seed", "config", "run",
            "nonce"}``.
        """
        round = self.round + 1 if round is None else int(round)
        return self._broadcast(str(client), round)[0]

    # ---------------------------------------------------------------- rounds
    def open_round(self, round: int | None = None) -> list[str]:
        """Sample the next round's clients and open it (nothing is encoded).

        Arguments
        ---------
        round : int, optional
            Must be the next round (the default); given for callers that
            track rounds themselves.

        Returns
        -------
        list of str
            The sampled clients, in sampled order; :meth:`fold_order` is the
            order their replies are combined in.
        """
        expected = self.round + 1
        round = expected if round is None else int(round)
        if round != expected:
            raise ValueError(f"open_round: next round is {expected}, got {round}")
        if self._pending is not None:
            logger.warning(
                "round %d opened again; its replies so far are dropped", round
            )
        self._pending = None
        self._cache = {k: v for k, v in self._cache.items() if k[0] == round}
        before = None
        if self.measure_memory:
            gc.collect()  # the previous round's garbage is not this round's peak
            if reset_peak_rss():
                before = rss_bytes()
        sampled = self.sample_clients(round)
        report = RoundReport(round, list(sampled))
        if before is not None:
            report.rss = {"before": before, "peak": before}
        self._pending = _Pending(
            report,
            reference_order(
                self._reference_key, round, sampled, self.aggregation.norm_reference
            ),
            make_aggregator(self.aggregation, self.model, self.memory_budget),
            frozenset(sampled),
            limit=NormLimit(
                self.aggregation.norm_bound,
                self.aggregation.norm_reference,
                carried=self._carried,
            ),
        )
        return list(sampled)

    def fold_order(self) -> list[str]:
        """The open round's clients in the order their replies are combined.

        A runner that sends in this order never makes a reply wait.

        Returns
        -------
        list of str
        """
        return list(self._open("fold_order").order)

    def _open(self, what: str) -> _Pending:
        if self._pending is None:
            raise RuntimeError(f"{what}: no round is open (open_round first)")
        return self._pending

    def broadcast(self, client: str) -> bytes:
        """Encode the open round's message for one of its clients.

        Counted in the round's bytes down each time it is called.

        Arguments
        ---------
        client : str
            A client sampled in the open round.

        Returns
        -------
        bytes
            See :meth:`message_for`.
        """
        pending, client = self._open("broadcast"), str(client)
        if client not in pending.sampled:
            raise ValueError(
                f"broadcast: {client!r} is not sampled in round {pending.round}"
            )
        # A runner that drops each message once sent and each reply once
        # received leaves their memory free but held by malloc: messages are
        # larger than its mmap threshold only until the first is freed (glibc
        # then raises the threshold), so they come from the heap and stay
        # resident. Returned here (about 0.3 ms), the round's RSS holds one
        # message or reply at a time, not the holes of all the previous ones.
        trim_heap()
        start = time.perf_counter()
        data, entries, meta = self._broadcast(client, pending.round)
        report = pending.report
        report.bytes_down += len(data)
        shapes = {name: tuple(value.shape) for name, value in entries.items()}
        report.float32_bytes_down += wire.encoded_nbytes(shapes, meta)
        report.seconds["encode"] += time.perf_counter() - start
        return data

    def configure_round(self, round: int | None = None) -> dict[str, bytes]:
        """Open the round and encode every sampled client's message.

        Holds clients per round times a message: at scale, use
        :meth:`open_round` and :meth:`broadcast` (see the module docstring).

        Arguments
        ---------
        round : int, optional
            Must be the next round (the default).

        Returns
        -------
        dict
            Client id to its message, in sampled order.
        """
        return {client: self.broadcast(client) for client in self.open_round(round)}

    # ------------------------------------------------------------ validation
    def validate(self, client: str, data: bytes) -> Update:
        """Decode and check one reply of the open round (nothing is combined).

        Arguments
        ---------
        client : str
            Who sent it.
        data : bytes-like
            The reply message.

        Returns
        -------
        Update
            Every entry decoded.

        Raises
        ------
        UpdateRejected
            With the reason (see :mod:`~speechbrain_omc.federated.validation`);
            nothing else, whatever ``data`` holds: as in :meth:`aggregate`, a
            failure of the validation itself is logged with its traceback and
            reported as a rejection.
        """
        client = str(client)
        pending = self._pending
        try:
            if pending is None:
                raise UpdateRejected("no round is open")
            if client not in pending.sampled:
                raise UpdateRejected(f"not sampled in round {pending.round}")
            reply = open_reply(data, self._expectation(pending.round, client))
            values = dict(reply.tensors())
        except UpdateRejected:
            raise
        except Exception as error:  # noqa: BLE001 - a bug must not end the run
            logger.exception("validating a reply of %s failed", client)
            raise UpdateRejected(
                f"internal error while validating: {type(error).__name__}"
            ) from None
        return Update(
            client,
            reply.num_examples,
            values,
            reply.metrics,
            reply.nbytes,
            reply.float32_nbytes,
        )

    # ----------------------------------------------------------- aggregation
    def receive(self, client: str, data: Any) -> None:
        """Take one reply of the open round: validate it and fold it in.

        Never raises for what a client sends: a bad reply is left out of the
        round with its reason (see :class:`RoundReport`). The reply is folded
        when its turn in :meth:`fold_order` comes (at once, if the runner
        follows that order and the round's update-norm limit is known) and
        then dropped.

        Arguments
        ---------
        client : str
            Who sent it.
        data : bytes-like
            The reply message (kept, not copied, while it waits its turn).
        """
        pending, client = self._open("receive"), str(client)
        trim_heap()  # the message sent to this client, dropped (see broadcast)
        report, size = pending.report, reply_nbytes(data)
        report.bytes_up += size
        if client not in pending.sampled:
            self._ignore(pending, client, f"not sampled in round {pending.round}", size)
            return
        if client in pending.done or client in pending.held:
            self._ignore(pending, client, None, size)
            return
        pending.held[client] = data
        pending.held_bytes += size
        self._drain(pending)

    def fail(self, client: str, reason: str) -> None:
        """Record that a client of the open round will not reply.

        Its successors in the fold order need not wait for it.

        Arguments
        ---------
        client : str
            The client.
        reason : str
            Why (an exception, a timeout, a simulated dropout); escaped and
            cut to a bounded length (it may hold a client's text).
        """
        pending, client = self._open("fail"), str(client)
        if client in pending.done or client in pending.held:
            return
        pending.report.rejected[client] = clean_text(f"failed: {reason}")
        pending.done.add(client)
        self._drain(pending)

    def _ignore(
        self, pending: _Pending, client: str, reason: str | None, size: int
    ) -> None:
        """Count a stranger's reply (``reason`` given) or a second one (``None``).

        Only the first :data:`~.defence.MAX_REASONS` are kept and logged, so
        that a flood of them cannot grow the report or the log.

        Arguments
        ---------
        pending : _Pending
            The open round.
        client : str
            Who sent it (as sent: escaped here).
        reason : str, optional
            Why it is ignored (clean already).
        size : int
            Its length in bytes.
        """
        report = pending.report
        report.float32_bytes_up += size
        report.ignored += 1
        if report.ignored > MAX_REASONS:
            return
        client = clean_text(client, 80)
        if reason is not None:
            report.rejected[client] = reason
        logger.warning(
            "round %d: reply of client %s ignored: %s",
            pending.round,
            client,
            reason or "a second reply",
        )

    def _drain(self, pending: _Pending) -> None:
        # Fold the waiting replies whose turn has come, in order, once the
        # norms the update-norm limit starts from are known.
        if not pending.limit.ready:
            self._reference(pending, final=False)
        order = pending.order
        while pending.limit.ready and pending.position < len(order):
            client = order[pending.position]
            if client in pending.held:
                self._fold(pending, client)
            elif client not in pending.done:
                break
            pending.position += 1
        # Too much waiting: fold the earliest waiting reply out of order.
        while pending.held and pending.held_bytes > self.max_held_bytes:
            if not pending.out_of_order:
                logger.warning(
                    "round %d: over %d bytes of replies wait for client %s; "
                    "folding out of order (this round's result now depends on "
                    "arrival order)",
                    pending.round,
                    self.max_held_bytes,
                    order[pending.position],
                )
                pending.out_of_order = True
            if not pending.limit.ready:
                if pending.limit.start_carried():
                    source = "the previous round's limits"
                else:  # the first round: nothing was carried
                    self._reference(pending, final=True)
                    source = "the replies at hand"
                logger.warning(
                    "round %d: the update-norm limit starts from %s, not the "
                    "round's reference replies",
                    pending.round,
                    source,
                )
            self._fold(pending, min(pending.held, key=pending.rank.__getitem__))

    def _reference(self, pending: _Pending, final: bool) -> None:
        """Start the round's limits once its reference replies are known.

        They are the first ``norm_reference`` replies in fold order (drawn
        by the seed) that pass the checks (each checked once, kept for its
        fold); see :class:`~speechbrain_omc.federated.defence.NormLimit`.

        Arguments
        ---------
        pending : _Pending
            The open round.
        final : bool
            The replies still missing will not come: start from those at
            hand (else wait for them).
        """
        limit, found = pending.limit, {}
        for client in pending.order:
            if len(found) >= limit.reference:
                break
            if client in pending.held and client not in pending.checked:
                self._check(pending, client)
            if client in pending.checked:
                reply, norm = pending.checked[client]
                found[client] = (norm, reply.peaks)
            elif client not in pending.done and not final:
                return  # its reply may still come
        limit.start(found)

    def _reject(self, pending: _Pending, client: str, reason: str, f32: int) -> None:
        reason = clean_text(reason)
        pending.report.rejected[client] = reason
        pending.report.float32_bytes_up += f32
        logger.warning(
            "round %d: update of client %s rejected: %s", pending.round, client, reason
        )

    def _check(self, pending: _Pending, client: str) -> bool:
        """Validate one waiting reply (it stays held); nothing escapes.

        A good reply is kept in ``pending.checked`` with its update norm
        (and its largest values, see :attr:`~.validation.Reply.peaks`); a
        bad one is dropped with its reason.

        Arguments
        ---------
        pending : _Pending
            The open round.
        client : str
            Whose held reply.

        Returns
        -------
        bool
            Whether it passed.
        """
        data = pending.held[client]
        size = reply_nbytes(data)
        report, aggregator = pending.report, pending.aggregator
        reply = None
        try:
            reply = open_reply(data, self._expectation(pending.round, client))
            bounded = self.aggregation.norm_bound is not None
            master = self.model if aggregator.needs_norm or bounded else None
            # Every entry decoded and checked once, each into the workspace:
            # decoded in the heap, a thousand replies' entries would each
            # land in another free chunk (whose pages the last trim gave
            # back) and leave it resident until the next trim.
            norm = reply.check(master, self._workspace)
        except UpdateRejected as error:
            counted = error.float32_nbytes
            reason, f32 = str(error), size if counted is None else counted
        except Exception as error:  # noqa: BLE001 - a bug must not end the run
            logger.exception("round %d: validating %s failed", pending.round, client)
            reason = f"internal error while validating: {type(error).__name__}"
            f32 = size
        else:
            pending.checked[client] = (reply, norm)
            return True
        finally:
            if reply is not None:
                for key in ("decode", "validate"):
                    report.seconds[key] += reply.seconds[key]
                    reply.seconds[key] = 0.0
        del pending.held[client]
        pending.held_bytes -= size
        pending.done.add(client)
        self._reject(pending, client, reason, f32)
        return False

    def _fold(self, pending: _Pending, client: str) -> None:
        """Validate one waiting reply (unless done) and fold it in; nothing
        escapes."""
        if client not in pending.checked and not self._check(pending, client):
            return
        reply, norm = pending.checked.pop(client)
        limit = pending.limit.value()
        data = pending.held.pop(client)
        pending.held_bytes -= reply_nbytes(data)
        del data
        pending.done.add(client)
        report, aggregator = pending.report, pending.aggregator
        report.float32_bytes_up += reply.float32_nbytes
        clamped = self._clamped(pending, client, reply)
        if clamped:  # its norm once clamped: the L2 bound does not count twice
            norm = self._clamped_norm(reply, pending.limit, clamped)
        scale = clip_scale(norm, limit)
        if scale < 1.0 or clamped:
            report.clipped[client] = scale
        if scale < 1.0:
            logger.warning(
                "round %d: update of client %s scaled by %.3g (norm %.3g, "
                "over the round's limit %.3g)",
                pending.round,
                client,
                scale,
                norm,
                limit,
            )
        weight = reply.num_examples if self.max_examples is not None else 1
        start = time.perf_counter()
        try:
            # Decoded again entry by entry: the reply passed every check, so
            # none of it can be half folded when one of its entries is bad.
            # A streaming rule drops each entry once folded (its buffer is
            # reused); a buffered one keeps them all, in tensors of their own.
            streaming = isinstance(aggregator, StreamingAggregator)
            workspace = self._workspace if streaming else None
            tensors = reply.tensors(workspace)
            if clamped:
                tensors = self._clamp(tensors, pending.limit, clamped)
            aggregator.add(tensors, weight, norm, scale)
        except MemoryBudgetExceeded as error:
            self._reject(pending, client, str(error), 0)
            return
        except Exception:  # noqa: BLE001 - a bug must not end the run
            logger.exception("round %d: folding in %s failed", pending.round, client)
            pending.broken = True
            report.rejected[client] = "internal error while aggregating"
            return
        finally:
            report.seconds["aggregate"] += time.perf_counter() - start
            # tensors() timed its own decoding and checks
            report.seconds["decode"] += reply.seconds["decode"]
            report.seconds["validate"] += reply.seconds["validate"]
            report.seconds["aggregate"] -= (
                reply.seconds["decode"] + reply.seconds["validate"]
            )
        report.accepted.append(client)
        report.num_examples += reply.num_examples
        report.client_metrics[client] = reply.metrics

    def _clamped(self, pending: _Pending, client: str, reply: Any) -> set[str]:
        """The entries of a reply with update values beyond their limit.

        Arguments
        ---------
        pending : _Pending
            The open round.
        client : str
            Who sent the reply.
        reply : Reply
            Checked (its :attr:`~.validation.Reply.peaks` measured).

        Returns
        -------
        set of str
            Empty when nothing is over (the reply is folded bit for bit).
        """
        limit = pending.limit
        over = {n for n, peak in reply.peaks.items() if peak > limit.peak(n)}
        if over:
            logger.warning(
                "round %d: update of client %s clamped in %d entries (%s) to "
                "the round's largest update values",
                pending.round,
                client,
                len(over),
                ", ".join(sorted(over)[:3]),
            )
        return over

    def _clamped_norm(self, reply: Any, limit: NormLimit, names: set[str]) -> float:
        """The L2 norm of a reply's update once its values are clamped.

        Decodes the reply once more (only a clamped reply pays for it).

        Arguments
        ---------
        reply : Reply
            A checked reply.
        limit : NormLimit
            The round's limits.
        names : set of str
            Its entries to clamp.

        Returns
        -------
        float
        """
        squares = 0.0
        for name, value in self._clamp(reply.tensors(self._workspace), limit, names):
            squares += squared_distance(value, self.model[name])
            del value
        return math.sqrt(squares) if math.isfinite(squares) else math.inf

    def _clamp(self, tensors, limit: NormLimit, names: set[str]):
        # Each update value of the named entries within [-peak, peak].
        for name, value in tensors:
            if name in names:
                value = clamp_update(value, self.model[name], limit.peak(name))
            yield name, value
            del value

    def close_round(self, failures: Mapping[str, str] | None = None) -> RoundReport:
        """Fold what still waits, combine, commit and close the round.

        Arguments
        ---------
        failures : mapping, optional
            Client id to why it did not reply (as :meth:`fail`).

        Returns
        -------
        RoundReport
            The model is unchanged when no reply was accepted or the
            combined model is not finite.
        """
        pending = self._open("close_round")
        trim_heap()  # the last reply, dropped (see broadcast)
        for client, reason in (failures or {}).items():
            self.fail(client, reason)
        if not pending.limit.ready:  # the replies still missing will not come
            self._reference(pending, final=True)
        for client in list(pending.order):  # the rest, in order
            if client in pending.held:
                self._fold(pending, client)
        report = pending.report
        if report.ignored > MAX_REASONS:
            logger.warning(
                "round %d: %d more replies ignored (not logged)",
                pending.round,
                report.ignored - MAX_REASONS,
            )
        for client in pending.order:
            if client not in pending.done:
                report.rejected[client] = "no reply"
        for client, reason in report.rejected.items():
            if reason.startswith(("failed", "no reply")):
                logger.warning(
                    "round %d: client %s left out: %s", pending.round, client, reason
                )
        # Accepted in fold order, whatever order they were folded in.
        report.accepted.sort(key=pending.rank.__getitem__)
        report.client_metrics = {c: report.client_metrics[c] for c in report.accepted}
        start = time.perf_counter()
        if pending.broken:
            logger.error(
                "round %d: a fold failed half-way; the model is unchanged",
                pending.round,
            )
        elif report.accepted:
            report.model_updated = self._apply(
                pending.aggregator.result(), pending.round
            )
            if report.model_updated and self.aggregation.norm_bound is not None:
                self._carried = pending.limit.carry()
        else:
            logger.warning(
                "round %d: no update accepted; the model is unchanged", pending.round
            )
        pending.aggregator = None  # its running sums go now, not at the next round
        report.seconds["aggregate"] += time.perf_counter() - start
        self.round = pending.round
        self._pending = None
        self._cache.clear()
        trim_heap()  # freed decoded entries and messages back to the system
        if report.rss is not None:
            report.rss["peak"] = max(peak_rss_since_reset(), report.rss["before"])
        return report

    def aggregate(
        self,
        replies: Mapping[str, Any],
        failures: Mapping[str, str] | None = None,
    ) -> RoundReport:
        """Validate the replies, combine the good ones, close the round.

        Whatever the replies hold, this returns a report: a bad reply is left
        out with its reason. The same as :meth:`receive` for each reply and
        :meth:`close_round`.

        Arguments
        ---------
        replies : mapping
            Client id to its reply message (bytes-like).
        failures : mapping, optional
            Client id to why it did not reply (an exception, a timeout):
            recorded in the report.

        Returns
        -------
        RoundReport
            The model is unchanged when no reply was accepted or the
            combined model is not finite.
        """
        if self._pending is None:
            raise RuntimeError("aggregate: configure_round first")
        for client, reason in (failures or {}).items():
            self.fail(client, reason)
        for client in sorted(replies, key=str):
            self.receive(client, replies[client])
        return self.close_round()

    def _apply(self, combined: dict[str, torch.Tensor], round: int) -> bool:
        """Apply the server step to the combination and commit if finite.

        Works entry by entry in the combination's own tensors, so that no
        second model is ever allocated: a new model entry is computed to
        check it (and dropped) and computed again, the same way, to commit.
        """
        lr, beta = self.server_lr, self.server_momentum
        plain_fedavg = lr == 1.0 and beta == 0.0
        momentum: dict[str, torch.Tensor] = {}
        bad = []
        for name, master in self.model.items():
            value = combined[name]
            if name in self.buffers or plain_fedavg:
                if nonfinite(value):
                    bad.append(name)
                continue
            delta = value.sub_(master)  # combined - master, in place
            if beta > 0:
                previous = self.momentum.get(name)
                if previous is not None:
                    delta = previous * beta + delta
                momentum[name] = combined[name] = delta
                new = master + lr * delta  # checked, then dropped
                finite = not nonfinite(new)
                del new
                if not finite or nonfinite(delta):
                    bad.append(name)
            else:
                # lr * delta + master: the same bits as master + lr * delta
                # (float addition commutes), in the tensor at hand.
                combined[name] = delta.mul_(lr).add_(master)
                if nonfinite(combined[name]):
                    bad.append(name)
        # Nothing is committed unless all of it is finite (values near the
        # float32 limit can overflow in the sum or the server step).
        if bad:
            logger.error(
                "round %d: the combined model is not finite (%s); the model is "
                "unchanged%s",
                round,
                ", ".join(bad[:5]),
                "; the server momentum is reset" if self.momentum else "",
            )
            # Momentum that led here would lead here again every round.
            self.momentum = {}
            return False
        for name in list(self.model):
            if beta > 0 and name in momentum:
                self.model[name] = self.model[name] + lr * momentum[name]
            else:
                self.model[name] = combined[name]
        if beta > 0:
            self.momentum = {**self.momentum, **momentum}
        return True

    # ---------------------------------------------------------- checkpoints
    def settings(self) -> dict:
        """What a checkpoint must match to be resumed by this server.

        Returns
        -------
        dict
            Clients, sampling, seed, server optimizer, compression, buffers,
            client config, bounds, aggregation, the model's names and shapes,
            the roles names and shapes alone would not give (absent when
            there are none, so a checkpoint of a server without roles still
            matches), and ``run_settings``, as plain data.
        """
        settings = {
            "clients": list(self.clients),
            "clients_per_round": self.clients_per_round,
            "seed": self.seed,
            "server_lr": self.server_lr,
            "server_momentum": self.server_momentum,
            "omc": None if self.omc is None else asdict(self.omc),
            "buffers": sorted(self.buffers),
            "client_config": self.client_config,
            "max_examples": self.max_examples,
            "aggregation": asdict(self.aggregation),
            "model": {n: list(v.shape) for n, v in self.model.items()},
            "run": self.run_settings,
        }
        # Roles change plans: a run resumed with others would not continue
        # the one that was saved.
        roles = {
            name: role
            for name, role in self.roles.items()
            if role != role_of(name, self.model[name].shape)
        }
        if roles:
            settings["roles"] = roles
        if self.wire_mode != "both":  # absent by default: older checkpoints match
            settings["wire_mode"] = self.wire_mode
        return plain(settings)

    def state_dict(self) -> dict:
        """Everything needed to continue after the last completed round.

        Returns
        -------
        dict
            ``version``, ``round``, ``run_id``, ``model``, ``momentum``,
            ``settings``, the reference draw's key and the carried limits.
        """
        return {
            "version": _STATE_VERSION,
            "round": self.round,
            "run_id": self.run_id,
            "model": {n: v.clone() for n, v in self.model.items()},
            "momentum": {n: v.clone() for n, v in self.momentum.items()},
            "settings": self.settings(),
            "reference_key": self._reference_key,
            "limits": self._carried,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` after checking all of it.

        Arguments
        ---------
        state : mapping

        Raises
        ------
        CheckpointMismatch
            Saved with other settings (each difference named).
        ValueError
            Malformed state: wrong version or types, entries that are not
            this model's, wrong shapes, non-finite values (nothing is changed).
        """
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            version = state.get("version") if isinstance(state, Mapping) else None
            raise ValueError(f"unsupported server state version {version!r}")
        if not isinstance(state["settings"], Mapping):
            raise ValueError("server state: settings is not a mapping")
        saved = self._undefended_if_older(state["settings"])
        differences = diff_settings(saved, self.settings())
        if differences:
            hint = ""
            if any(d.startswith("aggregation.norm_") for d in differences):
                hint = (
                    "\n(a run saved without the update-norm bound resumes with "
                    "--norm_bound null; --fresh_start True starts over)"
                )
            raise CheckpointMismatch(
                "the checkpoint was saved with other settings; resuming would "
                "not reproduce the run:\n  " + "\n  ".join(differences) + hint
            )
        round_ = state["round"]
        if not is_int(round_) or round_ < 0:
            raise ValueError(f"server state: bad round {round_!r}")
        model = self._checked(state["model"], "model", complete=True)
        momentum = self._checked(state["momentum"], "momentum", complete=False)
        run_id = state["run_id"]
        if not isinstance(run_id, str) or not 0 < len(run_id) <= 64:
            raise ValueError(f"server state: bad run id {str(run_id)[:80]!r}")
        # Absent from checkpoints older than them: a new key, nothing carried.
        key = state.get("reference_key", self._reference_key)
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("server state: bad reference key")
        carried = check_carried(state.get("limits"), self.model)
        self.run_id, self._reference_key, self._carried = run_id, key, carried
        self.model, self.momentum, self.round = model, momentum, round_
        self._pending = None
        self._cache.clear()

    def _undefended_if_older(self, saved: Mapping) -> Mapping:
        """Saved settings of a run from before the update-norm bound, read as
        the undefended setting it ran with (``norm_bound: None``).

        Arguments
        ---------
        saved : mapping
            The checkpoint's settings.

        Returns
        -------
        mapping
            ``saved``, its ``aggregation`` completed when the bound's keys
            are absent (``norm_reference`` does nothing without the bound:
            this run's is taken).
        """
        aggregation = saved.get("aggregation")
        if not isinstance(aggregation, Mapping) or "norm_bound" in aggregation:
            return saved
        older = {"norm_bound": None, "norm_reference": self.aggregation.norm_reference}
        return {**saved, "aggregation": {**older, **aggregation}}

    def _checked(self, tensors: Mapping, what: str, complete: bool) -> dict:
        if not isinstance(tensors, Mapping):
            raise ValueError(f"server state: {what} is not a mapping")
        names = list(tensors)
        if complete and names != list(self.model):
            raise ValueError(f"server state: {what} holds other entries")
        out = {}
        for name in names:
            value = tensors[name]
            if name not in self.model or not isinstance(value, torch.Tensor):
                raise ValueError(f"server state: {what} entry {name!r} is not ours")
            if tuple(value.shape) != tuple(self.model[name].shape):
                raise ValueError(
                    f"server state: {what} {name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(self.model[name].shape)}"
                )
            value = value.to(torch.float32)
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"server state: {what} {name} is not finite")
            out[name] = value.clone()
        return out

    def save(self, path: str | Path | CheckpointStore, extra: Mapping | None = None):
        """Checkpoint (atomically; the previous checkpoint is kept).

        Arguments
        ---------
        path : str, Path or CheckpointStore
            The checkpoint file.
        extra : mapping, optional
            More plain data stored alongside (a run's log), under ``extra``.
        """
        store = path if isinstance(path, CheckpointStore) else CheckpointStore(path)
        store.save({"server": self.state_dict(), "extra": dict(extra or {})})

    def load(self, path: str | Path | CheckpointStore) -> dict | None:
        """Restore the newest usable checkpoint (see :class:`CheckpointStore`).

        Arguments
        ---------
        path : str, Path or CheckpointStore
            The checkpoint file.

        Returns
        -------
        dict or None
            The ``extra`` data saved with it; ``None`` without a checkpoint.

        Raises
        ------
        CheckpointMismatch
            The checkpoint was saved with other settings.
        CheckpointCorrupt
            Neither the checkpoint nor the previous one is usable.
        """
        store = path if isinstance(path, CheckpointStore) else CheckpointStore(path)

        def apply(checkpoint):
            extra = checkpoint.get("extra", {})
            if not isinstance(extra, Mapping):
                raise ValueError("extra is not a mapping")
            self.load_state_dict(checkpoint["server"])
            return dict(extra)

        loaded = store.load(apply)
        if loaded is None:
            return None
        extra, used = loaded
        logger.info("resumed from %s after round %d", used, self.round)
        return extra


def saved_clients(path: str | Path | CheckpointStore) -> list[str] | None:
    """The client ids of the newest readable server checkpoint.

    A resumed run takes its clients from here rather than from whoever
    answers first: a node that is missing, or one more, does not change the
    run's settings, and no node can join under a new id.

    Arguments
    ---------
    path : str, Path or CheckpointStore
        The checkpoint file.

    Returns
    -------
    list of str or None
        ``None`` without a checkpoint.

    Raises
    ------
    CheckpointCorrupt
        Neither the checkpoint nor the previous one can be read.

    Example
    -------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "server.ckpt"
    >>> saved_clients(path) is None
    True
    >>> FedAvgServer({"w": torch.zeros(2)}, ["b", "a"], 1).save(path)
    >>> saved_clients(path)
    ['b', 'a']
    """
    store = path if isinstance(path, CheckpointStore) else CheckpointStore(path)

    def clients(checkpoint: Mapping) -> list[str]:
        value = checkpoint["server"]["settings"]["clients"]
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise ValueError("the saved clients are not a list of ids")
        return list(value)

    loaded = store.load(clients)
    return None if loaded is None else loaded[0]
