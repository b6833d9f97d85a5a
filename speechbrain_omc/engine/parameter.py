"""A compressed parameter that stays an ``nn.Parameter``.

:class:`CompressedParameter` is a tensor subclass whose only storage is the
packed codes of its :class:`Slot`; it sits in ``parameters()`` and
``state_dict()`` like any parameter and every op decodes it on the fly
(``__torch_dispatch__``): view ops return another ``CompressedParameter`` on
the same codes (so autograd saves the compressed tensor), in-place ops
decode, apply and encode, casts decode to their dtype, other ops return
plain tensors. ``F.linear``, ``F.conv1d`` and ``F.conv2d`` of a whole weight
skip per-op dispatch: one autograd function decodes it once in forward and
once in backward. The engine (:mod:`speechbrain_omc.engine.handle`) consumes
the gradients.

Example
-------
>>> import torch
>>> from speechbrain_omc.codec.compressed import CompressedTensor
>>> slot = Slot("w", CompressedTensor.compress(torch.ones(3, 4), "e3m7"))
>>> w = CompressedParameter.wrap(slot)
>>> isinstance(w, torch.nn.Parameter), w.shape, w.dtype
(True, torch.Size([3, 4]), torch.float32)
>>> (torch.ones(2, 3) @ w).tolist()
[[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]]
>>> w.t().shape, type(w.t()).__name__  # a view: still compressed
(torch.Size([4, 3]), 'CompressedParameter')
"""

from __future__ import annotations

import copy
import operator
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.autograd import forward_ad as _forward_ad
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_map

from speechbrain_omc.codec.compressed import CompressedTensor

__all__ = ["CompressedParameter", "Slot"]

aten = torch.ops.aten
_SET_DATA = torch._C.TensorBase.data.__set__

# Ops that only change how the same values are looked at.
_VIEWS = {
    aten.alias.default,
    aten.as_strided.default,
    aten.detach.default,
    aten.diagonal.default,
    aten.expand.default,
    aten.narrow.default,
    aten.permute.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.t.default,
    aten.transpose.int,
    aten.unbind.int,
    aten.unfold.default,
    aten.unsqueeze.default,
    aten.view.default,
    aten._unsafe_view.default,
}
# Ops that make a new tensor of the same geometry without reading values.
_LIKE = {
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
}


