"""OMC configuration: one validated object that a YAML ``omc:`` entry builds.

In a recipe's hparams every argument is a flat key ``omc_<argument>``, so
that ``--omc_format=e4m7`` on the command line overrides it like any
SpeechBrain hyperparameter; the ``omc:`` entry wires them (the complete block
is ``hparams/omc.yaml``)::

    omc_format: e3m7
    omc_fp32_fraction: 0.1
    omc_update_mode: fused
    omc: !new:speechbrain_omc.OMCConfig
        format: !ref <omc_format>
        fp32_fraction: !ref <omc_fp32_fraction>
        update_mode: !ref <omc_update_mode>
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
        Default number format of compressed parameters, a preset name such as
        ``"e3m7"`` (11 bits), ``"bf16"``, ``"e4m3"`` or ``"int8"``. ``"fp32"``
        is the lossless format (32-bit codes that are the float32 bits; no
        transform, no rounding): a twin that must train what float32 trains.
    rounding : str
        Rounding of the first compression of a value: ``"nearest"`` or
        ``"stochastic"``.
    update_rounding : str
        Rounding of the re-compression after each update. Stochastic by
        default: nearest rounding drops SGD updates smaller than half a unit
        in the last place.
    transform : str
        Per-variable transformation: ``"none"``, ``"scale"`` or ``"affine"``.
    clip : str
        How the scale is fitted: ``"absmax"`` or ``"mse"``.
    weights_only : bool
        Weight-matrices-only quantization: compress only weight matrices
        (role ``"matrix"``: ``ndim >= 2``, not held by a normalisation layer,
        not a position bias); biases, normalisation gains and shifts (of any
        shape) and position biases such as ``RelPosMHAXL.pos_bias_u`` stay
        float32. The rules are :mod:`speechbrain_omc.engine.selection`'s
        (:func:`~speechbrain_omc.engine.selection.role_of`).
    include, exclude : list of str
        fnmatch patterns on parameter names; a parameter is a candidate when
        it matches some ``include`` and no ``exclude`` pattern.
    format_overrides : dict
        ``{pattern: format}``; the first matching pattern picks the format.
    fp32_fraction : float
        Partial parameter quantization: fraction of the candidates' values
        left in float32 (0 keeps none).
    fp32_policy : str
        Which candidates stay float32: ``"fixed"`` (``fp32_patterns``),
        ``"largest"``/``"smallest"`` first, or ``"random"``, re-drawn from
        ``(seed, round, client)``.
    fp32_patterns : list of str
        Patterns of parameters kept float32 (always honoured; the whole
        selection with ``fp32_policy="fixed"``).
    seed : int
        Seed of the random policy and of stochastic rounding.
    update_mode : str
        ``"fused"``: the SGD update of a compressed parameter happens in its
        backward; ``"simple"``: any torch optimizer updates the compressed
        parameters (each in-place update decodes and re-encodes).
    state_format : str or dict, optional
        Format of fused mode's optimizer state (SGD's ``momentum_buffer``,
        Adam's ``exp_avg`` and ``exp_avg_sq``): one format for every
        buffer, or ``{buffer: format}``; ``None`` keeps float32. Stored with
        one float32 scale per ``state_block`` values (all 1, and no square
        root, in the lossless ``"fp32"``).
    state_block : int
        Values per scale of the compressed state (a power of two >= 16).
    state_sqrt : bool
        Store Adam's second moment as its square root (half the range).
    fused_clipping : str
        How fused mode honours the Brain's ``max_grad_norm``:
        ``"deferred"`` (default) holds each compressed gradient until
        backward ends and clips them all by the step's global norm, as
        SpeechBrain does (bit for bit with lossless weights; costs the held
        gradients' memory, see ``held_grad_format``); ``"previous_norm"``
        scales each update by the previous step's gradient norm (no extra
        cost; the first step clips per parameter),
        ``"per_parameter"`` clips each parameter's gradient on its own,
        ``"two_pass"`` runs forward and backward twice (the first measures
        the global norm), as LOMO does.
    held_grad_format : str
        Storage of the gradients deferred clipping holds: ``"auto"``
        (bfloat16, float32 for lossless ``fp32`` weights), ``"bf16"`` or
        ``"fp32"``.
    nonfinite_grad : str
        What a non-finite gradient of a compressed parameter does: ``"skip"``
        the update with a warning, or ``"raise"``.
    on_plan_change : str
        What loading a checkpoint whose compressed entries do not fit the
        current plan does (another format, or compressed where the plan now
        keeps float32): ``"error"`` names them; ``"recompress"`` decodes
        them and compresses again under the current plan, with a log line.

    Example
    -------
    >>> config = OMCConfig(format="e3m7", fp32_fraction=0.1)
    >>> config.bits_of("encoder.linear.weight")
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
        """How fused mode keeps optimizer state (a ``StateStorage``).

        Returns
        -------
        StateStorage

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
        """Name of the format a parameter called ``name`` is compressed in.

        Arguments
        ---------
        name : str
            Qualified parameter name.

        Returns
        -------
        str
            The first matching override's format, else the default.

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

        Arguments
        ---------
        name : str
            Qualified parameter name.

        Returns
        -------
        int

        Example
        -------
        >>> OMCConfig(format="bf16").bits_of("w")
        16
        """
        return get_format(self.format_of(name)).bits
