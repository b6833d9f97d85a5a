"""Partition an ASR manifest into federated clients by speaker (or IID).

A speaker is a device: its utterances stay together, which makes clients
non-IID. The speaker is the first field of the utterance id
``<speaker>-<chapter>-<utt>`` (the ``spk_id`` column would split chapters).

Modes
-----
``speaker`` (default)
    One speaker per client, or with ``num_clients=N`` seeded speakers each go
    to the client with the fewest utterances so far. A speaker is never split.
``iid``
    Utterances shuffled with ``seed`` and cut into ``num_clients`` equal
    clients (default: as many as speakers).
``utterance``
    One utterance per client; more clients than utterances take one seeded
    permutation after another. ``min_utterances`` must be 1.

In speaker mode, speakers under ``min_utterances`` are dropped with a warning
(``small_speakers="drop"``) or, with ``"merge"``, pooled into shared clients.
Impossible requests raise ``ValueError``. Output: ``client_NNN.csv`` (input
columns and row order), ``summary.json`` and ``summary.md``::

    python -m speechbrain_omc.data.partition --csv results/prep/train.csv \\
        --output results/clients --mode speaker --num-clients 8 --seed 1234

Example
-------
>>> rows = [
...     {"ID": f"{spk}-1-{k:04d}", "duration": "2.0"}
...     for spk, n in [(11, 4), (12, 3), (13, 2), (14, 1)]
...     for k in range(n)
... ]
>>> clients = partition_rows(rows, num_clients=2, seed=0)
>>> sorted(c.utterances for c in clients)
[5, 5]
>>> [len(c.rows) for c in partition_rows(rows, mode="iid", num_clients=3)]
[4, 3, 3]
>>> clients = partition_rows(rows, mode="utterance", num_clients=25)
>>> len(clients), {len(c.rows) for c in clients}
(25, {1})
>>> from collections import Counter
>>> sorted(set(Counter(c.rows[0]["ID"] for c in clients).values()))  # 10 utterances
[2, 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODES = ("speaker", "iid", "utterance")
SMALL_SPEAKER_POLICIES = ("drop", "merge")
DEFAULT_SEED = 1234
SUMMARY_JSON = "summary.json"
SUMMARY_TABLE = "summary.md"
_CLIENT_CSV = re.compile(r"^client_\d+\.csv$")


def _natural_key(text: str) -> tuple:
    """Order speaker ids as numbers when they are numbers (2 < 10)."""
    return tuple((0, int(f), "") if f.isdigit() else (1, 0, f) for f in text.split("-"))


def speaker_of(utt_id: str) -> str:
    """Speaker of a ``<speaker>-<chapter>-<utt>`` utterance id.

    Example
    -------
    >>> speaker_of("1272-128104-0000")
    '1272'
    """
    speaker, sep, rest = utt_id.partition("-")
    if not sep or not speaker or not rest:
        raise ValueError(
            f"utterance id {utt_id!r} is not '<speaker>-<chapter>-<utt>': "
            "cannot tell its speaker"
        )
    return speaker


@dataclass
class Client:
    """One federated client: a name, its sorted speakers, its rows in manifest order."""

    name: str
    speakers: list[str]
    rows: list[dict[str, str]] = field(repr=False)

    @property
    def utterances(self) -> int:
        """Number of utterances."""
        return len(self.rows)

    @property
    def hours(self) -> float:
        """Total duration in hours (from the ``duration`` column, seconds)."""
        return sum(float(r["duration"]) for r in self.rows) / 3600


def read_manifest(csv_path: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows and columns of a SpeechBrain CSV with ``ID`` and ``duration``.

    Example
    -------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "m.csv"
    >>> _ = p.write_text("ID,duration,wrd\\n1-2-0000,1.5,HI\\n")
    >>> read_manifest(p)
    ([{'ID': '1-2-0000', 'duration': '1.5', 'wrd': 'HI'}], ['ID', 'duration', 'wrd'])
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"manifest not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fieldnames = list(reader.fieldnames or [])
    for column in ("ID", "duration"):
        if column not in fieldnames:
            raise ValueError(f"{csv_path}: no {column!r} column (has {fieldnames})")
    return rows, fieldnames


def _check_rows(rows: Sequence[dict[str, str]]) -> None:
    if not rows:
        raise ValueError("the manifest is empty: nothing to partition")
    seen = set()
    for row in rows:
        utt_id = row["ID"]
        if utt_id in seen:
            raise ValueError(f"duplicate utterance id {utt_id!r} in the manifest")
        seen.add(utt_id)
        try:
            duration = float(row["duration"])
        except (TypeError, ValueError):
            duration = math.nan
        if not duration >= 0:
            raise ValueError(f"utterance {utt_id!r}: bad duration {row['duration']!r}")


def partition_rows(
    rows: Sequence[dict[str, str]],
    mode: str = "speaker",
    num_clients: int | None = None,
    min_utterances: int = 1,
    seed: int = DEFAULT_SEED,
    small_speakers: str = "drop",
) -> list[Client]:
    """Split manifest rows into federated clients (modes: module docstring).

    Arguments
    ---------
    rows : sequence of dict
        Manifest rows with ``ID`` and ``duration`` (seconds).
    mode : str
    num_clients : int, optional
        ``None``: one per speaker, as many as speakers (IID), one per utterance.
    min_utterances : int
    seed : int
    small_speakers : str
        ``"drop"`` or ``"merge"``.

    Returns
    -------
    list of Client
        Named ``client_000``...

    Example
    -------
    >>> rows = [{"ID": f"{s}-7-{k:04d}", "duration": "1"} for s in (1, 2, 3)
    ...         for k in range(2 * s)]
    >>> [c.speakers for c in partition_rows(rows)]
    [['1'], ['2'], ['3']]
    >>> with warnings.catch_warnings():  # speaker 1 is dropped, with a warning
    ...     warnings.simplefilter("ignore")
    ...     [c.speakers for c in partition_rows(rows, min_utterances=3)]
    [['2'], ['3']]
    >>> partition_rows(rows, num_clients=4)
    Traceback (most recent call last):
    ...
    ValueError: 4 clients requested but only 3 speakers ...
    """
    _check_request(mode, num_clients, min_utterances, small_speakers)
    _check_rows(rows)
    rng = np.random.default_rng(seed)
    by_speaker = _rows_by_speaker(rows)
    speakers = sorted(by_speaker, key=_natural_key)
    if mode == "utterance":
        return _utterance_clients(rows, num_clients, min_utterances, rng)
    if mode == "iid":
        n = len(speakers) if num_clients is None else num_clients
        return _iid_clients(rows, n, min_utterances, rng)
    small = [s for s in speakers if len(by_speaker[s]) < min_utterances]
    if small and small_speakers == "drop":
        speakers = _drop_small(speakers, small, by_speaker, min_utterances)
        small = []
    if not speakers:
        raise ValueError(
            f"min_utterances={min_utterances} leaves no client: every speaker "
            "has fewer utterances"
        )
    if num_clients is None:
        groups = _one_speaker_groups(speakers, small, by_speaker, min_utterances, rng)
    else:
        groups = _balanced_groups(
            speakers, by_speaker, num_clients, min_utterances, rng
        )
    return _clients_in_order(groups, by_speaker, rows)


def _check_request(mode, num_clients, min_utterances, small_speakers) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if small_speakers not in SMALL_SPEAKER_POLICIES:
        raise ValueError(
            f"unknown small_speakers {small_speakers!r}; "
            f"expected one of {SMALL_SPEAKER_POLICIES}"
        )
    if num_clients is not None and num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if min_utterances < 1:
        raise ValueError(f"min_utterances must be at least 1, got {min_utterances}")


def _rows_by_speaker(rows) -> dict[str, list[dict[str, str]]]:
    by_speaker: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_speaker.setdefault(speaker_of(row["ID"]), []).append(row)
    return by_speaker


def _iid_clients(rows, n, min_utterances, rng) -> list[Client]:
    """``n`` clients of equal size from one seeded shuffle of the utterances."""
    if n > len(rows):
        raise ValueError(f"{n} clients requested but only {len(rows)} utterances")
    if len(rows) // n < min_utterances:
        raise ValueError(
            f"{len(rows)} utterances in {n} IID clients leave fewer than "
            f"min_utterances={min_utterances} per client; use fewer clients"
        )
    clients = []
    for index, shard in enumerate(np.array_split(rng.permutation(len(rows)), n)):
        shard_rows = [rows[i] for i in sorted(shard)]
        shard_speakers = sorted(
            {speaker_of(r["ID"]) for r in shard_rows}, key=_natural_key
        )
        clients.append(Client(f"client_{index:03d}", shard_speakers, shard_rows))
    return clients


def _drop_small(speakers, small, by_speaker, min_utterances) -> list[str]:
    """The speakers without ``small``, with a warning naming those dropped."""
    lost = sum(len(by_speaker[s]) for s in small)
    warnings.warn(
        f"dropping {len(small)} speaker(s) with fewer than "
        f"min_utterances={min_utterances} utterances ({lost} utterances): "
        + ", ".join(small[:20])
        + (" ..." if len(small) > 20 else ""),
        stacklevel=3,
    )
    dropped = set(small)
    return [s for s in speakers if s not in dropped]


def _one_speaker_groups(
    speakers, small, by_speaker, min_utterances, rng
) -> list[list[str]]:
    """One group per speaker; ``small`` speakers pooled in seeded order."""
    is_small = set(small)
    groups = [[s] for s in speakers if s not in is_small]
    if not small:
        return groups

    def size(group):
        return sum(len(by_speaker[t]) for t in group)

    pooled: list[list[str]] = []
    current: list[str] = []
    for i in rng.permutation(len(small)):
        current.append(small[i])
        if size(current) >= min_utterances:
            pooled.append(current)
            current = []
    if current:  # the remainder joins the smallest pool (or client)
        targets = pooled or groups
        if not targets:
            total = sum(len(rows) for rows in by_speaker.values())
            raise ValueError(
                f"min_utterances={min_utterances} leaves no client: the "
                f"whole manifest has only {total} utterances"
            )
        min(targets, key=size).extend(current)
    warnings.warn(
        f"merged {len(small)} speaker(s) with fewer than "
        f"min_utterances={min_utterances} utterances into shared clients",
        stacklevel=3,
    )
    return groups + pooled


def _balanced_groups(
    speakers, by_speaker, num_clients, min_utterances, rng
) -> list[list[str]]:
    """Seeded speakers, each to the client with the fewest utterances so far."""
    if num_clients > len(speakers):
        raise ValueError(
            f"{num_clients} clients requested but only {len(speakers)} speakers "
            "(a speaker is never split in speaker mode); use mode='iid' or "
            "fewer clients"
        )
    groups: list[list[str]] = [[] for _ in range(num_clients)]
    loads = np.zeros(num_clients, dtype=np.int64)
    for i in rng.permutation(len(speakers)):
        target = int(np.argmin(loads))  # first least-loaded client
        groups[target].append(speakers[i])
        loads[target] += len(by_speaker[speakers[i]])
    if loads.min() < min_utterances:
        raise ValueError(
            f"grouping {len(speakers)} speakers into {num_clients} clients "
            f"leaves a client with {int(loads.min())} utterances, fewer than "
            f"min_utterances={min_utterances}; use fewer clients"
        )
    return groups


def _utterance_clients(rows, num_clients, min_utterances, rng) -> list[Client]:
    """One utterance per client, in seeded permutations of all of them."""
    if min_utterances != 1:
        raise ValueError("utterance mode: one utterance per client, min_utterances=1")
    n = len(rows) if num_clients is None else num_clients
    order: list[int] = []
    while len(order) < n:
        order.extend(int(i) for i in rng.permutation(len(rows)))
    return [
        Client(f"client_{index:03d}", [speaker_of(rows[i]["ID"])], [rows[i]])
        for index, i in enumerate(order[:n])
    ]


def _clients_in_order(groups, by_speaker, rows) -> list[Client]:
    """Clients from speaker groups, named in order of their first speaker."""
    # Client rows keep manifest order; keyed by object identity.
    position = {id(r): i for i, r in enumerate(rows)}
    groups = sorted(
        (sorted(g, key=_natural_key) for g in groups if g),
        key=lambda g: _natural_key(g[0]),
    )
    return [
        Client(
            f"client_{index:03d}",
            speakers,
            sorted(
                (r for s in speakers for r in by_speaker[s]),
                key=lambda r: position[id(r)],
            ),
        )
        for index, speakers in enumerate(groups)
    ]


def summarize(clients: Sequence[Client], **settings) -> dict:
    """Summary of a partition: ``settings``, then ``total`` and per ``clients``.

    Example
    -------
    >>> c = Client("client_000", ["1"], [{"ID": "1-2-0000", "duration": "36"}])
    >>> summarize([c], mode="speaker")["total"]["hours"]
    0.01
    """
    sizes = [c.utterances for c in clients]
    return {
        **settings,
        "total": {
            "clients": len(clients),
            "speakers": len({s for c in clients for s in c.speakers}),
            "utterances": sum(sizes),
            "hours": round(sum(c.hours for c in clients), 4),
            "utterances_per_client": {
                "min": min(sizes, default=0),
                "median": float(np.median(sizes)) if sizes else 0.0,
                "max": max(sizes, default=0),
            },
        },
        "clients": [
            {
                "name": c.name,
                "csv": f"{c.name}.csv",
                "speakers": c.speakers,
                "num_speakers": len(c.speakers),
                "utterances": c.utterances,
                "hours": round(c.hours, 4),
            }
            for c in clients
        ],
    }


def format_summary(summary: dict, max_speakers: int = 8) -> str:
    """Markdown table of a :func:`summarize` result (``summary.md``).

    Example
    -------
    >>> c = Client("client_000", ["1"], [{"ID": "1-2-0000", "duration": "36"}])
    >>> print(format_summary(summarize([c], mode="speaker")).splitlines()[-1])
    | **total** | 1 | 1 | 0.0100 | 0.6 | |
    """
    settings = ", ".join(
        f"{k}={v}"
        for k, v in summary.items()
        if k not in ("clients", "total") and not isinstance(v, (dict, list))
    )
    lines = [
        f"Partition: {settings}",
        "",
        "| client | speakers | utterances | hours | minutes | speaker ids |",
        "|---|---|---|---|---|---|",
    ]
    for c in summary["clients"]:
        ids = c["speakers"][:max_speakers]
        more = len(c["speakers"]) - len(ids)
        listed = " ".join(ids) + (f" (+{more})" if more > 0 else "")
        lines.append(
            f"| {c['name']} | {c['num_speakers']} | {c['utterances']} | "
            f"{c['hours']:.4f} | {c['hours'] * 60:.1f} | {listed} |"
        )
    t = summary["total"]
    lines.append(
        f"| **total** | {t['speakers']} | {t['utterances']} | {t['hours']:.4f} | "
        f"{t['hours'] * 60:.1f} | |"
    )
    dropped = summary.get("dropped")
    if dropped and dropped.get("speakers"):
        lines += [
            "",
            f"Dropped {len(dropped['speakers'])} speaker(s), "
            f"{dropped['utterances']} utterance(s): {' '.join(dropped['speakers'])}",
        ]
    return "\n".join(lines)


def write_partition(
    clients: Sequence[Client],
    output_dir: str | Path,
    fieldnames: Sequence[str],
    **settings,
) -> dict:
    """Write one CSV per client (stale ones removed), ``summary.json`` and ``.md``.

    Arguments
    ---------
    clients : sequence of Client
    output_dir : str or Path
    fieldnames : sequence of str
        The source manifest's columns.
    **settings
        Stored in the summary.

    Returns
    -------
    dict
        The summary.

    Example
    -------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> c = Client("client_000", ["1"], [{"ID": "1-2-0000", "duration": "36"}])
    >>> write_partition([c], out, ["ID", "duration"])["total"]["utterances"]
    1
    >>> sorted(p.name for p in out.iterdir())
    ['client_000.csv', 'summary.json', 'summary.md']
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for old in output_dir.iterdir():
        if _CLIENT_CSV.match(old.name):
            old.unlink()
    for client in clients:
        path = output_dir / f"{client.name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames), lineterminator="\n")
            writer.writeheader()
            writer.writerows(client.rows)
    summary = summarize(clients, **settings)
    tmp = output_dir / (SUMMARY_JSON + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / SUMMARY_JSON)
    (output_dir / SUMMARY_TABLE).write_text(
        format_summary(summary) + "\n", encoding="utf-8"
    )
    return summary


