"""Low-bit number formats: quantize float tensors to integer codes and back.

* :class:`FloatFormat` ``(exponent_bits, mantissa_bits)``: IEEE-like with
  subnormals but **no inf/NaN codes** (values beyond ``max_value``
  saturate); E5M10, E8M7, E4M3 and E5M2 give the codes of ``float16``,
  ``bfloat16``, ``float8_e4m3fn`` and ``float8_e5m2`` for their finite values.
* :class:`IntFormat` ``(bits)``: symmetric signed integers, used with a
  per-variable scale (:mod:`speechbrain_omc.codec.transform`).
* :class:`Float32Format` (``"fp32"``): the float32 bits themselves, a
  lossless twin to check OMC's mechanisms against float32 training.

Codes are ``torch.int32`` values below ``2**bits`` (32-bit codes: the bit
pattern). Rounding works on the float32 bits, so nothing rounds twice;
stochastic rounding hashes a 64-bit key with each value's index
(:func:`random_bits`), so a key gives the same codes however the work is
split. The torch code here is the reference of the native kernels
(:mod:`speechbrain_omc.codec.kernels`) and their fallback.

Example
-------
>>> import torch
>>> fmt = get_format("e4m3")
>>> codes = fmt.quantize(torch.tensor([0.3, -1.0, 1000.0]))
>>> codes
tensor([ 42, 184, 127], dtype=torch.int32)
>>> fmt.dequantize(codes).tolist()
[0.3125, -1.0, 480.0]
"""

from __future__ import annotations

import operator
import re
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from speechbrain_omc.codec import kernels

__all__ = [
    "Format",
    "FloatFormat",
    "Float32Format",
    "IntFormat",
    "FORMAT_PRESETS",
    "get_format",
]

ROUNDINGS = ("nearest", "stochastic")

#: Values per chunk of the elementwise pipelines on CPU: a chunk's temporaries
#: stay in the last-level cache and reuse heap memory instead of page-faulting
#: fresh buffers, while chunks stay few (every operation is a parallel region,
#: whose start costs the most on a busy machine).
CHUNK = 1 << 20
#: Values per chunk of general-width decoding on CPU, whose only temporary is
#: a byte-window buffer (about ``bits / 2`` bytes a value): larger chunks, so
#: fewer parallel regions.
DECODE_CHUNK = 1 << 22


def _chunk(device: torch.device, n: int, decode: bool = False) -> int:
    """Chunk length for ``n`` values: CPU chunks; accelerators want one launch."""
    if device.type != "cpu":
        return max(n, 1)
    return DECODE_CHUNK if decode else CHUNK


_F32_MIN_NORMAL = 2.0**-126
_F32_MAX = (2.0 - 2.0**-23) * 2.0**127
_INT32_MIN = -(2**31)


def _to_f32(value: float) -> float:
    """Round a Python float to the nearest float32 (kept as a Python float)."""
    return struct.unpack("<f", struct.pack("<f", float(value)))[0]


def _as_float32(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Check that ``x`` is a floating tensor; return it as contiguous float32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; "
            "integer and boolean tensors cannot be quantized"
        )
    # Quantization is not differentiable: work on the values alone.
    return x.detach().to(torch.float32).contiguous()


def _finite_minmax(x: torch.Tensor, name: str = "x") -> tuple[float, float]:
    """Return ``(min, max)`` of a float32 tensor, raising on NaN or inf."""
    # One pass, into which NaN and inf propagate; only a bad tensor takes the
    # slow path that counts and locates them.
    if x.numel() == 0:
        return 0.0, 0.0
    if kernels.native_for(x):
        lo, hi, bad = kernels.minmax(x)
        finite = bad == 0
    else:
        lo, hi = (float(v) for v in torch.aminmax(x))
        finite = abs(lo) <= _F32_MAX and abs(hi) <= _F32_MAX
    if finite:
        return lo + 0.0, hi + 0.0  # -0.0 becomes 0.0 whichever path found it
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    where, rest = [], flat
    for size in reversed(x.shape):  # unravel the flat index (row-major)
        rest, i = divmod(rest, size)
        where.insert(0, i)
    where = tuple(where)
    raise ValueError(
        f"{name} has {count} non-finite value(s) (NaN or inf) out of {x.numel()}; "
        f"the first is at index {where} (flat index {flat})"
    )


