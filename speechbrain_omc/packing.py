"""Bit packing: ``b``-bit integer codes to bytes and back, for any ``b`` in 1..16.

The byte stream is little-endian and LSB first: value ``i`` occupies stream
bits ``[i*b, (i+1)*b)``, where stream bit ``k`` is bit ``k % 8`` of byte
``k // 8``. ``n`` values take exactly ``ceil(n * b / 8)`` bytes; the unused
high bits of the last byte are zero.

Everything is vectorised. Widths 8 and 16 are plain casts/views. Other widths
group ``K = 32 / gcd(b, 32)`` values into ``W = b / gcd(b, 32)`` little-endian
32-bit words, so every value sits at a fixed bit position inside its group;
the Python loops run over those (at most 32) positions only, each step being
one column operation over all groups. Columns are transposed into contiguous
rows first and the work proceeds in chunks that stay in cache, so every step
streams through memory instead of striding through it.

Example
-------
>>> import torch
>>> packed = pack_bits(torch.tensor([1, 2, 3, 4, 5]), 3)
>>> packed, packed_nbytes(5, 3)
(tensor([209,  88], dtype=torch.uint8), 2)
>>> unpack_bits(packed, 3, 5)
tensor([1, 2, 3, 4, 5], dtype=torch.int32)
"""

from __future__ import annotations

import sys
from functools import cache
from math import gcd

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

# Values per chunk of the general path: large enough that per-column Python
# overhead is negligible, small enough that a chunk's temporaries (4 bytes a
# value) stay in the last-level cache.
_CHUNK_VALUES = 1 << 20


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")


def _check_byteorder() -> None:
    # The 16-bit and word views below reinterpret bytes as little-endian ints.
    if sys.byteorder != "little":  # pragma: no cover - no such host in CI
        raise NotImplementedError("bit packing requires a little-endian host")


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes that ``numel`` codes of ``bits`` bits occupy when packed.

    Arguments
    ---------
    numel : int
        Number of codes.
    bits : int
        Code width, 1 to 16.

    Returns
    -------
    int
        ``ceil(numel * bits / 8)``.

    Example
    -------
    >>> packed_nbytes(10, 11)
    14
    """
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


@cache
def _layout(bits: int) -> tuple[int, int]:
    """``(K, W)``: values and 32-bit words per group for a general width."""
    g = gcd(bits, 32)
    return 32 // g, bits // g


@cache
def _pack_plan(bits: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """For each word of a group, the ``(value, shift)`` pairs that fill it.

    A positive shift moves the value left (it starts inside the word, its
    overflow is dropped by int32 wrap-around); a negative one moves it right
    (its low bits went into the previous word).
    """
    k, w = _layout(bits)
    plan = []
    for u in range(w):
        lo, hi = 32 * u, 32 * u + 32
        parts = []
        for j in range(k):
            start = j * bits
            if start < hi and start + bits > lo:
                parts.append((j, start - lo))
        plan.append(tuple(parts))
    return tuple(plan)


def _as_int32_words(buf: torch.Tensor) -> torch.Tensor:
    """View a contiguous uint8 buffer (length divisible by 4) as int32."""
    try:
        return buf.view(torch.int32)
    except RuntimeError:  # misaligned storage offset: copy once
        return buf.clone().view(torch.int32)


def _pack_rows(codes_rows: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(R, K)`` int32 codes into ``(W, R)`` int32 words (transposed)."""
    k, w = _layout(bits)
    rows = codes_rows.shape[0]
    ct = codes_rows.t().contiguous()  # column j becomes contiguous row j
    words = torch.empty((w, rows), dtype=torch.int32, device=ct.device)
    tmp = torch.empty(rows, dtype=torch.int32, device=ct.device)
    for u, parts in enumerate(_pack_plan(bits)):
        for i, (j, shift) in enumerate(parts):
            dst = words[u] if i == 0 else tmp
            if shift >= 0:
                torch.bitwise_left_shift(ct[j], shift, out=dst)
            else:
                torch.bitwise_right_shift(ct[j], -shift, out=dst)
            if i:
                words[u] |= tmp  # value bit ranges are disjoint: OR == add
    return words


