"""A Flower ``FedAvg`` that averages OMC models instead of code bytes.

Stock ``FedAvg`` averages every array of the replies element-wise; applied to
compressed payloads it would average packed bit codes as if they were numbers.
:class:`OMCFedAvg` keeps Flower's message flow (``configure_*`` builds the
messages, ``aggregate_*`` folds the replies, ``Strategy.start`` drives the
rounds) but hands the bytes to :class:`~speechbrain_omc.federated.server.
FedAvgServer`, the same server the embedded simulation runs: it samples the
clients (seeded), encodes the global model under each client's plan,
validates every reply (names, shapes, formats, finite values), decompresses,
averages in float32 weighted by examples and compresses again for the next
broadcast. Flower only carries the bytes.

Clients and SuperNodes. The server samples *client ids* (partitions); Flower
addresses *node ids*. Before the first round :func:`discover_clients` asks
every connected node which client it serves (a ``query`` message, see
:mod:`speechbrain_omc.federated.flower.client_app`); the strategy keeps the map; a
sampled client without a node, an error reply or a reply that is not an OMC
payload is left out of the round with a logged reason, like a client that
raises in the embedded simulation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import (
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from speechbrain_omc.federated.flower.records import (
    model_to_record,
    payload_from_record,
    payload_to_record,
    record_nbytes,
)
from speechbrain_omc.federated.server import FedAvgServer, RoundReport

logger = logging.getLogger(__name__)

__all__ = ["CLIENT_ID_KEY", "OMCFedAvg", "QUERY_KEY", "discover_clients"]

#: Key of the ConfigRecord in query messages and replies.
QUERY_KEY = "omc-query"
#: Field of a query reply naming the node's client (partition) id.
CLIENT_ID_KEY = "client-id"


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def discover_clients(
    grid: Grid, min_nodes: int, timeout: float = 600.0
) -> dict[str, int]:
    """Ask every connected node which client it serves.

    Waits until ``min_nodes`` nodes are connected, sends each a ``query``
    message and maps the client ids of the answers to node ids. A client
    announced by two nodes keeps the first; failed queries are logged.

    Arguments
    ---------
    grid : Grid
        The run's grid.
    min_nodes : int
        Nodes to wait for.
    timeout : float
        Seconds for the wait and the replies together.

    Returns
    -------
    dict
        Client id to node id.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of {min_nodes} nodes connected within "
                f"{timeout:.0f}s"
            )
        logger.info("waiting for nodes: %d of %d connected", len(nodes), min_nodes)
        time.sleep(1.0)
    messages = [
        Message(
            content=RecordDict({QUERY_KEY: ConfigRecord({"want": CLIENT_ID_KEY})}),
            message_type=MessageType.QUERY,
            dst_node_id=node,
        )
        for node in nodes
    ]
    replies = grid.send_and_receive(
        messages, timeout=max(1.0, deadline - time.monotonic())
    )
    node_of: dict[str, int] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("node %d: query failed: %s", node, reply.error.reason)
            continue
        try:
            client = str(reply.content[QUERY_KEY][CLIENT_ID_KEY])
        except (KeyError, TypeError):
            logger.warning("node %d: query reply names no client", node)
            continue
        if client in node_of:
            logger.warning(
                "node %d also serves %r (node %d); ignored",
                node,
                client,
                node_of[client],
            )
            continue
        node_of[client] = node
    logger.info("client -> node: %s", node_of)
    return node_of


