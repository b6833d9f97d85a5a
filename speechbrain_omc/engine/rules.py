"""Update rules of fused mode: SGD, Adam and AdamW, one parameter at a time.

Fused mode updates a compressed parameter inside backward, so it cannot call
an optimizer's ``step()``: :func:`fused_step_` applies the rule read from
that optimizer (:func:`settings_from_optimizer`), following its
single-tensor path operation by operation, so that fused and simple mode
agree. SGD runs in one native pass (:func:`sgd_step_`, torch fallback
:func:`sgd_update_`), and so does Adam (``kernels.adam_step``: the weight
decoded, the moments decoded and re-encoded, bit for bit with torch); its
torch fallback decodes weight and moments into scratch buffers and steps
them with ``torch.optim``'s functional Adam. Optimizer state is float32 or
block-wise low-bit (:class:`StateStorage`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch.optim.adam import adam as functional_adam

from speechbrain_omc.codec import kernels
from speechbrain_omc.codec.blockwise import BlockwiseTensor
from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.codec.formats import _finite_minmax, get_format, rounding_key
from speechbrain_omc.codec.packing import packed_nbytes

logger = logging.getLogger(__name__)

__all__ = [
    "AdamSettings",
    "SGDSettings",
    "StateStorage",
    "StepResult",
    "fused_step_",
    "native_adam_is_torchs",
    "settings_from_optimizer",
    "sgd_step_",
    "sgd_update_",
]


@dataclass
class SGDSettings:
    """Hyperparameters of the fused SGD update, as in ``torch.optim.SGD``
    (``lr`` is ``None`` until set).
    """

    lr: float | None = None
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> SGDSettings:
        """Read the first group of a plain ``torch.optim.SGD``.

        Example
        -------
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> SGDSettings.from_optimizer(opt).lr
        0.1
        >>> SGDSettings.from_optimizer(torch.optim.Adam([torch.zeros(1)]))
        Traceback (most recent call last):
        ...
        ValueError: SGDSettings reads torch.optim.SGD, got Adam
        """
        if type(optimizer) is not torch.optim.SGD:
            raise ValueError(
                f"SGDSettings reads torch.optim.SGD, got {type(optimizer).__name__}"
            )
        group = optimizer.param_groups[0]
        if group.get("maximize", False):
            raise ValueError("fused OMC updates do not support SGD(maximize=True)")
        _same_groups(
            optimizer, ("lr", "momentum", "dampening", "weight_decay", "nesterov")
        )
        return cls(
            lr=float(group["lr"]),
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
        )


def sgd_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    settings: SGDSettings,
) -> torch.Tensor | None:
    """Apply one SGD step to ``param`` in place; returns the momentum buffer to
    keep (``None`` without momentum).

    Example
    -------
    >>> p = torch.ones(2)
    >>> sgd_update_(p, torch.ones(2), None, SGDSettings(lr=0.5))
    >>> p
    tensor([0.5000, 0.5000])
    """
    if settings.lr is None:
        raise RuntimeError(
            "fused OMC update without a learning rate: call "
            "handle.follow(optimizer) or handle.set_sgd(lr=...) (OMCBrain "
            "does this from its optimizer)"
        )
    d_p = grad
    if settings.weight_decay != 0:
        d_p = d_p.add(param, alpha=settings.weight_decay)
    if settings.momentum != 0:
        if momentum_buffer is None:
            momentum_buffer = torch.clone(d_p).detach()
        else:
            momentum_buffer.mul_(settings.momentum).add_(
                d_p, alpha=1 - settings.dampening
            )
        if settings.nesterov:
            d_p = d_p.add(momentum_buffer, alpha=settings.momentum)
        else:
            d_p = momentum_buffer
    param.add_(d_p, alpha=-settings.lr)
    return momentum_buffer


@dataclass
class SGDResult:
    """What one fused SGD step did: ``nonfinite_grad`` values (then nothing was
    updated), the momentum buffer to keep, and the new ``minmax`` if measured.
    """

    nonfinite_grad: int
    momentum_buffer: torch.Tensor | None
    minmax: tuple[float, float] | None = None


def sgd_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    settings: SGDSettings,
    codes: CompressedTensor | None = None,
) -> SGDResult:
    """One checked SGD step on a scratch float32 value, in place.

    Arguments
    ---------
    param : torch.Tensor
        The value, updated in place (with ``codes``: decoded into first).
    grad : torch.Tensor
    momentum_buffer : torch.Tensor or None
        Untouched when the gradient is not finite.
    settings : SGDSettings
    codes : CompressedTensor, optional
        The compressed value to start from.

    Returns
    -------
    SGDResult

    Example
    -------
    >>> p = torch.ones(3)
    >>> result = sgd_step_(p, torch.tensor([1.0, 2.0, 3.0]), None, SGDSettings(lr=0.5))
    >>> p.tolist(), result.nonfinite_grad
    ([0.5, 0.0, -0.5], 0)
    >>> sgd_step_(p, torch.tensor([1.0, float("nan"), 0.0]), None,
    ...           SGDSettings(lr=0.5)).nonfinite_grad
    1
    """
    if settings.lr is None:
        raise RuntimeError(
            "fused OMC update without a learning rate: call "
            "handle.follow(optimizer) or handle.set_sgd(lr=...) (OMCBrain "
            "does this from its optimizer)"
        )
    grad = grad.reshape(param.shape)
    use_momentum = settings.momentum != 0
    first = use_momentum and momentum_buffer is None
    buffer = torch.empty_like(param) if first else momentum_buffer
    scratch = [param, grad.contiguous(), buffer] if use_momentum else [param, grad]
    if codes is not None:
        scratch.append(codes.packed)
    if param.dtype == grad.dtype == torch.float32 and kernels.native_for(*scratch):
        bad, lo, hi, overflowed = kernels.sgd_step(
            param,
            scratch[1],
            buffer if use_momentum else None,
            settings.lr,
            settings.momentum,
            settings.dampening,
            settings.weight_decay,
            settings.nesterov,
            first,
            **_native_decode(codes),
        )
        if bad:
            return SGDResult(bad, momentum_buffer)
        # An update that overflowed leaves the range unmeasured, so that
        # re-compression finds the non-finite values and says so.
        minmax = None if overflowed else (lo, hi)
        return SGDResult(0, buffer if use_momentum else None, minmax)
    finite = torch.isfinite(grad)
    if not bool(finite.all()):
        return SGDResult(int((~finite).sum()), momentum_buffer)
    if codes is not None:
        codes.decompress(out=param)
    buffer = sgd_update_(param, grad, momentum_buffer, settings)
    return SGDResult(0, buffer)


def _native_decode(codes: CompressedTensor | None) -> dict:
    """The sgd kernel's arguments that decode ``codes`` first (none: no codes)."""
    if codes is None:
        return {}
    factors, add = codes.transform.decode_plan
    fmt = codes.format.spec
    return dict(codes=codes.packed, fmt=fmt, multipliers=factors, shift=add)


