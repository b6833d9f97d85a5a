"""One open round of a federated server: receive, fail, fold, close.

Every reply's path is here: :meth:`Round.receive` holds it until its turn in
the fold order, which is fixed for a run so that the result does not depend
on arrival order; then it is validated once, bounded by the round's limits
and folded. Nothing a client sends can raise out of it: a bad reply is left
out with its reason. docs/federated_server.md tells how the limits start
and what bounds the replies that wait.

Example
-------
>>> from speechbrain_omc.federated.server import FedAvgServer
>>> server = FedAvgServer({"w": torch.zeros(2)}, ["a", "b"], 2, seed=0)
>>> sampled = server.open_round()
>>> server.fail("a", "timeout")
>>> report = server.close_round()
>>> report.rejected
{'a': 'failed: timeout', 'b': 'no reply'}
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from speechbrain_omc.codec.memory import Workspace
from speechbrain_omc.federated.aggregation import (
    Aggregation,
    MemoryBudgetExceeded,
    StreamingAggregator,
    clamp_update,
    make_aggregator,
)
from speechbrain_omc.federated.defence import (
    MAX_REASONS,
    NormLimit,
    clean_text,
    clip_scale,
    reference_order,
)
from speechbrain_omc.federated.validation import (
    ReplyExpectation,
    Update,
    UpdateRejected,
    open_reply,
    reply_nbytes,
    squared_distance,
)

logger = logging.getLogger(__name__)

__all__ = ["SECONDS", "Round", "RoundReport"]

#: The server's time in a round, by kind (see :class:`RoundReport`).
SECONDS = ("encode", "decode", "validate", "aggregate")


@dataclass
class RoundReport:
    """What happened in one round.

    Arguments
    ---------
    round : int
    sampled : list of str
    accepted : list of str
        Clients whose update was combined, in fold order.
    rejected : dict
        Client to why it was left out (escaped, bounded).
    bytes_down, bytes_up : int
    float32_bytes_down, float32_bytes_up : int
        The same messages' length with every entry in float32.
    num_examples : int
    client_metrics : dict
    model_updated : bool
    clipped : dict
        Client to the factor its update was scaled by.
    ignored : int
        Replies from clients not sampled, and second replies.
    seconds : dict
        ``encode``, ``decode``, ``validate``, ``aggregate``.
    rss : dict, optional
        With ``measure_memory``: resident bytes ``before`` and ``peak``.
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
        """Plain-data copy (JSON-serialisable)."""
        return asdict(self)


