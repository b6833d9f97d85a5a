"""PyTorch and SpeechBrain features under OMC: each works, or is refused clearly.

One test (or a group) per row of the compatibility matrix in
``docs/design.md``. Rows covered elsewhere: checkpoints that plain SpeechBrain
reads, ``Pretrainer`` and checkpoint averaging (``test_checkpoints_export.py``),
``weights_only`` by module type (``test_selection.py``), command-line
overrides of the ``omc_*`` keys (``test_hparams.py``).
"""

import copy
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import speechbrain as sb
import torch

from speechbrain_omc import OMCBrain, OMCConfig, compress_module
from speechbrain_omc.engine.parameter import CompressedParameter

JOBS = Path(__file__).parent / "jobs"


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def weights(handle) -> dict[str, torch.Tensor]:
    return {name: slot.codes.decompress() for name, slot in handle.slots.items()}


# ------------------------------------------------------------------ DDP
def _single_process_reference(mode: str) -> dict[str, torch.Tensor]:
    """The DDP job's training, in one process on the whole global batches."""
    sys.path.insert(0, str(JOBS))
    try:
        from ddp_train import model_and_batches
    finally:
        sys.path.remove(str(JOBS))
    model, batches = model_and_batches()
    handle = compress_module(model, OMCConfig(format="e3m7", update_mode=mode))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle.set_sgd(lr=0.1, momentum=0.9)
    for x, y in batches:
        torch.nn.functional.mse_loss(model(x), y).backward()
        handle.step()
        optimizer.step()
        optimizer.zero_grad()
    return weights(handle)


@pytest.mark.parametrize("mode", ["fused", "simple"])
def test_ddp_two_ranks_stay_identical_and_match_one_process(mode, tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(JOBS / "ddp_train.py"),
            mode,
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["agree"] == [True] * 4  # identical codes after every step
    assert result["refused"] is (True if mode == "fused" else None)
    reference = _single_process_reference(mode)
    for name, value in result["weights"].items():
        # The all-reduced mean gradient equals the whole batch's up to float
        # summation order; stochastic rounding may then land one code apart.
        ulp = reference[name].abs().clamp(min=2**-8) * 2**-7
        assert ((torch.tensor(value) - reference[name]).abs() <= ulp).all(), name


# ------------------------------------------------------------- autocast
def test_bf16_autocast_saves_no_float_copy_of_a_weight():
    torch.manual_seed(0)
    model = TwoLayer()
    handle = compress_module(model, OMCConfig(format="e3m7"))
    handle.set_sgd(lr=0.1)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).float().pow(2).mean()
    shapes = {(32, 16), (16, 32), (4, 32), (32, 4)}
    weight_like = [t for t in saved if tuple(t.shape) in shapes]
    assert weight_like, "the weights must be saved for the input gradient"
    assert all(isinstance(t, CompressedParameter) for t in weight_like)
    assert {t.dtype for t in weight_like} == {torch.bfloat16}  # a cast view
    before = weights(handle)
    loss.backward()
    assert all(not torch.equal(before[n], w) for n, w in weights(handle).items())


# -------------------------------------------------------------- compile
def test_torch_compile_trains_like_eager():
    torch.manual_seed(0)
    base = TwoLayer()
    runs = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        handle = compress_module(model, OMCConfig(format="e3m7", seed=3))
        handle.set_sgd(lr=0.1)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        torch.manual_seed(1)
        losses = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's graph-break notices
            for _ in range(4):
                x, y = torch.randn(8, 16), torch.randn(8, 4)
                loss = torch.nn.functional.mse_loss(run(x), y)
                loss.backward()
                handle.step()
                losses.append(loss.item())
        runs.append((losses, weights(handle)))
        torch._dynamo.reset()
    (eager_losses, eager), (compiled_losses, compiled) = runs
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-6)
    for name in eager:
        assert torch.allclose(compiled[name], eager[name], atol=1e-6), name


@pytest.mark.parametrize("mode", ["fused", "simple"])
def test_a_compiled_step_does_not_recompile_per_weight_and_equals_eager(mode):
    # Compiled as frames of their own, the compressed weights' operations
    # recompiled for each weight, up to dynamo's limit (8).
    layers = 12

    def run(compiled: bool):
        torch.manual_seed(0)
        blocks = [(torch.nn.Linear(16, 16), Tanh()) for _ in range(layers)]
        model = torch.nn.Sequential(*sum(blocks, ()), torch.nn.Linear(16, 4))
        handle = compress_module(model, OMCConfig(format="e3m7", update_mode=mode))
        handle.set_sgd(lr=0.05)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        torch.manual_seed(1)
        losses = []
        for _ in range(4):
            x, y = torch.randn(8, 16), torch.randn(8, 4)
            loss = torch.nn.functional.mse_loss(forward(x), y)
            loss.backward()
            handle.step()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        torch._dynamo.reset()
        return losses, {n: s.codes.to_bytes() for n, s in handle.slots.items()}

    # Any recompilation is an error: each frame compiles once, whatever the
    # number of weights.
    once = torch._dynamo.config.patch(
        recompile_limit=1, fail_on_recompile_limit_hit=True
    )
    with warnings.catch_warnings(), once:
        warnings.simplefilter("ignore")  # dynamo's graph-break notices
        compiled = run(compiled=True)
    assert compiled == run(compiled=False)  # losses and codes, bit for bit


