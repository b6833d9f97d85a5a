"""What a client's reply must be before the server uses it.

:func:`check_reply` turns one reply's bytes into an :class:`Update` or raises
:class:`UpdateRejected` with the reason, whatever the bytes. The checks run
cheapest first, each reply decoded once, and bind the reply to this run,
round, client and nonce before any payload is read. :func:`open_reply` stops
before the values, for a server that folds as replies arrive. The full list
is in docs/federated_server.md.

Example
-------
>>> import torch
>>> from speechbrain_omc.federated import wire
>>> expected = ReplyExpectation(
...     run="r1", round=1, client="a", nonce="n1", max_examples=10,
...     entries=wire.expect_like({"w": torch.zeros(2)}),
... )
>>> meta = {"type": "update", "round": 1, "client": "a", "run": "r1",
...         "nonce": "n1", "num_examples": 4, "metrics": {"loss": 0.5}}
>>> check_reply(wire.encode({"w": torch.ones(2)}, meta), expected).num_examples
4
>>> stale = wire.encode({"w": torch.ones(2)}, {**meta, "nonce": "n0"})
>>> try:
...     check_reply(stale, expected)
... except UpdateRejected as error:
...     print(error)
wrong nonce: not a reply to this round's broadcast
>>> is_int(3), is_int(True), is_int(3.0)
(True, False, False)
>>> reply_nbytes(b"abc"), reply_nbytes(memoryview(b"abcd")), reply_nbytes(None)
(3, 4, 0)
>>> nonfinite(torch.tensor([1.0, float("nan"), float("-inf")]))
2
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from speechbrain_omc.codec import kernels
from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.memory import Workspace
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.defence import (
    check_range,
    check_transform,
    is_clean,
    shown,
)

__all__ = [
    "MAX_EXAMPLES",
    "MAX_METRICS",
    "MAX_METRIC_KEY",
    "METRIC_BOUND",
    "UPDATE_KEYS",
    "Reply",
    "ReplyExpectation",
    "Update",
    "UpdateRejected",
    "check_metrics",
    "check_number",
    "check_reply",
    "check_update_meta",
    "distance_stats",
    "is_int",
    "nonfinite",
    "open_reply",
    "reply_nbytes",
    "squared_distance",
]

#: Default bound of ``num_examples`` when the server knows nothing better: the
#: largest integer a float32/float64 weight holds exactly. Set ``max_examples``.
MAX_EXAMPLES = 2**53
#: Limits of a reply's ``metrics``.
MAX_METRICS = 32
MAX_METRIC_KEY = 64
METRIC_BOUND = 1e9
#: The metadata keys of a reply (any other is refused: strict, so a future
#: client field needs a server change first).
UPDATE_KEYS = frozenset(
    ("type", "round", "client", "run", "nonce", "num_examples", "metrics")
)


class UpdateRejected(ValueError):
    """A client reply that the server refuses; the message says why.

    Arguments
    ---------
    reason : str
    float32_nbytes : int, optional
        The reply's float32-equivalent length, when known (for the byte counts).
    """

    def __init__(self, reason: str, float32_nbytes: int | None = None) -> None:
        super().__init__(reason)
        self.float32_nbytes = float32_nbytes


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (``bool`` is not).

    Arguments
    ---------
    value : object

    Returns
    -------
    bool
    """
    return isinstance(value, int) and not isinstance(value, bool)