@dataclass(eq=False)
class Slot:
    """The codes of one compressed parameter and what reads and writes them.

    Arguments
    ---------
    name : str
        Qualified parameter name.
    codes : CompressedTensor
    decode : callable, optional
        ``decode(slot) -> float32 tensor``; ``codes.decompress()`` if omitted.
    write : callable, optional
        ``write(slot, value)`` encodes a new value; a nearest refit if omitted.
    """

    name: str
    codes: CompressedTensor
    decode: Callable[[Slot], torch.Tensor] | None = None
    write: Callable[[Slot, torch.Tensor], None] | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def value(self) -> torch.Tensor:
        """The decoded float32 value (a fresh or workspace tensor)."""
        if self.decode is not None:
            return self.decode(self)
        return self.codes.decompress()

    def assign(self, value: torch.Tensor) -> None:
        """Encode a new float32 value of the full shape."""
        if self.write is not None:
            self.write(self, value)
        else:
            self.codes.assign_(value)

    # A copy (deepcopy, pickle) gets its own lock and its codes in pages of
    # their own; decode and write follow their owner (a copied engine).
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.codes = self.codes.in_own_pages()
        self.lock = threading.RLock()


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _eager_only(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)`` without its wrapper's cost per call.

    Where the installed torch lets us, dynamo is told to skip ``fn``'s code
    and everything it calls, and to break graphs at it; elsewhere the
    documented decorator does the same with a wrapper (a few microseconds a
    call, on every operation that touches a compressed parameter).
    """
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy

        skip = FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP)
        set_code_exec_strategy(fn.__code__, skip)
    except Exception:  # another torch's internals: the documented, slower way
        return torch.compiler.disable(fn)
    fn._torchdynamo_disable = True  # tracing breaks the graph here
    return fn


class CompressedParameter(torch.Tensor):
    """A parameter held as codes; see the module documentation.

    Build one with :meth:`wrap`; views and casts are made by operations.
    ``_make_wrapper_subclass`` gives it a shape, strides, an offset into the
    slot's values and a dtype, but no storage.
    """

    _slot: Slot

    @staticmethod
    def __new__(
        cls,
        slot: Slot,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        offset: int = 0,
        dtype: torch.dtype = torch.float32,
        requires_grad: bool = False,
    ):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            size,
            strides=stride,
            storage_offset=offset,
            dtype=dtype,
            device=slot.codes.device,
            requires_grad=requires_grad,
        )

    def __init__(
        self, slot, size, stride, offset=0, dtype=torch.float32, requires_grad=False
    ):
        self._slot = slot
        self._note_geometry(size, stride, offset, dtype)

    def _note_geometry(self, size, stride, offset, dtype) -> None:
        # Plain attributes: reading shape or dtype of a subclass goes through
        # __torch_function__, too slow for checks made at every operation.
        shape = self._slot.codes.shape
        self._whole = (
            tuple(size) == tuple(shape)
            and tuple(stride) == _contiguous_strides(shape)
            and offset == 0
            and dtype == torch.float32
        )

    @classmethod
    def wrap(cls, slot: Slot, requires_grad: bool = True) -> CompressedParameter:
        """The ``nn.Parameter`` of a slot: its full shape, float32, a leaf."""
        shape = slot.codes.shape
        tensor = cls(slot, shape, _contiguous_strides(shape), 0, torch.float32)
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)

    # ------------------------------------------------------------ geometry
    def _like(self, size, stride, offset, dtype=None) -> CompressedParameter:
        return CompressedParameter(
            self._slot, tuple(size), tuple(stride), offset, dtype or self.dtype
        )

    def _skeleton(self) -> torch.Tensor:
        """A meta tensor with this view's geometry over the slot's values."""
        shape = self._slot.codes.shape
        base = torch.empty_strided(shape, _contiguous_strides(shape), device="meta")
        return base.as_strided(self.shape, self.stride(), self.storage_offset())

    def decoded(self) -> torch.Tensor:
        """The values this tensor shows, as a plain tensor.

        Returns
        -------
        torch.Tensor
            A view of the slot's decoded values (cast when this is a dtype
            view), valid until the next write.
        """
        if self._whole:
            return self._slot.value()
        full = self._slot.value().reshape(-1)
        out = full.as_strided(self.shape, self.stride(), self.storage_offset())
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    @property
    def slot(self) -> Slot:
        """Codes and writer shared by this tensor and its views."""
        return self._slot

    def __repr__(self) -> str:
        codes = self._slot.codes
        return (
            f"CompressedParameter({self._slot.name!r}, shape={tuple(self.shape)}, "
            f"dtype={self.dtype}, format={codes.format.name}, "
            f"transform={codes.transform.kind}, requires_grad={self.requires_grad})"
        )

    # ------------------------------------------------------------ .data
    @property
    def data(self) -> CompressedParameter:  # type: ignore[override]
        """A detached alias on the same codes; assigning encodes the value."""
        return self._like(self.shape, self.stride(), self.storage_offset())

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        if isinstance(value, CompressedParameter):
            # Module._apply after .to()/.half(): take on the moved or cast
            # tensor's codes and geometry; identity and hooks are kept.
            _SET_DATA(self, value)
            self._slot, self._whole = value._slot, value._whole
            return
        if tuple(value.shape) != tuple(self.shape):
            raise ValueError(
                f"OMC: cannot set {self._slot.name}.data to a tensor of shape "
                f"{tuple(value.shape)}; compressed parameters keep their shape "
                f"{tuple(self.shape)}"
            )
        with torch.no_grad():
            self.copy_(value)

    # ------------------------------------------------------------ engine
    @property
    def engine(self):
        """The engine whose ``_on_grad`` runs when the gradient is complete.

        ``None`` unless an engine in fused mode attached itself
        (:meth:`attach`).
        """
        return self.__dict__.get(_ENGINE)

    def attach(self, engine) -> None:
        """Call ``engine._on_grad(self)`` once each backward's gradient is complete.

        The hook and the engine are remembered on the parameter, so that a
        copy of it (``copy.deepcopy``, pickling) hooks the copy of the engine.

        Arguments
        ---------
        engine : object
            Has an ``_on_grad(param)`` method (the fused update).
        """
        self.detach_engine()
        # torch refuses hooks on a tensor that needs no gradient; a frozen
        # parameter keeps its hook for when it is trained again.
        requires_grad = self.requires_grad
        self.requires_grad_(True)
        hook = self.register_post_accumulate_grad_hook(engine._on_grad)
        self.requires_grad_(requires_grad)
        self.__dict__[_ENGINE], self.__dict__[_HOOK] = engine, hook

    def detach_engine(self) -> None:
        """Remove the hook of :meth:`attach`, if any."""
        hook = self.__dict__.pop(_HOOK, None)
        if hook is not None:
            hook.remove()
        self.__dict__.pop(_ENGINE, None)

    # -------------------------------------------------------- serialisation
    def __reduce_ex__(self, protocol):
        # Pickled (torch.save of a whole module) with its slot, whose decoder
        # and writer bring their engine, and with the engine of its fused
        # updates: the loaded parameter is wired to the loaded engine. The
        # engine reaches this parameter again through its module: pickle
        # then keeps the first rebuilt object (a recursive reduce).
        return (_rebuild, self._rebuild_args())

    def _rebuild_args(self) -> tuple:
        extra = {k: v for k, v in self.__dict__.items() if k not in _OWN}
        return (
            self._slot,
            tuple(self.shape),
            self.stride(),
            self.storage_offset(),
            self.dtype,
            self.requires_grad,
            extra,
            self.engine,
        )

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        slot, *geometry, extra, engine = self._rebuild_args()
        # The slot's engine holds the module, which holds this parameter:
        # copying the slot may have copied this parameter already.
        slot = copy.deepcopy(slot, memo)
        if id(self) in memo:
            return memo[id(self)]
        new = _rebuild(slot, *geometry, {})
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(extra, memo))
        if engine is not None:
            new.attach(copy.deepcopy(engine, memo))
        return new  # without .grad, as torch's copy of a parameter

    # ------------------------------------------------------------ dispatch
    # Both run eagerly under torch.compile: dynamo would otherwise compile
    # them as frames of their own, guarded on each weight's codes, and
    # recompile for every weight until its recompile limit. Compiled graphs
    # break around them instead (our codes are read by eager kernels only).
    @classmethod
    @_eager_only
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is _LINEAR:
            out = _linear(*args, **(kwargs or {}))
            if out is not NotImplemented:
                return out
        elif func in _CONVOLUTIONS:
            out = _convolution(func, *args, **(kwargs or {}))
            if out is not NotImplemented:
                return out
        with _NO_SUBCLASS_FUNCTION():
            return func(*args, **(kwargs or {}))

    @classmethod
    @_eager_only
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


_LINEAR = torch.nn.functional.linear
# ATen's switch for strided 3-D inputs with a bias (read once, as ATen does).
_ATEN_FLATTENS_3D = os.environ.get("TORCH_LINEAR_FLATTEN_3D", "0") not in ("", "0")
_NO_SUBCLASS_FUNCTION = torch._C.DisableTorchFunctionSubclass
# Devices whose autocast state can be asked (others take the generic path).
_AUTOCAST_DEVICES = ("cpu", "cuda")
_PLAIN_BIAS = (type(None), torch.Tensor, torch.nn.Parameter)
_FUNCTORCH_ACTIVE = torch._C._are_functorch_transforms_active


def _direct(input, weight, bias) -> bool:
    """Whether an op of a whole compressed weight may skip per-op dispatch:
    not the rare cases (views, casts, compressed inputs, autocast, tracing),
    which the generic dispatch serves."""
    return not (
        type(input) is not torch.Tensor
        or not isinstance(weight, CompressedParameter)
        or not weight._whole
        or type(bias) not in _PLAIN_BIAS
        or input.device.type not in _AUTOCAST_DEVICES
        or weight._slot.codes.device != input.device
        or torch.is_autocast_enabled(input.device.type)
        or torch.compiler.is_compiling()
        or _forward_ad._current_level >= 0  # dual tensors: no jvp here
        or _FUNCTORCH_ACTIVE()  # vmap, torch.func.grad: no batching rule here
    )


def _needs_grad(input, weight, bias) -> bool:
    """Whether autograd records the op (as it would for float32 weights)."""
    return torch.is_grad_enabled() and (
        input.requires_grad
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
    )


def _linear(input, weight, bias=None):
    """``F.linear`` on a whole compressed weight, without per-op dispatch."""
    # Dispatched op by op, a small layer's cost is Python's; here the weight
    # is decoded once in forward and once in backward.
    if not _direct(input, weight, bias):
        return NotImplemented
    grad = _needs_grad(input, weight, bias)
    bias_after = _bias_after_product(input, weight, bias)
    if not grad and bias_after is None:
        with _NO_SUBCLASS_FUNCTION():
            return _LINEAR(input, weight.decoded(), bias)
    if bias_after is None:
        return NotImplemented
    rows = input.reshape(-1, input.shape[-1])
    # Where ATen adds the bias after the product, autograd adds it here, out
    # of place: its gradient then sums the output's gradient as ATen's does
    # (in place on the view, the sum would run over another layout).
    inner_bias = None if bias_after else bias
    if grad:
        # The function sees rows: its output must not be a view (autograd
        # forbids in-place ops on a custom function's view outputs), so the
        # batch dimensions are folded and unfolded outside it.
        rows = _DecodedLinear.apply(rows, weight, inner_bias)
    else:
        with _NO_SUBCLASS_FUNCTION():
            rows = _LINEAR(rows, weight.decoded(), inner_bias)
    out = rows.view(*input.shape[:-1], rows.shape[-1])
    return out + bias if bias_after else out


def _bias_after_product(input: torch.Tensor, weight, bias) -> bool | None:
    """How ``F.linear`` computes one product of rows: the bias in it
    (``False``: one addmm, or no bias), with the bias added after it
    (``True``), or not as one product of rows (``None``)."""
    # Computed as ATen does, the result is bit for bit F.linear's (on the
    # float32 model, whose weights are parameters that require gradients).
    # A 2-D or contiguous 3-D input with a bias is one addmm. A strided
    # batch goes through matmul, which folds it while the weight requires a
    # gradient (with or without autograd: SpeechBrain's feed-forward layers
    # see time-major views), and the bias is added after the product, which
    # rounds differently. Contiguous 4-D inputs with a bias are left to
    # ATen: torch versions differ in how they fold them.
    dim = input.dim()
    if dim < 2:
        return None
    strided = dim > 2 and not input.is_contiguous()
    if strided and (_ATEN_FLATTENS_3D or not weight.requires_grad):
        # ATen copies the batch into one addmm, or matmul computes a batched
        # product instead.
        return None
    if bias is None or dim == 2 or (dim == 3 and not strided):
        return False
    return True if strided else None


def _column_major(rows: torch.Tensor) -> bool:
    """ATen's test for a column-major matrix (``mm_mat1_backward``)."""
    return rows.stride(0) == 1 and rows.stride(1) == rows.size(0)