def _same_groups(optimizer: torch.optim.Optimizer, keys: tuple[str, ...]) -> None:
    group = optimizer.param_groups[0]
    for other in optimizer.param_groups[1:]:
        differ = [k for k in keys if other[k] != group[k]]
        if differ:
            raise ValueError(
                "fused OMC updates apply one setting to every compressed "
                f"parameter, but the optimizer's param groups differ in {differ} "
                "(SpeechBrain's remove_vector_weight_decay does this); use one "
                "group or update_mode='simple'"
            )


@dataclass
class AdamSettings:
    """Hyperparameters of the fused Adam/AdamW update, as in ``torch.optim``
    (``decoupled``: AdamW's weight decay).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> AdamSettings:
        """Read the first group of a ``torch.optim.Adam`` or ``AdamW``.

        Example
        -------
        >>> opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.01)
        >>> settings = AdamSettings.from_optimizer(opt)
        >>> settings.lr, settings.weight_decay, settings.decoupled
        (0.01, 0.01, True)
        """
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            name = type(optimizer).__name__
            raise ValueError(f"AdamSettings reads torch.optim.Adam(W), got {name}")
        group = optimizer.param_groups[0]
        for flag in ("amsgrad", "maximize"):
            if group.get(flag, False):
                raise ValueError(f"fused OMC updates do not support {flag}=True")
        _same_groups(optimizer, ("lr", "betas", "eps", "weight_decay"))
        decoupled = type(optimizer) is torch.optim.AdamW or bool(
            group.get("decoupled_weight_decay", False)
        )
        beta1, beta2 = (float(b) for b in group["betas"])
        return cls(
            lr=float(group["lr"]),
            betas=(beta1, beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled=decoupled,
        )


def settings_from_optimizer(
    optimizer: torch.optim.Optimizer,
) -> SGDSettings | AdamSettings:
    """The fused rule's settings from a recipe's ``SGD``, ``Adam`` or ``AdamW``
    (any other is an error: simple mode runs any optimizer).

    Example
    -------
    >>> p = [torch.zeros(1, requires_grad=True)]
    >>> type(settings_from_optimizer(torch.optim.Adam(p))).__name__
    'AdamSettings'
    """
    if type(optimizer) is torch.optim.SGD:
        return SGDSettings.from_optimizer(optimizer)
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return AdamSettings.from_optimizer(optimizer)
    raise ValueError(
        "fused OMC updates implement SGD, Adam and AdamW, got "
        f"{type(optimizer).__name__}; use update_mode='simple' for other optimizers"
    )


@dataclass(frozen=True)
class StateStorage:
    """How optimizer state is stored between steps: ``formats`` names the
    low-bit buffers (``"momentum_buffer"``, ``"exp_avg"``, ``"exp_avg_sq"``;
    the others stay float32), with one scale per ``block`` values, Adam's second
    moment as its square root if asked, encoded with ``rounding``.
    """

    formats: Mapping[str, str] = field(default_factory=dict)
    block: int = 256
    sqrt_second_moment: bool = True
    rounding: str = "nearest"

    def compressed(self, name: str) -> bool:
        """Whether buffer ``name`` is kept in a low-bit format."""
        return self.formats.get(name) is not None

    def store(
        self,
        name: str,
        value: torch.Tensor,
        keys: Callable[[str], int] | None = None,
    ):
        """The buffer to keep: ``value`` itself, or its block-wise codes.

        ``keys(name)`` gives the stochastic rounding key; it is asked only
        when the buffer is compressed with stochastic rounding (deriving a
        key is a hash, paid at every step otherwise).
        """
        fmt = self.formats.get(name)
        if fmt is None:
            return value
        stochastic = self.rounding == "stochastic" and keys is not None
        return BlockwiseTensor.compress(
            value,
            fmt,
            block=self.block,
            sqrt=self.sqrt_second_moment and name == "exp_avg_sq",
            rounding=self.rounding,
            generator=keys(name) if stochastic else None,
        )

    @staticmethod
    def nbytes(buffer) -> int:
        """Exact bytes of a stored buffer."""
        if buffer is None:
            return 0
        if isinstance(buffer, BlockwiseTensor):
            return buffer.nbytes
        return buffer.numel() * buffer.element_size()


def _load(buffer, out: torch.Tensor) -> torch.Tensor:
    """A stored buffer's float32 values, decoded into ``out`` when compressed."""
    if isinstance(buffer, BlockwiseTensor):
        return buffer.decompress(out=out)
    if isinstance(buffer, CompressedTensor):  # older checkpoints' momentum
        return buffer.decompress(out=out)
    return buffer


