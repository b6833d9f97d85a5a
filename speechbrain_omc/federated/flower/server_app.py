"""Flower ``ServerApp`` of federated OMC (Message API).

The run config (``[tool.flwr.app.config]`` of the app, or ``flwr run
--run-config``) names the recipe's hyperparameters; the server builds the
initial model from them exactly as the embedded recipe does (its hparams seed
torch before the modules exist), asks the SuperNodes which clients they serve,
and runs :class:`~speechbrain_omc.federated.flower.strategy.OMCFedAvg` for
the rounds. After the last round one node evaluates the final global model
on the held-out test speakers.

Outputs, in ``result-dir`` (default ``<output_folder>/flower``):

* ``rounds.csv`` and ``rounds.png``: the embedded recipe's per-round log
  (same columns, written by the recipe's own functions);
* ``flower_history.json``: per round the server's report (clients, bytes
  down/up and their float32 equivalents, rejections), the evaluation and
  the bytes of Flower's records (payload plus Flower's framing);
* ``summary.json``: totals, test WER/CER, and ``final_model.pt``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from speechbrain_omc.federated.flower.recipe import (
    build_server,
    initial_model,
    load_recipe,
    resolve_path,
    to_json,
)
from speechbrain_omc.federated.flower.records import model_to_record, payload_to_record
from speechbrain_omc.federated.flower.strategy import OMCFedAvg, discover_clients
from speechbrain_omc.federated.server import RoundReport, atomic_save

logger = logging.getLogger(__name__)

__all__ = ["app", "run_server"]

app = ServerApp()


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _row(report: RoundReport, evaluation: dict | None, seconds: float) -> dict:
    # The embedded recipe's rounds.csv row (see its CSV_FIELDS).
    row = {
        "round": report.round,
        "sampled": len(report.sampled),
        "clients": len(report.accepted),
        "rejected": "; ".join(f"{c}: {r}" for c, r in report.rejected.items()),
        "bytes_down": report.bytes_down,
        "bytes_up": report.bytes_up,
        "float32_bytes_down": report.float32_bytes_down,
        "float32_bytes_up": report.float32_bytes_up,
        "train_loss": _mean(
            m.get("train_loss") for m in report.client_metrics.values()
        ),
        "seconds": round(seconds, 2),
        "load1": round(os.getloadavg()[0], 2),
    }
    if evaluation:
        row.update(
            valid_loss=evaluation.get("loss"),
            valid_WER=evaluation.get("WER"),
            valid_CER=evaluation.get("CER"),
        )
    return row


def _final_test(
    grid: Grid, strategy: OMCFedAvg, timeout: float
) -> dict[str, Any] | None:
    # The final model, as clients receive it, on the held-out speakers (the
    # embedded recipe's test WER), evaluated by the first node.
    if not strategy.node_of:
        return None
    server = strategy.server
    node = strategy.node_of[min(strategy.node_of, key=_natural)]
    data = server.message_for(strategy.evaluate_client)
    content = RecordDict(
        {
            "arrays": payload_to_record(data),
            "config": ConfigRecord({"split": "test", "server-round": server.round}),
        }
    )
    message = Message(
        content=content, message_type=MessageType.EVALUATE, dst_node_id=node
    )
    for reply in grid.send_and_receive([message], timeout=timeout):
        if reply.has_error():
            logger.warning("final test evaluation failed: %s", reply.error.reason)
            return None
        return dict(next(iter(reply.content.metric_records.values())))
    return None


def run_server(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run the federation over the grid's SuperNodes; write and return results.

    Arguments
    ---------
    grid : Grid
        The run's grid.
    run_config : dict
        The app's run config (see the app's ``pyproject.toml``).

    Returns
    -------
    dict
        The summary written to ``summary.json``.
    """
    start = time.perf_counter()
    model, buffers, hparams = initial_model(run_config)
    rounds = int(run_config.get("num-server-rounds") or hparams["rounds"])
    timeout = float(run_config.get("round-timeout", 3600))
    result_dir = Path(
        resolve_path(run_config["result-dir"])
        if run_config.get("result-dir")
        else Path(hparams["output_folder"]) / "flower"
    )
    result_dir.mkdir(parents=True, exist_ok=True)
    # One SuperNode per client: wait for the recipe's number unless told.
    min_nodes = int(run_config.get("min-nodes") or hparams.get("num_clients") or 1)
    node_of = discover_clients(grid, min_nodes, timeout)
    clients = sorted(node_of, key=_natural)
    if len(clients) < int(hparams.get("num_clients") or 0):
        logger.warning(
            "%d SuperNodes serve clients %s; the recipe partitions into %s",
            len(clients),
            clients,
            hparams.get("num_clients"),
        )
    server = build_server(hparams, model, clients, buffers)
    recipe = load_recipe(run_config.get("recipe"))
    rows: list[dict] = []
    last = [time.perf_counter()]

    def on_round(report: RoundReport) -> None:
        last.append(time.perf_counter())

    strategy = OMCFedAvg(
        server,
        node_of,
        evaluate_every=max(1, int(hparams.get("eval_every", 1))),
        num_rounds=rounds,
        evaluate_nodes=int(run_config.get("evaluate-nodes", 1)),
        on_round=on_round,
    )
    strategy.start(
        grid=grid,
        initial_arrays=model_to_record(server.model),
        num_rounds=rounds,
        timeout=timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord({"split": "valid"}),
    )
    for index, report in enumerate(strategy.reports):
        seconds = last[index + 1] - last[index] if index + 1 < len(last) else 0.0
        rows.append(_row(report, strategy.evaluations.get(report.round), seconds))
    recipe.write_csv(rows, result_dir / "rounds.csv")
    if rows:
        recipe.plot_rounds(rows, result_dir / "rounds.png", "Flower: federated OMC")
    (result_dir / "flower_history.json").write_text(
        json.dumps(to_json(strategy.history()), indent=2) + "\n", encoding="utf-8"
    )
    test = _final_test(grid, strategy, timeout) or {}
    atomic_save(server.state_dict()["model"], result_dir / "final_model.pt")
    summary = {
        "engine": "flower",
        "rounds": server.round,
        "clients": clients,
        "node_of": node_of,
        "test_WER": test.get("WER"),
        "test_CER": test.get("CER"),
        "test_loss": test.get("loss"),
        "valid_WER": next(
            (r["valid_WER"] for r in reversed(rows) if r.get("valid_WER") is not None),
            None,
        ),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "float32_bytes_down": sum(r["float32_bytes_down"] for r in rows),
        "float32_bytes_up": sum(r["float32_bytes_up"] for r in rows),
        "flower_record_bytes_down": sum(
            h["flower_record_bytes_down"] for h in strategy.history()
        ),
        "flower_record_bytes_up": sum(
            h["flower_record_bytes_up"] for h in strategy.history()
        ),
        "left_out": sum(r["sampled"] - r["clients"] for r in rows),
        "minutes": round((time.perf_counter() - start) / 60, 2),
    }
    summary["bytes_total"] = summary["bytes_down"] + summary["bytes_up"]
    (result_dir / "summary.json").write_text(
        json.dumps(to_json(summary), indent=2) + "\n", encoding="utf-8"
    )
    logger.info("Flower federated OMC summary: %s", json.dumps(to_json(summary)))
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
