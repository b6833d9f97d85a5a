"""The engine: storage, on-the-fly decompression, fused and simple updates."""

import copy
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from speechbrain_omc import CompressedTensor, OMCConfig, compress_module
from speechbrain_omc.engine.parameter import CompressedParameter
from speechbrain_omc.engine.selection import round_seed


def reference_step(
    codes: CompressedTensor, grad, lr, name, seed=0, step=0, rounding="stochastic"
):
    """Decompress, float32 SGD step, compress: what a fused step must equal."""
    value = codes.decompress().add_(grad, alpha=-lr)  # as torch.optim.SGD
    key = round_seed(seed, step, name)
    expected = copy.deepcopy(codes)
    expected.assign_(value, rounding=rounding, generator=key)
    return expected.decompress()


def float_twin(factory, handle):
    """A plain float32 model holding a compressed model's decompressed values."""
    twin = factory()
    twin.load_state_dict(handle.decompressed_state_dict())
    return twin


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_compressed_parameters_stay_parameters_over_packed_codes():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="e3m7"))
    names = [n for n, _ in model.named_parameters()]
    assert names == ["a.weight", "a.bias", "b.weight", "b.bias"]
    assert isinstance(model.a.weight, torch.nn.Parameter)
    assert isinstance(model.a.weight, CompressedParameter)
    assert set(handle.slots) == {"a.weight", "b.weight"}
    expected = math.ceil(512 * 11 / 8) + 4 + math.ceil(128 * 11 / 8) + 4 + 4 * (32 + 4)
    assert handle.parameter_bytes() == expected == handle.plan.nbytes
    assert model.a.weight.shape == (32, 16)
    assert model.a.weight.dtype == torch.float32


def test_forward_equals_float_model_with_decompressed_weights():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="e4m3"))
    twin = float_twin(type(model), handle)
    x = torch.randn(8, 16)
    assert torch.equal(model(x), twin(x))


