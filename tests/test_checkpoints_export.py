"""OMC checkpoints in SpeechBrain's tools: float32 export, Pretrainer, averaging.

Real components throughout: a small OMCBrain trains a few steps and saves
SpeechBrain checkpoints; plain SpeechBrain loads the exports in a process in
which ``speechbrain_omc`` cannot be imported.
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.parameter_transfer import Pretrainer

from speechbrain_omc import CompressedTensor, OMCBrain, OMCConfig
from speechbrain_omc.checkpoints import (
    CheckpointError,
    average_checkpoints,
    is_payload,
    omc_parameter_transfer,
)
from speechbrain_omc.engine.parameter import CompressedParameter
from speechbrain_omc.export import export_checkpoints, main

ROOT = Path(__file__).resolve().parents[1]
PLAIN_JOB = Path(__file__).parent / "jobs" / "plain_speechbrain_load.py"
CONFIG = OMCConfig(format="e3m7")
WEIGHTS = ("0.weight", "3.weight")  # the compressed parameters of network()
# Files of a checkpoint the export copies byte for byte (no payloads inside;
# the Brain's own state and the epoch counter are text files).
COPIED = ["CKPT.yaml", "brain.ckpt", "counter.ckpt", "optimizer.ckpt"]


def network():
    """Same architecture as tests/jobs/plain_speechbrain_load.py."""
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 4),
    )


class Regressor(OMCBrain):
    def compute_forward(self, batch, stage):
        return self.modules.net(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])


def make_brain(folder, seed=0, mode="fused", **hparams):
    torch.manual_seed(seed)
    net = network()
    counter = sb.utils.epoch_loop.EpochCounter(limit=10)
    brain = Regressor(
        modules={"net": net},
        opt_class=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        hparams={"omc": OMCConfig(format="e3m7", update_mode=mode), **hparams},
        checkpointer=Checkpointer(folder, {"net": net, "counter": counter}),
    )
    brain.counter = counter
    return brain


def batches(n=2, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(16, 8, generator=generator),
            torch.randn(16, 4, generator=generator),
        )
        for _ in range(n)
    ]


def loader(data):
    """Batches served one by one, as a DataLoader with batch_size=None would."""
    return torch.utils.data.DataLoader(data, batch_size=None)


def decoded_state(net):
    """The OMC model's float32 values, read from its in-memory codes."""
    state = {}
    for name, param in net.named_parameters():
        if isinstance(param, CompressedParameter):
            state[name] = param.slot.codes.decompress()
        else:
            state[name] = param.detach().clone()
    for name, buffer in net.named_buffers():
        state[name] = buffer.clone()
    return state