def reply_nbytes(data: Any) -> int:
    """Length in bytes of a reply (0 for what is not bytes-like).

    Arguments
    ---------
    data : object

    Returns
    -------
    int
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).nbytes
    return 0


def check_number(name: str, value: Any, low: float, high: float) -> int | float:
    """Check one metric: a number (not a bool) within ``[low, high]``.

    Arguments
    ---------
    name : str
    value : object
    low, high : float

    Returns
    -------
    int or float
        ``value``.

    Example
    -------
    >>> check_number("WER", 12.5, 0, 1e9)
    12.5
    >>> check_number("WER", float("nan"), 0, 1e9)
    Traceback (most recent call last):
    ...
    ValueError: metric 'WER' = nan is not a number in [0, 1e+09]
    """
    # Compared as a Python number: refuses NaN and infinities, exact for
    # integers too large for a float.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"metric {shown(name)} is {type(value).__name__}, not a number"
        )
    if not low <= value <= high:
        raise ValueError(
            f"metric {shown(name)} = {shown(value)} is not a number in "
            f"[{low:.4g}, {high:.4g}]"
        )
    return value


def check_metrics(metrics: Any, low: float = -METRIC_BOUND) -> dict:
    """Check a client's metrics: a few printable names to bounded numbers.

    Arguments
    ---------
    metrics : object
    low : float
        Smallest value allowed (the largest is :data:`METRIC_BOUND`).

    Returns
    -------
    dict
        A copy; ``None`` for a metric the client could not compute.

    Example
    -------
    >>> check_metrics({"train_loss": 2.5, "steps": 10, "grad_norm": None})
    {'train_loss': 2.5, 'steps': 10, 'grad_norm': None}
    >>> check_metrics({"train_loss": 1e30})
    Traceback (most recent call last):
    ...
    ValueError: metric 'train_loss' = 1e+30 is not a number in [-1e+09, 1e+09]
    """
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping, got {type(metrics).__name__}")
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"{len(metrics)} metrics, at most {MAX_METRICS} allowed")
    out = {}
    for key, value in metrics.items():
        if not (key and is_clean(key, MAX_METRIC_KEY)):
            raise ValueError(
                f"metric name {shown(key, 80)} is not a short string of printable ASCII"
            )
        if value is not None:  # a metric the client could not compute
            value = check_number(key, value, low, METRIC_BOUND)
        out[key] = value
    return out


@dataclass
class Update:
    """A validated client reply.

    Arguments
    ---------
    client : str
    num_examples : int
        The client's FedAvg weight, bounded.
    values : dict
        Entry name to float32 tensor.
    metrics : dict
    nbytes : int
    float32_nbytes : int
    """

    client: str
    num_examples: int
    values: dict[str, torch.Tensor]
    metrics: dict
    nbytes: int
    float32_nbytes: int


@dataclass(frozen=True)
class ReplyExpectation:
    """What the reply of one client in one round must be.

    Arguments
    ---------
    run : str
    round : int
    client : str
    nonce : str
        The broadcast's nonce, which the reply must echo.
    max_examples : int
    entries : dict
        Entry name to its :class:`~speechbrain_omc.federated.wire.Expected`.
    max_nbytes : int, optional
        Longest acceptable reply (by default the most ``entries`` allow).
    sent : dict, optional
        The broadcast's compressed entries (see
        :func:`~speechbrain_omc.federated.defence.check_transform`).
    reaches : dict, optional
        The broadcast's largest magnitude per float32 entry (see
        :func:`~speechbrain_omc.federated.defence.check_range`).
    """

    run: str
    round: int
    client: str
    nonce: str
    max_examples: int
    entries: dict[str, wire.Expected] = field(default_factory=dict)
    max_nbytes: int | None = None
    sent: dict[str, CompressedTensor] = field(default_factory=dict)
    reaches: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_nbytes is None:
            object.__setattr__(
                self, "max_nbytes", wire.max_message_nbytes(self.entries)
            )


def check_update_meta(meta: Mapping, expected: ReplyExpectation) -> tuple[int, dict]:
    """Check a reply's metadata: its binding, its weight and its metrics.

    Arguments
    ---------
    meta : mapping
    expected : ReplyExpectation

    Returns
    -------
    num_examples : int
    metrics : dict

    Raises
    ------
    UpdateRejected
        With the first problem found.
    """
    if meta.get("type") != "update":
        raise UpdateRejected(
            f"message type {shown(meta.get('type'))}, expected 'update'"
        )
    extra = sorted(set(meta) - UPDATE_KEYS)
    if extra:
        raise UpdateRejected(f"unexpected metadata keys: {shown(extra[:5], 120)}")
    if meta.get("run") != expected.run:
        raise UpdateRejected(f"reply of run {shown(meta.get('run'))}, not this run")
    if meta.get("round") != expected.round:
        raise UpdateRejected(
            f"update for round {shown(meta.get('round'))}, expected {expected.round}"
        )
    if meta.get("client") != expected.client:
        raise UpdateRejected(f"update signed by client {shown(meta.get('client'))}")
    nonce = meta.get("nonce")
    # Constant time: the comparison must not tell a client how much it guessed.
    if not isinstance(nonce, str) or not hmac.compare_digest(nonce, expected.nonce):
        raise UpdateRejected("wrong nonce: not a reply to this round's broadcast")
    examples, bound = meta.get("num_examples"), expected.max_examples
    if not is_int(examples) or not 1 <= examples <= bound:
        raise UpdateRejected(
            f"num_examples must be an integer in [1, {bound}], got {shown(examples)}"
        )
    try:
        metrics = check_metrics(meta.get("metrics", {}))
    except ValueError as error:
        raise UpdateRejected(f"bad metrics: {error}") from None
    return examples, metrics


def nonfinite(value: torch.Tensor) -> int:
    """Number of NaN and infinite values of a float32 tensor.

    Arguments
    ---------
    value : torch.Tensor

    Returns
    -------
    int
    """
    # No temporary per entry: a mask for each would stay in the heap of a
    # server decoding a thousand replies (a mask only when one is not finite).
    if not value.numel():
        return 0
    if value.dtype == torch.float32 and kernels.native_for(value):
        return kernels.minmax(value.reshape(-1))[2]
    lo, hi = (float(v) for v in torch.aminmax(value))
    if math.isfinite(lo) and math.isfinite(hi):
        return 0
    return int((~torch.isfinite(value)).sum())


#: Values per float64 chunk of :func:`squared_distance` (512 KiB).
_CHUNK = 2**16


def distance_stats(value: torch.Tensor, master: torch.Tensor) -> tuple[float, float]:
    """``sum((value - master) ** 2)`` and ``max|value - master|``, in float64.

    Arguments
    ---------
    value, master : torch.Tensor

    Returns
    -------
    tuple of float

    Example
    -------
    >>> distance_stats(torch.tensor([3.0, -1.0]), torch.tensor([0.0, 1.0]))
    (13.0, 3.0)
    """
    a, b = value.reshape(-1), master.reshape(-1)
    total, peak = 0.0, 0.0
    for start in range(0, a.numel(), _CHUNK):
        part = a[start : start + _CHUNK].double()
        part.sub_(b[start : start + _CHUNK])
        peak = max(peak, float(part.abs_().max()))
        total += float(part.square_().sum())
        del part
    return total, peak


def squared_distance(value: torch.Tensor, master: torch.Tensor) -> float:
    """``sum((value - master) ** 2)`` in float64, a chunk at a time.

    Arguments
    ---------
    value, master : torch.Tensor

    Returns
    -------
    float
        Possibly ``inf``.

    Example
    -------
    >>> big = torch.finfo(torch.float32).max
    >>> squared_distance(torch.tensor([big, 1.0]), torch.tensor([0.0, 0.0])) > 1e76
    True
    """
    # float64: large finite float32 values overflow in the difference or the
    # squares; in chunks: float64 copies of a whole entry would be the largest
    # temporaries a server checking replies leaves in its heap.
    a, b = value.reshape(-1), master.reshape(-1)
    total = 0.0
    for start in range(0, a.numel(), _CHUNK):
        part = a[start : start + _CHUNK].double()
        part.sub_(b[start : start + _CHUNK])
        total += float(part.square_().sum())
        del part
    return total


class Reply:
    """A reply whose binding, metadata and entry headers passed (steps 1-4).

    Arguments
    ---------
    client : str
    num_examples : int
    metrics : dict
    message : wire.LazyMessage
    nbytes : int
    seconds : dict
        ``decode`` and ``validate`` time so far; the methods add to it.
    sent : mapping, optional
    reaches : mapping, optional
        As in :class:`ReplyExpectation`.
    """

    def __init__(
        self,
        client: str,
        num_examples: int,
        metrics: dict,
        message: wire.LazyMessage,
        nbytes: int,
        seconds: dict[str, float],
        sent: Mapping[str, CompressedTensor] | None = None,
        reaches: Mapping[str, float] | None = None,
    ) -> None:
        self.client = client
        self.num_examples = num_examples
        self.metrics = metrics
        self.message = message
        self.nbytes = nbytes
        self.seconds = seconds
        self.sent = dict(sent or {})
        self.reaches = dict(reaches or {})
        self.peaks: dict[str, float] = {}
        self.float32_nbytes = message.float32_nbytes()

    def tensors(
        self, workspace: Workspace | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Decode the entries one by one, each checked, yielding ``(name, tensor)``.

        Arguments
        ---------
        workspace : Workspace, optional
            Decode into its reused buffers, for a caller that drops each tensor
            before asking for the next.

        Raises
        ------
        UpdateRejected
            A malformed payload, a transform or values beyond the broadcast's reach,
            or non-finite values (the entry named).
        """
        for name in self.message.names():
            start = time.perf_counter()
            try:
                value = self._decoded(name, workspace)
            except UpdateRejected:
                raise
            except ValueError as error:
                raise UpdateRejected(
                    f"malformed message: {error}", self.float32_nbytes
                ) from None
            middle = time.perf_counter()
            try:
                self._check_values(name, value)
            finally:
                self.seconds["decode"] += middle - start
                self.seconds["validate"] += time.perf_counter() - middle
            yield name, value
            # Its buffer serves the next entry once the caller's copy is gone.
            del value

    def _check_values(self, name: str, value: torch.Tensor) -> None:
        """Refuse non-finite values, and float32 values beyond the reach."""
        bad = nonfinite(value)
        if bad:
            raise UpdateRejected(
                f"{name} has {bad} non-finite values", self.float32_nbytes
            )
        if name in self.reaches:
            try:
                check_range(name, value, self.reaches[name])
            except ValueError as error:
                raise UpdateRejected(str(error), self.float32_nbytes) from None

    def _decoded(self, name: str, workspace: Workspace | None) -> torch.Tensor:
        # A function of its own: the parsed entry (its codes' buffer) and
        # the output buffer are dropped on return, free for the next entry.
        entry = self.message.entry(name, workspace)
        if not isinstance(entry, CompressedTensor):
            return entry
        if name in self.sent:  # before a value is decoded
            try:
                check_transform(name, entry, self.sent[name])
            except ValueError as error:
                raise UpdateRejected(str(error), self.float32_nbytes) from None
        out = None if workspace is None else workspace.take(entry.numel())
        return entry.decompress(out=out)

    def check(
        self,
        master: Mapping[str, torch.Tensor] | None = None,
        workspace: Workspace | None = None,
    ) -> float | None:
        """Step 5: decode every entry and check it (then drop it).

        Arguments
        ---------
        master : mapping, optional
            The global model: the update's norm is computed on the way, and each
            entry's largest ``|update|`` kept in :attr:`peaks`.
        workspace : Workspace, optional

        Returns
        -------
        float or None
            The update's norm with ``master``.
        """
        squares = 0.0
        for name, value in self.tensors(workspace):
            if master is not None:
                square, self.peaks[name] = distance_stats(value, master[name])
                squares += square
            del value  # its buffer is free for the next entry
        if master is None:
            return None
        # An update of finite values can still have an infinite norm.
        return math.sqrt(squares) if math.isfinite(squares) else math.inf