def _as_width(value: object, label: str) -> int:
    """A bit width as a plain int (numpy and torch integers accepted)."""
    if isinstance(value, bool):
        raise ValueError(f"{label} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{label} must be an int, got {value!r}") from None


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


_M32 = 0xFFFFFFFF
# Multipliers of the 32-bit hash below 2**31: products of 32-bit values stay
# exact in int64, so this reference matches the kernels' uint32 arithmetic.
_MIX = (0x21F0AAAD, 0x735A2D97)


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """In place 32-bit xorshift-multiply hash of int64 values below 2**32."""
    h ^= h >> 16
    h *= _MIX[0]
    h &= _M32
    h ^= h >> 15
    h *= _MIX[1]
    h &= _M32
    h ^= h >> 15
    return h


def random_bits(key: int, offset: int, n: int, device=None) -> torch.Tensor:
    """31 random bits for each of the values ``offset .. offset + n - 1``.

    Value ``i`` gets ``mix(mix(lo(i) ^ k0) ^ k1 ^ hi(i)) >> 1`` (32-bit words
    of ``key`` and ``i``, ``mix`` a xorshift-multiply hash), as the kernels do.

    Example
    -------
    >>> a = random_bits(7, 0, 6)
    >>> bool((a == torch.cat([random_bits(7, 0, 2), random_bits(7, 2, 4)])).all())
    True
    """
    index = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    h = index & _M32
    h ^= key & _M32
    _mix32_(h)
    h ^= (key >> 32) & _M32
    h ^= index >> 32
    _mix32_(h)
    h >>= 1
    return h.to(torch.int32)


def rounding_key(generator: torch.Generator | int | None = None) -> int:
    """The 64-bit key of one stochastic rounding: an int is the key, a generator
    gives one draw, ``None`` draws from torch's global generator.

    Example
    -------
    >>> rounding_key(5)
    5
    """
    if isinstance(generator, int) and not isinstance(generator, bool):
        return generator & (2**64 - 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or an int key, got "
            f"{type(generator).__name__}"
        )
    device = generator.device if generator is not None else "cpu"
    draw = torch.randint(2**62, (1,), generator=generator, device=device)
    return int(draw)


def affine_plan(
    pow2: float, scale: float | None, shift: float | None
) -> tuple[tuple[float, ...], float | None]:
    """Multipliers and shift that compute ``(v * pow2) * scale + shift``:
    ``pow2`` folds into the scale (one multiply, the same bits) whenever the
    product is a normal float32.

    Example
    -------
    >>> affine_plan(2.0**4, 0.5, None)
    ((8.0,), None)
    """
    s = 1.0 if scale is None else _to_f32(scale)
    c = pow2 * s
    factors: tuple[float, ...] = ()
    if c != 1.0:
        if _F32_MIN_NORMAL <= abs(c) <= _F32_MAX:
            factors = (c,)
        else:
            factors = tuple(f for f in (pow2, s) if f != 1.0)
    add = _to_f32(shift) if shift is not None and shift != 0.0 else None
    return factors, add


def _affine_(
    out: torch.Tensor, pow2: float, scale: float | None, shift: float | None
) -> torch.Tensor:
    """In place ``out = (out * pow2) * scale + shift`` with float32 rounding."""
    factors, add = affine_plan(pow2, scale, shift)
    for factor in factors:
        out.mul_(factor)
    if add is not None:
        out.add_(add)
    return out


