"""Tests of the per-variable transformation (speechbrain_omc.codec.transform)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechbrain_omc.codec.formats import FloatFormat, IntFormat, get_format
from speechbrain_omc.codec.transform import Transform, fit_transform

SETTINGS = settings(max_examples=100, deadline=None)

FORMATS = ["e4m3", "e3m7", "e5m2", "e8m7", "int8", "int4", "e1m2", "int2"]


def arrays(max_size=64):
    return st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=max_size).map(
        lambda v: torch.tensor(v, dtype=torch.float32)
    )


def roundtrip(x, fmt, t):
    scale, shift = t.decode_args
    return fmt.dequantize(fmt.quantize(t.forward(x)), scale, shift)


@SETTINGS
@given(x=arrays(), name=st.sampled_from(FORMATS))
def test_scale_maps_absmax_onto_max_value(x, name):
    fmt = get_format(name)
    t = fit_transform(x, fmt, "scale")
    assert t.kind == "scale" and t.shift == 0.0 and t.nbytes == 4
    absmax = float(x.abs().max())
    y = t.forward(x)
    if absmax == 0.0:
        assert t.scale == 1.0 and torch.equal(y, x)
    else:
        top = float(y.abs().max())
        assert top <= fmt.max_value * (1 + 1e-6)
        # The scale stops at float32's smallest normal; only formats whose range
        # covers float32's (8 exponent bits) reach that floor in practice.
        if t.scale > 2.0**-126:
            assert abs(top - fmt.max_value) <= 1e-6 * fmt.max_value
    assert torch.isfinite(roundtrip(x, fmt, t)).all()


@SETTINGS
@given(x=arrays(), name=st.sampled_from(FORMATS))
def test_affine_maps_range_symmetrically(x, name):
    fmt = get_format(name)
    t = fit_transform(x, fmt, "affine")
    assert t.kind == "affine" and t.nbytes == 8
    lo, hi = float(x.min()), float(x.max())
    y = t.forward(x)
    if hi == lo:
        assert t.scale == 1.0 and t.shift == lo
        assert torch.equal(roundtrip(x, fmt, t), x)  # a constant is exact
    else:
        tol = 1e-5 * fmt.max_value
        assert float(y.max()) <= fmt.max_value + tol
        assert float(y.min()) >= -fmt.max_value - tol
        if t.scale > 2.0**-126:  # see the scale floor in the test above
            assert max(float(y.max()), -float(y.min())) >= fmt.max_value - tol
        assert t.shift == pytest.approx((lo + hi) / 2, rel=1e-6, abs=1e-30)


@SETTINGS
@given(x=arrays(), kind=st.sampled_from(["none", "scale", "affine"]))
def test_inverse_undoes_forward(x, kind):
    t = fit_transform(x, "e5m10", kind)
    back = t.inverse(t.forward(x))
    assert torch.allclose(back, x, rtol=1e-6, atol=1e-6 * float(x.abs().max()))


def test_none_is_identity_and_free():
    x = torch.randn(10)
    t = fit_transform(x, "int8", "none")
    assert t == Transform() and t.nbytes == 0 and t.params == ()
    assert t.forward(x) is x and t.inverse(x) is x
    assert t.decode_args == (None, None)


def test_all_zero_tensor_does_not_divide_by_zero():
    for kind in ("scale", "affine"):
        for clip in ("absmax", "mse"):
            for name in FORMATS:
                fmt = get_format(name)
                t = fit_transform(torch.zeros(5), fmt, kind, clip)
                assert t.scale == 1.0 and t.shift == 0.0
                assert torch.equal(roundtrip(torch.zeros(5), fmt, t), torch.zeros(5))


def test_tiny_values_keep_a_normal_scale():
    x = torch.tensor([1e-44, -3e-45])  # float32 subnormals
    t = fit_transform(x, "e4m3", "scale")
    assert t.scale >= 2.0**-126 and math.isfinite(t.scale)
    assert torch.isfinite(t.forward(x)).all()


def test_parameters_are_float32():
    t = Transform("affine", scale=0.1, shift=1 / 3)
    assert t.scale == float(torch.tensor(0.1, dtype=torch.float32))
    assert t.shift == float(torch.tensor(1 / 3, dtype=torch.float32))
    assert Transform.from_params("affine", t.params) == t
    assert Transform.from_params("scale", (0.5,)).params == (0.5,)


def test_mse_clip_beats_absmax_with_outliers():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen)
    x[0] = 40.0  # a single outlier ruins absmax scaling for int4
    fmt = IntFormat(4)
    mse = {}
    for clip in ("absmax", "mse"):
        t = fit_transform(x, fmt, "scale", clip)
        mse[clip] = float((roundtrip(x, fmt, t) - x).square().mean())
    assert mse["mse"] < 0.5 * mse["absmax"]


@SETTINGS
@given(
    x=arrays(200),
    name=st.sampled_from(FORMATS),
    kind=st.sampled_from(["scale", "affine"]),
)
def test_mse_clip_never_worse_than_absmax(x, name, kind):
    fmt = get_format(name)
    err = {}
    for clip in ("absmax", "mse"):
        t = fit_transform(x, fmt, kind, clip)
        err[clip] = float((roundtrip(x, fmt, t) - x).double().square().mean())
    assert err["mse"] <= err["absmax"] * (1 + 1e-6) + 1e-30


def test_mse_clip_on_large_tensor_uses_a_sample():
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(1))
    t = fit_transform(x, "int4", "scale", "mse")
    assert t.scale < float(x.abs().max()) / 7  # clipped below the absmax


def test_minmax_shortcut_matches():
    x = torch.randn(100)
    a = fit_transform(x, "e4m3", "affine")
    b = fit_transform(x, "e4m3", "affine", minmax=(float(x.min()), float(x.max())))
    assert a == b


@pytest.mark.parametrize(
    "make",
    [
        lambda: Transform("log"),
        lambda: Transform("scale", 0.0),
        lambda: Transform("scale", -1.0),
        lambda: Transform("scale", math.nan),
        lambda: Transform("scale", math.inf),
        lambda: Transform("scale", 1e-50),  # underflows float32
        lambda: Transform("none", 2.0),
        lambda: Transform("scale", 1.0, 1.0),
        lambda: Transform("affine", 1.0, math.inf),
        lambda: Transform.from_params("scale", (1.0, 2.0)),
        lambda: fit_transform(torch.ones(3), "e4m3", "log"),
        lambda: fit_transform(torch.ones(3), "e4m3", "scale", "p99"),
        lambda: fit_transform(torch.tensor([1.0, math.nan]), "e4m3", "scale"),
        lambda: fit_transform(torch.ones(3), "float32", "scale"),
    ],
)
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError):
        fit_transform(torch.arange(3), FloatFormat(4, 3), "scale")
