"""The SGD rule of fused updates, bit-identical to ``torch.optim.SGD``.

Fused mode applies the update inside backward, one variable at a time, so it
cannot call a torch optimizer; it calls :func:`sgd_step_` instead: the native
kernel on CPU tensors (one pass that also checks the gradient and measures
the new value's range), else :func:`sgd_update_`. Both follow
``torch.optim.SGD``'s single-tensor path operation by operation, so that
fused and simple mode give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speechbrain_omc import kernels
from speechbrain_omc.compressed import CompressedTensor
from speechbrain_omc.formats import affine_plan


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


@dataclass
class SGDResult:
    """What one fused SGD step did.

    Arguments
    ---------
    nonfinite_grad : int
        Non-finite gradient values; when not zero, nothing was updated (the
        value is left undefined: it is a scratch copy).
    momentum_buffer : torch.Tensor or None
        The momentum state to keep.
    minmax : tuple of float, optional
        ``(min, max)`` of the updated value when the step measured it.
    """

    nonfinite_grad: int
    momentum_buffer: torch.Tensor | None
    minmax: tuple[float, float] | None = None


def sgd_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    settings: SGDSettings,
    codes: CompressedTensor | None = None,
) -> SGDResult:
    """One checked SGD step on a scratch float32 value, in place.

    Arguments
    ---------
    param : torch.Tensor
        The decompressed value, updated in place; with ``codes``, a scratch
        buffer that receives their decoding first (one pass with the native
        kernels).
    grad : torch.Tensor
        Its gradient.
    momentum_buffer : torch.Tensor or None
        The momentum state (``None`` before the first step); untouched when
        the gradient is not finite.
    settings : SGDSettings
        Hyperparameters.
    codes : CompressedTensor, optional
        The compressed value to start from.

    Returns
    -------
    SGDResult

    Example
    -------
    >>> p = torch.ones(3)
    >>> result = sgd_step_(p, torch.tensor([1.0, 2.0, 3.0]), None, SGDSettings(lr=0.5))
    >>> p.tolist(), result.nonfinite_grad
    ([0.5, 0.0, -0.5], 0)
    >>> sgd_step_(p, torch.tensor([1.0, float("nan"), 0.0]), None,
    ...           SGDSettings(lr=0.5)).nonfinite_grad
    1
    """
    if settings.lr is None:
        raise RuntimeError(
            "fused OMC update without a learning rate: call "
            "handle.set_sgd(lr=...) (OMCBrain does this from its optimizer)"
        )
    grad = grad.reshape(param.shape)
    use_momentum = settings.momentum != 0
    first = use_momentum and momentum_buffer is None
    buffer = torch.empty_like(param) if first else momentum_buffer
    scratch = [param, grad.contiguous(), buffer] if use_momentum else [param, grad]
    if codes is not None:
        scratch.append(codes.packed)
    if param.dtype == grad.dtype == torch.float32 and kernels.native_for(*scratch):
        decode = {}
        if codes is not None:
            factors, add = affine_plan(1.0, *codes.transform.decode_args)
            decode = dict(
                codes=codes.packed,
                fmt=codes.format.spec,
                multipliers=factors,
                shift=add,
            )
        bad, lo, hi, overflowed = kernels.sgd_step(
            param,
            scratch[1],
            buffer if use_momentum else None,
            settings.lr,
            settings.momentum,
            settings.dampening,
            settings.weight_decay,
            settings.nesterov,
            first,
            **decode,
        )
        if bad:
            return SGDResult(bad, momentum_buffer)
        # An update that overflowed leaves the range unmeasured, so that
        # re-compression finds the non-finite values and says so.
        minmax = None if overflowed else (lo, hi)
        return SGDResult(0, buffer if use_momentum else None, minmax)
    finite = torch.isfinite(grad)
    if not bool(finite.all()):
        return SGDResult(int((~finite).sum()), momentum_buffer)
    if codes is not None:
        codes.decompress(out=param)
    buffer = sgd_update_(param, grad, momentum_buffer, settings)
    return SGDResult(0, buffer)