def test_the_graph_saves_compressed_weights_never_float_copies():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="e3m7"))
    handle.set_sgd(lr=0.1)
    saved = []

    def pack(t):
        saved.append((type(t).__name__, tuple(t.shape)))
        return t

    x = torch.randn(8, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    weights = {(32, 16), (16, 32), (4, 32), (32, 4)}
    assert [kind for kind, shape in saved if shape in weights] == [
        "CompressedParameter"
    ] * 2
    assert handle.live_bytes == 0
    assert handle.peak_live_bytes == 32 * 16 * 4  # the larger weight, alone
    handle.reset_peak()
    out.sum().backward()
    assert handle.live_bytes == 0
    # backward: a decoded weight for the input gradient, then its update
    assert 0 < handle.peak_live_bytes <= 2 * 32 * 16 * 4


INPUTS = {
    "rows": lambda: torch.randn(5, 16),
    "batch": lambda: torch.randn(3, 7, 16),
    "strided batch": lambda: torch.randn(7, 3, 16).transpose(0, 1),
    "4-D": lambda: torch.randn(2, 3, 4, 16),
    "strided 4-D": lambda: torch.randn(3, 2, 4, 16).transpose(0, 1),
    "time-major": lambda: torch.randn(3, 7, 16).permute(1, 0, 2),
    # SpeechBrain's Conv1d output at batch size 1: rows in column-major order
    "column-major": lambda: torch.randn(1, 16, 7).transpose(1, 2),
    "column-major rows": lambda: torch.randn(16, 7).t(),
    "vector": lambda: torch.randn(16),
}


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_bit_exact_and_decodes_once_each_way(kind, bias):
    """F.linear with a compressed weight gives float32's outputs and
    gradients bit for bit; where ATen computes one product of rows, the
    weight is decoded once in forward and once in backward and autograd
    saves the parameter itself (no view dispatch)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=bias)
    handle = compress_module(
        layer, OMCConfig(format="e3m7", update_mode="simple", fp32_fraction=0.0)
    )
    twin = float_twin(lambda: torch.nn.Linear(16, 8, bias=bias), handle)
    slot = handle.slots["weight"]
    decode, calls = slot.decode, []
    slot.decode = lambda s: calls.append(1) or decode(s)
    x = INPUTS[kind]().requires_grad_()
    x_twin = x.detach().clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    expected = twin(x_twin)
    assert torch.equal(out, expected)
    out.masked_fill_(out > 1.0, 0.0)  # in place on the output, as Conformer does
    expected.masked_fill_(expected > 1.0, 0.0)
    (out * torch.arange(8.0)).sum().backward()
    (expected * torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, x_twin.grad)
    assert torch.equal(layer.weight.grad, twin.weight.grad)
    if bias:
        assert torch.equal(layer.bias.grad, twin.bias.grad)
    # Where ATen folds rows into one product: not a vector, nor, with a
    # bias, a contiguous 4-D batch (generic path, also bit for bit).
    fast = kind != "vector" and not (kind == "4-D" and bias)
    assert any(t is layer.weight for t in saved) == fast
    if fast:
        assert len(calls) == 2
    with torch.no_grad():
        assert torch.equal(layer(x), twin(x))


CONVOLUTIONS = {
    # SpeechBrain's CNN front end, Conformer's depthwise and pointwise ones
    "conv2d strided": (lambda: torch.nn.Conv2d(3, 5, 3, stride=2), (2, 3, 9, 11)),
    "depthwise": (lambda: torch.nn.Conv1d(4, 4, 5, padding=2, groups=4), (2, 4, 9)),
    "pointwise": (lambda: torch.nn.Conv1d(4, 6, 1, bias=False), (3, 4, 9)),
    "dilated": (lambda: torch.nn.Conv1d(4, 6, 3, dilation=2, padding=(2,)), (2, 4, 9)),
    # the generic path: an unbatched input, a padding ATen computes itself,
    # a grouped 2-D convolution
    "grouped conv2d": (lambda: torch.nn.Conv2d(4, 4, 3, groups=2), (2, 4, 7, 7)),
    "unbatched": (lambda: torch.nn.Conv1d(4, 6, 3), (4, 9)),
    "same": (lambda: torch.nn.Conv1d(4, 6, 3, padding="same"), (2, 4, 9)),
}


@pytest.mark.parametrize("kind", sorted(CONVOLUTIONS))
def test_convolution_is_bit_exact_and_decodes_once_each_way(kind):
    """conv1d/conv2d with a compressed weight give float32's outputs and
    gradients bit for bit, saving the compressed weight for backward; a
    batched input with numeric padding skips per-op dispatch: one decode in
    forward, one in backward."""
    factory, shape = CONVOLUTIONS[kind]
    torch.manual_seed(0)
    conv = factory()
    handle = compress_module(
        conv, OMCConfig(format="e3m7", update_mode="simple", fp32_fraction=0.0)
    )
    twin = float_twin(factory, handle)
    slot = handle.slots["weight"]
    decode, calls = slot.decode, []
    slot.decode = lambda s: calls.append(1) or decode(s)
    x = torch.randn(shape, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        out = conv(x)
    expected = twin(x_twin)
    assert torch.equal(out, expected)
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.equal(x.grad, x_twin.grad)
    assert torch.equal(conv.weight.grad, twin.weight.grad)
    if conv.bias is not None:
        assert torch.equal(conv.bias.grad, twin.bias.grad)
    # The graph keeps the compressed weight, never a float32 copy of it.
    assert any(t is conv.weight for t in saved)
    assert not any(
        type(t) is torch.Tensor and t.shape == conv.weight.shape for t in saved
    )
    if kind not in ("unbatched", "same", "grouped conv2d"):
        assert len(calls) == 2
    with torch.no_grad():
        assert torch.equal(conv(x), twin(x))
    as_keywords = torch.nn.functional.conv1d if x.dim() == 3 else None
    if as_keywords is not None and conv.padding != "same":
        keywords = dict(stride=conv.stride, padding=conv.padding, groups=conv.groups)
        got = as_keywords(x, conv.weight, bias=conv.bias, **keywords)
        assert torch.equal(got, as_keywords(x, twin.weight, bias=twin.bias, **keywords))
    # A frozen weight: only the input's gradient, as float32's.
    conv.weight.requires_grad_(False)
    twin.weight.requires_grad_(False)
    x.grad = x_twin.grad = None
    (conv(x) * weights).sum().backward()
    (twin(x_twin) * weights).sum().backward()
    assert torch.equal(x.grad, x_twin.grad)


def test_a_second_derivative_through_a_compressed_convolution_is_float32s():
    """A gradient penalty differentiates the convolution's backward: it goes
    through the generic dispatch, and gives float32's values bit for bit."""
    torch.manual_seed(0)
    factory = lambda: torch.nn.Conv1d(4, 6, 3)  # noqa: E731
    conv = factory()
    config = OMCConfig(format="e3m7", update_mode="simple", fp32_fraction=0.0)
    twin = float_twin(factory, compress_module(conv, config))
    x = torch.randn(2, 4, 9, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    for net, inp in ((conv, x), (twin, x_twin)):
        (grad,) = torch.autograd.grad((net(inp) ** 2).sum(), inp, create_graph=True)
        (grad**2).sum().backward()
    assert torch.equal(x.grad, x_twin.grad)
    assert torch.equal(conv.weight.grad, twin.weight.grad)
    assert torch.equal(conv.bias.grad, twin.bias.grad)


def test_vmap_over_compressed_layers_takes_the_generic_path():
    torch.manual_seed(0)
    conv, linear = torch.nn.Conv1d(2, 4, 3), torch.nn.Linear(9 - 2, 5)
    config = OMCConfig(format="e3m7", update_mode="simple", fp32_fraction=0.0)
    compress_module(conv, config), compress_module(linear, config)
    x = torch.randn(3, 2, 2, 9)  # vmapped over 3 batches of 2
    got = torch.func.vmap(lambda b: linear(conv(b)))(x)
    assert torch.equal(got, torch.stack([linear(conv(b)) for b in x]))


def test_integer_like_convolution_arguments_are_taken_as_aten_takes_them():
    import numpy as np

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(2, 4, 3)
    config = OMCConfig(format="e3m7", update_mode="simple", fp32_fraction=0.0)
    twin = float_twin(lambda: torch.nn.Conv1d(2, 4, 3), compress_module(conv, config))
    x = torch.randn(2, 2, 9)
    for stride in (np.int64(2), torch.tensor(2), [2], (2,)):
        got = torch.nn.functional.conv1d(x, conv.weight, conv.bias, stride=stride)
        want = torch.nn.functional.conv1d(x, twin.weight, twin.bias, stride=2)
        assert torch.equal(got, want)
    with pytest.raises(TypeError):
        torch.nn.functional.conv1d(x, conv.weight, conv.bias, stride=1.5)


def test_fused_step_equals_decompress_sgd_compress():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="e3m7", seed=5))
    handle.set_sgd(lr=0.1)
    twin = float_twin(type(model), handle)
    before = {n: copy.deepcopy(s.codes) for n, s in handle.slots.items()}
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    loss_of(twin, x, y).backward()
    loss_of(model, x, y).backward()
    for name, slot in handle.slots.items():
        grad = twin.get_parameter(name).grad
        expected = reference_step(before[name], grad, 0.1, name, seed=5)
        assert torch.equal(slot.codes.decompress(), expected), name


