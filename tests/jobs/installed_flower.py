"""Run the Flower app's client and server code from an installed package.

Run by tests/test_install.py with the Python of a fresh virtual environment
into which ``pip install <repo>`` installed speechbrain-omc, from a working
directory outside the repository::

    python installed_flower.py CORPUS OUT_DIR

It checks that the package (and its packaged hparams) come from that
environment, then runs two rounds of the tiny federation through the
``ServerApp``'s ``run_server`` and the ``ClientApp``'s ``query``, ``train``
and ``evaluate`` handlers, nodes and grid in one process (a fake grid from
tests/flower_harness.py: no SuperLink). ``CORPUS`` is the SynthSpeech root
(data, not code: the corpus is not part of the package). Prints a JSON line
with the summary.
"""

import json
import sys
from pathlib import Path

import yaml

# The test harness (FakeGrid) lives next to this folder; it imports no
# module of the repository's package.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from flower_harness import FakeGrid  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import speechbrain_omc  # noqa: E402
from speechbrain_omc.asr import hparams_file  # noqa: E402
from speechbrain_omc.federated.flower import client_app, server_app  # noqa: E402

corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0

overrides = {
    "data_folder": str(corpus),
    "output_folder": str(out / "out"),
    "rounds": 2,
    "num_clients": 2,
    "clients_per_round": 2,
    "max_local_steps": 2,
    "d_model": 16,
    "nhead": 2,
    "num_encoder_layers": 1,
    "d_ffn": 32,
    "cnn_channels": 4,
    "cnn_out_channels": 4,
    "n_mels": 20,
}
run_config = {
    "hparams": "fed_omc.yaml",  # the packaged file
    "overrides": yaml.safe_dump(overrides, default_flow_style=True).strip(),
    "result-dir": str(out / "result"),
}
nodes = {101: 0, 102: 1}
handlers = {
    "query": client_app.query,
    "train": client_app.train,
    "evaluate": client_app.evaluate,
}


def handler(node, message):
    context = Context(
        run_id=7,
        node_id=node,
        node_config={"partition-id": nodes[node], "num-partitions": len(nodes)},
        state=RecordDict(),
        run_config=run_config,
    )
    return handlers[message.metadata.message_type](message, context).content


summary = server_app.run_server(FakeGrid(nodes, handler), run_config)
print(
    json.dumps(
        {
            "package": speechbrain_omc.__file__,
            # Every module of the package the run loaded: one missing from the
            # wheel would otherwise be found in the clone (CI's editable
            # install leaves its finder in the system site-packages).
            "modules": sorted(
                getattr(module, "__file__", None) or name
                for name, module in list(sys.modules.items())
                if name.split(".")[0] == "speechbrain_omc"
            ),
            "hparams": str(hparams_file("fed_omc.yaml")),
            "summary": summary,
        }
    )
)
