"""Property tests of CompressedTensor (speechbrain_omc.codec.compressed)."""

import copy
import io
import math
import pickle
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechbrain_omc.codec import formats as formats_module
from speechbrain_omc.codec.compressed import SERIAL_VERSION, CompressedTensor
from speechbrain_omc.codec.formats import FloatFormat, IntFormat, get_format
from speechbrain_omc.codec.memory import Workspace
from speechbrain_omc.codec.packing import unpack_bits
from speechbrain_omc.codec.transform import Transform

SETTINGS = settings(max_examples=100, deadline=None)

KINDS = ["none", "scale", "affine"]


def formats():
    floats = st.integers(1, 8).flatmap(
        lambda e: st.integers(max(0, 1 - e), 15 - e).map(lambda m: FloatFormat(e, m))
    )
    ints = st.integers(2, 16).map(IntFormat)
    natives = st.sampled_from(["e8m7", "int8", "e5m10", "e4m3", "e3m7", "e4m7"])
    return st.one_of(floats, ints, natives.map(get_format))


@st.composite
def tensors(draw, max_numel=200):
    shape = draw(st.lists(st.integers(0, 7), min_size=0, max_size=3))
    numel = math.prod(shape)
    if numel > max_numel:
        shape, numel = [numel % max_numel], numel % max_numel
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    values = draw(st.lists(st.floats(-1, 1, width=32), min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.float32).reshape(shape) * magnitude


def spacing(fmt, y):
    """Gap between neighbouring format values around |y| (float64)."""
    ay = y.double().abs()
    if isinstance(fmt, IntFormat):
        return torch.ones_like(ay)
    _, exp = torch.frexp(ay)
    gap = torch.pow(2.0, (exp - 1 - fmt.mantissa_bits).double())
    return torch.where(ay < fmt.min_normal, torch.full_like(ay, fmt.min_subnormal), gap)


# ------------------------------------------------------------- semantics
@SETTINGS
@given(x=tensors(), fmt=formats(), kind=st.sampled_from(KINDS))
def test_nbytes_is_exact(x, fmt, kind):
    ct = CompressedTensor.compress(x, fmt, kind)
    extra = {"none": 0, "scale": 4, "affine": 8}[kind]
    assert ct.packed.dtype == torch.uint8
    assert ct.nbytes == ct.packed.numel() + extra
    assert ct.nbytes == -(-x.numel() * fmt.bits // 8) + extra
    assert ct.shape == x.shape and ct.numel() == x.numel()
    assert ct.format == fmt and ct.bits == fmt.bits


@SETTINGS
@given(x=tensors(), fmt=formats(), kind=st.sampled_from(KINDS))
def test_decompress_is_inverse_of_dequantized_codes(x, fmt, kind):
    # Every decode path (native bf16, int8, generic unpack) folds the transform
    # into decoding; the bits must equal the step-by-step reference.
    ct = CompressedTensor.compress(x, fmt, kind)
    t = ct.transform
    codes = fmt.quantize(t.forward(x))
    assert torch.equal(unpack_bits(ct.packed, fmt.bits, x.numel()), codes.reshape(-1))
    expected = t.inverse(fmt.dequantize(codes))
    out = ct.decompress()
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, expected)


@SETTINGS
@given(x=tensors(), fmt=formats(), kind=st.sampled_from(KINDS))
def test_roundtrip_error_at_most_half_ulp(x, fmt, kind):
    ct = CompressedTensor.compress(x, fmt, kind)
    t = ct.transform
    y = t.forward(x)
    inside = y.abs() <= fmt.max_value  # "none" may saturate
    err = (ct.decompress().double() - x.double()).abs()
    bound = spacing(fmt, y) / 2 * t.scale
    # Slack for the float32 rounding of the transform itself.
    slack = 4e-7 * (x.double().abs() + abs(t.shift)) + 1e-45
    assert (err[inside] <= bound[inside] + slack[inside]).all()


@pytest.mark.parametrize(
    "name", ["e8m7", "e5m10", "e4m3", "e3m7", "e4m7", "e2m3", "e1m0", "int8", "int5"]
)
def test_chunked_pipelines_match_reference(name, monkeypatch):
    # Tiny chunks: every decode path runs over many chunks and a partial one.
    monkeypatch.setattr(formats_module, "CHUNK", 40)
    monkeypatch.setattr(formats_module, "DECODE_CHUNK", 56)
    x = torch.randn(1003, generator=torch.Generator().manual_seed(2)) * 3
    for kind in KINDS:
        ct = CompressedTensor.compress(x, name, kind)
        fmt, t = ct.format, ct.transform
        codes = fmt.quantize(t.forward(x))
        assert torch.equal(unpack_bits(ct.packed, fmt.bits, x.numel()), codes)
        assert torch.equal(ct.decompress(), t.inverse(fmt.dequantize(codes)))
        g1, g2 = (torch.Generator().manual_seed(4) for _ in range(2))
        a = CompressedTensor.compress(x, name, kind, "stochastic", g1)
        b = CompressedTensor.compress(x, name, kind, "stochastic", g2)
        assert torch.equal(a.packed, b.packed)


@pytest.mark.parametrize("name", ["e8m7", "e5m10", "e4m3", "e5m2"])
def test_native_formats_without_transform_equal_native_casts(name):
    dtype = {
        "e8m7": torch.bfloat16,
        "e5m10": torch.float16,
        "e4m3": torch.float8_e4m3fn,
        "e5m2": torch.float8_e5m2,
    }[name]
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 10
    ct = CompressedTensor.compress(x, name, "none")
    assert torch.equal(ct.decompress(), x.to(dtype).float())


def test_stochastic_compress_is_reproducible_and_unbiased():
    x = torch.full((20000,), 0.3)
    a = CompressedTensor.compress(
        x, "e4m3", "none", "stochastic", torch.Generator().manual_seed(5)
    )
    b = CompressedTensor.compress(
        x, "e4m3", "none", "stochastic", torch.Generator().manual_seed(5)
    )
    assert torch.equal(a.packed, b.packed)
    mean = a.decompress().double().mean().item()
    assert abs(mean - float(x[0])) < 5 * (0.3125 - 0.28125) / math.sqrt(20000)


def test_mse_clip_and_fixed_transform():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    x[0] = 30.0
    ct = CompressedTensor.compress(x, "int4", "scale", clip="mse")
    assert ct.clip == "mse"
    assert ct.transform.scale < 30.0 / 7
    fixed = Transform("scale", 0.25)
    ct = CompressedTensor.compress(x, "e4m3", fixed)
    assert ct.transform is fixed


def test_shapes_and_dtypes():
    ct = CompressedTensor.compress(torch.tensor(2.5), "e4m3")
    assert ct.shape == () and ct.decompress().shape == ()
    empty = CompressedTensor.compress(torch.empty(0, 4), "e3m7")
    assert empty.nbytes == 4 and empty.decompress().shape == (0, 4)
    x = torch.randn(3, 4).double()
    ct = CompressedTensor.compress(x, "bf16", "none")
    assert ct.decompress(torch.float64).dtype == torch.float64
    assert ct.decompress(torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError):
        ct.decompress(torch.int32)


def test_tensors_that_require_grad_are_compressed_by_value():
    w = torch.randn(8, 8, requires_grad=True)
    for name in ("e4m3", "e3m7", "int8"):
        for rounding in ("nearest", "stochastic"):
            ct = CompressedTensor.compress(w, name, "affine", rounding)
            assert not ct.decompress().requires_grad
            ct.assign_(w * 2, rounding)


def test_holds_only_packed_buffer_transform_and_metadata():
    ct = CompressedTensor.compress(torch.randn(64, 64), "e3m7")
    assert not hasattr(ct, "__dict__")
    tensors = [
        getattr(ct, slot)
        for slot in CompressedTensor.__slots__
        if isinstance(getattr(ct, slot), torch.Tensor)
    ]
    assert len(tensors) == 1 and tensors[0] is ct.packed
    assert "e3m7" in repr(ct) and str(ct.nbytes) in repr(ct)


# --------------------------------------------------------------- assign_
@SETTINGS
@given(x=tensors(), fmt=formats(), kind=st.sampled_from(KINDS), data=st.data())
def test_assign_equals_fresh_compress(x, fmt, kind, data):
    ct = CompressedTensor.compress(torch.zeros_like(x), fmt, kind)
    buffer = ct.packed
    new = x * data.draw(st.sampled_from([0.5, 2.0, -1.0]))
    assert ct.assign_(new) is ct
    assert ct.packed is buffer  # re-quantised in place
    fresh = CompressedTensor.compress(new, fmt, kind)
    assert ct.transform == fresh.transform  # refitted
    assert torch.equal(ct.packed, fresh.packed)


def test_assign_stochastic_reproducible():
    x = torch.randn(500, generator=torch.Generator().manual_seed(1))
    outs = []
    for _ in range(2):
        ct = CompressedTensor.compress(x, "e3m7")
        ct.assign_(x * 1.001, "stochastic", torch.Generator().manual_seed(9))
        outs.append(ct.packed.clone())
    assert torch.equal(outs[0], outs[1])


def test_assign_errors():
    ct = CompressedTensor.compress(torch.ones(4), "e4m3")
    with pytest.raises(ValueError, match="shape"):
        ct.assign_(torch.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        ct.assign_(torch.tensor([1.0, math.inf, 0.0, 0.0]))
    with pytest.raises(TypeError):
        ct.assign_(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError):
        ct.assign_(torch.ones(4), rounding="down")


# ---------------------------------------------------------- serialisation
@SETTINGS
@given(x=tensors(), fmt=formats(), kind=st.sampled_from(KINDS))
def test_bytes_roundtrip(x, fmt, kind):
    ct = CompressedTensor.compress(x, fmt, kind, clip="mse")
    data = ct.to_bytes()
    back = CompressedTensor.from_bytes(data)
    assert back.format == ct.format and back.shape == ct.shape
    assert back.transform == ct.transform and back.clip == "mse"
    assert back.nbytes == ct.nbytes
    assert torch.equal(back.packed, ct.packed)
    assert torch.equal(back.decompress(), ct.decompress())
    assert CompressedTensor.from_bytes(bytearray(data)).nbytes == ct.nbytes
    assert CompressedTensor.from_bytes(memoryview(data)).nbytes == ct.nbytes


def test_bytes_into_a_workspace():
    """The codes copied into a reused buffer: the same tensor, and the
    buffer serves again once the tensor is gone."""
    ct = CompressedTensor.compress(torch.randn(300, 400), "e3m7")
    data = ct.to_bytes()
    ws = Workspace()
    back = CompressedTensor.from_bytes(memoryview(data), workspace=ws)
    assert torch.equal(back.packed, ct.packed)
    assert torch.equal(back.decompress(), ct.decompress())
    ptr = back.packed.data_ptr()
    assert ws.nbytes == ct.packed.numel()  # the codes, in a mapping of their own
    del back
    assert CompressedTensor.from_bytes(data, workspace=ws).packed.data_ptr() == ptr


@pytest.fixture(scope="module")
def payload():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    return CompressedTensor.compress(x, "e3m7", "affine").to_bytes()


def test_every_truncation_is_rejected(payload):
    for length in range(len(payload)):
        with pytest.raises(ValueError):
            CompressedTensor.from_bytes(payload[:length])
    with pytest.raises(ValueError, match="truncated"):
        CompressedTensor.from_bytes(payload[:-7])
    with pytest.raises(ValueError, match="trailing"):
        CompressedTensor.from_bytes(payload + b"\0")


def test_every_single_bit_flip_is_rejected(payload):
    for pos in range(len(payload)):
        for bit in (0, 3, 7):
            data = bytearray(payload)
            data[pos] ^= 1 << bit
            with pytest.raises(ValueError):
                CompressedTensor.from_bytes(bytes(data))


@SETTINGS
@given(data=st.data())
def test_random_corruptions_are_rejected(payload, data):
    corrupt = bytearray(payload)
    positions = data.draw(
        st.lists(st.integers(0, len(payload) - 1), min_size=1, max_size=4, unique=True)
    )
    for pos in positions:
        corrupt[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ValueError):
        CompressedTensor.from_bytes(bytes(corrupt))


def _reseal(body: bytes) -> bytes:
    """Recompute the CRC of a payload whose body was edited on purpose."""
    return body + struct.pack("<I", zlib.crc32(body))


def test_wrong_version_is_rejected(payload):
    for version in (0, SERIAL_VERSION + 1, 65535):
        body = bytearray(payload[:-4])
        body[4:6] = struct.pack("<H", version)
        with pytest.raises(ValueError, match=f"unsupported.*version {version}"):
            CompressedTensor.from_bytes(_reseal(bytes(body)))


def test_crc_mismatch_message(payload):
    data = bytearray(payload)
    data[20] ^= 0x10
    with pytest.raises(ValueError, match="CRC32"):
        CompressedTensor.from_bytes(bytes(data))


def test_malformed_but_sealed_payloads_are_rejected(payload):
    body = bytearray(payload[:-4])
    body[14] = 7  # unknown format kind
    with pytest.raises(ValueError, match="malformed"):
        CompressedTensor.from_bytes(_reseal(bytes(body)))
    body = bytearray(payload[:-4])
    body[15] = 12  # exponent bits 12
    with pytest.raises(ValueError, match="malformed"):
        CompressedTensor.from_bytes(_reseal(bytes(body)))
    body = bytearray(payload[:-4])
    body[19] = 1  # ndim 2 -> 1: shape and code bytes disagree
    with pytest.raises(ValueError, match="malformed"):
        CompressedTensor.from_bytes(_reseal(bytes(body)))


def test_foreign_payloads_are_rejected():
    buf = io.BytesIO()
    torch.save(torch.ones(3), buf)
    foreign = [
        b"",
        b"OMC",
        b"hello world, this is not a tensor",
        pickle.dumps({"a": 1}),
        buf.getvalue(),
        bytes(range(256)),
    ]
    for data in foreign:
        with pytest.raises(ValueError, match="magic|truncated"):
            CompressedTensor.from_bytes(data)
    with pytest.raises(TypeError):
        CompressedTensor.from_bytes("OMCT")


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"x": torch.tensor([1.0, math.nan])}, ValueError),
        ({"x": torch.arange(3)}, TypeError),
        ({"x": torch.ones(2, dtype=torch.bool)}, TypeError),
        ({"fmt": "float32"}, ValueError),
        ({"fmt": "e4m12"}, ValueError),
        ({"transform": "log"}, ValueError),
        ({"rounding": "up"}, ValueError),
        ({"clip": "p99"}, ValueError),
    ],
)
def test_bad_compress_arguments(kwargs, error):
    args = {"x": torch.ones(3), "fmt": "e4m3", **kwargs}
    with pytest.raises(error):
        CompressedTensor.compress(**args)


