"""Framed byte strings: the envelope of payloads and wire messages.

``magic`` (4 bytes), version (uint16), total length (uint64), body, CRC32
of all before it (little-endian). :meth:`Frame.open` checks an envelope
strictly before anything of the body is read.

Example
-------
>>> frame = Frame(b"DEMO", 1, "a", "demo string", 0, "corrupted demo string")
>>> data = frame.seal([b"body"])
>>> bytes(frame.open(memoryview(data)))
b'body'
>>> frame.open(memoryview(data[:-1]))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: truncated demo string: header announces 22 bytes, got 21
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CRC", "PREFIX", "Frame"]

PREFIX = struct.Struct("<4sHQ")  # magic, version, total length
CRC = struct.Struct("<I")


@dataclass(frozen=True)
class Frame:
    """One framed layout: its ``magic``, ``version``, the ``article`` and
    ``noun`` its errors use, the fewest body bytes (``min_body``) and the
    message for a shorter string (``short``).
    """

    magic: bytes
    version: int
    article: str
    noun: str
    min_body: int
    short: str

    @property
    def overhead(self) -> int:
        """Bytes of the envelope: prefix and checksum."""
        return PREFIX.size + CRC.size

    def prefix(self, total: int) -> bytes:
        """The prefix of a string of ``total`` bytes."""
        return PREFIX.pack(self.magic, self.version, total)

    def seal(self, body: Sequence[bytes | memoryview]) -> bytes:
        """The framed string of these body parts, joined once."""
        total = self.overhead + sum(len(part) for part in body)
        parts = [self.prefix(total), *body]
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        parts.append(CRC.pack(crc))
        return b"".join(parts)

    def open(self, view: memoryview, max_nbytes: int | None = None) -> memoryview:
        """Check the envelope of ``view`` (bytes) and return a view of its body.

        Raises ``ValueError`` for foreign magic, another version, a string over
        ``max_nbytes``, truncated, padded, impossibly short or corrupted.
        """
        noun = self.noun
        if bytes(view[:4]) != self.magic:
            raise ValueError(
                f"not {self.article} {noun}: expected magic "
                f"{self.magic!r}, got {bytes(view[:4])!r}"
            )
        if len(view) < PREFIX.size:
            raise ValueError(
                f"truncated {noun}: {len(view)} bytes is shorter than "
                f"the {PREFIX.size}-byte header"
            )
        _, version, total = PREFIX.unpack_from(view)
        if version != self.version:
            raise ValueError(
                f"unsupported {noun} version {version} "
                f"(this build reads version {self.version})"
            )
        if max_nbytes is not None and len(view) > max_nbytes:
            raise ValueError(
                f"{noun} of {len(view)} bytes exceeds the {max_nbytes} "
                "bytes it may have"
            )
        if len(view) < total:
            raise ValueError(
                f"truncated {noun}: header announces {total} bytes, got {len(view)}"
            )
        if len(view) > total:
            raise ValueError(
                f"{noun} has {len(view) - total} trailing bytes after the "
                f"announced {total}"
            )
        if total < self.overhead + self.min_body:
            raise ValueError(f"{self.short} {total}")
        end = total - CRC.size
        (crc,) = CRC.unpack_from(view, end)
        if zlib.crc32(view[:end]) != crc:
            raise ValueError(
                f"corrupted {noun}: CRC32 mismatch (the bytes were altered "
                "or mis-assembled)"
            )
        return view[PREFIX.size : end]
