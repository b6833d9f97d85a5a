"""The paper table from finished runs: Markdown, CSV and a PNG.

Per cell, over its seeds: parameter memory (counted exactly from storage),
peak training-step RSS, bytes per round down and up (``len()`` of the
messages), test WER (mean with a Student-t interval over seeds, and the
difference to float32 paired by seed) and seconds per round (wall and
training CPU). Ratios are to the float32 cell of the same grid.

Example
-------
>>> from speechbrain_omc.experiments.grid import quick_grid
>>> f32, omc = quick_grid()
>>> def s(wer, pb, b):
...     return {"test_WER": wer, "parameter_bytes": pb, "bytes_down": b,
...             "bytes_up": b, "rounds": 2, "peak_train_rss_bytes": 5e8,
...             "train_minutes": 1.0, "train_cpu_seconds_per_round": 10.0,
...             "test_WER_ci95": [wer - 1, wer + 1], "test_WER_se": 0.5}
>>> rows = cell_rows({f32: {1: s(20, 100, 50), 2: s(22, 100, 50)},
...                   omc: {1: s(21, 40, 20), 2: s(22, 40, 20)}})
>>> rows[1]["parameter_ratio"], rows[1]["bytes_down_ratio"]
(0.4, 0.4)
>>> rows[1]["wer_delta"], rows[1]["overlaps_float32"]
(0.5, True)
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from speechbrain_omc.asr.stats import Interval, mean_ci
from speechbrain_omc.experiments.grid import Cell

__all__ = [
    "cell_rows",
    "plot_differences",
    "plot_table",
    "run_rows",
    "write_csv",
    "write_markdown",
    "write_text",
]

CSV_FIELDS = [
    "cell",
    "factor",
    "label",
    "seeds",
    "parameter_bytes",
    "parameter_ratio",
    "peak_train_rss_bytes",
    "rss_ratio",
    "bytes_down_per_round",
    "bytes_down_ratio",
    "bytes_up_per_round",
    "bytes_up_ratio",
    "wer_mean",
    "wer_ci_low",
    "wer_ci_high",
    "wer_seed_sd",
    "wer_delta",
    "wer_delta_ci_low",
    "wer_delta_ci_high",
    "overlaps_float32",
    "mean_within_float32_ci",
    "seconds_per_round",
    "cpu_seconds_per_round",
    "cpu_ratio",
    "test_se_mean",
]


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def cell_rows(results: Mapping[Cell, Mapping[int, dict]]) -> list[dict]:
    """One row per cell (keys :data:`CSV_FIELDS`): seed means, intervals, ratios.

    Arguments
    ---------
    results : mapping
        Cell to ``{seed: summary}`` of its finished runs.

    Returns
    -------
    list of dict
        In the cells' order.
    """
    base = next((runs for cell, runs in results.items() if cell.is_reference), {})
    rows = []
    reference: dict = {}
    for cell, runs in results.items():
        row = {**_seed_means(cell, runs), **_paired_delta(cell, runs, base)}
        if cell.is_reference:
            reference = row
        rows.append(row)
    for row in rows:
        for key, ratio in _RATIOS:
            row[ratio] = _ratio(row[key], reference.get(key))
        row.update(_overlap(row, reference))
    return rows


_RATIOS = (
    ("parameter_bytes", "parameter_ratio"),
    ("peak_train_rss_bytes", "rss_ratio"),
    ("bytes_down_per_round", "bytes_down_ratio"),
    ("bytes_up_per_round", "bytes_up_ratio"),
    ("cpu_seconds_per_round", "cpu_ratio"),
)


def _seed_means(cell: Cell, runs: Mapping[int, dict]) -> dict:
    """A cell's means over its seeds and its WER interval."""
    summaries = [runs[s] for s in sorted(runs)]
    wers = [s["test_WER"] for s in summaries]
    interval = mean_ci(wers) if wers else None
    return {
        "cell": cell.name,
        "factor": cell.factor,
        "label": cell.label,
        "seeds": len(summaries),
        "parameter_bytes": _mean([s["parameter_bytes"] for s in summaries]),
        "peak_train_rss_bytes": _mean(
            [s.get("peak_train_rss_bytes") for s in summaries]
        ),
        "bytes_down_per_round": _mean(
            [s["bytes_down"] / s["rounds"] for s in summaries]
        ),
        "bytes_up_per_round": _mean([s["bytes_up"] / s["rounds"] for s in summaries]),
        "wer_mean": interval.value if interval else None,
        "wer_ci_low": interval.low if interval else None,
        "wer_ci_high": interval.high if interval else None,
        "wer_seed_sd": (
            interval.se * math.sqrt(interval.n) if interval and interval.n > 1 else None
        ),
        "seconds_per_round": _mean(
            [60 * s["train_minutes"] / s["rounds"] for s in summaries]
        ),
        "cpu_seconds_per_round": _mean(
            [s.get("train_cpu_seconds_per_round") for s in summaries]
        ),
        "test_se_mean": _mean([s.get("test_WER_se") for s in summaries]),
    }


