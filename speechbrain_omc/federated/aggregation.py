"""How the server combines the accepted clients' models (float32).

``fedavg`` (weighted by examples), ``median``, ``trimmed_mean`` and
``norm_clip``, after the update-norm bound of
:mod:`~speechbrain_omc.federated.defence`. ``fedavg`` and ``norm_clip`` with
a fixed ``clip_norm`` fold each reply into a running weighted mean as it
arrives (:class:`StreamingAggregator`, one model of memory); the other rules
keep every update until the round closes (:class:`BufferedAggregator`),
within a memory budget. What each rule withstands is in
docs/federated_server.md.

Example
-------
>>> models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])},
...           {"w": torch.tensor([100.0])}]
>>> master = {"w": torch.tensor([0.0])}
>>> combine(models, [1, 1, 1], master, Aggregation("fedavg"))["w"]
tensor([34.3333])
>>> combine(models, [1, 1, 1], master, Aggregation("median"))["w"]
tensor([2.])
>>> combine(models, [1, 1, 1], master, Aggregation("norm_clip"))["w"]
tensor([1.6667])
>>> combine(models[1:], [1, 1], master, Aggregation("norm_clip"))["w"]  # 2 of 2
tensor([2.])
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from speechbrain_omc.codec.memory import MAPPED_MIN_BYTES, mapped_empty
from speechbrain_omc.federated.defence import DEFAULT_NORM_BOUND, DEFAULT_NORM_REFERENCE

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_MEMORY_BUDGET",
    "Aggregation",
    "BufferedAggregator",
    "MemoryBudgetExceeded",
    "StreamingAggregator",
    "buffered_nbytes",
    "check_memory_budget",
    "clamp_update",
    "combine",
    "make_aggregator",
    "scale_update",
    "streams",
]

AGGREGATIONS = ("fedavg", "median", "trimmed_mean", "norm_clip")
# Values per float64 chunk of clamp_update (512 KiB).
_CHUNK = 2**16
#: Default bound of the decoded updates a rule that needs all of them may
#: hold (clients per round x float32 model), in bytes: 1 GiB.
DEFAULT_MEMORY_BUDGET = 2**30


@dataclass(frozen=True)
class Aggregation:
    """The server's aggregation rule and its settings.

    Arguments
    ---------
    rule : str
        One of :data:`AGGREGATIONS`.
    trim_fraction : float
        ``trimmed_mean``: fraction of the clients dropped at each end.
    clip_norm : float, optional
        ``norm_clip``: largest update norm; ``None`` takes the lower median of
        the round's update norms.
    norm_bound : float, optional
        Any rule: the multiple of the reference replies' upper median norm (and
        per-entry peak) an update is held to; ``None`` disables both.
    norm_reference : int
        How many reference replies the limits come from.

    Example
    -------
    >>> Aggregation("mean")
    Traceback (most recent call last):
    ...
    ValueError: aggregation 'mean' is not one of fedavg, median, trimmed_mean, norm_clip
    >>> Aggregation().norm_bound, Aggregation(norm_bound=None).norm_bound
    (4.0, None)
    """

    rule: str = "fedavg"
    trim_fraction: float = 0.2
    clip_norm: float | None = None
    norm_bound: float | None = DEFAULT_NORM_BOUND
    norm_reference: int = DEFAULT_NORM_REFERENCE

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATIONS:
            raise ValueError(
                f"aggregation {self.rule!r} is not one of {', '.join(AGGREGATIONS)}"
            )
        if not 0.0 <= float(self.trim_fraction) < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        if self.clip_norm is not None and not float(self.clip_norm) > 0:
            raise ValueError("clip_norm must be positive (or None)")
        if self.norm_bound is not None and not float(self.norm_bound) >= 1:
            raise ValueError("norm_bound must be at least 1 (or None)")
        if isinstance(self.norm_reference, bool) or int(self.norm_reference) < 1:
            raise ValueError("norm_reference must be a positive integer")


def _fedavg(models, weights, name, master):
    # Python ints: the total is exact however large; each factor is a float
    # in (0, 1], so no product can overflow.
    total = sum(weights)
    average = torch.zeros_like(master[name])
    for model, weight in zip(models, weights):
        average.add_(model[name], alpha=weight / total)
    return average


def _sorted(models, name):
    return torch.sort(torch.stack([m[name] for m in models]), dim=0).values


def _median(models, name):
    values, k = _sorted(models, name), len(models)
    if k % 2:
        return values[k // 2].clone()
    # Halves first: the sum of two large finite values could overflow.
    return values[k // 2 - 1] * 0.5 + values[k // 2] * 0.5


def _trimmed_mean(models, name, fraction):
    values, k = _sorted(models, name), len(models)
    # At least one per side whenever one can go (k >= 3): at four clients a
    # round, 0.2 * 4 rounds down to nothing.
    cut = max(1, int(fraction * k)) if fraction > 0 else 0
    cut = min(cut, (k - 1) // 2)
    # Summed in float64 (the float32 sum of large finite values overflows),
    # one client's values at a time: a float64 copy of the kept slice would
    # be twice the stacked values the memory budget counts.
    total = torch.zeros(values.shape[1:], dtype=torch.float64)
    for row in values[cut : k - cut]:
        total.add_(row)
    return total.div_(k - 2 * cut).float()


def _update_norms(models, master) -> list[float]:
    norms = []
    for model in models:
        squares = 0.0
        for name, value in master.items():
            squares += float((model[name].double() - value.double()).square().sum())
        norms.append(squares**0.5)
    return norms


def combine(
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[int],
    master: Mapping[str, torch.Tensor],
    aggregation: Aggregation,
) -> dict[str, torch.Tensor]:
    """Combine the accepted clients' models under ``aggregation``.

    Arguments
    ---------
    models : sequence of mapping
        One float32 model per accepted client, in a fixed order.
    weights : sequence of int
        Each client's ``num_examples``.
    master : mapping
        The current global model.
    aggregation : Aggregation

    Returns
    -------
    dict
        Name to the combined float32 tensor.
    """
    if not models or len(models) != len(weights):
        raise ValueError("combine: need one weight per model, and a model")
    rule = aggregation.rule
    if rule == "norm_clip":
        norms = _update_norms(models, master)
        # The lower median: of two norms the smaller (see
        # docs/federated_server.md); of an odd number, the median.
        limit = aggregation.clip_norm or statistics.median_low(norms)
        scales = [min(1.0, limit / n) if n > 0 else 1.0 for n in norms]
        total = sum(weights)
        out = {}
        for name, value in master.items():
            # float64: a model minus the master can overflow float32.
            delta = torch.zeros_like(value, dtype=torch.float64)
            for model, weight, scale in zip(models, weights, scales):
                update = model[name].double() - value.double()
                delta.add_(update, alpha=scale * weight / total)
            out[name] = (value.double() + delta).float()
        return out
    out = {}
    for name in master:
        if rule == "fedavg":
            out[name] = _fedavg(models, weights, name, master)
        elif rule == "median":
            out[name] = _median(models, name)
        else:
            out[name] = _trimmed_mean(models, name, aggregation.trim_fraction)
    return out


# ------------------------------------------------------------------ streaming
class MemoryBudgetExceeded(ValueError):
    """A rule that keeps every update would need more than its budget."""


def streams(aggregation: Aggregation) -> bool:
    """Whether ``aggregation`` folds each reply as it arrives (O(model) memory).

    Arguments
    ---------
    aggregation : Aggregation

    Returns
    -------
    bool

    Example
    -------
    >>> streams(Aggregation("fedavg")), streams(Aggregation("median"))
    (True, False)
    >>> streams(Aggregation("norm_clip"))  # the limit is the median of all norms
    False
    >>> streams(Aggregation("norm_clip", clip_norm=1.0))
    True
    """
    rule = aggregation.rule
    return rule == "fedavg" or (
        rule == "norm_clip" and aggregation.clip_norm is not None
    )


def buffered_nbytes(
    aggregation: Aggregation, clients_per_round: int, model_nbytes: int
) -> int:
    """Bytes of decoded updates ``aggregation`` holds at most in one round.

    Arguments
    ---------
    aggregation : Aggregation
    clients_per_round : int
    model_nbytes : int

    Returns
    -------
    int
        0 for a streaming rule.

    Example
    -------
    >>> buffered_nbytes(Aggregation("median"), 100, 4 * 10**6)
    400000000
    >>> buffered_nbytes(Aggregation("fedavg"), 100, 4 * 10**6)
    0
    """
    if streams(aggregation):
        return 0
    return int(clients_per_round) * int(model_nbytes)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def check_memory_budget(
    aggregation: Aggregation,
    clients_per_round: int,
    model_nbytes: int,
    budget: int = DEFAULT_MEMORY_BUDGET,
) -> None:
    """Refuse a rule that would keep more decoded updates than ``budget``.

    Arguments
    ---------
    aggregation : Aggregation
    clients_per_round : int
    model_nbytes : int
    budget : int

    Raises
    ------
    MemoryBudgetExceeded

    Example
    -------
    >>> try:
    ...     check_memory_budget(Aggregation("median"), 100, 520 * 10**6)
    ... except MemoryBudgetExceeded as error:
    ...     print(error)
    aggregation 'median' keeps every accepted update in float32 until the round
    closes: 100 clients per round x 495.9 MiB = 49,591.1 MiB, over the memory
    budget of 1,024.0 MiB. Use fedavg, ...
    """
    need = buffered_nbytes(aggregation, clients_per_round, model_nbytes)
    if need > budget:
        raise MemoryBudgetExceeded(
            f"aggregation {aggregation.rule!r} keeps every accepted update in "
            f"float32 until the round closes: {clients_per_round} clients per "
            f"round x {_mib(model_nbytes)} = {_mib(need)}, over the memory "
            f"budget of {_mib(budget)}. Use fedavg, or norm_clip with a "
            "clip_norm (they fold each reply as it arrives: one model in memory "
            "whatever the clients per round), fewer clients per round, or a "
            "larger budget."
        )


def scale_update(
    value: torch.Tensor, master: torch.Tensor, scale: float
) -> torch.Tensor:
    """``master + scale * (value - master)``, in place in ``value``.

    Arguments
    ---------
    value : torch.Tensor
    master : torch.Tensor
    scale : float

    Returns
    -------
    torch.Tensor

    Example
    -------
    >>> big = torch.finfo(torch.float32).max
    >>> scale_update(torch.tensor([big, 3.0]), torch.tensor([-big, 1.0]), 0.25)
    tensor([-1.7014e+38,  1.5000e+00])
    """
    # float64: the update of a value near the float32 limit can overflow.
    base = master.double()
    return value.copy_(base.add_(value.double().sub_(base), alpha=scale))


def clamp_update(
    value: torch.Tensor, master: torch.Tensor, limit: float
) -> torch.Tensor:
    """``master + clamp(value - master, -limit, limit)``, in place in ``value``.

    Arguments
    ---------
    value : torch.Tensor
        A reply's values (overwritten).
    master : torch.Tensor
        The server's values of the same entry.
    limit : float
        The largest ``|value - master|`` kept.

    Returns
    -------
    torch.Tensor

    Example
    -------
    >>> clamp_update(torch.tensor([1e30, 1.5, -9.0]), torch.ones(3), 2.0)
    tensor([ 3.0000,  1.5000, -1.0000])
    """
    flat, base = value.reshape(-1), master.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        anchor = base[start : start + _CHUNK].double()
        update = part.double().sub_(anchor).clamp_(-limit, limit)
        part.copy_(update.add_(anchor))
        del update, anchor
    return value


def _owned(value: torch.Tensor) -> torch.Tensor:
    # Running values on pages of their own: freed, they go back to the system
    # at once instead of leaving holes in the heap (see memory.py).
    if value.numel() * 4 < MAPPED_MIN_BYTES:
        return value.clone()
    out = mapped_empty(value.numel(), torch.float32).view(value.shape)
    return out.copy_(value)


class StreamingAggregator:
    """FedAvg (or clipped FedAvg) folded one reply at a time.

    Arguments
    ---------
    master : mapping
        The current global model (not modified).
    aggregation : Aggregation
        ``fedavg``, or ``norm_clip`` with ``clip_norm``.

    Example
    -------
    >>> master = {"w": torch.zeros(2)}
    >>> agg = StreamingAggregator(master, Aggregation("fedavg"))
    >>> agg.add([("w", torch.tensor([1.0, 2.0]))], weight=1)
    >>> agg.add([("w", torch.tensor([4.0, 8.0]))], weight=2)
    >>> agg.result()["w"], agg.count, agg.total
    (tensor([3., 6.]), 2, 3)
    """

    def __init__(self, master: Mapping[str, torch.Tensor], aggregation: Aggregation):
        if not streams(aggregation):
            raise ValueError(f"aggregation {aggregation.rule!r} does not stream")
        self.master = master
        self.aggregation = aggregation
        self.values: dict[str, torch.Tensor] = {}
        self.total = 0  # Python int: exact however large
        self.count = 0

    @property
    def needs_norm(self) -> bool:
        """Whether :meth:`add` needs the update's norm (``norm_clip``)."""
        return self.aggregation.rule == "norm_clip"

    def add(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        weight: int,
        norm: float | None = None,
        scale: float = 1.0,
    ) -> None:
        """Fold one reply in.

        Arguments
        ---------
        tensors : iterable of (name, tensor)
            Every entry, float32; each may be changed in place.
        weight : int
        norm : float, optional
            ``norm_clip``: the update's norm.
        scale : float
            The update is scaled by this first (the server's bound).
        """
        total = self.total + int(weight)
        share = int(weight) / total
        if self.needs_norm:
            if norm is None:
                raise ValueError("norm_clip: the update's norm is needed")
            limit = float(self.aggregation.clip_norm)
            scale = min(scale, limit / norm if norm > 0 else 1.0)
        for name, value in tensors:
            master = self.master[name]
            if self.needs_norm:  # the update is folded, not the model
                if scale != 1.0:  # in float64: see scale_update
                    delta = value.double().sub_(master.double()).mul_(scale)
                    value = value.copy_(delta)
                    del delta
                else:
                    value = value.sub_(master)
            elif scale != 1.0:
                value = scale_update(value, master, scale)
            if self.count == 0:
                self.values[name] = _owned(value)
            else:
                self.values[name].mul_(1.0 - share).add_(value, alpha=share)
            del value  # its buffer is free for the next entry
        self.total, self.count = total, self.count + 1

    def result(self) -> dict[str, torch.Tensor]:
        """The combined model (the aggregator's own tensors; call once)."""
        if not self.count:
            raise ValueError("no reply was folded in")
        if self.needs_norm:
            for name, value in self.values.items():
                value.add_(self.master[name])
        return self.values