def assert_same_bits(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        bits = got.detach().reshape(-1).view(torch.uint8)
        assert torch.equal(bits, value.reshape(-1).view(torch.uint8)), key


def train_and_save(brain, n_checkpoints, steps=2):
    """Checkpoints ``step0``, ``step1``... and the decoded state at each."""
    brain.on_fit_start()
    saved = []
    for i in range(n_checkpoints):
        for batch in batches(steps, seed=i):
            brain.fit_batch(batch)
        brain.counter.current += 1
        ckpt = brain.checkpointer.save_checkpoint(name=f"step{i}")
        saved.append((ckpt, decoded_state(brain.modules.net)))
    return saved


@pytest.fixture(scope="module")
def omc_run(tmp_path_factory):
    """A save folder with three OMC checkpoints, and their decoded states."""
    folder = tmp_path_factory.mktemp("omc_run") / "save"
    brain = make_brain(folder)
    saved = train_and_save(brain, 3)
    for ckpt, _ in saved:  # the checkpoints really hold payloads
        state = torch.load(ckpt.paramfiles["net"])
        assert all(is_payload(state[name]) for name in WEIGHTS)
        assert (ckpt.path / "omc_update.ckpt").exists()
    return folder, saved


def run_plain_job(tmp_path, *requests):
    out = tmp_path / "plain.pt"
    subprocess.run(
        [sys.executable, str(PLAIN_JOB), str(out), *requests], check=True, timeout=300
    )
    return torch.load(out, weights_only=True)


def test_export_loads_in_plain_speechbrain_without_the_plugin(omc_run, tmp_path):
    folder, saved = omc_run
    out = tmp_path / "float32"
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    cli = subprocess.run(
        [sys.executable, "-m", "speechbrain_omc.export", str(folder), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert cli.returncode == 0, cli.stderr
    assert "6 OMC tensors decoded to float32" in cli.stdout
    assert "3 dropped (omc_update.ckpt)" in cli.stdout
    assert "export: 100%" in cli.stderr  # the progress bar

    for ckpt, _ in saved:
        exported = out / ckpt.path.name
        names = sorted(p.name for p in exported.iterdir())
        assert names == sorted([*COPIED, "net.ckpt"])
        for same in COPIED:
            assert (exported / same).read_bytes() == (ckpt.path / same).read_bytes()
        state = torch.load(exported / "net.ckpt", weights_only=True)
        assert {state[name].dtype for name in WEIGHTS} == {torch.float32}

    # A Brain's own export at the end of training (simple mode this time).
    brain = make_brain(tmp_path / "other_save", seed=3, mode="simple")
    brain.fit(range(1, 2), loader(batches(3, seed=11)))
    exported = brain.export_float32(tmp_path / "brain_export")
    assert sorted(p.name for p in exported.iterdir()) == sorted([*COPIED, "net.ckpt"])

    newest, oldest = f"recover:{out}", f"pretrain:{out}/CKPT+step0/net.ckpt"
    from_brain = f"recover:{tmp_path / 'brain_export'}"
    result = run_plain_job(tmp_path, newest, oldest, from_brain)
    assert result["plugin_importable"] is False
    assert result["plugin_modules"] == []
    assert result[newest]["checkpoint"] == "CKPT+step2"
    assert result[newest]["counter"] == 3
    assert_same_bits(result[newest]["net"], saved[2][1])
    assert_same_bits(result[oldest]["net"], saved[0][1])
    assert result[from_brain]["optimizer_state"] == 6  # SGD momentum of all six
    assert_same_bits(result[from_brain]["net"], decoded_state(brain.modules.net))


def test_kept_omc_state_and_an_omc_brain_resuming_from_an_export(omc_run, tmp_path):
    folder, saved = omc_run
    summary = export_checkpoints(
        folder / "CKPT+step2", tmp_path / "kept", keep_omc_state=True, progress=False
    )
    assert summary.dropped == [] and summary.files_decoded == 1
    kept = torch.load(tmp_path / "kept" / "omc_update.ckpt", weights_only=True)
    assert set(kept["slots"]) == {"net.0.weight", "net.3.weight"}

    # An OMC Brain resumes from a float32 export (no omc_update there): the
    # float weights are encoded again, the update state starts afresh.
    export_checkpoints(folder, tmp_path / "float32", progress=False)
    brain = make_brain(tmp_path / "float32", seed=5)
    with pytest.warns(UserWarning, match="omc_update"):
        brain.on_fit_start()
    assert brain.counter.current == 3
    for name in WEIGHTS:
        resumed = brain.modules.net.get_parameter(name)
        assert isinstance(resumed, CompressedParameter)
        torch.testing.assert_close(
            resumed.slot.codes.decompress(), saved[2][1][name], rtol=2**-7, atol=1e-6
        )
    assert all(state.steps == 0 for state in brain.omc.state.values())
    assert torch.isfinite(brain.fit_batch(batches(1)[0]))


def test_pretrainer_loads_an_omc_checkpoint_into_an_omc_brain(omc_run, tmp_path):
    folder, saved = omc_run
    ckpt, reference = saved[1]
    source = ckpt.paramfiles["net"]
    payloads = torch.load(source)

    # As recipes do: the Pretrainer runs before the Brain compresses, with
    # the default hook (installed by importing speechbrain_omc) or the
    # explicit custom hook.
    for i, custom_hooks in enumerate([None, {"net": omc_parameter_transfer}]):
        brain = make_brain(tmp_path / f"fresh{i}", seed=9)
        pretrainer = Pretrainer(
            collect_in=tmp_path / f"collect{i}",
            loadables={"net": brain.modules.net},
            paths={"net": str(source)},
            custom_hooks=custom_hooks,
        )
        pretrainer.collect_files()
        pretrainer.load_collected()
        assert_same_bits(decoded_state(brain.modules.net), reference)
        brain.on_fit_start()  # compresses the pretrained float32 weights
        for name in WEIGHTS:
            param = brain.modules.net.get_parameter(name)
            assert isinstance(param, CompressedParameter)
            torch.testing.assert_close(
                param.slot.codes.decompress(), reference[name], rtol=2**-7, atol=1e-6
            )
        assert torch.isfinite(brain.fit_batch(batches(1)[0]))

    # A module already under OMC takes the payloads as they are.
    brain = make_brain(tmp_path / "fresh_omc", seed=9)
    brain.on_fit_start()
    omc_parameter_transfer(brain.modules.net, source)
    for name in WEIGHTS:
        codes = brain.modules.net.get_parameter(name).slot.codes
        assert codes.to_bytes() == payloads[name].numpy().tobytes()
    assert_same_bits(decoded_state(brain.modules.net), reference)


def test_averaging_omc_checkpoints_in_float32(omc_run, tmp_path):
    folder, saved = omc_run
    checkpointer = Checkpointer(folder)
    ckpts = checkpointer.find_checkpoints(max_num_checkpoints=3)
    assert len(ckpts) == 3
    averaged = average_checkpoints(ckpts, "net")

    # Summed in the list's order (newest first), as SpeechBrain does.
    by_path = {ckpt.path: state for ckpt, state in saved}
    states = [by_path[ckpt.path] for ckpt in ckpts]
    expected = {
        k: (states[0][k] + states[1][k] + states[2][k]) / 3.0 for k in states[0]
    }
    assert_same_bits(averaged, expected)

    plain = network()
    plain.load_state_dict(averaged, strict=True)
    for name, param in plain.named_parameters():
        assert torch.equal(param, expected[name])

    brain = make_brain(tmp_path / "avg", seed=4)
    brain.on_fit_start()
    brain.modules.net.load_state_dict(averaged, strict=True)
    for name in WEIGHTS:
        encoded = CompressedTensor.compress(
            expected[name],
            "e3m7",
            transform=CONFIG.transform,
            rounding=CONFIG.rounding,
            clip=CONFIG.clip,
        )
        codes = brain.modules.net.get_parameter(name).slot.codes
        assert torch.equal(codes.decompress(), encoded.decompress())

    # SpeechBrain's own averager adds payload bytes as numbers: loading the
    # result fails with a message naming the drop-in.
    stock = sb.utils.checkpoints.average_checkpoints(ckpts, "net")
    with pytest.raises(RuntimeError, match=r"speechbrain_omc\.checkpoints\.average"):
        brain.modules.net.load_state_dict(stock, strict=True)

    with pytest.raises(CheckpointError, match="has no 'model' file"):
        average_checkpoints(ckpts, "model")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        average_checkpoints([], "net")


def copy_run(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    return broken


def test_missing_and_unusable_inputs_are_clear_errors(omc_run, tmp_path):
    folder, _ = omc_run
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoints(tmp_path / "nowhere", out)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        export_checkpoints(tmp_path / "notes.txt", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .ckpt files"):
        export_checkpoints(tmp_path / "empty", out)
    with pytest.raises(CheckpointError, match="must not be inside"):
        export_checkpoints(folder, folder / "float32")

    # A name the output already holds is replaced only on request.
    export_checkpoints(folder / "CKPT+step0", out, progress=False)
    with pytest.raises(CheckpointError, match="already holds .*net.ckpt.*--overwrite"):
        export_checkpoints(folder / "CKPT+step1", out, progress=False)
    export_checkpoints(folder / "CKPT+step1", out, overwrite=True, progress=False)
    step1 = (folder / "CKPT+step1" / "CKPT.yaml").read_bytes()
    assert (out / "CKPT.yaml").read_bytes() == step1
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


@pytest.mark.parametrize("damage", ["truncated", "empty", "payload", "objects", "link"])
def test_corrupt_files_stop_the_export_and_write_nothing(omc_run, tmp_path, damage):
    folder, _ = omc_run
    broken = copy_run(folder, tmp_path)
    target = broken / "CKPT+step1" / "net.ckpt"
    if damage == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        match = r"step1/net.ckpt: cannot be read as a torch checkpoint"
    elif damage == "empty":
        target.write_bytes(b"")
        match = r"step1/net.ckpt: empty file"
    elif damage == "payload":
        state = torch.load(target)
        state["3.weight"][-7] ^= 0xFF  # a flipped code byte
        torch.save(state, target)
        match = r"step1/net.ckpt: entry '3.weight': corrupted .* CRC32 mismatch"
    elif damage == "objects":  # not loadable with weights_only, as in SpeechBrain
        torch.save({"0.weight": argparse.Namespace()}, target)
        match = r"step1/net.ckpt: holds Python objects .*weights_only=True"
    else:
        target.unlink()
        target.symlink_to(tmp_path / "gone.ckpt")
        match = r"step1/net.ckpt: missing"
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match):
        export_checkpoints(broken, out, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []

    if damage != "link":  # the Pretrainer hook names the file too
        with pytest.raises(CheckpointError, match=match):
            omc_parameter_transfer(network(), target)


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint folder") and "Traceback" not in err


def test_export_end_of_training_on_request(tmp_path):
    brain = make_brain(
        tmp_path / "save", seed=2, omc_export_float32=str(tmp_path / "exported")
    )
    brain.fit(range(1, 2), loader(batches(2)))
    path = tmp_path / "exported" / "CKPT+float32"
    state = torch.load(path / "net.ckpt", weights_only=True)
    assert_same_bits(state, decoded_state(brain.modules.net))
    brain.fit(range(2, 3), loader(batches(2)))  # a second run replaces the export
    state = torch.load(path / "net.ckpt", weights_only=True)
    assert_same_bits(state, decoded_state(brain.modules.net))
