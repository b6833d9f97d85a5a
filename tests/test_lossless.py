"""The lossless format ``fp32``: OMC's machinery on values that lose nothing.

With 32-bit codes that are the float32 bits, every mechanism that claims to be
exact must give float32's results bit for bit: codes and packing, the native
kernels and their torch fallback, compressed modules, fused SGD, Adam and
AdamW with their optimizer state, the wire, the server, checkpoints. Real
components throughout; bits are compared as int32 words (``torch.equal`` on
floats would let ``-0.0`` pass for ``0.0``).
"""

import copy
import math

import pytest
import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import Checkpointer
from test_checkpoints_export import Regressor, batches, decoded_state, network
from test_federated_server import honest_reply
from test_speechbrain_models import FEATS, MODELS, VOCAB

import speechbrain_omc
from speechbrain_omc import CompressedTensor, OMCConfig, compress_module
from speechbrain_omc.codec import kernels
from speechbrain_omc.codec.blockwise import BlockwiseTensor
from speechbrain_omc.codec.formats import Float32Format, get_format
from speechbrain_omc.codec.packing import pack_bits, packed_nbytes, unpack_bits
from speechbrain_omc.codec.transform import Transform
from speechbrain_omc.engine.rules import SGDSettings, settings_from_optimizer, sgd_step_
from speechbrain_omc.engine.selection import make_plan
from speechbrain_omc.export import export_checkpoints
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.server import FedAvgServer

F32_MAX = torch.finfo(torch.float32).max
native = pytest.mark.skipif(not kernels.available(), reason="no native kernels")


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().reshape(-1).view(torch.int32)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what="") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if a.is_floating_point():
        assert torch.equal(bits(a), bits(b)), what
    else:
        assert torch.equal(a, b), what


