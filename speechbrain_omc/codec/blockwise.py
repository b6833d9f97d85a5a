"""Optimizer state in low-bit formats, with one scale per block of values.

Adam's moments span orders of magnitude across a tensor, so, as 8-bit
optimizers do, each ``block`` of values gets its own float32 absmax scale;
the second moment may be stored as its square root (half the exponent
range). A lossless format keeps unit scales and no square root, so its state
equals float32's.

Example
-------
>>> import torch
>>> x = torch.tensor([1e-6, 2e-6, 3.0, -4.0] * 8)
>>> bt = BlockwiseTensor.compress(x, "e4m3", block=16)
>>> bt.nbytes  # 32 one-byte codes + 2 float32 scales
40
>>> bool((bt.decompress() - x).abs().max() < 0.3)
True
"""

from __future__ import annotations

import struct
import zlib

import torch

from speechbrain_omc.codec import kernels
from speechbrain_omc.codec.formats import (
    _F32_MIN_NORMAL,
    Format,
    _as_float32,
    _to_f32,
    format_from_spec,
    get_format,
    rounding_key,
    serial_spec,
)
from speechbrain_omc.codec.packing import _pack, _unpack, packed_nbytes

__all__ = ["BlockwiseTensor"]

_MAGIC = b"OMCB"
_HEAD = struct.Struct("<4sBBBBBIQ")  # magic, kind, p1, p2, sqrt, pad, block, n


def _check_block(block: int) -> int:
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block!r}")
    return block


