"""OMC wire messages inside Flower records.

A wire message travels as one ``uint8`` array under :data:`PAYLOAD_KEY` of
an ``ArrayRecord``: Flower moves opaque bytes, so no Flower strategy can
mistake compressed codes for numbers, and a client receives exactly the
bytes the embedded simulation counts.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

__all__ = ["PAYLOAD_KEY", "payload_from_record", "payload_to_record"]

#: Key of the ``uint8`` array that holds an OMC wire message.
PAYLOAD_KEY = "omc-wire"
# Most bytes of a .npy header we parse (NumPy writes about 128).
_NPY_HEADER_MAX = 4096


def payload_to_record(data: bytes) -> ArrayRecord:
    """Wrap an OMC wire message (any bytes-like) as a one-array ``ArrayRecord``.

    Arguments
    ---------
    data : bytes

    Returns
    -------
    ArrayRecord

    Example
    -------
    >>> record = payload_to_record(b"OMCW...")
    >>> record[PAYLOAD_KEY].dtype, record[PAYLOAD_KEY].shape
    ('uint8', (7,))
    """
    array = np.frombuffer(bytes(data), dtype=np.uint8)
    return ArrayRecord({PAYLOAD_KEY: Array(array)})


def payload_from_record(
    content: RecordDict | ArrayRecord, key: str = "arrays"
) -> memoryview:
    """The OMC wire message inside a message's content, as a read-only view.

    Arguments
    ---------
    content : RecordDict or ArrayRecord
    key : str
        Where the ``ArrayRecord`` is in ``content``.

    Returns
    -------
    memoryview
        Not yet validated, not copied.

    Example
    -------
    >>> bytes(payload_from_record(payload_to_record(b"abc")))
    b'abc'
    >>> payload_from_record(ArrayRecord({"w": Array(np.zeros(2, np.float32))}))
    Traceback (most recent call last):
    ...
    ValueError: expected one uint8 array under 'omc-wire', got keys ['w']
    """
    record = content
    if isinstance(content, RecordDict):
        if key not in content.array_records:
            raise ValueError(f"no ArrayRecord under {key!r}")
        record = content[key]
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"expected an ArrayRecord, got {type(record).__name__}")
    if list(record.keys()) != [PAYLOAD_KEY]:
        raise ValueError(
            f"expected one uint8 array under {PAYLOAD_KEY!r}, "
            f"got keys {sorted(record.keys())[:5]}"
        )
    array = record[PAYLOAD_KEY]
    data = getattr(array, "data", None)
    if (
        not isinstance(array, Array)
        or array.stype != "numpy.ndarray"
        or array.dtype != "uint8"
        or len(array.shape) != 1
        or not isinstance(data, bytes)
    ):
        raise ValueError(f"{PAYLOAD_KEY!r} must be a 1-D uint8 NumPy array")
    # Parse the .npy header ourselves and view the values in place:
    # Array.numpy() would copy the whole payload.
    stream = io.BytesIO(data)  # shares the bytes until written to
    try:
        version = np.lib.format.read_magic(stream)
        reader = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }[version]
        shape, _, dtype = reader(stream, max_header_size=_NPY_HEADER_MAX)
    except (ValueError, KeyError, SyntaxError, TypeError) as error:
        raise ValueError(f"{PAYLOAD_KEY!r} is not a .npy array: {error}") from None
    view = memoryview(data)[stream.tell() :]
    if (
        dtype != np.uint8
        or len(shape) != 1
        or shape[0] != len(view)
        or tuple(array.shape) != tuple(shape)
    ):
        raise ValueError(f"{PAYLOAD_KEY!r} does not hold the 1-D uint8 array it says")
    return view
