"""Puts any ``torch.nn.Module`` under Online Model Compression.

Selected parameters are removed from their modules; only a
:class:`~speechbrain_omc.compressed.CompressedTensor` stays. Reading
``module.weight`` decompresses it into a float32 tensor that enters autograd
through :class:`_Decompress`. While a module that holds compressed parameters
runs, saved-tensor hooks replace every saved copy of such a weight with a
small handle, and decompress it again when backward needs it: the float32
copy of a weight lives only while the operation that reads it runs.

Updates come in two modes:

* ``fused``: the gradient of a compressed parameter arrives in
  :meth:`_Decompress.backward`, where an SGD step is applied to a freshly
  decompressed value and the result is compressed again. No float32 gradient
  or weight outlives the layer's backward.
* ``simple``: gradients are accumulated; :meth:`OMCHandle.decompressed_step`
  decompresses everything into shadow parameters for any torch optimizer,
  then compresses the result.

Codes follow the module's device (``module.to(device)``); on devices other
than the CPU the torch reference codec runs. Known limits: with reentrant
activation checkpointing (``use_reentrant=True``) a weight shared by several
checkpointed segments is updated once per segment in fused mode (non-reentrant
checkpointing, the torch default, is exact); backward through the same graph
twice (``retain_graph``) after a fused update raises.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch

from speechbrain_omc.compressed import CompressedTensor
from speechbrain_omc.config import OMCConfig
from speechbrain_omc.formats import get_format
from speechbrain_omc.memory import Workspace, mapped_empty, trim_heap
from speechbrain_omc.packing import packed_nbytes
from speechbrain_omc.selection import Plan, make_plan, round_seed
from speechbrain_omc.sgd import SGDSettings, sgd_step_

logger = logging.getLogger(__name__)

# Modules whose forward reads weights through a cache (RNNBase._flat_weights)
# get their compressed weights materialised for the duration of forward.
_WINDOW_TYPES = (torch.nn.RNNBase,)


@dataclass(eq=False)
class _Slot:
    """One compressed parameter: storage, owners and update state."""

    name: str
    tensor: CompressedTensor
    owners: list[tuple[torch.nn.Module, str]]
    aliases: tuple[str, ...] = ()
    anchor: torch.Tensor = field(
        default_factory=lambda: torch.empty(0, requires_grad=True)
    )
    shadow: torch.nn.Parameter | None = None
    grad: torch.Tensor | None = None
    # Fused mode: the value backward last decompressed, reused by the update.
    unpacked: torch.Tensor | None = None
    momentum: torch.Tensor | CompressedTensor | None = None
    pending_uses: int = 0
    # Bumped whenever pending uses are dropped, so that a use from before
    # (its graph still alive) cannot release a claim twice.
    generation: int = 0
    steps: int = 0
    version: int = 0

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def reset_uses(self) -> None:
        self.pending_uses = 0
        self.generation += 1
        self.unpacked = None


@dataclass(frozen=True)
class _SavedWeight:
    """What a saved decompressed weight (or a view of it) is packed into."""

    slot: _Slot
    version: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class _Use:
    """One read of a compressed weight under autograd, alive with its graph.

    A counted use that dies without its backward (a forward whose loss was
    dropped) releases its claim, so the update of the others is not held back.
    """

    __slots__ = ("slot", "counted", "done", "generation")

    def __init__(self, slot: _Slot):
        self.slot = slot
        self.generation = slot.generation
        # A read during backward is a recomputation (activation
        # checkpointing), not a new use.
        self.counted = torch._C._current_graph_task_id() == -1
        self.done = False
        if self.counted:
            slot.pending_uses += 1

    def finish(self) -> None:
        if self.counted and not self.done and self.generation == self.slot.generation:
            self.slot.pending_uses -= 1
        self.done = True

    def __del__(self):
        self.finish()


class _Decompress(torch.autograd.Function):
    """Decompress a slot; its backward hands the gradient to the engine."""

    @staticmethod
    def forward(ctx, anchor, slot, engine):
        ctx.use, ctx.engine = _Use(slot), engine
        return engine._decompress(slot)

    @staticmethod
    def backward(ctx, grad):
        ctx.use.finish()
        ctx.engine._receive_grad(ctx.use.slot, grad)
        return None, None, None


def _refuse_assignment(module, name: str):
    raise AttributeError(
        f"{type(module).__name__}.{name} is compressed by OMC and cannot be "
        "assigned; load a state dict instead"
    )


def _compressed_property(name: str) -> property:
    def fget(module):
        slot, engine = module._omc_slots[name]
        return engine._read(slot)

    def fset(module, value):
        _refuse_assignment(module, name)

    return property(fget, fset, doc=f"OMC-compressed parameter {name!r}")


_CLASS_CACHE: dict[tuple[type, tuple[str, ...], bool], type] = {}


def _owner_class(cls: type, names: tuple[str, ...], properties: bool) -> type:
    """A subclass of ``cls`` for owners of compressed parameters.

    Its ``_apply`` (behind ``.to()``, ``.cuda()``, ``.half()``...) moves the
    codes along with the module; with ``properties``, the compressed
    attributes are properties that decompress on read.
    """
    key = (cls, names, properties)
    if key not in _CLASS_CACHE:

        def __setattr__(module, name, value):
            # nn.Module.__setattr__ would register a Parameter under the name.
            if name in names:
                _refuse_assignment(module, name)
            cls.__setattr__(module, name, value)

        def _apply(module, fn, recurse=True):
            result = cls._apply(module, fn, recurse)
            for slot, engine in module._omc_slots.values():
                engine._apply_to_slot(slot, fn)
            return result

        namespace = {name: _compressed_property(name) for name in names}
        if not properties:
            namespace = {}
        namespace.update(_omc_original_class=cls, __setattr__=__setattr__)
        namespace["_apply"] = _apply
        _CLASS_CACHE[key] = type(f"OMC{cls.__name__}", (cls,), namespace)
    return _CLASS_CACHE[key]


class OMCHandle:
    """The engine of one module under OMC; returned by :func:`compress_module`.

    Arguments
    ---------
    module : torch.nn.Module
        The module, already modified in place.
    config : OMCConfig
        Settings.
    plan : Plan
        The selection that was applied.
    """

    def __init__(self, module: torch.nn.Module, config: OMCConfig, plan: Plan):
        self.module = module
        self.config = config
        self.plan = plan
        self.sgd = SGDSettings()
        self.slots: dict[str, _Slot] = {}
        self.skipped_updates = 0
        self._hooks: list = []
        self._live: dict[int, tuple[_Slot, int]] = {}
        self._depth = 0
        self._pushed: list[bool] = []
        self.live_bytes = 0
        self.peak_live_bytes = 0
        # Transient decompressed copies reuse mapped buffers: no heap churn.
        self.workspace = Workspace()

    # ------------------------------------------------------------------ setup
    @property
    def mode(self) -> str:
        """``"fused"`` or ``"simple"``."""
        return self.config.update_mode

    def set_sgd(self, **settings) -> None:
        """Set the fused SGD hyperparameters (``lr``, ``momentum``, ...).

        Arguments
        ---------
        **settings
            Fields of :class:`~speechbrain_omc.sgd.SGDSettings`.
        """
        for key, value in settings.items():
            if not hasattr(self.sgd, key):
                raise TypeError(f"set_sgd: unknown SGD setting {key!r}")
            setattr(self.sgd, key, value)

    def shadow_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters standing in for compressed ones in a torch optimizer.

        Empty between steps; :meth:`decompressed_step` fills them. Only
        simple mode has them.

        Returns
        -------
        list of torch.nn.Parameter
        """
        if self.mode != "simple":
            raise RuntimeError(
                "shadow parameters exist in simple mode only; fused mode "
                "updates compressed parameters in backward"
            )
        return [slot.shadow for slot in self.slots.values()]

    # ------------------------------------------------------ decompression
    def _decompress(self, slot: _Slot) -> torch.Tensor:
        buffer = self.workspace.take(slot.tensor.numel(), slot.tensor.device)
        out = slot.tensor.decompress(out=buffer)
        self._track(out)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.live_bytes += nbytes
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(tensor, self._untrack, nbytes)

    def _untrack(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def reset_peak(self) -> None:
        """Restart the peak probe of live decompressed bytes."""
        self.peak_live_bytes = self.live_bytes

    def _read(self, slot: _Slot) -> torch.Tensor:
        """The value of a compressed parameter for the operation reading it."""
        if not torch.is_grad_enabled():
            return self._decompress(slot)
        out = _Decompress.apply(slot.anchor, slot, self)
        ptr = out.untyped_storage().data_ptr()
        self._live[ptr] = (slot, slot.version)
        weakref.finalize(out, self._live.pop, ptr, None)
        return out

    def _pack(self, tensor: torch.Tensor):
        # Other tensors are kept as detached aliases: returning the tensor
        # itself would tie a node to its own saved output in a cycle.
        try:
            entry = self._live.get(tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return tensor.detach()
        if entry is None:
            return tensor.detach()
        slot, version = entry
        return _SavedWeight(
            slot, version, tuple(tensor.shape), tensor.stride(), tensor.storage_offset()
        )

    def _unpack(self, packed):
        if not isinstance(packed, _SavedWeight):
            return packed
        if packed.slot.version != packed.version:
            raise RuntimeError(
                f"OMC: {packed.slot.name} was updated after this graph was "
                "recorded; backward through it again (retain_graph) is not supported"
            )
        value = self._decompress(packed.slot)
        if self.mode == "fused":
            # The update of this weight follows its consumer's backward; the
            # consumer is done with the value by then, so the update may
            # reuse it in place instead of decompressing a third time.
            packed.slot.unpacked = value
        return value.as_strided(packed.size, packed.stride, packed.offset)

    def _enter(self, module, args) -> None:
        if self._depth == 0:
            outer = torch._C._autograd._top_saved_tensors_default_hooks(True)
            # Inside torch.utils.checkpoint, its hooks drop every saved tensor
            # anyway; ours would hide the activations from it.
            push = outer is None
            if push:
                torch._C._autograd._push_saved_tensors_default_hooks(
                    self._pack, self._unpack
                )
            self._pushed.append(push)
        self._depth += 1

    def _exit(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0 and self._pushed.pop():
            torch._C._autograd._pop_saved_tensors_default_hooks()

    def _open_window(self, module, args) -> None:
        for name, (slot, _) in module._omc_slots.items():
            module.__dict__[name] = self._read(slot)
        module._init_flat_weights()

    def _close_window(self, module, args, output) -> None:
        for name in module._omc_slots:
            module.__dict__.pop(name, None)
        module._flat_weights = [None] * len(module._flat_weights_names)

    # ---------------------------------------------------------------- updates
    def _rounding_key(self, slot: _Slot, stream: str = "") -> int:
        """Key of the stochastic rounding of one slot's one step (both modes)."""
        return round_seed(self.config.seed, slot.steps, slot.name + stream)

    def _recompress(
        self,
        slot: _Slot,
        value: torch.Tensor,
        minmax: tuple[float, float] | None = None,
    ) -> None:
        slot.tensor.assign_(
            value,
            rounding=self.config.update_rounding,
            generator=self._rounding_key(slot),
            minmax=minmax,
        )
        slot.steps += 1
        slot.version += 1

    def _receive_grad(self, slot: _Slot, grad: torch.Tensor) -> None:
        grad = grad.detach()
        slot.grad = grad if slot.grad is None else slot.grad + grad
        if self.mode == "fused" and slot.pending_uses <= 0:
            self._fused_update(slot)

    def _finite_or_skip(self, slot: _Slot, grad: torch.Tensor) -> bool:
        if bool(torch.isfinite(grad).all()):
            return True
        self._skip(slot, int((~torch.isfinite(grad)).sum()))
        return False

    def _skip(self, slot: _Slot, bad: int) -> None:
        message = (
            f"OMC: gradient of {slot.name} has {bad} non-finite values; "
            "its update is skipped and its codes are left unchanged"
        )
        if self.config.nonfinite_grad == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        self.skipped_updates += 1

    def _fused_update(self, slot: _Slot) -> None:
        grad, slot.grad, value = slot.grad, None, slot.unpacked
        slot.reset_uses()
        if grad is None:
            return
        if value is None:
            value = self._decompress(slot)
        buffer = slot.momentum
        if isinstance(buffer, CompressedTensor):
            buffer = buffer.decompress()
        result = sgd_step_(value, grad, buffer, self.sgd)
        del grad
        if result.nonfinite_grad:
            return self._skip(slot, result.nonfinite_grad)
        buffer = result.momentum_buffer
        if buffer is not None and self.config.momentum_format is not None:
            buffer = CompressedTensor.compress(
                buffer,
                self.config.momentum_format,
                transform="scale",
                rounding=self.config.update_rounding,
                generator=self._rounding_key(slot, "/momentum"),
            )
        slot.momentum = buffer
        self._recompress(slot, value, result.minmax)

    def step(self) -> None:
        """Finish a training step.

        Fused mode: apply the updates still pending (a weight read in forward
        whose every use did not reach backward). Simple mode: nothing; use
        :meth:`decompressed_step` around the optimizer step.
        """
        for slot in self.slots.values():
            if self.mode == "fused" and slot.grad is not None:
                self._fused_update(slot)
            slot.reset_uses()
        self.workspace.trim()

    def zero_grad(self) -> None:
        """Drop accumulated gradients and pending uses."""
        for slot in self.slots.values():
            slot.grad = None
            slot.reset_uses()

    @contextmanager
    def decompressed_step(self) -> Iterator[list[torch.nn.Parameter]]:
        """Simple mode: shadow parameters hold values and gradients meanwhile.

        Inside the block, run gradient clipping and any torch optimizer's
        ``step()`` over :meth:`shadow_parameters`; on exit the values are
        compressed again (with ``update_rounding``) and freed.

        Yields
        ------
        list of torch.nn.Parameter
            The shadow parameters that received a gradient.
        """
        if self.mode != "simple":
            raise RuntimeError("decompressed_step is for update_mode='simple'")
        active = []
        for slot in self.slots.values():
            grad, slot.grad = slot.grad, None
            slot.reset_uses()
            if grad is None or not self._finite_or_skip(slot, grad):
                continue
            slot.shadow.data = self._decompress(slot)
            slot.shadow.grad = grad
            active.append(slot)
        try:
            yield [slot.shadow for slot in active]
        finally:
            for slot in active:
                self._recompress(slot, slot.shadow.data)
                slot.shadow.grad = None
                slot.shadow.data = torch.empty(0)

    def _apply_to_slot(self, slot: _Slot, fn) -> None:
        """Follow ``module._apply(fn)``: codes and momentum change device."""
        packed = fn(slot.tensor.packed)
        if packed.dtype != torch.uint8:
            raise TypeError(
                f"OMC: {slot.name} is stored as uint8 codes, which cannot be cast "
                f"to {packed.dtype}; move modules with .to(device), and take "
                "float32 weights out with handle.decompressed_state_dict()"
            )
        if packed is slot.tensor.packed:
            return
        t = slot.tensor
        slot.tensor = CompressedTensor(packed, t.format, t.shape, t.transform, t.clip)
        if isinstance(slot.momentum, torch.Tensor):
            slot.momentum = slot.momentum.to(packed.device)
        elif isinstance(slot.momentum, CompressedTensor):
            m = slot.momentum
            slot.momentum = CompressedTensor(
                m.packed.to(packed.device), m.format, m.shape, m.transform, m.clip
            )
        slot.version += 1  # graphs recorded on the old device cannot go on

    # ------------------------------------------------------------ state dicts
    def _state_dict_hook(self, module, state_dict, prefix, local_metadata) -> None:
        for name, (slot, _) in module._omc_slots.items():
            payload = bytearray(slot.tensor.to_bytes())
            state_dict[prefix + name] = torch.frombuffer(payload, dtype=torch.uint8)

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
        for name, (slot, _) in module._omc_slots.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            try:
                self.load_value(slot.name, value)
            except (ValueError, TypeError) as error:
                error_msgs.append(f"{key}: {error}")

    def load_value(self, name: str, value: torch.Tensor | bytes) -> None:
        """Replace a compressed parameter by a payload or a float tensor.

        Arguments
        ---------
        name : str
            Qualified parameter name.
        value : torch.Tensor or bytes
            A ``CompressedTensor.to_bytes()`` payload (bytes or a 1-D
            ``uint8`` tensor), or float values that are compressed in the
            parameter's format.
        """
        slot = self.slots[name]
        device = slot.tensor.device
        if isinstance(value, (bytes, bytearray, memoryview)):
            tensor = CompressedTensor.from_bytes(bytes(value), device)
        elif isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            tensor = CompressedTensor.from_bytes(value.cpu().numpy().tobytes(), device)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            tensor = CompressedTensor.compress(
                value.detach().float().to(device),
                slot.tensor.format,
                transform=self.config.transform,
                rounding=self.config.rounding,
                clip=self.config.clip,
            )
        else:
            raise TypeError(
                f"cannot load {type(value).__name__} into compressed parameter {name}"
            )
        if tuple(tensor.shape) != tuple(slot.shape):
            raise ValueError(
                f"shape {tuple(tensor.shape)} does not match {name}'s "
                f"{tuple(slot.shape)}"
            )
        slot.tensor = _in_mapped_storage(tensor)
        slot.version += 1
        slot.grad = None
        slot.reset_uses()

    def decompressed_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state dict with every compressed entry in float32.

        Loads into the same architecture without OMC, for inference elsewhere.

        Returns
        -------
        dict
        """
        state = self.module.state_dict()
        for slot in self.slots.values():
            value = slot.tensor.decompress()
            for alias in slot.aliases:  # tied weights appear under every name
                state[alias] = value
        return state

    def optimizer_state_dict(self) -> dict:
        """Fused-mode update state: step counts and momentum buffers.

        Returns
        -------
        dict
        """
        state = {}
        for name, slot in self.slots.items():
            momentum = slot.momentum
            if isinstance(momentum, CompressedTensor):
                momentum = torch.frombuffer(
                    bytearray(momentum.to_bytes()), dtype=torch.uint8
                )
            state[name] = {"steps": slot.steps, "momentum": momentum}
        return {"sgd": vars(self.sgd).copy(), "slots": state}

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`optimizer_state_dict`.

        Arguments
        ---------
        state : dict
        """
        self.set_sgd(**state["sgd"])
        for name, entry in state["slots"].items():
            slot = self.slots[name]
            slot.steps = int(entry["steps"])
            momentum = entry["momentum"]
            if isinstance(momentum, torch.Tensor) and momentum.dtype == torch.uint8:
                momentum = CompressedTensor.from_bytes(momentum.numpy().tobytes())
            slot.momentum = momentum

    # -------------------------------------------------------------- accounting
    def parameter_bytes(self) -> int:
        """Exact bytes of the module's parameters: compressed plus float32.

        Returns
        -------
        int
        """
        return sum(slot.tensor.nbytes for slot in self.slots.values()) + sum(
            p.numel() * p.element_size() for p in self.module.parameters()
        )

    def table(self) -> str:
        """The plan's per-parameter byte table.

        Returns
        -------
        str
        """
        return self.plan.table()

    # ----------------------------------------------------------------- removal
    def restore(self) -> None:
        """Take the module out of OMC: float32 parameters come back."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for slot in self.slots.values():
            value = torch.nn.Parameter(slot.tensor.decompress())
            for owner, attr in slot.owners:
                owner.__dict__.pop(attr, None)
                owner.__dict__.pop("_omc_slots", None)
                owner.__class__ = getattr(owner, "_omc_original_class", type(owner))
                owner.register_parameter(attr, value)
                if isinstance(owner, _WINDOW_TYPES):
                    owner._init_flat_weights()
        self.slots.clear()
        self.module.__dict__.pop("_omc_handle", None)


def _in_mapped_storage(tensor: CompressedTensor) -> CompressedTensor:
    """The same codes in pages of their own (see :mod:`speechbrain_omc.memory`)."""
    if tensor.device.type != "cpu":
        return tensor
    packed = mapped_empty(tensor.packed.numel())
    packed.copy_(tensor.packed)
    return CompressedTensor(
        packed, tensor.format, tensor.shape, tensor.transform, tensor.clip
    )


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


def _ancestors_of(root: torch.nn.Module, owner_ids: set[int]) -> list[torch.nn.Module]:
    """Modules that are, or contain, an owner of compressed parameters."""
    found: dict[int, torch.nn.Module] = {}

    def visit(mod: torch.nn.Module) -> bool:
        hit = id(mod) in owner_ids
        for child in mod.children():
            hit = visit(child) or hit
        if hit:
            found[id(mod)] = mod
        return hit

    visit(root)
    return list(found.values())


def compress_module(
    module: torch.nn.Module,
    config: OMCConfig | None = None,
    plan: Plan | None = None,
) -> OMCHandle:
    """Put ``module`` under OMC in place and return its handle.

    Arguments
    ---------
    module : torch.nn.Module
        Any module (SpeechBrain lobes, ``nn.LSTM``, ``nn.MultiheadAttention``,
        convolutions, embeddings, ...). Its class is not edited: owners of
        compressed parameters get a per-instance subclass with properties.
    config : OMCConfig, optional
        Settings; the defaults otherwise.
    plan : Plan, optional
        A precomputed selection (for example one drawn per federated round);
        computed from ``config`` otherwise.

    Returns
    -------
    OMCHandle

    Example
    -------
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    >>> handle = compress_module(model, OMCConfig(format="e3m7"))
    >>> [name for name, _ in model.named_parameters()]
    ['0.bias']
    >>> handle.parameter_bytes()  # ceil(256 * 11 / 8) + 4 scale bytes + 64 bias
    420
    >>> model(torch.randn(2, 16)).shape
    torch.Size([2, 16])
    """
    config = config or OMCConfig()
    if getattr(module, "_omc_handle", None) is not None:
        raise RuntimeError("this module is already under OMC")
    plan = plan or make_plan(module, config)
    handle = OMCHandle(module, config, plan)
    owners = _owners(module)
    params = dict(module.named_parameters())
    unknown = [e.name for e in plan.compressed if e.name not in params]
    if unknown:
        raise ValueError(f"the plan names parameters the module lacks: {unknown}")

    per_owner: dict[int, tuple[torch.nn.Module, dict[str, tuple]]] = {}
    for entry in plan.compressed:
        param = params.pop(entry.name)  # the last reference: freed below
        if not param.is_floating_point():
            raise TypeError(f"{entry.name} is {param.dtype}; OMC compresses floats")
        value = param.detach().float()
        nbytes = packed_nbytes(value.numel(), get_format(entry.format).bits)
        tensor = CompressedTensor.compress(
            value,
            entry.format,
            transform=config.transform,
            rounding=config.rounding,
            clip=config.clip,
            out=mapped_empty(nbytes) if value.device.type == "cpu" else None,
        )
        del value
        holders = owners[id(param)]
        slot = _Slot(
            entry.name,
            tensor,
            owners=[(m, a) for _, m, a in holders],
            aliases=tuple(q for q, _, _ in holders),
        )
        if config.update_mode == "simple":
            slot.shadow = torch.nn.Parameter(torch.empty(0))
        handle.slots[entry.name] = slot
        for _, owner, attr in holders:
            del owner._parameters[attr]
            per_owner.setdefault(id(owner), (owner, {}))[1][attr] = (slot, handle)
        del param

    for owner, slots in per_owner.values():
        owner.__dict__["_omc_slots"] = slots
        # RNNs read weights through a cache that forward windows fill.
        window = isinstance(owner, _WINDOW_TYPES)
        if window:
            handle._hooks.append(owner.register_forward_pre_hook(handle._open_window))
            handle._hooks.append(
                owner.register_forward_hook(handle._close_window, always_call=True)
            )
            owner._flat_weights = [None] * len(owner._flat_weights_names)
        owner.__class__ = _owner_class(type(owner), tuple(sorted(slots)), not window)
        # partial: torch marks public state-dict hooks with an attribute,
        # which a bound method cannot carry.
        handle._hooks.append(
            owner.register_state_dict_post_hook(
                partial(OMCHandle._state_dict_hook, handle)
            )
        )
        handle._hooks.append(
            owner.register_load_state_dict_pre_hook(
                partial(OMCHandle._load_hook, handle)
            )
        )

    # Saved-tensor hooks are active while any module holding (or containing)
    # compressed parameters runs: a parent may read a child's weight directly,
    # as nn.MultiheadAttention does with out_proj.weight.
    for mod in _ancestors_of(module, set(per_owner)):
        handle._hooks.append(mod.register_forward_pre_hook(handle._enter))
        handle._hooks.append(mod.register_forward_hook(handle._exit, always_call=True))
    module.__dict__["_omc_handle"] = handle
    # The float32 parameters just freed go back to the system at once.
    trim_heap()
    logger.info("OMC plan:\n%s", plan.table())
    return handle
