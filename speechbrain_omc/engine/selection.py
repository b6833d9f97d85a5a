"""Which parameters are compressed, and in which format.

Pure functions from ``(name, shape)`` pairs, their *roles* (:data:`ROLES`:
``"matrix"``, ``"vector"``, ``"normalisation"``, ``"position bias"``) and an
:class:`OMCConfig` to a :class:`Plan`. Roles are the one thing that needs
the model (:func:`parameter_roles`); whoever has it hands them on, so that a
plan is the same function of ``(names, shapes, roles, config, round,
client)`` wherever it is computed (a federated server included).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from speechbrain_omc.codec.formats import get_format
from speechbrain_omc.codec.transform import Transform, kind_for
from speechbrain_omc.engine.config import OMCConfig

#: What a parameter is for; under ``weights_only`` only ``"matrix"`` is
#: compressed.
ROLES = ("matrix", "vector", "normalisation", "position bias")

# The documented rules that give a parameter a role other than the one its
# shape suggests. Extend them here, nowhere else.

#: Modules whose own parameters are normalisation gains and shifts, whatever
#: their shape (SpeechBrain's ``LayerNorm`` over ``(time, channels)`` in its
#: CNN blocks has 2-D ones). SpeechBrain's normalisation wrappers
#: (``sb.nnet.normalization.LayerNorm``...) hold one of these.
NORMALISATION_TYPES: tuple[type[torch.nn.Module], ...] = tuple(
    cls
    for cls in (
        torch.nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
        torch.nn.LayerNorm,
        torch.nn.GroupNorm,
        torch.nn.LocalResponseNorm,
        getattr(torch.nn, "RMSNorm", None),  # torch >= 2.4
    )
    if cls is not None
)

#: A module whose class name ends with this is a normalisation layer too:
#: models define their own (SpeechBrain's Conv-TasNet ``GlobalLayerNorm``,
#: ``ChannelwiseLayerNorm``, with ``(1, 1, N)`` gains).
NORMALISATION_CLASS_SUFFIX = "Norm"

#: fnmatch patterns on a parameter's own name (the last part of its qualified
#: name) that mark learned position biases: ``RelPosMHAXL``'s per-head
#: ``pos_bias_u`` and ``pos_bias_v``, 2-D but added to queries, not
#: multiplied.
POSITION_BIAS_PATTERNS = ("pos_bias_u", "pos_bias_v")


@dataclass(frozen=True)
class PlanEntry:
    """One parameter of a plan: ``format`` is ``None`` for float32, ``nbytes``
    exact under the plan, ``reason`` the rule that decided.
    """

    name: str
    shape: tuple[int, ...]
    format: str | None
    nbytes: int
    role: str = ""
    reason: str = ""

    @property
    def numel(self) -> int:
        """Number of values."""
        return math.prod(self.shape)

    @property
    def compressed(self) -> bool:
        """Whether the parameter is stored compressed."""
        return self.format is not None


@dataclass(frozen=True)
class Plan:
    """The outcome of selection: every parameter, compressed or float32.

    Arguments
    ---------
    entries : tuple of PlanEntry
        In the module's parameter order.
    """

    entries: tuple[PlanEntry, ...]

    @property
    def compressed(self) -> tuple[PlanEntry, ...]:
        """Entries stored compressed."""
        return tuple(e for e in self.entries if e.compressed)

    @property
    def uncompressed(self) -> tuple[PlanEntry, ...]:
        """Entries left in float32."""
        return tuple(e for e in self.entries if not e.compressed)

    @property
    def nbytes(self) -> int:
        """Total bytes of all parameters under the plan."""
        return sum(e.nbytes for e in self.entries)

    @property
    def float32_nbytes(self) -> int:
        """Bytes of the same parameters all in float32."""
        return sum(4 * e.numel for e in self.entries)

    def __getitem__(self, name: str) -> PlanEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def table(self) -> str:
        """The plan as a text table, with totals against float32 and the reasons.

        Example
        -------
        >>> plan = make_plan([("w", (4, 3)), ("b", (4,))], OMCConfig())
        >>> print(plan.table())  # doctest: +NORMALIZE_WHITESPACE
        parameter  shape  values  format   bytes  why
        w          4x3        12  e3m7        21  matrix
        b          4           4  float32     16  WMOQ: vector
        ------------------------------------------------------
        total                 16              37
        1/2 parameters (75.0% of values) compressed; 37 bytes against 64 in
        float32 (57.8%, 42.2% saved, 18.50 bits per value)
        float32 because: WMOQ: vector 1
        """
        header = ("parameter", "shape", "values", "format", "bytes", "why")
        rows = [header]
        for e in self.entries:
            shape = "x".join(str(s) for s in e.shape) or "scalar"
            rows.append(
                (
                    e.name,
                    shape,
                    f"{e.numel:,}",
                    e.format or "float32",
                    f"{e.nbytes:,}",
                    e.reason,
                )
            )
        total = sum(e.numel for e in self.entries)
        rows.append(("total", "", f"{total:,}", "", f"{self.nbytes:,}", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = []
        for i, row in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
            lines.append(
                "  ".join(
                    cell.ljust(w) if j in (0, 1, 3, 5) else cell.rjust(w)
                    for j, (cell, w) in enumerate(zip(row, widths))
                ).rstrip()
            )
        ratio = self.nbytes / max(self.float32_nbytes, 1)
        compressed_values = sum(e.numel for e in self.compressed)
        lines.append(
            f"{len(self.compressed)}/{len(self.entries)} parameters "
            f"({compressed_values / max(total, 1):.1%} of values) compressed; "
            f"{self.nbytes:,} bytes against {self.float32_nbytes:,} in float32 "
            f"({ratio:.1%}, {1 - ratio:.1%} saved, "
            f"{8 * self.nbytes / max(total, 1):.2f} bits per value)"
        )
        reasons = Counter(e.reason for e in self.uncompressed if e.reason)
        if reasons:
            lines.append(
                "float32 because: "
                + ", ".join(f"{reason} {n}" for reason, n in reasons.items())
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def compressed_nbytes(numel: int, fmt: str, transform: str) -> int:
    """Exact bytes of a compressed variable: packed codes plus its transform.

    Example
    -------
    >>> compressed_nbytes(10, "e3m7", "scale"), compressed_nbytes(10, "fp32", "scale")
    (18, 40)
    """
    kind = kind_for(fmt, transform)
    return math.ceil(numel * get_format(fmt).bits / 8) + Transform(kind).nbytes


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _check_patterns_match(names: Sequence[str], config: OMCConfig) -> None:
    """A pattern that matches no parameter is almost always a typo."""
    groups = {
        "include": [p for p in config.include if p != "*"],
        "exclude": list(config.exclude),
        "format_overrides": list(config.format_overrides),
        "fp32_patterns": list(config.fp32_patterns),
    }
    for field_name, patterns in groups.items():
        for pattern in patterns:
            if not any(fnmatchcase(n, pattern) for n in names):
                sample = ", ".join(list(names)[:5])
                raise ValueError(
                    f"OMCConfig.{field_name}: pattern {pattern!r} matches no "
                    f"parameter (names look like: {sample}, ...)"
                )


def _own_name(name: str) -> str:
    return name.rpartition(".")[2]


def is_normalisation(module: torch.nn.Module) -> bool:
    """Whether ``module``'s own parameters are normalisation gains and shifts.

    Example
    -------
    >>> is_normalisation(torch.nn.LayerNorm(4)), is_normalisation(torch.nn.Linear(2, 2))
    (True, False)
    """
    return isinstance(module, NORMALISATION_TYPES) or type(module).__name__.endswith(
        NORMALISATION_CLASS_SUFFIX
    )


def role_of(
    name: str, shape: Sequence[int], owner: torch.nn.Module | None = None
) -> str:
    """The role of one parameter: ``"normalisation"`` of a normalisation
    ``owner``, ``"position bias"`` by name, else ``"matrix"`` from 2 dimensions.

    Example
    -------
    >>> norm = torch.nn.LayerNorm((10, 16))
    >>> role_of("norm.weight", (10, 16)), role_of("norm.weight", (10, 16), norm)
    ('matrix', 'normalisation')
    """
    if owner is not None and is_normalisation(owner):
        return "normalisation"
    if any(fnmatchcase(_own_name(name), p) for p in POSITION_BIAS_PATTERNS):
        return "position bias"
    return "matrix" if len(shape) >= 2 else "vector"


def parameter_roles(module: torch.nn.Module) -> dict[str, str]:
    """The role of every parameter of a module (a shared parameter once).

    Example
    -------
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm((2, 4)))
    >>> parameter_roles(model)  # doctest: +NORMALIZE_WHITESPACE
    {'0.weight': 'matrix', '0.bias': 'vector',
     '1.weight': 'normalisation', '1.bias': 'normalisation'}
    """
    owners: dict[int, torch.nn.Module] = {}
    # named_modules() visits modules in the order named_parameters() names
    # their parameters, so the first owner seen is the one that names it.
    for owner in module.modules():
        for param in owner._parameters.values():
            if param is not None:
                owners.setdefault(id(param), owner)
    return {
        name: role_of(name, tuple(param.shape), owners[id(param)])
        for name, param in module.named_parameters()
    }


def resolve_roles(
    shapes: Sequence[tuple[str, tuple[int, ...]]],
    roles: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Every parameter's role: the given ones, checked, else :func:`role_of`.

    Example
    -------
    >>> shapes = [("ln.weight", (10, 16)), ("ln.bias", (10, 16))]
    >>> resolve_roles(shapes, {"ln.weight": "normalisation"})
    {'ln.weight': 'normalisation', 'ln.bias': 'matrix'}
    """
    if roles is not None and not isinstance(roles, Mapping):
        raise TypeError(f"roles must be a mapping of name to role, got {roles!r}")
    roles = dict(roles or {})
    dims = {name: len(shape) for name, shape in shapes}
    unknown = [name for name in roles if name not in dims]
    if unknown:
        sample = ", ".join(list(dims)[:5])
        raise ValueError(
            f"roles: {len(unknown)} name(s) are not parameters of the model: "
            f"{', '.join(map(repr, unknown[:5]))} (names look like: {sample}, ...)"
        )
    for name, role in roles.items():
        if role not in ROLES:
            raise ValueError(
                f"roles: {name!r} has role {role!r}, not one of {', '.join(ROLES)}"
            )
        # The shape decides between these two; a role that contradicts it
        # is a mistake in the mapping (other roles may have any shape).
        if (role == "matrix" and dims[name] < 2) or (
            role == "vector" and dims[name] >= 2
        ):
            raise ValueError(
                f"roles: {name!r} has {dims[name]} dimension(s) and cannot be a "
                f"{role!r} (a matrix has 2 or more, a vector fewer)"
            )
    return {name: roles.get(name) or role_of(name, shape) for name, shape in shapes}