class OMCFedAvg(FedAvg):
    """Flower FedAvg over OMC wire messages, delegating to ``FedAvgServer``.

    Arguments
    ---------
    server : FedAvgServer
        Holds the float32 global model, the sampling and the plans; its
        ``clients`` are the client ids the SuperNodes announce.
    node_of : Mapping
        Client id to the node id serving it (see :func:`discover_clients`);
        a sampled client without a node is left out of its round.
    evaluate_every : int
        Federated evaluation after every ``evaluate_every``-th round and after
        the last one (``num_rounds``); 0 evaluates only after the last round.
    num_rounds : int, optional
        The run's number of rounds (for "after the last round").
    evaluate_nodes : int
        Nodes asked to evaluate (the first ones by client id); 0 disables
        federated evaluation. The recipe's validation speakers are the same
        on every node, so one suffices there.
    evaluate_client : str
        Client id under whose plan the evaluation model is encoded (all
        evaluating nodes receive the same bytes), as in the embedded recipe.
    on_round : callable, optional
        Called with each :class:`RoundReport` after aggregation (e.g. to
        checkpoint or log).
    **fedavg_kwargs
        Passed to ``FedAvg`` (record keys, ``weighted_by_key``). Sampling is
        the server's (``clients_per_round``, ``seed``), not Flower's.

    Example
    -------
    >>> import torch
    >>> server = FedAvgServer({"w": torch.ones(2)}, ["a", "b"], 2)
    >>> strategy = OMCFedAvg(server, {"a": 11, "b": 12}, num_rounds=2)
    >>> strategy.node_of
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
        on_round: Callable[[RoundReport], None] | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.server = server
        self.evaluate_every = int(evaluate_every)
        self.num_rounds = num_rounds
        self.evaluate_nodes = int(evaluate_nodes)
        self.evaluate_client = str(evaluate_client)
        self.on_round = on_round
        self.node_of = {str(c): int(n) for c, n in node_of.items()}
        self.reports: list[RoundReport] = []
        self.evaluations: dict[int, dict[str, Any]] = {}
        self.transport_bytes: dict[int, dict[str, int]] = {}
        self._unreachable: dict[str, str] = {}
        self._sent: dict[int, str] = {}  # node id -> client id, current round

    # ----------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: Any, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Encode the global model for the server's sampled clients.

        Arguments
        ---------
        server_round : int
            Round number (1-based); must be the server's next round.
        arrays : ArrayRecord
            Ignored: the global model is the server's float32 master.
        config : ConfigRecord
            Sent along (plus ``server-round`` and ``client-id``).
        grid : Grid
            The run's grid.

        Returns
        -------
        list of Message
            One train message per sampled client that has a node.
        """
        payloads = self.server.configure_round(server_round)
        self._unreachable, self._sent = {}, {}
        messages = []
        for client, data in payloads.items():
            node = self.node_of.get(client)
            if node is None:
                self._unreachable[client] = "no SuperNode serves this client"
                continue
            content = RecordDict(
                {
                    self.arrayrecord_key: payload_to_record(data),
                    self.configrecord_key: ConfigRecord(
                        {**config, "server-round": server_round, "client-id": client}
                    ),
                }
            )
            self._sent[node] = client
            messages.append(
                Message(
                    content=content,
                    message_type=MessageType.TRAIN,
                    dst_node_id=node,
                )
            )
        self.transport_bytes[server_round] = {
            "down": sum(record_nbytes(m.content) for m in messages),
            "up": 0,
        }
        logger.info(
            "round %d: %d clients sampled, %d reachable",
            server_round,
            len(payloads),
            len(messages),
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Any, MetricRecord | None]:
        """Validate, average in float32 and re-encode via the server.

        Arguments
        ---------
        server_round : int
            Round number.
        replies : iterable of Message
            The nodes' replies (errors included).

        Returns
        -------
        tuple
            The new float32 global model as an ``ArrayRecord`` and a
            ``MetricRecord`` with the round's byte counts, accepted and
            rejected clients and the mean of the clients' metrics.
        """
        payloads: dict[str, bytes] = {}
        failures = dict(self._unreachable)
        for reply in replies:
            node = reply.metadata.src_node_id
            client = self._sent.get(node)
            if client is None:
                logger.warning(
                    "round %d: reply from unexpected node %d", server_round, node
                )
                continue
            if reply.has_error():
                failures[client] = f"client error: {reply.error.reason}"
                continue
            self.transport_bytes[server_round]["up"] += record_nbytes(reply.content)
            try:
                payloads[client] = payload_from_record(
                    reply.content[self.arrayrecord_key]
                )
            except (KeyError, ValueError, TypeError) as error:
                failures[client] = f"not an OMC payload: {error}"
        for client in self._sent.values():
            if client not in payloads and client not in failures:
                failures[client] = "no reply (timed out)"
        for client, reason in failures.items():
            logger.warning("round %d: client %s: %s", server_round, client, reason)
        report = self.server.aggregate(payloads, failures)
        self.reports.append(report)
        if self.on_round is not None:
            self.on_round(report)
        metrics = MetricRecord(
            {
                "bytes-down": report.bytes_down,
                "bytes-up": report.bytes_up,
                "float32-bytes-down": report.float32_bytes_down,
                "float32-bytes-up": report.float32_bytes_up,
                "accepted": len(report.accepted),
                "rejected": len(report.rejected),
                "num-examples": report.num_examples,
                **self._mean_client_metrics(report),
            }
        )
        return model_to_record(self.server.model), metrics

    @staticmethod
    def _mean_client_metrics(report: RoundReport) -> dict[str, float]:
        # Mean of the accepted clients' numeric metrics (the report keeps no
        # per-client example counts, so this is not weighted).
        values: dict[str, list[float]] = {}
        for metrics in report.client_metrics.values():
            for key, value in metrics.items():
                number = _finite_number(value)
                if number is not None:
                    values.setdefault(key, []).append(number)
        return {f"client-{k}": sum(v) / len(v) for k, v in values.items()}

    # --------------------------------------------------------- evaluation
    def _evaluates(self, server_round: int) -> bool:
        if self.evaluate_nodes <= 0:
            return False
        if self.num_rounds is not None and server_round == self.num_rounds:
            return True
        return self.evaluate_every > 0 and server_round % self.evaluate_every == 0

    def configure_evaluate(
        self, server_round: int, arrays: Any, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the compressed global model to the nodes for evaluation.

        Arguments
        ---------
        server_round : int
            Round just aggregated.
        arrays : ArrayRecord
            Ignored (the server's model is encoded instead).
        config : ConfigRecord
            Sent along (plus ``server-round``).
        grid : Grid
            The run's grid.

        Returns
        -------
        list of Message
            One evaluate message per node, or none when this round does not
            evaluate.
        """
        if not self._evaluates(server_round) or not self.node_of:
            return []
        # The model after round r is broadcast at round r + 1: encode it so.
        data = self.server.message_for(self.evaluate_client, server_round + 1)
        nodes = [self.node_of[c] for c in sorted(self.node_of)]
        messages = []
        for node in nodes[: self.evaluate_nodes]:
            content = RecordDict(
                {
                    self.arrayrecord_key: payload_to_record(data),
                    self.configrecord_key: ConfigRecord(
                        {**config, "server-round": server_round}
                    ),
                }
            )
            messages.append(
                Message(
                    content=content,
                    message_type=MessageType.EVALUATE,
                    dst_node_id=node,
                )
            )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Combine the nodes' evaluation metrics, weighted by examples.

        Error-rate metrics whose counts are reported (``wer`` with
        ``wer-words``...) are pooled: errors over words, not an average of
        rates.

        Arguments
        ---------
        server_round : int
            Round number.
        replies : iterable of Message
            The nodes' replies.

        Returns
        -------
        MetricRecord or None
            ``None`` when no node answered.
        """
        records = []
        for reply in replies:
            if reply.has_error():
                logger.warning(
                    "round %d: evaluation on node %d failed: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            records.extend(reply.content.metric_records.values())
        if not records:
            return None
        total = sum(float(r.get(self.weighted_by_key, 0)) for r in records)
        out: dict[str, float] = {self.weighted_by_key: total}
        keys = {k for r in records for k in r if k != self.weighted_by_key}
        for key in sorted(keys):
            if key.endswith("-errors") or key.endswith("-words"):
                out[key] = sum(float(r.get(key, 0)) for r in records)
                continue
            values = [
                (float(r[key]), float(r.get(self.weighted_by_key, 0)))
                for r in records
                if _finite_number(r.get(key)) is not None
            ]
            weight = sum(w for _, w in values)
            if weight > 0:
                out[key] = sum(v * w for v, w in values) / weight
        for key in list(out):
            if key.endswith("-errors"):
                stem = key[: -len("-errors")]
                words = out.get(f"{stem}-words", 0.0)
                if words > 0:
                    out[stem] = 100.0 * out[key] / words
        self.evaluations[server_round] = dict(out)
        return MetricRecord(out)

    # ------------------------------------------------------------ summary
    def summary(self) -> None:
        """Log the configuration (Flower calls this at start)."""
        server = self.server
        logger.info(
            "OMCFedAvg: %d clients, %d per round, seed %d, compression %s",
            len(server.clients),
            server.clients_per_round,
            server.seed,
            server.omc.format if server.omc is not None else "float32",
        )

    def history(self) -> list[dict[str, Any]]:
        """Per-round reports, evaluation and Flower's record bytes, as data.

        Returns
        -------
        list of dict
            One per round: the :class:`RoundReport` fields, ``evaluation``
            (or ``None``) and ``flower_record_bytes_down``/``_up`` (the
            payloads plus Flower's record framing).
        """
        out = []
        for report in self.reports:
            row = report.to_dict()
            row["evaluation"] = self.evaluations.get(report.round)
            transport = self.transport_bytes.get(report.round, {})
            row["flower_record_bytes_down"] = transport.get("down", 0)
            row["flower_record_bytes_up"] = transport.get("up", 0)
            out.append(row)
        return out