def hard_values(n: int = 10_007, seed: int = 0) -> torch.Tensor:
    """Random values over float32's range, with every special finite kind."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.pow(10.0, torch.randint(-44, 38, (n,), generator=gen).float())
    x = torch.randn(n, generator=gen) * scales
    special = torch.tensor(
        [0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 2.0**-126, -(2.0**-126)]
        + [F32_MAX, -F32_MAX, 3e38, -1e38, 1.0, -1.0, 0.1, 65504.0, 1e30]
    )
    x[: len(special)] = special
    assert bool(torch.isfinite(x).all())
    return x


# ----------------------------------------------------------------- format
def test_codes_are_the_float32_bits_and_decode_to_them():
    fmt = get_format("fp32")
    assert fmt == get_format("e8m23") == Float32Format()
    assert (fmt.name, fmt.bits, fmt.lossless, fmt.max_value) == (
        "fp32",
        32,
        True,
        F32_MAX,
    )
    x = hard_values()
    for rounding in ("nearest", "stochastic"):  # every value is a code
        codes = fmt.quantize(x, rounding, torch.Generator().manual_seed(1))
        assert codes.dtype == torch.int32 and torch.equal(codes, bits(x))
        assert_same_bits(fmt.dequantize(codes), x)
    half = x[20:120].to(torch.bfloat16)  # other float dtypes: cast to float32
    assert torch.equal(fmt.quantize(half), bits(half.float()))


@pytest.mark.parametrize("transform", ["none", "scale", "affine"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_compressed_tensor_round_trips_exactly_without_a_transform(transform, rounding):
    """Whatever transform is asked, none is applied (``x / s * s`` rounds)."""
    x = hard_values(97 * 41).view(97, 41)
    ct = CompressedTensor.compress(x, "fp32", transform, rounding, generator=3)
    assert ct.transform == Transform()
    assert ct.nbytes == 4 * x.numel() and ct.packed.numel() == 4 * x.numel()
    assert torch.equal(ct.packed, x.reshape(-1).view(torch.uint8))
    assert_same_bits(ct.decompress(), x)
    again = CompressedTensor.from_bytes(ct.to_bytes())
    assert again.format == Float32Format()
    assert_same_bits(again.decompress(), x)
    y = -x.flip(0)
    assert_same_bits(ct.assign_(y, rounding, generator=4).decompress(), y)
    assert ct.decompress(torch.float64).dtype == torch.float64


def test_a_transform_on_a_lossless_format_is_refused():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="takes no transform"):
        CompressedTensor.compress(x, "fp32", Transform("scale", 0.5))
    packed = x.view(torch.uint8).clone()
    with pytest.raises(ValueError, match="takes no transform"):
        CompressedTensor(packed, "fp32", (8,), Transform("affine", 1.0, 1.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_input_is_an_error(bad):
    x = torch.ones(5)
    x[3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        get_format("fp32").quantize(x)
    with pytest.raises(ValueError, match="non-finite"):
        CompressedTensor.compress(x, "fp32")
    ct = CompressedTensor.compress(torch.ones(5), "fp32")
    with pytest.raises(ValueError, match="non-finite"):
        ct.assign_(x)
    with kernels.disabled():
        with pytest.raises(ValueError, match="non-finite"):
            CompressedTensor.compress(x, "fp32")


def test_packing_takes_exactly_four_bytes_a_value():
    x = hard_values(1001)
    codes = bits(x)
    packed = pack_bits(codes, 32)
    assert packed_nbytes(1001, 32) == packed.numel() == 4004
    assert torch.equal(packed, x.view(torch.uint8))  # the raw little-endian bytes
    assert torch.equal(unpack_bits(packed, 32, 1001), codes)
    shifted = torch.empty(4005, dtype=torch.uint8)[1:]  # not word aligned
    pack_bits(codes, 32, out=shifted)
    assert torch.equal(unpack_bits(shifted, 32, 1001), codes)
    assert torch.equal(pack_bits(codes.long(), 32), packed)  # int64 in range
    with pytest.raises(ValueError, match="outside"):
        pack_bits(torch.tensor([2**31]), 32)
    for width in (17, 24, 31, 33):
        with pytest.raises(ValueError, match="1..16 or 32"):
            packed_nbytes(4, width)


# ---------------------------------------------------------------- kernels
@native
@pytest.mark.parametrize("n", [29, 4096 + 3, 2 * 32768 + 17])  # 2 chunks: threads
def test_native_kernels_equal_the_torch_fallback(n):
    fmt = get_format("fp32")
    x = hard_values(n, seed=n)
    spec = fmt.spec
    for packed in (True, False):
        codes = torch.empty(4 * n if packed else n, dtype=torch.uint8)
        codes = codes if packed else torch.empty(n, dtype=torch.int32)
        kernels.encode(x, codes, spec, packed=packed, stochastic_key=5)
        assert torch.equal(codes.view(torch.int32), bits(x))
        # value * multipliers... + shift, in float32, in order
        for factors, shift in [((), None), ((2.0,), None), ((0.5, 4.0), -1.0)]:
            out = kernels.decode(codes, torch.empty(n), spec, factors, shift, packed)
            expected = x.clone()
            for factor in factors:
                expected.mul_(factor)
            if shift is not None:
                expected.add_(shift)
            assert_same_bits(out, expected, (packed, factors, shift))
    with kernels.disabled():
        assert_same_bits(fmt.dequantize(fmt.quantize(x), 2.0), x * 2.0)
    assert_same_bits(fmt.dequantize(fmt.quantize(x), 2.0), x * 2.0)
    fast = CompressedTensor.compress(x, "fp32", rounding="stochastic")
    with kernels.disabled():
        slow = CompressedTensor.compress(x, "fp32", rounding="stochastic")
        assert_same_bits(slow.decompress(), x)
        assert torch.equal(fmt.quantize(x), bits(x))
    assert fast.to_bytes() == slow.to_bytes()
    assert_same_bits(fast.decompress(), x)
    # Block-wise state: the kernels' block codes are the fallback's bytes.
    for sqrt in (False, True):
        values = x.abs() if sqrt else x
        block_fast = BlockwiseTensor.compress(values, "fp32", block=64, sqrt=sqrt)
        with kernels.disabled():
            block_slow = BlockwiseTensor.compress(values, "fp32", block=64, sqrt=sqrt)
            assert_same_bits(block_slow.decompress(), values)
        assert block_fast.to_bytes() == block_slow.to_bytes()
        assert_same_bits(block_fast.decompress(), values)


@native
@pytest.mark.parametrize(
    "settings",
    [
        SGDSettings(lr=0.1),
        SGDSettings(lr=0.05, momentum=0.9, weight_decay=1e-3),
        SGDSettings(lr=0.05, momentum=0.9, dampening=0.1, nesterov=True),
    ],
)
def test_native_sgd_step_on_codes_equals_the_torch_fallback(settings):
    """The kernel decodes the codes inside the step: the same bits as the
    fallback's decompress and ``torch.optim.SGD`` arithmetic."""
    n = 2 * 32768 + 5
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, generator=gen)
    codes = CompressedTensor.compress(weight, "fp32")
    momentum = None
    fallback_momentum = None
    for step in range(3):
        grad = torch.randn(n, generator=gen)
        fast = sgd_step_(torch.empty(n), grad, momentum, settings, codes=codes)
        with kernels.disabled():
            value = torch.empty(n)
            slow = sgd_step_(value, grad, fallback_momentum, settings, codes=codes)
        assert fast.nonfinite_grad == slow.nonfinite_grad == 0
        momentum, fallback_momentum = fast.momentum_buffer, slow.momentum_buffer
        if settings.momentum:
            assert_same_bits(momentum, fallback_momentum, step)
        assert fast.minmax == (float(value.min()), float(value.max()))
        codes.assign_(value)