def _exclusion(name: str, role: str, config: OMCConfig) -> str:
    """Why a parameter is not even a candidate ("" when it is one)."""
    if config.weights_only and role != "matrix":
        return f"WMOQ: {role}"
    if not _matches(name, config.include):
        return "pattern: not included"
    if _matches(name, config.exclude):
        return "pattern: exclude"
    return ""


def candidates(
    shapes: Sequence[tuple[str, tuple[int, ...]]],
    config: OMCConfig,
    roles: Mapping[str, str] | None = None,
) -> list[str]:
    """Names of the parameters that may be compressed (WMOQ and patterns).

    Example
    -------
    >>> shapes = [("lin.weight", (4, 3)), ("lin.bias", (4,)), ("ln.weight", (2, 4))]
    >>> candidates(shapes, OMCConfig(), {"ln.weight": "normalisation"})
    ['lin.weight']
    """
    roles = resolve_roles(shapes, roles)
    return [name for name, _ in shapes if not _exclusion(name, roles[name], config)]


def round_seed(seed: int, round: int, client: int | str) -> int:
    """A 64-bit seed derived from ``(seed, round, client)``, stable across runs.

    Example
    -------
    >>> round_seed(0, 1, "spk1") == round_seed(0, 2, "spk1")
    False
    """
    digest = hashlib.sha256(f"{seed}/{round}/{client}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keep_fp32(
    sizes: Sequence[tuple[str, int]],
    fraction: float,
    policy: str,
    seed: int = 0,
    round: int = 0,
    client: int | str = 0,
) -> set[str]:
    """Partial parameter quantization: the candidates that stay float32.

    Taken in ``policy`` order while they stay within ``fraction`` of the
    candidates' values; one that would overshoot is skipped.

    Example
    -------
    >>> sorted(keep_fp32([("a", 60), ("b", 30), ("c", 10)], 0.4, "largest"))
    ['b', 'c']
    """
    if fraction <= 0 or policy == "fixed":
        return set()
    order = list(sizes)
    if policy == "largest":
        order.sort(key=lambda item: -item[1])
    elif policy == "smallest":
        order.sort(key=lambda item: item[1])
    elif policy == "random":
        random.Random(round_seed(seed, round, client)).shuffle(order)
    else:
        raise ValueError(f"unknown fp32 policy {policy!r}")
    budget = fraction * sum(n for _, n in sizes)
    kept, used = set(), 0
    for name, n in order:
        if used + n <= budget:
            kept.add(name)
            used += n
    return kept