class Round:
    """An open round: its report so far and the fold of its replies.

    Arguments
    ---------
    report : RoundReport
    aggregation : Aggregation
    master : mapping
        The global model the updates are measured from.
    expectation : callable
        Client id to what its reply must be.
    reference_key : bytes
    carried : mapping, optional
        The last committed round's limits.
    memory_budget : int
    weighted : bool
        Weigh updates by their examples (else all weigh 1).
    max_held_bytes : int
    workspace : Workspace, optional
    """

    def __init__(
        self,
        report: RoundReport,
        aggregation: Aggregation,
        master: Mapping[str, torch.Tensor],
        expectation: Callable[[str], ReplyExpectation],
        *,
        reference_key: bytes,
        carried: Mapping | None,
        memory_budget: int,
        weighted: bool,
        max_held_bytes: int,
        workspace: Workspace | None = None,
    ) -> None:
        self.report = report
        self.order = reference_order(
            reference_key, report.round, report.sampled, aggregation.norm_reference
        )
        self.rank = {client: i for i, client in enumerate(self.order)}
        self.sampled = frozenset(report.sampled)
        self.aggregator = make_aggregator(aggregation, master, memory_budget)
        self.limit = NormLimit(
            aggregation.norm_bound, aggregation.norm_reference, carried=carried
        )
        self.expectation = expectation
        self.master = master
        self.aggregation = aggregation
        self.weighted = weighted
        self.max_held_bytes = max_held_bytes
        self.workspace = workspace
        self.done: set[str] = set()  # folded, rejected or failed
        self.held: dict[str, Any] = {}  # replies waiting for their turn
        self.held_bytes = 0
        self.position = 0  # index in order of the next client to fold
        self.out_of_order = False
        self.broken = False  # a fold failed half-way: nothing may be committed
        # Replies checked before their fold (the limits' reference), with norms.
        self.checked: dict[str, tuple[Any, float | None]] = {}

    @property
    def number(self) -> int:
        """The round's number."""
        return self.report.round

    # ------------------------------------------------------------ arrivals
    def receive(self, client: str, data: Any) -> None:
        """Hold one reply and fold whatever's turn has come (never raises).

        Arguments
        ---------
        client : str
        data : bytes-like
            Kept, not copied, while it waits.
        """
        size = reply_nbytes(data)
        self.report.bytes_up += size
        if client not in self.sampled:
            self._ignore(client, f"not sampled in round {self.number}", size)
            return
        if client in self.done or client in self.held:
            self._ignore(client, None, size)
            return
        self.held[client] = data
        self.held_bytes += size
        self._drain()

    def fail(self, client: str, reason: str) -> None:
        """Record that a client will not reply, and why (escaped, bounded)."""
        if client in self.done or client in self.held:
            return
        self.report.rejected[client] = clean_text(f"failed: {reason}")
        self.done.add(client)
        self._drain()

    def validate(self, client: str, data: Any) -> Update:
        """Decode and check one reply (nothing is held or combined).

        Arguments
        ---------
        client : str
        data : bytes-like

        Returns
        -------
        Update
            Or :class:`UpdateRejected`, and nothing else.
        """
        try:
            if client not in self.sampled:
                raise UpdateRejected(f"not sampled in round {self.number}")
            reply = open_reply(data, self.expectation(client))
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

    def _ignore(self, client: str, reason: str | None, size: int) -> None:
        # A stranger's reply (with a reason) or a second one (None): only the
        # first MAX_REASONS are kept and logged, whatever a flood sends.
        report = self.report
        report.float32_bytes_up += size
        report.ignored += 1
        if report.ignored > MAX_REASONS:
            return
        client = clean_text(client, 80)
        if reason is not None:
            report.rejected[client] = reason
        logger.warning(
            "round %d: reply of client %s ignored: %s",
            self.number,
            client,
            reason or "a second reply",
        )

    # ---------------------------------------------------------- fold order
    def _drain(self) -> None:
        # Fold the waiting replies whose turn has come, once the limits are.
        if not self.limit.ready:
            self._reference(final=False)
        while self.limit.ready and self.position < len(self.order):
            client = self.order[self.position]
            if client in self.held:
                self._fold(client)
            elif client not in self.done:
                break
            self.position += 1
        while self.held and self.held_bytes > self.max_held_bytes:
            self._fold_early()

    def _fold_early(self) -> None:
        # Too much waits: fold the earliest waiting reply out of order.
        if not self.out_of_order:
            logger.warning(
                "round %d: over %d bytes of replies wait for client %s; "
                "folding out of order (this round's result now depends on "
                "arrival order)",
                self.number,
                self.max_held_bytes,
                self.order[self.position],
            )
            self.out_of_order = True
        if not self.limit.ready:
            if self.limit.start_carried():
                source = "the previous round's limits"
            else:  # the first round: nothing was carried
                self._reference(final=True)
                source = "the replies at hand"
            logger.warning(
                "round %d: the update-norm limit starts from %s, not the "
                "round's reference replies",
                self.number,
                source,
            )
        self._fold(min(self.held, key=self.rank.__getitem__))

    def _reference(self, final: bool) -> None:
        # Start the limits from the first `reference` good replies in fold
        # order, each checked once (and kept for its fold); unless `final`,
        # wait while one of them may still come.
        limit, found = self.limit, {}
        for client in self.order:
            if len(found) >= limit.reference:
                break
            if client in self.held and client not in self.checked:
                self._check(client)
            if client in self.checked:
                reply, norm = self.checked[client]
                found[client] = (norm, reply.peaks)
            elif client not in self.done and not final:
                return
        limit.start(found)

    # ------------------------------------------------- validation and fold
    def _reject(self, client: str, reason: str, f32: int) -> None:
        reason = clean_text(reason)
        self.report.rejected[client] = reason
        self.report.float32_bytes_up += f32
        logger.warning(
            "round %d: update of client %s rejected: %s", self.number, client, reason
        )

    def _check(self, client: str) -> bool:
        # Validate one held reply (it stays held): a good one goes to
        # `checked` with its update norm, a bad one is dropped with its reason.
        data = self.held[client]
        size = reply_nbytes(data)
        reply = None
        try:
            reply = open_reply(data, self.expectation(client))
            bounded = self.aggregation.norm_bound is not None
            master = self.master if self.aggregator.needs_norm or bounded else None
            # Each entry decoded into the workspace, not into the heap.
            norm = reply.check(master, self.workspace)
        except UpdateRejected as error:
            counted = error.float32_nbytes
            reason, f32 = str(error), size if counted is None else counted
        except Exception as error:  # noqa: BLE001 - a bug must not end the run
            logger.exception("round %d: validating %s failed", self.number, client)
            reason = f"internal error while validating: {type(error).__name__}"
            f32 = size
        else:
            self.checked[client] = (reply, norm)
            return True
        finally:
            if reply is not None:
                for key in ("decode", "validate"):
                    self.report.seconds[key] += reply.seconds[key]
                    reply.seconds[key] = 0.0
        del self.held[client]
        self.held_bytes -= size
        self.done.add(client)
        self._reject(client, reason, f32)
        return False

    def _fold(self, client: str) -> None:
        # Validate one held reply (unless done), bound it and fold it in.
        if client not in self.checked and not self._check(client):
            return
        reply, norm = self.checked.pop(client)
        data = self.held.pop(client)
        self.held_bytes -= reply_nbytes(data)
        del data
        self.done.add(client)
        self.report.float32_bytes_up += reply.float32_nbytes
        clamped = self._clamped(client, reply)
        if clamped:  # its norm once clamped: the L2 bound does not count twice
            values = _clamp(
                reply.tensors(self.workspace), self.master, self.limit, clamped
            )
            norm = _norm(values, self.master)
        scale = self._scale(client, norm, clamped)
        if self._add(client, reply, norm, scale, clamped):
            report = self.report
            report.accepted.append(client)
            report.num_examples += reply.num_examples
            report.client_metrics[client] = reply.metrics

    def _scale(self, client: str, norm: float | None, clamped: set[str]) -> float:
        # The factor that brings the update within the round's norm limit.
        limit = self.limit.value()
        scale = clip_scale(norm, limit)
        if scale < 1.0 or clamped:
            self.report.clipped[client] = scale
        if scale < 1.0:
            logger.warning(
                "round %d: update of client %s scaled by %.3g (norm %.3g, "
                "over the round's limit %.3g)",
                self.number,
                client,
                scale,
                norm,
                limit,
            )
        return scale

    def _add(self, client, reply, norm, scale: float, clamped: set[str]) -> bool:
        # Decoded again entry by entry: the reply passed every check, so none
        # of it can be half folded. A streaming rule reuses the workspace; a
        # buffered one keeps every entry in a tensor of its own.
        report = self.report
        weight = reply.num_examples if self.weighted else 1
        start = time.perf_counter()
        try:
            streaming = isinstance(self.aggregator, StreamingAggregator)
            tensors = reply.tensors(self.workspace if streaming else None)
            if clamped:
                tensors = _clamp(tensors, self.master, self.limit, clamped)
            self.aggregator.add(tensors, weight, norm, scale)
        except MemoryBudgetExceeded as error:
            self._reject(client, str(error), 0)
            return False
        except Exception:  # noqa: BLE001 - a bug must not end the run
            logger.exception("round %d: folding in %s failed", self.number, client)
            self.broken = True
            report.rejected[client] = "internal error while aggregating"
            return False
        finally:
            # tensors() timed its own decoding and checks
            decode, validate = reply.seconds["decode"], reply.seconds["validate"]
            report.seconds["aggregate"] += time.perf_counter() - start
            report.seconds["decode"] += decode
            report.seconds["validate"] += validate
            report.seconds["aggregate"] -= decode + validate
        return True

    def _clamped(self, client: str, reply: Any) -> set[str]:
        # The reply's entries with update values beyond their limit.
        over = {n for n, peak in reply.peaks.items() if peak > self.limit.peak(n)}
        if over:
            logger.warning(
                "round %d: update of client %s clamped in %d entries (%s) to "
                "the round's largest update values",
                self.number,
                client,
                len(over),
                ", ".join(sorted(over)[:3]),
            )
        return over

    # --------------------------------------------------------------- close
    def close(self) -> dict[str, torch.Tensor] | None:
        """Fold what still waits and combine.

        Returns
        -------
        dict or None
            ``None`` when nothing may be committed.
        """
        if not self.limit.ready:  # the replies still missing will not come
            self._reference(final=True)
        for client in list(self.order):  # the rest, in order
            if client in self.held:
                self._fold(client)
        self._account()
        start = time.perf_counter()
        combined = None
        if self.broken:
            logger.error(
                "round %d: a fold failed half-way; the model is unchanged",
                self.number,
            )
        elif self.report.accepted:
            combined = self.aggregator.result()
        else:
            logger.warning(
                "round %d: no update accepted; the model is unchanged", self.number
            )
        self.aggregator = None  # its running sums go now, not at the next round
        self.report.seconds["aggregate"] += time.perf_counter() - start
        return combined

    def _account(self) -> None:
        # The report's last words: who did not reply, accepted in fold order.
        report = self.report
        if report.ignored > MAX_REASONS:
            logger.warning(
                "round %d: %d more replies ignored (not logged)",
                self.number,
                report.ignored - MAX_REASONS,
            )
        for client in self.order:
            if client not in self.done:
                report.rejected[client] = "no reply"
        for client, reason in report.rejected.items():
            if reason.startswith(("failed", "no reply")):
                logger.warning(
                    "round %d: client %s left out: %s", self.number, client, reason
                )
        report.accepted.sort(key=self.rank.__getitem__)
        report.client_metrics = {c: report.client_metrics[c] for c in report.accepted}


def _clamp(
    tensors: Iterator[tuple[str, torch.Tensor]],
    master: Mapping[str, torch.Tensor],
    limit: NormLimit,
    names: set[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    # Each update value of the named entries within [-peak, peak].
    for name, value in tensors:
        if name in names:
            value = clamp_update(value, master[name], limit.peak(name))
        yield name, value
        del value


def _norm(
    tensors: Iterator[tuple[str, torch.Tensor]], master: Mapping[str, torch.Tensor]
) -> float:
    # The L2 norm of an update, entry by entry.
    squares = 0.0
    for name, value in tensors:
        squares += squared_distance(value, master[name])
        del value
    return math.sqrt(squares) if math.isfinite(squares) else math.inf
