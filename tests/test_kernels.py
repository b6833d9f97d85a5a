"""Native codec kernels against the torch reference: the same bits, always."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechbrain_omc.codec import kernels
from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.formats import FloatFormat, IntFormat, get_format
from speechbrain_omc.codec.transform import Transform
from speechbrain_omc.engine.rules import SGDSettings, sgd_step_

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="native kernels unavailable here"
)
SETTINGS = settings(max_examples=60, deadline=None)


def any_format():
    """Strategy: every float format (2..16 bits) and every int format."""
    floats = st.integers(1, 8).flatmap(
        lambda e: st.integers(max(0, 1 - e), 15 - e).map(lambda m: FloatFormat(e, m))
    )
    return st.one_of(floats, st.integers(2, 16).map(IntFormat))


def hard_values(fmt, n, data):
    """Values that stress rounding: grid points, ties, subnormals, saturation."""
    mags = torch.arange(2 ** (fmt.bits - 1), dtype=torch.int32)
    if isinstance(fmt, FloatFormat) and fmt.exponent_bits == 8:
        mags = mags[: 255 << fmt.mantissa_bits]  # field 255 is unused
    grid = fmt.dequantize(mags + (1 << (fmt.bits - 1)) * isinstance(fmt, IntFormat))
    grid = grid[torch.isfinite(grid)]
    pick = torch.randint(0, grid.numel(), (n,), generator=data)
    lower, upper = grid[pick], grid[(pick + 1).clamp(max=grid.numel() - 1)]
    kind = torch.randint(0, 5, (n,), generator=data)
    x = torch.where(kind == 0, lower, lower / 2 + upper / 2)  # exact values, ties
    x = torch.where(kind == 2, lower * 0.7 + upper * 0.3, x)
    wide = min(4 * fmt.max_value, 1e37)  # saturation, without float32 overflow
    x = torch.where(kind == 3, torch.randn(n, generator=data) * wide, x)
    x = torch.where(kind == 4, torch.randn(n, generator=data) * 1e-3, x)
    sign = torch.randint(0, 2, (n,), generator=data) * 2 - 1
    return (x * sign).float()


def both(make):
    """``make()`` with the kernels, then with the torch reference."""
    fast = make()
    with kernels.disabled():
        slow = make()
    return fast, slow


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    )


@SETTINGS
@given(
    fmt=any_format(),
    kind=st.sampled_from(["none", "scale", "affine"]),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    n=st.integers(0, 2100),
    seed=st.integers(0, 2**32),
)
def test_compress_and_decompress_match_reference(fmt, kind, rounding, n, seed):
    data = torch.Generator().manual_seed(seed)
    x = hard_values(fmt, n, data)
    if kind == "none":  # keep values in range of formats without a scale
        x = x.clamp(-fmt.max_value, fmt.max_value)

    def make():
        ct = CompressedTensor.compress(x, fmt, kind, rounding, generator=seed)
        return ct.packed.clone(), ct.transform, ct.decompress()

    (pf, tf, vf), (ps, ts, vs) = both(make)
    assert tf == ts
    assert torch.equal(pf, ps)
    assert same_bits(vf, vs)


@SETTINGS
@given(fmt=any_format(), n=st.integers(1, 3000), seed=st.integers(0, 2**32))
def test_every_code_decodes_like_reference(fmt, n, seed):
    # Arbitrary bytes are valid codes; E8 codes with the unused exponent field
    # decode to inf/NaN on both paths alike.
    gen = torch.Generator().manual_seed(seed)
    nbytes = (n * fmt.bits + 7) // 8
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    pad = (8 - (n * fmt.bits) % 8) % 8
    if pad:  # the unused high bits of the last byte are zero
        raw[-1] &= (1 << (8 - pad)) - 1
    scale = float(torch.rand((), generator=gen)) * 3 + 1e-3
    transform = Transform("affine", scale, -0.25)

    def make():
        ct = CompressedTensor(raw.clone(), fmt, (n,), transform)
        return ct.decompress()

    assert same_bits(*both(make))


@SETTINGS
@given(
    fmt=any_format(),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    n=st.integers(1, 1500),
    seed=st.integers(0, 2**32),
)
def test_quantize_and_dequantize_match_reference(fmt, rounding, n, seed):
    x = hard_values(fmt, n, torch.Generator().manual_seed(seed))

    def make():
        codes = fmt.quantize(x, rounding, seed)
        return codes, fmt.dequantize(codes, 0.5, 0.125)

    (cf, vf), (cs, vs) = both(make)
    assert torch.equal(cf, cs)
    assert same_bits(vf, vs)


@pytest.mark.parametrize("name", ["e3m7", "e4m3", "int8", "e5m10", "int5"])
def test_stochastic_codes_do_not_depend_on_threads(name):
    x = torch.randn(300_001, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(CompressedTensor.compress(x, name, "scale", "stochastic", 9))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r.packed, results[0].packed) for r in results)


@pytest.mark.parametrize("name", ["e4m3", "e3m7", "int5"])
@pytest.mark.parametrize("offset", [0, 2**32 - 37, 2**33 - 1])
def test_stochastic_codes_follow_indices_into_their_high_word(name, offset):
    """Indices whose low 32 bits wrap inside one call (the kernel splits its
    loops there) draw the reference's random bits."""
    fmt = get_format(name)
    x = hard_values(fmt, 300, torch.Generator().manual_seed(1))
    x = x.clamp(-fmt.max_value, fmt.max_value)
    codes = torch.empty(300, dtype=torch.int32)
    kernels.encode(
        x, codes, fmt.spec, stochastic_key=99, index_offset=offset, packed=False
    )
    assert torch.equal(codes, fmt._quantize(x, "stochastic", 99, offset))


