"""Tests of speaker partitioning into federated clients."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from speechbrain_omc.data import partition as part
from speechbrain_omc.data.partition import (
    client_manifests,
    partition_manifest,
    partition_rows,
    speaker_of,
)
from speechbrain_omc.data.prepare_synthspeech import prepare_synthspeech

FIELDS = ["ID", "duration", "wav", "spk_id", "wrd"]


def make_rows(counts: dict[str, int], chapters: int = 2) -> list[dict[str, str]]:
    """Rows of a manifest with ``counts[speaker]`` utterances per speaker."""
    rows = []
    for spk, n in counts.items():
        for k in range(n):
            chap = f"{spk}{k % chapters}"
            rows.append(
                {
                    "ID": f"{spk}-{chap}-{k:04d}",
                    "duration": f"{1 + (k % 5) * 0.5}",
                    "wav": f"$data_root/train/{spk}/{chap}/{spk}-{chap}-{k:04d}.flac",
                    "spk_id": f"{spk}-{chap}",
                    "wrd": "HELLO",
                }
            )
    return rows


def write_csv(rows, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


COUNTS = {
    str(s): n for s, n in zip(range(10, 22), [9, 3, 7, 12, 5, 8, 2, 6, 11, 4, 10, 7])
}
ROWS = make_rows(COUNTS)


def ids(clients):
    return [[r["ID"] for r in c.rows] for c in clients]


def check_invariants(rows, clients, mode, min_utterances=1, kept_speakers=None):
    """Every kept utterance in exactly one client; speakers whole in speaker mode."""
    all_ids = [r["ID"] for c in clients for r in c.rows]
    assert len(all_ids) == len(set(all_ids))
    kept = (
        kept_speakers
        if kept_speakers is not None
        else {speaker_of(r["ID"]) for r in rows}
    )
    assert set(all_ids) == {r["ID"] for r in rows if speaker_of(r["ID"]) in kept}
    assert all(c.utterances >= min_utterances for c in clients)
    for c in clients:
        assert c.speakers == sorted(
            {speaker_of(r["ID"]) for r in c.rows}, key=part._natural_key
        )
        # rows keep the manifest's order
        positions = [rows.index(r) for r in c.rows]
        assert positions == sorted(positions)
    if mode == "speaker":
        owners = {}
        for c in clients:
            for s in c.speakers:
                assert s not in owners, f"speaker {s} split across clients"
                owners[s] = c.name
    assert [c.name for c in clients] == [f"client_{i:03d}" for i in range(len(clients))]


# --------------------------------------------------------------------------
# modes


def test_one_speaker_per_client():
    clients = partition_rows(ROWS)
    assert [c.speakers for c in clients] == [[s] for s in COUNTS]
    assert [c.utterances for c in clients] == list(COUNTS.values())
    check_invariants(ROWS, clients, "speaker")


def test_speaker_id_is_first_field_not_spk_id():
    # Two chapters per speaker: spk_id differs within a speaker, the client must not.
    clients = partition_rows(ROWS)
    assert all(
        len({r["spk_id"] for r in c.rows}) > 1 for c in clients if c.utterances > 1
    )


@pytest.mark.parametrize("num_clients", [1, 3, 5, 12])
def test_grouped_speakers_balanced(num_clients):
    clients = partition_rows(ROWS, num_clients=num_clients, seed=3)
    assert len(clients) == num_clients
    check_invariants(ROWS, clients, "speaker")
    sizes = [c.utterances for c in clients]
    assert max(sizes) - min(sizes) <= max(COUNTS.values())


def test_deterministic_per_seed_and_seed_matters():
    a = partition_rows(ROWS, num_clients=4, seed=7)
    b = partition_rows(ROWS, num_clients=4, seed=7)
    assert ids(a) == ids(b) and [c.speakers for c in a] == [c.speakers for c in b]
    groupings = {
        tuple(tuple(c.speakers) for c in partition_rows(ROWS, num_clients=4, seed=s))
        for s in range(6)
    }
    assert len(groupings) > 1
    iid = {
        tuple(map(tuple, ids(partition_rows(ROWS, "iid", 4, seed=s)))) for s in range(3)
    }
    assert len(iid) == 3


def test_iid_mixes_speakers_and_balances():
    clients = partition_rows(ROWS, mode="iid", num_clients=5, seed=0)
    check_invariants(ROWS, clients, "iid")
    sizes = [c.utterances for c in clients]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(c.speakers) > 1 for c in clients)
    # default: as many IID clients as speakers
    assert len(partition_rows(ROWS, mode="iid")) == len(COUNTS)


def test_min_utterances_drop_warns():
    with pytest.warns(UserWarning, match=r"dropping 3 speaker\(s\).*11, 16, 19"):
        clients = partition_rows(ROWS, min_utterances=5)
    kept = {s for s, n in COUNTS.items() if n >= 5}
    check_invariants(ROWS, clients, "speaker", 5, kept)
    with pytest.warns(UserWarning, match="dropping"):
        grouped = partition_rows(ROWS, num_clients=3, min_utterances=5)
    check_invariants(ROWS, grouped, "speaker", 5, kept)


def test_min_utterances_merge_keeps_everything():
    with pytest.warns(UserWarning, match="merged 3 speaker"):
        clients = partition_rows(ROWS, min_utterances=5, small_speakers="merge")
    check_invariants(ROWS, clients, "speaker", 5)
    merged = [c for c in clients if len(c.speakers) > 1]
    assert merged and all(set(c.speakers) & {"11", "16", "19"} for c in merged)


# --------------------------------------------------------------------------
# property test over random manifests


# Plain seeded draws rather than hypothesis: hypothesis' collection hook reads
# __file__ of every imported module, and speechbrain's lazy k2 module raises
# ImportError on that when k2 is not installed.
@pytest.mark.parametrize("case", range(60))
def test_invariants_hold_for_random_manifests(case):
    rng = np.random.default_rng(case)
    counts = rng.integers(1, 10, size=int(rng.integers(1, 13))).tolist()
    mode = ["speaker", "iid"][case % 2]
    counts_by_spk = {str(100 + i): n for i, n in enumerate(counts)}
    rows = make_rows(counts_by_spk)
    limit = len(counts) if mode == "speaker" else len(rows)
    num_clients = None if rng.random() < 0.3 else int(rng.integers(1, limit + 1))
    min_utt = int(rng.integers(1, 5))
    small = ["drop", "merge"][int(rng.integers(0, 2))]
    seed = int(rng.integers(0, 2**16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            clients = partition_rows(rows, mode, num_clients, min_utt, seed, small)
        except ValueError as err:
            assert any(
                w in str(err) for w in ("min_utterances", "requested but only")
            ), err
            return
    kept = None
    if mode == "speaker" and small == "drop":
        kept = {s for s, n in counts_by_spk.items() if n >= min_utt}
    check_invariants(rows, clients, mode, min_utt, kept)
    if num_clients is not None:
        assert len(clients) == num_clients
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = partition_rows(rows, mode, num_clients, min_utt, seed, small)
    assert ids(again) == ids(clients)


# --------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_clients": 13}, "13 clients requested but only 12 speakers"),
        ({"mode": "dirichlet"}, "unknown mode"),
        ({"small_speakers": "keep"}, "unknown small_speakers"),
        ({"num_clients": 0}, "at least 1"),
        ({"min_utterances": 0}, "at least 1"),
        ({"min_utterances": 100}, "leaves no client"),
        ({"min_utterances": 20, "small_speakers": "merge", "num_clients": 5}, "fewer"),
        ({"mode": "iid", "num_clients": 200}, "only 84 utterances"),
        ({"mode": "iid", "num_clients": 30, "min_utterances": 4}, "min_utterances"),
    ],
)
def test_impossible_requests(kwargs, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            partition_rows(ROWS, **kwargs)


def test_merge_with_too_few_utterances_overall():
    rows = make_rows({"1": 2, "2": 2})
    with pytest.raises(ValueError, match="leaves no client"):
        partition_rows(rows, min_utterances=5, small_speakers="merge")


def test_bad_manifests(tmp_path):
    empty = write_csv([], tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="empty"):
        partition_manifest(empty, tmp_path / "out")
    with pytest.raises(ValueError, match="empty"):
        partition_rows([])
    with pytest.raises(ValueError, match="duplicate"):
        partition_rows(ROWS[:3] + ROWS[:1])
    with pytest.raises(ValueError, match="cannot tell its speaker"):
        partition_rows([{"ID": "nospeaker", "duration": "1"}])
    with pytest.raises(ValueError, match="bad duration"):
        partition_rows([{"ID": "1-2-0000", "duration": "soon"}])
    no_duration = tmp_path / "nodur.csv"
    no_duration.write_text("ID,wav\n1-2-0000,x.flac\n")
    with pytest.raises(ValueError, match="'duration' column"):
        partition_manifest(no_duration, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        partition_manifest(tmp_path / "missing.csv", tmp_path / "out")


# --------------------------------------------------------------------------
# files, summaries, command line


def test_partition_manifest_files(tmp_path):
    source = write_csv(ROWS, tmp_path / "train.csv")
    out = tmp_path / "clients"
    summary = partition_manifest(source, out, num_clients=4, seed=1)
    paths = client_manifests(out)
    assert [p.name for p in paths] == [f"client_{i:03d}.csv" for i in range(4)]
    union = []
    for path, entry in zip(paths, summary["clients"]):
        with open(path) as f:
            assert f.readline().strip() == ",".join(FIELDS)
        rows = read_csv(path)
        union += rows
        assert len(rows) == entry["utterances"]
        assert entry["hours"] == pytest.approx(
            sum(float(r["duration"]) for r in rows) / 3600, abs=1e-4
        )
        assert sorted({speaker_of(r["ID"]) for r in rows}) == sorted(entry["speakers"])
    assert sorted(union, key=lambda r: r["ID"]) == sorted(ROWS, key=lambda r: r["ID"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["total"]["utterances"] == len(ROWS)
    assert on_disk["seed"] == 1 and on_disk["mode"] == "speaker"
    table = (out / "summary.md").read_text()
    assert "| client_003 |" in table and "**total**" in table
    # a smaller re-partition leaves no stale client behind
    partition_manifest(source, out, num_clients=2, seed=1)
    assert len(list(out.glob("client_*.csv"))) == 2


def test_dropped_speakers_in_summary(tmp_path):
    source = write_csv(ROWS, tmp_path / "train.csv")
    with pytest.warns(UserWarning):
        summary = partition_manifest(source, tmp_path / "out", min_utterances=5)
    assert summary["dropped"]["speakers"] == ["11", "16", "19"]
    assert summary["dropped"]["utterances"] == 3 + 2 + 4
    assert "Dropped 3 speaker(s)" in (tmp_path / "out" / "summary.md").read_text()


def test_command_line(tmp_path, capsys):
    source = write_csv(ROWS, tmp_path / "train.csv")
    args = ["--csv", str(source), "--output", str(tmp_path / "o"), "--seed", "5"]
    assert part.main(args + ["--mode", "iid", "--num-clients", "3"]) == 0
    assert "wrote 3 client manifests" in capsys.readouterr().out
    assert len(client_manifests(tmp_path / "o")) == 3


# --------------------------------------------------------------------------
# the bundled corpus, by the one command


def test_synthspeech_partitions_one_command(tmp_path):
    result = prepare_synthspeech(tmp_path, progress=False)
    train = read_csv(Path(result["manifests"]["train"]))
    train_speakers = {speaker_of(r["ID"]) for r in train}
    assert result["splits"]["train"]["speakers"] == len(train_speakers) >= 24
    expected_clients = {
        "speaker": len(train_speakers),
        "speaker_8": 8,
        "iid": 24,
        "iid_8": 8,
    }
    for name, summary in result["partitions"].items():
        folder = tmp_path / "partitions" / name
        clients = [read_csv(p) for p in client_manifests(folder)]
        assert len(clients) == expected_clients[name]
        all_ids = [r["ID"] for rows in clients for r in rows]
        assert sorted(all_ids) == sorted(r["ID"] for r in train)
        assert summary["total"]["utterances"] == len(train)
        owners = [{speaker_of(r["ID"]) for r in rows} for rows in clients]
        if summary["mode"] == "speaker":
            assert sum(len(o) for o in owners) == len(train_speakers)
        else:
            assert all(len(o) > 1 for o in owners)
    overview = (tmp_path / "summary.md").read_text()
    assert "| speaker_8 | speaker |" in overview
    # rerun: same partitions (deterministic) and manifests reused
    again = prepare_synthspeech(tmp_path, progress=False)
    assert again["partitions"] == result["partitions"]