def partition_manifest(
    csv_path: str | Path,
    output_dir: str | Path,
    mode: str = "speaker",
    num_clients: int | None = None,
    min_utterances: int = 1,
    seed: int = DEFAULT_SEED,
    small_speakers: str = "drop",
) -> dict:
    """Read a manifest, partition it, write the clients and summaries.

    Arguments
    ---------
    csv_path : str or Path
    output_dir : str or Path
    mode, num_clients, min_utterances, seed, small_speakers
        As in :func:`partition_rows`.

    Returns
    -------
    dict
        The summary.

    Example
    -------
    >>> partition_manifest("/nonexistent.csv", "/tmp/out")
    Traceback (most recent call last):
    ...
    FileNotFoundError: manifest not found: /nonexistent.csv
    """
    rows, fieldnames = read_manifest(csv_path)
    if not rows:
        raise ValueError(f"the manifest {csv_path} is empty: nothing to partition")
    clients = partition_rows(
        rows, mode, num_clients, min_utterances, seed, small_speakers
    )
    kept = {s for c in clients for s in c.speakers}
    dropped_rows = [r for r in rows if speaker_of(r["ID"]) not in kept]
    dropped = sorted({speaker_of(r["ID"]) for r in dropped_rows}, key=_natural_key)
    return write_partition(
        clients,
        output_dir,
        fieldnames,
        source=str(csv_path),
        mode=mode,
        num_clients=num_clients,
        min_utterances=min_utterances,
        seed=seed,
        small_speakers=small_speakers,
        dropped={
            "speakers": dropped,
            "utterances": len(dropped_rows),
            "hours": round(sum(float(r["duration"]) for r in dropped_rows) / 3600, 4),
        },
    )


