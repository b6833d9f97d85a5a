"""How the server combines the accepted clients' models (float32).

Each rule takes the decoded float32 models of the accepted clients, their
number of examples and the current global model, and returns the combined
model (the server's learning rate and momentum apply afterwards).

=============== ============================================ =====================
rule            what it does                                 cost per round
=============== ============================================ =====================
``fedavg``      mean weighted by ``num_examples`` (FedAvg)   one pass
``median``      coordinate-wise median; unweighted           K values of one
                                                             variable stacked and
                                                             sorted (K clients)
``trimmed_mean`` coordinate-wise mean after dropping the     as ``median``
                ``trim_fraction`` largest and smallest;
                unweighted
``norm_clip``   FedAvg of the updates (model minus global)   two passes; one
                each scaled down to an L2 norm of at most    norm per client
                ``clip_norm`` (default: the lower median
                of the round's update norms)
=============== ============================================ =====================

Bounded ``num_examples`` limits a client's weight in ``fedavg`` and
``norm_clip``; ``median`` and ``trimmed_mean`` ignore it (each client counts
once), so they also resist a client that lies about its data, as long as
fewer than half (``median``) or fewer than ``trim_fraction`` of the clients
(``trimmed_mean``) are hostile. ``norm_clip`` bounds how far any one client
moves the model.

Few clients per round weaken the rules: with two, ``median`` is their mean
and ``trimmed_mean`` trims nothing, so one hostile client of two moves the
model as far as it likes. ``norm_clip``'s default limit is the *lower*
median of the norms (of two, the smaller), so that one client of two cannot
move the model further than the other: its update is clipped to the honest
client's norm, though it still points where the hostile client wants (set
``clip_norm`` to bound it absolutely). The plain median of two norms would
be their mean, which a hostile client doubles by doubling its own.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["AGGREGATIONS", "Aggregation", "combine"]

AGGREGATIONS = ("fedavg", "median", "trimmed_mean", "norm_clip")


@dataclass(frozen=True)
class Aggregation:
    """The server's aggregation rule and its settings.

    Arguments
    ---------
    rule : str
        One of :data:`AGGREGATIONS`.
    trim_fraction : float
        ``trimmed_mean``: fraction of the clients dropped at each end
        (rounded down; at least one value is kept).
    clip_norm : float, optional
        ``norm_clip``: largest L2 norm of one client's update; ``None`` takes
        the lower median of the round's update norms (the smaller of two).

    Example
    -------
    >>> Aggregation("mean")
    Traceback (most recent call last):
    ...
    ValueError: aggregation 'mean' is not one of fedavg, median, trimmed_mean, norm_clip
    """

    rule: str = "fedavg"
    trim_fraction: float = 0.2
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATIONS:
            raise ValueError(
                f"aggregation {self.rule!r} is not one of {', '.join(AGGREGATIONS)}"
            )
        if not 0.0 <= float(self.trim_fraction) < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        if self.clip_norm is not None and not float(self.clip_norm) > 0:
            raise ValueError("clip_norm must be positive (or None)")


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
    cut = min(int(fraction * k), (k - 1) // 2)
    return values[cut : k - cut].mean(dim=0)


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
        One float32 model per accepted client (every name of ``master``),
        in a fixed order (the result must not depend on arrival order).
    weights : sequence of int
        Each client's ``num_examples`` (validated: positive, bounded).
    master : mapping
        The current global model.
    aggregation : Aggregation
        The rule.

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
        # The lower median: of two norms the smaller (see the module
        # docstring); for an odd number of clients it is the median.
        limit = aggregation.clip_norm or statistics.median_low(norms)
        scales = [min(1.0, limit / n) if n > 0 else 1.0 for n in norms]
        total = sum(weights)
        out = {}
        for name, value in master.items():
            delta = torch.zeros_like(value)
            for model, weight, scale in zip(models, weights, scales):
                delta.add_(model[name] - value, alpha=scale * weight / total)
            out[name] = value + delta
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
