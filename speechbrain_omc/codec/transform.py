"""Per-variable transformation (PVT): move a variable into its format's range.

Each compressed variable gets its own affine map, kept in float32:
``"none"`` (0 bytes), ``"scale"`` (``y = x / scale``, the absolute maximum
or an MSE-optimal clip onto ``max_value``, 4 bytes) or ``"affine"``
(``y = (x - shift) / scale`` around the centre of ``[min, max]``, 8 bytes).
Decoding computes ``y * scale + shift`` in float32. A lossless format gets
none (:func:`kind_for`).

Example
-------
>>> import torch
>>> from speechbrain_omc.codec.formats import get_format
>>> x = torch.tensor([-0.5, 0.25, 2.0])
>>> t = fit_transform(x, get_format("int8"), "scale")
>>> t.kind, t.nbytes, t.forward(x).max().item()
('scale', 4, 127.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .formats import (
    _F32_MAX,
    _F32_MIN_NORMAL,
    Format,
    _as_float32,
    _finite_minmax,
    _to_f32,
    affine_plan,
    get_format,
)

__all__ = [
    "Transform",
    "fit_transform",
    "kind_for",
    "TRANSFORM_KINDS",
    "CLIP_METHODS",
]

TRANSFORM_KINDS = ("none", "scale", "affine")
CLIP_METHODS = ("absmax", "mse")

# Candidate clips for clip="mse", as fractions of the absolute maximum (or
# half-range). Coarse on purpose: the search costs one quantization each.
_MSE_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3)
# The search measures the error on at most this many evenly strided values.
_MSE_SAMPLE = 1 << 16

_NBYTES = {"none": 0, "scale": 4, "affine": 8}


@dataclass(frozen=True)
class Transform:
    """Fitted per-variable transformation; ``scale`` and ``shift`` are float32.

    Arguments
    ---------
    kind : str
        ``"none"``, ``"scale"`` or ``"affine"``.
    scale : float
        Positive finite decoding multiplier (1 for ``"none"``).
    shift : float
        Decoding offset (0 unless ``"affine"``).

    Example
    -------
    >>> t = Transform("affine", scale=0.5, shift=1.0)
    >>> y = t.forward(torch.tensor([0.0, 1.0, 3.0]))
    >>> t.nbytes, y, t.inverse(y)
    (8, tensor([-2.,  0.,  4.]), tensor([0., 1., 3.]))
    """

    kind: str = "none"
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in TRANSFORM_KINDS:
            raise ValueError(
                f"transform kind must be one of {TRANSFORM_KINDS}, got {self.kind!r}"
            )
        scale, shift = float(self.scale), float(self.shift)
        if not (math.isfinite(scale) and 0.0 < scale <= _F32_MAX):
            raise ValueError(f"scale must be positive and finite, got {scale}")
        if not (math.isfinite(shift) and abs(shift) <= _F32_MAX):
            raise ValueError(f"shift must be finite, got {shift}")
        scale, shift = _to_f32(scale), _to_f32(shift)
        if scale == 0.0:
            raise ValueError(f"scale {self.scale} underflows float32")
        if self.kind == "none" and scale != 1.0:
            raise ValueError("transform 'none' must have scale 1.0")
        if self.kind != "affine" and shift != 0.0:
            raise ValueError(f"transform {self.kind!r} cannot have a shift")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "shift", shift)

    @property
    def nbytes(self) -> int:
        """Storage of the parameters: 4 bytes per float32 number."""
        return _NBYTES[self.kind]

    @property
    def params(self) -> tuple[float, ...]:
        """The stored numbers: ``()``, ``(scale,)`` or ``(scale, shift)``."""
        if self.kind == "none":
            return ()
        if self.kind == "scale":
            return (self.scale,)
        return (self.scale, self.shift)

    @classmethod
    def from_params(cls, kind: str, params: tuple[float, ...]) -> Transform:
        """Rebuild a transform from ``kind`` and :attr:`params`.

        Example
        -------
        >>> Transform.from_params("scale", (0.25,))
        Transform(kind='scale', scale=0.25, shift=0.0)
        """
        expected = _NBYTES.get(kind, -4) // 4
        if len(params) != expected:
            raise ValueError(
                f"transform {kind!r} takes {expected} parameter(s), got {len(params)}"
            )
        return cls(kind, *params)

    @property
    def decode_args(self) -> tuple[float | None, float | None]:
        """``(scale, shift)``, ``None`` where absent.

        What :meth:`Format.dequantize` applies, and what the codec's encoding
        kernel inverts (``(x - shift) / scale``, as :meth:`forward`).
        """
        return (
            None if self.kind == "none" else self.scale,
            self.shift if self.kind == "affine" else None,
        )

    @cached_property
    def decode_plan(self) -> tuple[tuple[float, ...], float | None]:
        """:attr:`decode_args` as the kernels apply them: ``(factors, shift)``.

        See :func:`~speechbrain_omc.codec.formats.affine_plan`; computed once per
        transform, which every decode of a weight reuses until it is written.
        """
        return affine_plan(1.0, *self.decode_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map float32 values into the format's domain: ``(x - shift) / scale``."""
        if self.kind == "none":
            return x
        if self.kind == "scale":
            return x / self.scale
        y = x - self.shift
        y /= self.scale
        return y

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Map format values back: ``y * scale + shift`` in float32."""
        if self.kind == "none":
            return y
        out = y * self.scale
        if self.kind == "affine":
            out += self.shift
        return out


def kind_for(fmt: str | Format, kind: str) -> str:
    """The transform a variable in ``fmt`` gets when ``kind`` is asked for:
    ``kind``, but ``"none"`` for a lossless format (a scale would round).

    Example
    -------
    >>> kind_for("e3m7", "scale"), kind_for("fp32", "scale")
    ('scale', 'none')
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(
            f"transform kind must be one of {TRANSFORM_KINDS}, got {kind!r}"
        )
    return "none" if get_format(fmt).lossless else kind


