"""The update policy of compressed parameters: rule, writes and clipping.

Two modes (``OMCConfig.update_mode``): ``fused`` applies the rule (SGD or
Adam) when a compressed parameter's gradient is complete in backward, one
decode and one encode, and frees the gradient there (under DDP it waits for
the all-reduced gradient, in :meth:`UpdatePolicy.step`); ``simple`` lets any
optimizer update the parameter in place through :meth:`UpdatePolicy.write`.
How fused mode honours ``max_grad_norm`` is ``OMCConfig.fused_clipping``
(see docs/design.md).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from speechbrain_omc.codec.blockwise import BlockwiseTensor
from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.formats import _finite_minmax
from speechbrain_omc.codec.memory import PageReturn, Workspace
from speechbrain_omc.engine.clipping import HeldGradients, clip_grad_norm_
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.dense import DenseGradients
from speechbrain_omc.engine.parameter import CompressedParameter, Slot
from speechbrain_omc.engine.rules import (
    AdamSettings,
    SGDSettings,
    fused_step_,
    settings_from_optimizer,
)
from speechbrain_omc.engine.selection import round_seed

__all__ = ["UpdatePolicy", "UpdateState"]

_RULES = {"SGDSettings": SGDSettings, "AdamSettings": AdamSettings}
_DISTRIBUTED_BUILD = torch.distributed.is_available()
# Attributes of a compressed parameter (.grad) read and set as a plain
# tensor's, without a __torch_function__ call each.
_PLAIN_ATTRIBUTES = torch._C.DisableTorchFunctionSubclass
_BUFFERS = {
    "BlockwiseTensor": BlockwiseTensor.from_bytes,
    "CompressedTensor": CompressedTensor.from_bytes,
}


@dataclass
class UpdateState:
    """Per-parameter state: writes so far (keys stochastic rounding) and the
    fused rule's buffers (float32 or compressed, ``OMCConfig.state_format``)."""

    steps: int = 0
    optimizer: dict = field(default_factory=dict)


