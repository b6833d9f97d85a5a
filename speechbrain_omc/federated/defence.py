"""What keeps a well-formed but hostile client from steering or wedging the server.

:mod:`~speechbrain_omc.federated.validation` refuses what is malformed; this
module bounds what is well formed but hostile:

* **Client text is data, never markup.** Whatever a client chose (a value
  quoted in a rejection reason, an exception's text, a metric name) goes
  through :func:`clean_text` or :func:`shown` before it reaches a log, a CSV
  row, a JSON file or a checkpoint: printable ASCII only (control
  characters, ANSI escapes, lone surrogates and any other non-ASCII
  character written as backslash escapes, ``repr``-style), cut to a bounded
  length. A lone surrogate could not be written as UTF-8 (``rounds.csv``
  raised ``UnicodeEncodeError`` at every restart); an escape sequence would
  drive the terminal that shows the log.
* **Bounded influence.** Each accepted update (reply minus broadcast) is
  scaled down to an L2 norm of at most ``norm_bound`` times the *upper*
  median of the round's update norms (:func:`clip_limit`,
  :func:`clip_scale`). A client sending 1e30, FLT_MAX or a 60x update then
  moves the model about as far as an honest client does. The *upper* median
  (of four norms the third smallest): clients that collude by sending zero
  updates cannot pull the limit down and throttle training, as long as they
  are fewer than half the round; hostile clients that are half the round or
  more can raise it. Of one or two replies the upper median is the largest
  norm: no bound. The norm bounds how far an update moves the model in L2,
  not how it spreads that move: an update that puts its whole norm on a few
  weights moves those further than an honest update (spread over all of
  them) does.
* **A compressed entry is what the server sent, re-fitted.** Its transform
  must be of the kind the broadcast's was, and its reach (the largest
  magnitude it can decode to) at most :data:`MAX_REACH_GROWTH` times the
  broadcast's (:func:`check_transform`): training re-fits the scale, it does
  not multiply a variable's range a thousandfold in one round. A relabelled
  transform or a scale of 1e30 is refused before a value is decoded.

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
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from speechbrain_omc.compressed import CompressedTensor

__all__ = [
    "DEFAULT_NORM_BOUND",
    "DEFAULT_NORM_REFERENCE",
    "MAX_REACH_GROWTH",
    "MAX_REASONS",
    "MAX_TEXT",
    "NormLimit",
    "check_transform",
    "clean_text",
    "clip_limit",
    "clip_scale",
    "is_clean",
    "reach",
    "shown",
    "upper_median",
]

#: Longest client-derived text kept (a reason, an error message), in characters.
MAX_TEXT = 200
#: Rejection reasons of clients that were not sampled kept in a round's
#: report (the rest are counted): 20,000 strangers must not make it megabytes.
MAX_REASONS = 16
#: Default multiple of the upper median update norm an update may reach.
DEFAULT_NORM_BOUND = 4.0
#: Replies, first in fold order, whose norms make the round's limit.
DEFAULT_NORM_REFERENCE = 8
#: How much larger a compressed reply entry's reach may be than the broadcast's.
MAX_REACH_GROWTH = 1024.0

# ASCII control characters (C0 and DEL): escaped like repr() does.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean_text(text: Any, limit: int = MAX_TEXT) -> str:
    """Client-derived text made safe to log and store: printable ASCII, bounded.

    Non-ASCII characters (lone surrogates included) become ``\\xNN``,
    ``\\uNNNN`` or ``\\UNNNNNNNN`` and ASCII control characters ``\\xNN``, as
    in ``repr``; the result is cut to ``limit`` characters (marked with
    ``...``). Text that is already clean comes back unchanged (so cleaning
    twice changes nothing).

    Arguments
    ---------
    text : object
        The text (anything else is ``str()``-ed first).
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
        Longest length allowed.

    Returns
    -------
    bool

    Example
    -------
    >>> is_clean("train_loss"), is_clean("loss\\n"), is_clean(3)
    (True, False, False)
    """
    return isinstance(text, str) and clean_text(text, limit) == text


def shown(value: Any, limit: int = 40) -> str:
    """A client's value quoted in a message: ``repr``-style, clean, bounded.

    Arguments
    ---------
    value : object
        What the client sent (a string is cut before ``repr``).
    limit : int
        Most characters returned.

    Returns
    -------
    str

    Example
    -------
    >>> shown(3), shown("2"), shown("\\x1b[2J")
    ('3', "'2'", "'\\\\x1b[2J'")
    """
    if isinstance(value, str):
        value = value[: limit + 1]
    return clean_text(repr(value), limit)


def upper_median(values: Iterable[float]) -> float:
    """The upper median: of ``k`` sorted values the one at index ``k // 2``.

    Fewer than half the values, all made as small as possible, cannot move
    it below the smallest of the others' upper half.

    Arguments
    ---------
    values : iterable of float
        At least one.

    Returns
    -------
    float

    Example
    -------
    >>> upper_median([3.0, 0.0, 0.0, 2.0]), upper_median([5.0])
    (2.0, 5.0)
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
        The update norms of the reference replies.
    bound : float, optional
        The multiple; ``None`` allows any norm.

    Returns
    -------
    float
        ``math.inf`` without a bound or without norms.

    Example
    -------
    >>> clip_limit([1.0, 2.0, 3.0], 4.0), clip_limit([1.0], None)
    (8.0, inf)
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
        The update's L2 norm (``None``: not measured, not scaled).
    limit : float
        See :func:`clip_limit`.

    Returns
    -------
    float
        ``1.0`` within the limit, else ``limit / norm`` (``0.0`` for an
        infinite norm).

    Example
    -------
    >>> clip_scale(2.0, 8.0), clip_scale(16.0, 8.0), clip_scale(math.inf, 8.0)
    (1.0, 0.5, 0.0)
    """
    if norm is None or not norm > limit:
        return 1.0
    return limit / norm if math.isfinite(norm) else 0.0


class NormLimit:
    """The update-norm limit of one round, from the norms counted so far.

    A server counts the norms of the round's first ``reference`` good
    replies in fold order (:meth:`start`), then each reply's own norm just
    before it folds it (:meth:`count`); the reply is scaled to
    :meth:`value`. What a reply is folded with then depends on the replies
    before it in fold order, never on the order they arrived in.

    Arguments
    ---------
    bound : float, optional
        The multiple of the upper median (``None``: no limit).
    reference : int
        How many norms the limit starts from.

    Example
    -------
    >>> limit = NormLimit(4.0, reference=2)
    >>> limit.ready
    False
    >>> limit.start({"a": 1.0, "b": 3.0})
    >>> limit.ready, limit.value()
    (True, 12.0)
    >>> limit.count("c", 1e30)  # the next reply, counted before its fold
    >>> limit.value(), clip_scale(1e30, limit.value()) < 1e-28
    (12.0, True)
    >>> NormLimit(None, 8).ready, NormLimit(None, 8).value()
    (True, inf)
    """

    def __init__(self, bound: float | None, reference: int) -> None:
        self.bound = bound
        self.reference = int(reference)
        self.ready = bound is None  # no bound: nothing to wait for
        self.norms: dict[str, float] = {}

    def start(self, norms: dict[str, float]) -> None:
        """Count the reference replies' norms (client to norm); folding may begin."""
        for client, norm in norms.items():
            self.count(client, norm)
        self.ready = True

    def count(self, client: str, norm: float | None) -> None:
        """Count one reply's norm (once per client)."""
        if self.bound is not None and norm is not None:
            self.norms.setdefault(client, norm)

    def value(self) -> float:
        """The largest update norm allowed now (see :func:`clip_limit`)."""
        return clip_limit(self.norms.values(), self.bound)


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
    """Refuse a compressed reply entry whose transform is not the broadcast's kind
    or reaches far beyond it.

    The parameters are finite and positive already (a
    :class:`~speechbrain_omc.transform.Transform` is built only so).

    Arguments
    ---------
    name : str
        The entry (for the message).
    received : CompressedTensor
        The reply's entry (parsed, not decoded).
    sent : CompressedTensor
        The broadcast's entry.

    Raises
    ------
    ValueError
        With the reason.

    Example
    -------
    >>> import torch
    >>> from speechbrain_omc.transform import Transform
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
    allowed = MAX_REACH_GROWTH * reach(sent)
    if not reach(received) <= allowed:
        raise ValueError(
            f"{name}: transform reaches {reach(received):.3g}, over "
            f"{MAX_REACH_GROWTH:g} x the broadcast's {reach(sent):.3g}"
        )