# ----------------------------------------------------------------- state
def test_block_state_keeps_the_values_themselves():
    x = hard_values(1000).abs()
    state = BlockwiseTensor.compress(x, "fp32", block=256, sqrt=True)
    assert not state.sqrt and bool((state.scales == 1.0).all())
    assert state.nbytes == 4 * 1000 + 4 * 4
    assert_same_bits(state.decompress(), x)
    assert_same_bits(BlockwiseTensor.from_bytes(state.to_bytes()).decompress(), x)
    with pytest.raises(ValueError, match="unit scales"):
        BlockwiseTensor(state.packed, state.scales * 2, "fp32", (1000,), 256)
    storage = OMCConfig(state_format="fp32").state_storage()
    stored = storage.store("exp_avg_sq", x)
    assert_same_bits(stored.decompress(), x)


def test_the_plan_says_no_transform_is_applied():
    config = OMCConfig(format="fp32", fp32_fraction=0.0)
    plan = make_plan([("w", (4, 3)), ("b", (4,))], config)
    assert plan["w"].format == "fp32" and plan["w"].nbytes == 48
    assert plan["w"].reason == "matrix; lossless: no scale"
    assert plan.nbytes == plan.float32_nbytes
    rows = plan.table().splitlines()
    assert rows[1].split()[3] == "fp32" and rows[2].split()[3] == "float32"
    assert config.bits_of("w") == 32
    none = make_plan([("w", (4, 3))], OMCConfig(format="fp32", transform="none"))
    assert none["w"].reason == "matrix"


# ----------------------------------------------------- modules and steps
def model_and_twin(name, config):
    torch.manual_seed(0)
    base = MODELS[name]()
    twin, model = copy.deepcopy(base), copy.deepcopy(base)
    handle = compress_module(model, config)
    assert handle.plan.compressed and all(
        slot.codes.format == Float32Format() for slot in handle.slots.values()
    )
    batch = (torch.randn(2, 16, FEATS), torch.ones(2), torch.randint(1, VOCAB, (2, 5)))
    return model, handle, twin, batch


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compressed_module_gives_float32_outputs_and_gradients(name):
    config = OMCConfig(format="fp32", update_mode="simple", fp32_fraction=0.1)
    model, handle, twin, batch = model_and_twin(name, config)
    loss, expected = model.loss(*batch), twin.loss(*batch)
    assert_same_bits(loss, expected)
    loss.backward()
    expected.backward()
    params = dict(twin.named_parameters())
    for pname, param in model.named_parameters():
        assert_same_bits(param.grad, params[pname].grad, pname)


STEPS = {
    "sgd": ("SGD", dict(lr=0.05)),
    "sgd momentum decay": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd nesterov": (
        "SGD",
        dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    ),
    "sgd dampening": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2)),
    "adam": ("Adam", dict(lr=1e-2, weight_decay=1e-3)),
    "adamw": ("AdamW", dict(lr=1e-2, weight_decay=0.01)),
}


def stored(buffer) -> torch.Tensor:
    if isinstance(buffer, BlockwiseTensor):
        return buffer.decompress()
    return buffer


# Every rule with float32 and lossless block state on the conformer (plain
# SGD has no state); the LSTM model (other weight kinds) with two of them.
CASES = [
    ("conformer_RelPosMHAXL", step, state)
    for step in sorted(STEPS)
    for state in (None, "fp32")
    if not (step == "sgd" and state)
] + [("CRDNN_LSTM", "sgd nesterov", "fp32"), ("CRDNN_LSTM", "adamw", "fp32")]


