"""Bit packing: ``b``-bit integer codes to bytes and back, ``b`` in 1..16 or 32.

Little-endian, LSB first: value ``i`` occupies stream bits
``[i*b, (i+1)*b)``, and ``n`` values take ``ceil(n * b / 8)`` bytes (unused
high bits zero). Widths 8, 16 and 32 are casts or views; the others work on
*octets* (8 values fill exactly ``b`` bytes, so offsets repeat and
broadcasting handles them) with a fixed number of tensor operations per call.

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

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

# Work sizes of the general paths on CPU, so temporaries stay in cache: octets
# per packing step (two int64 words each) and values per unpacking step.
# Accelerators take each call in one step.
_PACK_ROWS = 1 << 17
_UNPACK_VALUES = 1 << 22


def _check_bits(bits: int) -> None:
    if (
        not isinstance(bits, int)
        or isinstance(bits, bool)
        or not (1 <= bits <= 16 or bits == 32)
    ):
        raise ValueError(f"bits must be an int in 1..16 or 32, got {bits!r}")


def _check_byteorder() -> None:
    # The 16-bit and 64-bit views below reinterpret bytes as little-endian ints.
    if sys.byteorder != "little":  # pragma: no cover - no such host in CI
        raise NotImplementedError("bit packing requires a little-endian host")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take: ``ceil(numel * bits / 8)``.

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
def _octet_plan(bits: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-position constants of an octet (8 values, ``bits`` bytes)."""
    starts = [j * bits for j in range(8)]

    def i64(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    # Shifts of 64 give 0 in torch, which drops a value from a word.
    hi_left = [p - 64 if p >= 64 else 64 for p in starts]
    hi_right = [64 - p if p < 64 < p + bits else 64 for p in starts]
    return {
        "lo": i64([p if p < 64 else 64 for p in starts]),
        "hi_left": i64(hi_left),
        "hi_right": i64(hi_right),
        "byte": i64([p >> 3 for p in starts]),
        "down": i32([p & 7 for p in starts]),  # window bits below the value
        "up": i32([32 - bits - (p & 7) for p in starts]),  # to put it at the top
    }


def _pack_octets(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack ``(R, 8)`` codes into ``out``, a ``(R, bits)`` uint8 view."""
    plan = _octet_plan(bits, codes.device)
    rows = codes.shape[0]
    c = codes.to(torch.int64)  # one conversion; every shift stays in int64
    words = torch.empty(
        (rows, 2 if bits > 8 else 1), dtype=torch.int64, device=c.device
    )
    # Bit ranges are disjoint, so the sums are ORs.
    torch.sum(torch.bitwise_left_shift(c, plan["lo"]), 1, out=words[:, 0])
    if bits > 8:
        hi = torch.bitwise_left_shift(c, plan["hi_left"])
        hi |= torch.bitwise_right_shift(c, plan["hi_right"])
        torch.sum(hi, 1, out=words[:, 1])
    out.copy_(words.view(torch.uint8)[:, :bits])


def _windows(src: torch.Tensor, width: int) -> torch.Tensor:
    """int32 little-endian window of ``width`` bytes starting at every byte."""
    n = src.numel()
    win = torch.empty(n, dtype=torch.int32, device=src.device)
    win.copy_(src)
    for k in range(1, min(width, n)):
        # Bytes occupy disjoint bits, so a scaled add is a shift-and-OR; past
        # the end the window holds zeros.
        win[: n - k].add_(src[k:], alpha=1 << (8 * k))
    return win


def _check_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel():
        # 32-bit codes are any int32: a bit pattern, not a count.
        low, high = (-(1 << 31), 1 << 31) if bits == 32 else (0, 1 << bits)
        lo, hi = torch.aminmax(flat)
        if int(lo) < low or int(hi) >= high:
            bad = int(((flat < low) | (flat >= high)).sum())
            raise ValueError(
                f"{bad} code(s) lie outside [{low}, {high}) for bits={bits} "
                f"(min {int(lo)}, max {int(hi)})"
            )
    return flat


def pack_bits(
    codes: torch.Tensor, bits: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Pack integer codes of ``bits`` bits (1 to 16 or 32; values in
    ``[0, 2**bits)``, any int32 for 32) into ``ceil(numel * bits / 8)`` bytes,
    row-major (into contiguous ``uint8`` ``out`` when given).

    Example
    -------
    >>> pack_bits(torch.tensor([0x123, 0xABC]), 12)
    tensor([ 35, 193, 171], dtype=torch.uint8)
    >>> pack_bits(torch.tensor([-1.0]).view(torch.int32), 32)  # float32 bits
    tensor([  0,   0, 128, 191], dtype=torch.uint8)
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
    if bits in (16, 32):
        # Truncating int -> int16 keeps the low 16 bits; little-endian bytes.
        word = torch.int16 if bits == 16 else torch.int32
        try:
            out.view(word).copy_(flat)
        except RuntimeError:  # misaligned out: go through a temporary
            out.copy_(flat.to(word).view(torch.uint8))
        return out
    rows, rem = divmod(n, 8)
    step = _PACK_ROWS if flat.device.type == "cpu" else max(rows, 1)
    for r0 in range(0, rows, step):  # bounded int64 temporaries on CPU
        r1 = min(rows, r0 + step)
        octets = out[r0 * bits : r1 * bits].view(r1 - r0, bits)
        _pack_octets(flat[r0 * 8 : r1 * 8].view(r1 - r0, 8), bits, octets)
    if rem:
        # Last, partial octet: pad it with zeros, keep the bytes it needs.
        tail = torch.zeros((1, 8), dtype=flat.dtype, device=flat.device)
        tail[0, :rem] = flat[rows * 8 :]
        tail_bytes = torch.empty((1, bits), dtype=torch.uint8, device=flat.device)
        _pack_octets(tail, bits, tail_bytes)
        out[rows * bits :] = tail_bytes[0, : nbytes - rows * bits]
    return out


def unpack_bits(
    packed: torch.Tensor,
    bits: int,
    numel: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpack ``numel`` codes of ``bits`` bits from :func:`pack_bits`' bytes
    (into contiguous ``int32`` ``out`` when given).

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
    flat: torch.Tensor,
    bits: int,
    numel: int,
    out: torch.Tensor,
    mask: bool,
    high: bool = False,
) -> torch.Tensor:
    """:func:`unpack_bits` without checks, writing into int32 ``out``."""
    # mask=False leaves garbage above `bits`; high=True (general widths) puts
    # each code in the top `bits` bits instead: float decoders start there.
    _check_byteorder()
    n = numel
    if n == 0:
        return out
    if bits == 8:
        out.copy_(flat)
        return out
    if bits in (16, 32):
        word = torch.int16 if bits == 16 else torch.int32
        try:
            src = flat.view(word)
        except RuntimeError:  # misaligned storage offset: copy once
            src = flat.clone().view(word)
        out.copy_(src)  # 16 bits: sign-extends
        if mask and bits == 16:
            out &= 0xFFFF
        return out
    if n > _UNPACK_VALUES and flat.device.type == "cpu":  # start on octets
        for start in range(0, n, _UNPACK_VALUES):
            end = min(n, start + _UNPACK_VALUES)
            src = flat[start * bits // 8 : (end * bits + 7) // 8]
            _unpack(src, bits, end - start, out[start:end], mask, high)
        return out
    plan = _octet_plan(bits, flat.device)
    # A value spans at most 7 + bits bits from its first byte.
    win = _windows(flat, 2 if bits <= 9 else 3)
    rows, rem = divmod(n, 8)
    shift = plan["up"] if high else plan["down"]
    parts = []
    if rows:
        grid = win[: rows * bits].as_strided((rows, bits), (bits, 1))
        dst = out[: rows * 8].view(rows, 8)
        torch.gather(grid, 1, plan["byte"].expand(rows, 8), out=dst)
        parts.append((dst, shift))
    if rem:
        dst = out[rows * 8 :]
        torch.index_select(win, 0, plan["byte"][:rem] + rows * bits, out=dst)
        parts.append((dst, shift[:rem]))
    for dst, amount in parts:
        if high:
            dst <<= amount
        else:
            dst >>= amount
            if mask:
                dst &= (1 << bits) - 1
    return out