def make_plan(
    shapes: Iterable[tuple[str, tuple[int, ...]]] | torch.nn.Module,
    config: OMCConfig,
    round: int = 0,
    client: int | str = 0,
    roles: Mapping[str, str] | None = None,
) -> Plan:
    """Decide, for every parameter, whether it is compressed and in which format.

    In order: weights-only quantization, ``include``/``exclude``,
    ``fp32_patterns``, then partial quantization's fraction.

    Arguments
    ---------
    shapes : torch.nn.Module or iterable of (name, shape)
    config : OMCConfig
    round, client
        Draw of the random partial-quantization policy.
    roles : mapping, optional
        Name to role, over the module's own.

    Returns
    -------
    Plan

    Example
    -------
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    >>> plan = make_plan(model, OMCConfig(format="e3m7"))
    >>> [(e.name, e.format, e.reason) for e in plan.entries[:2]]
    [('0.weight', 'e3m7', 'matrix'), ('0.bias', None, 'WMOQ: vector')]
    >>> shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    >>> make_plan(shapes, OMCConfig(), roles=parameter_roles(model)) == plan
    True
    """
    shapes, roles = _shapes_and_roles(shapes, roles)
    names = [n for n, _ in shapes]
    _check_patterns_match(names, config)
    roles = resolve_roles(shapes, roles)

    reasons = {name: _exclusion(name, roles[name], config) for name in names}
    chosen = [name for name in names if not reasons[name]]
    for name in chosen:
        if _matches(name, config.fp32_patterns):
            reasons[name] = "fp32 pattern"
    numel = {name: math.prod(shape) for name, shape in shapes}
    remaining = [(n, numel[n]) for n in chosen if not reasons[n]]
    ppq = keep_fp32(
        remaining, config.fp32_fraction, config.fp32_policy, config.seed, round, client
    )
    for name in ppq:
        reasons[name] = f"PPQ: float32 fraction ({config.fp32_policy})"
    return Plan(
        tuple(
            _entry(name, shape, roles[name], reasons[name], config)
            for name, shape in shapes
        )
    )


