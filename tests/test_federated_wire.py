"""Wire format of federated OMC: round trips, exact sizes, strict rejection."""

import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.federated import wire


def _entries():
    gen = torch.Generator().manual_seed(0)
    return {
        "enc.layers.0.w.weight": CompressedTensor.compress(
            torch.randn(12, 10, generator=gen), "e3m7"
        ),
        "enc.layers.0.w.bias": torch.randn(12, generator=gen),
        "ctc.weight": CompressedTensor.compress(
            torch.randn(3, 4, 5, generator=gen), "bf16", transform="affine"
        ),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "näme/ünicode": torch.ones(2, 2, dtype=torch.float64),
    }


META = {"type": "update", "round": 3, "client": "client_001", "metrics": {"x": 1.5}}


def _recrc(data: bytes) -> bytes:
    """Patch the trailing CRC32 so that only the deeper checks can object."""
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _entry_offsets(data: bytes) -> list[dict]:
    """Where each entry's fields sit in a message (test helper)."""
    pos = 14
    (meta_len,) = struct.unpack_from("<I", data, pos)
    pos += 4 + meta_len
    (count,) = struct.unpack_from("<I", data, pos)
    pos += 4
    out = []
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", data, pos)
        entry = {"name_len": pos, "name": pos + 2}
        pos += 2 + name_len
        entry["kind"] = pos
        entry["length"] = pos + 1
        (length,) = struct.unpack_from("<Q", data, pos + 1)
        entry["payload"] = pos + 9
        pos += 9 + length
        entry["end"] = pos
        out.append(entry)
    return out


def test_round_trip_values_formats_and_meta():
    entries = _entries()
    data = wire.encode(entries, META)
    message = wire.decode(data)
    assert list(message.entries) == list(entries)
    assert message.meta == META
    assert message.nbytes == len(data)
    assert message.formats() == {
        "enc.layers.0.w.weight": "e3m7",
        "enc.layers.0.w.bias": "float32",
        "ctc.weight": "e8m7",
        "scalar": "float32",
        "empty": "float32",
        "näme/ünicode": "float32",
    }
    for name, value in entries.items():
        got = message.entries[name]
        if isinstance(value, CompressedTensor):
            assert got.to_bytes() == value.to_bytes()
        else:
            assert got.dtype == torch.float32
            assert torch.equal(got, value.float())
    # Encoding the decoded message again gives the same bytes.
    assert message.to_bytes() == data
    assert torch.equal(
        message.decompressed()["ctc.weight"], entries["ctc.weight"].decompress()
    )


