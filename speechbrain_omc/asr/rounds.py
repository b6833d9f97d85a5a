"""The per-round log of a federation: ``rounds.csv`` and ``rounds.png``.

Both the embedded simulation (:func:`speechbrain_omc.asr.federation.run_federation`)
and the Flower ``ServerApp`` write their rounds with these functions, so the
two logs have the same columns.

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
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from speechbrain_omc.federated.defence import clean_text
from speechbrain_omc.federated.server import RoundReport

__all__ = ["CSV_FIELDS", "plot_rounds", "round_row", "write_csv"]

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


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def round_row(
    report: RoundReport, evaluation: dict | None, seconds: float
) -> dict[str, object]:
    """One round's line of ``rounds.csv`` (both the embedded run and Flower's).

    Arguments
    ---------
    report : RoundReport
        The server's report of the round.
    evaluation : dict, optional
        Validation ``loss``, ``WER`` and ``CER``, if the round evaluated.
    seconds : float
        Wall-clock time of the round.

    Returns
    -------
    dict
        Keys :data:`CSV_FIELDS`.
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
    """Write the per-round log atomically.

    Text cells are escaped (see
    :func:`~speechbrain_omc.federated.defence.clean_text`): a row resumed
    from the checkpoint of an older run may hold a client's raw text (a lone
    surrogate cannot be written as UTF-8, an escape sequence would drive the
    terminal of whoever reads the file).

    Arguments
    ---------
    rows : list of dict
        One row per round, keys :data:`CSV_FIELDS`.
    path : Path
        Destination.
    """
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in CSV_FIELDS})
    os.replace(tmp, path)


def _cell(value: Any) -> Any:
    """One CSV cell: empty for ``None``, text escaped and bounded.

    Arguments
    ---------
    value : object
        A row's value.

    Returns
    -------
    object
        ``""``, the cleaned text, or ``value`` itself.

    Example
    -------
    >>> _cell(None), _cell(3), _cell("ok")
    ('', 3, 'ok')
    """
    if value is None:
        return ""
    return clean_text(value, MAX_CELL) if isinstance(value, str) else value


def plot_rounds(rows: list[dict], path: Path, title: str = "") -> None:
    """Validation WER and cumulative bytes against rounds, as a PNG.

    Arguments
    ---------
    rows : list of dict
        The per-round log.
    path : Path
        Destination PNG.
    title : str
        Figure title.
    """
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
    total, total32 = [], []
    for r in rows:
        previous = total[-1] if total else 0
        previous32 = total32[-1] if total32 else 0
        total.append(previous + (r["bytes_down"] + r["bytes_up"]) / 2**20)
        total32.append(
            previous32 + (r["float32_bytes_down"] + r["float32_bytes_up"]) / 2**20
        )
    ax_bytes.plot(rounds, total, marker="o", label="sent (measured)")
    ax_bytes.plot(rounds, total32, linestyle="--", label="float32 equivalent")
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
