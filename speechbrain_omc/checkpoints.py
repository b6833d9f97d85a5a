"""OMC checkpoints for SpeechBrain's own checkpoint tools.

A module under OMC saves each compressed parameter as a 1-D ``uint8`` tensor
holding :meth:`CompressedTensor.to_bytes` (a *payload*, starting with
``b"OMCT"``). SpeechBrain's ``Checkpointer`` saves and recovers such state
dicts as they are into modules under OMC; this module serves the tools that
expect float tensors:

* :func:`decode_payloads` turns every payload of a loaded checkpoint object
  into float32 (the exporter, :mod:`speechbrain_omc.export`, is built on it);
* :func:`omc_parameter_transfer` is a ``Pretrainer`` transfer hook: payloads
  go straight into modules under OMC and are decoded for plain modules, so a
  recipe can load an OMC checkpoint before its Brain compresses. Importing
  ``speechbrain_omc`` makes it SpeechBrain's default transfer hook for
  modules (:func:`install_transfer_hook`); it behaves as SpeechBrain's own
  ``torch_parameter_transfer`` on checkpoints without payloads;
* :func:`average_checkpoints` is a drop-in for
  ``speechbrain.utils.checkpoints.average_checkpoints``, which would add
  payload bytes as numbers: it decodes first and averages in float32.

Example
-------
>>> from speechbrain_omc import OMCConfig, compress_module
>>> model = torch.nn.Linear(4, 3)
>>> _ = compress_module(model, OMCConfig(format="bf16"))
>>> state = model.state_dict()
>>> is_payload(state["weight"]), state["weight"].dtype
(True, torch.uint8)
>>> plain = decode_payloads(state)
>>> plain["weight"].shape, plain["weight"].dtype
(torch.Size([3, 4]), torch.float32)
>>> torch.nn.Linear(4, 3).load_state_dict(plain)
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
    """The float32 values of one payload tensor.

    Arguments
    ---------
    value : torch.Tensor
        A payload (see :func:`is_payload`).
    where : str
        What to call it in an error (file and key).

    Returns
    -------
    torch.Tensor
        float32, of the compressed parameter's shape, on the CPU.

    Raises
    ------
    CheckpointError
        If the payload is truncated, corrupted or of an unknown version.

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
    """Replace every payload in a loaded checkpoint object by float32 values.

    Mappings and lists are changed in place, so a state dict keeps its type
    and ``_metadata``; tuples are rebuilt. Anything else is left alone.

    Arguments
    ---------
    obj : Any
        What ``torch.load`` returned (a state dict, an optimizer's state, ...).
    keep : iterable of str
        Top-level keys whose payloads stay as they are (parameters of a
        module under OMC, which loads payloads itself).
    where : str
        What to call ``obj`` in an error (its file).

    Returns
    -------
    Any
        ``obj`` (or a rebuilt tuple) with payloads decoded.

    Raises
    ------
    CheckpointError
        If a payload is corrupted; the message names ``where`` and the key.

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

    Arguments
    ---------
    obj : Any
        What ``torch.load`` returned.

    Returns
    -------
    int

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
    """``torch.load`` a checkpoint file onto the CPU, with clear errors.

    Only tensors and plain containers are unpickled (``weights_only``), as
    SpeechBrain's loaders do under torch 2.6 and later.

    Arguments
    ---------
    path : str or os.PathLike
        A ``.ckpt`` file written by ``torch.save``.

    Returns
    -------
    Any
        The loaded object.

    Raises
    ------
    CheckpointError
        If the file is missing, empty or not a readable torch checkpoint.
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

    Loads like SpeechBrain's ``torch_parameter_transfer`` (non-strict, a
    warning per missing or unused key, SpeechBrain's key renames), except
    that payloads are decoded to float32 for parameters not under OMC, and
    handed as they are to parameters under OMC (their codes are then
    exactly the checkpoint's). Float entries load into either kind (a
    compressed parameter encodes them in its format).

    Use it as a ``Pretrainer`` custom hook (importing ``speechbrain_omc``
    also installs it as the default for modules, see
    :func:`install_transfer_hook`)::

        pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
            loadables: {model: !ref <model>}
            paths: {model: !ref <pretrained_path>/model.ckpt}
            custom_hooks:
                model: !name:speechbrain_omc.checkpoints.omc_parameter_transfer

    Arguments
    ---------
    obj : torch.nn.Module
        Plain or under OMC.
    path : str or os.PathLike
        The checkpoint file.

    Raises
    ------
    CheckpointError
        If the file is missing or corrupted (the message names it).

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
    """Make :func:`omc_parameter_transfer` SpeechBrain's module transfer hook.

    ``Pretrainer.load_collected`` then loads OMC checkpoints into any module
    without a ``custom_hooks`` entry. A default that someone else already
    replaced is left alone. Called when ``speechbrain_omc`` is imported.

    Returns
    -------
    bool
        Whether the hook is installed now.

    Example
    -------
    >>> install_transfer_hook()
    True
    >>> hooks = sb_checkpoints.DEFAULT_TRANSFER_HOOKS
    >>> hooks[torch.nn.Module] is omc_parameter_transfer
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
    """Average OMC (or float32) checkpoints in float32.

    A drop-in for ``speechbrain.utils.checkpoints.average_checkpoints``
    (whose averager would add payload bytes as numbers): payloads are decoded
    first; plain modules load the result as is, modules under OMC encode it.

    Arguments
    ---------
    checkpoint_list : list of Checkpoint
        From ``Checkpointer.find_checkpoints()``.
    recoverable_name : str
        The recoverable whose state dicts are averaged.
    parameter_loader : callable
        ``loader(path, map_location=...)``; ``torch.load`` by default.
    averager : callable
        Averages an iterator of (decoded) state dicts; SpeechBrain's
        ``average_state_dicts`` by default.

    Returns
    -------
    Any
        The averager's result: by default a state dict of float32 averages.

    Raises
    ------
    CheckpointError
        If the list is empty, a checkpoint lacks the recoverable, or a file
        is missing or corrupted.

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