@pytest.mark.parametrize(
    "momentum,weight_decay,nesterov",
    [(0, 0, False), (0.9, 1e-3, False), (0.9, 0, True)],
)
def test_fused_and_simple_modes_agree_bit_for_bit(momentum, weight_decay, nesterov):
    torch.manual_seed(0)
    base = TwoLayer()
    models, handles, opts = [], [], []
    for mode in ("fused", "simple"):
        model = copy.deepcopy(base)
        handle = compress_module(model, OMCConfig(format="e3m7", update_mode=mode))
        opt = torch.optim.SGD(
            model.parameters(),
            lr=0.05,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )
        handle.set_sgd(
            lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )
        models.append(model), handles.append(handle), opts.append(opt)
    torch.manual_seed(1)
    batches = [(torch.randn(8, 16), torch.randn(8, 4)) for _ in range(6)]
    for x, y in batches:
        losses = []
        for model, handle, opt in zip(models, handles, opts):
            loss = loss_of(model, x, y)
            loss.backward()
            opt.step()
            handle.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == losses[1]
    for name in handles[0].slots:
        assert (
            handles[0].slots[name].codes.to_bytes()
            == handles[1].slots[name].codes.to_bytes()
        )
    assert torch.equal(models[0].a.bias, models[1].a.bias)


