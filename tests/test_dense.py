"""Fused mode keeps the float32 parameters' gradients in one mapped buffer:
the same values, steps and accumulation as float32 training, off the heap."""

import copy

import pytest
import torch

from speechbrain_omc import OMCConfig, compress_module, handle_of
from speechbrain_omc.codec.memory import Workspace
from speechbrain_omc.engine import dense as dense_module
from speechbrain_omc.engine.parameter import CompressedParameter


@pytest.fixture(autouse=True)
def small_models_too(monkeypatch):
    # The models here are small enough to be left alone by default.
    monkeypatch.setattr(dense_module, "MIN_BYTES", 0)


def net():
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Linear(64, 8192), torch.nn.LayerNorm(8192)
    )


def model_pair():
    """A float32 model and its twin under OMC with lossless codes; biases
    and norms wide enough that their gradients take a mapped buffer."""
    torch.manual_seed(0)
    ref = net()
    model = copy.deepcopy(ref)
    handle = compress_module(model, OMCConfig(format="fp32"))
    return ref, model, handle


def dense(model):
    return [p for p in model.parameters() if not isinstance(p, CompressedParameter)]


def pairs(model, ref):
    """(parameter under OMC, float32 twin) of the float32 parameters."""
    twins = dict(ref.named_parameters())
    return [
        (p, twins[name])
        for name, p in model.named_parameters()
        if not isinstance(p, CompressedParameter)
    ]


def storage(t):
    return t.untyped_storage().data_ptr()


def test_gradients_share_one_buffer_and_equal_float32s():
    ref, model, handle = model_pair()
    handle.set_sgd(lr=0.1)
    x = torch.randn(8, 16)
    ref(x).square().sum().backward()
    model(x).square().sum().backward()
    params = dense(model)
    assert len({storage(p.grad) for p in params}) == 1
    assert handle.updates.dense.nbytes == 4 * sum(p.numel() for p in params)
    for name, p in model.named_parameters():
        if not isinstance(p, CompressedParameter):
            q = dict(ref.named_parameters())[name]
            assert torch.equal(p.grad, q.grad), name


def test_plain_loop_steps_equal_float32_and_reuse_the_buffer():
    ref, model, handle = model_pair()
    handle.set_sgd(lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pointers = set()
    for _ in range(3):
        x = torch.randn(8, 16)
        for net, optimizer in ((ref, opt_ref), (model, opt)):
            net(x).square().sum().backward()
            if net is model:
                pointers.add(storage(dense(model)[0].grad))
                handle.step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert len(pointers) == 1  # the same buffer every step
    for p, q in zip(model.parameters(), ref.parameters()):
        value = p.decoded() if isinstance(p, CompressedParameter) else p
        assert torch.equal(value.detach(), q.detach())


def test_accumulation_and_kept_gradients():
    ref, model, handle = model_pair()
    handle.set_sgd(lr=0.0)  # the compressed weights stay as they are
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    for net in (ref, model):
        net(x).square().sum().backward()
    kept = {p: p.grad for p in dense(model)}
    for net in (ref, model):  # accumulates in place, as torch does
        net(y).square().sum().backward()
    for p, q in pairs(model, ref):
        assert torch.equal(p.grad, q.grad)
        assert p.grad is kept[p]
    # zero_grad without None: the buffer is zeroed and accumulated again.
    for net in (ref, model):
        for p in net.parameters():
            if p.grad is not None:
                p.grad.zero_()
        net(x).square().sum().backward()
    for p, q in pairs(model, ref):
        assert torch.equal(p.grad, q.grad)
    # A gradient held by the user outlives set_to_none: never overwritten.
    snapshot = {p: p.grad.clone() for p in dense(model)}
    for p in model.parameters():
        p.grad = None
    model(y * 2).sum().backward()
    for p in dense(model):
        assert storage(p.grad) != storage(kept[p])
        assert torch.equal(kept[p], snapshot[p])


def test_simple_mode_and_copies():
    torch.manual_seed(0)
    simple = compress_module(net(), OMCConfig(update_mode="simple"))
    assert not simple.updates.dense.attached
    model = net()
    handle = compress_module(model, OMCConfig(format="e3m7"))
    handle.set_sgd(lr=0.1)
    assert handle.updates.dense.nbytes > 0
    twin = copy.deepcopy(model)
    assert not handle_of(twin).updates.dense.attached
    twin(torch.randn(2, 16)).sum().backward()
    handle_of(twin).step()  # the copy attaches its own
    assert handle_of(twin).updates.dense.attached
    model(torch.randn(2, 16)).sum().backward()
    assert storage(model[2].weight.grad) != storage(twin[2].weight.grad)


def test_workspace_release_drops_idle_pages_only():
    ws = Workspace()
    busy = ws.take(1 << 16).fill_(1.0)
    idle = ws.take(1 << 17).fill_(2.0)
    pointer = idle.data_ptr()
    del idle
    ws.release()
    assert torch.all(busy == 1.0)
    again = ws.take(1 << 17)
    assert again.data_ptr() == pointer and torch.all(again == 0.0)


def test_restore_unhooks_the_float32_parameters():
    """A federated client puts its modules under a new plan every round
    (restore, then compress): the float32 parameters it keeps must carry one
    gradient hook, not one more per round (each a copy and a buffer)."""
    model = net()
    for _ in range(3):
        handle = compress_module(model, OMCConfig(format="fp32"))
        handle.set_sgd(lr=0.1)
        model(torch.ones(2, 16)).sum().backward()
        handle.restore()
        model.zero_grad(set_to_none=True)
    for param in model.parameters():
        assert not getattr(param, "_post_accumulate_grad_hooks", None), param.shape


def test_small_models_keep_their_gradients_where_they_are(monkeypatch):
    monkeypatch.setattr(dense_module, "MIN_BYTES", 1 << 20)  # above net()'s
    model = net()
    handle = compress_module(model, OMCConfig(format="fp32"))
    handle.set_sgd(lr=0.1)
    model(torch.ones(2, 16)).sum().backward()
    assert handle.updates.dense.nbytes == 0
    assert all(p.grad is not None for p in dense(model))
