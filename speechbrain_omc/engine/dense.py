"""The float32 parameters' gradients of a module under OMC, off malloc's heap.

In fused mode the compressed weights' gradients are consumed in backward, but
the float32 parameters (biases, normalisation, the PPQ fraction) keep theirs
until ``optimizer.step()``. Born in backward among the activations' freed
memory, each of them, even a bias's few kilobytes, splits a hole of the heap
that the next layer's large temporaries no longer fit in: on a conformer the
heap grows by about a weight matrix per kept bias gradient (150 MB or more of
peak memory for 31 MB of gradients). :class:`DenseGradients` copies each such
gradient, once complete, into one mapped buffer (reused every step, see
:class:`~speechbrain_omc.codec.memory.Workspace`) and frees the heap one at
once; the optimizer then steps the same values, so nothing changes but where
they live.

Example
-------
>>> from speechbrain_omc.codec.memory import Workspace
>>> lin = torch.nn.Linear(64, 256)
>>> dense = DenseGradients(Workspace(), min_bytes=0)
>>> dense.attach(lin.parameters())
>>> lin(torch.ones(2, 64)).sum().backward()
>>> dense.nbytes, lin.bias.grad.tolist()[:3]  # 64 x 256 weights + 256 biases
(66560, [2.0, 2.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from speechbrain_omc.codec.memory import Workspace

__all__ = ["DenseGradients", "MIN_BYTES"]

#: Below this many bytes of float32 gradients a model is left alone: its
#: temporaries are small too, and the copies would be pure overhead (about
#: 3 % of the main job's step).
MIN_BYTES = 4 << 20


class DenseGradients:
    """One mapped buffer holding the gradients of the attached parameters.

    Arguments
    ---------
    workspace : Workspace
        Gives the buffer (mapped pages; the same one every step once the
        previous step's gradients are gone).
    min_bytes : int, optional
        Fewer bytes of gradients are left where they are (default
        :data:`MIN_BYTES`).
    """

    def __init__(self, workspace: Workspace, min_bytes: int | None = None):
        self.workspace = workspace
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.attached = False
        self._layout: dict[torch.nn.Parameter, tuple[int, int]] = {}
        self._numel = 0
        self._buffer: torch.Tensor | None = None
        self._filled: set[torch.nn.Parameter] = set()
        self._hooks: list = []

    def __reduce__(self):
        # Hooks are not copied with parameters: a copy attaches its own.
        return (DenseGradients, (self.workspace, self.min_bytes))

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer (float32 values of the attached parameters)."""
        return 4 * self._numel

    def attach(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Keep the gradients of ``params`` (CPU, float32, contiguous, trained;
        others are left alone) in the buffer; below ``min_bytes``
        altogether, nothing is attached (``malloc`` serves them well)."""
        self.detach()
        chosen = [
            p
            for p in dict.fromkeys(params)
            if p.requires_grad
            and p.device.type == "cpu"
            and p.dtype == torch.float32
            and p.is_contiguous()
        ]
        self.attached = True
        if 4 * sum(p.numel() for p in chosen) < self.min_bytes:
            return
        for param in chosen:
            self._layout[param] = (self._numel, param.numel())
            self._numel += param.numel()
            self._hooks.append(param.register_post_accumulate_grad_hook(self._move))

    def detach(self) -> None:
        """Remove the hooks; gradients stay where they are."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._layout.clear()
        self._numel, self._buffer, self.attached = 0, None, False
        self._filled.clear()

    def _move(self, param: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: the complete gradient into its place."""
        grad = param.grad
        where = self._layout.get(param)
        if where is None or grad is None or grad.layout != torch.strided:
            return
        if grad.dtype != torch.float32 or grad.device.type != "cpu" or _ddp():
            return
        offset, numel = where
        if self._buffer is not None and param in self._filled:
            if grad.data_ptr() == self._buffer[offset].data_ptr():
                return  # accumulated in place: already there
            # A new backward before the previous gradients were dropped (or
            # one of them is kept elsewhere): a new buffer, never overwrite.
            self._buffer = None
        if self._buffer is None:
            self._buffer = self.workspace.take(self._numel)
            self._filled.clear()
        self._filled.add(param)
        view = self._buffer[offset : offset + numel].view(param.shape)
        param.grad = view.copy_(grad)


def _ddp() -> bool:
    """Under DDP the reducer owns where gradients live (bucket views)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )
