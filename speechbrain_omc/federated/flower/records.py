"""OMC wire messages inside Flower records.

A federated OMC message (:mod:`speechbrain_omc.federated.wire`) travels in a
Flower ``Message`` as one ``uint8`` NumPy array under :data:`PAYLOAD_KEY` of an
``ArrayRecord``: Flower moves it as opaque bytes, so no Flower strategy can
mistake compressed codes for numbers, and the bytes a client receives are
exactly the bytes the embedded simulation counts. Flower adds its own framing
around the payload (the ``.npy`` header of the array, record and message
metadata); :func:`record_nbytes` measures the records as Flower counts them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

__all__ = [
    "PAYLOAD_KEY",
    "model_to_record",
    "payload_from_record",
    "payload_to_record",
    "record_nbytes",
    "record_to_model",
]

#: Key of the ``uint8`` array that holds an OMC wire message.
PAYLOAD_KEY = "omc-wire"


def payload_to_record(data: bytes) -> ArrayRecord:
    """Wrap an OMC wire message as a one-array ``ArrayRecord``.

    Arguments
    ---------
    data : bytes
        The message (any bytes-like object).

    Returns
    -------
    ArrayRecord
        ``{PAYLOAD_KEY: uint8 array of len(data)}``.

    Example
    -------
    >>> record = payload_to_record(b"OMCW...")
    >>> record[PAYLOAD_KEY].dtype, record[PAYLOAD_KEY].shape
    ('uint8', (7,))
    """
    array = np.frombuffer(bytes(data), dtype=np.uint8)
    return ArrayRecord({PAYLOAD_KEY: Array(array)})


def payload_from_record(record: ArrayRecord) -> bytes:
    """The OMC wire message inside an ``ArrayRecord``, checked for shape.

    Arguments
    ---------
    record : ArrayRecord
        Built by :func:`payload_to_record` (here or on the other side).

    Returns
    -------
    bytes
        The message; its content is validated by whoever decodes it.

    Raises
    ------
    ValueError
        When the record does not hold exactly one 1-D ``uint8`` array under
        :data:`PAYLOAD_KEY`.

    Example
    -------
    >>> payload_from_record(payload_to_record(b"abc"))
    b'abc'
    >>> payload_from_record(ArrayRecord({"w": Array(np.zeros(2, np.float32))}))
    Traceback (most recent call last):
    ...
    ValueError: expected one uint8 array under 'omc-wire', got keys ['w']
    """
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"expected an ArrayRecord, got {type(record).__name__}")
    if list(record.keys()) != [PAYLOAD_KEY]:
        raise ValueError(
            f"expected one uint8 array under {PAYLOAD_KEY!r}, "
            f"got keys {sorted(record.keys())}"
        )
    array = record[PAYLOAD_KEY]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise ValueError(
            f"{PAYLOAD_KEY!r} must be a 1-D uint8 array, "
            f"got {array.dtype} of shape {tuple(array.shape)}"
        )
    values = array.numpy()
    if values.dtype != np.uint8 or values.ndim != 1:  # metadata lied
        raise ValueError(f"{PAYLOAD_KEY!r} does not hold a 1-D uint8 array")
    return values.tobytes()


def model_to_record(model: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A float32 model as an ``ArrayRecord`` (for Flower's ``Result``).

    Arguments
    ---------
    model : Mapping
        Name to tensor.

    Returns
    -------
    ArrayRecord

    Example
    -------
    >>> record = model_to_record({"b": torch.ones(2)})
    >>> record["b"].numpy().tolist()
    [1.0, 1.0]
    """
    return ArrayRecord(
        {
            name: Array(value.detach().to("cpu", torch.float32).numpy())
            for name, value in model.items()
        }
    )


def record_to_model(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of :func:`model_to_record`.

    Arguments
    ---------
    record : ArrayRecord

    Returns
    -------
    dict
        Name to float32 tensor.

    Example
    -------
    >>> record_to_model(model_to_record({"b": torch.ones(2)}))
    {'b': tensor([1., 1.])}
    """
    return {
        name: torch.from_numpy(np.array(array.numpy(), dtype=np.float32))
        for name, array in record.items()
    }


def record_nbytes(content: RecordDict) -> int:
    """Bytes of a message's records as Flower counts them.

    This is the payload plus Flower's framing (``.npy`` headers, record keys,
    config and metric values); Flower's own protobuf envelope comes on top.

    Arguments
    ---------
    content : RecordDict
        A message's content.

    Returns
    -------
    int

    Example
    -------
    >>> record_nbytes(RecordDict({"a": payload_to_record(b"xyz")}))  # npy header
    139
    """
    return sum(record.count_bytes() for record in content.values())
