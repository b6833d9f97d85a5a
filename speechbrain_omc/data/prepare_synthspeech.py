"""One command: manifests and federated partitions of the bundled SynthSpeech.

``python -m speechbrain_omc.data.prepare_synthspeech --output OUT`` writes::

    <output>/manifests/{train,dev,test}.csv      SpeechBrain CSVs ($data_root paths)
    <output>/partitions/<name>/client_*.csv      one manifest per federated client
    <output>/partitions/<name>/summary.{json,md} clients, speakers, utterances, hours
    <output>/summary.{json,md}                   corpus and all partitions at a glance

The training split is partitioned four ways (:data:`DEFAULT_PARTITIONS`):
by speaker (one per client, or 8 groups) and IID with the same client counts.

Example
-------
>>> import tempfile
>>> out = Path(tempfile.mkdtemp())
>>> result = prepare_synthspeech(out, progress=False)
>>> result["partitions"]["speaker"]["total"]["clients"]
24
>>> (out / "partitions" / "iid_8" / "client_007.csv").is_file()
True
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from speechbrain_omc.data.librispeech import SYNTHSPEECH_SPLITS, prepare_librispeech
from speechbrain_omc.data.partition import DEFAULT_SEED, partition_manifest

#: Environment variable naming the SynthSpeech root, for installed packages.
CORPUS_VARIABLE = "SPEECHBRAIN_OMC_SYNTHSPEECH"

# name -> keyword arguments of partition_manifest
DEFAULT_PARTITIONS: dict[str, dict] = {
    "speaker": {"mode": "speaker"},
    "speaker_8": {"mode": "speaker", "num_clients": 8},
    "iid": {"mode": "iid"},
    "iid_8": {"mode": "iid", "num_clients": 8},
}


def bundled_corpus() -> Path:
    """Root of the committed corpus, ``data/SynthSpeech`` (data, not in the package).

    Looked for in ``$SPEECHBRAIN_OMC_SYNTHSPEECH``, the source checkout of an
    editable install, then under the working directory.

    Example
    -------
    >>> (bundled_corpus() / "SPEAKERS.TXT").is_file()
    True
    """
    candidates = []
    if os.environ.get(CORPUS_VARIABLE):
        candidates.append(Path(os.environ[CORPUS_VARIABLE]).expanduser())
    candidates.append(Path(__file__).resolve().parents[2] / "data" / "SynthSpeech")
    candidates.append(Path.cwd() / "data" / "SynthSpeech")
    for root in candidates:
        if (root / "SPEAKERS.TXT").is_file():
            return root
    raise FileNotFoundError(
        "bundled SynthSpeech not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + f"): run from a repository checkout, set ${CORPUS_VARIABLE}, or pass "
        "data_folder / --data-folder"
    )


def _split_stats(csv_path: Path) -> dict:
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {
        "speakers": len({r["ID"].split("-")[0] for r in rows}),
        "utterances": len(rows),
        "hours": round(sum(float(r["duration"]) for r in rows) / 3600, 4),
    }


def prepare_synthspeech(
    output: str | Path,
    data_folder: str | Path | None = None,
    partitions: Mapping[str, Mapping] = DEFAULT_PARTITIONS,
    seed: int = DEFAULT_SEED,
    train_split: str = "train",
    splits: Sequence[str] = SYNTHSPEECH_SPLITS,
    progress: bool = True,
) -> dict:
    """Write the corpus manifests and partition the training split.

    Arguments
    ---------
    output : str or Path
        Output folder (``manifests/``, ``partitions/``, ``summary.*``).
    data_folder : str or Path, optional
        Corpus root; default :func:`bundled_corpus`.
    partitions : mapping
        Name to keyword arguments of
        :func:`~speechbrain_omc.data.partition.partition_manifest`.
    seed : int
        Seed of every partition that does not set its own.
    train_split : str
        The split that is partitioned.
    splits : sequence of str
        Splits to write manifests for.
    progress : bool
        Progress bars while scanning the corpus.

    Returns
    -------
    dict
        ``splits`` (statistics), ``manifests`` (paths), ``partitions``
        (name to summary).
    """
    output = Path(output)
    data_folder = Path(data_folder) if data_folder is not None else bundled_corpus()
    csvs = prepare_librispeech(
        data_folder, output / "manifests", splits=splits, progress=progress
    )
    summaries = {}
    for name, kwargs in partitions.items():
        summaries[name] = partition_manifest(
            csvs[train_split],
            output / "partitions" / name,
            **{"seed": seed, **kwargs},
        )
    result = {
        "data_folder": str(data_folder),
        "splits": {split: _split_stats(path) for split, path in csvs.items()},
        "manifests": {split: str(path) for split, path in csvs.items()},
        "partitions": summaries,
    }
    (output / "summary.json").write_text(
        json.dumps(result, indent=2) + "\n", encoding="utf-8"
    )
    (output / "summary.md").write_text(format_report(result) + "\n", encoding="utf-8")
    return result


def format_report(result: dict) -> str:
    """Markdown tables of :func:`prepare_synthspeech`'s splits and partitions.

    Example
    -------
    >>> result = {"splits": {"dev": {"speakers": 4, "utterances": 48,
    ...           "hours": 0.02}}, "partitions": {}}
    >>> print(format_report(result).splitlines()[2])
    | dev | 4 | 48 | 0.0200 | 1.2 |
    """
    lines = [
        "| split | speakers | utterances | hours | minutes |",
        "|---|---|---|---|---|",
    ]
    for split, s in result["splits"].items():
        lines.append(
            f"| {split} | {s['speakers']} | {s['utterances']} | {s['hours']:.4f} | "
            f"{s['hours'] * 60:.1f} |"
        )
    if result["partitions"]:
        lines += [
            "",
            "| partition | mode | seed | clients | speakers per client | "
            "utterances per client (min/median/max) | minutes per client "
            "(min/max) | total utterances | dropped speakers |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for name, p in result["partitions"].items():
        t = p["total"]
        per_client = t["utterances_per_client"]
        n_speakers = [c["num_speakers"] for c in p["clients"]]
        minutes = [c["hours"] * 60 for c in p["clients"]]
        lines.append(
            f"| {name} | {p['mode']} | {p['seed']} | {t['clients']} | "
            f"{min(n_speakers)}-{max(n_speakers)} | "
            f"{per_client['min']}/{per_client['median']:g}/{per_client['max']} | "
            f"{min(minutes):.2f}/{max(minutes):.2f} | {t['utterances']} | "
            f"{len(p['dropped']['speakers'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_omc.data.prepare_synthspeech",
        description="Manifests and federated partitions of the bundled SynthSpeech.",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--data-folder", default=None, help="corpus root (default: bundled corpus)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    result = prepare_synthspeech(args.output, args.data_folder, seed=args.seed)
    print(format_report(result))
    print(f"\nwrote manifests and partitions under {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
