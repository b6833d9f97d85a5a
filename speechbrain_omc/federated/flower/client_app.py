"""The ``ClientApp`` of federated OMC (Flower Message API).

Each SuperNode serves one client, named by its ``--node-config`` (see
:func:`.task.node_client_id`). The handlers pass the bytes of the received
``ArrayRecord`` to :class:`~speechbrain_omc.federated.client.OMCClient` and
its reply back: ``query`` (which client), ``train`` (one round of local
training) and ``evaluate`` (``num-examples``, ``loss``, ``WER``, ``CER``).
A process builds its Brain and data at its first message and keeps them.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from speechbrain_omc.federated.flower.records import (
    payload_from_record,
    payload_to_record,
)
from speechbrain_omc.federated.flower.strategy import (
    CLIENT_ID_KEY,
    EVALUATION_METRICS,
    QUERY_KEY,
)
from speechbrain_omc.federated.flower.task import (
    NodeSetup,
    build_node,
    node_client_id,
)

app = ClientApp()

_NODES: dict[str, NodeSetup] = {}


def node_setup(context: Context) -> NodeSetup:
    """The node's client, built once per process and configuration.

    Arguments
    ---------
    context : Context
        Holds the run config (task, hparams, overrides) and node config.

    Returns
    -------
    NodeSetup
    """
    key = json.dumps(
        [dict(context.run_config), dict(context.node_config)],
        sort_keys=True,
        default=str,
    )
    if key not in _NODES:
        _NODES[key] = build_node(context.run_config, context.node_config)
    return _NODES[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer which client this node serves (no Brain, no data: cheap)."""
    answer = ConfigRecord({CLIENT_ID_KEY: node_client_id(context.node_config)})
    return Message(content=RecordDict({QUERY_KEY: answer}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local OMC training; the reply's ``arrays`` is the model."""
    node = node_setup(context)
    wanted = str(msg.content["config"].get("client-id", node.client_id))
    if wanted != node.client_id:
        raise ValueError(f"this node serves {node.client_id!r}, not {wanted!r}")
    reply = node.client.train(payload_from_record(msg.content))
    return Message(
        content=RecordDict({"arrays": payload_to_record(reply)}), reply_to=msg
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on ``config["split"]`` (``valid``, ``test``).

    A metric that is not a number is left out (the server then refuses it).
    """
    node = node_setup(context)
    split = str(msg.content["config"].get("split", "valid"))
    if split not in node.eval_data:
        raise ValueError(f"this node has no {split!r} data to evaluate on")
    dataset = node.eval_data[split]
    stats = node.client.evaluate(
        payload_from_record(msg.content), dataset, node.eval_opts
    )
    metrics = {"num-examples": len(dataset)}
    for key in EVALUATION_METRICS:
        if isinstance(stats.get(key), (int, float)):
            metrics[key] = float(stats[key])
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
