"""The record of a federation run, one place for both drivers.

The embedded simulation and the Flower ``ServerApp`` hand each round to
:meth:`RoundLog.on_round`, which checkpoints the server with the rows and
writes ``rounds.csv``; :meth:`RoundLog.finish` writes the plot and
``final_model.pt``.

Example
-------
>>> from speechbrain_omc.federated.server import RoundReport
>>> report = RoundReport(round=1, sampled=["a", "b"], accepted=["a"],
...     rejected={"b": "no reply"}, bytes_down=10, bytes_up=5,
...     float32_bytes_down=40, float32_bytes_up=20,
...     client_metrics={"a": {"train_loss": 2.5}})
>>> row = round_row(report, {"WER": 50.0}, seconds=1.234)
>>> row["clients"], row["rejected"], row["train_loss"], row["valid_WER"]
(1, 'b: no reply', 2.5, 50.0)
>>> _cell(None), _cell(3), _cell("ok")
('', 3, 'ok')
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from speechbrain_omc.federated.checkpoint import CheckpointStore, atomic_save, plain
from speechbrain_omc.federated.defence import clean_text
from speechbrain_omc.federated.server import FedAvgServer, RoundReport

logger = logging.getLogger(__name__)

__all__ = ["CSV_FIELDS", "RoundLog", "plot_rounds", "round_row", "write_csv"]

#: Longest text cell written (a round's rejection reasons, joined).
MAX_CELL = 100_000

CSV_FIELDS = [
    "round",
    "sampled",
    "clients",
    "rejected",
    "clipped",
    "bytes_down",
    "bytes_up",
    "float32_bytes_down",
    "float32_bytes_up",
    "train_loss",
    "valid_loss",
    "valid_WER",
    "valid_CER",
    "seconds",
    "load1",
    "server_encode_s",
    "server_decode_s",
    "server_validate_s",
    "server_aggregate_s",
    "server_rss_before_mb",
    "server_rss_peak_mb",
]
_BYTES = ("bytes_down", "bytes_up", "float32_bytes_down", "float32_bytes_up")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def round_row(
    report: RoundReport, evaluation: dict | None, seconds: float
) -> dict[str, object]:
    """One round's line of ``rounds.csv``.

    Arguments
    ---------
    report : RoundReport
    evaluation : dict, optional
        Validation ``loss``, ``WER`` and ``CER``, if the round evaluated.
    seconds : float
        Wall-clock time of the round.

    Returns
    -------
    dict
    """
    evaluation = evaluation or {}
    memory = report.rss or {}
    server = {f"server_{k}_s": round(v, 4) for k, v in report.seconds.items()}
    server.update(
        {
            f"server_rss_{k}_mb": round(memory[k] / 2**20, 2) if k in memory else None
            for k in ("before", "peak")
        }
    )
    return {
        "round": report.round,
        "sampled": len(report.sampled),
        "clients": len(report.accepted),
        "rejected": "; ".join(f"{c}: {r}" for c, r in report.rejected.items()),
        # Updates scaled down to the round's norm limit (see defence.py).
        "clipped": len(report.clipped),
        "bytes_down": report.bytes_down,
        "bytes_up": report.bytes_up,
        "float32_bytes_down": report.float32_bytes_down,
        "float32_bytes_up": report.float32_bytes_up,
        "train_loss": _mean(
            m.get("train_loss") for m in report.client_metrics.values()
        ),
        "valid_loss": evaluation.get("loss"),
        "valid_WER": evaluation.get("WER"),
        "valid_CER": evaluation.get("CER"),
        "seconds": round(seconds, 2),
        "load1": round(os.getloadavg()[0], 2),
        **server,
    }


def write_csv(rows: list[dict], path: Path) -> None:
    """Write the per-round log atomically, text cells escaped.

    Arguments
    ---------
    rows : list of dict
        One row per round, keys :data:`CSV_FIELDS`.
    path : Path
    """
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in CSV_FIELDS})
    os.replace(tmp, path)


def _cell(value: Any) -> Any:
    """One CSV cell: empty for ``None``, text escaped and bounded."""
    if value is None:
        return ""
    return clean_text(value, MAX_CELL) if isinstance(value, str) else value


def _cumulative_mib(rows: list[dict], prefix: str) -> list[float]:
    total, out = 0.0, []
    for r in rows:
        total += (r[f"{prefix}bytes_down"] + r[f"{prefix}bytes_up"]) / 2**20
        out.append(total)
    return out


def plot_rounds(rows: list[dict], path: Path, title: str = "") -> None:
    """Plot validation WER and cumulative bytes of ``rows`` against rounds."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no font debug lines
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax_wer, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    points = [
        (r["round"], r["valid_WER"]) for r in rows if r.get("valid_WER") is not None
    ]
    if points:
        ax_wer.plot(*zip(*points), marker="o")
    ax_wer.set_xlabel("round")
    ax_wer.set_ylabel("validation WER (%)")
    ax_wer.grid(alpha=0.3)
    ax_bytes.plot(
        rounds, _cumulative_mib(rows, ""), marker="o", label="sent (measured)"
    )
    ax_bytes.plot(
        rounds,
        _cumulative_mib(rows, "float32_"),
        linestyle="--",
        label="float32 equivalent",
    )
    ax_bytes.set_xlabel("round")
    ax_bytes.set_ylabel("cumulative MiB communicated")
    ax_bytes.legend()
    ax_bytes.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class RoundLog:
    """A run's rounds: checkpoint and resume, CSV, plot, final model, summary.

    Arguments
    ---------
    server : FedAvgServer
    store : CheckpointStore
        Its checkpoint (locked by the caller for the whole run).
    folder : Path
    title : str
        The plot's title.
    plot_every_round : bool
        Redraw ``rounds.png`` after every round, not only at the end.
    history : str, optional
        A JSON file for each round's report and evaluation.

    Example
    -------
    >>> import tempfile, torch
    >>> folder = Path(tempfile.mkdtemp())
    >>> server = FedAvgServer({"w": torch.zeros(2)}, ["a"], 1, max_examples=1)
    >>> with CheckpointStore(folder / "server.ckpt") as store:
    ...     log = RoundLog(server, store, folder, plot_every_round=False)
    ...     log.resume()
    ...     row = log.on_round(RoundReport(round=1, sampled=["a"]), {"WER": 9.0})
    ...     log.totals()["valid_WER"]
    0
    9.0
    """

    def __init__(
        self,
        server: FedAvgServer,
        store: CheckpointStore,
        folder: str | Path,
        title: str = "",
        plot_every_round: bool = True,
        history: str | None = None,
    ):
        self.server = server
        self.store = store
        self.folder = Path(folder)
        self.title = title
        self.plot_every_round = plot_every_round
        self.history_file = history
        self.rows: list[dict] = []
        self.history: list[dict] = []
        self._last = time.perf_counter()
        self._started: dict[int, float] = {}

    def resume(self) -> int:
        """Load the newest checkpoint, if any, with its rows; the rounds done."""
        extra = self.server.load(self.store) or {}
        # "log": the embedded run's key before both drivers shared this class.
        self.rows = list(extra.get("rows", extra.get("log", [])))
        self.history = list(extra.get("history", []))
        self._last = time.perf_counter()
        return self.server.round

    def on_round(self, report: RoundReport, evaluation: dict | None = None) -> dict:
        """Record a closed round (again: its row replaced), checkpoint, write the CSV.

        Arguments
        ---------
        report : RoundReport
        evaluation : dict, optional

        Returns
        -------
        dict
            The round's row.
        """
        seconds = time.perf_counter() - self._started.setdefault(
            report.round, self._last
        )
        row = round_row(report, evaluation, seconds)
        if self.rows and self.rows[-1]["round"] == report.round:
            self.rows.pop()
            if self.history_file:
                self.history.pop()
        self.rows.append(row)
        extra: dict[str, Any] = {"rows": self.rows}
        if self.history_file:
            self.history.append({**report.to_dict(), "evaluation": evaluation})
            extra["history"] = self.history
        self.server.save(self.store, extra=extra)
        write_csv(self.rows, self.folder / "rounds.csv")
        if self.plot_every_round:
            plot_rounds(self.rows, self.folder / "rounds.png", self.title)
        self._last = time.perf_counter()
        return row

    def finish(self) -> None:
        """Write the CSV, plot, history and ``final_model.pt`` (before any test)."""
        write_csv(self.rows, self.folder / "rounds.csv")
        if self.rows:
            plot_rounds(self.rows, self.folder / "rounds.png", self.title)
        if self.history_file:
            (self.folder / self.history_file).write_text(
                json.dumps(plain(self.history), indent=2) + "\n", encoding="utf-8"
            )
        atomic_save(dict(self.server.model), self.folder / "final_model.pt")

    def totals(self) -> dict[str, Any]:
        """The rows summed up: last validation WER, bytes, clients left out."""
        rows = self.rows
        totals: dict[str, Any] = {
            "valid_WER": next(
                (
                    r["valid_WER"]
                    for r in reversed(rows)
                    if r.get("valid_WER") is not None
                ),
                None,
            ),
            **{key: sum(r[key] for r in rows) for key in _BYTES},
            "left_out": sum(r["sampled"] - r["clients"] for r in rows),
            "train_minutes": round(sum(float(r["seconds"]) for r in rows) / 60, 2),
        }
        totals["bytes_total"] = totals["bytes_down"] + totals["bytes_up"]
        totals["float32_bytes_total"] = (
            totals["float32_bytes_down"] + totals["float32_bytes_up"]
        )
        return totals

    def write_summary(self, fields: dict[str, Any], started: float) -> dict:
        """Write ``summary.json``: ``fields``, :meth:`totals` and the minutes.

        Arguments
        ---------
        fields : dict
            The driver's own entries.
        started : float
            ``time.perf_counter()`` when the process began the run.

        Returns
        -------
        dict
        """
        summary = {**fields, **self.totals()}
        summary["minutes_this_process"] = round((time.perf_counter() - started) / 60, 2)
        text = json.dumps(summary, indent=2, default=str)
        (self.folder / "summary.json").write_text(text + "\n", encoding="utf-8")
        logger.info("summary: %s", json.dumps(summary, default=str))
        return summary