@pytest.mark.parametrize("name, step, state_format", CASES)
def test_fused_steps_equal_torch_optim_in_float32(name, step, state_format):
    """Fused updates (in backward, optimizer state stored float32 or in the
    lossless block format) leave the weights and the state of a torch
    optimizer stepping a float32 twin, bit for bit, step after step."""
    opt_name, kwargs = STEPS[step]
    config = OMCConfig(format="fp32", state_format=state_format, fp32_fraction=0.1)
    model, handle, twin, batch = model_and_twin(name, config)
    optimizer = getattr(torch.optim, opt_name)(model.parameters(), **kwargs)
    twin_opt = getattr(torch.optim, opt_name)(twin.parameters(), **kwargs)
    handle.set_rule(settings_from_optimizer(optimizer))
    params = dict(twin.named_parameters())
    for i in range(3):
        loss = model.loss(*batch)
        loss.backward()
        handle.step()
        optimizer.step()
        optimizer.zero_grad()
        expected = twin.loss(*batch)
        expected.backward()
        twin_opt.step()
        twin_opt.zero_grad()
        assert_same_bits(loss, expected, i)
        for pname, slot in handle.slots.items():
            assert_same_bits(slot.codes.decompress(), params[pname], (i, pname))
            state = handle.state[pname].optimizer
            twin_state = twin_opt.state[params[pname]]
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if key in twin_state:
                    got = stored(state[key])
                    assert_same_bits(got, twin_state[key], (i, pname, key))
            if "step" in twin_state:
                assert state["step"] == int(twin_state["step"])
    for pname, param in model.named_parameters():
        if pname not in handle.slots:  # the float32 ones: the optimizer's own
            assert_same_bits(param, params[pname], pname)


@pytest.mark.parametrize("opt_name", ["SGD", "AdamW"])
def test_a_followed_optimizer_and_its_schedule_equal_float32_training(opt_name):
    """A plain loop that calls handle.follow(optimizer) once trains as the
    float32 twin does under the same learning-rate schedule, bit for bit."""
    config = OMCConfig(format="fp32", fp32_fraction=0.1)
    model, handle, twin, batch = model_and_twin("conformer_RelPosMHAXL", config)
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    optimizer = getattr(torch.optim, opt_name)(model.parameters(), **kwargs)
    twin_opt = getattr(torch.optim, opt_name)(twin.parameters(), **kwargs)
    handle.follow(optimizer)
    schedules = [
        torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for opt in (optimizer, twin_opt)
    ]
    for _ in range(3):
        for net, opt, schedule in zip((model, twin), (optimizer, twin_opt), schedules):
            net.loss(*batch).backward()
            if net is model:
                handle.step()
            opt.step()
            opt.zero_grad()
            schedule.step()
    assert handle.updates.rule.lr == kwargs["lr"] * 0.25  # the third step's
    params = dict(twin.named_parameters())
    for pname, param in model.named_parameters():
        assert_same_bits(param.detach(), params[pname], pname)


def test_follow_refuses_what_fused_mode_cannot_run_and_a_lost_optimizer():
    model = torch.nn.Linear(4, 2)
    handle = compress_module(model, OMCConfig(format="e3m7", fp32_fraction=0.0))
    with pytest.raises(ValueError, match="update_mode='simple'"):
        handle.follow(torch.optim.RMSprop(model.parameters()))
    handle.follow(torch.optim.SGD(model.parameters(), lr=0.1))  # then dropped
    with pytest.raises(RuntimeError, match="no longer exists"):
        model(torch.ones(1, 4)).sum().backward()  # the update runs in backward
    # A copy follows nothing: it takes the settings it was copied with.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle.zero_grad()
    handle.follow(optimizer)
    twin = copy.deepcopy(model)
    optimizer.param_groups[0]["lr"] = 0.5
    twin(torch.ones(1, 4)).sum().backward()
    twin_handle = speechbrain_omc.handle_of(twin)
    twin_handle.step()
    assert twin_handle.updates.rule.lr == 0.1


# ---------------------------------------------------------- wire, server
def test_the_wire_carries_fp32_entries_exactly():
    x = hard_values(600).view(20, 30)
    entries = {"w": CompressedTensor.compress(x, "fp32"), "b": torch.randn(30)}
    data = wire.encode(entries, {"type": "update"})
    message = wire.decode(data, expect=wire.expect_like(entries))
    assert message.formats() == {"w": "fp32", "b": "float32"}
    assert_same_bits(message.entries["w"].decompress(), x)
    assert wire.entry_nbytes("w", entries["w"]) - wire.entry_nbytes("w", x) < 64
    lazy = wire.decode(data, lazy=True)
    assert_same_bits(lazy.entry("w").decompress(), x)


def train_like_a_client(data: bytes, step: float) -> bytes:
    """An honest reply whose values moved by arithmetic that rounds."""
    received = wire.decode(data)
    moved = {}
    for name, value in received.entries.items():
        if isinstance(value, CompressedTensor):
            new = value.decompress().mul_(0.9).add_(step / 3)
            moved[name] = CompressedTensor.compress(new, value.format)
        else:
            moved[name] = value.mul(0.9).add_(step / 3)
    return honest_reply(wire.encode(moved, received.meta), shift=0.0)