def client_manifests(output_dir: str | Path) -> list[Path]:
    """The client CSVs of a written partition, in ``summary.json``'s order.

    Example
    -------
    >>> client_manifests("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no partition summary: /nonexistent/summary.json
    """
    path = Path(output_dir) / SUMMARY_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no partition summary: {path}")
    summary = json.loads(path.read_text(encoding="utf-8"))
    return [Path(output_dir) / c["csv"] for c in summary["clients"]]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_omc.data.partition",
        description="Partition a SpeechBrain CSV manifest into federated clients.",
    )
    parser.add_argument("--csv", required=True, help="input manifest")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--mode", choices=MODES, default="speaker")
    parser.add_argument(
        "--num-clients",
        type=int,
        default=None,
        help="default: one per speaker (speaker mode) / as many as speakers (iid)",
    )
    parser.add_argument("--min-utterances", type=int, default=1)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--small-speakers", choices=SMALL_SPEAKER_POLICIES, default="drop"
    )
    args = parser.parse_args(argv)
    summary = partition_manifest(
        args.csv,
        args.output,
        mode=args.mode,
        num_clients=args.num_clients,
        min_utterances=args.min_utterances,
        seed=args.seed,
        small_speakers=args.small_speakers,
    )
    print(format_summary(summary))
    print(f"\nwrote {summary['total']['clients']} client manifests to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