def test_numpy_entries_and_empty_message():
    data = wire.encode({"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    assert wire.decode(data).entries["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    empty = wire.decode(wire.encode({}, None))
    assert empty.entries == {} and empty.meta == {}


def test_sizes_are_exact():
    entries = _entries()
    data = wire.encode(entries, META)
    assert wire.encoded_nbytes(entries, META) == len(data)
    assert sum(wire.entry_nbytes(n, v) for n, v in entries.items()) + (
        14 + 4 + len(json.dumps(META, sort_keys=True, separators=(",", ":"))) + 4 + 4
    ) == len(data)
    float32 = {
        n: v.decompress() if isinstance(v, CompressedTensor) else v
        for n, v in entries.items()
    }
    assert wire.decode(data).float32_nbytes() == len(wire.encode(float32, META))


def test_encode_refuses_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        wire.encode({"": torch.zeros(1)})
    with pytest.raises(TypeError, match="floating point"):
        wire.encode({"a": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(TypeError, match="CompressedTensor or a float"):
        wire.encode({"a": [1.0, 2.0]})
    with pytest.raises(ValueError, match="JSON"):
        wire.encode({}, {"loss": float("nan")})
    with pytest.raises(TypeError, match="mapping"):
        wire.encode({}, ["not", "a", "dict"])


@pytest.fixture(scope="module")
def good():
    return wire.encode(_entries(), META)


@pytest.mark.parametrize("cut", [0, 3, 4, 13, 20, 100, -5, -1])
def test_truncated(good, cut):
    with pytest.raises(ValueError, match="truncated|not an OMC"):
        wire.decode(good[:cut])


def test_every_truncation_is_rejected(good):
    for cut in range(0, len(good), 7):
        with pytest.raises(ValueError):
            wire.decode(good[:cut])


def test_trailing_bytes(good):
    with pytest.raises(ValueError, match="trailing"):
        wire.decode(good + b"\0")


def test_foreign(good):
    with pytest.raises(ValueError, match="not an OMC wire message"):
        wire.decode(b"OMCT" + good[4:])
    with pytest.raises(ValueError, match="not an OMC wire message"):
        wire.decode(b"")
    with pytest.raises(TypeError):
        wire.decode("OMCW text")


def test_wrong_version(good):
    newer = good[:4] + struct.pack("<H", wire.WIRE_VERSION + 1) + good[6:]
    with pytest.raises(ValueError, match="unsupported OMC wire message version"):
        wire.decode(_recrc(newer))


def test_corrupted_byte(good):
    for pos in (20, len(good) // 2, len(good) - 5):
        bad = bytearray(good)
        bad[pos] ^= 0x40
        with pytest.raises(ValueError, match="CRC32"):
            wire.decode(bytes(bad))


def test_duplicate_names():
    data = wire.encode({"aa": torch.zeros(2), "ab": torch.ones(2)})
    second = _entry_offsets(data)[1]["name"]
    bad = bytearray(data)
    bad[second : second + 2] = b"aa"
    with pytest.raises(ValueError, match="duplicate entry 'aa'"):
        wire.decode(_recrc(bytes(bad)))


def test_bad_names():
    data = wire.encode({"ab": torch.zeros(2)})
    offsets = _entry_offsets(data)[0]
    bad = bytearray(data)
    bad[offsets["name"]] = 0xFF
    with pytest.raises(ValueError, match="not UTF-8"):
        wire.decode(_recrc(bytes(bad)))


def test_unknown_entry_kind(good):
    kind = _entry_offsets(good)[1]["kind"]
    bad = bytearray(good)
    bad[kind] = 7
    with pytest.raises(ValueError, match="unknown entry kind 7"):
        wire.decode(_recrc(bytes(bad)))


def test_entry_length_past_end(good):
    length = _entry_offsets(good)[-1]["length"]
    bad = bytearray(good)
    bad[length : length + 8] = struct.pack("<Q", 10**9)
    with pytest.raises(ValueError, match="runs past the end"):
        wire.decode(_recrc(bytes(bad)))


def test_float32_payload_inconsistent():
    data = wire.encode({"a": torch.zeros(2, 3)})
    payload = _entry_offsets(data)[0]["payload"]
    bad = bytearray(data)
    bad[payload + 1 : payload + 9] = struct.pack("<Q", 4)  # shape (4, 3): 12 values
    with pytest.raises(ValueError, match="float32 payload of shape"):
        wire.decode(_recrc(bytes(bad)))


def test_corrupted_compressed_payload(good):
    entry = _entry_offsets(good)[0]
    bad = bytearray(good)
    bad[entry["payload"] + 30] ^= 0x01  # inside the codes: the inner CRC objects
    with pytest.raises(ValueError, match="enc.layers.0.w.weight.*CRC32"):
        wire.decode(_recrc(bytes(bad)))


def test_unexplained_bytes_after_entries():
    data = wire.encode({"a": torch.zeros(2)})
    count = 14 + 4 + 2  # after the prefix, meta length and "{}"
    bad = bytearray(data)
    bad[count : count + 4] = struct.pack("<I", 0)
    with pytest.raises(ValueError, match="unexplained bytes"):
        wire.decode(_recrc(bytes(bad)))


@pytest.mark.parametrize(
    "meta, match",
    [(b"[1, 2]", "not a JSON object"), (b'{"a": NaN}', "NaN"), (b"{\xff}", "metadata")],
)
def test_bad_metadata(meta, match):
    data = wire.encode({}, {"k": "vv"})  # metadata b'{"k":"vv"}', 10 bytes
    bad = data[:14] + struct.pack("<I", len(meta)) + meta + data[28:]
    bad = bad[:6] + struct.pack("<Q", len(bad)) + bad[14:]
    with pytest.raises(ValueError, match=match):
        wire.decode(_recrc(bad))


def _message_with_meta(meta: bytes) -> bytes:
    """A message of no entries and any metadata bytes (valid CRC)."""
    body = struct.pack("<I", len(meta)) + meta + struct.pack("<I", 0)
    head = struct.pack("<4sHQ", wire.MAGIC, wire.WIRE_VERSION, 14 + len(body) + 4)
    return head + body + struct.pack("<I", zlib.crc32(head + body))


def _adversarial_meta(nbytes: int, shape: str) -> bytes:
    # Every escaped quote starts a new candidate string literal: a scan that
    # restarts at each quote is quadratic in the metadata's length.
    head, pairs = b'{"a":"', (nbytes - 8) // 2
    if shape == "unterminated":
        return head + b'\\"' * pairs
    if shape == "unterminated, lone backslash":
        return head + b'\\"' * pairs + b"\\"
    return head + b'\\"' * pairs + b'"}'  # a valid (closed) string


def _decode_seconds(data: bytes) -> float:
    best = float("inf")
    for _ in range(3):  # the fastest of three: the machine may be busy
        start = time.perf_counter()
        try:
            wire.decode(data)
        except ValueError:
            pass
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize(
    "shape", ["unterminated", "unterminated, lone backslash", "closed"]
)
def test_metadata_scan_is_linear(shape):
    """64 KiB of escaped quotes is decided in milliseconds (was 8.5 s)."""
    small = _message_with_meta(_adversarial_meta(16 * 1024, shape))
    large = _message_with_meta(_adversarial_meta(wire.MAX_META_BYTES, shape))
    if shape == "closed":
        assert wire.decode(large).meta["a"] == '"' * ((wire.MAX_META_BYTES - 8) // 2)
    else:
        with pytest.raises(ValueError, match="Unterminated string"):
            wire.decode(large)
    small_s, large_s = _decode_seconds(small), _decode_seconds(large)
    # Quadratic would be 16x for 4x the bytes (and seconds in absolute terms);
    # linear is 4x. The constant absorbs timer noise at millisecond scale.
    assert large_s < 8 * small_s + 0.05, (small_s, large_s)
    assert large_s < 0.5, large_s
