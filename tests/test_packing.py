"""Property tests of bit packing (speechbrain_omc.codec.packing)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechbrain_omc.codec import packing
from speechbrain_omc.codec.packing import pack_bits, packed_nbytes, unpack_bits

SETTINGS = settings(max_examples=200, deadline=None)


def reference_pack(codes, bits):
    """Bit-by-bit packer: value i at stream bits [i*b, (i+1)*b), LSB first."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for k in range(bits):
            if (code >> k) & 1:
                pos = i * bits + k
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


@st.composite
def codes_and_bits(draw, max_size=300):
    bits = draw(st.integers(1, 16))
    codes = draw(st.lists(st.integers(0, 2**bits - 1), max_size=max_size))
    return codes, bits


@SETTINGS
@given(codes_and_bits())
def test_matches_reference_and_roundtrips(case):
    codes, bits = case
    packed = pack_bits(torch.tensor(codes, dtype=torch.int64), bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert (
        packed.numel() == packed_nbytes(len(codes), bits) == -(-len(codes) * bits // 8)
    )
    assert packed.numpy().tobytes() == reference_pack(codes, bits)
    unpacked = unpack_bits(packed, bits, len(codes))
    assert unpacked.dtype == torch.int32
    assert unpacked.tolist() == codes


@pytest.mark.parametrize("bits", range(1, 17))
def test_every_width_and_every_short_length(bits):
    # Lengths 0..40 cover every partial last byte and partial group.
    gen = torch.Generator().manual_seed(bits)
    for n in range(41):
        codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.int32)
        packed = pack_bits(codes, bits)
        assert packed.numpy().tobytes() == reference_pack(codes.tolist(), bits)
        assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 17))
def test_large_tensors_across_work_chunks(bits, monkeypatch):
    # Shrink the work sizes so that many steps and a partial tail run.
    monkeypatch.setattr(packing, "_PACK_ROWS", 7)
    monkeypatch.setattr(packing, "_UNPACK_VALUES", 96)
    gen = torch.Generator().manual_seed(100 + bits)
    n = 5000 + bits
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.int32)
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    # The all-ones pattern catches sign-smear bugs of arithmetic shifts.
    ones = torch.full((n,), 2**bits - 1, dtype=torch.int32)
    assert torch.equal(unpack_bits(pack_bits(ones, bits), bits, n), ones)
    packed_ones = pack_bits(ones, bits)
    full, rest = divmod(n * bits, 8)
    assert (packed_ones[:full] == 255).all()
    if rest:
        assert int(packed_ones[-1]) == 2**rest - 1  # padding bits are zero


def test_shapes_and_dtypes_of_codes():
    codes = torch.arange(24).reshape(2, 3, 4)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        packed = pack_bits(codes.to(dtype), 5)
        assert torch.equal(unpack_bits(packed, 5, 24), codes.reshape(-1).int())


def test_out_buffers():
    codes = torch.arange(100, dtype=torch.int32) % 8
    out = torch.empty(packed_nbytes(100, 3), dtype=torch.uint8)
    assert pack_bits(codes, 3, out=out) is out
    res = torch.empty(100, dtype=torch.int32)
    assert unpack_bits(out, 3, 100, out=res) is res
    assert torch.equal(res, codes)
    with pytest.raises(ValueError):
        pack_bits(codes, 3, out=torch.empty(5, dtype=torch.uint8))
    with pytest.raises(ValueError):
        unpack_bits(out, 3, 100, out=torch.empty(100, dtype=torch.int64))


def test_misaligned_packed_views():
    # A packed buffer that starts at an odd offset of a larger buffer.
    for bits in (3, 11, 16):
        codes = torch.randint(0, 2**bits, (77,), dtype=torch.int32)
        packed = pack_bits(codes, bits)
        big = torch.zeros(packed.numel() + 1, dtype=torch.uint8)
        big[1:] = packed
        assert torch.equal(unpack_bits(big[1:], bits, 77), codes)


@pytest.mark.parametrize("bits", [0, 17, -1, 2.0, True])
def test_bad_widths(bits):
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(3, dtype=torch.int32), bits)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), bits, 3)


def test_out_of_range_codes():
    with pytest.raises(ValueError, match="outside"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="outside"):
        pack_bits(torch.tensor([-1, 2]), 3)


def test_wrong_types_and_lengths():
    with pytest.raises(TypeError):
        pack_bits(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(TypeError):
        pack_bits([1, 2], 3)
    with pytest.raises(TypeError):
        unpack_bits(torch.zeros(2, dtype=torch.int32), 8, 2)
    with pytest.raises(ValueError, match="exactly 2"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="exactly 2"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, -1)
    assert unpack_bits(torch.empty(0, dtype=torch.uint8), 7, 0).numel() == 0
    assert pack_bits(torch.empty(0, dtype=torch.int32), 7).numel() == 0
