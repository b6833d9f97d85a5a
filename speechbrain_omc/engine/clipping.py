"""Global gradient clipping for fused updates: hold, measure, then clip.

A fused update consumes a gradient inside backward, before the global norm
is known. :class:`HeldGradients` keeps each until backward ends (bfloat16,
float32 for lossless weights) with its float32 norm; :func:`clip_grad_norm_`
then computes torch's coefficient over held and ordinary gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["HeldGradients", "clip_grad_norm_"]


class HeldGradients:
    """Gradients of compressed weights waiting for the step's clipping;
    ``take(numel, device, dtype)`` gives their buffers (the workspace's).

    Example
    -------
    >>> held = HeldGradients(lambda n, device, dtype: torch.empty(n, dtype=dtype))
    >>> held.hold("w", torch.tensor([3.0, 4.0]), torch.bfloat16)
    >>> float(held.norms["w"]), held.nbytes
    (5.0, 4)
    >>> held.release("w", coef=torch.tensor(0.5))
    tensor([1.5000, 2.0000])
    """

    def __init__(self, take: Callable[..., torch.Tensor]):
        self._take = take
        self._grads: dict[str, torch.Tensor] = {}
        self.norms: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._grads

    def __len__(self) -> int:
        return len(self._grads)

    @property
    def nbytes(self) -> int:
        """Bytes of the gradients held now."""
        return sum(g.numel() * g.element_size() for g in self._grads.values())

    def hold(self, name: str, grad: torch.Tensor, dtype: torch.dtype) -> None:
        """Keep ``grad`` of parameter ``name`` as ``dtype``, and its float32 norm."""
        # The norm torch's clipping would take: of the float32 gradient.
        self.norms[name] = torch.linalg.vector_norm(grad)
        buffer = self._take(grad.numel(), grad.device, dtype).view(grad.shape)
        buffer.copy_(grad)
        self._grads[name] = buffer

    def release(
        self, name: str, coef: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Hand back a held gradient as float32, times ``coef``, and forget it
        (``None`` if nothing is held under ``name``).
        """
        held = self._grads.pop(name, None)
        self.norms.pop(name, None)
        if held is None:
            return None
        grad = held
        if held.dtype != torch.float32:
            grad = self._take(held.numel(), held.device, torch.float32)
            grad = grad.view(held.shape).copy_(held)
        if coef is not None:
            grad.mul_(coef)
        return grad

    def clear(self) -> None:
        """Drop every held gradient."""
        self._grads.clear()
        self.norms.clear()


def clip_grad_norm_(
    parameters: Iterable[torch.nn.Parameter],
    max_norm: float,
    held: HeldGradients | None = None,
    names: dict[int, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch.nn.utils.clip_grad_norm_`` over ordinary and held gradients.

    The total is the 2-norm of the per-parameter norms in parameter order (a
    held one by its measured norm); ordinary gradients are scaled in place, held
    ones later by the returned coefficient.

    Arguments
    ---------
    parameters : iterable of torch.nn.Parameter
        Clipped together (SpeechBrain: an optimizer's first group).
    max_norm : float
    held : HeldGradients, optional
    names : dict, optional
        ``id(parameter) -> name`` of the parameters that may be held.

    Returns
    -------
    total_norm : torch.Tensor
    coef : torch.Tensor or None
        The clamped coefficient (``None`` without gradients).

    Example
    -------
    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
    >>> total, coef = clip_grad_norm_([p], 1.0)
    >>> float(total), p.grad
    (5.0, tensor([0.6000, 0.8000]))
    """
    names = names or {}
    held_norms = held.norms if held is not None else {}
    slots: list[torch.Tensor | None] = []  # a held norm, or None: the next grad's
    grads = []
    for param in parameters:
        name = names.get(id(param))
        if name in held_norms:
            slots.append(held_norms[name])
        elif param.grad is not None:
            slots.append(None)
            grads.append(param.grad)
    if not slots:
        return torch.tensor(0.0), None
    # torch's own calls (one for every ordinary gradient), stacked in order.
    computed = iter(torch._foreach_norm(grads) if grads else [])
    norms = [next(computed) if norm is None else norm for norm in slots]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if grads:
        torch._foreach_mul_(grads, coef)
    return total, coef
