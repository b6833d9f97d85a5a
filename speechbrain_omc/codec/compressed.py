"""CompressedTensor: a tensor held only as packed low-bit codes plus its transform.

A :class:`CompressedTensor` keeps exactly three things: the packed ``uint8``
code buffer (``ceil(numel * bits / 8)`` bytes), the per-variable
:class:`~speechbrain_omc.codec.transform.Transform` (0, 4 or 8 bytes of float32)
and metadata (format, shape). No float copy and no unpacked codes are kept,
so :attr:`CompressedTensor.nbytes` is the real storage.

Serialised form (:meth:`CompressedTensor.to_bytes`, all little-endian)::

    magic  b"OMCT"                      4 bytes
    version (uint16, currently 1)       2 bytes
    total length in bytes (uint64)      8 bytes
    format kind, p1, p2 (uint8 x 3)     float: 0, E, M   int: 1, bits, 0
                                        fp32 (lossless): 2, 32, 0
    transform kind, clip (uint8 x 2)    kind: 0 none, 1 scale, 2 affine
    ndim (uint8), shape (uint64 each)
    transform parameters (float32 each: none 0, scale 1, affine 2)
    packed codes                        ceil(numel * bits / 8) bytes
    CRC32 of everything above (uint32)  4 bytes

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

import struct
import zlib

import torch

from . import kernels
from .formats import (
    FloatFormat,
    Format,
    IntFormat,
    _affine_,
    _as_float32,
    _check_rounding,
    _chunk,
    _finite_minmax,
    format_from_spec,
    get_format,
    rounding_key,
    serial_spec,
)
from .memory import Workspace, mapped_empty
from .packing import _pack, _unpack, packed_nbytes
from .transform import CLIP_METHODS, TRANSFORM_KINDS, Transform, fit_transform

__all__ = ["CompressedTensor", "SERIAL_VERSION"]

_MAGIC = b"OMCT"
#: Version of the byte layout written by :meth:`CompressedTensor.to_bytes`.
SERIAL_VERSION = 1
_PREFIX = struct.Struct("<4sHQ")  # magic, version, total length
_META = struct.Struct("<BBBBBB")  # fmt kind, p1, p2, transform kind, clip, ndim
_CRC = struct.Struct("<I")

_BF16 = FloatFormat(8, 7)


class CompressedTensor:
    """A float tensor stored as packed low-bit codes plus a per-variable transform.

    Build one with :meth:`compress` (or :meth:`from_bytes`); the constructor
    takes already packed parts.

    Arguments
    ---------
    packed : torch.Tensor
        1-D ``torch.uint8`` tensor of ``ceil(numel * bits / 8)`` bytes.
    fmt : str or Format
        Format of the codes.
    shape : sequence of int
        Shape of the represented tensor.
    transform : Transform
        Fitted per-variable transform.
    clip : str
        Clip method used when the transform is refitted by :meth:`assign_`.

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
                f"the lossless format {fmt.name} takes no transform, got "
                f"{transform.kind!r}"
            )
        if clip not in CLIP_METHODS:
            raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")
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
        """Compress a float tensor.

        Arguments
        ---------
        x : torch.Tensor
            Floating-point tensor with finite values (cast to float32 first).
        fmt : str or Format
            Format or preset name (``"e3m7"``, ``"bf16"``, ``"int8"``...).
        transform : str or Transform
            ``"none"``, ``"scale"`` or ``"affine"`` (fitted to ``x``; a
            lossless format always gets ``"none"``), or a fixed
            :class:`Transform` to use as given.
        rounding : str
            ``"nearest"`` or ``"stochastic"``.
        generator : torch.Generator or int, optional
            Randomness for stochastic rounding (an int is the counter-based
            generator's key; see :meth:`Format.quantize`).
        clip : str
            ``"absmax"`` or ``"mse"`` (see :func:`fit_transform`).
        out : torch.Tensor, optional
            Contiguous 1-D ``uint8`` tensor of ``ceil(numel * bits / 8)``
            bytes on ``x``'s device to hold the codes (storage the caller
            chose, such as :func:`~speechbrain_omc.codec.memory.mapped_empty`).

        Returns
        -------
        CompressedTensor
            The compressed tensor, on ``x``'s device.

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
            expected = packed_nbytes(x32.numel(), fmt.bits)
            if (
                out.dtype != torch.uint8
                or out.dim() != 1
                or out.numel() != expected
                or not out.is_contiguous()
                or out.device != x32.device
            ):
                raise ValueError(
                    f"out must be a contiguous 1-D uint8 tensor of {expected} bytes "
                    f"on {x32.device}"
                )
        packed = cls._encode(x32, fmt, fitted, rounding, generator, out=out)
        return cls(packed, fmt, x32.shape, fitted, clip)

    @staticmethod
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
            out = torch.empty(
                packed_nbytes(n, bits), dtype=torch.uint8, device=flat.device
            )
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

    def assign_(
        self,
        x: torch.Tensor,
        rounding: str = "nearest",
        generator: torch.Generator | int | None = None,
        *,
        minmax: tuple[float, float] | None = None,
    ) -> CompressedTensor:
        """Re-compress a new value into this tensor, in place.

        The format, shape and packed buffer are kept; the transform is refitted
        to ``x`` (same kind and clip method). This is the per-step path after an
        optimizer update.

        Arguments
        ---------
        x : torch.Tensor
            New value, same shape, finite.
        rounding : str
            ``"nearest"`` or ``"stochastic"`` (the usual choice after an update:
            small updates survive on average).
        generator : torch.Generator or int, optional
            Randomness for stochastic rounding (an int is the key).
        minmax : tuple of float, optional
            ``(min, max)`` of ``x`` when the caller measured them (a fused
            update does, in its own pass): ``x`` is then trusted to be finite.

        Returns
        -------
        CompressedTensor
            ``self``.

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
        self._encode(x32, self._format, fitted, rounding, generator, out=self._packed)
        self._transform = fitted
        return self

    # ---------------------------------------------------------------- decode
    def decompress(
        self, dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode to a tensor of the original shape.

        Arguments
        ---------
        dtype : torch.dtype
            Floating dtype of the result (decoding is exact in float32, then
            cast).
        out : torch.Tensor, optional
            Contiguous float32 tensor of ``numel()`` values, on the packed
            buffer's device, to decode into (a reused workspace); ``dtype``
            must then be float32.

        Returns
        -------
        torch.Tensor
            The decompressed tensor (a view of ``out`` when given), on the
            packed buffer's device.

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
        fmt, n, bits = self._format, self.numel(), self._format.bits
        scale, shift = self._transform.decode_args
        packed = self._packed
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
        out = out.view(-1)
        if kernels.native_for(packed, out):  # one pass, straight into out
            kernels.decode_prepared(self._prepared_decode(), out)
        elif fmt.lossless:  # the bytes are the values: one copy
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
        out = out.view(self._shape)
        return out if dtype == torch.float32 else out.to(dtype)

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
        """Number of represented values.

        Returns
        -------
        int
            Product of :attr:`shape`.

        Example
        -------
        >>> CompressedTensor.compress(torch.ones(2, 3), "e4m3").numel()
        6
        """
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
        """The same codes, on the CPU in pages of their own.

        Long-lived codes kept off the heap let freed transients go back to
        the system (see :mod:`speechbrain_omc.codec.memory`); codes on other
        devices are returned as they are.

        Returns
        -------
        CompressedTensor
            ``self`` when not on the CPU, else a copy in an anonymous mapping.

        Example
        -------
        >>> ct = CompressedTensor.compress(torch.ones(4), "e3m7")
        >>> torch.equal(ct.in_own_pages().decompress(), ct.decompress())
        True
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
        """Serialise to a self-describing, checksummed byte string.

        Returns
        -------
        bytes
            Versioned header, packed codes and a CRC32 (layout in the module
            docstring).

        Example
        -------
        >>> data = CompressedTensor.compress(torch.ones(3), "int8").to_bytes()
        >>> data[:4], len(data)
        (b'OMCT', 39)
        """
        return b"".join(self.to_bytes_parts())

    def to_bytes_parts(self) -> tuple[bytes, memoryview, bytes]:
        """:meth:`to_bytes` in three parts, the codes a view of this tensor.

        Joined, they are :meth:`to_bytes`; a message encoder that joins all
        its parts once copies the codes once, into the message, instead of
        holding a serialised copy of every entry until then.

        Returns
        -------
        tuple
            Header (prefix, format, shape, transform parameters), a
            ``memoryview`` of the packed codes, CRC32.

        Example
        -------
        >>> t = CompressedTensor.compress(torch.ones(3), "int8")
        >>> b"".join(t.to_bytes_parts()) == t.to_bytes()
        True
        """
        ndim = len(self._shape)
        if ndim > 255:
            raise ValueError("cannot serialise more than 255 dimensions")
        kind, p1, p2 = serial_spec(self._format)
        params = self._transform.params
        meta = _META.pack(
            kind,
            p1,
            p2,
            TRANSFORM_KINDS.index(self._transform.kind),
            CLIP_METHODS.index(self._clip),
            ndim,
        )
        codes = memoryview(self._packed.detach().cpu().contiguous().numpy()).cast("B")
        body_head = (
            meta
            + struct.pack(f"<{ndim}Q", *self._shape)
            + struct.pack(f"<{len(params)}f", *params)
        )
        total = _PREFIX.size + len(body_head) + len(codes) + _CRC.size
        head = _PREFIX.pack(_MAGIC, SERIAL_VERSION, total) + body_head
        crc = zlib.crc32(codes, zlib.crc32(head))
        return head, codes, _CRC.pack(crc)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        device: str | torch.device | None = None,
        *,
        workspace: Workspace | None = None,
    ) -> CompressedTensor:
        """Rebuild a tensor serialised by :meth:`to_bytes`.

        The codes are copied once, into the new tensor's buffer; nothing
        else of ``data`` is (a server decoding thousands of replies must not
        leave copies of every payload in its heap).

        Arguments
        ---------
        data : bytes-like
            The serialised payload.
        device : str or torch.device, optional
            Where to put the packed buffer (CPU by default).
        workspace : Workspace, optional
            Where the codes go: a buffer of the workspace, reused once this
            tensor and its decompressions are gone (a reader that decodes an
            entry and drops it). By default a buffer of their own.

        Returns
        -------
        CompressedTensor
            The tensor.

        Raises
        ------
        ValueError
            If the payload is foreign (bad magic), of an unsupported version,
            truncated or padded, corrupted (CRC32 mismatch) or inconsistent.

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
        except TypeError:  # a non-contiguous view: one copy, as before
            data = memoryview(bytes(data))
        if bytes(data[:4]) != _MAGIC:
            raise ValueError(
                f"not a CompressedTensor payload: expected magic {_MAGIC!r}, "
                f"got {bytes(data[:4])!r}"
            )
        if len(data) < _PREFIX.size:
            raise ValueError(
                f"truncated CompressedTensor payload: {len(data)} bytes is shorter "
                f"than the {_PREFIX.size}-byte header"
            )
        _, version, total = _PREFIX.unpack_from(data)
        if version != SERIAL_VERSION:
            raise ValueError(
                f"unsupported CompressedTensor payload version {version} "
                f"(this build reads version {SERIAL_VERSION})"
            )
        if len(data) < total:
            raise ValueError(
                f"truncated CompressedTensor payload: header announces {total} "
                f"bytes, got {len(data)}"
            )
        if len(data) > total:
            raise ValueError(
                f"CompressedTensor payload has {len(data) - total} trailing bytes "
                f"after the announced {total}"
            )
        if total < _PREFIX.size + _META.size + _CRC.size:
            raise ValueError(f"corrupted CompressedTensor payload: length {total}")
        (crc,) = _CRC.unpack_from(data, total - _CRC.size)
        if zlib.crc32(data[: total - _CRC.size]) != crc:
            raise ValueError(
                "corrupted CompressedTensor payload: CRC32 mismatch "
                "(the bytes were altered or mis-assembled)"
            )
        try:
            return cls._parse_body(data, device, workspace)
        except (struct.error, ValueError, TypeError) as err:
            # Only a payload written by a broken encoder gets here.
            raise ValueError(f"malformed CompressedTensor payload: {err}") from err

    @classmethod
    def _parse_body(
        cls,
        data: memoryview,
        device: str | torch.device | None,
        workspace: Workspace | None = None,
    ) -> CompressedTensor:
        end = len(data) - _CRC.size
        pos = _PREFIX.size
        kind, p1, p2, t_kind, clip, ndim = _META.unpack_from(data, pos)
        pos += _META.size
        fmt = format_from_spec(kind, p1, p2)
        if t_kind >= len(TRANSFORM_KINDS) or clip >= len(CLIP_METHODS):
            raise ValueError(f"unknown transform ({t_kind}) or clip ({clip}) code")
        t_name = TRANSFORM_KINDS[t_kind]
        shape = struct.unpack_from(f"<{ndim}Q", data, pos)
        pos += 8 * ndim
        n_params = {"none": 0, "scale": 1, "affine": 2}[t_name]
        params = struct.unpack_from(f"<{n_params}f", data, pos)
        pos += 4 * n_params
        transform = Transform.from_params(t_name, params)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = packed_nbytes(numel, fmt.bits)
        if end - pos != nbytes:
            raise ValueError(
                f"{end - pos} code bytes for shape {shape} in {fmt.name}, "
                f"expected {nbytes}"
            )
        if workspace is not None:
            packed = workspace.take(nbytes, dtype=torch.uint8)
            packed.numpy()[:] = data[pos:end]
        elif nbytes:
            packed = torch.frombuffer(bytearray(data[pos:end]), dtype=torch.uint8)
        else:
            packed = torch.empty(0, dtype=torch.uint8)
        if device is not None:
            packed = packed.to(device)
        return cls(packed, fmt, shape, transform, CLIP_METHODS[clip])
