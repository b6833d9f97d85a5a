"""The YAML examples under hparams/ build and train; the shipped OMC blocks
take SpeechBrain's flat command-line overrides (``--omc_format=e4m7``)."""

import dataclasses
from pathlib import Path

import pytest
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_omc import OMCBrain, OMCConfig

ROOT = Path(__file__).parents[1]
HPARAMS = ROOT / "hparams"
RECIPES = ROOT / "recipes" / "SynthSpeech"
# Every shipped hparams file with an OMC block, with what it needs to load.
OMC_FILES = {
    "omc.yaml": (HPARAMS / "omc.yaml", {}),
    "example_brain.yaml": (HPARAMS / "example_brain.yaml", {}),
    "conformer_ctc_omc.yaml": (RECIPES / "ASR/hparams/conformer_ctc_omc.yaml", {}),
    "fed_omc.yaml": (RECIPES / "federated/hparams/fed_omc.yaml", {}),
    "fed_scale.yaml": (RECIPES / "federated/hparams/fed_scale.yaml", {}),
    "fed_librispeech_omc.yaml": (
        RECIPES / "federated/hparams/fed_librispeech_omc.yaml",
        {"data_folder": "/data/LibriSpeech"},
    ),
}


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


def _load(name, overrides, tmp_path):
    path, needed = OMC_FILES[name]
    if name not in ("omc.yaml", "example_brain.yaml"):
        needed = {"output_folder": str(tmp_path), **needed}
    if isinstance(overrides, str):
        needed = "\n".join(f"{k}: {v}" for k, v in needed.items())
        overrides = "\n".join(x for x in (needed, overrides) if x)
    else:
        overrides = {**needed, **overrides}
    with open(path, encoding="utf-8") as f:
        return load_hyperpyyaml(f, overrides)


def test_every_shipped_omc_block_exists():
    # Every hparams file of the project with an omc: entry is covered here.
    shipped = {
        path.name
        for path in [*HPARAMS.glob("*.yaml"), *RECIPES.glob("*/hparams/*.yaml")]
        if "\nomc: !new:speechbrain_omc.OMCConfig" in path.read_text()
    }
    assert shipped == set(OMC_FILES)


@pytest.mark.parametrize("name", sorted(OMC_FILES))
def test_omc_format_override_as_a_string_like_the_command_line(name, tmp_path):
    base = _load(name, {}, tmp_path)["omc"]
    hparams = _load(name, "omc_format: e4m7", tmp_path)
    assert hparams["omc"] == dataclasses.replace(base, format="e4m7")
    assert hparams["omc_format"] == "e4m7"


@pytest.mark.parametrize("name", sorted(OMC_FILES))
def test_every_omc_config_argument_is_a_flat_key(name, tmp_path):
    """``omc_<argument>`` reaches every OMCConfig argument, in every file."""
    values = {
        "format": "e4m7",
        "rounding": "stochastic",
        "update_rounding": "nearest",
        "transform": "affine",
        "clip": "mse",
        "weights_only": False,
        "include": ["*.weight"],
        "exclude": ["*emb*"],
        "format_overrides": {"*ctc*": "bf16"},
        "fp32_fraction": 0.25,
        "fp32_policy": "fixed",
        "fp32_patterns": ["*ffn*"],
        "seed": 42,
        "update_mode": "simple",
        "state_format": "bf16",
        "state_block": 64,
        "state_sqrt": False,
        "fused_clipping": "two_pass",
        "held_grad_format": "fp32",
        "nonfinite_grad": "raise",
        "on_plan_change": "recompress",
    }
    fields = {f.name for f in dataclasses.fields(OMCConfig)}
    assert set(values) == fields  # a new argument needs a flat key too
    defaults = _load(name, {}, tmp_path)["omc"]
    if defaults.update_mode == "simple":
        values["update_mode"] = "fused"
    # Every value differs from the file's, so each override must arrive.
    wanted = OMCConfig(**values)
    assert all(getattr(defaults, k) != getattr(wanted, k) for k in values)
    overrides = {f"omc_{key}": value for key, value in values.items()}
    assert _load(name, overrides, tmp_path)["omc"] == wanted


def test_command_line_override_through_speechbrain(tmp_path):
    """``train.py hparams.yaml --omc_format=e4m7`` as SpeechBrain parses it."""
    path = OMC_FILES["conformer_ctc_omc.yaml"][0]
    hparams_file, _, overrides = sb.parse_arguments(
        [str(path), "--omc_format=e4m7", f"--output_folder={tmp_path}"]
    )
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    assert hparams["omc"].format == "e4m7"
    assert hparams["omc"].update_mode == "fused"  # the recipe's own value
    assert hparams["omc"].state_format == "e4m3"
    # A misspelt key is an error, as for any SpeechBrain hyperparameter.
    _, _, overrides = sb.parse_arguments(
        [str(path), "--omc_fromat=e4m7", f"--output_folder={tmp_path}"]
    )
    with open(hparams_file, encoding="utf-8") as f, pytest.raises(KeyError):
        load_hyperpyyaml(f, overrides)


def test_federated_seed_reaches_the_omc_seed(tmp_path):
    hparams = _load("fed_omc.yaml", "seed: 7", tmp_path)
    assert hparams["omc"].seed == hparams["omc_seed"] == 7


def test_omc_block_alone_gives_the_paper_setting():
    with open(HPARAMS / "omc.yaml", encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, "omc_fp32_fraction: 0.0")
    assert hparams["omc"] == OMCConfig(format="e3m7", fp32_fraction=0.0)
    with open(HPARAMS / "omc.yaml", encoding="utf-8") as f:
        assert load_hyperpyyaml(f)["omc"] == OMCConfig(fp32_fraction=0.1)