def _paired_delta(cell: Cell, runs: Mapping[int, dict], base: Mapping) -> dict:
    """WER difference to float32, paired by seed (same model, clients, data)."""
    paired = [
        runs[s]["test_WER"] - base[s]["test_WER"] for s in sorted(runs) if s in base
    ]
    delta = mean_ci(paired) if paired and not cell.is_reference else None
    return {
        "wer_delta": delta.value if delta else None,
        "wer_delta_ci_low": delta.low if delta else None,
        "wer_delta_ci_high": delta.high if delta else None,
    }


def _overlap(row: dict, reference: dict) -> dict:
    """Whether the WER interval meets float32's (needs 2 seeds in both)."""
    out = {"overlaps_float32": None, "mean_within_float32_ci": None}
    low = row["wer_ci_low"]
    ref_low = reference.get("wer_ci_low")
    if not reference or low is None or math.isnan(low):
        return out
    if ref_low is None or math.isnan(ref_low):
        return out
    mine = Interval(row["wer_mean"], low, row["wer_ci_high"], 0, 0)
    theirs = Interval(reference["wer_mean"], ref_low, reference["wer_ci_high"], 0, 0)
    return {
        "overlaps_float32": mine.overlaps(theirs),
        "mean_within_float32_ci": theirs.contains(row["wer_mean"]),
    }


def run_rows(results: Mapping[Cell, Mapping[int, dict]]) -> list[dict]:
    """One row per finished run (the table's raw material); ``results`` as for
    :func:`cell_rows`.
    """
    rows = []
    for cell, runs in results.items():
        for seed in sorted(runs):
            s = runs[seed]
            low, high = s.get("test_WER_ci95") or (None, None)
            rows.append(
                {
                    "cell": cell.name,
                    "seed": seed,
                    "test_WER": s["test_WER"],
                    "test_WER_ci_low": low,
                    "test_WER_ci_high": high,
                    "test_WER_se": s.get("test_WER_se"),
                    "valid_WER": s.get("valid_WER"),
                    "parameter_bytes": s["parameter_bytes"],
                    "peak_train_rss_bytes": s.get("peak_train_rss_bytes"),
                    "bytes_down_per_round": s["bytes_down"] / s["rounds"],
                    "bytes_up_per_round": s["bytes_up"] / s["rounds"],
                    "seconds_per_round": 60 * s["train_minutes"] / s["rounds"],
                    "cpu_seconds_per_round": s.get("train_cpu_seconds_per_round"),
                }
            )
    return rows


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old or the new)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv(rows: Sequence[dict], path: Path, fields: Sequence[str] = CSV_FIELDS):
    """Write rows as CSV, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    os.replace(tmp, path)


def _f(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _pct(ratio) -> str:
    return _f(None if ratio is None else 100 * ratio, ".1f") + " %"


def _scaled(value, unit: float, spec: str) -> str:
    return _f(None if value is None else value / unit, spec)


def format_table(rows: Sequence[dict]) -> str:
    """The paper table of :func:`cell_rows`' rows as Markdown."""
    head = (
        "| configuration | seeds | parameter memory (vs float32) | peak train RSS "
        "(vs float32) | bytes/round down (vs float32) | bytes/round up (vs float32) "
        "| test WER % [95 % CI over seeds] | Δ WER vs float32, paired [95 % CI] "
        "| CI overlaps float32's | s/round wall | CPU s/round (vs float32) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        delta = (
            "-"
            if r["wer_delta"] is None
            else f"{r['wer_delta']:+.2f} [{_f(r['wer_delta_ci_low'], '+.2f')}, "
            f"{_f(r['wer_delta_ci_high'], '+.2f')}]"
        )
        overlap = {True: "yes", False: "**no**", None: "-"}[r["overlaps_float32"]]
        if r["factor"] == "baseline" and r["cell"] == "float32":
            overlap = "(reference)"
        lines.append(
            f"| {r['label']} | {r['seeds']} "
            f"| {_scaled(r['parameter_bytes'], 1e6, '.3f')} MB "
            f"({_pct(r['parameter_ratio'])}) "
            f"| {_scaled(r['peak_train_rss_bytes'], 2**20, '.0f')} MiB "
            f"({_pct(r['rss_ratio'])}) "
            f"| {_scaled(r['bytes_down_per_round'], 1e6, '.2f')} MB "
            f"({_pct(r['bytes_down_ratio'])}) "
            f"| {_scaled(r['bytes_up_per_round'], 1e6, '.2f')} MB "
            f"({_pct(r['bytes_up_ratio'])}) "
            f"| {_f(r['wer_mean'], '.2f')} [{_f(r['wer_ci_low'], '.2f')}, "
            f"{_f(r['wer_ci_high'], '.2f')}] "
            f"| {delta} | {overlap} "
            f"| {_f(r['seconds_per_round'], '.1f')} "
            f"| {_f(r['cpu_seconds_per_round'], '.1f')} ({_pct(r['cpu_ratio'])}) |"
        )
    return "\n".join(lines)


