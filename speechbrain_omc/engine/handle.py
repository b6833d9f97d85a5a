"""Puts any ``torch.nn.Module`` under Online Model Compression.

Each selected parameter becomes a
:class:`~speechbrain_omc.engine.parameter.CompressedParameter`: still an
``nn.Parameter`` of the same name and shape, but stored as packed codes and
decoded on the fly by every operation that reads it, so a float32 copy of a
weight lives only while one operation runs. How parameters are updated is the
:class:`~speechbrain_omc.engine.updates.UpdatePolicy`'s (``handle.updates``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from functools import partial

import torch

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.formats import get_format
from speechbrain_omc.codec.memory import Workspace, mapped_empty, trim_heap
from speechbrain_omc.codec.packing import packed_nbytes
from speechbrain_omc.codec.serial import is_payload
from speechbrain_omc.engine.accounting import (
    format_training_state,
    training_state_bytes,
)
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.parameter import CompressedParameter, Slot
from speechbrain_omc.engine.rules import AdamSettings, SGDSettings
from speechbrain_omc.engine.selection import Plan, make_plan
from speechbrain_omc.engine.updates import UpdatePolicy, UpdateState

logger = logging.getLogger(__name__)

__all__ = ["OMCHandle", "compress_module", "CompressedParameter", "handle_of"]


class OMCHandle:
    """The engine of one module under OMC; returned by :func:`compress_module`.

    Arguments
    ---------
    module : torch.nn.Module
        Already modified in place.
    config : OMCConfig
    plan : Plan
        The selection that was applied.
    """

    def __init__(self, module: torch.nn.Module, config: OMCConfig, plan: Plan):
        self.module = module
        self.plan = plan
        self.aliases: dict[str, tuple[str, ...]] = {}
        # Where each compressed parameter lives: (owning module, attribute).
        self._holders: dict[str, tuple[torch.nn.Module, str]] = {}
        self.live_bytes = 0
        self.peak_live_bytes = 0
        # Transient decompressed copies reuse mapped buffers: no heap churn.
        self.workspace = Workspace()
        self.updates = UpdatePolicy(
            config, self.workspace, self.parameters, self._bound
        )
        # The modules' state-dict hooks (a parameter holds its fused-update
        # hook itself: CompressedParameter.attach).
        self._hooks: list = []

    # A copy of the module (copy.deepcopy, torch.save and torch.load) copies
    # its handle with it: hooks and slots reach it, and copy or pickle map
    # them to the copy's. The workspace is fresh (Workspace.__reduce__).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "live_bytes": 0, "peak_live_bytes": 0}

    # ------------------------------------------- the update policy's surface
    @property
    def config(self) -> OMCConfig:
        """Settings (a federated round's :meth:`reset_state` reseeds them)."""
        return self.updates.config

    @property
    def mode(self) -> str:
        """``"fused"`` or ``"simple"``."""
        return self.updates.mode

    @property
    def state(self) -> dict[str, UpdateState]:
        """Per-parameter update state (write counts, optimizer buffers)."""
        return self.updates.state

    @property
    def max_grad_norm(self) -> float | None:
        """Fused mode's gradient-clipping limit (``OMCConfig.fused_clipping``)."""
        return self.updates.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, limit: float | None) -> None:
        self.updates.max_grad_norm = limit

    @property
    def skipped_updates(self) -> int:
        """Updates skipped for non-finite values since the last reset."""
        return self.updates.skipped_updates

    def set_sgd(self, **settings) -> None:
        """Use fused SGD with these settings (:meth:`UpdatePolicy.set_sgd`)."""
        self.updates.set_sgd(**settings)

    def set_rule(self, settings: SGDSettings | AdamSettings) -> None:
        """Use this fused rule (:meth:`UpdatePolicy.set_rule`)."""
        self.updates.set_rule(settings)

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the fused rule from ``optimizer`` (SGD, Adam or AdamW) at every
        step, so that its learning-rate schedule applies: in a plain PyTorch
        loop, what :class:`~speechbrain_omc.OMCBrain` does with its optimizer.

        Example
        -------
        >>> from speechbrain_omc import OMCConfig, compress_module
        >>> model = torch.nn.Linear(4, 2)
        >>> handle = compress_module(model, OMCConfig(format="e3m7"))
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        >>> handle.follow(optimizer)
        >>> optimizer.param_groups[0]["lr"] = 0.005  # a scheduler's step
        >>> model(torch.ones(1, 4)).sum().backward()
        >>> handle.step(); handle.updates.rule.lr
        0.005
        """
        self.updates.follow(optimizer)

    def clip_grad_norm_(
        self, parameters: Iterable[torch.nn.Parameter], max_norm: float
    ) -> torch.Tensor:
        """Global clipping of held gradients too (``UpdatePolicy.clip_grad_norm_``)."""
        return self.updates.clip_grad_norm_(parameters, max_norm)

    def step(self) -> None:
        """Finish a training step, before the optimizer's (``UpdatePolicy.step``)."""
        self.updates.step()

    def zero_grad(self) -> None:
        """Drop the gradients of the compressed parameters."""
        self.updates.zero_grad()

    def reset_state(self, seed: int | None = None) -> None:
        """Restart the update state, as a new run (``UpdatePolicy.reset_state``)."""
        self.updates.reset_state(seed)

    def optimizer_state_dict(self) -> dict:
        """Fused-mode update state (:meth:`UpdatePolicy.state_dict`)."""
        return self.updates.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`optimizer_state_dict`."""
        self.updates.load_state_dict(state)

    # ------------------------------------------------------------ parameters
    def parameters(self) -> dict[str, CompressedParameter]:
        """The compressed parameters by name (a tied one under its first name)."""
        # The attributes that hold them, not a walk of the module tree: this
        # runs every step, and a SpeechBrain model has hundreds of modules.
        params = {}
        for owner, attr in self._holders.values():
            param = owner._parameters.get(attr)
            if isinstance(param, CompressedParameter):
                params[param.slot.name] = param
        return params

    @property
    def slots(self) -> dict[str, Slot]:
        """Codes of every compressed parameter by name (``slot.codes``)."""
        return {name: param.slot for name, param in self._bound().items()}

    def _bound(self) -> dict[str, CompressedParameter]:
        """The compressed parameters, each wired to this engine: a move to
        another device gives a parameter new codes (a new slot)."""
        params = self.parameters()
        updates = self.updates
        for param in params.values():
            slot = param.slot
            if slot.decode is None:
                slot.decode, slot.write = self._decode, updates.write
            # A new parameter object (after a device move) has no mark yet.
            if updates.mode == "fused" and param.engine is not updates:
                param.attach(updates)
        if updates.mode == "fused" and not updates.dense.attached:
            # The float32 parameters' gradients, kept until the optimizer's
            # step, wait in mapped pages (engine/dense.py).
            updates.dense.attach(
                p for p in self.module.parameters()
                if not isinstance(p, CompressedParameter)
            )  # fmt: skip
        return params

    def _decode(self, slot: Slot) -> torch.Tensor:
        self.updates.release_pending_memory()  # once after each step
        codes = slot.codes
        out = codes.decode_into(self.workspace.take(codes.numel(), codes.device))
        nbytes = 4 * out.numel()
        self.live_bytes += nbytes
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(out, self._untrack, nbytes)
        return out

    def _untrack(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def reset_peak(self) -> None:
        """Restart the peak probe of live decompressed bytes."""
        self.peak_live_bytes = self.live_bytes

    # ------------------------------------------------------------ state dicts
    def _state_dict_hook(self, module, state_dict, prefix, local_metadata) -> None:
        for attr, param in module._parameters.items():
            if isinstance(param, CompressedParameter) and prefix + attr in state_dict:
                payload = bytearray(param.slot.codes.to_bytes())
                state_dict[prefix + attr] = torch.frombuffer(payload, dtype=torch.uint8)

    def _load_hook(
        self,
        module,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        for attr, param in module._parameters.items():
            key = prefix + attr
            if param is None or key not in state_dict:
                continue
            if not isinstance(param, CompressedParameter):
                payload = _payload(state_dict[key])
                if payload is not None:  # compressed there, float32 here
                    try:
                        state_dict[key] = self._plan_change(key, payload, None)
                    except ValueError as error:
                        error_msgs.append(f"{key}: {error}")
                        del state_dict[key]
                continue
            try:
                self.load_value(param.slot.name, state_dict[key], checkpoint=True)
            except (ValueError, TypeError) as error:
                error_msgs.append(f"{key}: {error}")
            # The default loader then copies the parameter onto itself.
            state_dict[key] = param

    def _plan_change(
        self, key: str, codes: CompressedTensor, fmt: str | None
    ) -> torch.Tensor:
        """A checkpoint entry compressed otherwise than the plan says."""
        now = fmt or "float32"
        if self.config.on_plan_change != "recompress":
            raise ValueError(
                f"{key} is stored as {codes.format.name} ({codes.transform.kind}) "
                f"in the checkpoint but the current plan makes it {now}; keep the "
                "OMC settings of the run that wrote it, or set on_plan_change: "
                "recompress to decode and compress it again"
            )
        logger.info(
            "OMC: %s re-compressed from %s to %s (on_plan_change: recompress)",
            key,
            codes.format.name,
            now,
        )
        return codes.decompress()

    def load_value(
        self, name: str, value: torch.Tensor | bytes, checkpoint: bool = False
    ) -> None:
        """Replace a compressed parameter by a payload (bytes or a 1-D ``uint8``
        tensor) or float values compressed in its format. A ``checkpoint``
        payload must match the plan (``OMCConfig.on_plan_change``); federated
        messages carry their own plan.
        """
        slot = self.slots[name]
        device = slot.codes.device
        if isinstance(value, (bytes, bytearray, memoryview)):
            codes = CompressedTensor.from_bytes(bytes(value), device)
        elif isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            codes = CompressedTensor.from_bytes(value.cpu().numpy().tobytes(), device)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            if isinstance(value, CompressedParameter):
                value = value.decoded()
            codes = CompressedTensor.compress(
                value.detach().float().to(device),
                slot.codes.format,
                transform=self.config.transform,
                rounding=self.config.rounding,
                clip=self.config.clip,
            )
        else:
            raise TypeError(
                f"cannot load {type(value).__name__} into compressed parameter {name}"
            )
        if tuple(codes.shape) != tuple(slot.codes.shape):
            raise ValueError(
                f"shape {tuple(codes.shape)} does not match {name}'s "
                f"{tuple(slot.codes.shape)}" + _averaged_payload_hint(value, slot)
            )
        planned = slot.codes
        if checkpoint and (
            codes.format != planned.format
            or codes.transform.kind != planned.transform.kind
        ):
            value = self._plan_change(name, codes, planned.format.name)
            codes = CompressedTensor.compress(
                value,
                planned.format,
                transform=self.config.transform,
                rounding=self.config.rounding,
                clip=self.config.clip,
            )
        with slot.lock:
            slot.codes = codes.in_own_pages()

    def decompressed_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state dict with every compressed entry in float32.

        Loads into the same architecture without OMC, for inference elsewhere.
        """
        state = self.module.state_dict()
        for name, slot in self.slots.items():
            value = slot.codes.decompress()
            for alias in self.aliases.get(name, (name,)):
                state[alias] = value
        return state

    # -------------------------------------------------------------- accounting
    def parameter_bytes(self) -> int:
        """Exact bytes of the module's parameters: compressed plus float32."""
        total = 0
        for param in self.module.parameters():
            if isinstance(param, CompressedParameter):
                total += param.slot.codes.nbytes
            else:
                total += param.numel() * param.element_size()
        return total

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes of the training state, float32 against OMC, for this rule.

        Returns
        -------
        dict
            ``{"float32": {...}, "omc": {...}}`` with ``parameters``,
            ``gradients``, ``optimizer_state`` and ``total``.
        """
        updates, config = self.updates, self.config
        rule = updates.rule_name()
        report = training_state_bytes(
            self.plan, rule, self.mode, config.state_format, config.state_block
        )
        omc = report["omc"]
        omc["parameters"] = self.parameter_bytes()
        stored = [s.optimizer for s in updates.state.values() if s.optimizer]
        if stored and self.mode == "fused":
            predicted = training_state_bytes(
                self.plan, rule, self.mode, None, config.state_block
            )["omc"]["optimizer_state"]
            compressed_float32 = sum(
                4 * e.numel * (2 if rule == "adam" else int(rule != "sgd"))
                for e in self.plan.compressed
            )
            measured = sum(
                updates.storage.nbytes(v)
                for state in stored
                for k, v in state.items()
                if k != "step"
            )
            omc["optimizer_state"] = predicted - compressed_float32 + measured
        if updates.holds_gradients:  # held from backward to the step
            omc["gradients"] += sum(
                e.numel * updates.held_itemsize(get_format(e.format).lossless)
                for e in self.plan.compressed
            )
        omc["total"] = omc["parameters"] + omc["gradients"] + omc["optimizer_state"]
        return report

    def memory_table(self) -> str:
        """:meth:`memory_report` as a table."""
        return format_training_state(self.memory_report())

    def table(self) -> str:
        """The plan's per-parameter byte table."""
        return self.plan.table()

    # ----------------------------------------------------------------- removal
    def restore(self) -> None:
        """Take the module out of OMC: float32 parameters come back."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        # The float32 parameters outlive the handle: a next one hooks them anew.
        self.updates.dense.detach()
        for param in self.parameters().values():
            param.detach_engine()
        replaced: dict[int, torch.nn.Parameter] = {}
        for module in self.module.modules():
            for attr, param in list(module._parameters.items()):
                if isinstance(param, CompressedParameter):
                    if id(param) not in replaced:
                        value = param.slot.codes.decompress().to(param.dtype)
                        replaced[id(param)] = torch.nn.Parameter(
                            value, requires_grad=param.requires_grad
                        )
                    module._parameters[attr] = replaced[id(param)]
            if isinstance(module, torch.nn.RNNBase):
                module._init_flat_weights()
        self.updates.state.clear()
        self._holders.clear()
        self.module.__dict__.pop("_omc_handle", None)


def handle_of(module: torch.nn.Module) -> OMCHandle | None:
    """The handle of a module under OMC (the one given to :func:`compress_module`
    or a copy of it, which has its own), ``None`` for any other module.

    Example
    -------
    >>> import copy
    >>> model = torch.nn.Linear(4, 4)
    >>> handle = compress_module(model, OMCConfig(format="e3m7"))
    >>> twin = copy.deepcopy(model)
    >>> handle_of(model) is handle, handle_of(twin).module is twin
    (True, True)
    """
    return module.__dict__.get("_omc_handle")


def _payload(value) -> CompressedTensor | None:
    """The compressed tensor a state-dict entry holds, if it is a payload."""
    if not is_payload(value):
        return None
    return CompressedTensor.from_bytes(value.cpu().numpy().tobytes())


def _averaged_payload_hint(value, slot: Slot) -> str:
    """A hint for a float tensor as long as a payload (an averaged checkpoint)."""
    if (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dim() == 1
        and value.numel() == len(slot.codes.to_bytes())
    ):
        return (
            "; it has the length of this parameter's OMC payload: were the "
            "payload bytes averaged as numbers "
            "(speechbrain.utils.checkpoints.average_checkpoints)? Average OMC "
            "checkpoints with speechbrain_omc.checkpoints.average_checkpoints"
        )
    return ""


def _owners(
    module: torch.nn.Module,
) -> dict[int, list[tuple[str, torch.nn.Module, str]]]:
    """Every (qualified name, owner, attribute) holding each parameter object."""
    owners: dict[int, list] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, param in mod._parameters.items():
            if param is not None:
                qualified = f"{mod_name}.{attr}" if mod_name else attr
                owners.setdefault(id(param), []).append((qualified, mod, attr))
    return owners


def compress_module(
    module: torch.nn.Module,
    config: OMCConfig | None = None,
    plan: Plan | None = None,
) -> OMCHandle:
    """Put ``module`` under OMC in place and return its handle.

    Arguments
    ---------
    module : torch.nn.Module
        Any module; classes are not edited.
    config : OMCConfig, optional
    plan : Plan, optional
        A precomputed selection (a federated round's); else from ``config``.

    Returns
    -------
    OMCHandle

    Example
    -------
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    >>> handle = compress_module(model, OMCConfig(format="e3m7"))
    >>> type(model[0].weight).__name__, [n for n, _ in model.named_parameters()]
    ('CompressedParameter', ['0.weight', '0.bias'])
    >>> handle.parameter_bytes()  # ceil(256 * 11 / 8) + 4 scale bytes + 64 bias
    420
    """
    config = config or OMCConfig()
    if getattr(module, "_omc_handle", None) is not None:
        raise RuntimeError("this module is already under OMC")
    if any(isinstance(p, CompressedParameter) for p in module.parameters()):
        raise RuntimeError(
            "this module holds compressed parameters of another handle; "
            "restore() that handle first"
        )
    plan = plan or make_plan(module, config)
    handle = OMCHandle(module, config, plan)
    owners = _owners(module)
    params = dict(module.named_parameters())
    unknown = [e.name for e in plan.compressed if e.name not in params]
    if unknown:
        raise ValueError(f"the plan names parameters the module lacks: {unknown}")

    # Every module with parameters watches its loads: a compressed entry may
    # meet a parameter that the current plan keeps float32.
    touched: dict[int, torch.nn.Module] = {
        id(m): m for m in module.modules() if m._parameters
    }
    for entry in plan.compressed:
        # The float32 parameter's last reference: freed once compressed.
        param = params.pop(entry.name)
        _compress_entry(handle, entry.name, entry.format, param, owners)
        del param
    for owner in touched.values():
        _watch(handle, owner)
    handle._bound()  # fused mode: the in-backward update hooks
    module.__dict__["_omc_handle"] = handle
    # The float32 parameters just freed go back to the system at once.
    trim_heap()
    logger.info("OMC plan:\n%s", plan.table())
    return handle


def _compress_entry(
    handle: OMCHandle,
    name: str,
    fmt: str,
    param: torch.nn.Parameter,
    owners: dict[int, list[tuple[str, torch.nn.Module, str]]],
) -> None:
    """Replace ``param`` by its compressed parameter wherever it is held."""
    if not param.is_floating_point():
        raise TypeError(f"{name} is {param.dtype}; OMC compresses floats")
    config = handle.config
    value = param.detach().float()
    nbytes = packed_nbytes(value.numel(), get_format(fmt).bits)
    codes = CompressedTensor.compress(
        value,
        fmt,
        transform=config.transform,
        rounding=config.rounding,
        clip=config.clip,
        out=mapped_empty(nbytes) if value.device.type == "cpu" else None,
    )
    del value
    slot = Slot(name, codes, decode=handle._decode, write=handle.updates.write)
    compressed = CompressedParameter.wrap(slot, requires_grad=param.requires_grad)
    holders = owners[id(param)]
    for _, owner, attr in holders:
        owner._parameters[attr] = compressed
    handle.updates.state[name] = UpdateState()
    handle.aliases[name] = tuple(q for q, _, _ in holders)
    handle._holders[name] = holders[0][1:]


def _watch(handle: OMCHandle, owner: torch.nn.Module) -> None:
    """Hook a module's state dict: compressed entries save and load as payloads."""
    if isinstance(owner, torch.nn.RNNBase):
        owner._init_flat_weights()  # the RNN's cached list of its weights
    # partial: torch marks public state-dict hooks with an attribute, which a
    # bound method cannot carry.
    handle._hooks.append(
        owner.register_state_dict_post_hook(partial(OMCHandle._state_dict_hook, handle))
    )
    handle._hooks.append(
        owner.register_load_state_dict_pre_hook(partial(OMCHandle._load_hook, handle))
    )