def open_reply(data: Any, expected: ReplyExpectation) -> Reply:
    """Steps 1-4 of the checks; the entries are left for :class:`Reply`.

    Arguments
    ---------
    data : bytes-like
    expected : ReplyExpectation

    Returns
    -------
    Reply

    Raises
    ------
    UpdateRejected
        With the reason; nothing else for any ``data``.

    Example
    -------
    >>> expected = ReplyExpectation(
    ...     run="r1", round=1, client="a", nonce="n1", max_examples=10,
    ...     entries=wire.expect_like({"w": torch.zeros(2)}),
    ... )
    >>> meta = {"type": "update", "round": 1, "client": "a", "run": "r1",
    ...         "nonce": "n1", "num_examples": 4}
    >>> reply = open_reply(wire.encode({"w": torch.ones(2)}, meta), expected)
    >>> reply.check(master={"w": torch.zeros(2)})  # the update's norm
    1.4142135623730951
    >>> [(name, value.tolist()) for name, value in reply.tensors()]
    [('w', [1.0, 1.0])]
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UpdateRejected(f"reply is {type(data).__name__}, not bytes")
    checked: list[tuple[int, dict]] = []
    seconds = {"decode": 0.0, "validate": 0.0}

    def check_meta(meta):
        start = time.perf_counter()
        try:
            checked.append(check_update_meta(meta, expected))
        finally:
            seconds["validate"] += time.perf_counter() - start

    start = time.perf_counter()
    try:
        message = wire.decode(
            data,
            expect=expected.entries,
            max_nbytes=expected.max_nbytes,
            check_meta=check_meta,
            lazy=True,
        )
    except UpdateRejected:
        raise
    except ValueError as error:
        raise UpdateRejected(f"malformed message: {error}") from None
    finally:
        seconds["decode"] += time.perf_counter() - start - seconds["validate"]
    examples, metrics = checked[0]
    return Reply(
        expected.client,
        examples,
        metrics,
        message,
        reply_nbytes(data),
        seconds,
        expected.sent,
        expected.reaches,
    )


def check_reply(data: Any, expected: ReplyExpectation) -> Update:
    """:func:`open_reply`, then every entry decoded and checked.

    Arguments
    ---------
    data : bytes-like
    expected : ReplyExpectation

    Returns
    -------
    Update
    """
    reply = open_reply(data, expected)
    values = dict(reply.tensors())
    return Update(
        expected.client,
        reply.num_examples,
        values,
        reply.metrics,
        reply.nbytes,
        reply.float32_nbytes,
    )
