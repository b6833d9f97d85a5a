"""What keeps a well-formed but hostile client from steering or wedging the server.

Client text is data, escaped to bounded printable ASCII (:func:`clean_text`,
:func:`shown`). Each update is scaled to at most ``norm_bound`` x the upper
median of the reference replies' norms and clamped per entry likewise
(:class:`NormLimit`); the reference replies are drawn under a key the server
never sends (:func:`reference_order`). A reply entry must stay near the
broadcast's range (:func:`check_transform`, :func:`check_range`). The
analysis is in docs/federated_server.md.

Example
-------
>>> clean_text("round \\x1b[31mred\\udcff")
'round \\\\x1b[31mred\\\\udcff'
>>> shown("\\udcff")
"'\\\\udcff'"
>>> norms = [1.0, 1.2, 0.0, 1e30]  # an honest pair, a zero update, an attacker
>>> limit = clip_limit(norms, 4.0)  # 4 x the upper median, 1.2
>>> round(limit, 6), [round(clip_scale(n, limit), 6) for n in norms]
(4.8, [1.0, 1.0, 1.0, 0.0])
>>> is_clean("train_loss"), is_clean("loss\\n"), is_clean(3)
(True, False, False)
>>> shown(3), shown("2"), shown("\\x1b[2J")
('3', "'2'", "'\\\\x1b[2J'")
>>> upper_median([3.0, 0.0, 0.0, 2.0]), upper_median([5.0])
(2.0, 5.0)
>>> clip_limit([1.0, 2.0, 3.0], 4.0), clip_limit([1.0], None)
(8.0, inf)
>>> clip_scale(2.0, 8.0), clip_scale(16.0, 8.0), clip_scale(math.inf, 8.0)
(1.0, 0.5, 0.0)
>>> allowed_reach(1e-6), allowed_reach(4.0)
(1024.0, 4096.0)
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from speechbrain_omc.codec.compressed import CompressedTensor

__all__ = [
    "DEFAULT_NORM_BOUND",
    "DEFAULT_NORM_REFERENCE",
    "MAX_LIMIT_GROWTH",
    "MAX_PEAK_GROWTH",
    "MAX_REACH_GROWTH",
    "MAX_REASONS",
    "MAX_TEXT",
    "NormLimit",
    "REACH_FLOOR",
    "allowed_reach",
    "check_carried",
    "check_range",
    "check_transform",
    "clean_text",
    "clip_limit",
    "clip_scale",
    "is_clean",
    "reach",
    "reference_order",
    "shown",
    "upper_median",
    "value_limits",
]

#: Longest client-derived text kept (a reason, an error message), in characters.
MAX_TEXT = 200
#: Rejection reasons of clients that were not sampled kept in a round's
#: report (the rest are counted): 20,000 strangers must not make it megabytes.
MAX_REASONS = 16
#: Default multiple of the upper median update norm an update may reach.
DEFAULT_NORM_BOUND = 4.0
#: Reference replies (drawn under the server's key) that make a round's limits.
DEFAULT_NORM_REFERENCE = 8
#: The factor a round's update-norm limit may differ from the last committed
#: round's by.
MAX_LIMIT_GROWTH = 2.0
#: The same for each entry's value limit: the largest ``|update|`` of a small
#: entry (a bias, a norm's gain) jumps more between honest rounds.
MAX_PEAK_GROWTH = 8.0
#: How much larger a reply entry's reach may be than the broadcast's.
MAX_REACH_GROWTH = 1024.0
#: The reach a reply entry may always grow to ``MAX_REACH_GROWTH`` times of,
#: however small the broadcast's: an entry broadcast near zero (a layer
#: initialised to zero) is re-fitted by training to values of its own.
REACH_FLOOR = 1.0

# ASCII control characters (C0 and DEL): escaped like repr() does.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean_text(text: Any, limit: int = MAX_TEXT) -> str:
    """Client-derived text made safe to log and store: printable ASCII, bounded.

    Arguments
    ---------
    text : object
        Anything else than a string is ``str()``-ed first.
    limit : int
        Most characters returned.

    Returns
    -------
    str

    Example
    -------
    >>> clean_text("ok: \\x07 caf\\u00e9")
    'ok: \\\\x07 caf\\\\xe9'
    >>> clean_text("x" * 300, limit=10)
    'xxxxxxx...'
    """
    if not isinstance(text, str):
        text = str(text)
    # Cut first: an escape is at most 10 characters for one of the input.
    text = text[: limit + 1]
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", out)
    if len(out) > limit:
        out = out[: max(0, limit - 3)] + "..."
    return out


def is_clean(text: Any, limit: int = MAX_TEXT) -> bool:
    """Whether ``text`` is a string that :func:`clean_text` leaves unchanged.

    Arguments
    ---------
    text : object
    limit : int

    Returns
    -------
    bool
    """
    return isinstance(text, str) and clean_text(text, limit) == text


def shown(value: Any, limit: int = 40) -> str:
    """A client's value quoted in a message: ``repr``-style, clean, bounded.

    Arguments
    ---------
    value : object
    limit : int

    Returns
    -------
    str
    """
    if isinstance(value, str):
        value = value[: limit + 1]
    return clean_text(repr(value), limit)


def upper_median(values: Iterable[float]) -> float:
    """Of ``k`` sorted values (at least one), the one at index ``k // 2``.

    Arguments
    ---------
    values : iterable of float

    Returns
    -------
    float
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("upper_median of nothing")
    return ordered[len(ordered) // 2]


def clip_limit(norms: Iterable[float], bound: float | None) -> float:
    """The largest update norm a round allows: ``bound`` x the upper median.

    Arguments
    ---------
    norms : iterable of float
        The reference replies' update norms.
    bound : float, optional
        ``None`` allows any norm.

    Returns
    -------
    float
        ``math.inf`` without a bound or without norms.
    """
    norms = [n for n in norms if not math.isnan(n)]
    if bound is None or not norms:
        return math.inf
    return float(bound) * upper_median(norms)


def clip_scale(norm: float | None, limit: float) -> float:
    """The factor that brings an update of ``norm`` within ``limit``.

    Arguments
    ---------
    norm : float, optional
        ``None``: not measured, not scaled.
    limit : float

    Returns
    -------
    float
        ``limit / norm`` over the limit (``0.0`` for an infinite norm), else 1.
    """
    if norm is None or not norm > limit:
        return 1.0
    return limit / norm if math.isfinite(norm) else 0.0


def reference_order(
    key: bytes, round: int, clients: Iterable[str], size: int
) -> list[str]:
    """The fold order of a round: its reference clients first, drawn by a key.

    Arguments
    ---------
    key : bytes
        The server's secret.
    round : int
    clients : iterable of str
        The round's sampled clients.
    size : int
        How many reference clients lead the order.

    Returns
    -------
    list of str

    Example
    -------
    >>> reference_order(b"k", 1, ["c2", "c0", "c1"], 8)
    ['c0', 'c1', 'c2']
    >>> order = reference_order(b"k", 1, [f"c{i:02d}" for i in range(20)], 8)
    >>> order == reference_order(b"k", 1, sorted(order, reverse=True), 8)
    True
    >>> order[:8] == sorted(order[:8]), sorted(order) == sorted(set(order))
    (True, True)
    >>> order != reference_order(b"other", 1, order, 8)
    True
    """
    # A keyed permutation of the sorted ids (a client's id decides nothing),
    # seeded by an HMAC of the round under a key never sent: a draw from the
    # run seed could be predicted by a client, which could then choose when
    # to collude. Its first `size` lead, sorted; the rest replace failures.
    clients = sorted(clients)
    if len(clients) <= size:
        return clients
    digest = hmac.new(key, f"reference/{int(round)}".encode(), hashlib.sha256)
    rng = random.Random(digest.digest())
    drawn = rng.sample(clients, len(clients))
    return sorted(drawn[:size]) + drawn[size:]


def value_limits(
    peaks: Iterable[Mapping[str, float]], bound: float | None
) -> dict[str, float]:
    """Each entry's largest update value allowed: ``bound`` x the upper median.

    Arguments
    ---------
    peaks : iterable of mapping
        Per reference reply: entry name to its largest ``|reply - broadcast|``.
    bound : float, optional
        ``None`` allows any value (an empty result).

    Returns
    -------
    dict

    Example
    -------
    >>> value_limits([{"w": 0.1}, {"w": 0.0}, {"w": 1e30}, {"w": 0.2}], 4.0)
    {'w': 0.8}
    """
    by_name: dict[str, list[float]] = {}
    for reply in peaks:
        for name, peak in reply.items():
            by_name.setdefault(name, []).append(peak)
    return {
        name: limit
        for name, values in by_name.items()
        if (limit := clip_limit(values, bound)) != math.inf
    }


class NormLimit:
    """The limits of one round, from its reference replies; then frozen.

    Arguments
    ---------
    bound : float, optional
        The multiple of the upper median (``None``: no limit).
    reference : int
        How many replies the limits come from.
    carried : mapping, optional
        The previous committed round's :meth:`carry`.

    Example
    -------
    >>> limit = NormLimit(4.0, reference=2)
    >>> limit.ready
    False
    >>> limit.start({"a": (1.0, {"w": 0.5}), "b": (3.0, {"w": 0.1})})
    >>> limit.ready, limit.value(), limit.peak("w")
    (True, 12.0, 2.0)
    >>> after = NormLimit(4.0, 2, carried={"norm": 1.0, "peaks": {"w": 0.25}})
    >>> after.start({"a": (1.0, {"w": 0.5}), "b": (3.0, {"w": 0.1})})
    >>> after.value(), after.peak("w")
    (2.0, 2.0)
    >>> low = NormLimit(4.0, 2, carried={"norm": 100.0, "peaks": {}})
    >>> low.start({"a": (0.0, None), "b": (3.0, None)}); low.value()
    50.0
    >>> NormLimit(None, 8).ready, NormLimit(None, 8).value()
    (True, inf)
    """

    def __init__(
        self, bound: float | None, reference: int, carried: Mapping | None = None
    ) -> None:
        self.bound = bound
        self.reference = int(reference)
        self.ready = bound is None  # no bound: nothing to wait for
        self.norms: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self._limit = math.inf
        self._carried = carried if bound is not None else None
        self._from_carried = False

    def start(
        self, replies: Mapping[str, tuple[float | None, Mapping[str, float] | None]]
    ) -> None:
        """Start (and freeze) the limits from the reference replies.

        Arguments
        ---------
        replies : mapping
            Client id to (update norm, largest ``|update|`` per entry), ``None``
            where not measured.
        """
        if self.bound is not None:
            self.norms = {c: n for c, (n, _) in replies.items() if n is not None}
            self._limit = clip_limit(self.norms.values(), self.bound)
            peaks = [p for _, p in replies.values() if p is not None]
            self.peaks = value_limits(peaks, self.bound)
            self._clamp_to_carried()
        self.ready = True

    def start_carried(self) -> bool:
        """Start (and freeze) the limits at the carried ones; False if none.

        Such a round carries them on unchanged: rounds that cannot wait for
        their reference replies must not compound a growth of the limits.
        """
        if not self._carried:
            return False
        self._limit = self._carried.get("norm") or math.inf
        self.peaks = dict(self._carried.get("peaks", {}))
        self._from_carried = self.ready = True
        return True

    def _clamp_to_carried(self) -> None:
        # Each limit within a factor of its carried value, either way: captured
        # reference replies can neither lift the limits away nor shrink them
        # until honest updates are clipped to nothing.
        carried = self._carried or {}
        if carried.get("norm") is not None:
            self._limit = _within(self._limit, carried["norm"], MAX_LIMIT_GROWTH)
        for name, peak in carried.get("peaks", {}).items():
            limit = self.peaks.get(name, math.inf)
            self.peaks[name] = _within(limit, peak, MAX_PEAK_GROWTH)

    def carry(self) -> dict:
        """The limits for the next round to start under: ``{"norm", "peaks"}``.

        A limit that is not positive and finite keeps its carried value.
        """
        carried = self._carried or {"norm": None, "peaks": {}}
        if self._from_carried:
            return carried
        peaks = dict(carried["peaks"])
        peaks.update((n, p) for n, p in self.peaks.items() if _usable(p))
        norm = self._limit if _usable(self._limit) else carried["norm"]
        return {"norm": norm, "peaks": peaks}

    def value(self) -> float:
        """The largest update norm allowed (``math.inf`` when unlimited)."""
        return self._limit

    def peak(self, name: str) -> float:
        """The largest ``|update|`` allowed in entry ``name`` (or ``math.inf``)."""
        return self.peaks.get(name, math.inf)


def _within(limit: float, carried: float, factor: float) -> float:
    return min(max(limit, carried / factor), carried * factor)


def _usable(limit: Any) -> bool:
    # A limit worth carrying: positive and finite (zero would freeze training).
    return isinstance(limit, float) and 0.0 < limit < math.inf


def check_carried(carried: Any, names: Iterable[str]) -> dict | None:
    """A checkpoint's carried limits (see :meth:`NormLimit.carry`), checked.

    Arguments
    ---------
    carried : any
        As saved; ``None`` when nothing was carried.
    names : iterable of str
        The model's entries.

    Returns
    -------
    dict, optional

    Raises
    ------
    ValueError
        Not a mapping of positive finite limits of this model's entries.

    Example
    -------
    >>> check_carried({"norm": 2.0, "peaks": {"w": 0.5}}, ["w"])
    {'norm': 2.0, 'peaks': {'w': 0.5}}
    >>> check_carried({"norm": -1.0, "peaks": {}}, ["w"])
    Traceback (most recent call last):
    ...
    ValueError: server state: bad carried limit -1.0
    """
    if carried is None:
        return None
    names = set(names)
    if not isinstance(carried, Mapping) or set(carried) != {"norm", "peaks"}:
        raise ValueError("server state: carried limits are not {norm, peaks}")
    peaks = carried["peaks"]
    if not isinstance(peaks, Mapping) or not set(peaks) <= names:
        raise ValueError("server state: carried limits of unknown entries")
    norm = [] if carried["norm"] is None else [carried["norm"]]
    for value in [*norm, *peaks.values()]:
        if not _usable(value) or type(value) is not float:
            raise ValueError(f"server state: bad carried limit {shown(value)}")
    return {"norm": carried["norm"], "peaks": dict(peaks)}


def reach(value: CompressedTensor) -> float:
    """The largest magnitude a compressed tensor's transform can decode to.

    Arguments
    ---------
    value : CompressedTensor

    Returns
    -------
    float
        ``|shift| + scale * max_value`` of its format.

    Example
    -------
    >>> import torch
    >>> round(reach(CompressedTensor.compress(torch.tensor([-2.0, 1.0]), "int8")), 6)
    2.0
    """
    transform = value.transform
    return abs(transform.shift) + transform.scale * value.format.max_value


def check_transform(
    name: str, received: CompressedTensor, sent: CompressedTensor
) -> None:
    """Refuse a reply entry whose transform is not the broadcast's kind or
    reaches beyond :func:`allowed_reach` of the broadcast's.

    Arguments
    ---------
    name : str
    received : CompressedTensor
        The reply's entry (parsed, not decoded).
    sent : CompressedTensor
        The broadcast's entry.

    Raises
    ------
    ValueError

    Example
    -------
    >>> import torch
    >>> from speechbrain_omc.codec.transform import Transform
    >>> sent = CompressedTensor.compress(torch.ones(4), "e3m7")
    >>> check_transform("w", CompressedTensor.compress(torch.ones(4) * 2, "e3m7"), sent)
    >>> relabelled = CompressedTensor(
    ...     sent.packed, sent.format, sent.shape, Transform("affine", 1.0, 1e30))
    >>> check_transform("w", relabelled, sent)
    Traceback (most recent call last):
    ...
    ValueError: w: transform 'affine', the broadcast's is 'scale'
    """
    kind, expected = received.transform.kind, sent.transform.kind
    if kind != expected:
        raise ValueError(f"{name}: transform {kind!r}, the broadcast's is {expected!r}")
    _check_reach(name, "transform reaches", reach(received), reach(sent))


def allowed_reach(sent: float) -> float:
    """The largest magnitude a reply entry may reach given the broadcast's ``sent``.

    Arguments
    ---------
    sent : float

    Returns
    -------
    float
        ``MAX_REACH_GROWTH * max(sent, REACH_FLOOR)``.
    """
    return MAX_REACH_GROWTH * max(sent, REACH_FLOOR)


def _check_reach(name: str, what: str, received: float, sent: float) -> None:
    if not received <= allowed_reach(sent):
        raise ValueError(
            f"{name}: {what} {received:.3g}, over {MAX_REACH_GROWTH:g} x "
            f"max(the broadcast's {sent:.3g}, {REACH_FLOOR:g})"
        )


def check_range(name: str, received: torch.Tensor, sent: float) -> None:
    """Refuse a float32 reply entry whose values reach far beyond the broadcast's.

    Arguments
    ---------
    name : str
    received : torch.Tensor
        The reply's entry (finite).
    sent : float
        The broadcast entry's largest magnitude.

    Raises
    ------
    ValueError

    Example
    -------
    >>> check_range("b", torch.full((3,), 0.01), 0.0)  # zero-initialised
    >>> check_range("w", torch.tensor([1.0, 3e38]), 2.0)
    Traceback (most recent call last):
    ...
    ValueError: w: values reach 3e+38, over 1024 x max(the broadcast's 2, 1)
    """
    if received.numel():
        low, high = (float(v) for v in torch.aminmax(received))
        _check_reach(name, "values reach", max(-low, high), sent)