def code_range(bits: int) -> tuple[int, int]:
    """``[low, high)`` of the int32 codes of a ``bits``-bit format (32 bits:
    every int32).

    Example
    -------
    >>> code_range(11), code_range(32)
    ((0, 2048), (-2147483648, 2147483648))
    """
    return (_INT32_MIN, 2**31) if bits == 32 else (0, 2**bits)


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.numel():
        low, high = code_range(bits)
        lo, hi = torch.aminmax(codes.reshape(-1))
        if int(lo) < low or int(hi) >= high:
            raise ValueError(
                f"codes must lie in [{low}, {high}) for a {bits}-bit format, "
                f"got values in [{int(lo)}, {int(hi)}]"
            )


class Format(ABC):
    """A number format: ``bits``, ``name`` (its preset spelling), ``max_value``.

    Subclasses implement the torch reference of rounding (``_quantize``) and of
    in-place decoding (``_decode_``) and describe themselves to the kernels
    (``spec``, ``pow2``). ``lossless`` formats take no transform.

    Example
    -------
    >>> fmt = get_format("int4")
    >>> fmt.bits, fmt.name, fmt.max_value, fmt.lossless
    (4, 'int4', 7.0, False)
    """

    bits: int
    #: Whether every float32 value is a code (decoding gives its bits back).
    lossless = False

    @property
    @abstractmethod
    def name(self) -> str:
        """Preset name of the format."""

    @property
    @abstractmethod
    def max_value(self) -> float:
        """Largest finite value of the format."""

    @property
    @abstractmethod
    def spec(self) -> kernels.FormatSpec:
        """``(kind, bits, exponent_bits, mantissa_bits)`` for the kernels.

        ``kind`` is 0 for floats, 1 for integers, 2 for float32 itself; it
        and ``bits`` (or the exponent and mantissa widths of a float) name
        the format in serialised payloads (:func:`format_from_spec`).
        """

    @property
    @abstractmethod
    def pow2(self) -> float:
        """Power of two that decoding multiplies raw values by."""

    @abstractmethod
    def _quantize(
        self, x: torch.Tensor, rounding: str, key: int | None, offset: int = 0
    ) -> torch.Tensor:
        """Reference codes of a contiguous, finite float32 tensor (no checks).

        ``key`` is the stochastic rounding key and ``offset`` the index of
        ``x[0]`` in its random stream. The result may be a view of ``x``.
        """

    @abstractmethod
    def _decode_(
        self,
        buf: torch.Tensor,
        scale: float | None = None,
        shift: float | None = None,
        aligned: bool = False,
    ) -> torch.Tensor:
        """Decode the int32 codes in ``buf`` in place; return the float32 view.

        Float formats accept garbage in the bits of ``buf`` above ``bits``
        (the first shift discards it), or, with ``aligned=True``, codes that
        already sit in the top ``bits`` bits with garbage below; both save
        the unpacker a pass. Integer formats need clean codes.
        """

    def quantize(
        self,
        x: torch.Tensor,
        rounding: str = "nearest",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Codes of this format for finite ``x`` (cast to float32; beyond
        ``max_value`` it saturates), rounded ``"nearest"`` (ties to even) or
        ``"stochastic"`` (unbiased; keyed by ``generator``, see :func:`rounding_key`).

        Example
        -------
        >>> FloatFormat(8, 7).quantize(torch.tensor([1.0, -2.0]))
        tensor([16256, 49152], dtype=torch.int32)
        """
        _check_rounding(rounding)
        x32 = _as_float32(x)
        _finite_minmax(x32)
        key = rounding_key(generator) if rounding == "stochastic" else None
        return self._codes(x32, key)

    def _codes(self, x32: torch.Tensor, key: int | None = None) -> torch.Tensor:
        """Codes of contiguous float32 values (no checks; infinities saturate)."""
        flat = x32.reshape(-1)
        codes = torch.empty(flat.shape, dtype=torch.int32, device=flat.device)
        if kernels.native_for(flat):
            kernels.encode(flat, codes, self.spec, stochastic_key=key, packed=False)
            return codes.view(x32.shape)
        rounding = "nearest" if key is None else "stochastic"
        step = _chunk(flat.device, flat.numel())
        for start in range(0, flat.numel(), step):
            part = slice(start, start + step)
            codes[part] = self._quantize(flat[part], rounding, key, start)
        return codes.view(x32.shape)

    def dequantize(
        self,
        codes: torch.Tensor,
        scale: float | None = None,
        shift: float | None = None,
    ) -> torch.Tensor:
        """Decode codes to float32, then ``value * scale + shift`` (the same bits as
        decoding first and applying the float32 transform after).

        Example
        -------
        >>> FloatFormat(5, 10).dequantize(torch.tensor([15360, 48128]), 0.5, 1.0)
        tensor([1.5000, 0.5000])
        """
        _check_codes(codes, self.bits)
        buf = torch.empty(codes.shape, dtype=torch.int32, device=codes.device)
        buf.copy_(codes)
        if kernels.native_for(buf):
            out = torch.empty(codes.shape, dtype=torch.float32)
            factors, add = affine_plan(1.0, scale, shift)  # exact values
            return kernels.decode(buf, out, self.spec, factors, add, packed=False)
        return self._decode_(buf, scale, shift)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FloatFormat(Format):
    """Sign/exponent/mantissa float format (``exponent_bits`` 1 to 8,
    ``mantissa_bits`` >= 0, 2 to 16 bits in all) without inf/NaN codes.

    The bias is ``2**(exponent_bits - 1) - 1``; every exponent field is a
    finite binade but with 8 exponent bits, whose top field stays unused (it
    would overflow float32). ``-0.0`` keeps its sign bit, as native casts do.

    Example
    -------
    >>> fmt = FloatFormat(3, 7)
    >>> fmt.name, fmt.bits, fmt.bias, fmt.max_value
    ('e3m7', 11, 3, 31.875)
    """

    exponent_bits: int
    mantissa_bits: int

    def __post_init__(self) -> None:
        e = _as_width(self.exponent_bits, "exponent_bits")
        m = _as_width(self.mantissa_bits, "mantissa_bits")
        object.__setattr__(self, "exponent_bits", e)
        object.__setattr__(self, "mantissa_bits", m)
        if not 1 <= e <= 8:
            raise ValueError(f"exponent_bits must be in 1..8, got {e}")
        if m < 0:
            raise ValueError(f"mantissa_bits must be >= 0, got {m}")
        if not 2 <= 1 + e + m <= 16:
            raise ValueError(
                f"total width 1 + {e} + {m} = {1 + e + m} bits is outside 2..16"
            )

    @property
    def bits(self) -> int:  # type: ignore[override]
        """Code width: sign + exponent + mantissa."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        """Exponent bias ``2**(e-1) - 1``."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def name(self) -> str:
        """Preset name ``"e<E>m<M>"``."""
        return f"e{self.exponent_bits}m{self.mantissa_bits}"

    @property
    def max_value(self) -> float:
        """Largest finite value (the top exponent is finite, except for E8)."""
        e, m = self.exponent_bits, self.mantissa_bits
        top = 2**e - 1 if e < 8 else 254
        return 2.0 ** (top - self.bias) * (2.0 - 2.0**-m)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value ``2**(1 - bias)``."""
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value ``2**(1 - bias - mantissa_bits)``."""
        return 2.0 ** (1 - self.bias - self.mantissa_bits)

    @property
    def spec(self) -> kernels.FormatSpec:
        """``(0, bits, exponent_bits, mantissa_bits)``."""
        return 0, self.bits, self.exponent_bits, self.mantissa_bits

    @property
    def pow2(self) -> float:
        """``2**(127 - bias)``: float32 exponent field to this format's."""
        return 2.0 ** (127 - self.bias)

    def _quantize(
        self, x: torch.Tensor, rounding: str, key: int | None, offset: int = 0
    ) -> torch.Tensor:
        # Two roundings run on every element without masks or selects (bool
        # tensors are slow): the normal-range rounding of max(|x|, min_normal)
        # and the subnormal-range rounding of min(|x|, min_normal). Each gives
        # the code of min_normal, 2**m, outside its own range, so
        # ``normal + subnormal - 2**m`` is the right code everywhere.
        m, bias, bits = self.mantissa_bits, self.bias, self.bits
        drop = 23 - m  # float32 mantissa bits that are rounded away (>= 8)
        rebias = (127 - bias) << m
        ax = x.abs()
        small = ax.clamp(max=self.min_normal)
        ax.clamp_(self.min_normal, self.max_value)  # saturate: rounding <= max
        a = ax.view(torch.int32)
        if rounding == "stochastic":
            rnd = random_bits(key, offset, x.numel(), x.device)
            # Normal range: add uniform random bits below the kept mantissa.
            mag = rnd & ((1 << drop) - 1)
            mag += a
            mag >>= drop
            # Subnormal range: fixed point with ``frac`` fraction bits, so the
            # integer sum cannot overflow int32 (bias below 2**-frac ulp).
            frac = min(24, 30 - m)
            if bias - 1 + m + frac > 127:  # keep each factor a finite float32
                small.mul_(2.0 ** (bias - 1)).mul_(2.0 ** (m + frac))
            else:
                small.mul_(2.0 ** (bias - 1 + m + frac))
            sub = small.to(torch.int32)  # floor: values are non-negative
            rnd &= (1 << frac) - 1
            sub += rnd
            sub >>= frac
            mag += sub
            mag -= rebias + (1 << m)
        else:
            # Round half to even on the float32 bits; a carry out of the
            # mantissa correctly bumps the exponent.
            mag = a >> drop
            mag &= 1
            mag += a
            mag += (1 << (drop - 1)) - 1
            mag >>= drop
            # Adding d, whose ulp equals the subnormal spacing, makes the
            # float32 addition itself round half to even at that spacing.
            d_exp = 24 - bias - m
            small += 2.0**d_exp
            mag += small.view(torch.int32)
            mag -= rebias + ((127 + d_exp) << 23) + (1 << m)
        sign = x.view(torch.int32) >> 31
        sign &= 1 << (bits - 1)
        mag |= sign
        return mag

    def _decode_(
        self,
        buf: torch.Tensor,
        scale: float | None = None,
        shift: float | None = None,
        aligned: bool = False,
    ) -> torch.Tensor:
        # Move sign to bit 31 and exponent|mantissa to float32's positions:
        # a subnormal code becomes a float32 subnormal, which the power-of-two
        # rebias multiply turns into the exact value. ``aligned`` codes already
        # sit in the top bits, with garbage below them.
        k = 8 - self.exponent_bits
        keep = (1 << (31 - k)) - 1  # clears the sign smear of ``>>= k``...
        if aligned:
            keep &= ~((1 << (23 - self.mantissa_bits)) - 1)  # ...and the garbage
        else:
            buf <<= 32 - self.bits
        if k:
            buf >>= k  # arithmetic: smears the sign over k exponent bits
        if k or aligned:
            buf &= _INT32_MIN + keep
        out = buf.view(torch.float32)
        return _affine_(out, self.pow2, scale, shift)


@dataclass(frozen=True)
class IntFormat(Format):
    """Symmetric signed integers ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1`` in
    offset binary (``code = value + 2**(bits-1)``), used with a scale.

    Arguments
    ---------
    bits : int
        Code width, 2 to 16.

    Example
    -------
    >>> IntFormat(8).quantize(torch.tensor([-200.0, -1.5, 0.0, 2.5, 3.7]))
    tensor([  1, 126, 128, 130, 132], dtype=torch.int32)
    """

    bits: int

    def __post_init__(self) -> None:
        b = _as_width(self.bits, "bits")
        object.__setattr__(self, "bits", b)
        if not 2 <= b <= 16:
            raise ValueError(f"integer format width must be in 2..16, got {b}")

    @property
    def name(self) -> str:
        """Preset name ``"int<bits>"``."""
        return f"int{self.bits}"

    @property
    def max_value(self) -> float:
        """Largest value ``2**(bits-1) - 1``."""
        return float(2 ** (self.bits - 1) - 1)

    @property
    def spec(self) -> kernels.FormatSpec:
        """``(1, bits, 0, 0)``."""
        return 1, self.bits, 0, 0

    @property
    def pow2(self) -> float:
        """1: integer codes decode to their values directly."""
        return 1.0

    def _quantize(
        self, x: torch.Tensor, rounding: str, key: int | None, offset: int = 0
    ) -> torch.Tensor:
        top = self.max_value
        if rounding == "stochastic":
            # Round the magnitude in fixed point with ``frac`` fraction bits
            # (no int32 overflow; bias below 2**-frac), then restore the sign.
            frac = 31 - self.bits
            ay = x.abs()
            ay.clamp_(max=top)
            ay *= 2.0**frac
            codes = ay.to(torch.int32)  # floor: values are non-negative
            rnd = random_bits(key, offset, x.numel(), x.device)
            rnd &= (1 << frac) - 1
            codes += rnd
            codes >>= frac
            sign = x.view(torch.int32) >> 31  # 0 or -1
            codes ^= sign
            codes -= sign  # two's complement negation where negative
        else:
            y = x.clamp(-top, top)
            torch.round(y, out=y)  # half to even
            codes = y.to(torch.int32)
        codes += 2 ** (self.bits - 1)
        return codes

    def _decode_(
        self,
        buf: torch.Tensor,
        scale: float | None = None,
        shift: float | None = None,
        aligned: bool = False,
    ) -> torch.Tensor:
        if aligned:
            raise ValueError("integer codes must not be pre-aligned")
        out = buf.view(torch.float32)
        out.copy_(buf)  # elementwise int32 -> float32 in the same memory
        out -= 2 ** (self.bits - 1)
        return _affine_(out, 1.0, scale, shift)


@dataclass(frozen=True)
class Float32Format(Format):
    """The lossless format: the codes are the float32 bits themselves.

    An instrument rather than a compression: OMC's machinery runs on values
    that lose nothing, so a difference from float32 training is a mechanism's.
    Nothing rounds and no transform applies; encoding and decoding are copies.

    Example
    -------
    >>> x = torch.tensor([0.1, -0.0, 1e-45, 3e38])
    >>> codes = get_format("fp32").quantize(x, "stochastic")
    >>> bool((codes == x.view(torch.int32)).all())
    True
    """

    lossless = True

    @property
    def bits(self) -> int:  # type: ignore[override]
        """Code width: 32."""
        return 32

    @property
    def name(self) -> str:
        """Preset name ``"fp32"``."""
        return "fp32"

    @property
    def max_value(self) -> float:
        """float32's largest finite value."""
        return _F32_MAX

    @property
    def spec(self) -> kernels.FormatSpec:
        """``(2, 32, 8, 23)``."""
        return 2, 32, 8, 23

    @property
    def pow2(self) -> float:
        """1: codes are the values' bits."""
        return 1.0

    def _quantize(
        self, x: torch.Tensor, rounding: str, key: int | None, offset: int = 0
    ) -> torch.Tensor:
        return x.view(torch.int32)  # every float32 is a code: nothing rounds

    def _decode_(
        self,
        buf: torch.Tensor,
        scale: float | None = None,
        shift: float | None = None,
        aligned: bool = False,
    ) -> torch.Tensor:
        return _affine_(buf.view(torch.float32), 1.0, scale, shift)


def format_from_spec(kind: int, p1: int, p2: int) -> Format:
    """The format a serialised ``(kind, p1, p2)`` names: float ``(0, E, M)``,
    integer ``(1, bits, 0)``, float32 ``(2, 32, 0)``.

    Example
    -------
    >>> format_from_spec(0, 3, 7), format_from_spec(2, 32, 0)
    (FloatFormat(exponent_bits=3, mantissa_bits=7), Float32Format())
    """
    if kind == 0:
        return FloatFormat(p1, p2)
    if kind == 1 and p2 == 0:
        return IntFormat(p1)
    if kind == 2 and (p1, p2) == (32, 0):
        return Float32Format()
    raise ValueError(f"unknown format spec ({kind}, {p1}, {p2})")


def serial_spec(fmt: Format) -> tuple[int, int, int]:
    """The ``(kind, p1, p2)`` that name ``fmt`` in payloads (inverse of
    :func:`format_from_spec`).

    Example
    -------
    >>> serial_spec(get_format("int8")), serial_spec(get_format("fp32"))
    ((1, 8, 0), (2, 32, 0))
    """
    if isinstance(fmt, FloatFormat):
        return 0, fmt.exponent_bits, fmt.mantissa_bits
    if isinstance(fmt, IntFormat):
        return 1, fmt.bits, 0
    if isinstance(fmt, Float32Format):
        return 2, 32, 0
    raise TypeError(f"cannot serialise format of type {type(fmt).__name__}")


_ALIASES = {
    "fp16": (5, 10),
    "float16": (5, 10),
    "half": (5, 10),
    "bf16": (8, 7),
    "bfloat16": (8, 7),
}

#: Named presets (any ``"e<E>m<M>"`` or ``"int<N>"`` spelling is accepted too).
FORMAT_PRESETS = {
    "fp16": FloatFormat(5, 10),
    "bf16": FloatFormat(8, 7),
    "e5m10": FloatFormat(5, 10),
    "e8m7": FloatFormat(8, 7),
    "e4m7": FloatFormat(4, 7),
    "e3m7": FloatFormat(3, 7),
    "e4m3": FloatFormat(4, 3),
    "e5m2": FloatFormat(5, 2),
    "e2m5": FloatFormat(2, 5),
    "int8": IntFormat(8),
    "int4": IntFormat(4),
}

_FLOAT_RE = re.compile(r"e(\d+)m(\d+)")
_INT_RE = re.compile(r"int(\d+)")


def get_format(fmt: str | Format) -> Format:
    """The format a preset name gives, any case (a :class:`Format` passes
    through): ``"fp16"``/``"float16"``/``"half"``, ``"bf16"``/``"bfloat16"``,
    ``"e<E>m<M>"``, ``"int<N>"`` and the lossless ``"fp32"`` (``"e8m23"``).
    ``"float32"`` is not a format: it names what is not compressed.

    Example
    -------
    >>> get_format("bf16"), get_format("INT4"), get_format("fp32")
    (FloatFormat(exponent_bits=8, mantissa_bits=7), IntFormat(bits=4), Float32Format())
    """
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a str or Format, got {type(fmt).__name__}")
    key = fmt.strip().lower()
    if key in ("fp32", "e8m23"):
        return Float32Format()
    if key in _ALIASES:
        return FloatFormat(*_ALIASES[key])
    match = _FLOAT_RE.fullmatch(key)
    if match:
        return FloatFormat(int(match.group(1)), int(match.group(2)))
    match = _INT_RE.fullmatch(key)
    if match:
        return IntFormat(int(match.group(1)))
    raise ValueError(
        f"unknown format {fmt!r}; use 'fp16', 'bf16', 'e<E>m<M>' (e.g. 'e4m3', "
        "'e3m7') or 'int<N>' (e.g. 'int8'), with 2 to 16 bits in total, or "
        "'fp32' (lossless)"
    )