class BufferedAggregator:
    """Rules that need every update: replies are kept, then combined.

    Arguments
    ---------
    master : mapping
    aggregation : Aggregation
    budget : int, optional
        Most bytes of decoded updates held; a reply beyond it is refused before
        it is decoded.

    Example
    -------
    >>> master = {"w": torch.zeros(1)}
    >>> agg = BufferedAggregator(master, Aggregation("median"), budget=8)
    >>> for x in (1.0, 2.0):
    ...     agg.add([("w", torch.tensor([x]))], weight=1)
    >>> try:
    ...     agg.add([("w", torch.tensor([9.0]))], weight=1)
    ... except MemoryBudgetExceeded as error:
    ...     print(error)
    aggregation 'median' would hold 12 bytes of updates, over its budget of 8
    >>> agg.result()["w"]
    tensor([1.5000])
    """

    needs_norm = False

    def __init__(
        self,
        master: Mapping[str, torch.Tensor],
        aggregation: Aggregation,
        budget: int | None = None,
    ):
        self.master = master
        self.aggregation = aggregation
        self.budget = budget
        self.model_nbytes = sum(4 * v.numel() for v in master.values())
        self.models: list[dict[str, torch.Tensor]] = []
        self.weights: list[int] = []

    @property
    def count(self) -> int:
        """Replies held."""
        return len(self.models)

    @property
    def total(self) -> int:
        """Sum of their weights."""
        return sum(self.weights)

    def add(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        weight: int,
        norm: float | None = None,
        scale: float = 1.0,
    ) -> None:
        """Keep one reply (see :meth:`StreamingAggregator.add`), within the budget."""
        need = (len(self.models) + 1) * self.model_nbytes
        if self.budget is not None and need > self.budget:
            raise MemoryBudgetExceeded(
                f"aggregation {self.aggregation.rule!r} would hold {need} bytes "
                f"of updates, over its budget of {self.budget}"
            )
        if scale != 1.0:
            tensors = (
                (name, scale_update(value, self.master[name], scale))
                for name, value in tensors
            )
        self.models.append(dict(tensors))
        self.weights.append(int(weight))

    def result(self) -> dict[str, torch.Tensor]:
        """The combined model (see :func:`combine`)."""
        out = combine(self.models, self.weights, self.master, self.aggregation)
        self.models.clear()
        return out


def make_aggregator(
    aggregation: Aggregation,
    master: Mapping[str, torch.Tensor],
    budget: int | None = DEFAULT_MEMORY_BUDGET,
) -> StreamingAggregator | BufferedAggregator:
    """The aggregator of one round: streaming when the rule allows it.

    Arguments
    ---------
    aggregation : Aggregation
    master : mapping
    budget : int, optional

    Returns
    -------
    StreamingAggregator or BufferedAggregator

    Example
    -------
    >>> type(make_aggregator(Aggregation(), {"w": torch.zeros(1)})).__name__
    'StreamingAggregator'
    """
    if streams(aggregation):
        return StreamingAggregator(master, aggregation)
    return BufferedAggregator(master, aggregation, budget)
