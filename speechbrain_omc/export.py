"""Export OMC checkpoints as float32 checkpoints any SpeechBrain install reads.

::

    python -m speechbrain_omc.export CKPT_DIR OUT_DIR [--keep-omc-state]
                                     [--overwrite] [--no-progress]

``CKPT_DIR`` is a checkpoint folder, a folder of them or any folder of
``.ckpt`` files; its tree is reproduced under ``OUT_DIR`` with every payload
decoded to float32 and every other file copied, so that plain
``Checkpointer`` and ``Pretrainer`` load it. The ``omc_update`` recoverable
is dropped (``--keep-omc-state`` keeps it, decoded). All or nothing: a
staging folder is moved into place only when every file was read; a damaged
file stops it with a message naming it, and exit status 1.

Example
-------
>>> from speechbrain.utils.checkpoints import Checkpointer
>>> from speechbrain_omc import OMCConfig, compress_module
>>> model = torch.nn.Linear(4, 2)
>>> _ = compress_module(model, OMCConfig(format="e3m7"))
>>> save = getfixture("tmp_path") / "save"
>>> _ = Checkpointer(save, {"model": model}).save_checkpoint(name="a")
>>> summary = export_checkpoints(save, save.parent / "float32", progress=False)
>>> summary.files_decoded, summary.payloads_decoded
(1, 1)
>>> plain = torch.nn.Linear(4, 2)
>>> _ = Checkpointer(save.parent / "float32", {"model": plain}).recover_if_possible()
>>> torch.equal(plain.weight, model.weight.slot.codes.decompress())
True
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from speechbrain_omc.checkpoints import (
    CheckpointError,
    count_payloads,
    decode_payloads,
    load_checkpoint_file,
)

logger = logging.getLogger(__name__)

__all__ = ["ExportSummary", "OMC_STATE_RECOVERABLE", "export_checkpoints", "main"]

#: Recoverable name of the fused-mode update state (see ``brain.py``).
OMC_STATE_RECOVERABLE = "omc_update"
_CKPT_SUFFIX = ".ckpt"
# torch.save writes a zip archive; the legacy format is a pickle (protocol
# 2 or later starts with 0x80). Other .ckpt files (SpeechBrain's epoch
# counter is text, a Pretrainer's tokenizer.ckpt a SentencePiece model) are
# copied as they are.
_TORCH_MAGICS = (b"PK\x03\x04", b"\x80")


@dataclass
class ExportSummary:
    """What an export did: where (``out_dir``), ``.ckpt`` files and payloads
    decoded, files copied, and the files ``dropped`` (relative paths).
    """

    out_dir: Path
    files_decoded: int = 0
    payloads_decoded: int = 0
    files_copied: int = 0
    dropped: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"exported to {self.out_dir}: {self.files_decoded} checkpoint files "
            f"with {self.payloads_decoded} OMC tensors decoded to float32, "
            f"{self.files_copied} files copied"
        )
        if self.dropped:
            text += f", {len(self.dropped)} dropped ({_names(self.dropped)})"
        return text


def _names(paths: Iterable[Path]) -> str:
    return ", ".join(sorted({p.name for p in paths}))


def _is_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(_TORCH_MAGICS)


def _source_files(src: Path, dst: Path) -> list[Path]:
    """Every file under ``src`` (links followed), relative, sorted."""
    if not src.exists():
        raise CheckpointError(f"checkpoint folder {src} does not exist")
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder (give a checkpoint folder)")
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real == src_real or src_real in dst_real.parents:
        raise CheckpointError(f"output folder {dst} must not be inside {src}")
    files = []
    for root, dirs, names in os.walk(src, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            files.append(Path(root, name).relative_to(src))
    if not any(f.suffix == _CKPT_SUFFIX for f in files):
        raise CheckpointError(
            f"no {_CKPT_SUFFIX} files under {src}: not a SpeechBrain checkpoint "
            "folder (expected CKPT+.../*.ckpt or a folder of them)"
        )
    return files


def _export_file(source: Path, target: Path, summary: ExportSummary) -> None:
    """Decode one ``.ckpt`` file's payloads into ``target``, or copy it."""
    if not source.exists():
        raise CheckpointError(f"{source}: missing (broken link?)")
    if source.suffix != _CKPT_SUFFIX or (
        source.stat().st_size > 0 and not _is_torch_file(source)
    ):
        shutil.copyfile(source, target)
        summary.files_copied += 1
        return
    state = load_checkpoint_file(source)  # raises on empty or corrupt files
    payloads = count_payloads(state)
    if payloads == 0:  # float-only (optimizer, scheduler, ...): exact copy
        shutil.copyfile(source, target)
        summary.files_copied += 1
        return
    torch.save(decode_payloads(state, where=str(source)), target)
    summary.files_decoded += 1
    summary.payloads_decoded += payloads