def test_constructor_checks():
    packed = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 2"):
        CompressedTensor(packed, "e4m3", (2,), Transform())
    with pytest.raises(TypeError):
        CompressedTensor(packed.int(), "e4m3", (3,), Transform())
    with pytest.raises(TypeError):
        CompressedTensor(packed, "e4m3", (3,), "scale")
    ct = CompressedTensor(packed, "e4m3", (3,), Transform())
    assert ct.decompress().tolist() == [0.0, 0.0, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "name",
    ["e8m7", "e5m10", "e4m3", "e5m2", "e3m7", "e4m7", "e2m3", "int8", "int5", "fp32"],
)
def test_cuda_matches_cpu_bit_for_bit(name):
    x = torch.randn(100_003, generator=torch.Generator().manual_seed(6)) * 2
    x[:5] = torch.tensor([0.0, -0.0, 1e-30, -3e-39, 1e-44])
    for kind in KINDS:
        cpu = CompressedTensor.compress(x, name, kind)
        gpu = CompressedTensor.compress(x.cuda(), name, kind)
        assert gpu.packed.is_cuda and gpu.transform == cpu.transform
        assert torch.equal(gpu.packed.cpu(), cpu.packed)
        assert torch.equal(gpu.decompress().cpu(), cpu.decompress())
        gpu.assign_(x.cuda() * 0.5)
        cpu.assign_(x * 0.5)
        assert torch.equal(gpu.packed.cpu(), cpu.packed)
    runs = []
    for _ in range(2):
        g = torch.Generator(device="cuda").manual_seed(11)
        ct = CompressedTensor.compress(x.cuda(), name, "scale", "stochastic", g)
        runs.append(ct.packed.cpu())
    assert torch.equal(runs[0], runs[1])
    back = CompressedTensor.from_bytes(ct.to_bytes(), device="cuda")
    assert torch.equal(back.decompress(), ct.decompress())


def test_a_copy_decodes_its_own_buffer_after_the_original_is_rewritten():
    # Decoding prepares the kernel's arguments (the buffer's pointer) once per
    # transform; a deepcopy keeps the transform's identity, not the buffer.
    original = CompressedTensor.compress(torch.randn(70_000), "e3m7", "none")
    before = original.decompress(out=torch.empty(70_000)).clone()
    copied = copy.deepcopy(original)
    original.assign_(torch.ones(70_000))
    assert torch.equal(copied.decompress(out=torch.empty(70_000)), before)
    assert torch.equal(original.decompress(out=torch.empty(70_000)), torch.ones(70_000))
