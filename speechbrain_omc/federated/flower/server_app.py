"""The ``ServerApp`` of federated OMC (Flower Message API), with resume.

The run config (``[tool.flwr.app.config]``, or ``flwr run --run-config``)
names the task's hyperparameters; the server builds the initial model from
them as the embedded simulation does, asks the SuperNodes which clients
they serve and runs :class:`~.strategy.OMCFedAvg`, streaming each round
(:class:`~.streaming.StreamingGrid`).

Each round is checkpointed in ``result-dir`` (default ``<output_folder>/flower``)
by :class:`~speechbrain_omc.federated.round_log.RoundLog`, which also writes
``rounds.csv``, ``rounds.png``, ``flower_history.json``, ``final_model.pt``
and ``summary.json``. Started again with the same run config, the app
resumes after the last completed round and ends with the model an
uninterrupted run ends with, bit for bit; it serves its checkpoint's
clients and refuses a checkpoint saved with other settings.

.. warning::
   ``fresh-start = true`` discards the checkpoint at *every* start: pass it
   once (``flwr run --run-config "fresh-start=true"``), not in ``pyproject.toml``.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from speechbrain_omc.federated.checkpoint import CheckpointStore
from speechbrain_omc.federated.defence import clean_text
from speechbrain_omc.federated.flower.records import payload_to_record
from speechbrain_omc.federated.flower.strategy import (
    OMCFedAvg,
    check_evaluation,
    discover_clients,
)
from speechbrain_omc.federated.flower.streaming import DEFAULT_WINDOW, StreamingGrid
from speechbrain_omc.federated.flower.task import (
    initial_model,
    load_task,
    resolve_path,
)
from speechbrain_omc.federated.round_log import RoundLog
from speechbrain_omc.federated.server import saved_clients

logger = logging.getLogger(__name__)

app = ServerApp()


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _final_test(grid: Grid, strategy: OMCFedAvg, timeout: float) -> dict[str, Any]:
    # The final model, as clients receive it, on the held-out speakers,
    # evaluated by the first node; a bad or missing answer is logged.
    if not strategy.node_of:
        return {}
    node = strategy.node_of[min(strategy.node_of, key=_natural)]
    data = strategy.server.message_for(strategy.evaluate_client)
    content = RecordDict(
        {"arrays": payload_to_record(data), "config": ConfigRecord({"split": "test"})}
    )
    message = Message(content, message_type=MessageType.EVALUATE, dst_node_id=node)
    for reply in grid.send_and_receive([message], timeout=timeout):
        try:
            if reply.has_error():
                raise ValueError(f"node error: {str(reply.error.reason)[:200]}")
            return check_evaluation(
                reply.content, max_examples=strategy.max_eval_examples
            )
        except ValueError as error:
            logger.warning("final test evaluation rejected: %s", clean_text(error))
            return {}
    logger.warning("final test evaluation: no reply within %.0f s", timeout)
    return {}


def run_server(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) the federation over the grid's SuperNodes.

    Arguments
    ---------
    grid : Grid
        The run's grid.
    run_config : dict
        The app's run config (see the app's ``pyproject.toml``).

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    start = time.perf_counter()
    model, buffers, hparams, roles = initial_model(run_config)
    task = load_task(run_config.get("task"))
    rounds = int(run_config.get("num-server-rounds") or hparams["rounds"])
    timeout = float(run_config.get("round-timeout", 3600))
    result_dir = _result_dir(run_config, hparams)
    # One server per result folder, from before the checkpoint is read.
    with CheckpointStore(result_dir / "server.ckpt") as store:
        if run_config.get("fresh-start"):
            store.discard()
        node_of, clients = _clients(grid, store, run_config, hparams, timeout)
        bound = int(run_config.get("max-examples-per-client") or 1000)
        server = task.build_server(hparams, model, clients, buffers, bound, roles=roles)
        log = RoundLog(
            server,
            store,
            result_dir,
            "Flower: federated OMC",
            plot_every_round=False,
            history="flower_history.json",
        )
        log.resume()
        strategy = OMCFedAvg(
            server,
            node_of,
            evaluate_every=int(hparams.get("eval_every", 1)),
            num_rounds=rounds,
            evaluate_nodes=int(run_config.get("evaluate-nodes", 1)),
            max_eval_examples=int(run_config.get("max-eval-examples") or 10**6),
            # Called once the round is aggregated, and again with its evaluation.
            on_round=log.on_round,
            dropout=float(hparams.get("dropout", 0.0)),
        )
        _start(grid, strategy, run_config, max(0, rounds - server.round), timeout)
        log.finish()
        test = _final_test(grid, strategy, timeout)
        fields = {"engine": "flower", "rounds": server.round, "clients": clients}
        fields.update({f"test_{k}": test.get(k) for k in ("WER", "CER", "loss")})
        return log.write_summary(fields, start)


def _result_dir(run_config: dict[str, Any], hparams: dict) -> Path:
    folder = run_config.get("result-dir")
    path = resolve_path(folder) if folder else Path(hparams["output_folder"]) / "flower"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clients(grid, store, run_config, hparams, timeout):
    # One SuperNode per client: wait for the task's num_clients unless told.
    min_nodes = int(run_config.get("min-nodes") or hparams.get("num_clients") or 1)
    # Resumed: the checkpoint's clients, whichever nodes answer (a changed
    # list would be a settings mismatch, and a node could claim a new id).
    known = saved_clients(store)
    node_of = discover_clients(grid, min_nodes, timeout, clients=known)
    return node_of, known if known is not None else sorted(node_of, key=_natural)


def _start(grid, strategy: OMCFedAvg, run_config, rounds: int, timeout: float):
    # Rounds stream: a window of messages in flight, each reply folded into
    # the server's running sums as it comes (see StreamingGrid).
    window = run_config.get("max-in-flight")
    stream = StreamingGrid(grid, DEFAULT_WINDOW if window is None else int(window))
    first = strategy.server.message_for(strategy.evaluate_client)
    strategy.start(
        grid=stream,
        initial_arrays=payload_to_record(first),
        num_rounds=rounds,
        timeout=timeout,
        evaluate_config=ConfigRecord({"split": "valid"}),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ``ServerApp`` entry point.

    Arguments
    ---------
    grid : Grid
        The run's grid.
    context : Context
        Holds the run config.
    """
    run_server(grid, dict(context.run_config))