def format_runs(rows: Sequence[dict]) -> str:
    """Every run of :func:`run_rows` as Markdown, with its bootstrap interval."""
    lines = [
        "| cell | seed | test WER % [95 % bootstrap CI over utterances] | SE "
        "| valid WER % | parameter bytes | peak train RSS MiB | bytes/round down "
        "| bytes/round up | s/round | CPU s/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['seed']} | {_f(r['test_WER'], '.2f')} "
            f"[{_f(r['test_WER_ci_low'], '.2f')}, {_f(r['test_WER_ci_high'], '.2f')}]"
            f" | {_f(r['test_WER_se'], '.2f')} | {_f(r['valid_WER'], '.2f')} "
            f"| {r['parameter_bytes']:,} "
            f"| {_scaled(r['peak_train_rss_bytes'], 2**20, '.0f')} "
            f"| {r['bytes_down_per_round']:,.0f} | {r['bytes_up_per_round']:,.0f} "
            f"| {_f(r['seconds_per_round'], '.1f')} "
            f"| {_f(r['cpu_seconds_per_round'], '.1f')} |"
        )
    return "\n".join(lines)


def write_markdown(path: Path, sections: Sequence[str]) -> None:
    """Write ``sections``, joined by blank lines, atomically."""
    write_text(path, "\n\n".join(s.strip() for s in sections) + "\n")


def _pyplot():
    """matplotlib's pyplot on the file-only backend, its log quiet."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _error_bar(value: float, low, high) -> list | None:
    """matplotlib's asymmetric error of an interval; ``None`` without one."""
    if low is None or math.isnan(low):
        return None
    return [[value - low], [high - value]]


def _save(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_table(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Test WER (mean and 95 % interval over seeds) against bytes per round.

    One point per :func:`cell_rows` row; float32's interval is the band.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6.5))
    reference = next((r for r in rows if r["cell"] == "float32"), None)
    if reference and reference["wer_ci_low"] is not None:
        if not math.isnan(reference["wer_ci_low"]):
            ax.axhspan(
                reference["wer_ci_low"],
                reference["wer_ci_high"],
                color="0.85",
                label="float32 95 % CI",
            )
    markers = {"baseline": "s", "default": "*", "format": "o", "PVT": "^"}
    for r in rows:
        if r["wer_mean"] is None or r["bytes_down_ratio"] is None:
            continue
        x = 100 * (r["bytes_down_ratio"] + r["bytes_up_ratio"]) / 2
        err = _error_bar(r["wer_mean"], r["wer_ci_low"], r["wer_ci_high"])
        ax.errorbar(
            x,
            r["wer_mean"],
            yerr=err,
            fmt=markers.get(r["factor"], "D"),
            markersize=9 if r["factor"] == "default" else 6,
            capsize=3,
        )
        ax.annotate(
            r["cell"], (x, r["wer_mean"]), textcoords="offset points", xytext=(5, 4)
        )
    ax.set_xlabel("bytes per round, % of float32 (mean of down and up)")
    ax.set_ylabel("test WER % (mean over seeds, 95 % CI)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left")
    ax.set_title(title)
    _save(fig, path)


def plot_differences(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Paired test WER difference to float32 with its interval, one row per cell."""
    plt = _pyplot()
    shown = [r for r in rows if r["wer_delta"] is not None]
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.38 * max(len(shown), 1)))
    for y, r in enumerate(shown):
        err = _error_bar(r["wer_delta"], r["wer_delta_ci_low"], r["wer_delta_ci_high"])
        ax.errorbar(r["wer_delta"], y, xerr=err, fmt="o", capsize=3, color="C0")
    ax.axvline(0.0, color="0.4", linewidth=1)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels(
        [f"{r['label']} ({r['seeds']} seed{'s' * (r['seeds'] != 1)})" for r in shown]
    )
    ax.invert_yaxis()
    ax.set_xlabel("test WER - float32's, points (paired by seed, 95 % CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)  # over the figure: the labels take its left half
    _save(fig, path)