@dataclass
class StepResult:
    """What one fused step did.

    Arguments
    ---------
    nonfinite_grad : int
        Non-finite gradient values; when not zero nothing was updated.
    minmax : tuple of float, optional
        ``(min, max)`` of the updated weight, when measured.
    """

    nonfinite_grad: int
    minmax: tuple[float, float] | None = None


def fused_step_(
    value: torch.Tensor,
    codes: CompressedTensor,
    grad: torch.Tensor,
    state: dict,
    settings: SGDSettings | AdamSettings,
    storage: StateStorage,
    scratch: Callable[[], torch.Tensor],
    keys: Callable[[str], int],
) -> StepResult:
    """One fused update: the weight is decoded from ``codes`` into float32
    scratch ``value`` and updated there by ``settings``' rule; ``state`` (the
    optimizer state, kept as ``storage`` says) changes only for a finite
    ``grad``. ``scratch()`` gives more buffers of the weight's shape,
    ``keys(buffer)`` a buffer's stochastic rounding key. Returns a
    :class:`StepResult`.
    """
    if isinstance(settings, AdamSettings):
        return _adam_step_(value, codes, grad, state, settings, storage, scratch, keys)
    momentum = state.get("momentum_buffer")
    if momentum is not None and not isinstance(momentum, torch.Tensor):
        # Kept float32 from now on: memory of its own, not a scratch buffer.
        compressed = storage.compressed("momentum_buffer")
        momentum = _load(momentum, scratch() if compressed else torch.empty_like(value))
    result = sgd_step_(value, grad, momentum, settings, codes=codes)
    if result.nonfinite_grad:
        return StepResult(result.nonfinite_grad)
    if result.momentum_buffer is not None:
        state["momentum_buffer"] = storage.store(
            "momentum_buffer", result.momentum_buffer, keys
        )
    return StepResult(0, result.minmax)


