"""Byte accounting of parameters and memory probes.

Parameter bytes are counted from storage, exactly: the packed codes and
transform numbers of every compressed parameter plus the float tensors of the
others. Peak resident memory of a process is the honest CPU-side measure of a
training step (run each configuration in a fresh process).
"""

from __future__ import annotations

import resource
import sys

import torch

from speechbrain_omc.parameter import CompressedParameter


def compressed_tensors(module: torch.nn.Module) -> dict:
    """The compressed parameters held by a module or its children, by name.

    Works on any submodule of a module under OMC, not only on the root the
    handle was made for.

    Arguments
    ---------
    module : torch.nn.Module
        A module, under OMC or not (then the result is empty).

    Returns
    -------
    dict
        ``{qualified name: CompressedTensor}``; a tied weight appears once.

    Example
    -------
    >>> compressed_tensors(torch.nn.Linear(2, 2))
    {}
    """
    return {
        name: param.slot.codes
        for name, param in module.named_parameters()
        if isinstance(param, CompressedParameter)
    }


def parameter_bytes(module: torch.nn.Module) -> int:
    """Exact bytes of a module's parameters: compressed plus uncompressed.

    Arguments
    ---------
    module : torch.nn.Module
        Any module; compressed parameters count their ``nbytes``.

    Returns
    -------
    int

    Example
    -------
    >>> parameter_bytes(torch.nn.Linear(4, 4))  # 20 float32 values
    80
    """
    return sum(
        p.slot.codes.nbytes
        if isinstance(p, CompressedParameter)
        else p.numel() * p.element_size()
        for p in module.parameters()
    )


def float32_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes the same parameters would take in float32.

    Arguments
    ---------
    module : torch.nn.Module

    Returns
    -------
    int

    Example
    -------
    >>> float32_parameter_bytes(torch.nn.Linear(4, 4))
    80
    """
    return sum(4 * p.numel() for p in module.parameters())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Returns
    -------
    int

    Example
    -------
    >>> peak_rss_bytes() > 0
    True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS measurement (Linux: ``VmHWM``).

    Writing ``5`` to ``/proc/self/clear_refs`` sets the high-water mark to
    the current resident size, so that :func:`peak_rss_since_reset` after a
    training step reports that step's peak, not the import's or a
    previous evaluation's.

    Returns
    -------
    bool
        Whether the reset is supported here.

    Example
    -------
    >>> if reset_peak_rss():  # Linux
    ...     before = peak_rss_since_reset()
    ...     block = bytearray(64 << 20)  # 64 MiB, written (zeroed)
    ...     del block
    ...     assert peak_rss_since_reset() >= before + (60 << 20)
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_rss_since_reset() -> int:
    """Peak resident set size since :func:`reset_peak_rss`, in bytes.

    Where the reset is not supported, the process's whole peak
    (:func:`peak_rss_bytes`).

    Returns
    -------
    int

    Example
    -------
    >>> peak_rss_since_reset() > 0
    True
    """
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else peak_rss_bytes()
