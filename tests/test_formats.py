"""Property tests of the number formats (speechbrain_omc.codec.formats)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechbrain_omc.codec.formats import (
    FORMAT_PRESETS,
    FloatFormat,
    IntFormat,
    get_format,
)

SETTINGS = settings(max_examples=100, deadline=None)
NATIVE_SETTINGS = settings(max_examples=150, deadline=None)

# (format name, native dtype, native largest finite value)
NATIVE = [
    ("e5m10", torch.float16, 65504.0),
    ("e8m7", torch.bfloat16, float(torch.finfo(torch.bfloat16).max)),
    ("e4m3", torch.float8_e4m3fn, 448.0),
    ("e5m2", torch.float8_e5m2, 57344.0),
]


def native_codes(x, dtype, bits):
    """Bits of the native cast, as unsigned codes."""
    view = torch.int16 if bits == 16 else torch.int8
    return x.to(dtype).view(view).to(torch.int32) & ((1 << bits) - 1)


def native_values(codes, dtype, bits):
    view = torch.int16 if bits == 16 else torch.uint8
    return codes.to(view).view(dtype).to(torch.float32)


def all_magnitude_values(fmt):
    """Every non-negative value of a float format, ascending (float64)."""
    mags = torch.arange(2 ** (fmt.bits - 1), dtype=torch.int32)
    vals = fmt.dequantize(mags).double()
    if fmt.exponent_bits == 8:  # exponent field 255 is unused
        vals = vals[: 255 << fmt.mantissa_bits]
    return vals


def float_formats():
    """Strategy: any valid FloatFormat."""
    return st.integers(1, 8).flatmap(
        lambda e: st.integers(max(0, 1 - e), 15 - e).map(lambda m: FloatFormat(e, m))
    )


def spacing(fmt, x):
    """Gap between consecutive format values in the binade of |x| (float64)."""
    ax = x.double().abs()
    _, exp = torch.frexp(ax)  # ax = mant * 2**exp with mant in [0.5, 1)
    gap = torch.pow(2.0, (exp - 1 - fmt.mantissa_bits).double())
    return torch.where(ax < fmt.min_normal, torch.full_like(ax, fmt.min_subnormal), gap)


# --------------------------------------------------------------- native bits
@pytest.mark.parametrize("name,dtype,top", NATIVE)
class TestNativeEquality:
    def test_every_code_decodes_like_native(self, name, dtype, top):
        fmt = get_format(name)
        codes = torch.arange(2**fmt.bits, dtype=torch.int32)
        ours = fmt.dequantize(codes)
        theirs = native_values(codes, dtype, fmt.bits)
        finite = torch.isfinite(theirs)
        assert torch.equal(ours[finite], theirs[finite])
        # Codes that are inf/NaN natively are finite here, above native max...
        extra = ours[~finite]
        if fmt.exponent_bits < 8:
            assert torch.isfinite(extra).all()
            assert (extra.abs() > top).all() and (extra.abs() <= fmt.max_value).all()

    def test_representable_values_and_midpoints(self, name, dtype, top):
        # Every representable value and every exact tie between neighbours.
        fmt = get_format(name)
        vals = all_magnitude_values(fmt)
        vals = vals[vals <= top]
        mids = (vals[:-1] + vals[1:]) / 2  # exact in float32 (<= 17 bits)
        quarter = vals[:-1] * 0.75 + vals[1:] * 0.25
        x = torch.cat([vals, mids, quarter]).float()
        x = torch.cat([x, -x])
        assert torch.equal(fmt.quantize(x), native_codes(x, dtype, fmt.bits))

    def test_boundaries(self, name, dtype, top):
        fmt = get_format(name)
        specials = [
            0.0,
            -0.0,
            top,
            fmt.min_normal,
            fmt.min_subnormal,
            fmt.min_subnormal / 2,  # tie to zero (even)
            fmt.min_subnormal * 1.5,  # tie to 2 * min_subnormal (even)
            fmt.min_normal - fmt.min_subnormal / 2,  # tie into the first normal
        ]
        x = torch.tensor(specials, dtype=torch.float32)
        nudged = [
            torch.nextafter(x, torch.tensor(math.inf)),
            torch.nextafter(x, torch.tensor(-math.inf)),
        ]
        x = torch.cat([x, *nudged])
        x = torch.cat([x, -x])
        x = x[x.abs() <= top]
        assert torch.equal(fmt.quantize(x), native_codes(x, dtype, fmt.bits))

    @NATIVE_SETTINGS
    @given(data=st.data())
    def test_random_values(self, name, dtype, top, data):
        values = data.draw(
            st.lists(
                st.floats(-top, top, width=32, allow_subnormal=True),
                min_size=1,
                max_size=64,
            )
        )
        x = torch.tensor(values, dtype=torch.float32)
        fmt = get_format(name)
        assert torch.equal(fmt.quantize(x), native_codes(x, dtype, fmt.bits))

    @NATIVE_SETTINGS
    @given(data=st.data())
    def test_random_bit_patterns(self, name, dtype, top, data):
        pattern = data.draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=64))
        x = torch.tensor(pattern, dtype=torch.int32).view(torch.float32)
        x = x[torch.isfinite(x) & (x.abs() <= top)]
        fmt = get_format(name)
        assert torch.equal(fmt.quantize(x), native_codes(x, dtype, fmt.bits))

    def test_negative_zero_keeps_sign(self, name, dtype, top):
        fmt = get_format(name)
        code = fmt.quantize(torch.tensor([-0.0]))
        assert int(code) == 1 << (fmt.bits - 1)
        assert math.copysign(1.0, float(fmt.dequantize(code))) == -1.0


# ------------------------------------------------------------ any float width
@SETTINGS
@given(fmt=float_formats(), data=st.data())
def test_roundtrip_error_at_most_half_ulp(fmt, data):
    values = data.draw(
        st.lists(st.floats(-fmt.max_value, fmt.max_value, width=32), max_size=64)
    )
    scale = data.draw(st.sampled_from([1.0, fmt.min_normal, fmt.max_value / 4]))
    x = (torch.tensor(values, dtype=torch.float32) * scale).clamp(
        -fmt.max_value, fmt.max_value
    )
    y = fmt.dequantize(fmt.quantize(x))
    err = (y.double() - x.double()).abs()
    assert (err <= spacing(fmt, x) / 2).all()
    # The result is a format value with the input's sign (or zero).
    assert torch.equal(fmt.quantize(y), fmt.quantize(x))
    assert ((y == 0) | (torch.sign(y) == torch.sign(x))).all()


ALL_FLOAT_FORMATS = [
    FloatFormat(e, m) for e in range(1, 9) for m in range(max(0, 1 - e), 16 - e)
]


def test_all_codes_roundtrip_exactly():
    # Exhaustive over every float format and every code.
    gen = torch.Generator().manual_seed(0)
    for fmt in ALL_FLOAT_FORMATS:
        codes = torch.arange(2**fmt.bits, dtype=torch.int32)
        if fmt.bits > 12:  # keep the test fast: both ends of every binade + sample
            keep = (codes % (1 << fmt.mantissa_bits) < 8) | (
                (codes + 8) % (1 << fmt.mantissa_bits) < 8
            )
            keep |= torch.rand(codes.shape, generator=gen) < 0.05
            codes = codes[keep]
        vals = fmt.dequantize(codes)
        valid = torch.isfinite(vals)  # E8: exponent field 255 is unused
        assert torch.equal(fmt.quantize(vals[valid]), codes[valid]), fmt
        assert float(vals[valid].abs().max()) == fmt.max_value
        assert float(vals[valid][vals[valid] > 0].min()) == fmt.min_subnormal


@SETTINGS
@given(fmt=float_formats(), data=st.data())
def test_saturation(fmt, data):
    f32_max = float(torch.finfo(torch.float32).max)
    big = data.draw(
        st.lists(st.floats(fmt.max_value, f32_max, width=32), min_size=1, max_size=16)
    )
    x = torch.tensor(big, dtype=torch.float32)
    x = torch.cat([x, -x])
    expected = torch.sign(x) * fmt.max_value
    for rounding in ("nearest", "stochastic"):
        codes = fmt.quantize(x, rounding)
        assert torch.equal(fmt.dequantize(codes), expected)
        if fmt.exponent_bits < 8:  # the top code is the largest finite value
            assert (codes % (1 << (fmt.bits - 1)) == (1 << (fmt.bits - 1)) - 1).all()


@SETTINGS
@given(
    fmt=float_formats(),
    scale=st.floats(1e-30, 1e30),
    shift=st.floats(-1e3, 1e3),
    data=st.data(),
)
def test_folded_scale_matches_two_steps(fmt, scale, shift, data):
    codes = torch.tensor(
        data.draw(st.lists(st.integers(0, 2**fmt.bits - 1), max_size=64)),
        dtype=torch.int32,
    )
    s32 = torch.tensor(scale, dtype=torch.float32)
    t32 = torch.tensor(shift, dtype=torch.float32)
    two_steps = fmt.dequantize(codes) * s32 + t32
    folded = fmt.dequantize(codes, scale=scale, shift=shift)
    ok = torch.isfinite(two_steps)
    assert torch.equal(folded[ok], two_steps[ok])


# ----------------------------------------------------------------- integers
@SETTINGS
@given(bits=st.integers(2, 16), data=st.data())
def test_int_roundtrip_and_saturation(bits, data):
    fmt = IntFormat(bits)
    top = fmt.max_value
    values = data.draw(st.lists(st.floats(-2 * top, 2 * top, width=32), max_size=64))
    x = torch.tensor(values, dtype=torch.float32)
    codes = fmt.quantize(x)
    assert ((codes >= 1) & (codes < 2**bits)).all()
    y = fmt.dequantize(codes)
    clipped = x.clamp(-top, top)
    assert ((y - clipped).abs() <= 0.5).all()
    assert torch.equal(y, torch.round(clipped))  # ties to even


def test_int_ties_to_even():
    fmt = IntFormat(4)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    assert fmt.dequantize(fmt.quantize(x)).tolist() == [0, 2, 2, 0, -2, -2]


# -------------------------------------------------------------- stochastic
STOCH_CASES = [
    (FloatFormat(8, 7), 0.3),
    (FloatFormat(5, 10), -1234.567),
    (FloatFormat(4, 3), 0.3),
    (FloatFormat(4, 3), -0.0037),  # E4M3 subnormal range
    (FloatFormat(3, 7), 0.0917),
    (FloatFormat(1, 0), 1.3),
    (FloatFormat(8, 0), 3e-39),  # E8 subnormal range
    (IntFormat(8), -17.3),
    (IntFormat(2), 0.7),
]


@pytest.mark.parametrize("fmt,value", STOCH_CASES)
def test_stochastic_unbiased(fmt, value):
    n = 40000
    x = torch.full((n,), value, dtype=torch.float32)
    g = torch.Generator().manual_seed(1234)
    y = fmt.dequantize(fmt.quantize(x, "stochastic", generator=g)).double()
    v = float(x[0])
    lo, hi = y.min().item(), y.max().item()
    # Only the two neighbours of the value are ever produced...
    near = fmt.dequantize(fmt.quantize(x[:1])).item()
    assert len(torch.unique(y)) <= 2 and lo <= v <= hi
    assert near in (lo, hi)
    # ...in proportions that make the mean unbiased (5 standard errors).
    p = (v - lo) / (hi - lo) if hi > lo else 0.0
    se = (hi - lo) * math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(y.mean().item() - v) <= 5 * se + 1e-12 * abs(v)


@pytest.mark.parametrize("fmt", [FloatFormat(4, 3), FloatFormat(3, 7), IntFormat(5)])
def test_stochastic_reproducible(fmt):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return fmt.quantize(x, "stochastic", generator=g)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


@SETTINGS
@given(fmt=float_formats(), data=st.data())
def test_stochastic_exact_values_stay_and_neighbours_only(fmt, data):
    codes = torch.tensor(
        data.draw(st.lists(st.integers(0, 2**fmt.bits - 1), min_size=1, max_size=32)),
        dtype=torch.int32,
    )
    vals = fmt.dequantize(codes)
    valid = torch.isfinite(vals)
    vals, codes = vals[valid], codes[valid]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    assert torch.equal(fmt.quantize(vals, "stochastic", g), codes)
    # Perturbed values land within one gap of themselves.
    x = (vals.double() * 1.0001).float().clamp(-fmt.max_value, fmt.max_value)
    y = fmt.dequantize(fmt.quantize(x, "stochastic", g))
    assert ((y.double() - x.double()).abs() <= spacing(fmt, x) * 1.0001).all()


# ---------------------------------------------------------------- presets
def test_presets_and_aliases():
    for name, fmt in FORMAT_PRESETS.items():
        assert get_format(name) == fmt
        assert get_format(fmt) is fmt
    assert get_format("fp16") == get_format("float16") == FloatFormat(5, 10)
    assert get_format("half").name == "e5m10"
    assert get_format(" BF16 ") == get_format("bfloat16") == FloatFormat(8, 7)
    assert get_format("e2m13").bits == 16
    assert get_format("int3") == IntFormat(3)
    fmt = get_format("e4m3")
    assert (fmt.bits, fmt.bias, fmt.max_value) == (8, 7, 480.0)
    assert get_format("e8m7").max_value == float(torch.finfo(torch.bfloat16).max)
    assert str(get_format("e3m7")) == "e3m7"


def test_other_float_dtypes_are_cast_to_float32():
    fmt = get_format("e4m3")
    x = torch.tensor([0.3, -2.5, 100.0])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(fmt.quantize(x.to(dtype)), fmt.quantize(x.to(dtype).float()))


def test_shapes_are_kept():
    fmt = get_format("e5m2")
    x = torch.randn(3, 4, 5)
    assert fmt.quantize(x).shape == x.shape
    assert fmt.dequantize(fmt.quantize(x)).shape == x.shape
    assert fmt.quantize(torch.tensor(1.5)).shape == ()
    assert fmt.quantize(torch.empty(0, 3)).shape == (0, 3)


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make",
    [
        lambda: FloatFormat(0, 3),
        lambda: FloatFormat(9, 2),
        lambda: FloatFormat(5, 11),  # 17 bits
        lambda: FloatFormat(4, -1),
        lambda: FloatFormat(2.0, 3),
        lambda: IntFormat(1),
        lambda: IntFormat(17),
        lambda: get_format("float32"),  # the uncompressed, not a format
        lambda: get_format("e9m2"),
        lambda: get_format("e1m15"),
        lambda: get_format("int1"),
        lambda: get_format("float8"),
        lambda: get_format(""),
    ],
)
def test_bad_widths_and_names(make):
    with pytest.raises(ValueError):
        make()


def test_integer_like_widths():
    assert FloatFormat(torch.tensor(4).item(), 3) == FloatFormat(4, 3)
    assert IntFormat(np.int64(8)) == IntFormat(8)
    assert type(IntFormat(np.int64(8)).bits) is int


def test_get_format_type_error():
    with pytest.raises(TypeError):
        get_format(8)


@pytest.mark.parametrize("fmt", [FloatFormat(4, 3), IntFormat(8)])
def test_non_finite_input_is_reported(fmt):
    x = torch.zeros(4, 5)
    x[1, 2] = math.nan
    x[3, 0] = math.inf
    x[3, 4] = -math.inf
    with pytest.raises(ValueError, match=r"3 non-finite.*\(1, 2\).*flat index 7"):
        fmt.quantize(x)


@pytest.mark.parametrize(
    "x", [torch.arange(4), torch.ones(3, dtype=torch.bool), [1.0, 2.0]]
)
def test_non_float_input_is_a_type_error(x):
    with pytest.raises(TypeError):
        get_format("e4m3").quantize(x)


def test_bad_rounding_and_codes():
    fmt = get_format("e4m3")
    with pytest.raises(ValueError, match="rounding"):
        fmt.quantize(torch.ones(2), rounding="up")
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        fmt.dequantize(torch.tensor([0, 256]))
    with pytest.raises(ValueError):
        fmt.dequantize(torch.tensor([-1]))
    with pytest.raises(TypeError):
        fmt.dequantize(torch.tensor([1.0]))
