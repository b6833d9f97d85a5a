"""The byte layout of a compressed tensor (``CompressedTensor.to_bytes``).

Inside a :class:`~speechbrain_omc.codec.framing.Frame` (magic ``b"OMCT"``),
little-endian: format kind, p1, p2 (uint8 x 3: float 0, E, M; int 1, bits,
0; fp32 2, 32, 0), transform kind and clip (uint8 x 2), ndim (uint8), shape
(uint64 each), transform parameters (float32: none 0, scale 1, affine 2),
packed codes.

Example
-------
>>> import torch
>>> from speechbrain_omc.codec.formats import get_format
>>> from speechbrain_omc.codec.transform import Transform
>>> codes = torch.tensor([1, 2], dtype=torch.uint8)
>>> none = Transform.from_params("none", ())
>>> data = b"".join(write_parts(codes, get_format("int8"), (2,), none, "absmax"))
>>> is_payload_bytes(data), len(data) == payload_nbytes((2,), "int8", "none")
(True, True)
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from typing import TypeVar

import torch

from .formats import Format, format_from_spec, get_format, serial_spec
from .framing import CRC, Frame
from .memory import Workspace
from .packing import packed_nbytes
from .transform import CLIP_METHODS, TRANSFORM_KINDS, Transform, kind_for

__all__ = [
    "MAGIC",
    "SERIAL_VERSION",
    "is_payload",
    "is_payload_bytes",
    "payload_nbytes",
    "read",
    "write_parts",
]

MAGIC = b"OMCT"
#: Version of the byte layout written by :func:`write_parts`.
SERIAL_VERSION = 1
_META = struct.Struct("<BBBBBB")  # fmt kind, p1, p2, transform kind, clip, ndim
_N_PARAMS = {"none": 0, "scale": 1, "affine": 2}
T = TypeVar("T")
FRAME = Frame(
    MAGIC,
    SERIAL_VERSION,
    "a",
    "CompressedTensor payload",
    _META.size,
    "corrupted CompressedTensor payload: length",
)


def is_payload_bytes(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts like a compressed-tensor payload."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def is_payload(value) -> bool:
    """Whether a state-dict entry is a payload: a 1-D ``uint8`` tensor
    starting with ``b"OMCT"``.

    Example
    -------
    >>> is_payload(torch.frombuffer(bytearray(b"OMCT..."), dtype=torch.uint8))
    True
    >>> is_payload(torch.zeros(3, dtype=torch.uint8)), is_payload(torch.ones(3))
    (False, False)
    """
    return (
        isinstance(value, torch.Tensor)
        and value.dtype == torch.uint8
        and value.dim() == 1
        and value.numel() >= len(MAGIC)
        and bytes(value[: len(MAGIC)].tolist()) == MAGIC
    )


def payload_nbytes(
    shape: tuple[int, ...], fmt: str | Format, transform: str = "scale"
) -> int:
    """Exact length of the payload of a tensor of this shape and format.

    Example
    -------
    >>> import torch
    >>> from speechbrain_omc.codec.compressed import CompressedTensor
    >>> ct = CompressedTensor.compress(torch.ones(8, 4), "e3m7")
    >>> payload_nbytes((8, 4), "e3m7") == len(ct.to_bytes())
    True
    """
    fmt = get_format(fmt)
    n_params = _N_PARAMS[kind_for(fmt, transform)]
    return (
        FRAME.overhead
        + _META.size
        + 8 * len(shape)
        + 4 * n_params
        + packed_nbytes(math.prod(shape), fmt.bits)
    )


def write_parts(
    packed: torch.Tensor,
    fmt: Format,
    shape: tuple[int, ...],
    transform: Transform,
    clip: str,
) -> tuple[bytes, memoryview, bytes]:
    """The payload in three parts: header, a view of the codes, CRC32."""
    ndim = len(shape)
    if ndim > 255:
        raise ValueError("cannot serialise more than 255 dimensions")
    params = transform.params
    meta = _META.pack(
        *serial_spec(fmt),
        TRANSFORM_KINDS.index(transform.kind),
        CLIP_METHODS.index(clip),
        ndim,
    )
    codes = memoryview(packed.detach().cpu().contiguous().numpy()).cast("B")
    body_head = (
        meta
        + struct.pack(f"<{ndim}Q", *shape)
        + struct.pack(f"<{len(params)}f", *params)
    )
    total = FRAME.overhead + len(body_head) + len(codes)
    head = FRAME.prefix(total) + body_head
    crc = zlib.crc32(codes, zlib.crc32(head))
    return head, codes, CRC.pack(crc)


def read(
    data: memoryview,
    build: Callable[..., T],
    device: str | torch.device | None = None,
    workspace: Workspace | None = None,
) -> T:
    """Parse a payload into ``build(packed, format, shape, transform, clip)``.

    The codes are copied once, into a new buffer or one of ``workspace``
    (then moved to ``device``); nothing else of ``data`` is. Raises
    ``ValueError`` for a foreign, newer, truncated, padded, corrupted or
    inconsistent payload.
    """
    body = FRAME.open(data)
    try:
        packed, *rest = _read_body(body, workspace)
        if device is not None:
            packed = packed.to(device)
        return build(packed, *rest)
    except (struct.error, ValueError, TypeError) as err:
        # Only a payload written by a broken encoder gets here.
        raise ValueError(f"malformed CompressedTensor payload: {err}") from err


def _read_body(body: memoryview, workspace: Workspace | None):
    pos = 0
    kind, p1, p2, t_kind, clip, ndim = _META.unpack_from(body, pos)
    pos += _META.size
    fmt = format_from_spec(kind, p1, p2)
    if t_kind >= len(TRANSFORM_KINDS) or clip >= len(CLIP_METHODS):
        raise ValueError(f"unknown transform ({t_kind}) or clip ({clip}) code")
    t_name = TRANSFORM_KINDS[t_kind]
    shape = struct.unpack_from(f"<{ndim}Q", body, pos)
    pos += 8 * ndim
    n_params = _N_PARAMS[t_name]
    params = struct.unpack_from(f"<{n_params}f", body, pos)
    pos += 4 * n_params
    transform = Transform.from_params(t_name, params)
    nbytes = packed_nbytes(math.prod(shape), fmt.bits)
    end = len(body)
    if end - pos != nbytes:
        raise ValueError(
            f"{end - pos} code bytes for shape {shape} in {fmt.name}, expected {nbytes}"
        )
    if workspace is not None:
        packed = workspace.take(nbytes, dtype=torch.uint8)
        packed.numpy()[:] = body[pos:end]
    elif nbytes:
        packed = torch.frombuffer(bytearray(body[pos:end]), dtype=torch.uint8)
    else:
        packed = torch.empty(0, dtype=torch.uint8)
    return packed, fmt, shape, transform, CLIP_METHODS[clip]
