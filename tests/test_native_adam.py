"""The native fused Adam step (``kernels.adam_step``) against torch's own
single-tensor Adam: the same bits, on float32 and block-wise moments, and the
same behaviour as the torch path of fused mode."""

import pytest
import torch
from torch.optim.adam import adam as functional_adam

from speechbrain_omc.codec import kernels
from speechbrain_omc.codec.blockwise import BlockwiseTensor
from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.engine import rules
from speechbrain_omc.engine.rules import AdamSettings, StateStorage, fused_step_

native_adam = (
    kernels.available() and kernels.torch_sqrt()[1] and rules.native_adam_is_torchs()
)
native = pytest.mark.skipif(
    not native_adam, reason="native kernels, or torch.sqrt's bits, unavailable here"
)

N = 1_000_003  # a ragged last block and chunk
SETTINGS = [  # (decoupled, weight_decay): Adam and AdamW, with and without decay
    (False, 0.0),
    (False, 0.01),
    (True, 0.0),
    (True, 0.01),
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    )


def gradients(n: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Gaussian gradients whose scale spans six decades, as a model's do."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10 ** torch.empty(n).uniform_(-6, 0, generator=gen)
    return [torch.randn(n, generator=gen) * scale for _ in range(steps)]


def torch_adam_(param, grad, exp_avg, exp_avg_sq, step, settings):
    """torch.optim's single-tensor Adam(W), step ``step`` (from 1), in place."""
    functional_adam(
        [param],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [torch.tensor(float(step - 1))],
        foreach=False,
        decoupled_weight_decay=settings.decoupled,
        amsgrad=False,
        beta1=settings.betas[0],
        beta2=settings.betas[1],
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        eps=settings.eps,
        maximize=False,
    )


def adam_kernel(value, grad, exp_avg, exp_avg_sq, step, settings, **kwargs):
    return kernels.adam_step(
        value,
        grad,
        exp_avg,
        exp_avg_sq,
        step,
        settings.lr,
        settings.betas,
        settings.eps,
        settings.weight_decay,
        settings.decoupled,
        **kwargs,
    )


def fields(bt: BlockwiseTensor) -> kernels.BlockCodes:
    return bt.packed, bt.scales, bt.format.spec, bt.sqrt


def empty_like_blocks(n: int, fmt: str, block: int, sqrt: bool):
    """A target for block-wise codes, and the BlockwiseTensor they make."""
    zeros = BlockwiseTensor.zeros(n, fmt, block=block, sqrt=sqrt)
    packed, scales = torch.empty_like(zeros.packed), torch.empty_like(zeros.scales)
    target = (packed, scales, zeros.format.spec, zeros.sqrt)
    return target, BlockwiseTensor(packed, scales, fmt, (n,), block, zeros.sqrt)


@native
@pytest.mark.parametrize("decoupled,weight_decay", SETTINGS)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.99)])  # both lerp branches
def test_float32_state_equals_torch_adam_bit_for_bit(decoupled, weight_decay, betas):
    settings = AdamSettings(
        lr=1e-3, betas=betas, weight_decay=weight_decay, decoupled=decoupled
    )
    start = torch.randn(N, generator=torch.Generator().manual_seed(1))
    param, exp_avg, exp_avg_sq = start.clone(), torch.zeros(N), torch.zeros(N)
    value, m, v = start.clone(), torch.zeros(N), torch.zeros(N)
    for step, grad in enumerate(gradients(N, 4, seed=2), start=1):
        torch_adam_(param, grad, exp_avg, exp_avg_sq, step, settings)
        bad, lo, hi, nonfinite = adam_kernel(
            value, grad, (m, m, None), (v, v, None), step, settings
        )
        assert (bad, nonfinite) == (0, 0)
        assert same_bits(value, param)
        assert same_bits(m, exp_avg) and same_bits(v, exp_avg_sq)
        assert (lo, hi) == (float(param.min()), float(param.max()))


