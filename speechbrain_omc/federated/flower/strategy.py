"""A Flower ``FedAvg`` that averages OMC models instead of code bytes.

Stock ``FedAvg`` would average packed bit codes as numbers. :class:`OMCFedAvg`
keeps Flower's round loop and the weighted mean of evaluation metrics, and
hands the model to :class:`~speechbrain_omc.federated.server.FedAvgServer`,
which folds each reply as it comes. The server samples *client ids*; Flower
addresses *node ids*: :func:`discover_clients` maps one to the other before
the first round.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from speechbrain_omc.engine.selection import round_seed
from speechbrain_omc.federated.availability import DROPOUT_REASON, simulated_dropouts
from speechbrain_omc.federated.defence import clean_text, is_clean
from speechbrain_omc.federated.flower.records import (
    payload_from_record,
    payload_to_record,
)
from speechbrain_omc.federated.flower.streaming import StreamingGrid
from speechbrain_omc.federated.server import FedAvgServer, RoundReport
from speechbrain_omc.federated.validation import (
    MAX_METRICS,
    METRIC_BOUND,
    check_number,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CLIENT_ID_KEY",
    "EVALUATION_METRICS",
    "QUERY_KEY",
    "OMCFedAvg",
    "check_evaluation",
    "discover_clients",
]

#: Key of the ConfigRecord in query messages and replies.
QUERY_KEY = "omc-query"
#: Field of a query reply naming the node's client (partition) id.
CLIENT_ID_KEY = "client-id"
#: What an evaluation reply reports besides its number of examples.
EVALUATION_METRICS = ("loss", "WER", "CER")


def check_evaluation(
    content: RecordDict,
    names: Iterable[str] = EVALUATION_METRICS,
    max_examples: int = 10**6,
    weight_key: str = "num-examples",
) -> dict[str, float]:
    """Check an evaluation reply: one MetricRecord of bounded numbers.

    Arguments
    ---------
    content : RecordDict
    names : iterable of str
        The metrics it must report besides ``weight_key``, and no others.
    max_examples : int
        Largest number of examples a node may claim.
    weight_key : str

    Returns
    -------
    dict
        The metrics.

    Example
    -------
    >>> check_evaluation(RecordDict({"m": MetricRecord(
    ...     {"num-examples": 8, "loss": 2.0, "WER": 50.0, "CER": 20.0})}))
    {'num-examples': 8, 'loss': 2.0, 'WER': 50.0, 'CER': 20.0}
    >>> check_evaluation(RecordDict({"m": MetricRecord(
    ...     {"num-examples": 8, "loss": float("nan"), "WER": 5.0, "CER": 2.0})}))
    Traceback (most recent call last):
    ...
    ValueError: metric 'loss' = nan is not a number in [0, 1e+09]
    """
    if not isinstance(content, RecordDict):
        raise ValueError("no content")
    records = list(content.metric_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one MetricRecord, got {len(records)}")
    metrics = dict(records[0])
    wanted = {weight_key, *names}
    if set(metrics) != wanted:
        # At most MAX_METRICS names in the message: a node chooses them.
        raise ValueError(
            f"metrics {sorted(metrics)[:MAX_METRICS]}, expected {sorted(wanted)}"
        )
    for key, value in metrics.items():
        check_number(key, value, 0, METRIC_BOUND)
    examples = metrics[weight_key]
    if examples != int(examples) or not 1 <= examples <= max_examples:
        raise ValueError(
            f"{weight_key} = {examples} is not an integer in [1, {max_examples}]"
        )
    return metrics


def discover_clients(
    grid: Grid,
    min_nodes: int,
    timeout: float = 600.0,
    clients: Iterable[str] | None = None,
) -> dict[str, int]:
    """Ask every connected node which client it serves.

    A client announced twice keeps its first node; bad or unknown answers are
    logged and ignored.

    Arguments
    ---------
    grid : Grid
    min_nodes : int
        Nodes to wait for.
    timeout : float
        Seconds for the wait and the replies together.
    clients : iterable of str, optional
        The only client ids accepted (a resumed run's).

    Returns
    -------
    dict
        Client id to node id.
    """
    allowed = None if clients is None else set(clients)
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of {min_nodes} nodes connected within "
                f"{timeout:.0f}s"
            )
        logger.info("waiting for nodes: %d of %d connected", len(nodes), min_nodes)
        time.sleep(1.0)
    query = RecordDict({QUERY_KEY: ConfigRecord({"want": CLIENT_ID_KEY})})
    messages = [
        Message(content=query, message_type=MessageType.QUERY, dst_node_id=node)
        for node in nodes
    ]
    remaining = max(1.0, deadline - time.monotonic())
    node_of: dict[str, int] = {}
    for reply in grid.send_and_receive(messages, timeout=remaining):
        node = reply.metadata.src_node_id
        try:
            client = reply.content[QUERY_KEY][CLIENT_ID_KEY]
            if not (client and is_clean(client, 256)):
                raise TypeError(client)
        except Exception:  # noqa: BLE001 - an error reply or a malformed one
            logger.warning("node %d: no usable answer to the query", node)
            continue
        if allowed is not None and client not in allowed:
            logger.warning(
                "node %d serves %r, which is not a client of this run; ignored",
                node,
                client[:80],  # clean, checked above
            )
            continue
        if client in node_of:
            logger.warning("node %d also serves %r; ignored", node, client)
            continue
        node_of[client] = node
    logger.info("client -> node: %s", node_of)
    return node_of


class OMCFedAvg(FedAvg):
    """Flower FedAvg over OMC wire messages, delegating to ``FedAvgServer``.

    Flower's round numbers count this ``start``'s rounds, the server's the run's.

    Arguments
    ---------
    server : FedAvgServer
    node_of : Mapping
        Client id to the node serving it.
    evaluate_every : int
        Evaluate after every ``evaluate_every``-th round and the last.
    num_rounds : int, optional
    evaluate_nodes : int
        Nodes asked to evaluate (0: none).
    evaluate_client : str
        Client id whose plan encodes the evaluation model.
    max_eval_examples : int
    on_round : callable, optional
        ``(report, None)`` once the round is aggregated, then
        ``(report, evaluation)`` when its evaluation comes back.
    dropout : float
        Seeded fraction of each round's sampled clients not contacted.

    Example
    -------
    >>> import torch
    >>> server = FedAvgServer({"w": torch.ones(2)}, ["a", "b"], 2)
    >>> OMCFedAvg(server, {"a": 11, "b": 12}, num_rounds=2).node_of
    {'a': 11, 'b': 12}
    """

    def __init__(
        self,
        server: FedAvgServer,
        node_of: Mapping[str, int],
        evaluate_every: int = 1,
        num_rounds: int | None = None,
        evaluate_nodes: int = 1,
        evaluate_client: str = "eval",
        max_eval_examples: int = 10**6,
        on_round: Callable[[RoundReport, dict | None], None] | None = None,
        dropout: float = 0.0,
    ) -> None:
        # Never more evaluating nodes than nodes serving clients.
        wanted = min(max(0, int(evaluate_nodes)), len(node_of))
        super().__init__(
            fraction_evaluate=wanted / max(1, len(node_of)),
            min_evaluate_nodes=wanted,
            min_available_nodes=1,
        )
        self.server = server
        self.node_of = {str(c): int(n) for c, n in node_of.items()}
        self.evaluate_every = max(1, int(evaluate_every))
        self.num_rounds = num_rounds
        self.evaluate_client = str(evaluate_client)
        self.max_eval_examples = int(max_eval_examples)
        self.on_round = on_round
        self.dropout = float(dropout)
        simulated_dropouts([], self.dropout, 0, 0)  # a bad fraction fails now
        self.reports: list[RoundReport] = []
        self.evaluations: dict[int, dict[str, float]] = {}
        self._sent: dict[int, str] = {}  # node id -> client id, current round

    def configure_train(
        self, server_round: int, arrays: Any, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Open the server's round: a message per sampled client, in fold order."""
        server = self.server
        round_ = server.round + 1
        sampled = server.open_round(round_)
        dropped = simulated_dropouts(sampled, self.dropout, server.seed, round_)
        self._sent, targets = {}, []
        for client in server.fold_order():
            node = self.node_of.get(client)
            if client in dropped:
                server.fail(client, DROPOUT_REASON)
            elif node is None:
                server.fail(client, "no SuperNode serves this client")
            else:
                targets.append((client, node))

        def messages():
            for client, node in targets:
                settings = ConfigRecord(
                    {**config, "server-round": round_, "client-id": client}
                )
                content = RecordDict(
                    {
                        self.arrayrecord_key: payload_to_record(
                            server.broadcast(client)
                        ),
                        self.configrecord_key: settings,
                    }
                )
                self._sent[node] = client
                yield Message(
                    content=content, message_type=MessageType.TRAIN, dst_node_id=node
                )

        return messages() if isinstance(grid, StreamingGrid) else list(messages())

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Any, MetricRecord]:
        """Hand each reply to the server as it comes, then close the round."""
        server, seen = self.server, set()
        for reply in replies:
            node = reply.metadata.src_node_id
            client = self._sent.get(node)
            if client is None or client in seen:
                logger.warning("reply from node %d ignored", node)
                continue
            seen.add(client)
            if reply.has_error():
                # The server escapes and bounds it (a client's text).
                server.fail(client, f"client error: {reply.error.reason}")
                continue
            try:
                # A view, not a copy: the server checks the size first.
                payload = payload_from_record(reply.content, self.arrayrecord_key)
            except ValueError as error:
                server.fail(client, f"not an OMC reply: {error}")
                continue
            server.receive(client, payload)
            del payload, reply  # folded (or waiting its turn, held by the server)
        report = server.close_round()
        self.reports.append(report)
        if self.on_round is not None:
            # Now: a checkpoint here survives an evaluation that never ends.
            self.on_round(report, None)
        metrics = MetricRecord(
            {
                "accepted": len(report.accepted),
                "rejected": len(report.rejected),
                "bytes-down": report.bytes_down,
                "bytes-up": report.bytes_up,
            }
        )
        if not self._evaluates():
            return None, metrics  # nothing to send: Flower keeps what it had
        broadcast = self.server.message_for(self.evaluate_client)
        return payload_to_record(broadcast), metrics

    def _evaluates(self) -> bool:
        done = self.server.round
        return self.min_evaluate_nodes > 0 and (
            done % self.evaluate_every == 0 or done == self.num_rounds
        )

    def configure_evaluate(
        self, server_round: int, arrays: Any, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluate on nodes serving the run's clients, drawn by the seed."""
        if not self._evaluates():
            return []
        # Not FedAvg's sampling (any connected node): nodes serving clients,
        # drawn from the server's seed (a resumed run draws the same).
        connected = set(grid.get_node_ids())
        nodes = sorted(n for n in set(self.node_of.values()) if n in connected)
        rng = random.Random(round_seed(self.server.seed, self.server.round, "eval"))
        chosen = rng.sample(nodes, min(self.min_evaluate_nodes, len(nodes)))
        config["server-round"] = self.server.round
        content = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: config}
        )
        return [
            Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n)
            for n in chosen
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Check each evaluation reply; average only the checked values."""
        checked = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = clean_text(reply.error.reason)
                logger.warning("evaluation of node %d failed: %s", node, reason)
                continue
            try:
                metrics = check_evaluation(
                    reply.content,
                    max_examples=self.max_eval_examples,
                    weight_key=self.weighted_by_key,
                )
            except ValueError as error:
                reason = clean_text(error)
                logger.warning("evaluation of node %d rejected: %s", node, reason)
                continue
            except Exception:  # noqa: BLE001 - a bug must not end the run
                logger.exception("checking the evaluation of node %d failed", node)
                continue
            checked.append(RecordDict({"metrics": MetricRecord(metrics)}))
        result = None
        if checked:
            try:
                result = self.evaluate_metrics_aggr_fn(checked, self.weighted_by_key)
            except Exception:  # noqa: BLE001 - an evaluation must not end the run
                logger.exception("round %d: averaging evaluations failed", server_round)
        evaluation = None if result is None else dict(result)
        if evaluation is not None:
            self.evaluations[self.server.round] = evaluation
            if self.on_round is not None and self.reports:
                self.on_round(self.reports[-1], evaluation)
        return result