class _DecodedLinear(torch.autograd.Function):
    """``F.linear`` of rows, saving the compressed weight for backward."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        with _NO_SUBCLASS_FUNCTION():
            return _LINEAR(rows, weight.decoded(), bias)

    @staticmethod
    @once_differentiable  # the decoded weight is not: refuse double backward
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad_rows = grad_weight = grad_bias = None
        with _NO_SUBCLASS_FUNCTION():
            if ctx.needs_input_grad[0] and _column_major(rows):
                # As ATen's mm backward, which keeps a column-major input's
                # layout (and so its rounding).
                grad_rows = weight.decoded().t().mm(grad.t()).t()
            elif ctx.needs_input_grad[0]:
                grad_rows = grad.mm(weight.decoded())
            if ctx.needs_input_grad[1]:
                grad_weight = grad.t().mm(rows)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad.sum(0)
        return grad_rows, grad_weight, grad_bias


# F.conv1d and F.conv2d (SpeechBrain's CNN layers, Conformer's depthwise
# convolution), by their number of spatial dimensions.
_CONVOLUTIONS = {torch.conv1d: 1, torch.conv2d: 2}


def _convolution(
    func, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1
):
    """``F.conv1d`` / ``F.conv2d`` on a whole compressed weight, without per-op
    dispatch: decoded once in forward and once in backward."""
    dims = _CONVOLUTIONS[func]
    if (
        not _direct(input, weight, bias)
        or isinstance(padding, str)  # "same" pads the input itself
        or input.dim() != dims + 2  # an unbatched input is batched first
        # ATen computes some grouped 2-D convolutions (ARM's depthwise 3x3)
        # otherwise when no backward follows: the generic path runs them
        # inside autograd, as the float32 model does.
        or (dims == 2 and groups != 1)
    ):
        return NotImplemented
    try:
        args = (*(_expanded(p, dims) for p in (stride, padding, dilation)), groups)
    except TypeError:  # not integers: ATen says what is wrong
        return NotImplemented
    if not _needs_grad(input, weight, bias):
        with _NO_SUBCLASS_FUNCTION():
            return func(input, weight.decoded(), bias, *args)
    return _DecodedConvolution.apply(input, weight, bias, func, args)


def _expanded(param, dims: int) -> list[int]:
    """One value per spatial dimension, as ATen expands an integer (NumPy's
    and 0-d tensors included) or a one-element sequence."""
    if isinstance(param, (tuple, list)):
        values = [operator.index(v) for v in param]
    else:
        values = [operator.index(param)]
    return values * dims if len(values) == 1 else values


class _DecodedConvolution(torch.autograd.Function):
    """A convolution of a batch, saving the compressed weight for backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, func, args):
        ctx.save_for_backward(input, weight)
        ctx.args, ctx.bias_sizes = args, None if bias is None else list(bias.shape)
        with _NO_SUBCLASS_FUNCTION():
            return func(input, weight.decoded(), bias, *args)

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        has_bias = ctx.bias_sizes is not None
        mask = [*ctx.needs_input_grad[:2], has_bias and ctx.needs_input_grad[2]]
        # What ATen's autograd runs for convolution (not transposed). With
        # create_graph, on the compressed weight itself, so that a second
        # derivative (a gradient penalty) goes through the generic dispatch.
        if not torch.is_grad_enabled():
            weight = weight.decoded()
        with _NO_SUBCLASS_FUNCTION():
            grads = aten.convolution_backward.default(
                grad, input, weight, ctx.bias_sizes, stride, padding,
                dilation, False, [0] * len(stride), groups, mask,
            )  # fmt: skip
        return (*grads, None, None)


