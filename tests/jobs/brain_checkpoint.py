"""A tiny OMCBrain job run in subprocesses by tests/test_brain.py.

``save``: train a few steps, checkpoint, then take one more step and report.
``recover``: build the Brain afresh (other initial weights), recover the
checkpoint, report the recovered weights and the next step's loss.
"""

import json
import sys

import speechbrain as sb
import torch

from speechbrain_omc import OMCBrain, OMCConfig


class Regressor(OMCBrain):
    def compute_forward(self, batch, stage):
        return self.modules.net(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])


def build(folder, mode, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )
    modules = {"net": net}
    checkpointer = sb.utils.checkpoints.Checkpointer(folder, recoverables={"net": net})
    if mode == "fused-adam":  # Adam with 8-bit block-wise moments
        config = OMCConfig(format="e3m7", state_format="e4m3", state_block=16)
        opt_class = lambda params: torch.optim.Adam(params, lr=0.01)  # noqa: E731
    else:
        config = OMCConfig(format="e3m7", update_mode=mode)
        opt_class = lambda params: torch.optim.SGD(  # noqa: E731
            params, lr=0.1, momentum=0.9
        )
    return Regressor(
        modules=modules,
        opt_class=opt_class,
        hparams={"omc": config},
        checkpointer=checkpointer,
    )


def batches():
    generator = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(16, 8, generator=generator),
            torch.randn(16, 4, generator=generator),
        )
        for _ in range(4)
    ]


def weights(brain):
    return {
        name: brain.omc.slots[name].codes.decompress().flatten().tolist()
        for name in sorted(brain.omc.slots)
    }


def main(action, folder, mode, out):
    data = batches()
    if action == "save":
        brain = build(folder, mode, seed=0)
        brain.on_fit_start()
        for batch in data[:3]:
            brain.fit_batch(batch)
        brain.checkpointer.save_checkpoint()
    else:
        brain = build(folder, mode, seed=123)
        brain.on_fit_start()  # compresses, builds the optimizer, recovers
    report = {"weights": weights(brain), "bias": brain.modules.net[0].bias.tolist()}
    report["next_loss"] = float(brain.fit_batch(data[3]))
    report["after"] = weights(brain)
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
