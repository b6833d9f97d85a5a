"""The SGD rule of fused updates, bit-identical to ``torch.optim.SGD``.

Fused mode applies the update inside backward, one variable at a time, so it
cannot call a torch optimizer; it calls :func:`sgd_update_` instead. The
arithmetic follows ``torch.optim.SGD``'s single-tensor path operation by
operation, so that fused and simple mode give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SGDSettings:
    """Hyperparameters of the fused SGD update (as in ``torch.optim.SGD``).

    Arguments
    ---------
    lr : float, optional
        Learning rate; ``None`` until set (an update without it is an error).
    momentum : float
        Momentum factor.
    dampening : float
        Dampening of the momentum.
    weight_decay : float
        L2 penalty.
    nesterov : bool
        Nesterov momentum.
    """

    lr: float | None = None
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> SGDSettings:
        """Read the settings of the first group of a ``torch.optim.SGD``.

        Arguments
        ---------
        optimizer : torch.optim.Optimizer
            Must be plain SGD: fused mode implements no other rule.

        Returns
        -------
        SGDSettings

        Example
        -------
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> SGDSettings.from_optimizer(opt).lr
        0.1
        >>> SGDSettings.from_optimizer(torch.optim.Adam([torch.zeros(1)]))
        Traceback (most recent call last):
        ...
        ValueError: fused OMC updates implement SGD only, got Adam; ...
        """
        if type(optimizer) is not torch.optim.SGD:
            raise ValueError(
                "fused OMC updates implement SGD only, got "
                f"{type(optimizer).__name__}; use update_mode='simple' for other "
                "optimizers"
            )
        group = optimizer.param_groups[0]
        if group.get("maximize", False):
            raise ValueError("fused OMC updates do not support SGD(maximize=True)")
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
        for other in optimizer.param_groups[1:]:
            if any(other[k] != group[k] for k in keys):
                raise ValueError(
                    "fused OMC updates apply one SGD setting to every compressed "
                    "parameter, but the optimizer's param groups differ in "
                    f"{[k for k in keys if other[k] != group[k]]} (SpeechBrain's "
                    "remove_vector_weight_decay does this); use one group or "
                    "update_mode='simple'"
                )
        return cls(
            lr=float(group["lr"]),
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
        )


def sgd_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    settings: SGDSettings,
) -> torch.Tensor | None:
    """Apply one SGD step to ``param`` in place.

    Arguments
    ---------
    param : torch.Tensor
        The (decompressed) value, updated in place.
    grad : torch.Tensor
        Its gradient.
    momentum_buffer : torch.Tensor or None
        The momentum state (``None`` before the first step), updated in place.
    settings : SGDSettings
        Hyperparameters.

    Returns
    -------
    torch.Tensor or None
        The momentum buffer to keep (``None`` without momentum).

    Example
    -------
    >>> p = torch.ones(2)
    >>> sgd_update_(p, torch.ones(2), None, SGDSettings(lr=0.5))
    >>> p
    tensor([0.5000, 0.5000])
    """
    if settings.lr is None:
        raise RuntimeError(
            "fused OMC update without a learning rate: call "
            "handle.set_sgd(lr=...) (OMCBrain does this from its optimizer)"
        )
    d_p = grad
    if settings.weight_decay != 0:
        d_p = d_p.add(param, alpha=settings.weight_decay)
    if settings.momentum != 0:
        if momentum_buffer is None:
            momentum_buffer = torch.clone(d_p).detach()
        else:
            momentum_buffer.mul_(settings.momentum).add_(
                d_p, alpha=1 - settings.dampening
            )
        if settings.nesterov:
            d_p = d_p.add(momentum_buffer, alpha=settings.momentum)
        else:
            d_p = momentum_buffer
    param.add_(d_p, alpha=-settings.lr)
    return momentum_buffer
