"""CompressedTensor: a tensor held only as packed low-bit codes plus its transform.

A :class:`CompressedTensor` keeps the packed ``uint8`` codes
(``ceil(numel * bits / 8)`` bytes), the per-variable
:class:`~speechbrain_omc.codec.transform.Transform` (0, 4 or 8 bytes) and
its format and shape: :attr:`CompressedTensor.nbytes` is the real storage.
Its byte layout is :mod:`speechbrain_omc.codec.serial`'s.

Example
-------
>>> import torch
>>> x = torch.linspace(-1, 1, 1000)
>>> ct = CompressedTensor.compress(x, "e3m7")
>>> ct.nbytes == 1375 + 4  # ceil(1000 * 11 / 8) code bytes + float32 scale
True
>>> bool((ct.decompress() - x).abs().max() < 1e-2)
True
>>> CompressedTensor.from_bytes(ct.to_bytes()).nbytes
1379
"""

from __future__ import annotations

import torch

from . import kernels, serial
from .formats import (
    FloatFormat,
    Format,
    IntFormat,
    _affine_,
    _as_float32,
    _check_rounding,
    _chunk,
    _finite_minmax,
    get_format,
    rounding_key,
)
from .memory import Workspace, mapped_empty
from .packing import _pack, _unpack, packed_nbytes
from .serial import SERIAL_VERSION
from .transform import CLIP_METHODS, TRANSFORM_KINDS, Transform, fit_transform

__all__ = ["CompressedTensor", "SERIAL_VERSION"]

_BF16 = FloatFormat(8, 7)