def _unpack_rows(
    words_t: torch.Tensor, bits: int, out_t: torch.Tensor, mask: bool
) -> None:
    """Unpack ``(W, R)`` transposed words into ``(K, R)`` codes ``out_t``."""
    k, _ = _layout(bits)
    tmp = None
    for j in range(k):
        start = j * bits
        u, t = start >> 5, start & 31
        torch.bitwise_right_shift(words_t[u], t, out=out_t[j])
        if t + bits > 32:  # the value straddles two words
            if tmp is None:
                tmp = torch.empty_like(out_t[0])
            out_t[j] &= (1 << (32 - t)) - 1  # drop the arithmetic shift's sign smear
            torch.bitwise_left_shift(words_t[u + 1], 32 - t, out=tmp)
            out_t[j] |= tmp
    if mask:
        out_t &= (1 << bits) - 1


def _check_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel():
        lo, hi = torch.aminmax(flat)
        if int(lo) < 0 or int(hi) >= 1 << bits:
            bad = int(((flat < 0) | (flat >= 1 << bits)).sum())
            raise ValueError(
                f"{bad} code(s) lie outside [0, {1 << bits}) for bits={bits} "
                f"(min {int(lo)}, max {int(hi)})"
            )
    return flat


def pack_bits(
    codes: torch.Tensor, bits: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Pack non-negative integer codes of ``bits`` bits into a byte tensor.

    Arguments
    ---------
    codes : torch.Tensor
        Integer tensor (any shape, flattened in row-major order) with values
        in ``[0, 2**bits)``.
    bits : int
        Code width, 1 to 16.
    out : torch.Tensor, optional
        Contiguous ``torch.uint8`` tensor of ``ceil(numel * bits / 8)``
        elements to write into (reused buffers avoid an allocation).

    Returns
    -------
    torch.Tensor
        1-D ``torch.uint8`` tensor of exactly ``ceil(numel * bits / 8)`` bytes.

    Example
    -------
    >>> pack_bits(torch.tensor([1, 0, 1, 1]), 1)
    tensor([13], dtype=torch.uint8)
    >>> pack_bits(torch.tensor([0x123, 0xABC]), 12)
    tensor([ 35, 193, 171], dtype=torch.uint8)
    """
    _check_bits(bits)
    flat = _check_codes(codes, bits)
    return _pack(flat, bits, out)


def _pack(
    flat: torch.Tensor, bits: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`pack_bits` without argument checks (``flat`` is 1-D, in range)."""
    _check_byteorder()
    n = flat.numel()
    nbytes = (n * bits + 7) // 8
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=flat.device)
    elif (
        out.dtype != torch.uint8
        or out.dim() != 1
        or out.numel() != nbytes
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous 1-D torch.uint8 tensor of {nbytes} bytes"
        )
    if n == 0:
        return out
    if bits == 8:
        out.copy_(flat)
        return out
    if bits == 16:
        # Truncating int -> int16 keeps the low 16 bits; little-endian bytes.
        try:
            out.view(torch.int16).copy_(flat)
        except RuntimeError:  # misaligned out: go through a temporary
            out.copy_(flat.to(torch.int16).view(torch.uint8))
        return out
    if flat.dtype != torch.int32:
        flat = flat.to(torch.int32)
    k, w = _layout(bits)
    full = n // k
    if full:
        words = out[: full * w * 4]
        try:
            words_view = words.view(torch.int32).view(full, w)
        except RuntimeError:
            words_view = None
        step = max(1, _CHUNK_VALUES // k)
        for r0 in range(0, full, step):
            r1 = min(full, r0 + step)
            packed_t = _pack_rows(flat[r0 * k : r1 * k].view(r1 - r0, k), bits)
            if words_view is not None:
                words_view[r0:r1].copy_(packed_t.t())
            else:
                chunk = packed_t.t().contiguous().view(torch.uint8).reshape(-1)
                words[r0 * w * 4 : r1 * w * 4].copy_(chunk)
    rem = n - full * k
    if rem:
        # Last, partial group: pad it with zeros, pack it, keep its bytes.
        tail = torch.zeros((1, k), dtype=torch.int32, device=flat.device)
        tail[0, :rem] = flat[full * k :]
        tail_bytes = _pack_rows(tail, bits).t().contiguous().view(torch.uint8)
        out[full * w * 4 :].copy_(tail_bytes.reshape(-1)[: nbytes - full * w * 4])
    return out


def unpack_bits(
    packed: torch.Tensor,
    bits: int,
    numel: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpack ``numel`` codes of ``bits`` bits from a byte tensor.

    Arguments
    ---------
    packed : torch.Tensor
        ``torch.uint8`` tensor of exactly ``ceil(numel * bits / 8)`` bytes, as
        made by :func:`pack_bits`.
    bits : int
        Code width, 1 to 16.
    numel : int
        Number of codes to read.
    out : torch.Tensor, optional
        Contiguous ``torch.int32`` tensor of ``numel`` elements to write into.

    Returns
    -------
    torch.Tensor
        1-D ``torch.int32`` tensor of ``numel`` codes in ``[0, 2**bits)``.

    Example
    -------
    >>> unpack_bits(torch.tensor([13], dtype=torch.uint8), 1, 4)
    tensor([1, 0, 1, 1], dtype=torch.int32)
    """
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must have dtype torch.uint8, got {packed.dtype}")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    flat = packed.reshape(-1)
    expected = (numel * bits + 7) // 8
    if flat.numel() != expected:
        raise ValueError(
            f"packed has {flat.numel()} bytes, but {numel} values of {bits} bits "
            f"need exactly {expected}"
        )
    if out is None:
        out = torch.empty(numel, dtype=torch.int32, device=packed.device)
    elif out.dtype != torch.int32 or out.numel() != numel or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous torch.int32 tensor of {numel} elements"
        )
    _unpack(flat.contiguous(), bits, numel, out.view(-1), mask=True)
    return out


def _unpack(
    flat: torch.Tensor, bits: int, numel: int, out: torch.Tensor, mask: bool
) -> torch.Tensor:
    """:func:`unpack_bits` without checks, writing into int32 ``out``.

    With ``mask=False`` the bits of ``out`` above ``bits`` may hold garbage;
    decoders that shift those bits out anyway use it to save a pass.
    """
    _check_byteorder()
    n = numel
    if n == 0:
        return out
    if bits == 8:
        out.copy_(flat)
        return out
    if bits == 16:
        try:
            src = flat.view(torch.int16)
        except RuntimeError:
            src = flat.clone().view(torch.int16)
        out.copy_(src)  # sign-extends
        if mask:
            out &= 0xFFFF
        return out
    k, w = _layout(bits)
    full = n // k
    if full:
        words = _as_int32_words(flat[: full * w * 4]).view(full, w)
        step = max(1, _CHUNK_VALUES // k)
        rows0 = min(step, full)
        work = torch.empty(k * rows0, dtype=torch.int32, device=flat.device)
        for r0 in range(0, full, step):
            r1 = min(full, r0 + step)
            rows = r1 - r0
            words_t = words[r0:r1].t().contiguous()
            out_t = work[: k * rows].view(k, rows)
            _unpack_rows(words_t, bits, out_t, mask)
            out[r0 * k : r1 * k].view(rows, k).copy_(out_t.t())
    rem = n - full * k
    if rem:
        tail = torch.zeros(w * 4, dtype=torch.uint8, device=flat.device)
        src = flat[full * w * 4 :]
        tail[: src.numel()] = src
        out_t = torch.empty((k, 1), dtype=torch.int32, device=flat.device)
        _unpack_rows(tail.view(torch.int32).view(w, 1), bits, out_t, mask)
        out[full * k :].copy_(out_t[:rem, 0])
    return out
