"""Fused update rules: Adam and AdamW equal torch's, on the same codes."""

import copy

import pytest
import torch
from test_speechbrain_models import FEATS, MODELS, VOCAB

from speechbrain_omc import CompressedTensor, OMCConfig, compress_module
from speechbrain_omc.codec.blockwise import BlockwiseTensor
from speechbrain_omc.engine.rules import AdamSettings, settings_from_optimizer


def decoded(buffer):
    return buffer.decompress() if isinstance(buffer, BlockwiseTensor) else buffer


def as_bytes(buffer) -> bytes:
    """A stored buffer's exact bytes: codes, or float32 values."""
    if isinstance(buffer, torch.Tensor):
        return buffer.detach().contiguous().numpy().tobytes()
    return buffer.to_bytes()


def reference_step(handle, twin, twin_opt, batch, config):
    """Decompress weights and moments, torch.optim.Adam(W) step, compress."""
    params = dict(twin.named_parameters())
    for name, slot in handle.slots.items():
        with torch.no_grad():
            params[name].copy_(slot.codes.decompress())
        state = handle.state[name].optimizer
        if state:
            twin_opt.state[params[name]] = {
                "step": torch.tensor(float(state["step"])),
                "exp_avg": decoded(state["exp_avg"]).clone(),
                "exp_avg_sq": decoded(state["exp_avg_sq"]).clone(),
            }
    twin.loss(*batch).backward()
    twin_opt.step()
    twin_opt.zero_grad()
    storage = config.state_storage()
    expected = {}
    for name, slot in handle.slots.items():
        codes = copy.deepcopy(slot.codes)
        codes.assign_(params[name].detach(), rounding="nearest")
        state = twin_opt.state[params[name]]
        expected[name] = (
            codes.to_bytes(),
            as_bytes(storage.store("exp_avg", state["exp_avg"])),
            as_bytes(storage.store("exp_avg_sq", state["exp_avg_sq"])),
        )
    return expected


def assert_steps_equal_torch(
    model, handle, optimizer, twin, twin_opt, batch, config, steps=3
):
    """After each fused step, every weight's codes and moments are, byte for
    byte, what the float32 twin's torch step leaves (``reference_step``)."""
    for _ in range(steps):
        expected = reference_step(handle, twin, twin_opt, batch, config)
        model.loss(*batch).backward()
        handle.step()
        optimizer.step()
        optimizer.zero_grad()
        for name, slot in handle.slots.items():
            state = handle.state[name].optimizer
            got = (
                slot.codes.to_bytes(),
                as_bytes(state["exp_avg"]),
                as_bytes(state["exp_avg_sq"]),
            )
            assert got == expected[name], name