@native
@pytest.mark.parametrize("decoupled,weight_decay", SETTINGS)
@pytest.mark.parametrize("fmt,sqrt", [("e4m3", True), ("int8", False)])
def test_block_wise_state_equals_decode_torch_adam_encode(
    decoupled, weight_decay, fmt, sqrt
):
    """Moments in one-byte codes (one scale per 256 values, the second as its
    square root with ``sqrt``): decoded, stepped by torch, encoded again."""
    settings = AdamSettings(lr=1e-3, weight_decay=weight_decay, decoupled=decoupled)
    start = torch.randn(N, generator=torch.Generator().manual_seed(3))
    weight = CompressedTensor.compress(start, "e3m7")
    moments = {"exp_avg": None, "exp_avg_sq": None}  # the first step from zeros
    for step, grad in enumerate(gradients(N, 3, seed=4), start=1):
        param = weight.decompress()
        old = {k: b.decompress() if b else torch.zeros(N) for k, b in moments.items()}
        torch_adam_(param, grad, old["exp_avg"], old["exp_avg_sq"], step, settings)
        expected = {
            k: BlockwiseTensor.compress(old[k], fmt, sqrt=sqrt and k == "exp_avg_sq")
            for k in moments
        }
        value, new, args = torch.empty(N), {}, {}
        for k, held in moments.items():
            target, new[k] = empty_like_blocks(N, fmt, 256, sqrt and k == "exp_avg_sq")
            args[k] = (fields(held) if held else None, target, None)
        factors, shift = weight.transform.decode_plan
        bad, lo, hi, _ = adam_kernel(
            value,
            grad,
            args["exp_avg"],
            args["exp_avg_sq"],
            step,
            settings,
            codes=weight.packed,
            fmt=weight.format.spec,
            multipliers=factors,
            shift=shift,
        )
        assert bad == 0
        assert same_bits(value, param)
        for k in moments:
            assert new[k].to_bytes() == expected[k].to_bytes(), (step, k)
        assert (lo, hi) == (float(param.min()), float(param.max()))
        weight.assign_(value, rounding="nearest", minmax=(lo, hi))
        moments = new


