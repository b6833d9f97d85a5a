"""CSV manifests for corpora in LibriSpeech's layout (LibriSpeech, SynthSpeech).

SpeechBrain's ``librispeech_prepare.py`` ships with its recipes, not the pip
package, so the project has its own. Each split gets ``<save_folder>/<split>.csv``
with SpeechBrain's columns ``ID,duration,wav,spk_id,wrd``; ``wav`` starts with
a ``$data_root`` placeholder (filled by ``DynamicItemDataset.from_csv``), and
``spk_id`` is ``<speaker>-<chapter>`` as in SpeechBrain's recipes. Durations
come from the audio headers. A split already written with the same settings
(``librispeech_prepare.json``) is skipped; CSVs are written atomically.

Example
-------
>>> import tempfile
>>> import numpy as np
>>> tmp = Path(tempfile.mkdtemp())
>>> chapter = tmp / "corpus" / "dev" / "7" / "70"
>>> chapter.mkdir(parents=True)
>>> sf.write(chapter / "7-70-0000.flac", np.zeros(8000, dtype="int16"), 16000)
>>> _ = (chapter / "7-70.trans.txt").write_text("7-70-0000 HELLO WORLD\\n")
>>> csvs = prepare_librispeech(
...     tmp / "corpus", tmp / "prep", splits=["dev"], progress=False
... )
>>> print(csvs["dev"].read_text().strip())
ID,duration,wav,spk_id,wrd
7-70-0000,0.5,$data_root/dev/7/70/7-70-0000.flac,7-70,HELLO WORLD
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

logger = logging.getLogger(__name__)

CSV_HEADER = ("ID", "duration", "wav", "spk_id", "wrd")
OPTIONS_FILE = "librispeech_prepare.json"
LIBRISPEECH_SPLITS = ("train-clean-100", "dev-clean", "test-clean")
SYNTHSPEECH_SPLITS = ("train", "dev", "test")
# Bump when the CSV content changes so that old manifests are rebuilt.
_FORMAT_VERSION = 1

_UTT_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")


def _natural_key(utt_id: str) -> tuple:
    """Sort ``100-1000-0002`` numerically field by field, not as text."""
    return tuple(int(f) if f.isdigit() else f for f in utt_id.split("-"))


def read_transcripts(trans_file: str | Path) -> dict[str, str]:
    """Utterance id to transcript (whitespace collapsed) of a ``.trans.txt`` file.

    Raises ``ValueError`` naming the file and line of a malformed or duplicate
    line.

    Example
    -------
    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "19-198.trans.txt"
    >>> _ = f.write_text("19-198-0000 NORTHANGER ABBEY\\n19-198-0001 CHAPTER ONE\\n")
    >>> read_transcripts(f)
    {'19-198-0000': 'NORTHANGER ABBEY', '19-198-0001': 'CHAPTER ONE'}
    """
    trans_file = Path(trans_file)
    prefix = trans_file.name[: -len(".trans.txt")]
    texts: dict[str, str] = {}
    with open(trans_file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=1)
            where = f"{trans_file}:{number}"
            if len(fields) < 2 or not fields[1].strip():
                raise ValueError(f"{where}: expected 'ID TRANSCRIPT', got {line!r}")
            utt_id, text = fields[0], " ".join(fields[1].split())
            match = _UTT_ID.match(utt_id)
            if match is None or f"{match[1]}-{match[2]}" != prefix:
                raise ValueError(
                    f"{where}: utterance id {utt_id!r} is not "
                    f"'{prefix}-<utt>' (speaker-chapter-utterance)"
                )
            if utt_id in texts:
                raise ValueError(f"{where}: duplicate utterance id {utt_id!r}")
            texts[utt_id] = text
    return texts


def scan_split(
    data_folder: str | Path,
    split: str,
    audio_ext: str = ".flac",
    progress: bool = True,
) -> list[dict[str, str]]:
    """Manifest rows (keys :data:`CSV_HEADER`) of one split, sorted by utterance id.

    Arguments
    ---------
    data_folder : str or Path
        Corpus root that holds the split folder.
    split : str
        Split folder name, e.g. ``"train-clean-100"`` or ``"dev"``.
    audio_ext : str
        Audio file extension next to the transcripts.
    progress : bool
        Show a progress bar over the chapters.

    Example
    -------
    >>> scan_split("/nonexistent", "nowhere")
    Traceback (most recent call last):
    ...
    FileNotFoundError: split folder not found: ...nowhere
    """
    split_dir = Path(data_folder) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    chapters = sorted(
        (p for p in split_dir.glob("*/*") if p.is_dir()),
        key=lambda p: _natural_key(f"{p.parent.name}-{p.name}"),
    )
    rows = []
    for chapter in tqdm(chapters, desc=f"scanning {split}", disable=not progress):
        rows += _chapter_rows(chapter, split, audio_ext)
    if not rows:
        raise ValueError(f"no transcripts found under {split_dir}")
    rows.sort(key=lambda r: _natural_key(r["ID"]))
    return rows


def _chapter_rows(chapter: Path, split: str, audio_ext: str) -> list[dict[str, str]]:
    """Manifest rows of one ``<speaker>/<chapter>`` folder, in transcript order."""
    speaker_chapter = f"{chapter.parent.name}-{chapter.name}"
    trans_file = chapter / f"{speaker_chapter}.trans.txt"
    if not trans_file.is_file():
        raise FileNotFoundError(f"transcript not found: {trans_file}")
    texts = read_transcripts(trans_file)
    audio_files = {p.name for p in chapter.glob(f"*{audio_ext}")}
    rows = []
    for utt_id, text in texts.items():
        name = utt_id + audio_ext
        if name not in audio_files:
            raise FileNotFoundError(
                f"{trans_file} lists {utt_id} but {chapter / name} is missing"
            )
        info = sf.info(str(chapter / name))
        rows.append(
            {
                "ID": utt_id,
                # 0.1 ms precision; the full float only adds CSV noise.
                "duration": str(round(info.frames / info.samplerate, 4)),
                "wav": "/".join(
                    ("$data_root", split, chapter.parent.name, chapter.name, name)
                ),
                "spk_id": speaker_chapter,
                "wrd": text,
            }
        )
    extra = audio_files - {u + audio_ext for u in texts}
    if extra:
        logger.warning(
            "%s: %d audio file(s) without transcript ignored (e.g. %s)",
            chapter,
            len(extra),
            sorted(extra)[0],
        )
    return rows


def write_manifest(rows: Iterable[dict[str, str]], csv_path: str | Path) -> Path:
    """Write rows with the keys of :data:`CSV_HEADER` as a CSV, atomically.

    Example
    -------
    >>> row = dict(ID="1-2-0003", duration="1.5", wav="$data_root/x.flac",
    ...            spk_id="1-2", wrd="HI")
    >>> import tempfile
    >>> p = write_manifest([row], Path(tempfile.mkdtemp()) / "m.csv")
    >>> p.read_text().splitlines()[1]
    '1-2-0003,1.5,$data_root/x.flac,1-2,HI'
    """
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_HEADER, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    return csv_path


def _options(data_folder: Path, audio_ext: str) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "data_folder": str(data_folder.resolve()),
        "audio_ext": audio_ext,
    }


def prepare_librispeech(
    data_folder: str | Path,
    save_folder: str | Path,
    splits: Sequence[str] = LIBRISPEECH_SPLITS,
    skip_prep: bool = False,
    audio_ext: str = ".flac",
    progress: bool = True,
) -> dict[str, Path]:
    """Write ``<save_folder>/<split>.csv`` per split of a LibriSpeech-layout corpus.

    Arguments
    ---------
    data_folder : str or Path
        Corpus root, e.g. ``/data/LibriSpeech`` or ``data/SynthSpeech``.
    save_folder : str or Path
        Where the CSVs and the options file go.
    splits : sequence of str
        Split folders under ``data_folder``.
    skip_prep : bool
        Only return the CSV paths (SpeechBrain convention).
    audio_ext : str
        Audio extension.
    progress : bool
        Show progress bars while scanning.

    Returns
    -------
    dict
        Split name to the path of its CSV.

    Example
    -------
    >>> prepare_librispeech("/nonexistent/LibriSpeech", "/tmp/prep", ["dev"])
    Traceback (most recent call last):
    ...
    FileNotFoundError: data folder not found: ...LibriSpeech
    """
    data_folder = Path(data_folder)
    save_folder = Path(save_folder)
    if isinstance(splits, str):
        splits = [splits]
    csvs = {split: save_folder / f"{split}.csv" for split in splits}
    if skip_prep:
        return csvs
    _check_splits(data_folder, splits)
    options = _options(data_folder, audio_ext)
    options_file = save_folder / OPTIONS_FILE
    done = _splits_done(options_file, options)
    for split, csv_path in csvs.items():
        if split in done and csv_path.is_file():
            logger.info("%s exists with the same settings, skipping", csv_path)
            continue
        rows = scan_split(data_folder, split, audio_ext=audio_ext, progress=progress)
        write_manifest(rows, csv_path)
        done.add(split)
        logger.info("wrote %s (%d utterances)", csv_path, len(rows))
        # Record after each split so an interruption keeps the finished ones.
        save_folder.mkdir(parents=True, exist_ok=True)
        options_file.write_text(
            json.dumps({**options, "splits": sorted(done)}, indent=2) + "\n",
            encoding="utf-8",
        )
    return csvs


def _check_splits(data_folder: Path, splits: Sequence[str]) -> None:
    if not data_folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {data_folder}")
    missing = [s for s in splits if not (data_folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"split folder(s) not found under {data_folder}: {', '.join(missing)}"
        )


def _splits_done(options_file: Path, options: dict) -> set[str]:
    """Splits an earlier run wrote with the same ``options``."""
    previous = {}
    if options_file.is_file():
        try:
            previous = json.loads(options_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = {}
    same_settings = {k: previous.get(k) for k in options} == options
    return set(previous.get("splits", [])) if same_settings else set()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m speechbrain_omc.data.librispeech --help``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_omc.data.librispeech",
        description="Write SpeechBrain CSV manifests for a LibriSpeech-layout corpus.",
    )
    parser.add_argument("--data-folder", required=True, help="corpus root")
    parser.add_argument("--save-folder", required=True, help="where CSVs go")
    parser.add_argument(
        "--splits", nargs="+", default=list(LIBRISPEECH_SPLITS), help="split folders"
    )
    parser.add_argument("--audio-ext", default=".flac")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    csvs = prepare_librispeech(
        args.data_folder, args.save_folder, args.splits, audio_ext=args.audio_ext
    )
    for split, path in csvs.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