@pytest.mark.parametrize("name", ["e3m7", "e2m5", "int4"])
def test_kernel_stochastic_rounding_is_unbiased(name):
    fmt = get_format(name)
    code = fmt.quantize(torch.tensor([0.3]))
    lo, hi = (float(fmt.dequantize(c)[0]) for c in (code, code + 1))
    n = 400_000
    for frac in (0.1, 0.5, 0.77):
        value = lo + frac * (hi - lo)
        x = torch.full((n,), value)
        mean = float(
            fmt.dequantize(fmt.quantize(x, "stochastic", 1234)).double().mean()
        )
        # Binomial standard error of the rounding-up frequency, 5 sigma.
        tolerance = 5 * (hi - lo) * (frac * (1 - frac) / n) ** 0.5
        assert abs(mean - value) < tolerance, (frac, mean, value)


def test_minmax_matches_aminmax_and_counts_non_finite():
    x = torch.randn(200_003, generator=torch.Generator().manual_seed(0))
    lo, hi, bad = kernels.minmax(x)
    assert (lo, hi, bad) == (float(x.min()), float(x.max()), 0)
    x[17], x[150_000], x[-1] = float("nan"), float("inf"), -float("inf")
    assert kernels.minmax(x)[2] == 3


@pytest.mark.parametrize(
    "momentum,dampening,weight_decay,nesterov",
    [
        (0, 0, 0, False),
        (0.9, 0, 1e-2, False),
        (0.9, 0.1, 0, False),
        (0.8, 0, 1e-3, True),
    ],
)
@pytest.mark.parametrize("n", [1, 37, 70_001])
def test_sgd_kernel_equals_torch_optim_sgd(
    momentum, dampening, weight_decay, nesterov, n
):
    gen = torch.Generator().manual_seed(n)
    start = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(3)]
    param = torch.nn.Parameter(start.clone())
    opt = torch.optim.SGD(
        [param],
        lr=0.05,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    settings_ = SGDSettings(0.05, momentum, dampening, weight_decay, nesterov)
    value, buffer = start.clone(), None
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
        result = sgd_step_(value, grad, buffer, settings_)
        buffer = result.momentum_buffer
        assert result.nonfinite_grad == 0
        assert result.minmax == (float(value.min()), float(value.max()))
        assert same_bits(value, param.detach())


def test_sgd_kernel_leaves_momentum_alone_on_non_finite_gradient():
    settings_ = SGDSettings(lr=0.1, momentum=0.9)
    value, buffer = torch.ones(100_000), torch.full((100_000,), 0.5)
    grad = torch.ones(100_000)
    grad[99_999] = float("nan")
    result = sgd_step_(value, grad, buffer, settings_)
    assert result.nonfinite_grad == 1
    assert torch.equal(buffer, torch.full((100_000,), 0.5))


def test_build_failure_falls_back_to_the_reference(tmp_path):
    # A real subprocess with no usable compiler and an empty cache.
    code = textwrap.dedent(
        """
        import torch
        from speechbrain_omc.codec import kernels
        from speechbrain_omc.codec.compressed import CompressedTensor
        ct = CompressedTensor.compress(torch.linspace(-1, 1, 99), "e3m7")
        print(kernels.available(), kernels.status())
        print(float(ct.decompress()[0]))
        """
    )
    env = dict(
        os.environ,
        CXX=str(tmp_path / "no-such-compiler"),
        PATH=str(tmp_path),
        SPEECHBRAIN_OMC_CACHE=str(tmp_path / "cache"),
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert (
        lines[0]
        == "False OMC codec: torch reference (native kernels could not be built)"
    )
    assert float(lines[1]) == -1.0
    assert "native kernels unavailable" in out.stderr


def test_kernels_can_be_disabled_by_environment():
    env = dict(os.environ, SPEECHBRAIN_OMC_KERNELS="0")
    code = "from speechbrain_omc.codec import kernels; print(kernels.status())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert (
        out.stdout.strip() == "OMC codec: torch reference (SPEECHBRAIN_OMC_KERNELS=0)"
    )