def test_the_server_aggregates_fp32_replies_as_float32_replies():
    """Same seed, same replies' values: the lossless federation's broadcasts
    and global model are the float32 federation's, round after round (plans
    re-drawn per round and client, server momentum on)."""
    gen = torch.Generator().manual_seed(0)
    model = {
        "a.weight": torch.randn(16, 8, generator=gen),
        "a.bias": torch.randn(16, generator=gen),
        "b.weight": torch.randn(12, 16, generator=gen),
        "c.weight": torch.randn(4, 12, generator=gen),
    }
    omc = OMCConfig(format="fp32", fp32_fraction=0.4, fp32_policy="random", seed=3)
    clients = ["c0", "c1", "c2", "c3"]
    servers = [
        FedAvgServer(model, clients, 3, omc=config, seed=7, server_momentum=0.5)
        for config in (omc, None)
    ]
    formats = set()
    for _ in range(3):
        messages = [server.configure_round() for server in servers]
        assert list(messages[0]) == list(messages[1])
        replies = []
        for server_messages in messages:
            replies.append(
                {
                    c: train_like_a_client(m, float(i))
                    for i, (c, m) in enumerate(server_messages.items())
                }
            )
        for client, data in messages[0].items():
            received = wire.decode(data)
            formats |= set(received.formats().values())
            for name, value in received.decompressed().items():
                expected = wire.decode(messages[1][client]).entries[name]
                assert_same_bits(value, expected, name)
        reports = [s.aggregate(r) for s, r in zip(servers, replies)]
        assert reports[0].accepted == reports[1].accepted == sorted(replies[0])
        for name in model:
            assert_same_bits(servers[0].model[name], servers[1].model[name], name)
    assert formats == {"fp32", "float32"}


def test_a_reply_with_nonfinite_bits_is_rejected():
    model = {"w": torch.randn(6, 4)}
    server = FedAvgServer(
        model, ["c0"], 1, omc=OMCConfig(format="fp32", fp32_fraction=0.0), seed=1
    )
    honest = wire.decode(honest_reply(server.configure_round()["c0"]))
    packed = honest.entries["w"].packed.clone()
    packed.view(torch.float32)[5] = math.nan  # bits no encoder produces
    forged = CompressedTensor(packed, "fp32", (6, 4), Transform())
    report = server.aggregate({"c0": wire.encode({"w": forged}, honest.meta)})
    assert report.accepted == [] and "non-finite" in report.rejected["c0"]


# ------------------------------------------------------------ checkpoints
def brain(folder, omc=None):
    torch.manual_seed(0)
    net = network()
    counter = sb.utils.epoch_loop.EpochCounter(limit=10)
    made = Regressor(
        modules={"net": net},
        opt_class=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        hparams={"omc": omc} if omc is not None else {},
        # Fused clipping is not SpeechBrain's clipping: out of the way here.
        run_opts={"max_grad_norm": 1e9},
        checkpointer=Checkpointer(folder, {"net": net, "counter": counter}),
    )
    made.counter = counter
    return made


def test_checkpoints_and_the_float32_export_hold_float32_training(tmp_path):
    """An OMC Brain under fp32 trains what the float32 Brain trains; its
    checkpoint recovers those bits and its float32 export holds them."""
    omc = OMCConfig(format="fp32", state_format="fp32", fp32_fraction=0.0)
    runs = {}
    for label, config in (("omc", omc), ("float32", None)):
        made = brain(tmp_path / label, config)
        made.on_fit_start()
        for batch in batches(3):
            made.fit_batch(batch)
        made.checkpointer.save_checkpoint(name="end")
        runs[label] = (made, decoded_state(made.modules.net))
    omc_brain, state = runs["omc"]
    assert len(omc_brain.omc.slots) == 2
    for key, value in runs["float32"][1].items():
        assert_same_bits(state[key], value, key)
    resumed = brain(tmp_path / "omc", omc)
    resumed.on_fit_start()  # compresses, then recovers the checkpoint
    for key, value in decoded_state(resumed.modules.net).items():
        assert_same_bits(value, state[key], key)
    export_checkpoints(tmp_path / "omc", tmp_path / "export", progress=False)
    (exported,) = (tmp_path / "export").glob("CKPT+*")
    plain = torch.load(exported / "net.ckpt", weights_only=True)
    for key, value in state.items():  # float32 (a batch counter: int64)
        assert_same_bits(plain[key], value, key)
