"""Load float32 exports with plain SpeechBrain, speechbrain_omc not importable.

Run by tests/test_checkpoints_export.py as::

    python plain_speechbrain_load.py OUT_FILE recover:DIR pretrain:FILE ...

``recover:DIR`` recovers the newest checkpoint of checkpoints folder ``DIR``
with ``Checkpointer.recover_if_possible()`` (model, optimizer and epoch
counter); ``pretrain:FILE`` loads a module with ``Pretrainer``. The loaded
state dicts go to ``OUT_FILE`` (``torch.save``), with the import check.
"""

import sys

# Before anything else: the plugin is "not installed" here. The editable
# install's meta-path finder would otherwise import it on demand; a None in
# sys.modules makes every import of it (and of its submodules) fail.
sys.modules["speechbrain_omc"] = None

try:
    import speechbrain_omc  # noqa: F401
except ImportError:
    PLUGIN_IMPORTABLE = False
else:
    PLUGIN_IMPORTABLE = True

import tempfile  # noqa: E402

import speechbrain as sb  # noqa: E402
import torch  # noqa: E402
from speechbrain.utils.parameter_transfer import Pretrainer  # noqa: E402


def network():
    """The architecture of tests/test_checkpoints_export.py's model."""
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 4),
    )


def recover(folder):
    net = network()
    counter = sb.utils.epoch_loop.EpochCounter(limit=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    checkpointer = sb.utils.checkpoints.Checkpointer(
        folder, {"net": net, "counter": counter, "optimizer": optimizer}
    )
    checkpoint = checkpointer.recover_if_possible()
    if checkpoint is None:
        raise SystemExit(f"no checkpoint recovered from {folder}")
    return {
        "net": net.state_dict(),
        "counter": counter.current,
        "checkpoint": checkpoint.path.name,
        "optimizer_state": len(optimizer.state_dict()["state"]),
    }


def pretrain(path):
    net = network()
    with tempfile.TemporaryDirectory() as collect:
        pretrainer = Pretrainer(
            collect_in=collect, loadables={"net": net}, paths={"net": path}
        )
        pretrainer.collect_files()
        pretrainer.load_collected()
    return {"net": net.state_dict()}


def main(out, *requests):
    results = {}
    for request in requests:
        kind, path = request.split(":", 1)
        results[request] = recover(path) if kind == "recover" else pretrain(path)
    loaded = sorted(name for name in sys.modules if name.startswith("speechbrain_omc"))
    results["plugin_importable"] = PLUGIN_IMPORTABLE
    results["plugin_modules"] = [n for n in loaded if sys.modules[n] is not None]
    torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