def _scale_for(extent: float, fmt: Format) -> float:
    """float32 scale mapping ``extent`` onto ``fmt.max_value`` (never zero)."""
    if extent <= 0.0:
        return 1.0  # all-zero (or constant) variable: nothing to scale
    return max(_to_f32(extent / fmt.max_value), _F32_MIN_NORMAL)


def _mse_extent(
    x: torch.Tensor, fmt: Format, kind: str, extent: float, shift: float
) -> float:
    """Pick the clip (fraction of ``extent``) with the least quantisation MSE."""
    flat = x.reshape(-1)
    if flat.numel() > _MSE_SAMPLE:
        flat = flat[:: -(-flat.numel() // _MSE_SAMPLE)]
    flat = flat.contiguous()
    best, best_err = extent, math.inf
    for frac in _MSE_GRID:
        cand = extent * frac
        t = Transform(kind, _scale_for(cand, fmt), shift if kind == "affine" else 0.0)
        codes = fmt._codes(t.forward(flat).contiguous())  # inf saturates
        approx = fmt.dequantize(codes, *t.decode_args)
        err = float(torch.sub(approx, flat).double().square().mean())
        if err < best_err:  # strict: ties keep the larger clip
            best, best_err = cand, err
    return best


def fit_transform(
    x: torch.Tensor,
    fmt: str | Format,
    kind: str = "scale",
    clip: str = "absmax",
    *,
    minmax: tuple[float, float] | None = None,
) -> Transform:
    """Fit the per-variable transformation of ``x`` for format ``fmt``.

    Arguments
    ---------
    x : torch.Tensor
        Finite values.
    fmt : str or Format
        Target format (its ``max_value`` is the target extent).
    kind : str
        ``"none"``, ``"scale"`` or ``"affine"``.
    clip : str
        ``"absmax"`` maps the extreme onto ``max_value``; ``"mse"`` keeps the
        clip between 30 % and 100 % of it with the smallest squared error.
    minmax : tuple of float, optional
        Precomputed ``(min, max)`` of ``x``.

    Returns
    -------
    Transform
        Scale 1 for an all-zero (affine: constant) variable; never below
        ``2**-126``.

    Example
    -------
    >>> fit_transform(torch.tensor([1.0, 2.0, 3.0]), "int8", "affine")
    Transform(kind='affine', scale=0.007874015718698502, shift=2.0)
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(
            f"transform kind must be one of {TRANSFORM_KINDS}, got {kind!r}"
        )
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")
    fmt = get_format(fmt)
    if kind == "none":
        return Transform()
    if fmt.lossless:
        if minmax is None:  # non-finite input is an error, as for a scale
            _finite_minmax(_as_float32(x))
        return Transform()
    # With the extremes given, absmax never reads the values (a fused
    # update measured them in its own pass).
    x32 = _as_float32(x) if minmax is None or clip == "mse" else None
    lo, hi = _finite_minmax(x32) if minmax is None else minmax
    if kind == "scale":
        shift = 0.0
        extent = max(abs(lo), abs(hi))
    else:
        shift = _to_f32((lo + hi) / 2.0)
        # Half-range measured from the rounded centre, so both ends fit.
        extent = max(hi - shift, shift - lo)
    if clip == "mse" and extent > 0.0:
        extent = _mse_extent(x32, fmt, kind, extent, shift)
    return Transform(kind, _scale_for(extent, fmt), shift)