@native
def test_results_do_not_depend_on_the_thread_count():
    settings = AdamSettings(lr=1e-2, weight_decay=0.01, decoupled=True)
    grad = gradients(300_000, 1, seed=5)[0]
    start = torch.randn(300_000, generator=torch.Generator().manual_seed(6))
    old = BlockwiseTensor.compress(grad.abs(), "e4m3", sqrt=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            value, m = start.clone(), grad.clone()
            target, new = empty_like_blocks(300_000, "e4m3", 256, True)
            adam_kernel(
                value, grad, (m, m, None), (fields(old), target, 7), 3, settings
            )
            results.append((value, m, new.to_bytes()))
    finally:
        torch.set_num_threads(threads)
    for value, m, codes in results[1:]:
        assert same_bits(value, results[0][0]) and same_bits(m, results[0][1])
        assert codes == results[0][2]


@native
@pytest.mark.parametrize("fmt", ["e2m1", "e3m2", "e5m10"])  # packed, not bytes
def test_codes_of_any_width_do_not_depend_on_the_thread_count(fmt):
    """Threads write their own bytes only, whatever the codes' width."""
    settings = AdamSettings(lr=1e-2, weight_decay=0.01, decoupled=True)
    n = 300_001
    grad = gradients(n, 1, seed=5)[0]
    start = torch.randn(n, generator=torch.Generator().manual_seed(6))
    old = {
        "m": BlockwiseTensor.compress(grad, fmt, block=64),
        "v": BlockwiseTensor.compress(grad * grad, fmt, block=64, sqrt=True),
    }
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            value, args, new = start.clone(), {}, {}
            for k, held in old.items():
                target, new[k] = empty_like_blocks(n, fmt, 64, held.sqrt)
                args[k] = (fields(held), target, 7 + len(k))
            adam_kernel(value, grad, args["m"], args["v"], 3, settings, block=64)
            results.append((value, new["m"].to_bytes(), new["v"].to_bytes()))
    finally:
        torch.set_num_threads(threads)
    for value, m, v in results[1:]:
        assert same_bits(value, results[0][0])
        assert (m, v) == results[0][1:]


BLOCK_FORMATS = ["e4m3", "e5m2", "int8", "e2m1", "e3m2", "int5", "e5m10", "fp32"]


@native
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_block_codes_equal_the_reference(fmt, rounding):
    """BlockwiseTensor's kernels against its torch reference: blocks of 16 to
    16384 values, tensors of ragged length across the 8192-value tiles, an
    all-zero block (unit scale) and one whose scale clamps to float32's
    smallest normal, square roots or not."""
    gen = torch.Generator().manual_seed(11)
    for block, n in [(16, 9_001), (256, 20_011), (16_384, 50_011)]:
        x = torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(
            -6, 1, generator=gen
        )
        x[block : 2 * block] = 0.0
        x[2 * block : 3 * block] *= 1e-40
        for sqrt in (False, True):
            values = x * x if sqrt else x

            def make(values=values, sqrt=sqrt, block=block):
                bt = BlockwiseTensor.compress(
                    values, fmt, block, sqrt, rounding, generator=77
                )
                return bt.to_bytes(), bt.decompress()

            fast, fast_values = make()
            with kernels.disabled():
                slow, slow_values = make()
                decoded = BlockwiseTensor.from_bytes(fast).decompress()
            assert fast == slow, (block, sqrt)
            assert same_bits(fast_values, slow_values), (block, sqrt)
            assert same_bits(fast_values, decoded), (block, sqrt)


# ------------------------------------------------------------- fused mode
def fused(codes, grad, state, settings, storage):
    """One fused Adam step as the engine takes it; returns the StepResult."""

    def scratch():
        return torch.empty(codes.shape)

    def keys(buffer: str) -> int:
        return 1234 + len(buffer)

    value = scratch()
    result = fused_step_(value, codes, grad, state, settings, storage, scratch, keys)
    if not result.nonfinite_grad:
        codes.assign_(value, rounding="nearest", minmax=result.minmax)
    return result


def state_bytes(state: dict) -> dict:
    return {
        k: b
        if isinstance(b, int)
        else (b.to_bytes() if hasattr(b, "to_bytes") else b.numpy().tobytes())
        for k, b in state.items()
    }


STORAGES = {
    "float32": StateStorage(),
    "e4m3": StateStorage({"exp_avg": "e4m3", "exp_avg_sq": "e4m3"}, block=64),
    "e4m3 stochastic": StateStorage(
        {"exp_avg": "e4m3", "exp_avg_sq": "e5m2"}, rounding="stochastic"
    ),
    "mixed": StateStorage({"exp_avg_sq": "int8"}, sqrt_second_moment=False),
    "lossless": StateStorage({"exp_avg": "fp32", "exp_avg_sq": "fp32"}),
}


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_fused_steps_equal_the_torch_path(storage):
    """The engine's fused step, native and with the kernels disabled (the
    torch path, the fallback of SPEECHBRAIN_OMC_KERNELS=0): the same codes,
    the same state, step after step (AdamW, a 300 x 513 weight)."""
    start = torch.randn(300, 513, generator=torch.Generator().manual_seed(8))
    state = _native_steps_equal_torch_steps(start, STORAGES[storage], seed=9)
    assert state["step"] == 3


def _native_steps_equal_torch_steps(start, storage: StateStorage, seed: int) -> dict:
    """Three AdamW steps of ``start`` (e3m7) native and on the torch path
    (kernels disabled): the same results, codes and state after each; the
    native state is returned."""
    settings = AdamSettings(lr=1e-2, weight_decay=0.01, decoupled=True)
    fast = CompressedTensor.compress(start, "e3m7")
    slow = CompressedTensor.compress(start, "e3m7")
    fast_state, slow_state = {}, {}
    for grad in gradients(start.numel(), 3, seed=seed):
        grad = grad.view(start.shape)
        value = torch.empty(start.shape)
        sources = rules._native_sources(value, fast, grad, fast_state, storage)
        assert (sources is not None) == native_adam  # the path under test
        got = fused(fast, grad, fast_state, settings, storage)
        with kernels.disabled():
            want = fused(slow, grad, slow_state, settings, storage)
        assert got == want
        assert fast.to_bytes() == slow.to_bytes()
        assert state_bytes(fast_state) == state_bytes(slow_state)
    return fast_state


@pytest.mark.parametrize(
    "formats,block,rounding,sqrt",
    [
        (("e4m3", "e4m3"), 16, "stochastic", True),
        (("e4m3", "e4m3"), 16_384, "nearest", True),
        (("e5m2", "e5m2"), 256, "stochastic", False),
        (("e2m1", "e2m1"), 64, "nearest", True),
        (("e2m1", "e3m2"), 256, "stochastic", True),
        (("int4", "int5"), 32, "stochastic", True),
        (("int5", "e3m2"), 128, "nearest", False),
        (("e5m10", "int8"), 1024, "stochastic", True),
        (("fp32", "e4m3"), 256, "stochastic", True),
    ],
)
def test_block_wise_state_of_any_format_equals_the_torch_path(
    formats, block, rounding, sqrt
):
    """Fused Adam with block-wise moments of other widths, block sizes and
    rounding, native and on the torch path, step after step (a 37 x 541
    weight: ragged blocks and tiles)."""
    storage = StateStorage(
        dict(zip(("exp_avg", "exp_avg_sq"), formats)),
        block=block,
        sqrt_second_moment=sqrt,
        rounding=rounding,
    )
    start = torch.randn(37, 541, generator=torch.Generator().manual_seed(12))
    _native_steps_equal_torch_steps(start, storage, seed=13)


@pytest.mark.parametrize("storage", ["float32", "e4m3"])
def test_a_non_finite_gradient_writes_nothing(storage):
    storage = STORAGES[storage]
    settings = AdamSettings(lr=1e-2)
    codes = CompressedTensor.compress(torch.randn(100_000), "e3m7")
    state = {}
    fused(codes, torch.randn(100_000), state, settings, storage)
    before, weight = state_bytes(state), codes.to_bytes()
    grad = torch.randn(100_000)
    grad[[5, 99_999]] = torch.tensor([float("nan"), float("inf")])
    result = fused(codes, grad, state, settings, storage)
    assert result.nonfinite_grad == 2
    assert state_bytes(state) == before and codes.to_bytes() == weight
    assert state["step"] == 1


def test_an_overflowing_update_leaves_the_range_unmeasured():
    """A step past float32's range: no min and max, so that the caller's
    encoding finds the infinities and reports them."""
    codes = CompressedTensor.compress(torch.full((4096,), 3.3e38), "fp32")
    value = torch.empty(4096)
    result = fused_step_(  # the first step moves each weight by lr: 3e37
        value,
        codes,
        -torch.ones(4096),
        {},
        AdamSettings(lr=3e37),
        StateStorage(),
        lambda: torch.empty(4096),
        lambda buffer: 0,
    )
    assert result.nonfinite_grad == 0 and result.minmax is None
    assert bool(torch.isinf(value).all())


def test_codes_kept_float32_from_now_on_own_their_memory():
    """A checkpoint's block-wise moments under float32 storage (another state
    format): the torch path decodes them into memory of their own, so that a
    later scratch buffer (the workspace reuses them) cannot overwrite state."""
    settings = AdamSettings(lr=1e-2)
    start = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    codes = CompressedTensor.compress(start, "e3m7")
    grad = torch.randn(start.shape, generator=torch.Generator().manual_seed(4))
    state = {
        "exp_avg": BlockwiseTensor.compress(grad * 0.1, "e4m3", block=64),
        "exp_avg_sq": BlockwiseTensor.compress(grad * grad, "e4m3", block=64),
        "step": 1,
    }
    pool = torch.empty(start.shape)  # one scratch buffer, handed out again

    def scratch():
        return pool

    with kernels.disabled():
        fused_step_(
            torch.empty(start.shape), codes, grad, state, settings,
            StateStorage(), scratch, lambda name: 0,
        )  # fmt: skip
    kept = {name: state[name].clone() for name in ("exp_avg", "exp_avg_sq")}
    pool.fill_(float("nan"))  # the next user of the scratch buffer
    for name, value in kept.items():
        assert state[name].data_ptr() != pool.data_ptr(), name
        assert same_bits(state[name], value), name


@native
def test_the_kernel_refuses_moments_of_another_size():
    """It indexes every buffer by the weight's size: a checkpoint's state of
    another size is refused before any read."""
    settings = AdamSettings(lr=1e-3)
    value, grad = torch.zeros(1000), torch.ones(1000)
    short = BlockwiseTensor.compress(torch.ones(900), "e4m3", block=64)
    target, _ = empty_like_blocks(1000, "e4m3", 64, True)
    with pytest.raises(ValueError, match="do not hold 1000 values"):
        adam_kernel(
            value,
            grad,
            (fields(short), target, None),
            (None, torch.zeros(1000), None),
            1,
            settings,
            block=64,
        )
    with pytest.raises(ValueError, match="n values"):
        adam_kernel(
            value,
            grad,
            (torch.zeros(999), torch.zeros(999), None),
            (None, torch.zeros(1000), None),
            1,
            settings,
        )
    with pytest.raises(ValueError, match="power of two"):
        adam_kernel(
            value,
            grad,
            (None, torch.zeros(1000), None),
            (None, torch.zeros(1000), None),
            1,
            settings,
            block=100,
        )


@native
def test_a_build_whose_adam_differs_falls_back_to_torchs(monkeypatch):
    """Where the start-up probe finds other bits than torch's Adam, fused
    Adam takes torch's path (still bit for bit the fallback's)."""
    assert rules.native_adam_is_torchs()  # this build: the kernel is torch's
    monkeypatch.setattr(rules, "native_adam_is_torchs", lambda: False)
    start = torch.randn(64, 33, generator=torch.Generator().manual_seed(3))
    codes = CompressedTensor.compress(start, "e3m7")
    grad = torch.randn(64, 33, generator=torch.Generator().manual_seed(4))
    value = torch.empty(start.shape)
    assert rules._native_sources(value, codes, grad, {}, StateStorage()) is None
    twin, state, twin_state = CompressedTensor.compress(start, "e3m7"), {}, {}
    fused(codes, grad, state, AdamSettings(), StateStorage())
    with kernels.disabled():
        fused(twin, grad, twin_state, AdamSettings(), StateStorage())
    assert codes.to_bytes() == twin.to_bytes()
    assert state_bytes(state) == state_bytes(twin_state)


@native
def test_the_probe_finds_a_kernel_that_differs_by_one_bit(monkeypatch, caplog):
    real = kernels.adam_step

    def off_by_one_ulp(value, *args, **kwargs):
        out = real(value, *args, **kwargs)
        value.view(torch.int32)[7] += 1
        return out

    rules.native_adam_is_torchs.cache_clear()
    try:
        monkeypatch.setattr(kernels, "adam_step", off_by_one_ulp)
        with caplog.at_level("WARNING"):
            assert not rules.native_adam_is_torchs()
        assert "native Adam kernel not used" in caplog.text
        rules.native_adam_is_torchs.cache_clear()
        monkeypatch.setattr(kernels, "adam_step", real)
        assert rules.native_adam_is_torchs()
    finally:
        rules.native_adam_is_torchs.cache_clear()


@native
def test_the_probes_do_not_follow_the_default_dtype():
    rules.native_adam_is_torchs.cache_clear()
    kernels.torch_sqrt.cache_clear()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert kernels.torch_sqrt()[1] and rules.native_adam_is_torchs()
    finally:
        torch.set_default_dtype(default)
        rules.native_adam_is_torchs.cache_clear()
        kernels.torch_sqrt.cache_clear()