def _move_into_place(staging: Path, dst: Path, overwrite: bool, src: Path) -> None:
    """Move the staged tree's entries into ``dst``, replacing only on request."""
    if not dst.exists():
        staging.rename(dst)
        return
    if not dst.is_dir():
        raise CheckpointError(f"output path {dst} exists and is not a folder")
    entries = sorted(staging.iterdir())
    taken = [e.name for e in entries if (dst / e.name).exists()]
    if taken and not overwrite:
        raise CheckpointError(
            f"{dst} already holds {', '.join(taken)}; pass --overwrite "
            "(overwrite=True) to replace them"
        )
    src_real = src.resolve()
    for name in taken:
        real = (dst / name).resolve()
        if real == src_real or real in src_real.parents:
            raise CheckpointError(f"replacing {dst / name} would delete {src}")
    for entry in entries:
        target = dst / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        entry.rename(target)


def export_checkpoints(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    keep_omc_state: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportSummary:
    """Write float32 copies of the checkpoints under ``ckpt_dir`` to ``out_dir``.

    Arguments
    ---------
    ckpt_dir : str or os.PathLike
    out_dir : str or os.PathLike
        Receives the same tree (created if missing).
    keep_omc_state : bool
        Keep the ``omc_update`` recoverable, decoded.
    overwrite : bool
        Replace entries of ``out_dir`` of the same names.
    progress : bool
        A progress bar on stderr.

    Returns
    -------
    ExportSummary

    Raises
    ------
    CheckpointError
        Nothing to export, or a missing, empty or corrupted file (nothing is
        written then).
    """
    src, dst = Path(ckpt_dir), Path(out_dir)
    files = _source_files(src, dst)
    summary = ExportSummary(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output (same file system, so moving it is a rename); made
    # with mkdir so that it gets the umask's permissions, as dst would.
    staging = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        for rel in tqdm(files, desc="export", unit="file", disable=not progress):
            if rel.suffix == _CKPT_SUFFIX and rel.stem == OMC_STATE_RECOVERABLE:
                if not keep_omc_state:
                    summary.dropped.append(rel)
                    continue
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            _export_file(src / rel, staging / rel, summary)
        _move_into_place(staging, dst, overwrite, src)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("%s", summary)
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_omc.export",
        description=(
            "Write float32 copies of OMC checkpoints (every compressed "
            "parameter decoded), loadable by plain SpeechBrain Checkpointer "
            "and Pretrainer without speechbrain_omc."
        ),
    )
    parser.add_argument(
        "ckpt_dir",
        help="a checkpoint folder (CKPT+...), a folder of them (save/), or a "
        "folder of .ckpt files",
    )
    parser.add_argument("out_dir", help="output folder (same tree, float32)")
    parser.add_argument(
        "--keep-omc-state",
        action="store_true",
        help=f"keep the {OMC_STATE_RECOVERABLE} recoverable (fused-mode momentum, "
        "decoded); dropped by default",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace entries OUT_DIR already holds under the same names",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module documentation); returns the exit
    status.
    """
    args = _parser().parse_args(argv)
    try:
        summary = export_checkpoints(
            args.ckpt_dir,
            args.out_dir,
            keep_omc_state=args.keep_omc_state,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
