"""Which directions of the wire are compressed: the ``omc_wire`` setting.

``both`` (OMC: broadcast and reply in the plan's formats, trained under
compression), or, the clients training in float32, ``download`` (replies
float32) or ``upload`` (broadcast float32; the client draws the plan as the
server does and compresses its reply once, as :func:`first_compression`).

Example
-------
>>> plan = {"lin.weight": "e3m7", "lin.bias": "float32"}
>>> wire_formats(plan, "download", "down")
{'lin.weight': 'e3m7', 'lin.bias': 'float32'}
>>> wire_formats(plan, "download", "up")
{'lin.weight': 'float32', 'lin.bias': 'float32'}
>>> wire_formats(plan, "upload", "down")["lin.weight"]
'float32'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.selection import make_plan
from speechbrain_omc.federated import wire

__all__ = [
    "WIRE_MODES",
    "check_wire_mode",
    "compress_entries",
    "decompressed_message",
    "first_compression",
    "module_formats",
    "wire_formats",
]

#: The modes, the default first.
WIRE_MODES = ("both", "download", "upload")
# The direction each non-default mode compresses.
_COMPRESSED = {"both": ("down", "up"), "download": ("down",), "upload": ("up",)}


def check_wire_mode(mode: str, omc: OMCConfig | None) -> str:
    """Check a mode against the OMC settings it needs (a plan to compress under).

    Arguments
    ---------
    mode : str
        One of :data:`WIRE_MODES`.
    omc : OMCConfig or None
        ``None``: the federation runs in float32.

    Returns
    -------
    str
        ``mode``.

    Example
    -------
    >>> check_wire_mode("upload", OMCConfig())
    'upload'
    >>> check_wire_mode("upload", None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: omc_wire 'upload' compresses one direction and needs OMC ...
    """
    if mode not in WIRE_MODES:
        raise ValueError(f"omc_wire must be one of {', '.join(WIRE_MODES)}: {mode!r}")
    if mode != "both" and omc is None:
        raise ValueError(
            f"omc_wire {mode!r} compresses one direction and needs OMC "
            "settings (the plan)"
        )
    return mode


def wire_formats(plan: Mapping[str, str], mode: str, way: str) -> dict[str, str]:
    """The formats entries travel in, one ``way`` (``"down"`` or ``"up"``).

    Arguments
    ---------
    plan : mapping
        Entry name to ``"float32"`` or a format name.
    mode : str
    way : str

    Returns
    -------
    dict
        The plan, or all ``"float32"`` when that way is not compressed.
    """
    if way not in ("down", "up"):
        raise ValueError(f"way must be down or up: {way!r}")
    if way in _COMPRESSED[mode]:
        return dict(plan)
    return dict.fromkeys(plan, "float32")


def module_formats(
    modules: torch.nn.Module,
    names: Iterable[str],
    config: OMCConfig,
    round: int,
    client: str,
) -> dict[str, str]:
    """The plan of a round and client, drawn from the model as a server does.

    Arguments
    ---------
    modules : torch.nn.Module
        The model, not under OMC.
    names : iterable of str
        The message's entries, in wire order.
    config : OMCConfig
    round : int
    client : str

    Returns
    -------
    dict
        Entry name to ``"float32"`` or a format name.

    Example
    -------
    >>> model = torch.nn.Linear(4, 4)
    >>> module_formats(model, ["weight", "bias"], OMCConfig(), 1, "a")
    {'weight': 'e3m7', 'bias': 'float32'}
    """
    plan = make_plan(modules, config, round=round, client=client)
    formats = dict.fromkeys(names, "float32")
    for entry in plan.compressed:
        if entry.name not in formats:
            raise ValueError(f"the plan compresses {entry.name}, not an entry")
        formats[entry.name] = entry.format
    return formats


def first_compression(
    value: torch.Tensor, fmt: str, config: OMCConfig
) -> CompressedTensor:
    """Compress a float32 value as OMC does the first time.

    Arguments
    ---------
    value : torch.Tensor
    fmt : str
    config : OMCConfig

    Returns
    -------
    CompressedTensor

    Example
    -------
    >>> first_compression(torch.ones(2, 2), "e3m7", OMCConfig()).format.name
    'e3m7'
    """
    return CompressedTensor.compress(
        value.detach().float(),
        fmt,
        transform=config.transform,
        rounding=config.rounding,
        clip=config.clip,
    )


def compress_entries(
    entries: Mapping[str, wire.Entry], formats: Mapping[str, str], config: OMCConfig
) -> dict[str, wire.Entry]:
    """Entries in the given formats (an upload-only reply).

    Arguments
    ---------
    entries : mapping
        Name to float32 tensor, or to an entry already in its format.
    formats : mapping
        Name to ``"float32"`` or a format name, for every entry.
    config : OMCConfig

    Returns
    -------
    dict

    Example
    -------
    >>> out = compress_entries(
    ...     {"w": torch.ones(2, 2), "b": torch.zeros(2)},
    ...     {"w": "e3m7", "b": "float32"},
    ...     OMCConfig(),
    ... )
    >>> wire.Message(out).formats()
    {'w': 'e3m7', 'b': 'float32'}
    """
    if set(formats) != set(entries):
        raise ValueError("the formats do not name exactly the entries")
    out = {}
    for name, value in entries.items():
        fmt = formats[name]
        if isinstance(value, CompressedTensor):
            if value.format.name != fmt:
                raise ValueError(f"{name} is {value.format.name}, not {fmt}")
            out[name] = value
        elif fmt == "float32":
            out[name] = value
        else:
            out[name] = first_compression(value, fmt, config)
    return out


def decompressed_message(message: wire.Message) -> wire.Message:
    """The same message with every entry in float32 (a download-only arrival).

    Arguments
    ---------
    message : wire.Message

    Returns
    -------
    wire.Message

    Example
    -------
    >>> value = CompressedTensor.compress(torch.ones(2), "e3m7")
    >>> decompressed_message(wire.Message({"w": value})).formats()
    {'w': 'float32'}
    """
    return wire.Message(message.decompressed(), message.meta, message.nbytes)
