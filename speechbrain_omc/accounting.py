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
