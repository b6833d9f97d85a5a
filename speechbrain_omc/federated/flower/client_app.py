"""Flower ``ClientApp`` of federated OMC (Message API).

Each SuperNode serves one client (a partition of speakers), named by its
``--node-config`` (see :func:`~speechbrain_omc.federated.flower.recipe.
node_client_id`). The handlers are thin: the bytes of the received
``ArrayRecord`` go to :class:`~speechbrain_omc.federated.client.OMCClient`
and its reply bytes come back the same way.

* ``query``: which client this node serves (and its number of examples), so
  that the server can address the clients it samples.
* ``train``: one round of local OMC training (``OMCClient.train``); the reply
  holds the compressed model under ``arrays`` and ``num-examples`` plus the
  client's metrics under ``metrics``.
* ``evaluate``: the compressed global model on the node's evaluation split
  (``config["split"]``: ``valid`` or ``test``); loss, WER and CER with the
  number of examples.

The node's Brain and data are built at the first message a process handles
and kept for later ones (the Simulation Engine reuses its workers; the
Deployment Engine starts a process per message, so there each message
builds them).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from speechbrain_omc.federated.flower.recipe import NodeSetup, build_node
from speechbrain_omc.federated.flower.records import (
    payload_from_record,
    payload_to_record,
)
from speechbrain_omc.federated.flower.strategy import CLIENT_ID_KEY, QUERY_KEY

logger = logging.getLogger(__name__)

__all__ = ["app", "node_setup"]

app = ClientApp()

_NODES: dict[str, NodeSetup] = {}


def node_setup(context: Context) -> NodeSetup:
    """The node's client, built once per process and configuration.

    Arguments
    ---------
    context : Context
        Holds the run config (recipe, hparams, overrides) and node config.

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


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    # MetricRecord holds numbers only; None (a non-finite loss) is dropped.
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer which client this node serves.

    Arguments
    ---------
    msg : Message
        The server's query.
    context : Context
        The node's context.

    Returns
    -------
    Message
        ``{QUERY_KEY: {"client-id": ...}}``.
    """
    from speechbrain_omc.federated.flower.recipe import node_client_id

    # Cheap on purpose: no Brain, no data; the node config names the client.
    answer = ConfigRecord({CLIENT_ID_KEY: node_client_id(context.node_config)})
    return Message(content=RecordDict({QUERY_KEY: answer}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local OMC training on the node's data.

    Arguments
    ---------
    msg : Message
        ``arrays``: the compressed global model; ``config``: round, client.
    context : Context
        The node's context.

    Returns
    -------
    Message
        ``arrays``: the compressed trained model; ``metrics``:
        ``num-examples`` and the client's metrics.
    """
    node = node_setup(context)
    config = msg.content["config"]
    if str(config.get("client-id", node.client_id)) != node.client_id:
        raise ValueError(
            f"this node serves {node.client_id!r}, not {config.get('client-id')!r}"
        )
    reply = node.client.train(payload_from_record(msg.content["arrays"]))
    from speechbrain_omc.federated import wire

    meta = wire.decode(reply).meta
    metrics = MetricRecord(
        {"num-examples": int(meta["num_examples"]), **_numbers(meta["metrics"])}
    )
    content = RecordDict({"arrays": payload_to_record(reply), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received compressed global model on the node's split.

    Arguments
    ---------
    msg : Message
        ``arrays``: the model; ``config["split"]``: ``valid`` (default) or
        ``test``.
    context : Context
        The node's context.

    Returns
    -------
    Message
        ``metrics``: ``num-examples``, ``loss``, ``WER``, ``CER``.
    """
    node = node_setup(context)
    split = str(msg.content["config"].get("split", "valid"))
    if split not in node.eval_data:
        raise ValueError(f"this node has no {split!r} data to evaluate on")
    dataset = node.eval_data[split]
    stats = node.client.evaluate(
        payload_from_record(msg.content["arrays"]), dataset, node.eval_opts
    )
    metrics = MetricRecord({"num-examples": len(dataset), **_numbers(stats)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