#: Values per slice of a fused Adam step (a multiple of ATen's parallel
#: grain, 32768, so that vectorised and scalar tails fall where they would).
ADAM_CHUNK = 1 << 16


def _adam_step_(value, codes, grad, state, settings, storage, scratch, keys):
    sources = _native_sources(value, codes, grad, state, storage)
    if sources is not None:
        return _native_adam_step_(
            value, codes, grad, state, settings, storage, keys, sources
        )
    return _torch_adam_step_(
        value, codes, grad, state, settings, storage, scratch, keys
    )


def _torch_adam_step_(value, codes, grad, state, settings, storage, scratch, keys):
    """:func:`_adam_step_` by ``torch.optim``'s functional Adam, in slices."""
    if kernels.native_for(grad):
        bad = kernels.minmax(grad)[2]
    else:
        finite = torch.isfinite(grad)
        bad = int((~finite).sum())
    if bad:
        return StepResult(bad)  # nothing decoded, nothing written
    codes.decompress(out=value.view(-1))
    moments = {}
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            # Codes kept float32 from now on (a checkpoint of another state
            # format) decode into memory of their own, never a scratch buffer.
            out = scratch() if storage.compressed(name) else torch.empty_like(value)
            moments[name] = _load(state[name], out)
        elif storage.compressed(name):  # decoded each step: a scratch buffer
            moments[name] = scratch().zero_()
        else:  # kept float32 between steps: its own memory
            moments[name] = torch.zeros_like(value)
    exp_avg, exp_avg_sq = moments["exp_avg"], moments["exp_avg_sq"]
    step = state.get("step", 0)
    # torch.optim's own single-tensor Adam: the same operations, the same
    # bits. Its temporaries (the denominator) are as large as the slice it
    # steps: slices of ADAM_CHUNK values keep them small, so they do not
    # grow the heap the way weight-sized blocks freed in backward would.
    # Every operation is elementwise, so slicing changes no value.
    flat = [t.view(-1) for t in (value, grad, exp_avg, exp_avg_sq)]
    for start in range(0, value.numel(), ADAM_CHUNK):
        parts = [t[start : start + ADAM_CHUNK] for t in flat]
        _torch_adam_(*parts, step, settings)
    state["exp_avg"] = storage.store("exp_avg", exp_avg, keys)
    state["exp_avg_sq"] = storage.store("exp_avg_sq", exp_avg_sq, keys)
    state["step"] = step + 1
    try:
        return StepResult(0, _finite_minmax(value))
    except ValueError:
        return StepResult(0)  # an overflow: the caller's encoding says so


def _torch_adam_(param, grad, exp_avg, exp_avg_sq, steps_done: int, settings):
    """``torch.optim``'s own single-tensor Adam step on these tensors, in place
    (``steps_done`` steps before this one)."""
    beta1, beta2 = settings.betas
    functional_adam(
        [param],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [torch.tensor(float(steps_done))],
        foreach=False,
        decoupled_weight_decay=settings.decoupled,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        eps=settings.eps,
        maximize=False,
    )


def _native_sources(value, codes, grad, state, storage) -> dict | None:
    """Each moment's source for ``kernels.adam_step`` (a float32 tensor, block
    codes, ``None`` for zeros), or ``None`` where the kernel cannot step this
    parameter: tensors it cannot read, a block size other than the storage's,
    no bit-exact ``torch.sqrt`` at hand."""
    if value.dtype != torch.float32 or grad.dtype != torch.float32:
        return None
    if not kernels.native_for(value, grad, codes.packed):
        return None
    if not kernels.torch_sqrt()[1] or not native_adam_is_torchs():
        return None
    sources = {}
    for name in ("exp_avg", "exp_avg_sq"):
        old = state.get(name)
        if old is None:
            sources[name] = None
        elif (
            isinstance(old, BlockwiseTensor)
            and old.block == storage.block
            and old.shape.numel() == value.numel()
        ):
            if not kernels.native_for(old.packed, old.scales):
                return None
            sources[name] = (old.packed, old.scales, old.format.spec, old.sqrt)
        elif (
            isinstance(old, torch.Tensor)
            and old.dtype == torch.float32
            and old.shape.numel() == value.numel()
            and kernels.native_for(old)
        ):
            sources[name] = old
        else:  # e.g. a checkpoint's state in another block size: torch decodes it
            return None
    return sources


