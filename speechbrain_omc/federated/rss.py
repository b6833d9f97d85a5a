"""Resident memory of this process, for the server's per-round figures.

Linux only (``/proc/self``): elsewhere every probe returns ``None`` or
``False``. The peak (``VmHWM``) can be reset to the current resident size
by writing ``5`` to ``/proc/self/clear_refs``, so that a round's peak is its
own and not that of whatever the process did before (building a Brain,
say).

Example
-------
>>> import sys
>>> if sys.platform.startswith("linux"):
...     assert reset_peak_rss()
...     assert peak_rss_bytes() >= rss_bytes() > 0
"""

from __future__ import annotations

import gc
import re

__all__ = ["peak_rss_bytes", "reset_peak_rss", "rss_bytes"]


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return None if match is None else int(match.group(1)) * 1024


def rss_bytes() -> int | None:
    """The process's resident set size now (``VmRSS``).

    Returns
    -------
    int or None
    """
    return _status("VmRSS")


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size since start or the last reset.

    Returns
    -------
    int or None
    """
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the peak to the current resident size (after a garbage
    collection, so that garbage from before does not count).

    Returns
    -------
    bool
        Whether the kernel took it.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True
