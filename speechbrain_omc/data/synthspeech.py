"""SynthSpeech: a small multi-speaker English corpus synthesised with espeak-ng.

The project cannot download data, so it ships this corpus under
``data/SynthSpeech``; reading it needs no system package. Regenerating it
needs ``espeak-ng``::

    python -m speechbrain_omc.data.synthspeech --output data/SynthSpeech

**Speakers.** An ``en-us`` espeak-ng voice variant (``+m1``, ``+klatt``...)
at a base pitch and speed, plus a word gap and a channel (gain, low-pass,
noise floor). Dev and test speakers never occur in train (the split is by
speaker, as in LibriSpeech); see :func:`speaker_table`.

**Utterances.** Half digit strings, half short sentences from a fixed
grammar (:func:`make_transcript`), uppercase like LibriSpeech's.

**Signal chain.** espeak-ng's 22.05 kHz WAV is resampled to 16 kHz, trimmed,
padded with a short random pause, mixed with noise at the speaker's SNR,
low-passed and scaled to the speaker's peak (:func:`render_utterance`), then
written as 16-bit FLAC in LibriSpeech's layout, so
:mod:`speechbrain_omc.data.librispeech` prepares both corpora.

**Determinism.** Every draw comes from ``numpy.random.default_rng`` seeded
with ``(seed, speaker, chapter, utterance)``; with the same espeak-ng and
SciPy a rerun gives the same samples (FLAC bytes may vary with libFLAC).

**License.** espeak-ng (GPL-3.0-or-later) only produced the audio; the audio
and transcripts are distributed under this repository's Apache-2.0 license.

Example
-------
>>> speakers = speaker_table()
>>> len(speakers), sorted({s.split for s in speakers})
(64, ['dev', 'test', 'train'])
>>> speakers[0].espeak_voice
'en-us+m1'
>>> text = make_transcript(np.random.default_rng(0))
>>> set(text.split()) <= set(VOCABULARY)
True
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from math import gcd
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
DEFAULT_SEED = 20240601

DIGITS = (
    "ZERO",
    "ONE",
    "TWO",
    "THREE",
    "FOUR",
    "FIVE",
    "SIX",
    "SEVEN",
    "EIGHT",
    "NINE",
)
DETERMINERS = ("THE", "A", "MY", "YOUR")
ADJECTIVES = ("RED", "BLUE", "GREEN", "BIG", "SMALL", "OLD", "NEW", "HAPPY")
NOUNS = ("CAT", "DOG", "BIRD", "HOUSE", "TREE", "CAR", "BOOK", "BALL", "BOAT", "CHAIR")
VERBS = ("SEES", "LIKES", "FINDS", "MOVES", "HAS", "WANTS")
PREPOSITIONS = ("NEAR", "UNDER", "BEHIND", "ON")
ADVERBS = ("TODAY", "NOW")
FUNCTION_WORDS = ("IS", "AND")
VOCABULARY = tuple(
    sorted(
        set(
            DIGITS
            + DETERMINERS
            + ADJECTIVES
            + NOUNS
            + VERBS
            + PREPOSITIONS
            + ADVERBS
            + FUNCTION_WORDS
        )
    )
)

# Ordered so that dev and test each hold two male, one female and one Klatt voice.
VARIANTS = ("m1", "m3", "f2", "f4", "klatt", "klatt3", "m7", "f1")
PITCHES = (30, 42, 54, 66)
SPEEDS = (150, 165, 180, 195)
#: Pitches and speeds of the second held-out set: between the first set's,
#: so that these speakers are new combinations within the training range.
EXTRA_PITCHES = (36, 44, 52, 60)
EXTRA_SPEEDS = (157, 167, 177, 187)
FIRST_SPEAKER_ID = 100
#: Utterances per chapter: train, first held-out set, second dev and test set.
TRAIN_UTTERANCES = 10
HELDOUT_UTTERANCES = 12
EXTRA_DEV_UTTERANCES = 12
EXTRA_TEST_UTTERANCES = 32


@dataclass(frozen=True)
class SynthSpeaker:
    """One SynthSpeech speaker: an espeak-ng voice plus a recording channel.

    Arguments
    ---------
    speaker_id : int
        LibriSpeech-style speaker id.
    split : str
        ``"train"``, ``"dev"`` or ``"test"``.
    variant, pitch, speed, word_gap : str, int, int, int
        espeak-ng voice variant (``en-us+<variant>``), ``-p``, ``-s`` and
        ``-g`` (10 ms units).
    peak, lowpass_hz, snr_db : float
        The channel: peak level (full scale 1.0), low-pass cut-off, SNR.
    chapters : tuple of int
        Chapter ids read by this speaker.
    utterances_per_chapter : int
        Utterances read in each chapter.
    """

    speaker_id: int
    split: str
    variant: str
    pitch: int
    speed: int
    word_gap: int
    peak: float
    lowpass_hz: float
    snr_db: float
    chapters: tuple[int, ...]
    utterances_per_chapter: int = TRAIN_UTTERANCES

    @property
    def espeak_voice(self) -> str:
        """The ``-v`` argument of espeak-ng."""
        return f"en-us+{self.variant}"


def _channel(rng: np.random.Generator) -> dict:
    # Word gap and recording channel of one speaker (the draws' order matters:
    # it is what makes the committed speakers reproducible).
    return dict(
        word_gap=int(rng.integers(0, 3)),
        peak=round(float(rng.uniform(0.05, 0.14)), 3),
        lowpass_hz=float(rng.choice([4000, 4500, 5000, 5500, 6000])),
        snr_db=round(float(rng.uniform(30.0, 45.0)), 1),
    )


def _speaker_params(
    rng: np.random.Generator, pitches: Sequence[int], speeds: Sequence[int]
) -> list[dict]:
    """Four speakers of each variant: seeded pitch and speed orders, channels."""
    params = []
    for variant in VARIANTS:
        pitch_order = rng.permutation(len(pitches))
        speed_order = rng.permutation(len(speeds))
        params.append(
            [
                dict(
                    variant=variant,
                    pitch=pitches[pitch_order[k]],
                    speed=speeds[speed_order[k]],
                    **_channel(rng),
                )
                for k in range(4)
            ]
        )
    return params


def speaker_table(seed: int = DEFAULT_SEED) -> list[SynthSpeaker]:
    """Return the 64 SynthSpeech speakers (24 train, 12 dev, 28 test).

    Each variant's 4 first-set speakers: 3 train, the last held out (dev for
    even variant positions, test for odd). The second held-out set, from its
    own random stream: each variant's first speaker for dev, 3 for test.

    Arguments
    ---------
    seed : int
        Seed of the channel and pitch/speed draws.

    Returns
    -------
    list of SynthSpeaker
        Sorted by speaker id.

    Example
    -------
    >>> table = speaker_table()
    >>> [s.speaker_id for s in table if s.split == "dev"][:6]
    [124, 125, 126, 127, 132, 133]
    >>> sum(s.utterances_per_chapter for s in table if s.split == "test")
    816
    """
    first = _speaker_params(np.random.default_rng([seed, 0]), PITCHES, SPEEDS)
    extra = _speaker_params(
        np.random.default_rng([seed, 1]), EXTRA_PITCHES, EXTRA_SPEEDS
    )
    heldout = [four[3] for four in first]
    groups = [
        ("train", [p for four in first for p in four[:3]], 2, TRAIN_UTTERANCES),
        ("dev", heldout[0::2], 1, HELDOUT_UTTERANCES),
        ("test", heldout[1::2], 1, HELDOUT_UTTERANCES),
        ("dev", [four[0] for four in extra], 1, EXTRA_DEV_UTTERANCES),
        ("test", [p for four in extra for p in four[1:]], 1, EXTRA_TEST_UTTERANCES),
    ]
    speakers = []
    for split, group, n_chapters, utterances in groups:
        for params in group:
            speaker_id = FIRST_SPEAKER_ID + len(speakers)
            chapters = tuple(10 * speaker_id + k for k in range(n_chapters))
            speakers.append(
                SynthSpeaker(
                    speaker_id=speaker_id,
                    split=split,
                    chapters=chapters,
                    utterances_per_chapter=utterances,
                    **params,
                )
            )
    return speakers


def _noun_phrase(rng: np.random.Generator, adjective: bool = True) -> list[str]:
    words = [str(rng.choice(DETERMINERS))]
    if adjective and rng.random() < 0.6:
        words.append(str(rng.choice(ADJECTIVES)))
    words.append(str(rng.choice(NOUNS)))
    # "A OLD CAT" would be spoken oddly; keep the grammar natural.
    if words[0] == "A" and words[1][0] in "AEIOU":
        words[0] = "THE"
    return words


def make_transcript(rng: np.random.Generator) -> str:
    """Draw one uppercase transcript: a digit string or a short sentence.

    Example
    -------
    >>> rng = np.random.default_rng(3)
    >>> texts = [make_transcript(rng) for _ in range(200)]
    >>> all(3 <= len(t.split()) <= 8 for t in texts)
    True
    >>> sum(t.split()[0] in DIGITS for t in texts) > 50
    True
    """
    if rng.random() < 0.5:
        n_digits = int(rng.integers(3, 8))
        return " ".join(str(d) for d in rng.choice(DIGITS, size=n_digits))
    template = int(rng.integers(0, 4))
    if template == 0:  # THE CAT SEES A BIG DOG [TODAY]
        words = _noun_phrase(rng) + [str(rng.choice(VERBS))] + _noun_phrase(rng)
        if rng.random() < 0.4:
            words.append(str(rng.choice(ADVERBS)))
    elif template == 1:  # MY BOOK IS UNDER THE GREEN CHAIR
        words = (
            _noun_phrase(rng)
            + ["IS", str(rng.choice(PREPOSITIONS))]
            + _noun_phrase(rng)
        )
    elif template == 2:  # THE DOG IS HAPPY [NOW]
        words = _noun_phrase(rng) + ["IS", str(rng.choice(ADJECTIVES))]
        if rng.random() < 0.4:
            words.append(str(rng.choice(ADVERBS)))
    else:  # THE CAT SEES A DOG AND MY BALL
        words = (
            _noun_phrase(rng, adjective=False)
            + [str(rng.choice(VERBS))]
            + _noun_phrase(rng, adjective=False)
            + ["AND"]
            + _noun_phrase(rng, adjective=False)
        )
    return " ".join(words)


def _espeak(
    text: str,
    voice: str,
    pitch: int,
    speed: int,
    word_gap: int,
    espeak: str,
    workdir: Path,
) -> tuple[np.ndarray, int]:
    """Run espeak-ng on ``text`` and return (float32 samples, sample rate)."""
    import soundfile as sf

    out = workdir / "utt.wav"
    cmd = [espeak, "-v", voice, "-p", str(pitch), "-s", str(speed)]
    cmd += ["-g", str(word_gap), "-w", str(out), text.lower()]
    # Lowercase input: espeak-ng may spell out unknown all-caps words.
    subprocess.run(cmd, check=True, capture_output=True)
    samples, rate = sf.read(out, dtype="float32")
    return samples, rate


def render_utterance(
    samples: np.ndarray,
    rate: int,
    speaker: SynthSpeaker,
    rng: np.random.Generator,
) -> np.ndarray:
    """Turn a raw synthesiser signal into int16 16 kHz SynthSpeech samples.

    Resample, trim silence, pad with a short random pause, add noise at the
    speaker's SNR, low-pass and scale to the speaker's peak, all drawn from
    ``rng``.

    Example
    -------
    >>> spk = speaker_table()[0]
    >>> t = np.arange(22050) / 22050
    >>> tone = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    >>> out = render_utterance(tone, 22050, spk, np.random.default_rng(0))
    >>> out.dtype, 1.0 < len(out) / SAMPLE_RATE < 1.4
    (dtype('int16'), True)
    """
    from scipy.signal import butter, resample_poly, sosfilt

    x = np.asarray(samples, dtype=np.float64)
    if rate != SAMPLE_RATE:
        g = gcd(SAMPLE_RATE, rate)
        x = resample_poly(x, SAMPLE_RATE // g, rate // g)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak <= 0.0:
        raise ValueError("the synthesiser returned silence")
    voiced = np.flatnonzero(np.abs(x) > 1e-3 * peak)
    x = x[voiced[0] : voiced[-1] + 1] / peak
    pads = rng.integers(int(0.04 * SAMPLE_RATE), int(0.16 * SAMPLE_RATE), size=2)
    x = np.concatenate([np.zeros(pads[0]), x, np.zeros(pads[1])])
    rms = float(np.sqrt(np.mean(x**2)))
    x = x + rng.standard_normal(x.size) * rms * 10 ** (-speaker.snr_db / 20)
    sos = butter(4, speaker.lowpass_hz, fs=SAMPLE_RATE, output="sos")
    x = sosfilt(sos, x)
    # +-1.5 dB per utterance: recording levels are never exactly constant.
    level = speaker.peak * 10 ** (rng.uniform(-1.5, 1.5) / 20)
    x = x * (level / np.max(np.abs(x)))
    return np.round(x * 32767).astype(np.int16)


def tool_versions(espeak: str = "espeak-ng") -> dict[str, str]:
    """Versions of the tools and libraries that shape the generated audio.

    Example
    -------
    >>> sorted(tool_versions(espeak="/nonexistent/espeak-ng"))[0]
    'espeak-ng'
    """
    import scipy
    import soundfile as sf

    try:
        out = subprocess.run([espeak, "--version"], capture_output=True, text=True)
        espeak_version = out.stdout.strip().split("  ")[0]
    except OSError:
        espeak_version = "not installed"
    return {
        "espeak-ng": espeak_version,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "soundfile": sf.__version__,
        "libsndfile": sf.__libsndfile_version__,
    }


def generate_corpus(
    output: str | Path,
    seed: int = DEFAULT_SEED,
    utterances_per_train_chapter: int | None = None,
    utterances_per_heldout_chapter: int | None = None,
    espeak: str = "espeak-ng",
    overwrite: bool = False,
    speakers: Sequence[SynthSpeaker] | None = None,
    missing_only: bool = False,
) -> dict:
    """Synthesise SynthSpeech into ``output`` in LibriSpeech's layout.

    Arguments
    ---------
    output : str or Path
        Corpus root; ``train``, ``dev`` and ``test`` are created below it.
    seed : int
        Seed of every random choice (speakers, texts, channel, noise).
    utterances_per_train_chapter, utterances_per_heldout_chapter : int, optional
        Instead of the speakers' own ``utterances_per_chapter`` (quick trials).
    espeak : str
        espeak-ng executable.
    overwrite : bool
        Replace an existing non-empty ``output``; otherwise refuse.
    speakers : sequence of SynthSpeaker, optional
        Subset of :func:`speaker_table` to synthesise.
    missing_only : bool
        Synthesise only the chapters not on disk yet, keep the others, and
        rewrite the corpus card for the whole corpus.

    Returns
    -------
    dict
        ``seed``, ``speaker_sets``, ``versions``, ``splits`` (statistics)
        and ``generation_seconds``.

    Example
    -------
    >>> stats = generate_corpus(tmp_dir, speakers=speaker_table()[:1])  # doctest: +SKIP
    """
    output = Path(output)
    _prepare_output(output, espeak, overwrite, missing_only)
    speakers = list(speakers) if speakers is not None else speaker_table(seed)
    per_chapter = functools.partial(
        _utterances_per_chapter,
        train=utterances_per_train_chapter,
        heldout=utterances_per_heldout_chapter,
    )
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for speaker in speakers:
            for chapter in speaker.chapters:
                folder = output / speaker.split / str(speaker.speaker_id) / str(chapter)
                trans = folder / f"{speaker.speaker_id}-{chapter}.trans.txt"
                if missing_only and trans.is_file():
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                lines = [
                    _synthesise(folder, speaker, chapter, index, seed, espeak, tmp)
                    for index in range(per_chapter(speaker))
                ]
                # Written last: its presence marks a complete chapter.
                trans.write_text("".join(lines), encoding="utf-8")
            logger.info("speaker %d done", speaker.speaker_id)
    info = _write_corpus_card(output, seed, speakers, per_chapter, espeak)
    # Kept out of generation.json so that a rerun reproduces it byte for byte.
    info["generation_seconds"] = round(time.time() - start, 1)
    return info


def _prepare_output(
    output: Path, espeak: str, overwrite: bool, missing_only: bool
) -> None:
    """Check for espeak-ng and an empty (or replaceable) ``output``."""
    if shutil.which(espeak) is None:
        raise FileNotFoundError(
            f"{espeak!r} not found: install espeak-ng (apt-get install -y espeak-ng) "
            "to regenerate SynthSpeech; the committed corpus needs no tool"
        )
    if output.exists() and any(output.iterdir()) and not missing_only:
        if not overwrite:
            raise FileExistsError(
                f"{output} is not empty; pass overwrite=True (or missing_only=True "
                "to add the speakers that are not there yet)"
            )
        for split in ("train", "dev", "test"):
            shutil.rmtree(output / split, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)


def _utterances_per_chapter(
    speaker: SynthSpeaker, train: int | None, heldout: int | None
) -> int:
    override = train if speaker.split == "train" else heldout
    return override if override is not None else speaker.utterances_per_chapter


def _synthesise(
    folder: Path,
    speaker: SynthSpeaker,
    chapter: int,
    index: int,
    seed: int,
    espeak: str,
    workdir: str,
) -> str:
    """Write one utterance's FLAC; return its transcript line."""
    import soundfile as sf

    rng = np.random.default_rng([seed, speaker.speaker_id, chapter, index])
    text = make_transcript(rng)
    raw, rate = _espeak(
        text,
        speaker.espeak_voice,
        pitch=int(np.clip(speaker.pitch + rng.integers(-4, 5), 0, 99)),
        speed=int(round(speaker.speed * rng.uniform(0.94, 1.06))),
        word_gap=speaker.word_gap,
        espeak=espeak,
        workdir=Path(workdir),
    )
    audio = render_utterance(raw, rate, speaker, rng)
    utt_id = f"{speaker.speaker_id}-{chapter}-{index:04d}"
    sf.write(
        folder / f"{utt_id}.flac",
        audio,
        SAMPLE_RATE,
        format="FLAC",
        subtype="PCM_16",
        compression_level=1.0,
    )
    return f"{utt_id} {text}\n"


