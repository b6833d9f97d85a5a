"""The ``ServerApp`` of federated OMC (Flower Message API), with resume.

The run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, or ``flwr
run --run-config``) names the task's hyperparameters; the server builds the
initial model from them as the embedded simulation does (they seed torch
before the modules exist), asks the SuperNodes which clients they serve, and runs
:class:`~speechbrain_omc.federated.flower.strategy.OMCFedAvg`.

After every round's aggregation the server state is saved atomically in
``<result-dir>/server.ckpt`` (the round before stays in ``server.ckpt.prev``),
and saved again with the round's evaluation when one comes back. Started
again with the same run config (after the ServerApp, the SuperLink or the
machine died), the app resumes after the last completed round and ends with
the final model an uninterrupted run ends with, bit for bit. A resumed run
serves the clients of its checkpoint: a node answering for another client
id is ignored, and a client whose node is gone is left out of the rounds
that sample it. A checkpoint saved with other settings is refused with the
differences named; ``fresh-start = true`` sets it aside instead. The app
holds the result folder's lock while it runs: a second ServerApp on the
same folder is refused before it reads or writes anything there.

.. warning::
   ``fresh-start = true`` applies at *every* start of the ServerApp: left in
   the run config, a ServerApp restarted after a crash discards the
   checkpoint and begins the run again. Pass it once (``flwr run
   --run-config "fresh-start=true"``) and not in ``pyproject.toml``.

Rounds stream (:class:`~speechbrain_omc.federated.flower.streaming.
StreamingGrid`): at most ``max-in-flight`` train messages are unanswered at
once, each built when it is sent, and each reply is folded into the
server's running float32 sums as it comes, so that the ServerApp's memory
does not grow with the clients per round. The hparams' ``dropout`` makes a
seeded fraction of each round's sampled clients unavailable.

Outputs in ``result-dir`` (default ``<output_folder>/flower``): ``rounds.csv``
and ``rounds.png`` (the embedded simulation's per-round log, written by the
same functions), ``flower_history.json`` (the server's reports and evaluations),
``final_model.pt`` (written before the final test) and ``summary.json`` (with
the test WER of the final model on the held-out speakers, from one node).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from speechbrain_omc.federated.checkpoint import CheckpointStore, atomic_save, plain
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
    result_dir = Path(
        resolve_path(run_config["result-dir"])
        if run_config.get("result-dir")
        else Path(hparams["output_folder"]) / "flower"
    )
    result_dir.mkdir(parents=True, exist_ok=True)
    # One server per result folder, from before the checkpoint is read.
    with CheckpointStore(result_dir / "server.ckpt") as store:
        if run_config.get("fresh-start"):
            store.discard()
        # One SuperNode per client: wait for the task's num_clients unless told.
        min_nodes = int(run_config.get("min-nodes") or hparams.get("num_clients") or 1)
        # Resumed: the checkpoint's clients, whichever nodes answer (a changed
        # list would be a settings mismatch, and a node could claim a new id).
        known = saved_clients(store)
        node_of = discover_clients(grid, min_nodes, timeout, clients=known)
        clients = known if known is not None else sorted(node_of, key=_natural)
        bound = int(run_config.get("max-examples-per-client") or 1000)
        server = task.build_server(hparams, model, clients, buffers, bound, roles=roles)
        extra = server.load(store) or {}
        rows, history = list(extra.get("rows", [])), list(extra.get("history", []))
        last = [time.perf_counter()]  # when the previous call below returned
        started: dict[int, float] = {}

        def on_round(report, evaluation):
            # Called once the round is aggregated, and again with its evaluation:
            # the second call completes the round's row and saves again.
            now = time.perf_counter()
            seconds = now - started.setdefault(report.round, last[0])
            row = task.round_row(report, evaluation, seconds)
            entry = {**report.to_dict(), "evaluation": evaluation}
            if rows and rows[-1]["round"] == report.round:
                rows[-1], history[-1] = row, entry
            else:
                rows.append(row)
                history.append(entry)
            last[0] = now
            server.save(store, extra={"rows": rows, "history": history})
            task.write_csv(rows, result_dir / "rounds.csv")

        strategy = OMCFedAvg(
            server,
            node_of,
            evaluate_every=int(hparams.get("eval_every", 1)),
            num_rounds=rounds,
            evaluate_nodes=int(run_config.get("evaluate-nodes", 1)),
            max_eval_examples=int(run_config.get("max-eval-examples") or 10**6),
            on_round=on_round,
            dropout=float(hparams.get("dropout", 0.0)),
        )
        # Rounds stream: a window of messages in flight, each reply folded into
        # the server's running sums as it comes (see StreamingGrid).
        window = run_config.get("max-in-flight")
        stream = StreamingGrid(grid, DEFAULT_WINDOW if window is None else int(window))
        strategy.start(
            grid=stream,
            initial_arrays=payload_to_record(
                server.message_for(strategy.evaluate_client)
            ),
            num_rounds=max(0, rounds - server.round),
            timeout=timeout,
            evaluate_config=ConfigRecord({"split": "valid"}),
        )
        task.write_csv(rows, result_dir / "rounds.csv")
        if rows:
            task.plot_rounds(rows, result_dir / "rounds.png", "Flower: federated OMC")
        (result_dir / "flower_history.json").write_text(
            json.dumps(plain(history), indent=2) + "\n", encoding="utf-8"
        )
        # Saved before the final test: a node failing there must not lose it.
        atomic_save(dict(server.model), result_dir / "final_model.pt")
        test = _final_test(grid, strategy, timeout)
        summary = {
            "engine": "flower",
            "rounds": server.round,
            "clients": clients,
            "test_WER": test.get("WER"),
            "test_CER": test.get("CER"),
            "test_loss": test.get("loss"),
            "valid_WER": next(
                (
                    r["valid_WER"]
                    for r in reversed(rows)
                    if r.get("valid_WER") is not None
                ),
                None,
            ),
            "left_out": sum(r["sampled"] - r["clients"] for r in rows),
            "minutes_this_process": round((time.perf_counter() - start) / 60, 2),
        }
        for key in ("bytes_down", "bytes_up", "float32_bytes_down", "float32_bytes_up"):
            summary[key] = sum(r[key] for r in rows)
        summary["bytes_total"] = summary["bytes_down"] + summary["bytes_up"]
        (result_dir / "summary.json").write_text(
            json.dumps(plain(summary), indent=2) + "\n", encoding="utf-8"
        )
        logger.info("Flower federated OMC summary: %s", json.dumps(plain(summary)))
        return summary


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
