"""Fused mode's default clipping is SpeechBrain's, bit for bit, with lossless weights.

The ``fp32`` format stores the float32 bits, so any difference from float32
training is the mechanism's, not quantization's. Deferred clipping (the
default) holds the compressed gradients until backward ends and clips every
gradient by the step's global norm: the trained weights must equal
``sb.Brain``'s and a plain loop with ``torch.nn.utils.clip_grad_norm_``.
"""

import pytest
import speechbrain as sb
import torch

from speechbrain_omc import OMCBrain, OMCConfig, compress_module
from speechbrain_omc.engine.parameter import CompressedParameter


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 8, generator=generator) * 10, torch.randn(4, 4) * 10)
        for _ in range(n)
    ]


class _Regression:
    def compute_forward(self, batch, stage):
        return self.modules.net(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])


class Float32Regressor(_Regression, sb.Brain):
    pass


class OMCRegressor(_Regression, OMCBrain):
    pass


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.decoded() if isinstance(p, CompressedParameter) else p.detach()
        for name, p in module.named_parameters()
    }


def _assert_bitwise_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def _float32_and_omc(
    config: OMCConfig, optimizer: str, max_grad_norm: float, epochs: int, net=None
) -> tuple[dict, dict]:
    """The weights ``sb.Brain`` and ``OMCBrain`` (under ``config``) train from
    the same initial network, batches and optimizer."""
    trained = []
    pairs = ((Float32Regressor, {}), (OMCRegressor, {"omc": config}))
    for brain_class, hparams in pairs:
        torch.manual_seed(3)  # the same dropout draws for both
        brain = brain_class(
            modules={"net": (net or _net)()},
            opt_class=OPTIMIZERS[optimizer],
            hparams=hparams,
            run_opts={"max_grad_norm": max_grad_norm, "device": "cpu"},
        )
        brain.fit(range(1, epochs + 1), _batches())
        trained.append(_weights(brain.modules.net))
    return trained[0], trained[1]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("max_grad_norm", [0.05, 1e9])  # clipped, and not
def test_default_clipping_is_speechbrains_with_lossless_weights(
    optimizer, max_grad_norm
):
    float32, omc = _float32_and_omc(
        OMCConfig(format="fp32"), optimizer, max_grad_norm, epochs=2
    )
    assert OMCConfig().fused_clipping == "deferred"
    _assert_bitwise_equal(omc, float32)


def test_previous_norm_clipping_is_not_speechbrains():
    # Why the default changed: the old default clips the first step per
    # parameter and later ones by the last step's norm.
    config = OMCConfig(format="fp32", fused_clipping="previous_norm")
    float32, omc = _float32_and_omc(config, "sgd", 0.05, epochs=1)
    assert any(not torch.equal(float32[n], omc[n]) for n in float32)


def test_plain_loop_clipping_equals_torch():
    batches = _batches()
    reference = _net()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        torch.nn.functional.mse_loss(reference(x), y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        optimizer.step()
        optimizer.zero_grad()

    model = _net()
    handle = compress_module(model, OMCConfig(format="fp32"))
    handle.set_sgd(lr=0.1, momentum=0.9)
    handle.max_grad_norm = 0.05  # backward holds the compressed gradients
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        torch.nn.functional.mse_loss(model(x), y).backward()
        assert len(handle.updates.held) == 2  # both weight matrices, until the step
        handle.clip_grad_norm_(model.parameters(), 0.05)
        handle.step()
        optimizer.step()
        optimizer.zero_grad()
    assert len(handle.updates.held) == 0
    _assert_bitwise_equal(_weights(model), _weights(reference))


def test_held_gradients_are_counted_until_the_step():
    model = _net()
    handle = compress_module(model, OMCConfig(format="e3m7"))
    handle.set_sgd(lr=0.1)
    before = handle.memory_report()["omc"]["gradients"]
    handle.max_grad_norm = 1.0
    after = handle.memory_report()["omc"]["gradients"]
    assert after - before == 2 * (8 * 16 + 16 * 4)  # bfloat16 per weight value
    x, y = _batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert handle.updates.held.nbytes == after - before
    handle.step()  # no clip_grad_norm_ call: the held ones clipped alone
    assert handle.updates.held.nbytes == 0


def test_two_pass_measures_the_gradient_it_clips():
    # With dropout, the measuring pass must draw the training pass's masks:
    # then two-pass clipping with lossless weights is SpeechBrain's, up to
    # the order of the norm's sum (Python floats there, torch's here).
    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4)
        )

    config = OMCConfig(format="fp32", fused_clipping="two_pass")
    float32, omc = _float32_and_omc(config, "sgd", 0.05, epochs=2, net=net)
    for name in float32:
        torch.testing.assert_close(omc[name], float32[name], rtol=1e-5, atol=1e-6)
