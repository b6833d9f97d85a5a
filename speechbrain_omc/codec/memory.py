"""Where OMC's buffers live, so that the memory saving shows in the process.

A saving counts only if resident memory drops, and freed heap memory stays
resident: OMC's allocations among activations would fragment glibc's heap.
So long-lived codes are mapped pages of their own (:func:`mapped_empty`),
transient decompressed copies come from a reused :class:`Workspace` of
mapped buffers, and :func:`trim_heap` returns the float32 parameters freed
at compression. The allocator's settings are left alone.

Example
-------
>>> import torch
>>> ws = Workspace()
>>> a = ws.take(1 << 16)
>>> ptr = a.data_ptr(); del a
>>> ws.take(1 << 16).data_ptr() == ptr  # reused once the tensor is gone
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys
import threading

import torch

__all__ = ["MAPPED_MIN_BYTES", "Workspace", "mapped_empty", "trim_heap"]

#: Smaller buffers stay with malloc: a mapping costs at least a page.
MAPPED_MIN_BYTES = 1 << 16


def mapped_empty(numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor on pages of its own (anonymous ``mmap``),
    given back when its storage dies; below :data:`MAPPED_MIN_BYTES`,
    ``torch.empty``.

    Example
    -------
    >>> mapped_empty(1 << 20, torch.float32).shape
    torch.Size([1048576])
    """
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < MAPPED_MIN_BYTES:
        return torch.empty(numel, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=numel)