def _dispatch(func, args, kwargs):
    """What an operation on compressed parameters does (see the module doc)."""
    if torch.compiler.is_compiling() or _tracing(args):
        raise RuntimeError(_NO_COMPILE)
    first = args[0] if args else None
    if isinstance(first, CompressedParameter):
        if func in _VIEWS:
            return _view(func, args, kwargs)
        if func is aten._to_copy.default:
            return _to_copy(first, **kwargs)
        if func in _LIKE:
            # Only the geometry is read: no decoding (optimizers' state init).
            template = torch.empty(first.shape, dtype=first.dtype, device=first.device)
            return func(template, *args[1:], **kwargs)
        if func is aten.copy_.default:
            return _copy_into(first, args[1])
    if _is_mutable(func):
        return _mutate(func, args, kwargs)
    return func(*_plain(args), **_plain(kwargs))


_MUTABLE: dict = {}


def _is_mutable(func) -> bool:
    # Reading the schema costs more than the whole dispatch of a small op.
    mutable = _MUTABLE.get(func)
    if mutable is None:
        mutable = _MUTABLE[func] = bool(func._schema.is_mutable)
    return mutable


_NO_COMPILE = (
    "OMC: torch.compile cannot trace compressed parameters (their values live "
    "in packed codes that only eager operations decode); run the model "
    "eagerly, or compile a float32 copy (handle.decompressed_state_dict())"
)


