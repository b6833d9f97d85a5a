"""Wire format of federated OMC: a model (or update) as one byte string.

A message carries named entries, each a compressed parameter (its
:meth:`~speechbrain_omc.codec.compressed.CompressedTensor.to_bytes` payload)
or a float32 array, plus a small JSON object of metadata. The entries' kinds
and formats *are* the parameter plan: a server tells a client which variables
travel compressed, and in which format, by sending them so.

Layout (all little-endian)::

    magic b"OMCW"                              4 bytes
    version (uint16, currently 1)              2 bytes
    total length in bytes (uint64)             8 bytes
    metadata length (uint32), metadata         UTF-8 JSON object
    entry count (uint32)
    per entry:
        name length (uint16), name             UTF-8, unique, non-empty
        kind (uint8)                           0 compressed, 1 float32
        payload length (uint64), payload
    CRC32 of everything above (uint32)         4 bytes

    float32 payload: ndim (uint8), shape (uint64 each), values (float32 each)

Decoding is strict and total: whatever the bytes, :func:`decode` returns a
message or raises ``ValueError``. Given what a reply must hold, it checks the
length and every entry header before it allocates anything for the payloads
(see docs/federated_server.md).

Example
-------
>>> import torch
>>> from speechbrain_omc.codec.compressed import CompressedTensor
>>> entries = {
...     "lin.weight": CompressedTensor.compress(torch.ones(4, 4), "e3m7"),
...     "lin.bias": torch.zeros(4),
... }
>>> data = encode(entries, {"round": 1})
>>> len(data) == encoded_nbytes(entries, {"round": 1})
True
>>> message = decode(data)
>>> message.meta, message.formats()
({'round': 1}, {'lin.weight': 'e3m7', 'lin.bias': 'float32'})
>>> decode(data[:-1])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: truncated OMC wire message: header announces ... bytes, got ...
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.framing import CRC as _CRC
from speechbrain_omc.codec.framing import PREFIX as _PREFIX
from speechbrain_omc.codec.framing import Frame
from speechbrain_omc.codec.memory import MAPPED_MIN_BYTES, Workspace
from speechbrain_omc.codec.serial import payload_nbytes

__all__ = [
    "COMPRESSED",
    "FLOAT32",
    "MAX_META_BYTES",
    "MAX_META_DEPTH",
    "WIRE_VERSION",
    "Entry",
    "Expected",
    "LazyMessage",
    "Message",
    "decode",
    "encode",
    "encoded_nbytes",
    "entry_head_nbytes",
    "entry_nbytes",
    "expect_like",
    "float32_payload",
    "max_message_nbytes",
    "parse_float32_payload",
]

MAGIC = b"OMCW"
#: Version of the message layout written by :func:`encode`.
WIRE_VERSION = 1
#: Entry kinds.
COMPRESSED = 0
FLOAT32 = 1
_KIND_NAMES = {COMPRESSED: "compressed", FLOAT32: "float32"}

_U32 = struct.Struct("<I")
_ENTRY_HEAD = struct.Struct("<BQ")  # kind, payload length
_NAME_LEN = struct.Struct("<H")
_MAX_NAME = 2**16 - 1
_FRAME = Frame(
    MAGIC,
    WIRE_VERSION,
    "an",
    "OMC wire message",
    2 * _U32.size,  # metadata length and entry count
    "malformed OMC wire message: impossible length",
)

#: Largest metadata (JSON bytes) that :func:`decode` accepts.
MAX_META_BYTES = 64 * 1024
#: Deepest nesting of objects and arrays in the metadata.
MAX_META_DEPTH = 16
#: Largest dimension of a float32 entry (a 2**40-element dimension would
#: already be 4 TiB of values; anything larger is a lie, even with 0 elements).
MAX_DIM = 2**40
#: Payload bytes a compressed reply entry may have beyond the broadcast's: its
#: transform may carry up to two more float32 parameters.
COMPRESSED_SLACK = 16
_INT64 = 2**63
# A string literal, or an unterminated one running to the end (with a lone
# trailing backslash). Without the unterminated alternatives a match from an
# unclosed quote fails only at the end and the scan restarts at the next quote:
# quadratic time. With them a match starting at a quote cannot fail, so each
# byte is scanned once.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.S)

#: What a message entry holds: a compressed parameter or float32 values.
Entry = Union[CompressedTensor, torch.Tensor]


def _meta_bytes(meta: Mapping | None) -> bytes:
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(meta).__name__}")
    # sort_keys: the same content always gives the same bytes (byte counts
    # and checksums are reproducible); allow_nan=False: JSON has no NaN.
    try:
        text = json.dumps(
            dict(meta), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
    except (ValueError, RecursionError) as error:
        raise ValueError(f"metadata is not JSON-serialisable: {error}") from None
    raw = text.encode("utf-8")
    # What leaves must be what a receiver accepts: the same checks.
    _load_meta(raw)
    return raw


def _reject_constant(name: str):
    raise ValueError(f"metadata contains {name}, which JSON does not allow")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"metadata number {text[:40]} is not a finite float")
    return value


def _int64(text: str) -> int:
    # Checked on the digits first: converting a huge digit string is itself
    # slow (and Python refuses beyond 4300 digits with its own error).
    if len(text.lstrip("-")) > 19 or not -_INT64 <= int(text) < _INT64:
        raise ValueError(f"metadata integer {text[:40]} does not fit in 64 bits")
    return int(text)


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"metadata repeats the key {dup!r}")
    return out


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[`` and ``{`` outside strings (no recursion)."""
    # JSON strings cannot contain an unescaped quote, and outside strings
    # there is no backslash: removing every string literal leaves the
    # structure, whose running bracket balance is the depth.
    bare = np.frombuffer(_JSON_STRING.sub(b"", raw), dtype=np.uint8)
    if bare.size == 0:
        return 0
    step = np.isin(bare, (ord("["), ord("{"))).astype(np.int64)
    step -= np.isin(bare, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _load_meta(raw: bytes) -> dict:
    """Parse metadata under the limits (size, depth, 64-bit ints, finite floats)."""
    if len(raw) > MAX_META_BYTES:
        raise ValueError(
            f"metadata of {len(raw)} bytes exceeds the {MAX_META_BYTES}-byte limit"
        )
    depth = _json_depth(raw)
    if depth > MAX_META_DEPTH:
        raise ValueError(
            f"metadata nested {depth} deep exceeds the limit of {MAX_META_DEPTH}"
        )
    try:
        meta = json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_int64,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UTF-8 too
        raise ValueError(f"bad metadata ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return meta


def _as_float32(value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"an entry must be a CompressedTensor or a float tensor/array, "
            f"got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise TypeError(f"float32 entries must be floating point, got {value.dtype}")
    return value.detach().to("cpu", torch.float32).contiguous()


def float32_payload(value: torch.Tensor | np.ndarray) -> bytes:
    """The payload of a float32 entry: ndim, shape and little-endian values.

    Arguments
    ---------
    value : torch.Tensor or numpy.ndarray
        Floating-point values (cast to float32).

    Returns
    -------
    bytes

    Example
    -------
    >>> len(float32_payload(torch.zeros(2, 3)))  # 1 + 2 * 8 + 6 * 4
    41
    """
    return b"".join(_float32_parts(value))


def _float32_parts(value) -> tuple[bytes, memoryview]:
    # The head and a view of the values (no copy of a float32 tensor).
    tensor = _as_float32(value)
    if tensor.dim() > 255:
        raise ValueError("cannot serialise more than 255 dimensions")
    head = struct.pack(f"<B{tensor.dim()}Q", tensor.dim(), *tensor.shape)
    values = tensor.numpy().astype("<f4", copy=False).reshape(-1)
    return head, memoryview(values).cast("B")


def parse_float32_payload(
    payload: bytes | memoryview, workspace: Workspace | None = None
) -> torch.Tensor:
    """Inverse of :func:`float32_payload`, with strict length checks.

    Arguments
    ---------
    payload : bytes-like
    workspace : Workspace, optional
        Reused buffers to put the values in (see :meth:`LazyMessage.entry`).

    Returns
    -------
    torch.Tensor
        A float32 copy of the values.

    Example
    -------
    >>> parse_float32_payload(float32_payload(torch.ones(2))).tolist()
    [1.0, 1.0]
    """
    payload = memoryview(payload).cast("B")
    shape = _float32_shape(payload)
    numel = math.prod(shape)
    expected = 1 + 8 * len(shape) + 4 * numel
    if len(payload) != expected:
        raise ValueError(
            f"float32 payload of shape {tuple(shape)} has {len(payload)} bytes, "
            f"expected {expected}"
        )
    values = np.frombuffer(payload, dtype="<f4", count=numel, offset=1 + 8 * len(shape))
    if workspace is None:
        return torch.from_numpy(values.astype(np.float32)).reshape(shape)
    out = workspace.take(numel)
    np.copyto(out.numpy(), values, casting="equiv")  # byte order only
    return out.reshape(shape)


def _float32_shape(payload: memoryview) -> tuple[int, ...]:
    # The shape alone, bounded: nothing is allocated for the values yet.
    if len(payload) < 1:
        raise ValueError("empty float32 payload")
    ndim = payload[0]
    if len(payload) < 1 + 8 * ndim:
        raise ValueError(f"float32 payload too short for its {ndim}-D shape")
    shape = struct.unpack_from(f"<{ndim}Q", payload, 1)
    if any(d > MAX_DIM for d in shape):
        raise ValueError(
            f"float32 payload declares a dimension above 2**40: {tuple(shape)}"
        )
    return shape


def _entry_parts(value: Entry) -> tuple[int, tuple]:
    if isinstance(value, CompressedTensor):
        # Views of the codes: joined once, into the message.
        return COMPRESSED, value.to_bytes_parts()
    return FLOAT32, _float32_parts(value)


def _compressed_nbytes(value: CompressedTensor) -> int:
    # The length of to_bytes() without joining it (a copy of the codes).
    return sum(len(part) for part in value.to_bytes_parts())


def entry_head_nbytes(name: str) -> int:
    """Bytes of one entry's header in a message (name, kind, payload length).

    Arguments
    ---------
    name : str

    Returns
    -------
    int

    Example
    -------
    >>> entry_head_nbytes("b")  # name length 2 + name 1 + kind 1 + length 8
    12
    """
    return _NAME_LEN.size + len(name.encode("utf-8")) + _ENTRY_HEAD.size


def entry_nbytes(
    name: str,
    value: Entry | tuple[int, ...],
    fmt: str | None = None,
    transform: str = "scale",
) -> int:
    """Exact bytes one entry takes in a message.

    Arguments
    ---------
    name : str
    value : CompressedTensor, torch.Tensor or tuple of int
        The entry, or just a shape.
    fmt : str, optional
        The compressed format of a shape (``None`` or ``"float32"``: float32).
    transform : str
        The transform kind of a shape sized compressed.

    Returns
    -------
    int

    Example
    -------
    >>> entry_nbytes("b", torch.zeros(4))  # name 2+1, head 9, payload 1+8+16
    37
    >>> value = CompressedTensor.compress(torch.ones(8, 4), "e3m7")
    >>> entry_nbytes("w", (8, 4), "e3m7") == entry_nbytes("w", value)
    True
    """
    head = entry_head_nbytes(name)
    if isinstance(value, CompressedTensor):
        # The payload's own layout belongs to CompressedTensor: ask it.
        return head + _compressed_nbytes(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        shape = tuple(value.shape)
    else:
        shape = tuple(value)
    if fmt not in (None, "float32"):
        return head + payload_nbytes(shape, fmt, transform)
    return head + 1 + 8 * len(shape) + 4 * math.prod(shape)


def encoded_nbytes(entries: Mapping[str, Entry], meta: Mapping | None = None) -> int:
    """Length of :func:`encode`'s result, computed without encoding.

    Arguments
    ---------
    entries : mapping
        Name to entry (or to a shape, sized as float32).
    meta : mapping, optional

    Returns
    -------
    int

    Example
    -------
    >>> encoded_nbytes({"w": torch.zeros(3)}, {}) == len(encode({"w": torch.zeros(3)}))
    True
    """
    fixed = _PREFIX.size + _U32.size + len(_meta_bytes(meta)) + _U32.size + _CRC.size
    return fixed + sum(entry_nbytes(name, value) for name, value in entries.items())


def _check_name(name) -> bytes:
    if not isinstance(name, str) or not name:
        raise ValueError(f"entry names must be non-empty strings, got {name!r}")
    raw = name.encode("utf-8")
    if len(raw) > _MAX_NAME:
        raise ValueError(f"entry name of {len(raw)} bytes is too long")
    return raw


def encode(entries: Mapping[str, Entry], meta: Mapping | None = None) -> bytes:
    """Serialise named entries and metadata into one message.

    Arguments
    ---------
    entries : mapping
        Name to :class:`CompressedTensor` or float values, in wire order.
    meta : mapping, optional
        JSON-serialisable metadata (no NaN or infinity).

    Returns
    -------
    bytes

    Example
    -------
    >>> data = encode({"w": torch.ones(2)}, {"client": "a"})
    >>> data[:4], len(data)
    (b'OMCW', 69)
    """
    # One copy of the payloads, into the result: a large float32 model is
    # not held three or four times while its message is built.
    meta_raw = _meta_bytes(meta)
    parts: list = [_U32.pack(len(meta_raw)), meta_raw, _U32.pack(len(entries))]
    for name, value in entries.items():
        raw = _check_name(name)
        kind, payload = _entry_parts(value)
        length = sum(len(part) for part in payload)
        parts += [_NAME_LEN.pack(len(raw)), raw, _ENTRY_HEAD.pack(kind, length)]
        parts += payload
    total = _PREFIX.size + sum(len(p) for p in parts) + _CRC.size
    parts.insert(0, _PREFIX.pack(MAGIC, WIRE_VERSION, total))
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_CRC.pack(crc))
    return b"".join(parts)


@dataclass
class Message:
    """A decoded message: entries in wire order and metadata.

    Arguments
    ---------
    entries : dict
        Name to :class:`CompressedTensor` or float32 ``torch.Tensor``.
    meta : dict
    nbytes : int
        Length of the message it was decoded from (0 when built by hand).
    """

    entries: dict[str, Entry]
    meta: dict = field(default_factory=dict)
    nbytes: int = 0

    def formats(self) -> dict[str, str]:
        """Each entry's format name: ``"float32"`` or the compressed format."""
        return {
            name: value.format.name
            if isinstance(value, CompressedTensor)
            else "float32"
            for name, value in self.entries.items()
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each entry's shape."""
        return {name: tuple(value.shape) for name, value in self.entries.items()}

    def decompressed(self) -> dict[str, torch.Tensor]:
        """Every entry as a float32 tensor."""
        return {
            name: value.decompress() if isinstance(value, CompressedTensor) else value
            for name, value in self.entries.items()
        }

    def to_bytes(self) -> bytes:
        """Encode again (see :func:`encode`)."""
        return encode(self.entries, self.meta)

    def float32_nbytes(self) -> int:
        """Length of the same message with every entry sent as float32."""
        shapes = {name: tuple(value.shape) for name, value in self.entries.items()}
        return encoded_nbytes(shapes, self.meta)


@dataclass(frozen=True)
class Expected:
    """What one entry of a reply must be.

    Arguments
    ---------
    format : str
        ``"float32"`` or the compressed format's name.
    shape : tuple of int
    max_payload : int
        Most payload bytes the entry may take (exact for float32 entries).
    """

    format: str
    shape: tuple[int, ...]
    max_payload: int


def expect_like(entries: Mapping[str, Entry]) -> dict[str, Expected]:
    """The expectation for a reply in the form of broadcast ``entries``.

    A compressed entry's payload may be :data:`COMPRESSED_SLACK` bytes longer
    than sent (a transform with more parameters).

    Arguments
    ---------
    entries : mapping

    Returns
    -------
    dict
        Name to :class:`Expected`.

    Example
    -------
    >>> expect_like({"b": torch.zeros(3)})
    {'b': Expected(format='float32', shape=(3,), max_payload=21)}
    """
    out = {}
    for name, value in entries.items():
        if isinstance(value, CompressedTensor):
            out[name] = Expected(
                value.format.name,
                tuple(value.shape),
                _compressed_nbytes(value) + COMPRESSED_SLACK,
            )
        else:
            shape = tuple(value.shape)
            out[name] = Expected(
                "float32", shape, 1 + 8 * len(shape) + 4 * math.prod(shape)
            )
    return out


def max_message_nbytes(expect: Mapping[str, Expected]) -> int:
    """The longest message that can satisfy ``expect`` (metadata at its limit).

    Arguments
    ---------
    expect : mapping

    Returns
    -------
    int

    Example
    -------
    >>> max_message_nbytes({}) == 14 + 4 + MAX_META_BYTES + 4 + 4
    True
    """
    fixed = _PREFIX.size + _U32.size + MAX_META_BYTES + _U32.size + _CRC.size
    return fixed + sum(
        _NAME_LEN.size + len(name.encode("utf-8")) + _ENTRY_HEAD.size + e.max_payload
        for name, e in expect.items()
    )


def decode(
    data: bytes | bytearray | memoryview,
    expect: Mapping[str, Expected] | None = None,
    max_nbytes: int | None = None,
    check_meta: Callable[[dict], object] | None = None,
    lazy: bool = False,
) -> Message | LazyMessage:
    """Parse and validate a message written by :func:`encode`.

    Arguments
    ---------
    data : bytes-like
    expect : mapping, optional
        Name to :class:`Expected`: exactly these entries, checked on the entry
        headers before any payload is parsed.
    max_nbytes : int, optional
        Longest acceptable message, checked first.
    check_meta : callable, optional
        Sees the metadata before any entry is read; what it raises propagates.
    lazy : bool
        Return a :class:`LazyMessage` that parses each entry when asked for.

    Returns
    -------
    Message or LazyMessage

    Raises
    ------
    ValueError
        Whatever is wrong with the bytes, named in the message.
    TypeError
        When ``data`` is not bytes-like.

    Example
    -------
    >>> decode(b"PK\\x03\\x04 a zip file")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: not an OMC wire message: expected magic b'OMCW', got b'PK\\x03\\x04'
    >>> data = encode({"b": torch.zeros(3)})
    >>> decode(data, expect={"b": Expected("float32", (4,), 33)})
    Traceback (most recent call last):
    ...
    ValueError: malformed OMC wire message: b has shape (3,), expected (4,)
    """
    body = _FRAME.open(_byte_view(data), max_nbytes)
    end = len(body)
    try:
        meta, pos = _read_meta(body, end)
    except (ValueError, struct.error) as error:
        raise ValueError(f"malformed OMC wire message: {error}") from None
    if check_meta is not None:
        check_meta(meta)
    total = end + _FRAME.overhead
    try:
        heads = _read_heads(body, pos, end, expect)
        if lazy:
            return LazyMessage(meta, total, heads, expect)
        entries = {
            name: _parse_entry(name, kind, payload, expect)
            for name, kind, payload in heads
        }
    except (ValueError, struct.error) as error:
        raise ValueError(f"malformed OMC wire message: {error}") from None
    return Message(entries, meta, nbytes=total)


def _byte_view(data) -> memoryview:
    """``data`` as a flat byte view, without a copy."""
    if isinstance(data, (np.ndarray, torch.Tensor)):
        raise TypeError("decode takes bytes; convert uint8 arrays with .tobytes()")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    try:
        return memoryview(data).cast("B")
    except TypeError as error:  # e.g. a non-contiguous view
        raise ValueError(f"not a contiguous byte buffer: {error}") from None


def _take(view: memoryview, pos: int, n: int, end: int, what: str) -> memoryview:
    if n < 0 or pos + n > end:
        raise ValueError(f"{what} runs past the end")
    return view[pos : pos + n]


def _walk(view: memoryview, pos: int, end: int, count: int, expect):
    """Entry headers (name, kind, payload view), nothing parsed or copied."""
    heads: list[tuple[str, int, memoryview]] = []
    names: set[str] = set()
    for index in range(count):
        (name_len,) = _NAME_LEN.unpack_from(
            _take(view, pos, _NAME_LEN.size, end, f"entry {index}")
        )
        pos += _NAME_LEN.size
        raw = bytes(_take(view, pos, name_len, end, f"name of entry {index}"))
        pos += name_len
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"entry {index} name is not UTF-8") from None
        if not name:
            raise ValueError(f"entry {index} has an empty name")
        if name in names:
            raise ValueError(f"duplicate entry {name!r}")
        # At once: a message cannot make us walk more entries than expected.
        if expect is not None and name not in expect:
            raise ValueError(f"unexpected entries: {name}")
        names.add(name)
        kind, length = _ENTRY_HEAD.unpack_from(
            _take(view, pos, _ENTRY_HEAD.size, end, f"header of entry {name!r}")
        )
        pos += _ENTRY_HEAD.size
        payload = _take(view, pos, length, end, f"payload of entry {name!r}")
        pos += length
        if kind not in _KIND_NAMES:
            raise ValueError(f"entry {name!r}: unknown entry kind {kind}")
        heads.append((name, kind, payload))
    if pos != end:
        raise ValueError(f"{end - pos} unexplained bytes after the {count} entries")
    return heads


def _check_heads(heads, expect: Mapping[str, Expected]) -> None:
    """Names, kinds, sizes and float32 shapes against ``expect``: no allocation."""
    got = {name for name, _, _ in heads}  # all expected: see _walk
    missing = [n for n in expect if n not in got]
    if missing:
        raise ValueError(f"missing entries: {', '.join(missing[:5])}")
    for name, kind, payload in heads:
        want = expect[name]
        if kind == FLOAT32 and want.format != "float32":
            raise ValueError(f"{name} arrived as float32, expected {want.format}")
        if kind == COMPRESSED and want.format == "float32":
            raise ValueError(f"{name} arrived compressed, expected float32")
        if kind == FLOAT32:
            shape = _float32_shape(payload)
            if tuple(shape) != tuple(want.shape):
                raise ValueError(
                    f"{name} has shape {tuple(shape)}, expected {tuple(want.shape)}"
                )
        if len(payload) > want.max_payload:
            raise ValueError(
                f"{name}: payload of {len(payload)} bytes, at most "
                f"{want.max_payload} expected"
            )


def _read_meta(view: memoryview, end: int) -> tuple[dict, int]:
    """The metadata and the position after it (in the message's body)."""
    pos = 0
    (meta_len,) = _U32.unpack_from(_take(view, pos, _U32.size, end, "metadata length"))
    pos += _U32.size
    if meta_len > MAX_META_BYTES:  # before copying it
        raise ValueError(
            f"metadata of {meta_len} bytes exceeds the {MAX_META_BYTES}-byte limit"
        )
    meta = _load_meta(bytes(_take(view, pos, meta_len, end, "metadata")))
    return meta, pos + meta_len


def _read_heads(
    view: memoryview, pos: int, end: int, expect: Mapping[str, Expected] | None
) -> list[tuple[str, int, memoryview]]:
    """The entry headers from ``pos``, walked and checked (nothing parsed)."""
    (count,) = _U32.unpack_from(_take(view, pos, _U32.size, end, "entry count"))
    pos += _U32.size
    heads = _walk(view, pos, end, count, expect)
    if expect is not None:
        _check_heads(heads, expect)
    return heads


def _parse_entry(
    name: str,
    kind: int,
    payload: memoryview,
    expect: Mapping[str, Expected] | None,
    workspace: Workspace | None = None,
) -> Entry:
    """One entry's payload parsed, compressed ones checked against ``expect``."""
    if workspace is not None and len(payload) < MAPPED_MIN_BYTES:
        # Small: from the heap either way (see Workspace.take), and quicker
        # without the workspace's bookkeeping.
        workspace = None
    try:
        if kind == COMPRESSED:
            value = CompressedTensor.from_bytes(payload, workspace=workspace)
        else:
            value = parse_float32_payload(payload, workspace)
    except Exception as error:  # noqa: BLE001 - any failure is a bad payload
        raise ValueError(f"entry {name!r}: {error}") from None
    if expect is not None and kind == COMPRESSED:
        want = expect[name]
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, expected {tuple(want.shape)}"
            )
        if value.format.name != want.format:
            raise ValueError(
                f"{name} arrived as {value.format.name}, expected {want.format}"
            )
    return value


class LazyMessage:
    """A checked message whose entries are parsed one at a time, when asked for.

    Arguments
    ---------
    meta : dict
    nbytes : int
    heads : list
        ``(name, kind, payload view)`` per entry, in wire order.
    expect : mapping, optional
        The expectations the headers were checked against.

    Example
    -------
    >>> data = encode({"w": torch.ones(2), "b": torch.zeros(1)}, {"round": 3})
    >>> lazy = decode(data, lazy=True)
    >>> lazy.meta, lazy.names(), lazy.formats()
    ({'round': 3}, ['w', 'b'], {'w': 'float32', 'b': 'float32'})
    >>> [(name, value.tolist()) for name, value in lazy.items()]
    [('w', [1.0, 1.0]), ('b', [0.0])]
    >>> lazy.float32_nbytes() == len(data)
    True
    """

    def __init__(
        self,
        meta: dict,
        nbytes: int,
        heads: list[tuple[str, int, memoryview]],
        expect: Mapping[str, Expected] | None = None,
    ) -> None:
        self.meta = meta
        self.nbytes = nbytes
        self._heads = {name: (kind, payload) for name, kind, payload in heads}
        self._expect = expect

    def __len__(self) -> int:
        return len(self._heads)

    def names(self) -> list[str]:
        """Entry names in wire order."""
        return list(self._heads)

    def formats(self) -> dict[str, str]:
        """Each entry's format name (a compressed one parsed if not expected)."""
        out = {}
        for name, (kind, _) in self._heads.items():
            if kind == FLOAT32:
                out[name] = "float32"
            elif self._expect is not None:
                out[name] = self._expect[name].format
            else:
                out[name] = self.entry(name).format.name
        return out

    def entry(self, name: str, workspace: Workspace | None = None) -> Entry:
        """Parse one entry (a new object each call).

        Arguments
        ---------
        name : str
        workspace : Workspace, optional
            Reused buffers for the values or codes, for a reader that drops each
            entry before the next (kept off malloc's heap).

        Returns
        -------
        CompressedTensor or torch.Tensor

        Raises
        ------
        ValueError
            A malformed payload, or a compressed entry not as expected.
        """
        kind, payload = self._heads[name]
        try:
            return _parse_entry(name, kind, payload, self._expect, workspace)
        except (ValueError, struct.error) as error:
            raise ValueError(f"malformed OMC wire message: {error}") from None

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Parse the entries one by one, yielding ``(name, entry)`` in wire order."""
        for name in self._heads:
            yield name, self.entry(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each entry's shape (from ``expect`` when given)."""
        out = {}
        for name, (kind, payload) in self._heads.items():
            if self._expect is not None:
                out[name] = tuple(self._expect[name].shape)
            elif kind == FLOAT32:
                out[name] = tuple(_float32_shape(payload))
            else:
                out[name] = tuple(self.entry(name).shape)
        return out

    def float32_nbytes(self) -> int:
        """Length of the same message with every entry sent as float32."""
        return encoded_nbytes(self.shapes(), self.meta)