class Workspace:
    """Reusable buffers for transient tensors (float32 by default).

    A buffer is free again once every tensor made from it has died. Off the
    CPU :meth:`take` is ``torch.empty``. Idle buffers beyond ``idle_bytes`` are
    unmapped by :meth:`trim`. ``exact`` reuses a buffer only for its size (a
    training step's use); otherwise an idle buffer of the type at least as
    large serves and a larger one replaces the smaller (a reader of entries of
    many sizes holds one buffer per type).

    Example
    -------
    >>> ws = Workspace(exact=False)
    >>> big = ws.take(1 << 16); ptr = big.data_ptr(); del big
    >>> ws.take(1 << 15).data_ptr() == ptr  # the idle larger buffer serves
    True
    """

    def __init__(self, idle_bytes: int = 64 << 20, exact: bool = True):
        self.idle_bytes = idle_bytes
        self.exact = exact
        # (type, size in bytes) -> buffers; the type is None when exact.
        self._buffers: dict[tuple[torch.dtype | None, int], list[mmap.mmap]] = {}
        self._lock = threading.Lock()

    def __reduce__(self):
        # A copy (of a module under OMC) starts with an empty pool of its own.
        return (Workspace, (self.idle_bytes, self.exact))

    @staticmethod
    def _idle(buffer: mmap.mmap) -> bool:
        # References: the pool's list, the caller's loop variable, this
        # parameter and getrefcount's argument; a live tensor adds one.
        return sys.getrefcount(buffer) <= 4

    def take(
        self,
        numel: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """An uninitialised 1-D tensor of ``numel`` values on ``device``."""
        nbytes = numel * dtype.itemsize
        if nbytes < MAPPED_MIN_BYTES or torch.device(device).type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        with self._lock:
            if self.exact:
                buffer = self._same_size((None, nbytes))
            else:
                buffer = self._fitting(dtype, nbytes)
            return torch.frombuffer(buffer, dtype=dtype, count=numel)

    def _same_size(self, key: tuple[torch.dtype | None, int]) -> mmap.mmap:
        pool = self._buffers.setdefault(key, [])
        for buffer in pool:
            if self._idle(buffer):
                return buffer
        buffer = mmap.mmap(-1, key[1])
        pool.append(buffer)
        return buffer

    def _fitting(self, dtype: torch.dtype, nbytes: int) -> mmap.mmap:
        # The smallest idle buffer of this type that holds nbytes.
        sizes = sorted(n for t, n in self._buffers if t == dtype and n >= nbytes)
        for key in [(dtype, n) for n in sizes]:
            for buffer in self._buffers[key]:
                if self._idle(buffer):
                    return buffer
        # None: the idle buffers of this type are smaller; a new one replaces
        # them.
        for key in [key for key in self._buffers if key[0] == dtype]:
            pool = self._buffers[key]
            pool[:] = [b for b in pool if not self._idle(b)]
            if not pool:
                del self._buffers[key]
        return self._same_size((dtype, nbytes))

    @property
    def nbytes(self) -> int:
        """Bytes mapped by the pool, in use or idle."""
        return sum(len(b) for pool in self._buffers.values() for b in pool)

    def trim(self) -> None:
        """Unmap idle buffers beyond ``idle_bytes`` (largest first)."""
        with self._lock:
            idle = [
                (len(b), key, b)
                for key, pool in self._buffers.items()
                for b in pool
                if self._idle(b)
            ]
            kept = sum(n for n, _, _ in idle)
            for n, key, buffer in sorted(idle, key=lambda e: -e[0]):
                if kept <= self.idle_bytes:
                    break
                self._buffers[key].remove(buffer)
                kept -= n

    def release(self) -> None:
        """Give the pages of idle buffers back to the system, keeping the
        mappings: a buffer that is taken again starts from zeroed pages.

        Between training steps nothing of the pool is in use; released, it
        costs no resident memory while the next forward builds its
        activations.
        """
        # The buffers are shared anonymous mappings: MADV_DONTNEED would only
        # unmap their pages, MADV_REMOVE frees them (Linux).
        advice = getattr(mmap, "MADV_REMOVE", None)
        if advice is None:
            return
        with self._lock:
            for pool in self._buffers.values():
                for buffer in pool:
                    if self._idle(buffer):
                        try:
                            buffer.madvise(advice)
                        except OSError:  # a kernel or sandbox that refuses it
                            return


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        func = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    func.argtypes, func.restype = [ctypes.c_size_t], ctypes.c_int
    return func


def trim_heap() -> bool:
    """Return the free memory of malloc's heap to the system (``malloc_trim``);
    ``False`` where the C library cannot.

    Example
    -------
    >>> isinstance(trim_heap(), bool)
    True
    """
    func = _malloc_trim()
    if func is None:
        return False
    func(0)
    return True


class PageReturn:
    """When a training loop on the CPU gives freed memory back to the system.

    Backward frees activations while gradients pile up, and a step's
    buffers sit idle through the next forward: unless their pages go back,
    both add up in resident memory. Returning them costs a heap walk
    (milliseconds), so only steps over ``every`` bytes of parameters do:
    every ``every`` bytes of gradients consumed in backward
    (:meth:`consumed`), and once before the next forward
    (:meth:`before_forward`) of a step that asked for it (:meth:`after_step`).

    Arguments
    ---------
    workspace : Workspace
        Its idle buffers' pages go back before each forward.
    every : int
        Bytes between two returns in backward; smaller steps never return.

    Example
    -------
    >>> pages = PageReturn(Workspace(), every=1 << 20)
    >>> pages.consumed(1 << 19), pages.consumed(1 << 19)  # the second returns
    (False, True)
    >>> pages.after_step(param_bytes=1 << 10); pages.before_forward()
    False
    """

    def __init__(self, workspace: Workspace, every: int = 16 << 20):
        self.workspace = workspace
        self.every = every
        self.enabled = True
        self._since = 0
        self._pending = False

    def consumed(self, nbytes: int) -> bool:
        """Count ``nbytes`` of gradients; ``True`` when pages went back."""
        if not self.enabled:
            return False
        self._since += nbytes
        if self._since < self.every:
            return False
        self._since = 0
        return trim_heap()

    def after_step(self, param_bytes: int) -> None:
        """A step of ``param_bytes`` of parameters ended."""
        self._since = 0
        self._pending = self.enabled and param_bytes >= self.every

    def before_forward(self) -> bool:
        """Give idle pages back once after a large step; ``True`` if it did."""
        if not self._pending:
            return False
        self._pending = False
        self.workspace.release()
        return trim_heap()