class Tied(torch.nn.Module):
    """A weight read three times: embedding, output projection, a second call."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 8)
        self.proj = torch.nn.Linear(8, 12, bias=False)
        self.proj.weight = self.emb.weight
        self.mid = torch.nn.Linear(8, 8)

    def forward(self, tokens):
        h = self.mid(self.mid(self.emb(tokens)))  # mid is called twice
        return self.proj(h)


def test_weight_used_several_times_gets_one_correct_update():
    torch.manual_seed(0)
    model = Tied()
    handle = compress_module(model, OMCConfig(format="bf16", seed=2))
    handle.set_sgd(lr=0.2)
    assert set(handle.slots) == {"emb.weight", "mid.weight"}
    twin = float_twin(type(model), handle)
    assert twin.proj.weight is twin.emb.weight
    before = {n: copy.deepcopy(s.codes) for n, s in handle.slots.items()}
    tokens = torch.randint(0, 12, (4, 5))
    target = torch.randint(0, 12, (4, 5))

    def loss(m):
        return torch.nn.functional.cross_entropy(m(tokens).transpose(1, 2), target)

    loss(twin).backward()
    loss(model).backward()
    for name, slot in handle.slots.items():
        expected = reference_step(
            before[name], twin.get_parameter(name).grad, 0.2, name, seed=2
        )
        assert torch.equal(slot.codes.decompress(), expected), name
        assert handle.state[name].steps == 1


def test_lstm_and_multihead_attention_weights():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "rnn": torch.nn.LSTM(
                6, 8, num_layers=2, batch_first=True, bidirectional=True
            ),
            "mha": torch.nn.MultiheadAttention(16, 2, batch_first=True),
        }
    )
    fresh = copy.deepcopy(model)
    handle = compress_module(model, OMCConfig(format="e5m10", seed=1))
    handle.set_sgd(lr=0.1)
    assert (
        "mha.in_proj_weight" in handle.slots and "mha.out_proj.weight" in handle.slots
    )
    assert "rnn.weight_hh_l1_reverse" in handle.slots
    twin = float_twin(lambda: copy.deepcopy(fresh), handle)
    before = {n: copy.deepcopy(s.codes) for n, s in handle.slots.items()}
    x = torch.randn(3, 5, 6)

    def loss(m):
        h, _ = m["rnn"](x)
        a, _ = m["mha"](h, h, h)
        return a.pow(2).mean()

    assert torch.equal(loss(model.eval()), loss(twin.eval()))
    model.train(), twin.train()
    loss(twin).backward()
    loss(model).backward()
    assert handle.live_bytes == 0
    for name, slot in handle.slots.items():
        expected = reference_step(
            before[name], twin.get_parameter(name).grad, 0.1, name, seed=1
        )
        assert torch.equal(slot.codes.decompress(), expected), name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_update(use_reentrant):
    torch.manual_seed(0)
    base = TwoLayer()
    results = []
    for ckpt in (False, True):
        model = copy.deepcopy(base)
        handle = compress_module(model, OMCConfig(format="e3m7"))
        handle.set_sgd(lr=0.1)
        x = torch.randn(
            8, 16, generator=torch.Generator().manual_seed(3), requires_grad=True
        )
        if ckpt:
            h = checkpoint(model.a, x, use_reentrant=use_reentrant)
            out = checkpoint(model.b, torch.tanh(h), use_reentrant=use_reentrant)
        else:
            out = model(x)
        out.pow(2).mean().backward()
        handle.step()
        results.append({n: s.codes.to_bytes() for n, s in handle.slots.items()})
        assert all(s.steps == 1 for s in handle.state.values())
    assert results[0] == results[1]


def test_no_grad_evaluation_updates_nothing():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig())
    before = {n: s.codes.to_bytes() for n, s in handle.slots.items()}
    with torch.no_grad():
        out = model(torch.randn(2, 16))
    assert not out.requires_grad
    handle.step()
    assert before == {n: s.codes.to_bytes() for n, s in handle.slots.items()}


def test_nonfinite_gradient_skips_the_update_with_a_warning():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig())
    handle.set_sgd(lr=0.1)
    before = {n: s.codes.to_bytes() for n, s in handle.slots.items()}
    x = torch.randn(2, 16)
    x[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="a.weight has .* non-finite"):
        model(x).sum().backward()
    # a's gradient holds inf * x; b sees tanh-saturated, finite inputs.
    assert before["a.weight"] == handle.slots["a.weight"].codes.to_bytes()
    assert before["b.weight"] != handle.slots["b.weight"].codes.to_bytes()
    assert handle.skipped_updates == 1

    strict = TwoLayer()
    handle = compress_module(strict, OMCConfig(nonfinite_grad="raise"))
    handle.set_sgd(lr=0.1)
    with pytest.raises(FloatingPointError, match="non-finite"):
        strict(x).sum().backward()


def test_fused_update_without_learning_rate_is_a_clear_error():
    model = TwoLayer()
    compress_module(model, OMCConfig())
    with pytest.raises(RuntimeError, match="learning rate"):
        model(torch.randn(2, 16)).sum().backward()


def test_state_dict_keeps_names_and_round_trips_payloads():
    torch.manual_seed(0)
    model = TwoLayer()
    names = list(model.state_dict())
    handle = compress_module(model, OMCConfig(format="e3m7"))
    state = model.state_dict()
    assert list(state) == names or set(state) == set(names)
    assert state["a.weight"].dtype == torch.uint8

    other = TwoLayer()
    other_handle = compress_module(other, OMCConfig(format="e3m7"))
    other.load_state_dict(state)
    for name, slot in handle.slots.items():
        assert other_handle.slots[name].codes.to_bytes() == slot.codes.to_bytes()
    assert torch.equal(other.a.bias, model.a.bias)

    plain = TwoLayer()
    plain.load_state_dict(handle.decompressed_state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(plain(x), model(x))


def test_loading_float_weights_and_bad_payloads():
    torch.manual_seed(0)
    source = TwoLayer()
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="bf16", transform="none"))
    model.load_state_dict(source.state_dict())
    assert torch.equal(model.a.weight, source.a.weight.to(torch.bfloat16).float())
    bad = source.state_dict()
    bad["a.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="does not match"):
        model.load_state_dict(bad)
    truncated = model.state_dict()
    truncated["b.weight"] = truncated["b.weight"][:-3]
    with pytest.raises(RuntimeError, match="b.weight"):
        model.load_state_dict(truncated)
    del handle


def test_restore_brings_back_float_parameters():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="e4m3"))
    value = model.a.weight.detach().clone()
    handle.restore()
    assert isinstance(model.a.weight, torch.nn.Parameter)
    assert torch.equal(model.a.weight.detach(), value)
    assert type(model.a) is torch.nn.Linear
    compress_module(model, OMCConfig())  # can be compressed again


def test_in_place_writes_and_data_assignment_are_encoded():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="e3m7"))
    with torch.no_grad():
        model.a.weight.zero_()
    assert float(model.a.weight.detach().abs().sum()) == 0.0
    torch.nn.init.ones_(model.b.weight)
    assert torch.equal(model.b.weight, torch.ones(4, 32))
    model.a.weight.data = torch.full((32, 16), 0.5)
    assert torch.equal(model.a.weight, torch.full((32, 16), 0.5))
    with torch.no_grad():
        model.a.weight[0].fill_(2.0)  # a write through a view
    weight = model.a.weight.detach()
    assert float(weight[0, 3]) == 2.0 and float(weight[1, 3]) == 0.5
    assert isinstance(model.a.weight, CompressedParameter)
    assert handle.parameter_bytes() == handle.plan.nbytes


def test_backward_again_after_an_update_is_refused():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig())
    handle.set_sgd(lr=0.1)
    x = torch.randn(2, 16, requires_grad=True)
    loss = model(x).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_parameter_bytes_of_a_submodule_counts_its_compressed_weights():
    from speechbrain_omc import parameter_bytes

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"net": TwoLayer()})
    handle = compress_module(model, OMCConfig(format="e3m7"))
    assert parameter_bytes(model) == handle.parameter_bytes()
    expected_a = math.ceil(512 * 11 / 8) + 4 + 4 * 32
    assert parameter_bytes(model["net"].a) == expected_a


def test_codes_follow_the_module_to_another_device():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="e3m7"))
    before = {n: s.codes.packed.clone() for n, s in handle.slots.items()}
    model.to("meta")
    for name, slot in handle.slots.items():
        assert slot.codes.device.type == "meta", name
        assert slot.codes.packed.shape == before[name].shape
    assert model.a.weight.device.type == "meta"
    assert isinstance(model.a.weight, CompressedParameter)
    # Without kernels there, the torch reference decodes on that device.
    out = model(torch.randn(2, 16, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4)


def test_module_casts_change_the_compute_dtype_not_the_codes():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="e3m7"))
    codes = {n: s.codes.packed for n, s in handle.slots.items()}
    x0 = torch.randn(3, 16)
    reference = model(x0).detach()
    weight = model.a.weight
    model.double()
    assert model.a.weight is weight  # the same parameter, now a float64 view
    assert model.a.weight.dtype == torch.float64 and model.a.bias.dtype == torch.float64
    assert all(s.codes.packed is codes[n] for n, s in handle.slots.items())
    x = torch.randn(3, 16, dtype=torch.float64)
    assert model(x).dtype == torch.float64
    model.float()
    assert model.a.weight.dtype == torch.float32
    assert torch.equal(model(x0).detach(), reference)


def _compressed_linear_and_twin():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    handle = compress_module(
        layer, OMCConfig(format="e3m7", update_mode="simple", fp32_fraction=0.0)
    )
    return layer, float_twin(lambda: torch.nn.Linear(16, 8), handle)


def test_double_backward_through_a_compressed_linear_is_refused():
    """The decoded weight is not differentiable: a second derivative would
    silently miss its terms, so it is refused."""
    layer, _ = _compressed_linear_and_twin()
    x = torch.randn(3, 7, 16).permute(1, 0, 2).requires_grad_()
    (grad,) = torch.autograd.grad((layer(x) ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()


def test_forward_mode_ad_takes_the_generic_path():
    import torch.autograd.forward_ad as fwAD

    layer, twin = _compressed_linear_and_twin()
    x = torch.randn(3, 7, 16).permute(1, 0, 2)
    tangent = torch.randn(7, 3, 16)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent)))
        want = fwAD.unpack_dual(twin(fwAD.make_dual(x, tangent)))
    assert torch.equal(out.primal, want.primal)
    assert torch.equal(out.tangent, want.tangent)