class Tanh(torch.nn.Module):
    """Work between the compressed layers that dynamo compiles."""

    def forward(self, x):
        return torch.tanh(x) * 0.5 + x


# --------------------------------------------------- in-place and max_norm
def test_in_place_initialisation_and_speechbrain_max_norm():
    torch.manual_seed(0)
    lin = sb.nnet.linear.Linear(n_neurons=8, input_size=16, max_norm=0.5)
    conv = sb.nnet.CNN.Conv2d(
        out_channels=4, kernel_size=(3, 3), in_channels=2, max_norm=0.5
    )
    model = torch.nn.ModuleDict({"lin": lin, "conv": conv})
    handle = compress_module(model, OMCConfig(format="e3m7"))
    with torch.no_grad():
        torch.nn.init.normal_(lin.w.weight, std=3.0)  # rows far above max_norm
        conv.conv.weight.mul_(10.0)
    assert lin.w.weight.detach().norm(dim=1).max() > 2.0
    lin(torch.randn(2, 16))
    conv(torch.randn(2, 6, 6, 2))
    # SpeechBrain renormalised through .data; the result was encoded.
    assert isinstance(lin.w.weight, CompressedParameter)
    assert lin.w.weight.detach().norm(dim=1).max() <= 0.5 * 1.01
    assert conv.conv.weight.detach().flatten(1).norm(dim=1).max() <= 0.5 * 1.01
    assert set(handle.slots) == {"lin.w.weight", "conv.conv.weight"}


# ------------------------------------------------------------- threads
def test_two_threads_run_forward_and_backward_safely():
    torch.manual_seed(0)
    model = TwoLayer()
    compress_module(model, OMCConfig(format="e3m7", update_mode="simple"))
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x)
    errors, outputs = [], []

    def work():
        try:
            for _ in range(25):
                with torch.no_grad():
                    outputs.append(model(x))
                model(torch.randn(4, 16)).sum().backward()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(torch.equal(out, expected) for out in outputs)
    assert model.a.weight.grad is not None  # both threads' gradients summed


# ------------------------------------------------------ tied and shared
def test_a_layer_called_twice_and_tied_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    fresh = copy.deepcopy(model)
    handle = compress_module(model, OMCConfig(format="bf16", transform="none"))
    handle.set_sgd(lr=0.1)
    assert set(handle.slots) == {"0.weight"}
    assert model[0].weight is model[2].weight
    twin = copy.deepcopy(fresh)
    twin[0].weight.data = handle.slots["0.weight"].codes.decompress()
    x = torch.randn(3, 8)
    assert torch.equal(model(x), twin(x))
    model(x).sum().backward()
    assert handle.state["0.weight"].steps == 1  # one update from both uses


# ------------------------------------------------ resume with a new plan
def test_a_checkpoint_of_another_plan_is_refused_or_recompressed():
    torch.manual_seed(0)
    source = TwoLayer()
    compress_module(source, OMCConfig(format="e3m7"))
    state = source.state_dict()

    other = TwoLayer()
    compress_module(other, OMCConfig(format="e4m3"))
    with pytest.raises(RuntimeError, match=r"a\.weight is stored as e3m7.*e4m3"):
        other.load_state_dict(state)

    kept = TwoLayer()
    compress_module(kept, OMCConfig(format="e3m7", exclude=["a.*"]))
    with pytest.raises(RuntimeError, match=r"a\.weight is stored as e3m7.*float32"):
        kept.load_state_dict(state)

    again = TwoLayer()
    handle = compress_module(
        again, OMCConfig(format="e4m3", on_plan_change="recompress")
    )
    again.load_state_dict(state)
    assert handle.slots["a.weight"].codes.format.name == "e4m3"
    decoded = source.a.weight.detach()
    assert torch.allclose(again.a.weight.detach(), decoded, rtol=2**-3, atol=1e-3)


# --------------------------------------------- custom init_optimizers
class CustomOptimizers(OMCBrain):
    """A recipe that builds its own optimizer, as SpeechBrain's wav2vec ones."""

    def compute_forward(self, batch, stage):
        return self.modules.net(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])

    def init_optimizers(self):
        self.optimizer = torch.optim.SGD(self.modules.parameters(), lr=0.05)
        self.optimizers_dict = {"optimizer": self.optimizer}
        if self.omc is not None and self.omc.mode == "fused":
            self.omc.set_sgd(lr=0.05)


@pytest.mark.parametrize("mode", ["fused", "simple"])
def test_a_recipe_with_its_own_init_optimizers_trains_compressed_weights(mode):
    torch.manual_seed(0)
    brain = CustomOptimizers(
        modules={"net": TwoLayer()},
        hparams={"omc": OMCConfig(format="e3m7", update_mode=mode)},
        run_opts={"device": "cpu"},
    )
    data = [(torch.randn(4, 16), torch.randn(4, 4)) for _ in range(3)]
    brain.fit(range(1), data)
    before = {n: s.codes.to_bytes() for n, s in brain.omc.slots.items()}
    brain.fit(range(1, 2), data)
    after = {n: s.codes.to_bytes() for n, s in brain.omc.slots.items()}
    assert all(before[n] != after[n] for n in before)
