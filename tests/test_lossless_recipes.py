"""Lossless twins of the SynthSpeech recipes: OMC under ``fp32`` trains what
float32 trains, bit for bit.

Both recipes run twice with the same seed and data order: the float32 hparams
file, and the OMC one with ``omc_format: fp32`` (everything else at the
recipe's defaults: fused updates in backward, stochastic update rounding,
partial quantization, in the federation re-drawn per round and client). The
final models are compared bit for bit, and so are the logged losses and
error rates. Differences that were found on the way and removed (see
:class:`~speechbrain_omc.codec.formats.Float32Format`): the per-variable scale
(``x / s * s`` rounds; a lossless format takes no transform), the square root
of Adam's second moment and the block scales of optimizer state (unit scales,
no root, for a lossless state format), stochastic rounding (no value rounds).
Found equal without changes: PPQ selection and its re-draw (which parameters
are compressed changes nothing when nothing is lost), the wire, the server's
decoding and float32 aggregation, dropout and data order (OMC draws from no
global generator: stochastic rounding has its own counter-based keys).

Clipping runs as SpeechBrain's: the default fused clipping (``deferred``:
compressed gradients held until backward ends, float32 ones for lossless
weights, then one global norm) with a ``max_grad_norm`` that bites (0.1;
the recipes' 5 never clips in these tiny runs). The previous default,
``previous_norm``, is not SpeechBrain's clipping: under it every entry of the
federated final model differs from float32's, so the twin detects that
mechanism.
"""

import csv
import os
from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml
from test_federated_recipe import TINY
from test_recipe_asr import HPARAMS, ROOT, logged_stats, run_recipe

from speechbrain_omc.checkpoints import is_payload
from speechbrain_omc.codec.blockwise import BlockwiseTensor
from speechbrain_omc.codec.compressed import CompressedTensor

MAX_GRAD_NORM = 0.1  # clips in these runs (see the module docstring)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what="") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.is_floating_point():
        a, b = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    assert torch.equal(a, b), what


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("client_optimizer, lr", [("sgd", 0.05), ("adam", 0.001)])
def test_federated_recipe_under_fp32_trains_what_float32_trains(
    client_optimizer, lr, tmp_path
):
    """Tiny Conformer-CTC, 4 clients, 2 per round, 3 rounds, with either
    client optimizer: the same final global model, per-round training losses
    and final error rates."""
    from speechbrain_omc.asr import HPARAMS_DIR, run_federation

    overrides = {
        **TINY,
        "client_optimizer": client_optimizer,
        "lr": lr,
        "augment_prob": 1.0,  # SpecAugment's draws are the same in both twins
        "rounds": 3,
        "eval_every": 1000,  # validation after the last round only
        "test_split": "dev",  # a short final evaluation
        "max_grad_norm": MAX_GRAD_NORM,
    }
    runs = {}
    for name, extra in (
        ("fed_fp32.yaml", {}),
        ("fed_omc.yaml", {"omc_format": "fp32"}),
    ):
        folder = tmp_path / name
        with open(HPARAMS_DIR / name, encoding="utf-8") as f:
            hparams = load_hyperpyyaml(
                f, {**overrides, **extra, "output_folder": str(folder)}
            )
        hparams["noprogressbar"] = True
        summary = run_federation(hparams)
        model = torch.load(folder / "final_model.pt", weights_only=True)
        runs[name] = (summary, model, rows(folder / "rounds.csv"))

    (f32, f32_model, f32_rows), (omc, omc_model, omc_rows) = runs.values()
    assert omc["omc"]["format"] == "fp32" and omc["omc"]["fp32_fraction"] == 0.1
    assert f32["omc"] is None
    assert list(omc_model) == list(f32_model)
    for name, value in f32_model.items():
        assert_same_bits(omc_model[name], value, name)
    for key in ("test_WER", "test_CER", "test_loss", "valid_WER"):
        assert omc[key] == f32[key], key
    assert [r["train_loss"] for r in omc_rows] == [r["train_loss"] for r in f32_rows]
    # Not vacuous: compressed entries travelled (a payload header each, and
    # no more: the codes are the float32 bytes), and the parameters the
    # clients held were compressed ones of float32's size.
    overhead = 64 * len(f32_model)
    for omc_row, f32_row in zip(omc_rows, f32_rows):
        for way in ("down", "up"):
            sent, plain = int(omc_row[f"bytes_{way}"]), int(f32_row[f"bytes_{way}"])
            assert plain == int(f32_row[f"float32_bytes_{way}"])
            assert plain < sent <= plain + overhead, (way, sent, plain)
    assert omc["parameter_bytes"] == omc["float32_parameter_bytes"]


def test_centralized_recipe_under_fp32_trains_what_float32_trains(
    tmp_path, monkeypatch
):
    """The Conformer-CTC recipe (Adam, its moments in the lossless block
    format), one epoch of four batches: the same checkpointed model and the
    same logged losses and error rates."""
    # The recipe runs in a subprocess: let it import this checkout.
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), path])))
    common = ("--debug_batches", "4", "--max_grad_norm", str(MAX_GRAD_NORM))
    run_recipe(HPARAMS / "conformer_ctc.yaml", tmp_path / "f32", *common)
    run_recipe(
        HPARAMS / "conformer_ctc_omc.yaml",
        tmp_path / "omc",
        *common,
        "--omc_format",
        "fp32",
        "--omc_state_format",
        "fp32",
    )
    (f32_ckpt,) = (tmp_path / "f32" / "save").glob("CKPT+*")
    (omc_ckpt,) = (tmp_path / "omc" / "save").glob("CKPT+*")
    assert (omc_ckpt / "omc_update.ckpt").is_file()
    f32_model = torch.load(f32_ckpt / "model.ckpt", weights_only=True)
    omc_model = torch.load(omc_ckpt / "model.ckpt", weights_only=True)
    assert list(omc_model) == list(f32_model)
    compressed = 0
    for name, value in f32_model.items():
        got = omc_model[name]
        if is_payload(got):
            codes = CompressedTensor.from_bytes(got.numpy().tobytes())
            assert codes.format.name == "fp32" and codes.transform.kind == "none"
            got, compressed = codes.decompress(), compressed + 1
        assert_same_bits(got, value, name)
    assert compressed > 0
    for state in ("normalizer.ckpt", "counter.ckpt"):
        assert (omc_ckpt / state).read_bytes() == (f32_ckpt / state).read_bytes()
    assert logged_stats(tmp_path / "omc" / "train_log.txt") == logged_stats(
        tmp_path / "f32" / "train_log.txt"
    )
    # Adam's moments of the compressed weights were kept in the lossless
    # block format.
    update = torch.load(omc_ckpt / "omc_update.ckpt", weights_only=True)
    for slot in update["slots"].values():
        assert set(slot["kinds"].values()) == {"BlockwiseTensor"}
        payload = slot["state"]["exp_avg_sq"].numpy().tobytes()
        assert BlockwiseTensor.from_bytes(payload).format.name == "fp32"