def _shapes_and_roles(shapes, roles):
    """Names and integer shapes (checked), and the roles a module gives."""
    if isinstance(shapes, torch.nn.Module):
        roles = {**parameter_roles(shapes), **(roles or {})}
        shapes = [(n, tuple(p.shape)) for n, p in shapes.named_parameters()]
    shapes = [(name, tuple(int(s) for s in shape)) for name, shape in shapes]
    if not shapes:
        raise ValueError("make_plan: the module has no parameters")
    names = [n for n, _ in shapes]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"make_plan: parameter names given twice: {twice[:5]}")
    return shapes, roles


def _entry(
    name: str, shape: tuple[int, ...], role: str, reason: str, config: OMCConfig
) -> PlanEntry:
    """One parameter's entry: float32 for a ``reason``, else compressed."""
    numel = math.prod(shape)
    if reason:
        return PlanEntry(name, shape, None, 4 * numel, role, reason)
    fmt = config.format_of(name)
    nbytes = compressed_nbytes(numel, fmt, config.transform)
    override = next((p for p in config.format_overrides if fnmatchcase(name, p)), None)
    reason = role if override is None else f"{role}; override {override!r}"
    if kind_for(fmt, config.transform) != config.transform:
        reason += f"; lossless: no {config.transform}"
    return PlanEntry(name, shape, get_format(fmt).name, nbytes, role, reason)