class UpdatePolicy:
    """How the compressed parameters of one module are updated.

    Arguments
    ---------
    config : OMCConfig
    workspace : Workspace
        Buffers of transient decompressed values and held gradients.
    parameters : callable
        Returns the compressed parameters by name.
    bound : callable
        The same, each wired to its engine first.

    Example
    -------
    >>> from speechbrain_omc import OMCConfig, compress_module
    >>> model = torch.nn.Linear(4, 2)
    >>> updates = compress_module(model, OMCConfig(format="e3m7")).updates
    >>> updates.set_sgd(lr=0.1)
    >>> model(torch.ones(1, 4)).sum().backward()  # updated inside backward
    >>> updates.step(); updates.state["weight"].steps
    1
    """

    # Dropped from copies: like torch's copy of a parameter, a copy of the
    # module carries no gradients, so nothing of the step in progress.
    _STEP_IN_PROGRESS = ("held", "_deferred", "_coefs", "_norm_sq", "clip_coef")

    def __init__(
        self,
        config: OMCConfig,
        workspace: Workspace,
        parameters: Callable[[], dict[str, CompressedParameter]],
        bound: Callable[[], dict[str, CompressedParameter]],
    ):
        self.config = config
        self.workspace = workspace
        self._parameters, self._bound = parameters, bound
        self.rule: SGDSettings | AdamSettings = SGDSettings()
        self.state: dict[str, UpdateState] = {}
        self.storage = config.state_storage()
        self.max_grad_norm: float | None = None
        self.clip_coef: float | None = None  # two-pass: the measured one
        self.skipped_updates = 0
        self._norm_sq = 0.0  # this step's squared gradient norms
        self._previous_norm: float | None = None
        self._measuring = False
        self.held = HeldGradients(self._take)
        # Fused mode: the float32 parameters' gradients (OMCHandle attaches).
        self.dense = DenseGradients(workspace)
        self._coefs: dict[str, torch.Tensor] = {}  # deferred clipping's
        self._deferred: set[str] = set()  # DDP: awaiting step()
        # CPU, fused mode: freed memory goes back to the system in backward
        # and before each forward (a few tens of milliseconds a step on a
        # large model; its peak drops by the held gradients' size and more).
        self.pages = PageReturn(workspace)
        self._followed: _Followed | None = None  # follow()'s optimizer
        self._rule_read = False  # this step read its settings

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in self._STEP_IN_PROGRESS:
            del state[key]
        state["_measuring"] = False
        del state["_followed"]  # a copy follows nothing: its optimizer is unknown
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.held = HeldGradients(self._take)
        self._deferred, self._coefs = set(), {}
        self._norm_sq, self.clip_coef = 0.0, None
        self._followed, self._rule_read = None, False  # a copy follows nothing
        if "dense" not in state:  # older pickles
            self.dense = DenseGradients(self.workspace)
        self.pages = PageReturn(self.workspace)
        self.pages.enabled = state.get("pages", self.pages).enabled

    # ------------------------------------------------------------------ rule
    @property
    def mode(self) -> str:
        """``"fused"`` or ``"simple"``."""
        return self.config.update_mode

    @property
    def sgd(self) -> SGDSettings:
        """The fused SGD settings (an error when the rule is Adam)."""
        if not isinstance(self.rule, SGDSettings):
            raise AttributeError(f"the fused rule is {type(self.rule).__name__}")
        return self.rule

    def set_sgd(self, **settings) -> None:
        """Use fused SGD with these fields of
        :class:`~speechbrain_omc.engine.rules.SGDSettings` (``lr``, ...)."""
        if not isinstance(self.rule, SGDSettings):
            self.rule = SGDSettings()
        for key, value in settings.items():
            if not hasattr(self.rule, key):
                raise TypeError(f"set_sgd: unknown SGD setting {key!r}")
            setattr(self.rule, key, value)

    def set_rule(self, settings: SGDSettings | AdamSettings) -> None:
        """Use this fused rule (what a Brain reads from its optimizer)."""
        if type(settings) is not type(self.rule) and any(
            s.optimizer for s in self.state.values()
        ):
            raise ValueError(
                f"the fused rule changed from {type(self.rule).__name__} to "
                f"{type(settings).__name__} with optimizer state present; call "
                "reset_state() first"
            )
        self.rule = settings

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """Take the fused rule from ``optimizer`` (SGD, Adam or AdamW) at every
        step, its learning-rate schedule included (see ``OMCHandle.follow``)."""
        self.set_rule(settings_from_optimizer(optimizer))  # refused now if unfit
        self._followed, self._rule_read = _Followed(optimizer), False

    def rule_name(self) -> str:
        """``"sgd"``, ``"sgd_momentum"`` or ``"adam"`` (for accounting)."""
        if isinstance(self.rule, AdamSettings):
            return "adam"
        return "sgd_momentum" if self.rule.momentum else "sgd"

    # ----------------------------------------------------------------- writes
    def _take(
        self, numel: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        return self.workspace.take(numel, device, dtype)

    def _rounding_key(self, name: str, stream: str = "") -> int:
        """Key of the stochastic rounding of one parameter's one step."""
        steps = self.state[name].steps
        return round_seed(self.config.seed, steps, name + stream)

    def write(
        self,
        slot: Slot,
        value: torch.Tensor,
        minmax: tuple[float, float] | None = None,
    ) -> None:
        """Encode an updated value (an in-place op or a fused update)."""
        if slot.name in self._deferred:
            raise RuntimeError(
                f"OMC: {slot.name} waits for its fused update (DDP applies it "
                "after the gradients are all-reduced); call handle.step() "
                "before optimizer.step(), as OMCBrain does"
            )
        if minmax is None:
            try:
                minmax = _finite_minmax(value)
            except ValueError:  # an update that went non-finite
                bad = int((~torch.isfinite(value)).sum())
                return self._skip(slot.name, bad, "updated value")
        slot.codes.assign_(
            value,
            rounding=self.config.update_rounding,
            generator=self._rounding_key(slot.name),
            minmax=minmax,
        )
        self.state[slot.name].steps += 1

    def _skip(self, name: str, bad: int, what: str = "gradient") -> None:
        message = (
            f"OMC: {what} of {name} has {bad} non-finite values; "
            "its update is skipped and its codes are left unchanged"
        )
        if self.config.nonfinite_grad == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        self.skipped_updates += 1

    # ---------------------------------------------------------- fused updates
    @property
    def holds_gradients(self) -> bool:
        """Whether backward holds compressed gradients for global clipping
        (fused mode, ``fused_clipping="deferred"``, a finite limit)."""
        limit = self.max_grad_norm
        return (
            self.mode == "fused"
            and self.config.fused_clipping == "deferred"
            and limit is not None
            and limit < float("inf")
        )

    def held_itemsize(self, lossless: bool) -> int:
        """Bytes per held gradient value (``OMCConfig.held_grad_format``)."""
        choice = self.config.held_grad_format
        if choice == "auto":  # lossless weights keep float32's arithmetic
            return 4 if lossless else 2
        return 4 if choice == "fp32" else 2

    def _on_grad(self, param: CompressedParameter) -> None:
        """The hook of a parameter whose gradient is complete (fused mode)."""
        if self.mode != "fused":
            return
        if self._measuring:  # two-pass clipping, first pass: the norm only
            self._norm_sq += float(torch.linalg.vector_norm(param.grad.float())) ** 2
            param.grad = None
            return
        if _distributed():  # DDP all-reduces the gradient after this hook
            self._deferred.add(param.slot.name)
            return
        if self.holds_gradients:
            slot = param._slot
            with _PLAIN_ATTRIBUTES():  # not through __torch_function__
                grad, param.grad = param.grad, None
            itemsize = self.held_itemsize(slot.codes.format.lossless)
            dtype = torch.float32 if itemsize == 4 else torch.bfloat16
            self.held.hold(slot.name, grad.float(), dtype)
            if grad.is_cpu:
                self.pages.consumed(grad.numel() * itemsize)
            return
        if param.grad.is_cpu:
            self.pages.consumed(4 * param.grad.numel())
        self._fused_update(param)

    def _fused_update(
        self, param: CompressedParameter, grad: torch.Tensor | None = None
    ) -> None:
        if grad is None:
            with _PLAIN_ATTRIBUTES():
                grad, param.grad = param.grad, None
        slot = param._slot
        self._deferred.discard(slot.name)
        if grad is None:
            return
        if self._followed is not None and not self._rule_read:
            self._rule_read = True  # once a step, before its first update
            self.set_rule(self._followed.settings())
        state = self.state[slot.name]
        codes = slot.codes
        device = codes.device
        grad = self._clipped(grad.to(device, torch.float32))

        def scratch() -> torch.Tensor:
            return self.workspace.take(codes.numel(), device).view(codes.shape)

        def keys(buffer: str) -> int:
            return self._rounding_key(slot.name, "/" + buffer)

        state.optimizer = _on_device(state.optimizer, device)
        value = scratch()
        result = fused_step_(
            value, codes, grad, state.optimizer, self.rule, self.storage, scratch, keys
        )
        del grad
        if result.nonfinite_grad:
            return self._skip(slot.name, result.nonfinite_grad)
        with slot.lock:
            self.write(slot, value, result.minmax)
        # As an in-place op would: a graph that saved the old value refuses
        # a second backward instead of using the new one.
        torch.autograd.graph.increment_version(param)

    def _clipped(self, grad: torch.Tensor) -> torch.Tensor:
        """Clip a compressed gradient by ``fused_clipping`` (float32 ones are
        the optimizer step's; deferred ones were scaled already)."""
        limit = self.max_grad_norm
        mode = self.config.fused_clipping
        if limit is None or not limit < float("inf") or mode == "deferred":
            return grad
        norm_sq = float(torch.linalg.vector_norm(grad)) ** 2
        self._norm_sq += norm_sq
        if mode == "two_pass" and self.clip_coef is not None:
            coef = self.clip_coef
        elif mode == "previous_norm" and self._previous_norm is not None:
            coef = limit / (self._previous_norm + 1e-6)
        else:  # per parameter (also the first step of previous_norm)
            coef = limit / (norm_sq**0.5 + 1e-6)
        return grad * coef if coef < 1.0 else grad

    # --------------------------------------------------------------- clipping
    def clip_grad_norm_(
        self, parameters: Iterable[torch.nn.Parameter], max_norm: float
    ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over ``parameters`` that also covers
        held gradients (scaled when :meth:`step` applies them): with deferred
        clipping, the step's global clipping. Returns the norm before clipping.
        """
        parameters = list(parameters)
        names = {
            id(param): name
            for name, param in self._parameters().items()
            if name in self.held
        }
        total, coef = clip_grad_norm_(parameters, max_norm, self.held, names)
        if coef is not None:
            for param in parameters:
                name = names.get(id(param))
                if name is not None:
                    self._coefs[name] = coef
        return total

    @contextmanager
    def measuring(self):
        """Two-pass clipping's first pass: inside the block, compressed
        gradients add their squared norms to :attr:`gradient_norm_sq` and are
        dropped; nothing updates."""
        self._measuring, self._norm_sq = True, 0.0
        try:
            yield
        finally:
            self._measuring = False

    @property
    def gradient_norm_sq(self) -> float:
        """Squared norm of the compressed parameters' gradients this step."""
        return self._norm_sq

    # ------------------------------------------------------------------ steps
    def step(self) -> None:
        """Finish a training step; call it before the optimizer's step.

        Fused mode applies what backward did not: gradients under DDP, of
        parameters moved to a new device, held for deferred clipping (with
        :meth:`clip_grad_norm_`'s coefficient, else by their own global
        norm). Simple mode: nothing, the optimizer updates the parameters.
        """
        params = self._bound()
        if self.mode == "fused":
            with _PLAIN_ATTRIBUTES():
                ungathered = [p for p in params.values() if p.grad is not None]
            for param in ungathered:
                self._fused_update(param)
            if len(self.held):
                if not self._coefs and self.holds_gradients:
                    # No clip_grad_norm_ call: the held ones are clipped alone.
                    self.clip_grad_norm_(params.values(), self.max_grad_norm)
                for name, param in params.items():
                    if name in self.held:
                        grad = self.held.release(name, self._coefs.get(name))
                        self._fused_update(param, grad)
        self._rule_read = False  # the next step reads the followed optimizer
        # previous_norm clipping: this step's norm scales the next step.
        self._previous_norm = self._norm_sq**0.5 if self._norm_sq else None
        self._norm_sq, self.clip_coef = 0.0, None
        self._coefs.clear()
        self.workspace.trim()
        on_cpu = any(p.device.type == "cpu" for p in params.values())
        fused_bytes = sum(4 * p.numel() for p in params.values())
        self.pages.after_step(fused_bytes if self.mode == "fused" and on_cpu else 0)

    @property
    def release_memory(self) -> bool:
        """Whether freed memory goes back to the system (CPU, fused mode)."""
        return self.pages.enabled

    @release_memory.setter
    def release_memory(self, value: bool) -> None:
        self.pages.enabled = bool(value)

    def release_pending_memory(self) -> None:
        """Before a forward (the handle's first decode after a step): the
        idle buffers' and the heap's free pages go back, so that the
        forward's peak holds only what is in use."""
        self.pages.before_forward()

    def zero_grad(self) -> None:
        """Drop the gradients of the compressed parameters."""
        for param in self._parameters().values():
            param.grad = None
        self._deferred.clear()
        self.held.clear()
        self._coefs.clear()

    def reset_state(self, seed: int | None = None) -> None:
        """Restart step counts and optimizer state, as a new run; ``seed``
        is a new seed of stochastic rounding (a federated round's)."""
        if seed is not None:
            self.config = replace(self.config, seed=seed)
        self.skipped_updates = 0
        for state in self.state.values():
            state.steps, state.optimizer = 0, {}
        self._previous_norm, self._norm_sq, self.clip_coef = None, 0.0, None
        self.zero_grad()

    # ------------------------------------------------------------ state dicts
    def state_dict(self) -> dict:
        """The rule, write counts and optimizer state (compressed buffers as
        their ``to_bytes()`` payload)."""
        slots = {name: _slot_state(state) for name, state in self.state.items()}
        rule = {"kind": type(self.rule).__name__, **vars(self.rule)}
        return {"rule": rule, "slots": slots, "previous_norm": self._previous_norm}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.rule = _rule_from(state["rule"])
        self._previous_norm = state.get("previous_norm")
        for name, entry in state["slots"].items():
            _load_slot_state(self.state[name], entry)


def _slot_state(state: UpdateState) -> dict:
    """One parameter's :class:`UpdateState` as a state-dict entry."""
    kinds = {
        key: type(value).__name__
        for key, value in state.optimizer.items()
        if isinstance(value, (BlockwiseTensor, CompressedTensor))
    }
    buffers = {
        key: torch.frombuffer(bytearray(value.to_bytes()), dtype=torch.uint8)
        if key in kinds
        else value
        for key, value in state.optimizer.items()
    }
    return {"steps": state.steps, "state": buffers, "kinds": kinds}


def _load_slot_state(target: UpdateState, entry: dict) -> None:
    """Inverse of :func:`_slot_state`, into ``target``."""
    target.steps = int(entry["steps"])
    kinds = entry.get("kinds", {})
    target.optimizer = {
        key: _BUFFERS[kinds[key]](value.numpy().tobytes()) if key in kinds else value
        for key, value in entry["state"].items()
    }


def _rule_from(entry: dict) -> SGDSettings | AdamSettings:
    """The fused rule of a state dict's ``"rule"`` entry."""
    rule = dict(entry)
    settings = _RULES[rule.pop("kind")]
    if "betas" in rule:
        rule["betas"] = tuple(rule["betas"])
    return settings(**rule)


class _Followed:
    """The optimizer whose settings a plain loop's fused updates take at every
    step (:meth:`UpdatePolicy.follow`), held weakly."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self._optimizer = weakref.ref(optimizer)

    def settings(self) -> SGDSettings | AdamSettings:
        optimizer = self._optimizer()
        if optimizer is None:
            raise RuntimeError(
                "OMC: the optimizer given to follow() no longer exists; "
                "call follow() with the one that trains the model"
            )
        return settings_from_optimizer(optimizer)


def _on_device(state: dict, device: torch.device) -> dict:
    return {
        k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v
        for k, v in state.items()
    }


def _distributed() -> bool:
    """Whether gradients are all-reduced after backward (DDP)."""
    return (
        _DISTRIBUTED_BUILD
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )
