"""Server checkpoints: atomic, the last two kept, refused when they do not fit.

:class:`CheckpointStore` keeps the server state in ``server.ckpt`` and the
one before in ``server.ckpt.prev``. Saves are atomic (a temporary file
renamed over the old one); an unreadable or invalid checkpoint is set aside
(``server.ckpt.corrupt``) and the previous one used; one server holds a
folder at a time (:meth:`CheckpointStore.lock`). Settings that differ from
the run's raise :class:`CheckpointMismatch`, each difference named
(:func:`diff_settings`).

Example
-------
>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> store = CheckpointStore(Path(folder) / "server.ckpt")
>>> for round in (1, 2, 3):
...     store.save({"round": round})
>>> store.load(lambda state: state["round"])
(3, PosixPath('.../server.ckpt'))
>>> _ = store.path.write_bytes(b"\\0" * 64)  # a zeroed file
>>> store.load(lambda state: state["round"])  # the previous one
(2, PosixPath('.../server.ckpt.prev'))
>>> sorted(p.name for p in Path(folder).iterdir())  # the bad one set aside
['server.ckpt.corrupt', 'server.ckpt.prev']
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointCorrupt",
    "CheckpointLocked",
    "CheckpointMismatch",
    "CheckpointStore",
    "atomic_save",
    "diff_settings",
    "plain",
]

T = TypeVar("T")

_TMP_MARK = ".tmp-"


class CheckpointMismatch(ValueError):
    """A checkpoint saved with other settings than the run's."""


class CheckpointCorrupt(ValueError):
    """A checkpoint that cannot be read or holds invalid content."""


class CheckpointLocked(RuntimeError):
    """Another server holds the checkpoint folder's lock."""


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk, not only the file's bytes.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(
    obj: Any, path: Path, before_replace: Callable[[], None] | None = None
) -> None:
    """``torch.save`` to a flushed temporary file, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename.

    Arguments
    ---------
    obj : object
    path : str or Path

    Example
    -------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "model.pt"
    >>> atomic_save({"w": torch.ones(2)}, path)
    >>> torch.load(path, weights_only=True)
    {'w': tensor([1., 1.])}
    """
    _write_atomically(obj, Path(path))


