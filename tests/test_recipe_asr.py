"""The SynthSpeech Conformer-CTC recipe: imports, hparams twins, smoke runs.

The smoke runs start ``recipes/SynthSpeech/ASR/train.py`` in a real
subprocess with overrides that shrink the model and SpeechBrain's ``--debug``
mode (one epoch of a few batches), in float32 and under OMC, and on a tiny
fake LibriSpeech tree with the LibriSpeech hparams file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "SynthSpeech" / "ASR"
TRAIN = RECIPE / "train.py"
HPARAMS = RECIPE / "hparams"

# A model small enough for a few CI steps on two cores.
TINY = [
    "--n_mels", "40", "--cnn_channels", "8", "--cnn_out_channels", "8",
    "--d_model", "32", "--nhead", "2", "--num_encoder_layers", "1",
    "--d_ffn", "64", "--kernel_size", "7", "--batch_size", "4",
    "--number_of_epochs", "1", "--noprogressbar",
]  # fmt: skip


def run_recipe(hparams_file, output, *overrides, timeout=300):
    """Run train.py in a fresh process; fail with its output on error."""
    # One thread: on a shared 2-core machine OpenMP threads stall each other.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, str(TRAIN), str(hparams_file),
        "--output_folder", str(output), "--debug", "--debug_persistently",
        *TINY, *overrides,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def logged_stats(train_log: Path) -> tuple[list[str], str]:
    """Epoch lines and the test line of a FileTrainLogger log."""
    lines = train_log.read_text().splitlines()
    epochs = [line for line in lines if line.startswith("epoch:")]
    tests = [line for line in lines if "test WER" in line]
    assert len(tests) == 1, lines
    return epochs, tests[0]


def number_after(label: str, line: str) -> float:
    match = re.search(rf"{label}: ([0-9.e+-]+)", line)
    assert match, f"{label} not in {line!r}"
    return float(match[1])


def yaml_body(path: Path) -> list[str]:
    """Non-comment, non-blank lines of a YAML file (inline comments dropped)."""
    lines = []
    for line in path.read_text().splitlines():
        code = line.split("  #")[0].rstrip()
        if code and not code.lstrip().startswith("#"):
            lines.append(code)
    return lines


def test_recipe_is_a_leaf_of_the_library():
    """train.py imports its Brain and data pipeline from the library, and
    importing it (as a module, not as __main__) trains nothing."""
    from speechbrain_omc import OMCBrain
    from speechbrain_omc.asr import ASR

    spec = importlib.util.spec_from_file_location("synthspeech_asr_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.ASR is ASR and issubclass(ASR, OMCBrain)
    own = {
        "compute_forward",
        "compute_objectives",
        "on_stage_start",
        "on_stage_end",
        "_error_stats",
    }
    assert {k for k, v in vars(ASR).items() if callable(v)} == own


def test_omc_hparams_are_the_float32_ones_plus_omc():
    fp32 = yaml_body(HPARAMS / "conformer_ctc.yaml")
    omc = yaml_body(HPARAMS / "conformer_ctc_omc.yaml")
    # The OMC section at the end: flat omc_* keys, then the omc: entry.
    start = next(i for i, line in enumerate(omc) if line.startswith("omc_"))
    entry = omc.index("omc: !new:speechbrain_omc.OMCConfig")
    assert all(line.startswith("omc_") for line in omc[start:entry])
    assert all(line.startswith("    ") for line in omc[entry + 1 :])
    rename = {"experiment_name: conformer_ctc": "experiment_name: conformer_ctc_omc"}
    assert [rename.get(line, line) for line in fp32] == omc[:start]


def test_hparams_files_load(tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_omc import OMCConfig

    for name, overrides in [
        ("conformer_ctc.yaml", {}),
        ("conformer_ctc_omc.yaml", {}),
        ("librispeech_conformer_ctc.yaml", {"data_folder": str(tmp_path)}),
    ]:
        with open(HPARAMS / name) as f:
            hparams = load_hyperpyyaml(f, {"output_folder": str(tmp_path), **overrides})
        assert hparams["encoder"].encoder is not None
        assert not hasattr(hparams["encoder"], "decoder")  # num_decoder_layers: 0
        omc = hparams.get("omc")
        if name == "conformer_ctc_omc.yaml":
            assert isinstance(omc, OMCConfig)
            assert (omc.format, omc.transform) == ("e3m7", "scale")
            assert omc.weights_only and omc.fp32_fraction == 0.1
        else:
            assert omc is None


def test_label_encoder_is_deterministic_from_the_manifest(tmp_path):
    from speechbrain_omc.asr import build_label_encoder
    from speechbrain_omc.data.librispeech import prepare_librispeech
    from speechbrain_omc.data.prepare_synthspeech import bundled_corpus

    csvs = prepare_librispeech(bundled_corpus(), tmp_path, ["train"], progress=False)
    first = build_label_encoder(csvs["train"], tmp_path / "a.txt")
    second = build_label_encoder(csvs["train"], tmp_path / "b.txt")
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
    assert first.lab2ind == second.lab2ind
    assert first.lab2ind["<blank>"] == 0 and " " in first.lab2ind
    assert len(first) == 26  # 25 characters and the blank
    # Reloading the saved encoder gives the same mapping.
    again = build_label_encoder(csvs["train"], tmp_path / "a.txt")
    assert again.lab2ind == first.lab2ind


@pytest.mark.parametrize("variant", ["conformer_ctc", "conformer_ctc_omc"])
def test_synthspeech_recipe_smoke(tmp_path, variant):
    out = tmp_path / variant
    log = run_recipe(HPARAMS / f"{variant}.yaml", out, "--debug_batches", "3")
    epochs, test_line = logged_stats(out / "train_log.txt")
    assert len(epochs) == 1  # one epoch of three batches (--debug_batches)
    for line in epochs:
        assert np.isfinite(number_after("train loss", line))
        assert 0 <= number_after("valid WER", line)
    assert 0 <= number_after("test WER", test_line)
    assert 0 <= number_after("test CER", test_line)
    # The test WER again, with its bootstrap interval over the utterances.
    ci = re.search(r"test WER ([\d.]+) % \[([\d.]+), ([\d.]+)\] \(95 % bootstrap", log)
    assert ci, log[-2000:]
    low, wer, high = float(ci[2]), float(ci[1]), float(ci[3])
    assert low <= wer <= high
    # The train log rounds to three significant digits.
    assert wer == pytest.approx(number_after("test WER", test_line), rel=5e-3)
    assert (out / "wer_test.txt").is_file()
    assert (out / "save" / "label_encoder.txt").is_file()
    for split in ("train", "dev", "test"):
        assert (out / f"{split}.csv").is_file()

    checkpoints = sorted((out / "save").glob("CKPT+*"))
    assert checkpoints, "no checkpoint saved"
    state = torch.load(checkpoints[-1] / "model.ckpt", map_location="cpu")
    weight = state["1.encoder.layers.0.mha_layer.linear_pos.weight"]
    nbytes, float32_bytes = map(
        int, re.search(r"Parameter bytes: (\d+) \(float32: (\d+)\)", log).groups()
    )
    if variant == "conformer_ctc_omc":
        assert nbytes < 0.6 * float32_bytes
        assert weight.dtype == torch.uint8  # a packed e3m7 payload
        assert (out / "save" / checkpoints[-1].name / "omc_update.ckpt").is_file()
    else:
        assert nbytes == float32_bytes
        assert weight.dtype == torch.float32


def fake_librispeech(root: Path) -> Path:
    """A tiny tree in LibriSpeech's layout with noise FLACs."""
    rng = np.random.default_rng(0)
    texts = ["HELLO WORLD", "IT'S A TEST", "SPEECH BRAIN", "ONE TWO THREE"]
    for split, speakers in [
        ("train-clean-100", (19, 26)),
        ("dev-clean", (84,)),
        ("test-clean", (61,)),
    ]:
        for speaker in speakers:
            chapter = root / split / str(speaker) / "100"
            chapter.mkdir(parents=True)
            lines = []
            for utt, text in enumerate(texts):
                utt_id = f"{speaker}-100-{utt:04d}"
                audio = 0.1 * rng.standard_normal(16000 + 1600 * utt)
                sf.write(chapter / f"{utt_id}.flac", audio.astype("float32"), 16000)
                lines.append(f"{utt_id} {text}\n")
            (chapter / f"{speaker}-100.trans.txt").write_text("".join(lines))
    return root


def test_librispeech_hparams_run_on_a_fake_tree(tmp_path):
    data = fake_librispeech(tmp_path / "LibriSpeech")
    out = tmp_path / "out"
    run_recipe(
        HPARAMS / "librispeech_conformer_ctc.yaml",
        out,
        "--data_folder", str(data), "--debug_batches", "2", "--num_workers", "0",
    )  # fmt: skip
    for split in ("train-clean-100", "dev-clean", "test-clean"):
        assert (out / f"{split}.csv").is_file()
    epochs, test_line = logged_stats(out / "train_log.txt")
    assert len(epochs) == 1
    assert np.isfinite(number_after("test loss", test_line))
    assert (out / "wer_test-clean.txt").is_file()
    assert "'" in (out / "save" / "label_encoder.txt").read_text()