@pytest.mark.parametrize("adam", ["Adam", "AdamW"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_adam_equals_torch_adam_on_the_same_codes(name, adam):
    torch.manual_seed(0)
    base = MODELS[name]()
    twin = copy.deepcopy(base)
    model = copy.deepcopy(base)
    config = OMCConfig(
        format="e3m7", update_rounding="nearest", state_format="e4m3", state_block=64
    )
    handle = compress_module(model, config)
    optim = getattr(torch.optim, adam)
    kwargs = dict(lr=1e-2, weight_decay=0.01 if adam == "AdamW" else 0.001)
    optimizer = optim(model.parameters(), **kwargs)
    twin_opt = optim(twin.parameters(), **kwargs)
    handle.set_rule(settings_from_optimizer(optimizer))
    batch = (torch.randn(2, 16, FEATS), torch.ones(2), torch.randint(1, VOCAB, (2, 5)))
    assert_steps_equal_torch(model, handle, optimizer, twin, twin_opt, batch, config)
    assert all(s.optimizer["step"] == 3 for s in handle.state.values())


class Wide(torch.nn.Module):
    """One weight of 153,900 values: Adam steps it in slices (two full ones
    and a ragged one), which must not change a bit."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(300, 513)

    def loss(self, x):
        return self.proj(x).tanh().square().mean()


@pytest.mark.parametrize("state_format", [None, "e4m3"])
def test_fused_adam_in_slices_equals_torch_adam_on_a_large_weight(state_format):
    from speechbrain_omc.engine.rules import ADAM_CHUNK

    torch.manual_seed(0)
    model, twin = Wide(), Wide()
    twin.load_state_dict(model.state_dict())
    assert model.proj.weight.numel() > 2 * ADAM_CHUNK
    config = OMCConfig(
        format="e3m7", update_rounding="nearest", state_format=state_format
    )
    handle = compress_module(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    handle.set_rule(settings_from_optimizer(optimizer))
    batch = (torch.randn(8, 300),)
    assert_steps_equal_torch(model, handle, optimizer, twin, twin_opt, batch, config)


def test_adam_settings_follow_the_optimizer_and_refuse_what_they_cannot_do():
    p = [torch.zeros(2, requires_grad=True)]
    opt = torch.optim.Adam(p, lr=0.5, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    assert settings_from_optimizer(opt) == AdamSettings(0.5, (0.8, 0.99), 1e-6, 0.1)
    with pytest.raises(ValueError, match="maximize"):
        settings_from_optimizer(torch.optim.Adam(p, maximize=True))
    groups = [{"params": p[:1]}, {"params": [torch.zeros(1)], "lr": 1.0}]
    with pytest.raises(ValueError, match="param groups differ in \\['lr'\\]"):
        settings_from_optimizer(torch.optim.AdamW(groups, lr=0.1))


def test_block_wise_state_matches_its_torch_reference_and_round_trips():
    from speechbrain_omc.codec import kernels

    torch.manual_seed(0)
    x = torch.randn(5000) * torch.logspace(-7, 0, 5000)
    for fmt, sqrt in [("e4m3", False), ("int8", False), ("e4m3", True), ("e5m2", True)]:
        values = x.abs() if sqrt else x
        fast = BlockwiseTensor.compress(values, fmt, block=128, sqrt=sqrt)
        with kernels.disabled():
            slow = BlockwiseTensor.compress(values, fmt, block=128, sqrt=sqrt)
            slow_values = slow.decompress()
        assert fast.to_bytes() == slow.to_bytes(), (fmt, sqrt)
        assert torch.equal(fast.decompress(), slow_values), (fmt, sqrt)
        again = BlockwiseTensor.from_bytes(fast.to_bytes())
        assert torch.equal(again.decompress(), fast.decompress())
    damaged = bytearray(fast.to_bytes())
    damaged[40] ^= 1
    with pytest.raises(ValueError, match="CRC32"):
        BlockwiseTensor.from_bytes(bytes(damaged))


def test_compressed_state_is_what_the_issue_asks_for():
    """11-bit weights, 8-bit moments: at most 25 % of float32 Adam's state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    config = OMCConfig(format="e3m7", state_format="e4m3")
    handle = compress_module(model, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    handle.set_rule(settings_from_optimizer(optimizer))
    model(torch.randn(4, 256)).sum().backward()
    handle.step()
    optimizer.step()
    report = handle.memory_report()
    assert report["omc"]["gradients"] == 4 * 512  # fused: only the biases
    weights = sum(s.codes.nbytes for s in handle.slots.values())
    moments = sum(
        BlockwiseTensor.nbytes.fget(b)
        for s in handle.state.values()
        for k, b in s.optimizer.items()
        if k != "step"
    )
    assert report["omc"]["parameters"] >= weights
    assert report["omc"]["optimizer_state"] >= moments
    total = report["omc"]["total"] / report["float32"]["total"]
    assert total <= 0.25, report
    assert isinstance(handle.memory_table(), str)
    assert isinstance(CompressedTensor, type)


class Regressor(__import__("speechbrain_omc").OMCBrain):
    def compute_forward(self, batch, stage):
        return self.modules.net(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])


def _clipping_brain(clipping: str, max_grad_norm: float, optimizer) -> Regressor:
    """A small regressor whose two weight matrices are compressed (e5m10,
    nearest rounding of updates), clipped in fused mode by ``clipping``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )
    config = OMCConfig(
        format="e5m10", update_rounding="nearest", fused_clipping=clipping
    )
    return Regressor(
        modules={"net": net},
        opt_class=optimizer,
        hparams={"omc": config},
        run_opts={"max_grad_norm": max_grad_norm, "device": "cpu"},
    )


def _fit(clipping: str, max_grad_norm: float, optimizer) -> tuple[dict, dict]:
    brain = _clipping_brain(clipping, max_grad_norm, optimizer)
    data = [(torch.randn(4, 8) * 10, torch.randn(4, 4) * 10) for _ in range(3)]
    brain.fit(range(1), data[:1])  # compress, build the optimizer
    before = {n: s.codes.decompress() for n, s in brain.omc.slots.items()}
    brain.fit(range(1, 3), data)
    after = {n: s.codes.decompress() for n, s in brain.omc.slots.items()}
    return before, after


@pytest.mark.parametrize(
    "clipping", ["deferred", "previous_norm", "per_parameter", "two_pass"]
)
def test_max_grad_norm_bounds_fused_updates(clipping):
    def sgd(params):
        return torch.optim.SGD(params, lr=0.5)

    before, after = _fit(clipping, 1e9, sgd)
    assert any(not torch.equal(after[n], before[n]) for n in before)  # unclipped
    before, after = _fit(clipping, 1e-9, sgd)
    # Updates of at most 5e-10 vanish under nearest rounding.
    assert all(torch.equal(after[n], before[n]) for n in before), clipping


def _clipped_steps(clipping: str, max_norm: float, steps: int = 3) -> list[dict]:
    """Per step: the update of every parameter, and the compressed gradients'
    norm the engine measured (SGD, lr 1, so an update is minus the clipped
    gradient, up to the e5m10 rounding of the new weight). The first record
    is the compressing step's: its norm only."""
    brain = _clipping_brain(
        clipping, max_norm, lambda params: torch.optim.SGD(params, lr=1.0)
    )
    net = brain.modules.net
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 8, generator=generator) * 10, torch.randn(4, 4) * 10)
        for _ in range(steps + 1)
    ]
    brain.fit(range(1), batches[:1])  # compress, build the optimizer: a step
    brain.modules.train()
    records = [
        {"delta": None, "grad_norm": brain.omc.optimizer_state_dict()["previous_norm"]}
    ]
    for batch in batches[1:]:
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        brain.fit_batch(batch)
        delta = {
            n: float((p.detach() - before[n]).norm()) for n, p in net.named_parameters()
        }
        norm = brain.omc.optimizer_state_dict()["previous_norm"]
        records.append({"delta": delta, "grad_norm": norm})
    return records