@functools.cache
def native_adam_is_torchs() -> bool:
    """Whether the native Adam kernel gives this torch build's Adam bits.

    The kernel repeats the operations of ``torch.optim``'s single-tensor
    Adam (lerp, addcmul, addcdiv as ATen computes them on this CPU); another
    build could compute one of them otherwise. Checked once, on three steps
    of Adam, Adam with weight decay (and a first beta that takes lerp's other
    formula) and AdamW; where the bits differ, fused Adam runs torch's own.

    Example
    -------
    >>> isinstance(native_adam_is_torchs(), bool)
    True
    """
    if not kernels.available():
        return False
    try:
        same = _adam_probe()
    except (RuntimeError, TypeError, ValueError) as error:
        same, reason = False, f"the probe failed ({error})"
    else:
        reason = "it does not give this torch build's Adam bits"
    if not same:
        logger.warning(
            "OMC: native Adam kernel not used: %s; fused Adam runs "
            "torch.optim's single-tensor Adam",
            reason,
        )
    return same


def _adam_probe() -> bool:
    """Three steps of each probed setting, kernel against torch."""
    generator = torch.Generator().manual_seed(0)
    n = 4099  # vectorised body and scalar tail

    def floats(scale: float = 1.0) -> torch.Tensor:  # whatever the default dtype
        return torch.randn(n, generator=generator, dtype=torch.float32) * scale

    cases = (  # lerp's two branches (first beta 0.9 and 0.3), Adam and AdamW
        AdamSettings(),
        AdamSettings(betas=(0.3, 0.99), weight_decay=0.01),
        AdamSettings(weight_decay=0.01, decoupled=True),
    )
    for case in cases:
        ours = floats()
        theirs = ours.clone()
        m, v, m_torch, v_torch = torch.zeros(4, n, dtype=torch.float32).unbind()
        for step in (1, 2, 3):
            grad = floats(10.0 ** (step - 3))
            kernels.adam_step(
                ours, grad, (m, m, None), (v, v, None), step, case.lr, case.betas,
                case.eps, case.weight_decay, case.decoupled,
            )  # fmt: skip
            _torch_adam_(theirs, grad, m_torch, v_torch, step - 1, case)
        pairs = ((ours, theirs), (m, m_torch), (v, v_torch))
        if not all(
            torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in pairs
        ):
            return False
    return True


def _native_adam_step_(value, codes, grad, state, settings, storage, keys, sources):
    """:func:`_adam_step_` in one native pass: the weight decoded into
    ``value`` and stepped, the moments read from ``sources`` and kept as
    ``storage`` says (float32 ones in place), bit for bit the torch path's."""
    n, block = value.numel(), storage.block
    moments, formats = {}, {}
    for name, source in sources.items():
        if storage.compressed(name):  # new codes, as StateStorage.store makes
            fmt = formats[name] = get_format(storage.formats[name])
            # As BlockwiseTensor.compress: no square roots in a lossless format.
            sqrt = storage.sqrt_second_moment and name == "exp_avg_sq"
            target = (
                torch.empty(packed_nbytes(n, fmt.bits), dtype=torch.uint8),
                torch.empty(-(-n // block), dtype=torch.float32),
                fmt.spec,
                sqrt and not fmt.lossless,
            )
            stochastic = storage.rounding == "stochastic"
            key = rounding_key(keys(name)) if stochastic else None
        else:  # float32 state: in place, or its own new memory
            fresh = not isinstance(source, torch.Tensor)
            target, key = torch.empty_like(value) if fresh else source, None
        moments[name] = (source, target, key)
    step = state.get("step", 0) + 1
    bad, lo, hi, overflowed = kernels.adam_step(
        value,
        grad,
        moments["exp_avg"],
        moments["exp_avg_sq"],
        step,
        settings.lr,
        settings.betas,
        settings.eps,
        settings.weight_decay,
        settings.decoupled,
        block=block,
        **_native_decode(codes),
    )
    if bad:
        return StepResult(bad)  # float32 state untouched, new codes dropped
    for name, (_, target, _) in moments.items():
        if name in formats:
            packed, scales, _, sqrt = target
            target = BlockwiseTensor(
                packed, scales, formats[name], value.shape, block, sqrt
            )
        state[name] = target
    state["step"] = step
    # An update that overflowed leaves the range unmeasured: the caller's
    # encoding finds the non-finite values and says so.
    return StepResult(0, None if overflowed else (lo + 0.0, hi + 0.0))
