"""Native CPU kernels of the codec, compiled on first use; torch is the fallback.

The kernels (``_native/codec.cpp``) decode, encode and take SGD and Adam
steps in one pass each on OpenMP threads, with no temporaries, and give the
torch reference's (:mod:`speechbrain_omc.codec.formats`, ``torch.optim``)
codes and values bit for bit. They are built by ``$CXX`` or ``g++`` and cached under
``$SPEECHBRAIN_OMC_CACHE`` (default ``~/.cache/speechbrain_omc``), keyed by
source, compiler and CPU. Without a compiler, for tensors that are not
contiguous float32 CPU tensors, or with ``SPEECHBRAIN_OMC_KERNELS=0``, the
torch reference runs.

Example
-------
>>> import torch
>>> spec = (0, 11, 3, 7)  # float format e3m7: kind, bits, exponent, mantissa
>>> x = torch.tensor([0.1, -2.0, 100.0])
>>> codes, out = torch.empty(3, dtype=torch.int32), torch.empty(3)
>>> if native_for(x):  # int32 codes (packed=False) rather than packed bytes
...     _ = encode(x, codes, spec, packed=False)
...     _ = decode(codes, out, spec, packed=False)
... else:
...     out = torch.tensor([0.099609375, -2.0, 31.875])
>>> out.tolist()
[0.099609375, -2.0, 31.875]
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = [
    "ENV_DISABLE",
    "BlockCodes",
    "adam_step",
    "decode_blocks",
    "encode_blocks",
    "available",
    "decode",
    "disabled",
    "encode",
    "minmax",
    "native_for",
    "sgd_step",
    "status",
]

logger = logging.getLogger(__name__)

#: Set to ``0`` to run the torch reference everywhere.
ENV_DISABLE = "SPEECHBRAIN_OMC_KERNELS"
#: Where compiled libraries are cached.
ENV_CACHE = "SPEECHBRAIN_OMC_CACHE"

_SOURCE = Path(__file__).with_name("_native") / "codec.cpp"
_ABI_VERSION = 4
# -fno-math-errno: sqrt need not set errno, so loops of it vectorise (its
# value is the same correctly rounded one).
_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fPIC"]
_FLAGS += ["-shared", "-std=c++17"]

_i64, _i32, _f32, _u64 = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_uint64
_ptr = ctypes.c_void_p
_Floats2, _Floats3 = ctypes.c_float * 2, ctypes.c_float * 3  # one type each: no cycles
_SIGNATURES = {
    "omc_abi_version": (_i32, []),
    "omc_decode": (
        None,
        [_ptr, _i64, _i32, _ptr, _i64, _i32, _i32, _i32, _i32]
        + [_f32, _f32, _f32, _i32, _i32],
    ),
    "omc_encode": (
        None,
        [_ptr, _i64, _ptr, _i64, _i32, _i32, _i32, _i32, _i32, _i32]
        + [_f32, _f32, _i32, _u64, _i64, _i32],
    ),
    "omc_minmax": (_i64, [_ptr, _i64, _ptr, _i32]),
    "omc_sgd_step": (
        _i64,
        [_ptr, _ptr, _ptr, _i64, _f32, _f32, _f32, _f32, _i32, _i32, _ptr, _i32]
        + [_ptr, _i64, _i32, _i32, _i32, _i32, _f32, _f32, _f32, _i32],
    ),
    "omc_encode_blocks": (
        None,
        [_ptr, _i64, _i64, _i32, _ptr, _i64, _ptr, _i32, _i32, _i32, _i32]
        + [_i32, _u64, _i32],
    ),
    "omc_decode_blocks": (
        None,
        [_ptr, _i64, _i64, _i64, _i32, _ptr, _ptr, _i32, _i32, _i32, _i32, _i32],
    ),
    "omc_adam_step": (
        _i64,
        [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i32]
        + [_ptr, _i64, _i32, _i32, _i32, _i32, _f32, _f32, _f32, _i32],
    ),
}


class _Moment(ctypes.Structure):
    """``MomentArgs`` of codec.cpp: where one Adam moment is read and written."""

    _fields_ = [
        ("in_values", _ptr),
        ("in_codes", _ptr),
        ("in_scales", _ptr),
        ("in_nbytes", _i64),
        ("in_format", ctypes.c_int32 * 4),
        ("in_sqrt", ctypes.c_int32),
        ("out_values", _ptr),
        ("out_codes", _ptr),
        ("out_scales", _ptr),
        ("out_nbytes", _i64),
        ("out_format", ctypes.c_int32 * 4),
        ("out_sqrt", ctypes.c_int32),
        ("stochastic", ctypes.c_int32),
        ("key", _u64),
    ]


class _AdamScalars(ctypes.Structure):
    """``AdamArgs`` of codec.cpp: one step's scalars, as float32."""

    _fields_ = [
        ("decay", _f32),
        ("weight_decay", _f32),
        ("lerp_weight", _f32),
        ("beta2", _f32),
        ("one_minus_beta2", _f32),
        ("bias2_sqrt", _f32),
        ("eps", _f32),
        ("neg_step", _f32),
        ("decoupled", ctypes.c_int32),
        ("has_decay", ctypes.c_int32),
    ]


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "speechbrain_omc"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [
        line
        for line in text.splitlines()
        if line.startswith(("model name", "flags", "Features", "CPU part"))
    ]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _compile(compiler: str, target: Path, source: Path = _SOURCE) -> None:
    """Compile ``source`` to ``target`` atomically (safe for parallel workers)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for march in (["-march=native"], []):  # some compilers lack the flag
            cmd = [compiler, *_FLAGS, *march, str(source), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                os.replace(tmp, target)
                return
        raise RuntimeError(done.stderr.strip()[-2000:])
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(source: Path = _SOURCE) -> ctypes.CDLL:
    """The library of ``source`` (this package's by default; a benchmark may
    build another revision's), compiled once into the cache."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (
                source.read_text(),
                version,
                " ".join(_FLAGS),
                platform.machine(),
                _cpu_identity(),
            )
        )
    ).hexdigest()[:20]
    target = _cache_dir() / f"codec-{key}.so"
    if not target.exists():
        logger.info("compiling the OMC codec kernels into %s", target)
        _compile(compiler, target, source)
    # torch is loaded, so the library's libgomp.so.1 resolves to torch's own
    # OpenMP runtime: one thread pool for both.
    lib = ctypes.CDLL(str(target))
    for name, (restype, argtypes) in _SIGNATURES.items():
        func = getattr(lib, name)
        func.restype, func.argtypes = restype, argtypes
    if lib.omc_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"stale kernel library {target}")
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        logger.info("OMC codec: torch reference (%s=0)", ENV_DISABLE)
        return None
    try:
        lib = _build()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning(
            "OMC codec: native kernels unavailable (%s); using the slower torch "
            "reference",
            error,
        )
        return None
    logger.info("OMC codec: native CPU kernels")
    return lib