def _tracing(args) -> bool:
    """Whether an operation comes from a compiler's fake-tensor tracing."""
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(a, FakeTensor) for a in args) or (
        torch._guards.TracingContext.try_get() is not None
    )


def _plain(tree):
    """Decoded values in place of every compressed tensor of ``tree``."""
    # Walked directly, not by a pytree map: this runs once per operation.
    if isinstance(tree, CompressedParameter):
        return tree.decoded()
    kind = type(tree)
    if kind is tuple or kind is list:
        if any(isinstance(a, _CONTAINERS) for a in tree):
            return kind(_plain(a) for a in tree)
        return tree
    if kind is dict:
        return {k: _plain(v) for k, v in tree.items()} if tree else tree
    return tree


_CONTAINERS = (torch.Tensor, tuple, list, dict)


def _view(func, args, kwargs):
    src = args[0]
    out = func(src._skeleton(), *args[1:], **kwargs)
    if isinstance(out, torch.Tensor):
        wrapped = src._like(out.shape, out.stride(), out.storage_offset())
    else:  # split, unbind, chunk...: a list or tuple of views
        wrapped = tree_map(
            lambda m: (
                src._like(m.shape, m.stride(), m.storage_offset())
                if isinstance(m, torch.Tensor)
                else m
            ),
            out,
        )
    return return_and_correct_aliasing(func, args, kwargs, wrapped)


