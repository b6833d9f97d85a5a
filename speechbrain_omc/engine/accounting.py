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

from speechbrain_omc.engine.parameter import CompressedParameter


def compressed_tensors(module: torch.nn.Module) -> dict:
    """``{qualified name: CompressedTensor}`` of a module or any submodule of one
    under OMC (a tied weight once; empty for other modules).

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

    Example
    -------
    >>> float32_parameter_bytes(torch.nn.Linear(4, 4))
    80
    """
    return sum(4 * p.numel() for p in module.parameters())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Example
    -------
    >>> peak_rss_bytes() > 0
    True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _status_bytes(*fields: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in bytes, from one read (two reads
    race: the resident size can grow past a mark read a moment before)."""
    found = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    found[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return found


def rss_bytes() -> int | None:
    """This process's resident set size now, in bytes (``VmRSS``; ``None``
    without ``/proc/self/status``).
    """
    return _status_bytes("VmRSS").get("VmRSS")


def reset_peak_rss() -> bool:
    """Restart the peak-RSS measurement (``VmHWM``, by writing ``5`` to
    ``/proc/self/clear_refs``), so that :func:`peak_rss_since_reset` reports one
    step's peak; returns whether that is supported here.

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
    return "VmHWM" in _status_bytes("VmHWM")


def peak_rss_since_reset() -> int:
    """Peak resident set size since :func:`reset_peak_rss` (else the process's
    whole peak), in bytes.
    """
    # The kernel raises the mark lazily; the current size read in the same
    # snapshot bounds it from below.
    marks = _status_bytes("VmHWM", "VmRSS")
    return max(marks.values()) if "VmHWM" in marks else peak_rss_bytes()


def training_state_bytes(
    plan,
    rule: str = "sgd",
    mode: str = "fused",
    state_format=None,
    state_block: int = 256,
) -> dict[str, dict[str, int]]:
    """Bytes of the training state that persists between steps, float32 against
    OMC, from a plan: parameters, gradients (fused mode frees the compressed
    ones in backward) and optimizer state.

    Arguments
    ---------
    plan : Plan
    rule : str
        ``"sgd"``, ``"sgd_momentum"`` or ``"adam"``.
    mode : str
        ``"fused"`` or ``"simple"``.
    state_format : str or dict, optional
        Format of fused mode's compressed optimizer state; float32 if ``None``.
    state_block : int
        Values per scale of compressed state.

    Returns
    -------
    dict
        ``{"float32": {...}, "omc": {...}}`` with ``parameters``,
        ``gradients``, ``optimizer_state`` and ``total``.

    Example
    -------
    >>> from speechbrain_omc import OMCConfig, make_plan
    >>> plan = make_plan([("w", (1024, 1024))], OMCConfig(format="e3m7"))
    >>> r = training_state_bytes(plan, "adam", state_format="e4m3")
    >>> r["float32"]["total"], r["omc"]["total"]
    (16777216, 3571716)
    """
    from speechbrain_omc.codec.formats import get_format
    from speechbrain_omc.codec.packing import packed_nbytes

    buffers = {
        "sgd": (),
        "sgd_momentum": ("momentum_buffer",),
        "adam": ("exp_avg", "exp_avg_sq"),
    }
    if rule not in buffers:
        raise ValueError(f"rule must be one of {sorted(buffers)}, got {rule!r}")
    names = buffers[rule]
    formats = state_format
    if isinstance(formats, str):
        formats = dict.fromkeys(names, formats)
    formats = dict(formats or {})
    total_numel = sum(e.numel for e in plan.entries)
    float32 = {
        "parameters": 4 * total_numel,
        "gradients": 4 * total_numel,
        "optimizer_state": 4 * total_numel * len(names),
    }
    grads = state = 0
    for entry in plan.entries:
        if not entry.compressed or mode == "simple":
            grads += 4 * entry.numel
            state += 4 * entry.numel * len(names)
            continue
        for name in names:
            fmt = formats.get(name)
            if fmt is None:
                state += 4 * entry.numel
            else:
                bits = get_format(fmt).bits
                blocks = -(-entry.numel // state_block)
                state += packed_nbytes(entry.numel, bits) + 4 * blocks
    omc = {"parameters": plan.nbytes, "gradients": grads, "optimizer_state": state}
    for part in (float32, omc):
        part["total"] = sum(part.values())
    return {"float32": float32, "omc": omc}


def format_training_state(report: dict[str, dict[str, int]]) -> str:
    """A :func:`training_state_bytes` report as a fixed-width table.

    Example
    -------
    >>> report = {"float32": {"parameters": 8, "gradients": 8,
    ...           "optimizer_state": 0, "total": 16},
    ...           "omc": {"parameters": 3, "gradients": 0,
    ...           "optimizer_state": 0, "total": 3}}
    >>> print(format_training_state(report))  # doctest: +NORMALIZE_WHITESPACE
    training state    float32 bytes  OMC bytes  OMC / float32
    parameters                    8          3          37.5%
    gradients                     8          0           0.0%
    optimizer state               0          0              -
    total                        16          3          18.8%
    """
    rows = [("training state", "float32 bytes", "OMC bytes", "OMC / float32")]
    for key in ("parameters", "gradients", "optimizer_state", "total"):
        f, o = report["float32"][key], report["omc"][key]
        ratio = f"{o / f:.1%}" if f else "-"
        rows.append((key.replace("_", " "), f"{f:,}", f"{o:,}", ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        )
        for r in rows
    )