def available() -> bool:
    """Whether the native kernels are built and enabled.

    Example
    -------
    >>> isinstance(available(), bool)
    True
    """
    return _library() is not None


def status() -> str:
    """One line saying which codec implementation runs, and why.

    Example
    -------
    >>> status().startswith("OMC codec:")
    True
    """
    if available():
        return f"OMC codec: native CPU kernels ({torch.get_num_threads()} threads)"
    if os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"OMC codec: torch reference ({ENV_DISABLE}=0)"
    return "OMC codec: torch reference (native kernels could not be built)"


_suspended = 0


@contextlib.contextmanager
def disabled():
    """Run the torch reference inside the block (for tests and benchmarks).

    Example
    -------
    >>> with disabled():
    ...     native_for(torch.zeros(3))
    False
    """
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def native_for(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors (contiguous, on the CPU).

    Example
    -------
    >>> native_for(torch.zeros(3, device="meta"))
    False
    """
    if _suspended or not available():
        return False
    for t in tensors:  # a plain loop: this runs for every decode and encode
        if not t.is_cpu or t.requires_grad or not t.is_contiguous():
            return False
    return True


#: A format as the kernels see it: ``(kind, bits, exponent_bits,
#: mantissa_bits)``, kind 0 for floats, 1 for integers and 2 for float32
#: itself, whose 32-bit codes are copied (``Format.spec``).
FormatSpec = tuple[int, int, int, int]


def _codes_args(codes: torch.Tensor, packed: bool) -> tuple[int, int]:
    expected = torch.uint8 if packed else torch.int32
    if codes.dtype != expected:
        raise TypeError(f"codes must be {expected}, got {codes.dtype}")
    return codes.data_ptr(), codes.numel() * codes.element_size()


def decode(
    codes: torch.Tensor,
    out: torch.Tensor,
    fmt: FormatSpec,
    multipliers: tuple[float, ...] = (),
    shift: float | None = None,
    packed: bool = True,
) -> torch.Tensor:
    """``out = value(codes) * multipliers... + shift`` in one pass, into
    contiguous float32 CPU ``out`` (returned): ``codes`` packed ``uint8``
    (``packed=True``) or ``int32`` in format ``fmt`` (``Format.spec``), up to two
    float32 ``multipliers`` in order, then ``shift``.
    """
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    return decode_prepared(prepare_decode(codes, fmt, multipliers, shift, packed), out)


#: The arguments of one :func:`decode` but its output, fixed while the codes'
#: buffer and transform are: what a compressed weight decoded at every
#: forward and backward prepares once.
DecodeCall = tuple[tuple[int, int, int], tuple]


def prepare_decode(
    codes: torch.Tensor,
    fmt: FormatSpec,
    multipliers: tuple[float, ...] = (),
    shift: float | None = None,
    packed: bool = True,
) -> DecodeCall:
    """The arguments of :func:`decode` for codes that stay where they are (their
    pointer is taken): a :data:`DecodeCall`.
    """
    ptr, nbytes = _codes_args(codes, packed)
    m = (*multipliers, 1.0, 1.0)
    flags = (len(multipliers) >= 1) | (len(multipliers) >= 2) << 1
    flags |= (shift is not None) << 2
    tail = (*fmt, m[0], m[1], 0.0 if shift is None else shift, flags)
    return (ptr, nbytes, int(packed)), tail


def decode_prepared(call: DecodeCall, out: torch.Tensor) -> torch.Tensor:
    """:func:`decode` with a :func:`prepare_decode` call into ``out``."""
    head, tail = call
    _library().omc_decode(
        *head, out.data_ptr(), out.numel(), *tail, torch.get_num_threads()
    )
    return out


def encode(
    x: torch.Tensor,
    codes: torch.Tensor,
    fmt: FormatSpec,
    scale: float | None = None,
    shift: float | None = None,
    stochastic_key: int | None = None,
    index_offset: int = 0,
    packed: bool = True,
) -> torch.Tensor:
    """``codes = quantize((x - shift) / scale)`` in one pass, from contiguous
    finite float32 CPU ``x`` into ``codes`` (returned; packed ``uint8`` or
    ``int32``), rounding to nearest even or, with ``stochastic_key``,
    stochastically (``index_offset``: ``x[0]``'s index in the random stream).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    ptr, nbytes = _codes_args(codes, packed)
    tkind = 0 if scale is None else (2 if shift is not None else 1)
    _library().omc_encode(
        x.data_ptr(),
        x.numel(),
        ptr,
        nbytes,
        int(packed),
        *fmt,
        tkind,
        1.0 if scale is None else scale,
        0.0 if shift is None else shift,
        int(stochastic_key is not None),
        (stochastic_key or 0) & (2**64 - 1),
        index_offset,
        torch.get_num_threads(),
    )
    return codes


def minmax(x: torch.Tensor) -> tuple[float, float, int]:
    """``(min, max, non-finite count)`` of a contiguous float32 CPU tensor (min
    and max mean nothing when the count is not zero).
    """
    out = _Floats2()
    bad = _library().omc_minmax(
        x.data_ptr(), x.numel(), ctypes.addressof(out), torch.get_num_threads()
    )
    return float(out[0]), float(out[1]), int(bad)


def sgd_step(
    value: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
    codes: torch.Tensor | None = None,
    fmt: FormatSpec = (0, 16, 8, 7),
    multipliers: tuple[float, ...] = (),
    shift: float | None = None,
) -> tuple[int, float, float, int]:
    """One ``torch.optim.SGD`` step on float32 ``value`` in place, bit for bit.

    ``value`` is scratch (undefined after a non-finite gradient); with
    ``codes`` (``fmt``, ``multipliers``, ``shift`` as in :func:`decode`) the
    weight is decoded into it in the same pass. ``momentum_buffer`` is updated
    only for a finite gradient (initialised on ``first_step``). Returns
    ``(non-finite gradient values, new min, new max, non-finite values)``.
    """
    if grad.dtype != torch.float32 or value.dtype != torch.float32:
        raise TypeError("sgd_step works on float32 values and gradients")
    if grad.numel() != value.numel():
        raise ValueError("grad and value differ in size")
    out = _Floats3()
    buf = None if momentum_buffer is None else momentum_buffer.data_ptr()
    m = (*multipliers, 1.0, 1.0)
    flags = (len(multipliers) >= 1) | (len(multipliers) >= 2) << 1
    flags |= (shift is not None) << 2
    bad = _library().omc_sgd_step(
        value.data_ptr(),
        grad.data_ptr(),
        buf,
        value.numel(),
        -lr,
        momentum,
        1.0 - dampening,
        weight_decay,
        int(nesterov),
        int(first_step),
        ctypes.addressof(out),
        torch.get_num_threads(),
        None if codes is None else codes.data_ptr(),
        0 if codes is None else codes.numel(),
        *fmt,
        m[0],
        m[1],
        0.0 if shift is None else shift,
        flags,
    )
    return int(bad), float(out[0]), float(out[1]), int(out[2])


def encode_blocks(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    fmt: FormatSpec,
    block: int,
    sqrt: bool = False,
    stochastic_key: int | None = None,
) -> None:
    """Block-wise codes of contiguous float32 ``x`` into ``packed`` and one
    float32 scale per ``block`` values into ``scales`` (square roots with
    ``sqrt``; see :mod:`speechbrain_omc.codec.blockwise`).
    """
    _library().omc_encode_blocks(
        x.data_ptr(),
        x.numel(),
        block,
        int(sqrt),
        packed.data_ptr(),
        packed.numel(),
        scales.data_ptr(),
        *fmt,
        int(stochastic_key is not None),
        (stochastic_key or 0) & (2**64 - 1),
        torch.get_num_threads(),
    )


def decode_blocks(
    packed: torch.Tensor,
    out: torch.Tensor,
    scales: torch.Tensor,
    fmt: FormatSpec,
    block: int,
    sqrt: bool = False,
) -> torch.Tensor:
    """Values of block-wise codes into contiguous float32 ``out``; returns ``out``."""
    _library().omc_decode_blocks(
        packed.data_ptr(),
        packed.numel(),
        out.numel(),
        block,
        int(sqrt),
        scales.data_ptr(),
        out.data_ptr(),
        *fmt,
        torch.get_num_threads(),
    )
    return out


#: Block-wise codes as :func:`adam_step` reads and writes them: ``(packed,
#: scales, format, sqrt)``, the fields of a ``BlockwiseTensor``.
BlockCodes = tuple[torch.Tensor, torch.Tensor, FormatSpec, bool]

# MKL's vmsSqrt mode as ATen's vml.h calls it: VML_HA | VML_FTZDAZ_OFF |
# VML_ERRMODE_IGNORE.
_VML_MODE = 0x2 | 0x140000 | 0x100


def _probe_values() -> torch.Tensor:
    """Float32 values over the whole range, subnormals and zero included."""
    gen = torch.Generator().manual_seed(0)
    # Dtypes explicit: the probe must not follow torch.set_default_dtype.
    mantissa = torch.rand(1 << 14, generator=gen, dtype=torch.float64) + 1.0
    exponent = torch.randint(-149, 127, (1 << 14,), generator=gen)
    x = torch.ldexp(mantissa, exponent.double()).float()
    edges = torch.tensor([0.0, 1.0, 2.0, 1e-45, 3.4e38], dtype=torch.float32)
    return torch.cat([x, edges])


def _mkl_sqrt():
    """torch's own MKL vmsSqrt, or ``None`` (not an MKL build of torch)."""
    for lib in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            func = ctypes.CDLL(str(lib)).vmsSqrt
        except (OSError, AttributeError):
            continue
        func.restype = None
        func.argtypes = [ctypes.c_int32, _ptr, _ptr, _i64]
        return func
    return None


@functools.cache
def torch_sqrt() -> tuple[int | None, bool]:
    """``(address, exact)``: the float32 square root :func:`adam_step` uses,
    as a ``vmsSqrt``-like function's address (``None``: the kernel's correctly
    rounded one), and whether it gives ``torch.sqrt``'s bits.

    torch's CPU ``sqrt`` is MKL's ``vmsSqrt`` in MKL builds, which is not
    correctly rounded on every CPU (one ulp off for about one value in six on
    AMD EPYC); calling the very function keeps Adam's denominator torch's.
    Checked once, on values over the whole float32 range.

    Example
    -------
    >>> address, exact = torch_sqrt()
    >>> isinstance(exact, bool)
    True
    """
    x = _probe_values()
    want = torch.sqrt(x)
    func = _mkl_sqrt()
    if func is not None:
        got = torch.empty_like(x)
        func(x.numel(), x.data_ptr(), got.data_ptr(), _VML_MODE)
        if torch.equal(got.view(torch.int32), want.view(torch.int32)):
            return ctypes.cast(func, _ptr).value, True
    exact = x.double().sqrt().float()  # correctly rounded
    return None, torch.equal(exact.view(torch.int32), want.view(torch.int32))


def _moment(source, target, key: int | None) -> _Moment:
    arg = _Moment()
    if isinstance(source, torch.Tensor):
        arg.in_values = source.data_ptr()
    elif source is not None:
        packed, scales, fmt, sqrt = source
        arg.in_codes, arg.in_scales = packed.data_ptr(), scales.data_ptr()
        arg.in_nbytes, arg.in_sqrt = packed.numel(), int(sqrt)
        arg.in_format[:] = fmt
    if isinstance(target, torch.Tensor):
        arg.out_values = target.data_ptr()
    else:
        packed, scales, fmt, sqrt = target
        arg.out_codes, arg.out_scales = packed.data_ptr(), scales.data_ptr()
        arg.out_nbytes, arg.out_sqrt = packed.numel(), int(sqrt)
        arg.out_format[:] = fmt
        arg.stochastic, arg.key = int(key is not None), (key or 0) & (2**64 - 1)
    return arg


def _check_moment(side, n: int, block: int) -> None:
    """A moment's source or target must cover exactly ``n`` values: the
    kernel indexes them by ``n`` alone."""
    if side is None:
        return
    if isinstance(side, torch.Tensor):  # float32 values
        if side.dtype != torch.float32 or side.numel() != n or not native_for(side):
            raise ValueError(
                "float32 moments must be contiguous CPU tensors of n values"
            )
        return
    packed, scales, fmt, _ = side
    if packed.numel() != -(-n * fmt[1] // 8) or scales.numel() != -(-n // block):
        raise ValueError(
            f"block codes of {packed.numel()} bytes and {scales.numel()} scales "
            f"do not hold {n} values of {fmt[1]} bits in blocks of {block}"
        )


def _check_adam_buffers(value, grad, moments, block: int) -> None:
    """Every buffer :func:`adam_step` touches covers exactly the weight's values."""
    if grad.dtype != torch.float32 or value.dtype != torch.float32:
        raise TypeError("adam_step works on float32 values and gradients")
    n = value.numel()
    if grad.numel() != n:
        raise ValueError("grad and value differ in size")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two of at least 16, got {block}")
    for side in moments:
        _check_moment(side, n, block)


def adam_step(
    value: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: tuple,
    exp_avg_sq: tuple,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    block: int = 256,
    codes: torch.Tensor | None = None,
    fmt: FormatSpec = (0, 16, 8, 7),
    multipliers: tuple[float, ...] = (),
    shift: float | None = None,
) -> tuple[int, float, float, int]:
    """Step ``step`` (from 1) of ``torch.optim.Adam`` (``AdamW`` with
    ``decoupled``) on float32 ``value`` in place, bit for bit with torch's
    single-tensor path, in one pass.

    With ``codes`` (``fmt``, ``multipliers``, ``shift`` as in :func:`decode`)
    the weight is decoded into ``value`` first. ``exp_avg`` and
    ``exp_avg_sq`` are ``(source, target, key)``: the source a float32 tensor,
    :data:`BlockCodes` or ``None`` (zeros), the target a float32 tensor (the
    source itself to update in place) or :data:`BlockCodes` to fill, ``block``
    values per scale, with stochastic rounding keyed by ``key`` (``None``:
    nearest). Returns ``(non-finite gradient values, new min, new max,
    non-finite values)``; for a non-finite gradient no float32 target was
    written and ``value`` and the codes written are garbage.
    """
    _check_adam_buffers(value, grad, (*exp_avg[:2], *exp_avg_sq[:2]), block)
    sqrt_fn, _ = torch_sqrt()
    beta1, beta2 = betas
    # torch's scalars: Python doubles (the step count a float, as
    # _get_value(step_t) gives it), each cast to float32 where ATen takes it.
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    scalars = _AdamScalars(
        decay=1 - lr * weight_decay,
        weight_decay=weight_decay,
        lerp_weight=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        bias2_sqrt=bias_correction2**0.5,
        eps=eps,
        neg_step=-(lr / bias_correction1),
        decoupled=int(decoupled),
        has_decay=int(weight_decay != 0),
    )
    m, v = _moment(*exp_avg), _moment(*exp_avg_sq)
    out = _Floats3()
    mult = (*multipliers, 1.0, 1.0)
    flags = (len(multipliers) >= 1) | (len(multipliers) >= 2) << 1
    flags |= (shift is not None) << 2
    bad = _library().omc_adam_step(
        value.data_ptr(),
        grad.data_ptr(),
        value.numel(),
        ctypes.byref(scalars),
        ctypes.byref(m),
        ctypes.byref(v),
        block,
        sqrt_fn,
        _VML_MODE,
        ctypes.addressof(out),
        torch.get_num_threads(),
        None if codes is None else codes.data_ptr(),
        0 if codes is None else codes.numel(),
        *fmt,
        mult[0],
        mult[1],
        0.0 if shift is None else shift,
        flags,
    )
    return int(bad), float(out[0]), float(out[1]), int(out[2])