def _to_copy(src: CompressedParameter, **kwargs):
    """A cast to another float dtype is a view, a move copies the codes."""
    dtype = kwargs.get("dtype") or src.dtype
    device = torch.device(kwargs.get("device") or src.device)
    layout = kwargs.get("layout")
    memory_format = kwargs.get("memory_format")
    plain = (
        not dtype.is_floating_point
        or layout not in (None, torch.strided)
        or memory_format not in (None, torch.preserve_format)
        or kwargs.get("pin_memory")
    )
    if plain:
        return aten._to_copy.default(src.decoded(), **kwargs)
    slot = src._slot
    if device != slot.codes.device:
        # A copy on another device: its own codes, without the writer.
        codes = slot.codes
        moved = CompressedTensor(
            codes.packed.to(device),
            codes.format,
            codes.shape,
            codes.transform,
            codes.clip,
        )
        slot = Slot(slot.name, moved)
    return CompressedParameter(
        slot, tuple(src.shape), src.stride(), src.storage_offset(), dtype
    )


def _copy_into(dst: CompressedParameter, src) -> CompressedParameter:
    if isinstance(src, CompressedParameter) and src._slot is dst._slot:
        if (
            src.shape == dst.shape
            and src.stride() == dst.stride()
            and (src.storage_offset() == dst.storage_offset())
        ):
            return dst  # the same values: nothing to write
    value = src.decoded() if isinstance(src, CompressedParameter) else src
    slot = dst._slot
    with slot.lock:
        full = slot.value().reshape(-1).clone()
        view = full.as_strided(dst.shape, dst.stride(), dst.storage_offset())
        if torch.equal(view, value.to(view.device, view.dtype).expand_as(view)):
            return dst  # e.g. DDP broadcasting the values every rank holds
        view.copy_(value)
        slot.assign(full.view(slot.codes.shape))
    return dst


def _mutate(func, args, kwargs):
    """An in-place op (or one with ``out=``): decode, apply, encode again."""
    written: list[tuple[CompressedParameter, torch.Tensor]] = []
    schema = func._schema.arguments

    def writable(a, is_written):
        if not isinstance(a, CompressedParameter):
            return a
        if not is_written:
            return a.decoded()
        full = a._slot.value().reshape(-1).clone()
        written.append((a, full))
        return full.as_strided(a.shape, a.stride(), a.storage_offset())

    plain_args = []
    for i, a in enumerate(args):
        is_written = (
            i < len(schema)
            and schema[i].alias_info is not None
            and (schema[i].alias_info.is_write)
        )
        plain_args.append(tree_map(lambda t, w=is_written: writable(t, w), a))
    plain_kwargs = {}
    for name, a in kwargs.items():
        arg = next((s for s in schema if s.name == name), None)
        is_written = (
            arg is not None and arg.alias_info is not None and (arg.alias_info.is_write)
        )
        plain_kwargs[name] = tree_map(lambda t, w=is_written: writable(t, w), a)
    out = func(*plain_args, **plain_kwargs)
    for param, full in written:
        with param._slot.lock:
            param._slot.assign(full.view(param._slot.codes.shape))
    # In-place ops return their first argument.
    if written and isinstance(out, torch.Tensor):
        return written[0][0]
    return out


# Entries of a compressed parameter's __dict__ that a copy rebuilds itself.
_ENGINE, _HOOK = "_omc_engine", "_omc_hook"
_OWN = {"_slot", "_whole", _ENGINE, _HOOK}


def _rebuild(slot, size, stride, offset, dtype, requires_grad, extra, engine=None):
    """A compressed parameter from :meth:`CompressedParameter.__reduce_ex__`."""
    # Saved whole models name this function and its arguments: keep both.
    # `engine` may not be unpickled in full yet: only its bound _on_grad is
    # taken here.
    param = CompressedParameter(slot, size, stride, offset, dtype, requires_grad)
    param.__dict__.update(extra)  # _is_param (an nn.Parameter), user attributes
    if engine is not None:
        param.attach(engine)
    return param
