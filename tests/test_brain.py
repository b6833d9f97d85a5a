"""OMCBrain: hooks into SpeechBrain's Brain, checkpoints, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechbrain_omc import OMCBrain, OMCConfig
from speechbrain_omc.engine.parameter import CompressedParameter

JOB = Path(__file__).parent / "jobs" / "brain_checkpoint.py"


class Regressor(OMCBrain):
    def compute_forward(self, batch, stage):
        return self.modules.net(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])


def make_brain(config, opt_class=None, **kwargs):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )
    return Regressor(
        modules={"net": net},
        opt_class=opt_class or (lambda params: torch.optim.SGD(params, lr=0.1)),
        hparams={"omc": config},
        **kwargs,
    )


def data(n=5):
    """Batches served one by one, as a DataLoader with batch_size=None would."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, 8, generator=generator)
    return torch.utils.data.DataLoader(
        [(xi, xi[:, :4].sin()) for xi in x], batch_size=None
    )


@pytest.mark.parametrize("mode", ["fused", "simple"])
def test_fit_trains_and_keeps_parameters_compressed(mode):
    brain = make_brain(OMCConfig(format="e3m7", update_mode=mode))
    batches = data()
    with torch.no_grad():
        before = sum(
            brain.compute_objectives(brain.compute_forward(b, None), b, None)
            for b in batches
        )
    brain.fit(range(1, 4), batches)
    assert set(brain.omc.slots) == {"net.0.weight", "net.2.weight"}
    compressed = {
        n: isinstance(p, CompressedParameter)
        for n, p in brain.modules.named_parameters()
    }
    assert compressed == {
        "net.0.weight": True,
        "net.0.bias": False,
        "net.2.weight": True,
        "net.2.bias": False,
    }
    with torch.no_grad():
        after = sum(
            brain.compute_objectives(brain.compute_forward(b, None), b, None)
            for b in batches
        )
    assert after < 0.7 * before
    assert all(state.steps == 15 for state in brain.omc.state.values())


def test_training_state_is_predicted_before_training_and_measured_after(caplog):
    brain = make_brain(
        OMCConfig(format="e3m7", state_format="e4m3", state_block=32),
        opt_class=lambda params: torch.optim.Adam(params, lr=1e-3),
    )
    with caplog.at_level("INFO", logger="speechbrain_omc.brain"):
        brain.fit(range(1, 3), data())
    logged = [r.getMessage() for r in caplog.records if "training state" in r.message]
    assert len(logged) == 2
    assert "start of training" in logged[0] and "first step" in logged[1]
    assert logged[1].endswith(brain.omc.memory_table())
    # The prediction before training is the bytes stored after the first step.
    assert logged[0].splitlines()[1:] == logged[1].splitlines()[1:]
    report = brain.omc.memory_report()
    # Adam's two moments of the compressed weights are stored, not predicted:
    # one e4m3 code per value plus a float32 scale per block of 32.
    sizes = [entry.numel for entry in brain.omc.plan.compressed]
    assert sorted(sizes) == [4 * 32, 32 * 8]
    dense = 4 * 2 * (32 + 4)  # both moments of the float32 biases
    compressed, blocks = sum(sizes), sum(-(-n // 32) for n in sizes)
    assert report["omc"]["optimizer_state"] == dense + 2 * (compressed + 4 * blocks)
    assert f"{report['omc']['total']:,}" in logged[1]


def test_fused_and_simple_brains_agree():
    # Deferred clipping holds gradients in float32 here: bfloat16 (its
    # default for lossy weights) would round them.
    results = []
    for mode in ("fused", "simple"):
        config = OMCConfig(format="e3m7", update_mode=mode, held_grad_format="fp32")
        brain = make_brain(config, run_opts={"max_grad_norm": 1e9})
        brain.fit(range(1, 3), data())
        results.append({n: s.codes.to_bytes() for n, s in brain.omc.slots.items()})
    assert results[0] == results[1]


def test_fused_mode_refuses_what_it_cannot_honour():
    brain = make_brain(OMCConfig(), opt_class=lambda p: torch.optim.RMSprop(p, lr=1e-3))
    with pytest.raises(ValueError, match="SGD, Adam and AdamW, got RMSprop"):
        brain.fit(range(1, 2), data(1))
    amsgrad = lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True)  # noqa: E731
    brain = make_brain(OMCConfig(), opt_class=amsgrad)
    with pytest.raises(ValueError, match="amsgrad"):
        brain.fit(range(1, 2), data(1))
    brain = make_brain(OMCConfig(), run_opts={"grad_accumulation_factor": 2})
    with pytest.raises(ValueError, match="grad_accumulation_factor"):
        brain.fit(range(1, 2), data(1))

    def two_groups(params):
        first, *rest = list(params)
        groups = [{"params": [first], "weight_decay": 0.0}, {"params": rest}]
        return torch.optim.SGD(groups, lr=0.1, weight_decay=1e-4)

    brain = make_brain(OMCConfig(), opt_class=two_groups)
    with pytest.raises(ValueError, match="param groups differ"):
        brain.fit(range(1, 2), data(1))


def test_simple_mode_runs_any_optimizer_with_clipping():
    brain = make_brain(
        OMCConfig(update_mode="simple"),
        opt_class=lambda p: torch.optim.Adam(p, lr=1e-2),
    )
    brain.fit(range(1, 3), data())
    # One in-place update (one rounding) per step and compressed parameter.
    assert all(state.steps == 10 for state in brain.omc.state.values())


def test_without_omc_entry_the_brain_trains_in_float32():
    brain = make_brain(None)
    brain.fit(range(1, 2), data())
    assert brain.omc is None
    assert len(list(brain.modules.parameters())) == 4


def test_bad_omc_entry_is_a_clear_error():
    brain = make_brain({"format": "e3m7", "update_mode": "eventually"})
    with pytest.raises(ValueError, match="update_mode='eventually'"):
        brain.fit(range(1, 2), data(1))
    brain = make_brain(["e3m7"])
    with pytest.raises(TypeError, match="OMCConfig or a dict"):
        brain.fit(range(1, 2), data(1))


@pytest.mark.parametrize("mode", ["fused", "simple", "fused-adam"])
def test_checkpoint_recovered_in_a_new_process(tmp_path, mode):
    outputs = {}
    for action in ("save", "recover"):
        out = tmp_path / f"{action}.json"
        subprocess.run(
            [sys.executable, str(JOB), action, str(tmp_path / "ckpt"), mode, str(out)],
            check=True,
            timeout=300,
        )
        outputs[action] = json.loads(out.read_text())
    saved, recovered = outputs["save"], outputs["recover"]
    assert recovered["weights"] == saved["weights"]
    assert recovered["bias"] == saved["bias"]
    assert recovered["next_loss"] == saved["next_loss"]
    assert recovered["after"] == saved["after"]
