"""Tests of the SynthSpeech corpus and LibriSpeech-layout preparation."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechbrain_omc.data import librispeech, synthspeech
from speechbrain_omc.data.librispeech import (
    CSV_HEADER,
    SYNTHSPEECH_SPLITS,
    prepare_librispeech,
    read_transcripts,
)

REPO = Path(__file__).resolve().parents[1]
SYNTH_ROOT = REPO / "data" / "SynthSpeech"

# speaker -> chapter -> number of utterances, per split
TINY = {
    "train-clean-100": {"19": {"198": 3, "227": 2}, "26": {"495": 3}},
    "dev-clean": {"84": {"121123": 2}},
}


def _write_tree(root: Path, layout=TINY, seed: int = 0) -> dict[str, float]:
    """Build a tiny LibriSpeech tree of sine/noise FLACs; return id -> seconds."""
    rng = np.random.default_rng(seed)
    durations = {}
    for split, speakers in layout.items():
        for spk, chapters in speakers.items():
            for chap, n in chapters.items():
                folder = root / split / spk / chap
                folder.mkdir(parents=True)
                lines = []
                for k in range(n):
                    utt = f"{spk}-{chap}-{k:04d}"
                    frames = int(rng.integers(1600, 8000))
                    t = np.arange(frames) / 16000
                    x = 0.3 * np.sin(2 * np.pi * 300 * t) + 0.01 * rng.standard_normal(
                        frames
                    )
                    sf.write(folder / f"{utt}.flac", x, 16000, subtype="PCM_16")
                    lines.append(f"{utt} WORD{k} AND  MORE\n")
                    durations[utt] = frames / 16000
                (folder / f"{spk}-{chap}.trans.txt").write_text("".join(lines))
    return durations


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "LibriSpeech"
    return root, _write_tree(root)


# --------------------------------------------------------------------------
# preparation on a tiny tree


def test_prepare_tiny_tree(tiny, tmp_path):
    root, durations = tiny
    csvs = prepare_librispeech(
        root, tmp_path / "prep", splits=("train-clean-100", "dev-clean")
    )
    assert set(csvs) == {"train-clean-100", "dev-clean"}
    with open(csvs["train-clean-100"]) as f:
        assert f.readline().strip() == ",".join(CSV_HEADER)
    rows = _read_csv(csvs["train-clean-100"])
    assert [r["ID"] for r in rows] == [
        "19-198-0000",
        "19-198-0001",
        "19-198-0002",
        "19-227-0000",
        "19-227-0001",
        "26-495-0000",
        "26-495-0001",
        "26-495-0002",
    ]
    for r in rows:
        assert float(r["duration"]) == pytest.approx(durations[r["ID"]], abs=1e-4)
        spk, chap, _ = r["ID"].split("-")
        assert r["spk_id"] == f"{spk}-{chap}"
        assert r["wav"] == f"$data_root/train-clean-100/{spk}/{chap}/{r['ID']}.flac"
        assert r["wrd"].startswith("WORD") and "  " not in r["wrd"]
    assert len(_read_csv(csvs["dev-clean"])) == 2


def test_csv_loads_in_speechbrain(tiny, tmp_path):
    from speechbrain.dataio.dataset import DynamicItemDataset

    root, _ = tiny
    csvs = prepare_librispeech(root, tmp_path / "prep", splits=["dev-clean"])
    data = DynamicItemDataset.from_csv(
        csvs["dev-clean"], replacements={"data_root": str(root)}
    )
    data.set_output_keys(["id", "wav", "duration", "spk_id", "wrd"])
    item = data[0]
    assert Path(item["wav"]).is_file()
    assert isinstance(item["duration"], float)
    assert item["spk_id"] == "84-121123"


def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        prepare_librispeech(tmp_path / "nothere", tmp_path / "prep", ["dev-clean"])


def test_missing_split_folder_is_named(tiny, tmp_path):
    root, _ = tiny
    with pytest.raises(FileNotFoundError, match="test-clean"):
        prepare_librispeech(root, tmp_path / "prep", ["dev-clean", "test-clean"])
    assert not (tmp_path / "prep" / "dev-clean.csv").exists()


def test_malformed_transcript_line(tiny, tmp_path):
    root, _ = tiny
    trans = root / "dev-clean" / "84" / "121123" / "84-121123.trans.txt"
    trans.write_text("84-121123-0000 FINE\n84-121123-0001\n")
    with pytest.raises(ValueError, match=r"84-121123\.trans\.txt:2"):
        prepare_librispeech(root, tmp_path / "prep", ["dev-clean"])


def test_transcript_id_of_another_chapter(tiny, tmp_path):
    root, _ = tiny
    trans = root / "dev-clean" / "84" / "121123" / "84-121123.trans.txt"
    trans.write_text("84-999-0000 WRONG CHAPTER\n")
    with pytest.raises(ValueError, match=r"trans\.txt:1.*84-999-0000"):
        read_transcripts(trans)


def test_missing_transcript_and_audio(tiny, tmp_path):
    root, _ = tiny
    chapter = root / "dev-clean" / "84" / "121123"
    (chapter / "84-121123-0001.flac").unlink()
    with pytest.raises(FileNotFoundError, match="84-121123-0001.flac"):
        prepare_librispeech(root, tmp_path / "prep", ["dev-clean"])
    (chapter / "84-121123.trans.txt").unlink()
    with pytest.raises(FileNotFoundError, match="transcript not found"):
        prepare_librispeech(root, tmp_path / "prep", ["dev-clean"])


def test_empty_split(tmp_path):
    (tmp_path / "corpus" / "dev").mkdir(parents=True)
    with pytest.raises(ValueError, match="no transcripts"):
        prepare_librispeech(tmp_path / "corpus", tmp_path / "prep", ["dev"])


def test_skip_when_done(tiny, tmp_path, monkeypatch):
    root, _ = tiny
    save = tmp_path / "prep"
    splits = ["train-clean-100", "dev-clean"]
    prepare_librispeech(root, save, splits)
    scanned = []
    real_scan = librispeech.scan_split

    def spy(data_folder, split, **kwargs):
        scanned.append(split)
        return real_scan(data_folder, split, **kwargs)

    monkeypatch.setattr(librispeech, "scan_split", spy)
    prepare_librispeech(root, save, splits)
    assert scanned == []
    # A removed CSV is rebuilt, and only that one.
    (save / "dev-clean.csv").unlink()
    prepare_librispeech(root, save, splits)
    assert scanned == ["dev-clean"]
    # Other settings (here: the corpus moved) rebuild everything.
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    prepare_librispeech(moved, save, splits)
    assert scanned == ["dev-clean", "train-clean-100", "dev-clean"]
    # skip_prep touches nothing.
    csvs = prepare_librispeech(tmp_path / "absent", tmp_path / "none", splits, True)
    assert csvs["dev-clean"] == tmp_path / "none" / "dev-clean.csv"
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------
# the bundled SynthSpeech corpus


@pytest.fixture(scope="module")
def synth_csvs(tmp_path_factory):
    save = tmp_path_factory.mktemp("synth_prep")
    csvs = prepare_librispeech(SYNTH_ROOT, save, SYNTHSPEECH_SPLITS, progress=False)
    return {split: _read_csv(path) for split, path in csvs.items()}


def test_synthspeech_manifests(synth_csvs):
    speakers = {
        split: {r["ID"].split("-")[0] for r in rows}
        for split, rows in synth_csvs.items()
    }
    assert len(speakers["train"]) == 24
    assert len(speakers["dev"]) == 12 and len(speakers["test"]) == 28
    # held-out speakers never occur in training
    assert not speakers["train"] & speakers["dev"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]
    assert {len(rows) for rows in synth_csvs.values()} <= set(range(40, 1000))
    words = {w for rows in synth_csvs.values() for r in rows for w in r["wrd"].split()}
    assert words <= set(synthspeech.VOCABULARY) and len(words) <= 50
    for rows in synth_csvs.values():
        durations = [float(r["duration"]) for r in rows]
        assert 0.5 < min(durations) and max(durations) < 6.0


def test_synthspeech_test_set_can_tell_one_point(synth_csvs):
    """At least ~2,000 test words: one word is at most 0.05 WER points, and
    at a WER of 5 % the binomial standard error is at most 0.5 points."""
    test = synth_csvs["test"]
    words = sum(len(r["wrd"].split()) for r in test)
    assert len(test) == 816 and words >= 4000
    assert (0.05 * 0.95 / words) ** 0.5 * 100 <= 0.5


def test_synthspeech_audio_format_and_size():
    files = sorted(SYNTH_ROOT.rglob("*.flac"))
    assert sum(f.stat().st_size for f in files) <= 40e6
    for f in files[::25]:
        info = sf.info(f)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")


def test_synthspeech_transcripts_match_generator():
    """The committed texts are what the seeded generator draws (no espeak)."""
    for speaker in synthspeech.speaker_table():
        for chapter in speaker.chapters:
            folder = SYNTH_ROOT / speaker.split / str(speaker.speaker_id) / str(chapter)
            texts = read_transcripts(
                folder / f"{speaker.speaker_id}-{chapter}.trans.txt"
            )
            for utt_id, text in texts.items():
                index = int(utt_id.split("-")[2])
                rng = np.random.default_rng(
                    [synthspeech.DEFAULT_SEED, speaker.speaker_id, chapter, index]
                )
                assert synthspeech.make_transcript(rng) == text, utt_id


def test_speaker_table_design():
    table = synthspeech.speaker_table()
    assert len(table) == len({s.speaker_id for s in table}) == 64
    splits = [s.split for s in table]
    assert (splits.count("train"), splits.count("dev"), splits.count("test")) == (
        24,
        12,
        28,
    )
    assert len({(s.variant, s.pitch, s.speed) for s in table}) == 64
    # Every voice variant is in training and in both held-out splits.
    for split in ("train", "dev", "test"):
        assert {s.variant for s in table if s.split == split} == set(
            synthspeech.VARIANTS
        )
    assert not any(s.variant.startswith("mb") for s in table)
    chapters = [c for s in table for c in s.chapters]
    assert len(chapters) == len(set(chapters))
    speakers_file = (SYNTH_ROOT / "SPEAKERS.TXT").read_text()
    for s in table:
        assert f"{s.speaker_id:<4d}| {s.split:<6}| {s.espeak_voice:<14}|" in (
            speakers_file
        )


def test_render_is_deterministic():
    speaker = synthspeech.speaker_table()[3]
    raw = np.random.default_rng(1).standard_normal(22050).astype(np.float32)
    a = synthspeech.render_utterance(raw, 22050, speaker, np.random.default_rng(7))
    b = synthspeech.render_utterance(raw, 22050, speaker, np.random.default_rng(7))
    c = synthspeech.render_utterance(raw, 22050, speaker, np.random.default_rng(8))
    assert a.dtype == np.int16 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a).max() <= 32767 * speaker.peak * 1.2


def test_generator_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    if shutil.which("espeak-ng") is None:
        with pytest.raises(FileNotFoundError, match="espeak-ng"):
            synthspeech.generate_corpus(tmp_path)
    else:
        with pytest.raises(FileExistsError):
            synthspeech.generate_corpus(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_generator_reproduces_committed_audio(tmp_path):
    table = synthspeech.speaker_table()
    # A train speaker, one of each held-out set.
    speakers = [table[0], table[28], table[40]]
    synthspeech.generate_corpus(
        tmp_path,
        speakers=speakers,
        utterances_per_train_chapter=1,
        utterances_per_heldout_chapter=1,
    )
    for speaker in speakers:
        spk = speaker.speaker_id
        for chapter in speaker.chapters:
            name = f"{speaker.split}/{spk}/{chapter}/{spk}-{chapter}-0000.flac"
            new, _ = sf.read(tmp_path / name, dtype="int16")
            old, _ = sf.read(SYNTH_ROOT / name, dtype="int16")
            np.testing.assert_array_equal(new, old)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_generator_adds_missing_speakers_only(tmp_path):
    table = synthspeech.speaker_table()
    first = synthspeech.generate_corpus(
        tmp_path, speakers=table[:1], utterances_per_train_chapter=1
    )
    kept = tmp_path / "train/100/1000/100-1000-0000.flac"
    stamp = kept.stat().st_mtime_ns
    with pytest.raises(FileExistsError):
        synthspeech.generate_corpus(tmp_path, speakers=table[:2])
    info = synthspeech.generate_corpus(
        tmp_path,
        speakers=table[:2],
        utterances_per_train_chapter=1,
        missing_only=True,
    )
    assert kept.stat().st_mtime_ns == stamp  # not synthesised again
    assert first["splits"]["train"]["speakers"] == 1
    assert info["splits"]["train"]["speakers"] == 2
    assert info["splits"]["train"]["utterances"] == 4
