"""OMC configuration: one validated object that a YAML ``omc:`` entry builds.

In a recipe's hparams each argument is a flat key ``omc_<argument>``, so
that ``--omc_format=e4m7`` overrides it (the whole block is
``hparams/omc.yaml``)::

    omc_format: e3m7
    omc: !new:speechbrain_omc.OMCConfig
        format: !ref <omc_format>
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from speechbrain_omc.codec.formats import get_format
from speechbrain_omc.engine.rules import StateStorage

ROUNDINGS = ("nearest", "stochastic")
TRANSFORMS = ("none", "scale", "affine")
CLIPS = ("absmax", "mse")
FP32_POLICIES = ("fixed", "largest", "smallest", "random")
UPDATE_MODES = ("fused", "simple")
NONFINITE_ACTIONS = ("skip", "raise")
PLAN_CHANGE_ACTIONS = ("error", "recompress")
CLIPPINGS = ("deferred", "previous_norm", "per_parameter", "two_pass")
HELD_GRAD_FORMATS = ("auto", "bf16", "fp32")
STATE_BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(
            f"OMCConfig: {name}={value!r} is not one of {', '.join(choices)}"
        )


def _check_format(name: str, value) -> None:
    try:
        get_format(value)
    except (ValueError, TypeError) as error:
        raise type(error)(f"OMCConfig: {name}={value!r}: {error}") from None


def _as_tuple(name: str, value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"OMCConfig: {name} must be a list of strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class OMCConfig:
    """What is compressed, in which format, and how it is updated.

    Arguments
    ---------
    format : str
        Default format (``"e3m7"``, ``"bf16"``, ``"int8"``...; ``"fp32"`` is lossless).
    rounding : str
        Of a first compression: ``"nearest"`` or ``"stochastic"``.
    update_rounding : str
        After each update; stochastic by default (nearest drops small updates).
    transform : str
        ``"none"``, ``"scale"`` or ``"affine"``.
    clip : str
        How the scale is fitted: ``"absmax"`` or ``"mse"``.
    weights_only : bool
        Compress weight matrices only (role ``"matrix"``).
    include, exclude : list of str
        fnmatch patterns of candidate parameter names.
    format_overrides : dict
        ``{pattern: format}``; the first match picks the format.
    fp32_fraction : float
        Partial quantization: fraction of the candidates' values kept float32.
    fp32_policy : str
        ``"fixed"``, ``"largest"``, ``"smallest"`` or ``"random"``.
    fp32_patterns : list of str
        Parameters always kept float32.
    seed : int
    update_mode : str
        ``"fused"`` (updated in backward) or ``"simple"`` (any optimizer).
    state_format : str or dict, optional
        Format of fused mode's optimizer state (``None``: float32).
    state_block : int
        Values per scale of compressed state (a power of two >= 16).
    state_sqrt : bool
        Store Adam's second moment as its square root.
    fused_clipping : str
        How fused mode honours ``max_grad_norm``: ``"deferred"``,
        ``"previous_norm"``, ``"per_parameter"`` or ``"two_pass"``.
    held_grad_format : str
        Held gradients: ``"auto"``, ``"bf16"`` or ``"fp32"``.
    nonfinite_grad : str
        ``"skip"`` the update with a warning, or ``"raise"``.
    on_plan_change : str
        A checkpoint entry that does not fit the plan: ``"error"`` or ``"recompress"``.

    Example
    -------
    >>> OMCConfig(format="e3m7", fp32_fraction=0.1).bits_of("encoder.linear.weight")
    11
    >>> OMCConfig(update_mode="lazy")
    Traceback (most recent call last):
    ...
    ValueError: OMCConfig: update_mode='lazy' is not one of fused, simple
    """

    format: str = "e3m7"
    rounding: str = "nearest"
    update_rounding: str = "stochastic"
    transform: str = "scale"
    clip: str = "absmax"
    weights_only: bool = True
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    format_overrides: Mapping[str, str] = field(default_factory=dict)
    fp32_fraction: float = 0.0
    fp32_policy: str = "largest"
    fp32_patterns: Sequence[str] = ()
    seed: int = 0
    update_mode: str = "fused"
    state_format: str | Mapping[str, str] | None = None
    state_block: int = 256
    state_sqrt: bool = True
    fused_clipping: str = "deferred"
    held_grad_format: str = "auto"
    nonfinite_grad: str = "skip"
    on_plan_change: str = "error"

    def __post_init__(self):
        _check_format("format", self.format)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        _check_choice("update_rounding", self.update_rounding, ROUNDINGS)
        _check_choice("transform", self.transform, TRANSFORMS)
        _check_choice("clip", self.clip, CLIPS)
        _check_choice("fp32_policy", self.fp32_policy, FP32_POLICIES)
        _check_choice("update_mode", self.update_mode, UPDATE_MODES)
        _check_choice("nonfinite_grad", self.nonfinite_grad, NONFINITE_ACTIONS)
        _check_choice("on_plan_change", self.on_plan_change, PLAN_CHANGE_ACTIONS)
        if not 0.0 <= float(self.fp32_fraction) <= 1.0:
            raise ValueError(
                f"OMCConfig: fp32_fraction must be in [0, 1], got {self.fp32_fraction}"
            )
        object.__setattr__(self, "include", _as_tuple("include", self.include))
        object.__setattr__(self, "exclude", _as_tuple("exclude", self.exclude))
        object.__setattr__(
            self, "fp32_patterns", _as_tuple("fp32_patterns", self.fp32_patterns)
        )
        if not isinstance(self.format_overrides, Mapping):
            raise TypeError("OMCConfig: format_overrides must be a mapping")
        overrides = dict(self.format_overrides)
        for pattern, fmt in overrides.items():
            _check_format(f"format_overrides[{pattern!r}]", fmt)
        object.__setattr__(self, "format_overrides", overrides)
        formats = self.state_format
        if formats is not None and not isinstance(formats, (str, Mapping)):
            raise TypeError(
                "OMCConfig: state_format must be a format, a {buffer: format} "
                f"mapping or null, got {formats!r}"
            )
        if isinstance(formats, Mapping):
            unknown = sorted(set(formats) - set(STATE_BUFFERS))
            if unknown:
                raise ValueError(
                    f"OMCConfig: state_format names unknown buffers {unknown}; "
                    f"use {', '.join(STATE_BUFFERS)}"
                )
            object.__setattr__(self, "state_format", dict(formats))
            for name, fmt in formats.items():
                _check_format(f"state_format[{name!r}]", fmt)
        elif formats is not None:
            _check_format("state_format", formats)
        block = self.state_block
        if (
            isinstance(block, bool)
            or not isinstance(block, int)
            or block < 16
            or (block & (block - 1))
        ):
            raise ValueError(
                f"OMCConfig: state_block must be a power of two >= 16, got {block!r}"
            )
        _check_choice("fused_clipping", self.fused_clipping, CLIPPINGS)
        _check_choice("held_grad_format", self.held_grad_format, HELD_GRAD_FORMATS)
        if self.fp32_policy == "fixed" and not self.fp32_patterns:
            if self.fp32_fraction > 0:
                raise ValueError(
                    "OMCConfig: fp32_policy='fixed' names its float32 parameters "
                    "in fp32_patterns; none were given"
                )

    def state_storage(self):
        """How fused mode keeps optimizer state.

        Example
        -------
        >>> OMCConfig(state_format="e4m3").state_storage().formats["exp_avg"]
        'e4m3'
        """
        formats = self.state_format
        if isinstance(formats, str):
            formats = dict.fromkeys(STATE_BUFFERS, formats)
        return StateStorage(
            formats=dict(formats or {}),
            block=self.state_block,
            sqrt_second_moment=self.state_sqrt,
        )

    def format_of(self, name: str) -> str:
        """The format of parameter ``name``: the first matching override's, else
        the default.

        Example
        -------
        >>> OMCConfig(format_overrides={"*embedding*": "bf16"}).format_of("emb")
        'e3m7'
        """
        from fnmatch import fnmatchcase

        for pattern, fmt in self.format_overrides.items():
            if fnmatchcase(name, pattern):
                return fmt
        return self.format

    def bits_of(self, name: str) -> int:
        """Width in bits of the format of parameter ``name``.

        Example
        -------
        >>> OMCConfig(format="bf16").bits_of("w")
        16
        """
        return get_format(self.format_of(name)).bits
