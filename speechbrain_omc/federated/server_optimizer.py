"""Adaptive server optimizers: FedAdam and FedYogi.

Algorithm 2 of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
without bias correction, as in the paper: with ``delta`` the round's combined
model minus the global one, from ``m = 0`` and ``v = tau**2``, entry by entry::

    m = b1 m + (1 - b1) delta
    v = b2 v + (1 - b2) delta**2                      (adam)
    v = v - (1 - b2) delta**2 sign(v - delta**2)      (yogi)
    x = x + lr m / (sqrt(v) + tau)

Example
-------
>>> optimizer = ServerOptimizer("adam", betas=(0.9, 0.99), eps=1e-3)
>>> delta = torch.tensor([1.0, -2.0])
>>> m, v = adaptive_step(optimizer, torch.zeros(2), delta, None, None, lr=0.1)
>>> delta  # now the new value of the entry
tensor([ 0.0990, -0.0995])
>>> m, v
(tensor([ 0.1000, -0.2000]), tensor([0.0100, 0.0400]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "OPTIMIZERS",
    "ServerOptimizer",
    "adam_moment",
    "adaptive_step",
    "first_moment",
    "yogi_moment",
]

#: ``sgd`` is FedAvg, or FedAvgM with a server momentum.
OPTIMIZERS = ("sgd", "adam", "yogi")


@dataclass(frozen=True)
class ServerOptimizer:
    """Which server optimizer, and its settings.

    Arguments
    ---------
    name : str
        One of :data:`OPTIMIZERS`.
    betas : pair of float
        ``adam``, ``yogi``: ``b1, b2`` in ``[0, 1)``.
    eps : float
        ``adam``, ``yogi``: the adaptivity ``tau`` > 0.

    Example
    -------
    >>> ServerOptimizer("yogi").settings()["server_betas"]
    [0.9, 0.99]
    """

    name: str = "sgd"
    betas: Sequence[float] = (0.9, 0.99)
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(
                f"server_optimizer {self.name!r} is not one of {', '.join(OPTIMIZERS)}"
            )
        betas = tuple(self.betas) if isinstance(self.betas, Sequence) else ()
        if len(betas) != 2 or not all(_real(b) and 0 <= b < 1 for b in betas):
            raise ValueError(
                f"server_betas must be two numbers in [0, 1), not {self.betas!r}"
            )
        if not _real(self.eps) or not 0 < self.eps < math.inf:
            raise ValueError(f"server_eps must be a number > 0, not {self.eps!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        object.__setattr__(self, "eps", float(self.eps))

    @property
    def adaptive(self) -> bool:
        """Whether it keeps a second moment (``adam``, ``yogi``)."""
        return self.name != "sgd"

    def settings(self) -> dict:
        """What a resumed run must match (nothing for ``sgd``: older checkpoints)."""
        if not self.adaptive:
            return {}
        return {
            "server_optimizer": self.name,
            "server_betas": list(self.betas),
            "server_eps": self.eps,
        }


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first_moment(m: torch.Tensor, delta: torch.Tensor, beta1: float) -> torch.Tensor:
    """``m = b1 m + (1 - b1) delta``, in place on ``m``."""
    return m.mul_(beta1).add_(delta, alpha=1.0 - beta1)


def adam_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """``v = b2 v + (1 - b2) delta**2``, in place on ``v``."""
    return v.mul_(beta2).addcmul_(delta, delta, value=1.0 - beta2)


def yogi_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """``v = v - (1 - b2) delta**2 sign(v - delta**2)``, in place on ``v``."""
    square = delta * delta
    change = torch.sub(v, square).sign_().mul_(square)
    return v.sub_(change, alpha=1.0 - beta2)


def adaptive_step(
    optimizer: ServerOptimizer,
    master: torch.Tensor,
    delta: torch.Tensor,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One entry's step: the new ``(m, v)``; ``delta`` becomes the new entry.

    Arguments
    ---------
    optimizer : ServerOptimizer
    master, delta : torch.Tensor
        The global entry (unchanged) and the pseudo-gradient.
    m, v : torch.Tensor or None
        The moments, updated in place (``None``: from 0 and ``tau**2``).
    lr : float
    """
    (beta1, beta2), tau = optimizer.betas, optimizer.eps
    m = torch.zeros_like(delta) if m is None else m
    v = torch.full_like(delta, tau * tau) if v is None else v
    first_moment(m, delta, beta1)
    (yogi_moment if optimizer.name == "yogi" else adam_moment)(v, delta, beta2)
    # x + lr m / (sqrt(v) + tau), in delta's storage (delta is spent).
    step = torch.sqrt(v, out=delta).add_(tau)
    torch.div(m, step, out=step)
    step.mul_(lr).add_(master)
    return m, v
