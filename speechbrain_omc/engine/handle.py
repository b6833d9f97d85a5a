"""Puts any ``torch.nn.Module`` under Online Model Compression.

Each selected parameter is replaced by a
:class:`~speechbrain_omc.engine.parameter.CompressedParameter`: still an
``nn.Parameter`` of the same name, shape and dtype, in ``parameters()`` and
the state dict, but stored only as packed codes and decoded on the fly by
every operation that reads it (forward, backward, an optimizer's update).
Autograd saves the compressed tensor itself, so a float32 copy of a weight
lives only while one operation runs. Anything that works on parameters works
on these: DDP, gradient clipping, any optimizer, ``.to(device)``, hooks.

Updates come in two modes:

* ``fused``: when a compressed parameter's gradient is complete in backward
  (``register_post_accumulate_grad_hook``, PyTorch's optimizer-in-backward
  pattern), one native call decodes the weight, applies SGD and encodes the
  result; the gradient is freed there. Under DDP the update waits for the
  all-reduced gradient and runs in :meth:`OMCHandle.step`.
* ``simple``: gradients stay on the parameters like any other's; the
  optimizer's in-place update of a compressed parameter decodes, updates
  and re-encodes it (one rounding per in-place op).

Codes follow the module's device (``module.to(device)``); on devices other
than the CPU the torch reference codec runs. A cast of the module
(``.half()``, autocast) changes the dtype the weights decode to, not the
codes. With reentrant activation checkpointing (``use_reentrant=True``) a
weight shared by several checkpointed segments is updated once per segment
in fused mode (non-reentrant checkpointing, the torch default, is exact).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from speechbrain_omc.codec.blockwise import BlockwiseTensor
from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.formats import _finite_minmax, get_format
from speechbrain_omc.codec.memory import Workspace, mapped_empty, trim_heap
from speechbrain_omc.codec.packing import packed_nbytes
from speechbrain_omc.engine.accounting import (
    format_training_state,
    training_state_bytes,
)
from speechbrain_omc.engine.clipping import HeldGradients, clip_grad_norm_
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.parameter import CompressedParameter, Slot
from speechbrain_omc.engine.rules import (
    AdamSettings,
    SGDSettings,
    fused_step_,
)
from speechbrain_omc.engine.selection import Plan, make_plan, round_seed

logger = logging.getLogger(__name__)

__all__ = ["OMCHandle", "compress_module", "CompressedParameter", "handle_of"]


@dataclass
class UpdateState:
    """Per-parameter state of the updates: write count and optimizer state.

    Arguments
    ---------
    steps : int
        Writes of the codes so far (keys stochastic rounding).
    optimizer : dict
        The fused rule's state: ``momentum_buffer`` (SGD), ``exp_avg``,
        ``exp_avg_sq`` and ``step`` (Adam), each float32 or block-wise
        compressed (:class:`~speechbrain_omc.engine.rules.StateStorage`).
    """

    steps: int = 0
    optimizer: dict = field(default_factory=dict)


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
        self.rule: SGDSettings | AdamSettings = SGDSettings()
        self.state: dict[str, UpdateState] = {}
        self.storage = config.state_storage()
        # Fused mode's gradient clipping (see OMCConfig.fused_clipping).
        self.max_grad_norm: float | None = None
        self.clip_coef: float | None = None  # two-pass: the measured one
        self._norm_sq = 0.0  # this step's squared gradient norms
        self._previous_norm: float | None = None
        self._measuring = False
        # Deferred clipping: gradients held until backward ends, and the
        # coefficient clip_grad_norm_ found for each.
        self.held = HeldGradients(self._take)
        self._coefs: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, tuple[str, ...]] = {}
        # Where each compressed parameter lives: (owning module, attribute).
        self._holders: dict[str, tuple[torch.nn.Module, str]] = {}
        self.skipped_updates = 0
        self.live_bytes = 0
        self.peak_live_bytes = 0
        # Transient decompressed copies reuse mapped buffers: no heap churn.
        self.workspace = Workspace()
        # The modules' state-dict hooks (a parameter holds its fused-update
        # hook itself: CompressedParameter.attach).
        self._hooks: list = []
        # Fused mode under DDP: parameters whose reduced gradient awaits step().
        self._deferred: set[str] = set()

    # A copy of the module (copy.deepcopy, torch.save and torch.load) copies
    # its handle with it: the module's hooks, the parameters' slots and
    # fused-update hooks all reach it, and copy or pickle map them to the
    # copy's. Like torch's copy of a parameter, the copy has no gradients:
    # nothing of the step in progress is copied. The workspace is fresh.
    _STEP_IN_PROGRESS = ("held", "_deferred", "_coefs", "_norm_sq", "clip_coef")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in self._STEP_IN_PROGRESS:
            del state[key]
        state["live_bytes"] = state["peak_live_bytes"] = 0
        state["_measuring"] = False
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.held = HeldGradients(self._take)
        self._deferred, self._coefs = set(), {}
        self._norm_sq, self.clip_coef = 0.0, None

    # ------------------------------------------------------------------ setup
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

    @sgd.setter
    def sgd(self, settings: SGDSettings) -> None:
        self.rule = settings

    def set_sgd(self, **settings) -> None:
        """Use fused SGD with these hyperparameters (``lr``, ``momentum``, ...).

        Arguments
        ---------
        **settings
            Fields of :class:`~speechbrain_omc.engine.rules.SGDSettings`.
        """
        if not isinstance(self.rule, SGDSettings):
            self.rule = SGDSettings()
        for key, value in settings.items():
            if not hasattr(self.rule, key):
                raise TypeError(f"set_sgd: unknown SGD setting {key!r}")
            setattr(self.rule, key, value)

    def set_rule(self, settings: SGDSettings | AdamSettings) -> None:
        """Use this fused rule (what a Brain reads from its optimizer).

        Arguments
        ---------
        settings : SGDSettings or AdamSettings
        """
        if type(settings) is not type(self.rule) and any(
            s.optimizer for s in self.state.values()
        ):
            raise ValueError(
                f"the fused rule changed from {type(self.rule).__name__} to "
                f"{type(settings).__name__} with optimizer state present; call "
                "reset_state() first"
            )
        self.rule = settings

    def parameters(self) -> dict[str, CompressedParameter]:
        """The compressed parameters by name (a tied one under its first name).

        Returns
        -------
        dict
        """
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
        """Codes of every compressed parameter by name (``slot.codes``).

        Returns
        -------
        dict
        """
        return {name: param.slot for name, param in self._bound().items()}

    def _bound(self) -> dict[str, CompressedParameter]:
        """The compressed parameters, each wired to this engine.

        A move to another device gives a parameter new codes (a new slot):
        they get the engine's decoder and writer, and fused mode its hook.
        """
        params = self.parameters()
        for param in params.values():
            slot = param.slot
            if slot.decode is None:
                slot.decode, slot.write = self._decode, self._write
            # A new parameter object (after a device move) has no mark yet.
            if self.mode == "fused" and param.engine is not self:
                param.attach(self)
        return params

    # ------------------------------------------------------ decode and write
    def _take(
        self, numel: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        return self.workspace.take(numel, device, dtype)

    def _decode(self, slot: Slot) -> torch.Tensor:
        codes = slot.codes
        buffer = self.workspace.take(codes.numel(), codes.device)
        out = codes.decompress(out=buffer)
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

    def _rounding_key(self, name: str, stream: str = "") -> int:
        """Key of the stochastic rounding of one parameter's one step."""
        steps = self.state[name].steps
        return round_seed(self.config.seed, steps, name + stream)

    def _write(
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

    # ---------------------------------------------------------------- updates
    @property
    def holds_gradients(self) -> bool:
        """Whether backward holds compressed gradients for global clipping.

        True in fused mode with ``fused_clipping="deferred"`` and a finite
        :attr:`max_grad_norm`.
        """
        limit = self.max_grad_norm
        return (
            self.mode == "fused"
            and self.config.fused_clipping == "deferred"
            and limit is not None
            and limit < float("inf")
        )

    def _held_dtype(self, slot: Slot) -> torch.dtype:
        """Storage type of a held gradient (``OMCConfig.held_grad_format``)."""
        # Lossless weights keep float32's arithmetic: a float32 copy.
        itemsize = self._held_itemsize(slot.codes.format.lossless)
        return torch.float32 if itemsize == 4 else torch.bfloat16

    def _on_grad(self, param: CompressedParameter) -> None:
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
            slot = param.slot
            grad, param.grad = param.grad, None
            self.held.hold(slot.name, grad.float(), self._held_dtype(slot))
            return
        self._fused_update(param)

    def clip_grad_norm_(
        self, parameters: Iterable[torch.nn.Parameter], max_norm: float
    ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` that also covers held gradients.

        Float32 gradients are scaled in place; held ones are scaled by the
        same coefficient when :meth:`step` applies them. With deferred
        clipping this is the whole step's global clipping, as SpeechBrain's
        ``max_grad_norm`` does it.

        Arguments
        ---------
        parameters : iterable of torch.nn.Parameter
            Parameters clipped together (compressed ones included).
        max_norm : float
            Largest norm after clipping.

        Returns
        -------
        torch.Tensor
            The total norm before clipping.
        """
        parameters = list(parameters)
        names = self._held_names()
        total, coef = clip_grad_norm_(parameters, max_norm, self.held, names)
        if coef is not None:
            for param in parameters:
                name = names.get(id(param))
                if name is not None:
                    self._coefs[name] = coef
        return total

    def _held_names(self) -> dict[int, str]:
        """``id(parameter) -> name`` of the parameters whose gradient is held."""
        return {
            id(owner._parameters[attr]): name
            for name, (owner, attr) in self._holders.items()
            if name in self.held
        }

    def _fused_update(
        self, param: CompressedParameter, grad: torch.Tensor | None = None
    ) -> None:
        if grad is None:
            grad, param.grad = param.grad, None
        self._deferred.discard(param.slot.name)
        if grad is None:
            return
        slot = param.slot
        state = self.state[slot.name]
        codes = slot.codes
        grad = self._clipped(grad.to(codes.device, torch.float32))

        def scratch() -> torch.Tensor:
            buffer = self.workspace.take(codes.numel(), codes.device)
            return buffer.view(codes.shape)

        def keys(buffer: str) -> int:
            return self._rounding_key(slot.name, "/" + buffer)

        state.optimizer = self._on_device(state.optimizer, codes.device)
        value = scratch()
        result = fused_step_(
            value, codes, grad, state.optimizer, self.rule, self.storage, scratch, keys
        )
        del grad
        if result.nonfinite_grad:
            return self._skip(slot.name, result.nonfinite_grad)
        with slot.lock:
            self._write(slot, value, result.minmax)
        # As an in-place op would: a graph that saved the old value refuses
        # a second backward instead of using the new one.
        torch.autograd.graph.increment_version(param)

    def _clipped(self, grad: torch.Tensor) -> torch.Tensor:
        """Fused mode's share of gradient clipping (``fused_clipping``).

        Compressed parameters are clipped here, by the rule chosen; float32
        parameters by the Brain's optimizer step, as SpeechBrain does.
        Deferred clipping scaled the gradient already (:meth:`clip_grad_norm_`).
        """
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

    @staticmethod
    def _on_device(state: dict, device: torch.device) -> dict:
        return {
            k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v
            for k, v in state.items()
        }

    @contextmanager
    def measuring(self):
        """Two-pass clipping's first pass: backward measures, nothing updates.

        Inside the block, the gradients of compressed parameters add their
        squared norms to :attr:`gradient_norm_sq` and are dropped.

        Yields
        ------
        None
        """
        self._measuring, self._norm_sq = True, 0.0
        try:
            yield
        finally:
            self._measuring = False

    @property
    def gradient_norm_sq(self) -> float:
        """Squared norm of the compressed parameters' gradients this step."""
        return self._norm_sq

    def step(self) -> None:
        """Finish a training step.

        Fused mode: apply the updates that backward did not (gradients under
        DDP, parameters moved to a new device since the last step, gradients
        held for deferred clipping); call it before the optimizer's step,
        which then finds no gradient on the compressed parameters. Held
        gradients take the coefficient of :meth:`clip_grad_norm_`; without
        that call they are clipped by their own global norm. Simple mode:
        nothing, the optimizer updates the parameters.
        """
        params = self._bound()
        if self.mode == "fused":
            for param in params.values():
                if param.grad is not None:
                    self._fused_update(param)
            if len(self.held):
                if not self._coefs and self.holds_gradients:
                    # No clip_grad_norm_ call: the held ones are clipped alone.
                    self.clip_grad_norm_(params.values(), self.max_grad_norm)
                for name, param in params.items():
                    if name in self.held:
                        grad = self.held.release(name, self._coefs.get(name))
                        self._fused_update(param, grad)
        # previous_norm clipping: this step's norm scales the next step.
        self._previous_norm = self._norm_sq**0.5 if self._norm_sq else None
        self._norm_sq, self.clip_coef = 0.0, None
        self._coefs.clear()
        self.workspace.trim()

    def zero_grad(self) -> None:
        """Drop the gradients of the compressed parameters."""
        for param in self.parameters().values():
            param.grad = None
        self._deferred.clear()
        self.held.clear()
        self._coefs.clear()

    def reset_state(self, seed: int | None = None) -> None:
        """Restart the update state (step counts, momentum), as a new run.

        Arguments
        ---------
        seed : int, optional
            New seed of stochastic rounding (a federated round's).
        """
        if seed is not None:
            self.config = replace(self.config, seed=seed)
        self.skipped_updates = 0
        for state in self.state.values():
            state.steps, state.optimizer = 0, {}
        self._previous_norm, self._norm_sq, self.clip_coef = None, 0.0, None
        self.zero_grad()

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
        """Replace a compressed parameter by a payload or a float tensor.

        Arguments
        ---------
        name : str
            Qualified parameter name.
        value : torch.Tensor or bytes
            A ``CompressedTensor.to_bytes()`` payload (bytes or a 1-D
            ``uint8`` tensor), or float values that are compressed in the
            parameter's format.
        checkpoint : bool
            A payload from a checkpoint must match the plan's format and
            transform (see ``OMCConfig.on_plan_change``); federated messages
            carry their own plan.
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

        Returns
        -------
        dict
        """
        state = self.module.state_dict()
        for name, slot in self.slots.items():
            value = slot.codes.decompress()
            for alias in self.aliases.get(name, (name,)):
                state[alias] = value
        return state

    def optimizer_state_dict(self) -> dict:
        """Fused-mode update state: the rule, write counts, optimizer state.

        Block-wise compressed buffers travel as their ``to_bytes()`` payload.

        Returns
        -------
        dict
        """
        slots = {}
        for name, state in self.state.items():
            buffers = {
                key: torch.frombuffer(bytearray(value.to_bytes()), dtype=torch.uint8)
                if isinstance(value, (BlockwiseTensor, CompressedTensor))
                else value
                for key, value in state.optimizer.items()
            }
            kinds = {
                key: type(value).__name__
                for key, value in state.optimizer.items()
                if isinstance(value, (BlockwiseTensor, CompressedTensor))
            }
            slots[name] = {"steps": state.steps, "state": buffers, "kinds": kinds}
        rule = {"kind": type(self.rule).__name__, **vars(self.rule)}
        return {"rule": rule, "slots": slots, "previous_norm": self._previous_norm}

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`optimizer_state_dict`.

        Arguments
        ---------
        state : dict
        """
        rule = dict(state["rule"])
        kind = rule.pop("kind")
        settings = {"SGDSettings": SGDSettings, "AdamSettings": AdamSettings}[kind]
        if "betas" in rule:
            rule["betas"] = tuple(rule["betas"])
        self.rule = settings(**rule)
        self._previous_norm = state.get("previous_norm")
        decoders = {
            "BlockwiseTensor": BlockwiseTensor.from_bytes,
            "CompressedTensor": CompressedTensor.from_bytes,
        }
        for name, entry in state["slots"].items():
            target = self.state[name]
            target.steps = int(entry["steps"])
            kinds = entry.get("kinds", {})
            target.optimizer = {
                key: decoders[kinds[key]](value.numpy().tobytes())
                if key in kinds
                else value
                for key, value in entry["state"].items()
            }

    # -------------------------------------------------------------- accounting
    def parameter_bytes(self) -> int:
        """Exact bytes of the module's parameters: compressed plus float32.

        Returns
        -------
        int
        """
        total = 0
        for param in self.module.parameters():
            if isinstance(param, CompressedParameter):
                total += param.slot.codes.nbytes
            else:
                total += param.numel() * param.element_size()
        return total

    def memory_report(self) -> dict[str, dict[str, int]]:
        """Bytes of the training state, float32 against OMC, for this rule.

        Parameters are counted from storage; the optimizer state of
        compressed parameters from storage once it exists, else predicted
        from ``state_format``; gradients as they persist between backward and
        the optimizer step (fused mode frees the compressed ones).

        Returns
        -------
        dict
            ``{"float32": {...}, "omc": {...}}`` with ``parameters``,
            ``gradients``, ``optimizer_state`` and ``total``.
        """
        if isinstance(self.rule, AdamSettings):
            rule = "adam"
        else:
            rule = "sgd_momentum" if self.rule.momentum else "sgd"
        report = training_state_bytes(
            self.plan,
            rule,
            self.mode,
            self.config.state_format,
            self.config.state_block,
        )
        omc = report["omc"]
        omc["parameters"] = self.parameter_bytes()
        stored = [s.optimizer for s in self.state.values() if s.optimizer]
        if stored and self.mode == "fused":
            predicted = training_state_bytes(
                self.plan, rule, self.mode, None, self.config.state_block
            )["omc"]["optimizer_state"]
            compressed_float32 = sum(
                4 * e.numel * (2 if rule == "adam" else int(rule != "sgd"))
                for e in self.plan.compressed
            )
            measured = sum(
                self.storage.nbytes(v)
                for state in stored
                for k, v in state.items()
                if k != "step"
            )
            omc["optimizer_state"] = predicted - compressed_float32 + measured
        if self.holds_gradients:  # held from backward to the step
            omc["gradients"] += sum(
                e.numel * self._held_itemsize(get_format(e.format).lossless)
                for e in self.plan.compressed
            )
        omc["total"] = omc["parameters"] + omc["gradients"] + omc["optimizer_state"]
        return report

    def _held_itemsize(self, lossless: bool) -> int:
        """Bytes per held gradient value (of lossless weights, or not)."""
        choice = self.config.held_grad_format
        if choice == "auto":
            return 4 if lossless else 2
        return 4 if choice == "fp32" else 2

    def memory_table(self) -> str:
        """:meth:`memory_report` as a table.

        Returns
        -------
        str
        """
        return format_training_state(self.memory_report())

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
        self.state.clear()
        self._holders.clear()
        self.module.__dict__.pop("_omc_handle", None)


def handle_of(module: torch.nn.Module) -> OMCHandle | None:
    """The handle of a module under OMC, ``None`` for any other module.

    The module is the one given to :func:`compress_module`, or a copy of it
    (``copy.deepcopy``, ``torch.save`` and ``torch.load``), which has a
    handle of its own.

    Arguments
    ---------
    module : torch.nn.Module
        The module that was put under OMC.

    Returns
    -------
    OMCHandle or None

    Example
    -------
    >>> import copy
    >>> model = torch.nn.Linear(4, 4)
    >>> handle = compress_module(model, OMCConfig(format="e3m7"))
    >>> handle_of(model) is handle
    True
    >>> twin = copy.deepcopy(model)
    >>> handle_of(twin) not in (None, handle), handle_of(twin).module is twin
    (True, True)
    """
    return module.__dict__.get("_omc_handle")


def _payload(value) -> CompressedTensor | None:
    """The compressed tensor a state-dict entry holds, if it is a payload."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        return None
    if value.dim() != 1 or value.numel() < 4:
        return None
    if bytes(value[:4].tolist()) != b"OMCT":
        return None
    return CompressedTensor.from_bytes(value.cpu().numpy().tobytes())


def _distributed() -> bool:
    """Whether gradients are all-reduced after backward (DDP)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _averaged_payload_hint(value, slot: Slot) -> str:
    """Why a 1-D float tensor as long as a payload is offered: a hint.

    SpeechBrain's checkpoint averaging adds payload bytes as numbers and
    divides; what arrives here is then a float tensor of the payload's length.
    """
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
        Any module (SpeechBrain lobes, ``nn.LSTM``, ``nn.MultiheadAttention``,
        convolutions, embeddings, ...); classes are not edited.
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
    >>> type(model[0].weight).__name__, [n for n, _ in model.named_parameters()]
    ('CompressedParameter', ['0.weight', '0.bias'])
    >>> handle.parameter_bytes()  # ceil(256 * 11 / 8) + 4 scale bytes + 64 bias
    420
    >>> model(torch.randn(2, 16)).shape
    torch.Size([2, 16])
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
        param = params.pop(entry.name)  # the last reference: freed below
        if not param.is_floating_point():
            raise TypeError(f"{entry.name} is {param.dtype}; OMC compresses floats")
        value = param.detach().float()
        nbytes = packed_nbytes(value.numel(), get_format(entry.format).bits)
        codes = CompressedTensor.compress(
            value,
            entry.format,
            transform=config.transform,
            rounding=config.rounding,
            clip=config.clip,
            out=mapped_empty(nbytes) if value.device.type == "cpu" else None,
        )
        del value
        slot = Slot(entry.name, codes, decode=handle._decode, write=handle._write)
        compressed = CompressedParameter.wrap(slot, requires_grad=param.requires_grad)
        holders = owners[id(param)]
        for _, owner, attr in holders:
            owner._parameters[attr] = compressed
        handle.state[entry.name] = UpdateState()
        handle.aliases[entry.name] = tuple(q for q, _, _ in holders)
        handle._holders[entry.name] = holders[0][1:]
        del param

    for owner in touched.values():
        if isinstance(owner, torch.nn.RNNBase):
            owner._init_flat_weights()  # the RNN's cached list of its weights
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
    handle._bound()  # fused mode: the in-backward update hooks
    module.__dict__["_omc_handle"] = handle
    # The float32 parameters just freed go back to the system at once.
    trim_heap()
    logger.info("OMC plan:\n%s", plan.table())
    return handle
