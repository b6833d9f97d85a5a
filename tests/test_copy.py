"""Copies of a whole model under OMC: ``copy.deepcopy``, ``torch.save``/``load``.

A copy computes what the original computes, bit for bit, and trains on its
own: its own codes, slots, handle, update state and fused-update hooks.
"""

import copy
import io

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from speechbrain_omc import OMCConfig, compress_module, handle_of
from speechbrain_omc.engine.parameter import CompressedParameter


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Mixed(torch.nn.Module):
    """An LSTM, raw attention weights and a layer used twice (tied)."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.lin = torch.nn.Linear(16, 16)
        self.seq = torch.nn.Sequential(self.lin, torch.nn.Tanh(), self.lin)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.mha(h, h, h)
        return self.seq(h)


def deepcopy(model):
    return copy.deepcopy(model)


def save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


CLONES = [deepcopy, save_load]


def codes(model) -> dict[str, bytes]:
    return {n: s.codes.to_bytes() for n, s in handle_of(model).slots.items()}


def batches(seed: int, n: int):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 16, generator=generator),
            torch.randn(8, 4, generator=generator),
        )
        for _ in range(n)
    ]


class Trainer:
    """The README's plain loop: backward, ``handle.step()``, optimizer step."""

    def __init__(self, model):
        self.model = model
        self.handle = handle_of(model)
        self.handle.set_sgd(lr=0.1, momentum=0.9)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train(self, data) -> list[float]:
        losses = []
        for x, y in data:
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            loss.backward()
            self.handle.step()
            self.optimizer.step()
            self.optimizer.zero_grad()
            losses.append(loss.item())
        return losses


def trained(mode: str, model_class=TwoLayer) -> Trainer:
    torch.manual_seed(0)
    model = model_class()
    compress_module(model, OMCConfig(format="e3m7", update_mode=mode, seed=5))
    trainer = Trainer(model)
    if model_class is TwoLayer:
        trainer.train(batches(0, 2))  # momentum and write counts are not zero
    return trainer


@pytest.mark.parametrize("clone", CLONES)
@pytest.mark.parametrize("mode", ["fused", "simple"])
def test_a_copy_computes_the_same_and_has_its_own_engine(mode, clone):
    original = trained(mode).model
    twin = clone(original)
    x = torch.randn(5, 16)
    assert torch.equal(twin(x), original(x))
    assert codes(twin) == codes(original)

    handle, twin_handle = handle_of(original), handle_of(twin)
    assert twin_handle is not None and twin_handle is not handle
    assert twin_handle.module is twin
    for name, param in twin.named_parameters():
        source = original.get_parameter(name)
        assert param is not source and isinstance(param, torch.nn.Parameter)
        assert param.requires_grad
        if isinstance(param, CompressedParameter):
            assert param.slot is not source.slot
            assert (
                param.slot.codes.packed.data_ptr()
                != source.slot.codes.packed.data_ptr()
            )
            # The fused update of the copy is the copy's engine's, once.
            engine = twin_handle.updates if mode == "fused" else None
            assert param.engine is engine
            hooks = param._post_accumulate_grad_hooks or {}
            assert len(hooks) == (mode == "fused")
    assert {n: s.steps for n, s in twin_handle.state.items()} == {
        n: s.steps for n, s in handle.state.items()
    }


@pytest.mark.parametrize("clone", CLONES)
@pytest.mark.parametrize("mode", ["fused", "simple"])
def test_a_copy_trains_on_its_own(mode, clone):
    first = trained(mode)
    second = Trainer(clone(first.model))
    # The momentum of the float32 parameters goes with the copy (copied:
    # load_state_dict keeps the very tensors it is given).
    second.optimizer.load_state_dict(copy.deepcopy(first.optimizer.state_dict()))
    start = codes(first.model)

    # The copy continues the original's training exactly: same codes after
    # the same batches (the update state travelled with it)...
    data = batches(1, 3)
    assert second.train(data) == first.train(data)
    assert codes(second.model) == codes(first.model) != start
    # ... and each trains without touching the other.
    before = codes(first.model)
    second.train(batches(2, 2))
    assert codes(first.model) == before
    after = codes(second.model)
    first.train(batches(3, 1))
    assert codes(second.model) == after != codes(first.model)


@pytest.mark.parametrize("clone", CLONES)
def test_tied_weights_lstm_and_attention_survive_a_copy(clone):
    trainer = trained("fused", Mixed)
    model = trainer.model
    twin = clone(model)
    x = torch.randn(2, 5, 8)
    assert torch.equal(twin(x), model(x))
    assert twin.seq[0].weight is twin.seq[2].weight is twin.lin.weight
    flat = dict(zip(twin.lstm._flat_weights_names, twin.lstm._flat_weights))
    assert all(flat[n] is getattr(twin.lstm, n) for n in flat)
    twin(x).sum().backward()  # fused: each weight updated once, in the copy
    steps = {n: s.steps for n, s in handle_of(twin).state.items()}
    assert set(steps.values()) == {1}
    assert {s.steps for s in handle_of(model).state.values()} == {0}