def _write_corpus_card(
    output: Path,
    seed: int,
    speakers: Sequence[SynthSpeaker],
    per_chapter,
    espeak: str,
) -> dict:
    """Write ``SPEAKERS.TXT``, ``generation.json`` and ``README.md``."""
    stats = corpus_statistics(output, speakers)
    info = {
        "seed": seed,
        "speaker_sets": _speaker_groups(speakers, per_chapter),
        "versions": tool_versions(espeak),
        "splits": stats,
    }
    _write_speakers_file(output / "SPEAKERS.TXT", speakers, stats)
    (output / "generation.json").write_text(
        json.dumps({**info, "speakers": [asdict(s) for s in speakers]}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    (output / "README.md").write_text(_readme(info, speakers), encoding="utf-8")
    return info


def _speaker_groups(speakers: Sequence[SynthSpeaker], per_chapter) -> list[dict]:
    # Consecutive speakers of one split reading as many utterances per
    # chapter: the corpus's speaker sets, as the README lists them.
    groups: list[dict] = []
    for speaker in speakers:
        n = per_chapter(speaker)
        last = groups[-1] if groups else None
        if (
            last
            and (last["split"], last["utterances_per_chapter"]) == (speaker.split, n)
            and last["last_id"] == speaker.speaker_id - 1
        ):
            last["last_id"] = speaker.speaker_id
            last["speakers"] += 1
        else:
            groups.append(
                {
                    "split": speaker.split,
                    "first_id": speaker.speaker_id,
                    "last_id": speaker.speaker_id,
                    "speakers": 1,
                    "chapters_per_speaker": len(speaker.chapters),
                    "utterances_per_chapter": n,
                }
            )
    return groups


def corpus_statistics(root: str | Path, speakers: Sequence[SynthSpeaker]) -> dict:
    """Per-split speakers, chapters, utterances, words, hours and MB on disk.

    Example
    -------
    >>> from speechbrain_omc.data.prepare_synthspeech import bundled_corpus
    >>> stats = corpus_statistics(bundled_corpus(), speaker_table())
    >>> stats["train"]["speakers"], stats["train"]["utterances"]
    (24, 480)
    """
    import soundfile as sf

    root = Path(root)
    stats: dict[str, dict] = {}
    for speaker in speakers:
        found = False
        for chapter in speaker.chapters:
            folder = root / speaker.split / str(speaker.speaker_id) / str(chapter)
            trans = folder / f"{speaker.speaker_id}-{chapter}.trans.txt"
            if not trans.is_file():
                continue
            found = True
            split = stats.setdefault(
                speaker.split,
                {
                    "speakers": 0,
                    "chapters": 0,
                    "utterances": 0,
                    "words": 0,
                    "seconds": 0.0,
                    "bytes": 0,
                },
            )
            split["chapters"] += 1
            for line in trans.read_text(encoding="utf-8").splitlines():
                utt_id, _, text = line.partition(" ")
                flac = folder / f"{utt_id}.flac"
                split["utterances"] += 1
                split["words"] += len(text.split())
                split["seconds"] += sf.info(flac).duration
                split["bytes"] += flac.stat().st_size
        if found:
            stats[speaker.split]["speakers"] += 1
    for split in stats.values():
        split["megabytes"] = round(split.pop("bytes") / 1e6, 2)
        split["hours"] = round(split.pop("seconds") / 3600, 4)
    return stats


def _write_speakers_file(
    path: Path, speakers: Sequence[SynthSpeaker], stats: dict
) -> None:
    header = (
        "; SynthSpeech speakers (espeak-ng voices); see README.md\n"
        "; ID | SUBSET | VOICE | PITCH | SPEED | GAP | PEAK | LOWPASS_HZ | SNR_DB"
        " | CHAPTERS\n"
    )
    rows = [
        f"{s.speaker_id:<4d}| {s.split:<6}| {s.espeak_voice:<14}| {s.pitch:<3d}| "
        f"{s.speed:<4d}| {s.word_gap:<2d}| {s.peak:<6.3f}| {s.lowpass_hz:<6.0f}| "
        f"{s.snr_db:<5.1f}| {' '.join(map(str, s.chapters))}\n"
        for s in speakers
    ]
    path.write_text(header + "".join(rows), encoding="utf-8")


_README_LICENSE = """## License

The audio was produced with espeak-ng (GPL-3.0-or-later) and its voice
variants; espeak-ng is only the tool and is neither linked nor distributed
here. The generated audio, transcripts and metadata are part of this
repository and distributed under its Apache-2.0 license.
"""


def _readme(info: dict, speakers: Sequence[SynthSpeaker]) -> str:
    return (
        _readme_contents(info)
        + _readme_generation(info)
        + _readme_speakers(speakers)
        + _README_LICENSE
    )


def _readme_contents(info: dict) -> str:
    split_rows = "\n".join(
        f"| {split} | {s['speakers']} | {s['chapters']} | {s['utterances']} | "
        f"{s['words']} | {s['hours'] * 60:.1f} | {s['megabytes']:.2f} |"
        for split, s in info["splits"].items()
    )
    total_mb = sum(s["megabytes"] for s in info["splits"].values())
    set_rows = "\n".join(
        f"| {g['split']} | {g['first_id']}-{g['last_id']} | {g['speakers']} | "
        f"{g['chapters_per_speaker']} | {g['utterances_per_chapter']} |"
        for g in info["speaker_sets"]
    )
    return f"""# SynthSpeech

A small multi-speaker English speech corpus synthesised with espeak-ng, bundled
so that the project trains and tests offline. It is stored in LibriSpeech's
layout (`<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac` plus
`<speaker>-<chapter>.trans.txt`), 16 kHz mono 16-bit FLAC, uppercase
transcripts. Prepare it like LibriSpeech:

```python
from speechbrain_omc.data.librispeech import prepare_librispeech

prepare_librispeech("data/SynthSpeech", "results/prep", splits=("train", "dev", "test"))
```

or manifests plus federated partitions in one command:
`python -m speechbrain_omc.data.prepare_synthspeech --output results/synthspeech_prep`.

## Contents

| split | speakers | chapters | utterances | words | minutes | MB |
|---|---|---|---|---|---|---|
{split_rows}

{total_mb:.1f} MB of FLAC in all. Dev and test speakers do not occur in train.
Each espeak-ng variant yields four speakers at different pitch and speed:
three train speakers and one held-out speaker (ids 124-131), so held-out
speakers are new pitch/speed/channel combinations of voices seen in training.
A second held-out set (ids 132-163; pitches {"/".join(map(str, EXTRA_PITCHES))},
speeds {"/".join(map(str, EXTRA_SPEEDS))}: between the first set's) gives each
variant one more dev and three more test speakers, so that the test set is
large enough to tell a 1-point WER difference; it is drawn from a random
stream of its own, which leaves the first 32 speakers unchanged.

| split | speaker ids | speakers | chapters each | utterances per chapter |
|---|---|---|---|---|
{set_rows}

Utterances: half digit strings (3-7 digits, `ZERO` ... `NINE`), half short
sentences from a fixed grammar; {len(VOCABULARY)} words in all:
{" ".join(VOCABULARY)}.

"""


def _readme_generation(info: dict) -> str:
    versions = info["versions"]
    command = "python -m speechbrain_omc.data.synthspeech --output data/SynthSpeech"
    if info["seed"] != DEFAULT_SEED:
        command += f" --seed {info['seed']}"
    return f"""## Generation

Regenerate (needs `apt-get install -y espeak-ng`):

```
{command}
```

(`--missing-only` adds the speakers not yet on disk and keeps every existing
file.) Seed {info["seed"]}. Tools and libraries used for the committed files:
espeak-ng `{versions["espeak-ng"]}`, numpy {versions["numpy"]}, scipy
{versions["scipy"]}, soundfile {versions["soundfile"]} ({versions["libsndfile"]}).
sox is not used: resampling (polyphase, SciPy), trimming, noise, low-pass
and level are done in NumPy/SciPy so that they are seeded and reproducible.
Signal chain and determinism are documented in
`speechbrain_omc/data/synthspeech.py`; `generation.json` records every
parameter.

"""


def _readme_speakers(speakers: Sequence[SynthSpeaker]) -> str:
    speaker_rows = "\n".join(
        f"| {s.speaker_id} | {s.split} | `{s.espeak_voice}` | {s.pitch} | {s.speed} "
        f"| {s.word_gap} | {s.peak:.3f} | {s.lowpass_hz:.0f} | {s.snr_db:.1f} |"
        for s in speakers
    )
    return f"""## Speakers

Voice `en-us+<variant>`, espeak-ng `-p` pitch, `-s` speed (words per minute,
each utterance varies it by up to 6 %), `-g` word gap (10 ms units); channel:
peak level, low-pass cut-off, SNR of white noise. Also in `SPEAKERS.TXT`.

| id | split | voice | pitch | speed | gap | peak | low-pass Hz | SNR dB |
|---|---|---|---|---|---|---|---|---|
{speaker_rows}

"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_omc.data.synthspeech",
        description="Generate the SynthSpeech corpus with espeak-ng.",
    )
    parser.add_argument("--output", required=True, help="corpus root folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--utterances-per-train-chapter",
        type=int,
        default=None,
        help="instead of the speakers' own counts (quick trials)",
    )
    parser.add_argument(
        "--utterances-per-heldout-chapter",
        type=int,
        default=None,
        help="instead of the speakers' own counts (quick trials)",
    )
    parser.add_argument("--espeak", default="espeak-ng", help="espeak-ng binary")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing corpus"
    )
    parser.add_argument(
        "--missing-only",
        action="store_true",
        help="add the speakers not on disk yet, keep the existing files",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = generate_corpus(
        args.output,
        seed=args.seed,
        utterances_per_train_chapter=args.utterances_per_train_chapter,
        utterances_per_heldout_chapter=args.utterances_per_heldout_chapter,
        espeak=args.espeak,
        overwrite=args.overwrite,
        missing_only=args.missing_only,
    )
    print(json.dumps(info["splits"], indent=2))
    print(f"generated in {info['generation_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