COMPRESSED = ("0.weight", "2.weight")
TOL = 2e-3  # e5m10 rounding of ~200 updated weights, in norm


def _norm(values) -> float:
    return sum(v * v for v in values) ** 0.5


def test_per_parameter_clipping_bounds_each_compressed_update():
    for step in _clipped_steps("per_parameter", 0.05)[1:]:
        for name in COMPRESSED:
            assert step["delta"][name] == pytest.approx(0.05, abs=TOL)
        # Each is clipped on its own: together they exceed the global bound.
        assert _norm(step["delta"][n] for n in COMPRESSED) > 0.05 * 1.3


@pytest.mark.parametrize("clipping", ["deferred", "two_pass"])
def test_global_clipping_modes_bound_the_whole_update(clipping):
    for step in _clipped_steps(clipping, 0.05)[1:]:
        # One coefficient for every parameter, float32 ones included.
        assert _norm(step["delta"].values()) == pytest.approx(0.05, abs=TOL)


def test_previous_norm_clipping_scales_by_the_last_steps_norm():
    # Not a bound on each step: a step whose gradient outgrows the last
    # one's moves further than max_grad_norm (the choice's documented cost).
    steps = _clipped_steps("previous_norm", 0.05)
    for previous, step in zip(steps, steps[1:]):
        expected = 0.05 * step["grad_norm"] / previous["grad_norm"]
        got = _norm(step["delta"][n] for n in COMPRESSED)
        assert got == pytest.approx(expected, rel=0.02, abs=TOL)