class CompressedTensor:
    """A float tensor stored as packed low-bit codes plus a per-variable transform.

    Build one with :meth:`compress` or :meth:`from_bytes`; the constructor
    takes ``packed`` codes, ``fmt``, ``shape``, the fitted ``transform`` and the
    ``clip`` method :meth:`assign_` refits with.

    Example
    -------
    >>> ct = CompressedTensor.compress(torch.tensor([[0.5, -2.0]]), "bf16", "none")
    >>> ct
    CompressedTensor(shape=(1, 2), format=e8m7, transform=none, nbytes=4)
    >>> ct.decompress()
    tensor([[ 0.5000, -2.0000]])
    """

    __slots__ = ("_packed", "_format", "_shape", "_transform", "_clip", "_decode_call")

    def __init__(
        self,
        packed: torch.Tensor,
        fmt: str | Format,
        shape: torch.Size | tuple[int, ...],
        transform: Transform,
        clip: str = "absmax",
    ) -> None:
        fmt = get_format(fmt)
        shape = torch.Size(shape)
        _check_parts(packed, fmt, shape, transform, clip)
        self._packed = packed
        self._format = fmt
        self._shape = shape
        self._transform = transform
        self._clip = clip
        # The decode kernel's arguments, prepared for one transform.
        self._decode_call: tuple[Transform, int, kernels.DecodeCall] | None = None

    # ------------------------------------------------------------------ build
    @classmethod
    def compress(
        cls,
        x: torch.Tensor,
        fmt: str | Format,
        transform: str | Transform = "scale",
        rounding: str = "nearest",
        generator: torch.Generator | int | None = None,
        clip: str = "absmax",
        *,
        out: torch.Tensor | None = None,
    ) -> CompressedTensor:
        """Compress a float tensor, on its device.

        Arguments
        ---------
        x : torch.Tensor
            Finite values (cast to float32).
        fmt : str or Format
            Format or preset name (``"e3m7"``, ``"bf16"``, ``"int8"``...).
        transform : str or Transform
            A kind fitted to ``x`` (see :func:`fit_transform`), or a fixed one.
        rounding : str
            ``"nearest"`` or ``"stochastic"`` (keyed by ``generator``).
        generator : torch.Generator or int, optional
        clip : str
            ``"absmax"`` or ``"mse"``.
        out : torch.Tensor, optional
            Contiguous ``uint8`` buffer of the codes' size on ``x``'s device.

        Returns
        -------
        CompressedTensor

        Example
        -------
        >>> ct = CompressedTensor.compress(torch.ones(10), "int4")
        >>> ct.nbytes, ct.transform.scale
        (9, 0.1428571492433548)
        """
        fmt = get_format(fmt)
        _check_rounding(rounding)
        if clip not in CLIP_METHODS:
            raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")
        if isinstance(transform, str) and transform not in TRANSFORM_KINDS:
            raise ValueError(
                f"transform must be one of {TRANSFORM_KINDS} or a Transform, "
                f"got {transform!r}"
            )
        x32 = _as_float32(x)
        minmax = _finite_minmax(x32)
        if isinstance(transform, Transform):
            fitted = transform
        else:
            fitted = fit_transform(x32, fmt, transform, clip, minmax=minmax)
        if out is not None:
            _check_out(out, packed_nbytes(x32.numel(), fmt.bits), x32.device)
        packed = _encode(x32, fmt, fitted, rounding, generator, out=out)
        return cls(packed, fmt, x32.shape, fitted, clip)

    def assign_(
        self,
        x: torch.Tensor,
        rounding: str = "nearest",
        generator: torch.Generator | int | None = None,
        *,
        minmax: tuple[float, float] | None = None,
    ) -> CompressedTensor:
        """Re-compress a new finite value of the same shape into this buffer, in
        place, refitting the transform; returns ``self``.

        ``minmax`` is ``x``'s range when the caller measured it (``x`` is then
        trusted to be finite); ``generator`` keys stochastic ``rounding``.

        Example
        -------
        >>> ct = CompressedTensor.compress(torch.zeros(4), "e4m3", "none")
        >>> ct.assign_(torch.tensor([1.0, 2.0, 3.0, 4.0])).decompress()
        tensor([1., 2., 3., 4.])
        """
        _check_rounding(rounding)
        x32 = _as_float32(x)
        if x32.shape != self._shape:
            raise ValueError(
                f"shape mismatch: tensor has shape {tuple(self._shape)}, "
                f"got {tuple(x32.shape)}"
            )
        x32 = x32.to(self._packed.device)
        if minmax is None:
            minmax = _finite_minmax(x32)
        else:
            minmax = tuple(v + 0.0 for v in minmax)  # -0.0 as _finite_minmax
        fitted = fit_transform(
            x32, self._format, self._transform.kind, self._clip, minmax=minmax
        )
        _encode(x32, self._format, fitted, rounding, generator, out=self._packed)
        self._transform = fitted
        return self

    # ---------------------------------------------------------------- decode
    def decompress(
        self, dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode to the original shape, exactly in float32 then cast to ``dtype``;
        into ``out`` (contiguous float32 on the codes' device) when given.

        Example
        -------
        >>> ct = CompressedTensor.compress(torch.tensor([3.0, -1.5]), "e5m2")
        >>> ct.decompress(torch.float64)
        tensor([ 3.0000, -1.5000], dtype=torch.float64)
        >>> buffer = torch.empty(2)
        >>> ct.decompress(out=buffer).data_ptr() == buffer.data_ptr()
        True
        """
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        n, packed = self.numel(), self._packed
        if out is None:
            out = torch.empty(n, dtype=torch.float32, device=packed.device)
        elif (
            dtype != torch.float32
            or out.dtype != torch.float32
            or out.numel() != n
            or not out.is_contiguous()
            or out.device != packed.device
        ):
            raise ValueError(
                f"out must be a contiguous float32 tensor of {n} values on "
                f"{packed.device} (and dtype float32)"
            )
        out = self.decode_into(out.view(-1))
        return out if dtype == torch.float32 else out.to(dtype)

    def decode_into(self, out: torch.Tensor) -> torch.Tensor:
        """:meth:`decompress` into ``out``, unchecked (an engine's workspace
        buffer, at every forward and backward).

        Arguments
        ---------
        out : torch.Tensor
            Contiguous 1-D float32, :meth:`numel` values on the codes' device.

        Returns
        -------
        torch.Tensor
            ``out`` viewed in :attr:`shape`.

        Example
        -------
        >>> ct = CompressedTensor.compress(torch.tensor([[3.0, -1.5]]), "e5m2")
        >>> ct.decode_into(torch.empty(2))
        tensor([[ 3.0000, -1.5000]])
        """
        if kernels.native_for(self._packed):  # one pass, straight into out
            kernels.decode_prepared(self._prepared_decode(), out)
        else:
            _decode_reference(self._packed, self._format, self._transform, out)
        return out.view(self._shape)

    def _prepared_decode(self) -> kernels.DecodeCall:
        # Weights are decoded in every forward and backward and written once
        # a step: the arguments are prepared once per transform. The pointer
        # is checked too: a copy (deepcopy, pickle) has its own buffer.
        cached, ptr = self._decode_call, self._packed.data_ptr()
        if cached is None or cached[0] is not self._transform or cached[1] != ptr:
            factors, add = self._transform.decode_plan  # exact values
            call = kernels.prepare_decode(self._packed, self._format.spec, factors, add)
            cached = self._decode_call = (self._transform, ptr, call)
        return cached[2]

    # ------------------------------------------------------------ properties
    @property
    def shape(self) -> torch.Size:
        """Shape of the represented tensor."""
        return self._shape

    def numel(self) -> int:
        """Number of represented values (the product of :attr:`shape`)."""
        return self._shape.numel()

    @property
    def format(self) -> Format:
        """The code format."""
        return self._format

    @property
    def bits(self) -> int:
        """Bits per value."""
        return self._format.bits

    @property
    def transform(self) -> Transform:
        """The fitted per-variable transform."""
        return self._transform

    @property
    def clip(self) -> str:
        """Clip method used when refitting the transform."""
        return self._clip

    @property
    def packed(self) -> torch.Tensor:
        """The packed ``uint8`` code buffer (shared, not a copy)."""
        return self._packed

    @property
    def device(self) -> torch.device:
        """Device of the packed buffer."""
        return self._packed.device

    @property
    def nbytes(self) -> int:
        """Exact storage: packed code bytes plus transform parameter bytes."""
        return self._packed.numel() + self._transform.nbytes

    def in_own_pages(self) -> CompressedTensor:
        """The same codes in pages of their own (``self`` off the CPU), so that
        long-lived codes stay off the heap (:mod:`speechbrain_omc.codec.memory`).
        """
        if self.device.type != "cpu":
            return self
        packed = mapped_empty(self._packed.numel())
        packed.copy_(self._packed)
        return CompressedTensor(
            packed, self._format, self._shape, self._transform, self._clip
        )

    def __repr__(self) -> str:
        return (
            f"CompressedTensor(shape={tuple(self._shape)}, format={self._format.name}, "
            f"transform={self._transform.kind}, nbytes={self.nbytes})"
        )

    # --------------------------------------------------------- serialisation
    def to_bytes(self) -> bytes:
        """Serialise to :mod:`speechbrain_omc.codec.serial`'s checksummed layout.

        Example
        -------
        >>> data = CompressedTensor.compress(torch.ones(3), "int8").to_bytes()
        >>> data[:4], len(data)
        (b'OMCT', 39)
        """
        return b"".join(self.to_bytes_parts())

    def to_bytes_parts(self) -> tuple[bytes, memoryview, bytes]:
        """:meth:`to_bytes` in three parts (header, a view of the codes, CRC32), for
        an encoder that joins all its parts once.
        """
        return serial.write_parts(
            self._packed, self._format, self._shape, self._transform, self._clip
        )

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        device: str | torch.device | None = None,
        *,
        workspace: Workspace | None = None,
    ) -> CompressedTensor:
        """Rebuild a tensor serialised by :meth:`to_bytes` (only the codes are
        copied, into a buffer of ``workspace`` when given, then to ``device``).

        Raises ``ValueError`` for a foreign, newer, truncated, padded, corrupted
        or inconsistent payload.

        Example
        -------
        >>> data = CompressedTensor.compress(torch.ones(3), "int8").to_bytes()
        >>> CompressedTensor.from_bytes(data).decompress()
        tensor([1., 1., 1.])
        >>> CompressedTensor.from_bytes(data[:-1])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: truncated CompressedTensor payload: header announces 39 bytes...
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        try:
            data = memoryview(data).cast("B")  # slices of it copy nothing
        except TypeError:  # a non-contiguous view: one copy
            data = memoryview(bytes(data))
        return serial.read(data, cls, device, workspace)


def _encode(
    x32: torch.Tensor,
    fmt: Format,
    transform: Transform,
    rounding: str,
    generator: torch.Generator | int | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    flat = x32.reshape(-1)
    n, bits = flat.numel(), fmt.bits
    if out is None:
        out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=flat.device)
    key = rounding_key(generator) if rounding == "stochastic" else None
    if kernels.native_for(flat, out):  # one pass, straight into the codes
        scale, shift = transform.decode_args
        return kernels.encode(flat, out, fmt.spec, scale, shift, key)
    if fmt.lossless:  # the codes are the bytes: one copy
        _pack(flat.view(torch.int32), bits, out)
        return out
    # Reference: transform, quantize and pack chunk by chunk, so that
    # temporaries stay in cache and no full-size copy of the tensor exists.
    native = fmt == _BF16 and rounding == "nearest"
    step = _chunk(flat.device, n)  # a multiple of 32: word-aligned bytes
    for start in range(0, n, step):
        end = min(n, start + step)
        y = transform.forward(flat[start:end])
        dst = out[start * bits // 8 : (end * bits + 7) // 8]
        if native:
            # E8M7 is bfloat16 up to its largest finite value: saturate,
            # then the native cast rounds half to even into the buffer.
            dst.view(torch.bfloat16).copy_(y.clamp(-fmt.max_value, fmt.max_value))
        else:
            _pack(fmt._quantize(y, rounding, key, start), bits, dst)
    return out


def _decode_reference(
    packed: torch.Tensor, fmt: Format, transform: Transform, out: torch.Tensor
) -> None:
    """The torch decoder: ``packed`` into the flat float32 ``out``."""
    n, bits = out.numel(), fmt.bits
    scale, shift = transform.decode_args
    if fmt.lossless:  # the bytes are the values: one copy
        out.view(torch.uint8).copy_(packed)
    elif fmt == _BF16:
        # The code space is bfloat16's: one native widening cast.
        try:
            native = packed.view(torch.bfloat16)
        except RuntimeError:  # a buffer at an odd offset: copy it once
            native = packed.clone().view(torch.bfloat16)
        out.copy_(native)
        _affine_(out, 1.0, scale, shift)
    elif isinstance(fmt, IntFormat) and bits == 8:
        out.copy_(packed)  # uint8 -> float32 directly
        out -= 128.0
        _affine_(out, 1.0, scale, shift)
    elif isinstance(fmt, IntFormat):
        buf = out.view(torch.int32)
        _unpack(packed, bits, n, buf, mask=True)
        fmt._decode_(buf, scale, shift)
    elif bits in (8, 16):
        # A widening copy, then a few in-place passes over the output.
        buf = out.view(torch.int32)
        _unpack(packed, bits, n, buf, mask=False)  # decoding drops the rest
        fmt._decode_(buf, scale, shift)
    else:
        # General widths: chunks keep the temporaries in cache; codes come
        # out of the unpacker already at the top of each word.
        step = _chunk(out.device, n, decode=True)
        for start in range(0, n, step):
            end = min(n, start + step)
            buf = out[start:end].view(torch.int32)
            src = packed[start * bits // 8 : (end * bits + 7) // 8]
            _unpack(src, bits, end - start, buf, mask=False, high=True)
            fmt._decode_(buf, scale, shift, aligned=True)


def _check_parts(
    packed: torch.Tensor,
    fmt: Format,
    shape: torch.Size,
    transform: Transform,
    clip: str,
) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a torch.uint8 tensor")
    if packed.dim() != 1 or not packed.is_contiguous():
        raise ValueError("packed must be a contiguous 1-D tensor")
    expected = packed_nbytes(shape.numel(), fmt.bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed has {packed.numel()} bytes; shape {tuple(shape)} in "
            f"{fmt.name} needs {expected}"
        )
    if not isinstance(transform, Transform):
        raise TypeError("transform must be a Transform")
    if fmt.lossless and transform.kind != "none":
        # A scale would round values the format keeps exactly.
        raise ValueError(
            f"the lossless format {fmt.name} takes no transform, got {transform.kind!r}"
        )
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")


def _check_out(out: torch.Tensor, expected: int, device: torch.device) -> None:
    if (
        out.dtype != torch.uint8
        or out.dim() != 1
        or out.numel() != expected
        or not out.is_contiguous()
        or out.device != device
    ):
        raise ValueError(
            f"out must be a contiguous 1-D uint8 tensor of {expected} bytes on {device}"
        )