class BlockwiseTensor:
    """Codes of a float tensor with one float32 scale per block of values.

    Arguments
    ---------
    packed : torch.Tensor
        ``uint8`` codes.
    scales : torch.Tensor
        float32, one per block.
    fmt : str or Format
    shape : tuple of int
    block : int
        Values per scale (a power of two, at least 16).
    sqrt : bool
        The codes hold square roots (never with a lossless format).
    """

    __slots__ = ("packed", "scales", "format", "shape", "block", "sqrt")

    def __init__(self, packed, scales, fmt, shape, block, sqrt=False):
        self.format = get_format(fmt)
        self.shape = torch.Size(shape)
        self.block = _check_block(block)
        n = self.shape.numel()
        if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(
            n, self.format.bits
        ):
            raise ValueError("packed codes do not match the shape and format")
        if scales.dtype != torch.float32 or scales.numel() != -(-n // block):
            raise ValueError(f"expected {-(-n // block)} float32 scales")
        if self.format.lossless and (sqrt or bool((scales != 1.0).any())):
            raise ValueError(
                f"the lossless format {self.format.name} keeps the values "
                "themselves: unit scales, no square roots"
            )
        self.packed, self.scales, self.sqrt = packed, scales, bool(sqrt)

    # ------------------------------------------------------------- encode
    @classmethod
    def zeros(
        cls, shape, fmt: str | Format, block: int = 256, sqrt: bool = False
    ) -> BlockwiseTensor:
        """All-zero values (codes of zero, unit scales)."""
        return cls.compress(torch.zeros(shape), fmt, block=block, sqrt=sqrt)

    @classmethod
    def compress(
        cls,
        x: torch.Tensor,
        fmt: str | Format,
        block: int = 256,
        sqrt: bool = False,
        rounding: str = "nearest",
        generator: torch.Generator | int | None = None,
    ) -> BlockwiseTensor:
        """Compress finite ``x`` (non-negative with ``sqrt``) block by block, with
        ``rounding`` keyed by ``generator`` (see :meth:`Format.quantize`).
        """
        fmt = get_format(fmt)
        _check_block(block)
        sqrt = sqrt and not fmt.lossless  # a square root would round
        x32 = _as_float32(x).reshape(-1)
        n = x32.numel()
        key = rounding_key(generator) if rounding == "stochastic" else None
        packed = torch.empty(packed_nbytes(n, fmt.bits), dtype=torch.uint8)
        scales = torch.empty(-(-n // block), dtype=torch.float32)
        if kernels.native_for(x32):
            kernels.encode_blocks(x32, packed, scales, fmt.spec, block, sqrt, key)
        elif fmt.lossless:  # the values' bytes, unit scales
            scales.fill_(1.0)
            _pack(x32.view(torch.int32), fmt.bits, packed)
        else:
            codes = torch.empty(n, dtype=torch.int32)
            for b, start in enumerate(range(0, n, block)):
                part = x32[start : start + block]
                # Correctly rounded, as the kernels' sqrt (torch's may not be).
                values = part.double().sqrt().float() if sqrt else part
                extent = float(values.abs().max()) if values.numel() else 0.0
                scale = (
                    max(_to_f32(extent / fmt.max_value), _F32_MIN_NORMAL)
                    if extent > 0.0
                    else 1.0
                )
                scales[b] = scale
                rnd = "nearest" if key is None else "stochastic"
                codes[start : start + block] = fmt._quantize(
                    (values / scale).contiguous(), rnd, key, start
                )
            _pack(codes, fmt.bits, packed)
        return cls(packed, scales, fmt, x.shape, block, sqrt)

    # ------------------------------------------------------------- decode
    def decompress(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 values (into contiguous ``out`` when given)."""
        n = self.shape.numel()
        if out is None:
            out = torch.empty(n, dtype=torch.float32)
        flat = out.view(-1)
        if kernels.native_for(self.packed, flat):
            kernels.decode_blocks(
                self.packed, flat, self.scales, self.format.spec, self.block, self.sqrt
            )
        elif self.format.lossless:  # unit scales: the bytes are the values
            flat.view(torch.uint8).copy_(self.packed)
        else:
            codes = torch.empty(n, dtype=torch.int32)
            _unpack(self.packed, self.format.bits, n, codes, mask=True)
            for b, start in enumerate(range(0, n, self.block)):
                part = codes[start : start + self.block]
                values = self.format._decode_(part.clone(), float(self.scales[b]))
                flat[start : start + self.block] = (
                    values * values if self.sqrt else values
                )
        return flat.view(self.shape)

    # ------------------------------------------------------------ account
    @property
    def nbytes(self) -> int:
        """Exact storage: codes plus scales."""
        return self.packed.numel() + 4 * self.scales.numel()

    def numel(self) -> int:
        """Number of values."""
        return self.shape.numel()

    def __repr__(self) -> str:
        return (
            f"BlockwiseTensor(shape={tuple(self.shape)}, format={self.format.name}, "
            f"block={self.block}, sqrt={self.sqrt}, nbytes={self.nbytes})"
        )

    # ------------------------------------------------------ serialisation
    def to_bytes(self) -> bytes:
        """Self-describing, checksummed bytes (for checkpoints)."""
        kind, p1, p2 = serial_spec(self.format)
        head = _HEAD.pack(
            _MAGIC,
            kind,
            p1,
            p2,
            int(self.sqrt),
            len(self.shape),
            self.block,
            self.shape.numel(),
        )
        body = (
            head
            + struct.pack(f"<{len(self.shape)}Q", *self.shape)
            + self.scales.numpy().tobytes()
            + self.packed.numpy().tobytes()
        )
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockwiseTensor:
        """Inverse of :meth:`to_bytes`; a clear error on damaged bytes."""
        data = bytes(data)
        if len(data) < _HEAD.size + 4 or data[:4] != _MAGIC:
            raise ValueError("not a BlockwiseTensor payload")
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise ValueError("corrupted BlockwiseTensor payload (CRC32 mismatch)")
        _, kind, p1, p2, sqrt, ndim, block, n = _HEAD.unpack_from(data)
        fmt = format_from_spec(kind, p1, p2)
        pos = _HEAD.size
        shape = struct.unpack_from(f"<{ndim}Q", data, pos)
        pos += 8 * ndim
        nblocks = -(-n // _check_block(block))
        scales = torch.frombuffer(
            bytearray(data[pos : pos + 4 * nblocks]), dtype=torch.float32
        )
        pos += 4 * nblocks
        packed = torch.frombuffer(bytearray(data[pos:-4]), dtype=torch.uint8)
        return cls(packed, scales, fmt, shape, block, bool(sqrt))