def plain(value: Any) -> Any:
    """A JSON-plain copy (tuples as lists, anything else as its text).

    Arguments
    ---------
    value : object

    Returns
    -------
    object

    Example
    -------
    >>> plain({"shape": (2, 3), "path": Path("/x")})
    {'path': '/x', 'shape': [2, 3]}
    """
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def diff_settings(saved: Mapping, current: Mapping, limit: int = 12) -> list[str]:
    """The differences between two nested settings, one line each.

    Arguments
    ---------
    saved : mapping
        Settings stored in a checkpoint.
    current : mapping
        The run's settings.
    limit : int
        At most this many lines (then a count of the rest).

    Returns
    -------
    list of str
        Empty when they agree.

    Example
    -------
    >>> diff_settings({"omc": {"format": "e3m7"}, "seed": 1},
    ...               {"omc": {"format": "e4m3"}, "seed": 1})
    ["omc.format: checkpoint 'e3m7', this run 'e4m3'"]
    """
    old, new = {}, {}
    _flatten(plain(saved), "", old)
    _flatten(plain(current), "", new)
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: checkpoint {_short(a)}, this run {_short(b)}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class CheckpointStore:
    """The last two checkpoints of a run: ``path`` and ``path.prev``.

    Arguments
    ---------
    path : str or Path
        The newest checkpoint's file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.previous = self.path.with_name(self.path.name + ".prev")
        self.corrupt = self.path.with_name(self.path.name + ".corrupt")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = None  # the open lock file while this store holds it

    # ---------------------------------------------------------------- lock
    def lock(self) -> CheckpointStore:
        """Take the folder's exclusive lock (until :meth:`unlock` or exit).

        Returns
        -------
        CheckpointStore
            ``self``.

        Raises
        ------
        CheckpointLocked
            Another server holds it (its process id named).

        Example
        -------
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "server.ckpt"
        >>> first = CheckpointStore(path).lock()
        >>> try:
        ...     CheckpointStore(path).lock()
        ... except CheckpointLocked as error:
        ...     print(str(error).split(";")[0])
        another server (process ...) is running on .../server.ckpt
        >>> first.unlock()
        >>> CheckpointStore(path).lock().locked
        True
        """
        if self._lock is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_path, "a+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(32).strip() or "unknown"
            handle.close()
            raise CheckpointLocked(
                f"another server (process {holder}) is running on {self.path}; "
                f"two servers on one folder would overwrite each other's "
                f"checkpoints. Stop it, or give this run another output folder "
                f"(the lock is {self.lock_path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle
        return self

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (nothing if not held)."""
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    @property
    def locked(self) -> bool:
        """Whether this store holds the folder's lock."""
        return self._lock is not None

    def __enter__(self) -> CheckpointStore:
        return self.lock()

    def __exit__(self, *exc_info) -> None:
        self.unlock()

    def _held_elsewhere(self) -> bool:
        # Whether another store or process holds the lock now. Without a
        # lock file no server of this version ever ran here (and none is
        # created: a store that is only read leaves the folder as it was).
        if self._lock is not None or not self.lock_path.is_file():
            return False
        with open(self.lock_path, encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def exists(self) -> bool:
        """Whether any checkpoint is there."""
        return self.path.is_file() or self.previous.is_file()

    def save(self, obj: Any) -> None:
        """Write ``obj`` as the newest checkpoint; the newest becomes the previous.

        Arguments
        ---------
        obj : object
            What ``torch.load(..., weights_only=True)`` can read.
        """

        def keep_previous() -> None:
            # Only once the new checkpoint is whole on disk: a crash between
            # the two renames leaves the previous one (one round is redone).
            if self.path.is_file():
                os.replace(self.path, self.previous)

        _write_atomically(obj, self.path, keep_previous)

    def clean_temporary(self) -> list[Path]:
        """Remove the temporary files of interrupted saves; return them."""
        if self._held_elsewhere():
            logger.info(
                "a live server holds %s: its temporary files are left", self.lock_path
            )
            return []
        removed = []
        for path in self.path.parent.glob(f".{self.path.name}{_TMP_MARK}*"):
            path.unlink(missing_ok=True)
            removed.append(path)
        if removed:
            logger.info("removed %d stale temporary checkpoint file(s)", len(removed))
        return removed

    def load(self, apply: Callable[[Any], T]) -> tuple[T, Path] | None:
        """Load the newest usable checkpoint and hand it to ``apply``.

        Arguments
        ---------
        apply : callable
            Takes the loaded object; raises :class:`CheckpointMismatch` when it does
            not fit the run (not retried), or ``ValueError``, ``KeyError`` or
            ``TypeError`` when it is invalid (the previous file is tried).

        Returns
        -------
        tuple or None
            ``(apply's result, the file used)``; ``None`` without a checkpoint.

        Raises
        ------
        CheckpointCorrupt
            When no checkpoint is usable (each file and its problem named).
        """
        self.clean_temporary()
        problems = []
        for path in (self.path, self.previous):
            if not path.is_file():
                continue
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - any unreadable file
                problem = f"{path} cannot be read ({type(error).__name__}: {error})"
            else:
                try:
                    result = apply(obj)
                except CheckpointMismatch:
                    raise
                except (ValueError, KeyError, TypeError, AttributeError) as error:
                    problem = f"{path} is invalid ({type(error).__name__}: {error})"
                else:
                    if problems:
                        self._set_aside_newest()
                        logger.error("resuming from the previous checkpoint %s", path)
                    return result, path
            logger.error("checkpoint %s", problem)
            problems.append(problem)
        if not problems:
            return None
        raise CheckpointCorrupt(
            "no usable checkpoint: " + "; ".join(problems) + ". Remove them or "
            "start fresh to begin the run again."
        )

    def _set_aside_newest(self) -> None:
        # The newest file failed and the previous one is good: the next save
        # would make the bad file the previous one. Moved aside, the next save
        # keeps the good one as the previous (and the bad one can be looked at).
        if self.path.is_file():
            os.replace(self.path, self.corrupt)
            _fsync_dir(self.path.parent)
            logger.error("unusable checkpoint %s moved to %s", self.path, self.corrupt)

    def discard(self) -> None:
        """Set the checkpoints aside (``*.discarded``) so that a run starts fresh."""
        for path in (self.path, self.previous):
            if path.is_file():
                target = path.with_name(path.name + ".discarded")
                os.replace(path, target)
                logger.warning("starting fresh: %s moved to %s", path, target)
        self.clean_temporary()