@pytest.mark.parametrize("mode", ["fused", "simple"])
def test_the_state_dict_of_a_copy_round_trips(mode):
    original = trained(mode).model
    twin = deepcopy(original)
    state = copy.deepcopy(twin.state_dict())  # float32 entries alias the params
    assert state["a.weight"].dtype == torch.uint8  # compressed payloads

    torch.manual_seed(1)
    fresh = TwoLayer()
    compress_module(fresh, OMCConfig(format="e3m7", update_mode=mode))
    fresh.load_state_dict(state)
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), original(x))

    plain = TwoLayer()
    plain.load_state_dict(handle_of(twin).decompressed_state_dict())
    assert torch.equal(plain(x), original(x))

    # Back into the copy itself, after it trained away from it.
    Trainer(twin).train(batches(4, 1))
    assert not torch.equal(twin(x), original(x))
    twin.load_state_dict(state)
    assert torch.equal(twin(x), original(x))


def test_a_whole_model_saved_to_a_file_loads_under_omc(tmp_path):
    trainer = trained("fused")
    path = tmp_path / "model.pt"
    torch.save(trainer.model, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(5, 16)
    assert torch.equal(loaded(x), trainer.model(x))
    handle = handle_of(loaded)
    assert handle.mode == "fused" and handle.updates.sgd.momentum == 0.9
    assert handle.memory_report()["omc"]["parameters"] == handle.parameter_bytes()
    # Taken out of OMC, it is the float32 model of its decoded values.
    expected = loaded(x)
    handle.restore()
    assert handle_of(loaded) is None
    assert not any(isinstance(p, CompressedParameter) for p in loaded.parameters())
    assert torch.equal(loaded(x), expected)
    assert isinstance(trainer.model.a.weight, CompressedParameter)


@pytest.mark.parametrize("mode", ["fused", "simple"])
def test_a_copy_made_inside_a_step_has_no_gradients(mode):
    # As torch's copy of a parameter: gradients and what the engine holds
    # of the step in progress stay with the original.
    trainer = trained(mode)
    handle = trainer.handle
    handle.max_grad_norm = 1.0  # fused: deferred clipping holds gradients
    x, y = batches(5, 1)[0]
    torch.nn.functional.mse_loss(trainer.model(x), y).backward()
    assert len(handle.updates.held) == (2 if mode == "fused" else 0)
    twin = deepcopy(trainer.model)
    assert all(p.grad is None for p in twin.parameters())
    assert len(handle_of(twin).updates.held) == 0
    # The original's step goes on as if no copy was made.
    expected = trained(mode)
    expected.handle.max_grad_norm = 1.0
    torch.nn.functional.mse_loss(expected.model(x), y).backward()
    for run in (trainer, expected):
        run.handle.clip_grad_norm_(run.model.parameters(), 1.0)
        run.handle.step()
        run.optimizer.step()
    assert codes(trainer.model) == codes(expected.model)


@pytest.mark.parametrize("mode", ["fused", "simple"])
def test_an_ema_teacher_copy(mode):
    trainer = trained(mode)
    model = trainer.model
    ema = deepcopy(model)
    ema.requires_grad_(False)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(ema(x), model(x))
    teacher_before = codes(ema)
    trainer.train(batches(6, 2))  # the student moves, the teacher does not
    assert codes(ema) == teacher_before
    # An exponential moving average written into the teacher in place.
    student = codes(model)
    with torch.no_grad():
        for average, param in zip(ema.parameters(), model.parameters()):
            average.lerp_(param.detach(), 0.5)
    assert codes(ema) != teacher_before
    assert codes(model) == student
    # A frozen copy copies again (its hooks were kept, disabled).
    again = deepcopy(ema)
    with torch.no_grad():
        assert torch.equal(again(x), ema(x))
    assert not any(p.requires_grad for p in again.parameters())


def test_torch_averaged_model_tracks_a_model_under_omc():
    trainer = trained("fused")
    model = trainer.model
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    assert handle_of(averaged.module) not in (None, handle_of(model))

    def values(module):
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    trainer.train(batches(7, 1))
    averaged.update_parameters(model)  # the first update copies the values
    first = values(model)
    trainer.train(batches(8, 1))
    student = codes(model)
    averaged.update_parameters(model)  # then the average moves halfway
    assert codes(model) == student
    now = values(model)
    for name, param in averaged.module.named_parameters():
        expected = torch.lerp(first[name], now[name], 0.5)
        # Compressed averages are encoded again: on the e3m7 grid.
        rtol = 2**-7 if isinstance(param, CompressedParameter) else 1e-6
        assert torch.allclose(param.detach(), expected, rtol=rtol, atol=1e-6), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("clone", CLONES)
def test_a_copy_of_a_model_on_cuda(clone):
    trainer = trained("fused")
    model = trainer.model.to("cuda")
    twin = clone(model)
    x = torch.randn(5, 16, device="cuda")
    assert torch.equal(twin(x), model(x))
    assert twin.a.weight.slot.codes.device.type == "cuda"
    before = codes(model)
    Trainer(twin).train([(x, torch.randn(5, 4, device="cuda"))])
    assert codes(model) == before != codes(twin)
