"""The YAML examples under hparams/ build and train."""

from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_omc import OMCBrain, OMCConfig

HPARAMS = Path(__file__).parents[1] / "hparams"


class CTCBrain(OMCBrain):
    def compute_forward(self, batch, stage):
        feats, lens, _ = batch
        return self.modules.ctc_lin(self.modules.encoder.encode(feats, lens))

    def compute_objectives(self, logits, batch, stage):
        feats, _, tokens = batch
        logp = torch.nn.functional.log_softmax(logits, -1).transpose(0, 1)
        return torch.nn.functional.ctc_loss(
            logp,
            tokens,
            torch.full((len(feats),), feats.shape[1]),
            torch.full((len(tokens),), tokens.shape[1]),
        )


def test_example_brain_yaml_trains_under_omc():
    with open(HPARAMS / "example_brain.yaml") as f:
        hparams = load_hyperpyyaml(f)
    assert isinstance(hparams["omc"], OMCConfig)
    brain = CTCBrain(
        modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams
    )
    generator = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(2, 20, 20, generator=generator),
        torch.ones(2),
        torch.randint(1, 12, (2, 4), generator=generator),
    )
    with torch.no_grad():
        initial = brain.compute_objectives(
            brain.compute_forward(batch, None), batch, None
        )
    loader = torch.utils.data.DataLoader([batch] * 10, batch_size=None)
    brain.fit(range(1, 2), loader)
    plan = brain.omc.plan
    assert plan.nbytes < 0.5 * plan.float32_nbytes
    assert brain.omc.parameter_bytes() == plan.nbytes
    with torch.no_grad():
        final = brain.compute_objectives(
            brain.compute_forward(batch, None), batch, None
        )
    assert final < 0.8 * initial


def test_omc_preset_include_gives_config_arguments(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"omc: !include:{HPARAMS / 'omc.yaml'}\n    format: e4m7\n")
    with open(recipe) as f:
        hparams = load_hyperpyyaml(f)
    config = OMCConfig(**hparams["omc"])
    assert config.format == "e4m7" and config.fp32_fraction == 0.1
