"""OMC checkpoints for SpeechBrain's own checkpoint tools.

A module under OMC saves each compressed parameter as a *payload*: a 1-D
``uint8`` tensor of :meth:`CompressedTensor.to_bytes`. ``Checkpointer``
recovers those as they are; for the tools that expect floats,
:func:`decode_payloads` decodes them (the exporter is built on it),
:func:`omc_parameter_transfer` is a ``Pretrainer`` hook (installed as the
default by importing ``speechbrain_omc``) and :func:`average_checkpoints`
averages in float32.

Example
-------
>>> from speechbrain_omc import OMCConfig, compress_module
>>> model = torch.nn.Linear(4, 3)
>>> _ = compress_module(model, OMCConfig(format="bf16"))
>>> state = model.state_dict()
>>> is_payload(state["weight"]), state["weight"].dtype
(True, torch.uint8)
>>> torch.nn.Linear(4, 3).load_state_dict(decode_payloads(state))
<All keys matched successfully>
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from speechbrain.utils import checkpoints as sb_checkpoints

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.serial import is_payload
from speechbrain_omc.engine.parameter import CompressedParameter

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "average_checkpoints",
    "decode_payload",
    "decode_payloads",
    "install_transfer_hook",
    "is_payload",
    "omc_parameter_transfer",
]


class CheckpointError(ValueError):
    """A checkpoint file or entry is missing, unreadable or corrupted."""


def decode_payload(value: torch.Tensor, where: str = "payload") -> torch.Tensor:
    """The float32 values (on the CPU) of one payload tensor; ``where`` names it
    in a :class:`CheckpointError` (truncated, corrupted, unknown version).

    Example
    -------
    >>> payload = CompressedTensor.compress(torch.ones(2, 2), "e3m7").to_bytes()
    >>> decode_payload(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    tensor([[1., 1.],
            [1., 1.]])
    """
    data = value.detach().contiguous().cpu().numpy().tobytes()
    try:
        codes = CompressedTensor.from_bytes(data)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from error
    return codes.decompress()


def decode_payloads(
    obj: Any, keep: Iterable[str] = (), where: str = "checkpoint"
) -> Any:
    """Replace every payload in a loaded checkpoint object by float32 values,
    except under the top-level ``keep`` keys; ``where`` names ``obj`` in a
    :class:`CheckpointError`. Mappings and lists change in place (a state dict
    keeps ``_metadata``), tuples are rebuilt.

    Example
    -------
    >>> payload = CompressedTensor.compress(torch.ones(2), "int8").to_bytes()
    >>> state = {"w": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    >>> decode_payloads({"a": [state], "step": 3})
    {'a': [{'w': tensor([1., 1.])}], 'step': 3}
    """
    keep = set(keep)
    return _decode(obj, where, keep, top=True)


def _decode(obj: Any, where: str, keep: set[str], top: bool = False) -> Any:
    if is_payload(obj):
        return decode_payload(obj, where)
    if isinstance(obj, dict):
        for key, value in obj.items():
            if top and key in keep:
                continue
            obj[key] = _decode(value, f"{where}: entry {key!r}", keep)
        return obj
    if isinstance(obj, list):
        for i, value in enumerate(obj):
            obj[i] = _decode(value, f"{where}[{i}]", keep)
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_decode(v, f"{where}[{i}]", keep) for i, v in enumerate(obj))
    return obj


def count_payloads(obj: Any) -> int:
    """How many payloads a loaded checkpoint object holds.

    Example
    -------
    >>> count_payloads({"w": torch.ones(2), "n": [torch.zeros(2)]})
    0
    """
    if is_payload(obj):
        return 1
    if isinstance(obj, dict):
        return sum(count_payloads(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(count_payloads(v) for v in obj)
    return 0


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load`` (``weights_only``) a checkpoint file onto the CPU; a
    :class:`CheckpointError` names a missing, empty or unreadable file.
    """
    if not os.path.exists(path):
        kind = "broken link" if os.path.islink(path) else "file"
        raise CheckpointError(f"{path}: missing ({kind} does not exist)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted save?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors and plain "
                "containers, which torch.load(weights_only=True) refuses to "
                "unpickle (as SpeechBrain's own loaders do); re-save it with "
                "plain types"
            ) from error
        raise CheckpointError(
            f"{path}: cannot be read as a torch checkpoint (truncated or "
            f"corrupted?): {type(error).__name__}: {error}"
        ) from error


def _compressed_names(module: torch.nn.Module) -> set[str]:
    """State dict keys of ``module``'s parameters under OMC."""
    return {
        name
        for name, param in module.named_parameters(remove_duplicate=False)
        if isinstance(param, CompressedParameter)
    }


def omc_parameter_transfer(obj: torch.nn.Module, path: str | os.PathLike) -> None:
    """Pretrainer transfer hook that reads OMC and float32 checkpoints.

    As SpeechBrain's ``torch_parameter_transfer``, but payloads go as they are
    to parameters under OMC and decoded to the others; floats load into both.
    As a ``Pretrainer`` custom hook::

        custom_hooks:
            model: !name:speechbrain_omc.checkpoints.omc_parameter_transfer

    Arguments
    ---------
    obj : torch.nn.Module
        Plain or under OMC.
    path : str or os.PathLike
        The checkpoint file.

    Example
    -------
    >>> from speechbrain_omc import OMCConfig, compress_module
    >>> source = torch.nn.Linear(4, 3)
    >>> _ = compress_module(source, OMCConfig(format="e3m7"))
    >>> path = getfixture("tmp_path") / "model.ckpt"
    >>> torch.save(source.state_dict(), path)
    >>> target = torch.nn.Linear(4, 3)
    >>> omc_parameter_transfer(target, path)
    >>> torch.equal(target.weight, source.weight.slot.codes.decompress())
    True
    """
    if not isinstance(obj, torch.nn.Module):
        raise TypeError(
            f"omc_parameter_transfer loads torch modules, got {type(obj).__name__}"
        )
    state_dict = load_checkpoint_file(path)
    if not isinstance(state_dict, dict):
        raise CheckpointError(
            f"{path}: holds a {type(state_dict).__name__}, not a state dict"
        )
    state_dict = sb_checkpoints.hook_on_loading_state_dict_checkpoint(state_dict)
    decode_payloads(state_dict, keep=_compressed_names(obj), where=str(path))
    incompatible = obj.load_state_dict(state_dict, strict=False)
    for key in incompatible.missing_keys:
        logger.warning(
            "During parameter transfer to %s loading from %s, the transferred "
            "parameters did not have parameters for the key: %s",
            type(obj).__name__,
            path,
            key,
        )
    for key in incompatible.unexpected_keys:
        logger.warning(
            "During parameter transfer to %s loading from %s, the object could "
            "not use the parameters loaded with the key: %s",
            type(obj).__name__,
            path,
            key,
        )


def install_transfer_hook() -> bool:
    """Make :func:`omc_parameter_transfer` SpeechBrain's default module transfer
    hook (unless someone replaced the default already); returns whether it is.

    Example
    -------
    >>> install_transfer_hook()
    True
    """
    hooks = sb_checkpoints.DEFAULT_TRANSFER_HOOKS
    current = hooks.get(torch.nn.Module)
    if current in (None, sb_checkpoints.torch_parameter_transfer):
        hooks[torch.nn.Module] = omc_parameter_transfer
    elif current is not omc_parameter_transfer:
        logger.info(
            "SpeechBrain's module transfer hook was replaced by %r; OMC "
            "checkpoints need custom_hooks: omc_parameter_transfer",
            current,
        )
    return hooks.get(torch.nn.Module) is omc_parameter_transfer


def average_checkpoints(
    checkpoint_list: list[sb_checkpoints.Checkpoint],
    recoverable_name: str,
    parameter_loader: Callable[..., Any] = torch.load,
    averager: Callable[[Iterable[Any]], Any] = sb_checkpoints.average_state_dicts,
) -> Any:
    """Average OMC (or float32) checkpoints in float32: a drop-in for
    ``speechbrain.utils.checkpoints.average_checkpoints`` (whose averager would
    add payload bytes as numbers) that decodes payloads first; same arguments.

    Example
    -------
    >>> from speechbrain.utils.checkpoints import Checkpointer
    >>> from speechbrain_omc import OMCConfig, compress_module
    >>> model = torch.nn.Linear(2, 2, bias=False)
    >>> _ = compress_module(model, OMCConfig(format="e3m7"))
    >>> checkpointer = Checkpointer(getfixture("tmp_path"), {"model": model})
    >>> for value in (1.0, 2.0, 4.0):
    ...     _ = model.weight.data.fill_(value)
    ...     _ = checkpointer.save_checkpoint()
    >>> ckpts = checkpointer.find_checkpoints(max_num_checkpoints=3)
    >>> average_checkpoints(ckpts, "model")["weight"]
    tensor([[2.3333, 2.3333],
            [2.3333, 2.3333]])
    """
    if not checkpoint_list:
        raise CheckpointError("average_checkpoints: no checkpoints to average")
    for ckpt in checkpoint_list:
        if recoverable_name not in ckpt.paramfiles:
            raise CheckpointError(
                f"checkpoint {ckpt.path} has no {recoverable_name!r} file "
                f"(it holds: {', '.join(sorted(ckpt.paramfiles)) or 'nothing'})"
            )

    return sb_checkpoints.average_checkpoints(
        checkpoint_list,
        recoverable_name,
        parameter_loader=partial(_load_decoded, parameter_loader),
        averager=averager,
    )


def _load_decoded(parameter_loader, path, map_location="cpu"):
    """A checkpoint file's state dict with its payloads decoded to float32."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing")
    try:
        state = parameter_loader(path, map_location=map_location)
    except Exception as error:
        raise CheckpointError(
            f"{path}: cannot be read as a torch checkpoint: "
            f"{type(error).__name__}: {error}"
        ) from error
    return decode_payloads(state, where=str(path))


install_transfer_hook()
