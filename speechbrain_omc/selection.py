"""Which parameters are compressed, and in which format.

Pure functions from ``(name, shape)`` pairs and an :class:`OMCConfig` to a
:class:`Plan`. Nothing here touches modules or tensors' values, so the same
plan can be computed on a server, a client or in a test.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from speechbrain_omc.config import OMCConfig
from speechbrain_omc.formats import get_format
from speechbrain_omc.transform import Transform


@dataclass(frozen=True)
class PlanEntry:
    """One parameter of a plan.

    Arguments
    ---------
    name : str
        Qualified parameter name.
    shape : tuple of int
        Parameter shape.
    format : str or None
        Format name, or ``None`` when the parameter stays float32.
    nbytes : int
        Exact bytes the parameter occupies under the plan.
    """

    name: str
    shape: tuple[int, ...]
    format: str | None
    nbytes: int

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
        """The plan as a fixed-width text table with totals against float32.

        Returns
        -------
        str
        """
        rows = [("parameter", "shape", "values", "format", "bytes")]
        for e in self.entries:
            shape = "x".join(str(s) for s in e.shape) or "scalar"
            rows.append(
                (e.name, shape, f"{e.numel:,}", e.format or "fp32", f"{e.nbytes:,}")
            )
        total = sum(e.numel for e in self.entries)
        rows.append(("total", "", f"{total:,}", "", f"{self.nbytes:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, row in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * (sum(widths) + 8))
            lines.append(
                "  ".join(
                    cell.ljust(w) if j in (0, 1, 3) else cell.rjust(w)
                    for j, (cell, w) in enumerate(zip(row, widths))
                )
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
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def compressed_nbytes(numel: int, fmt: str, transform: str) -> int:
    """Exact bytes of a compressed variable: packed codes plus its transform.

    Arguments
    ---------
    numel : int
        Number of values.
    fmt : str
        Format name.
    transform : str
        Transform kind.

    Returns
    -------
    int

    Example
    -------
    >>> compressed_nbytes(10, "e3m7", "scale")  # ceil(110 / 8) + 4
    18
    """
    return math.ceil(numel * get_format(fmt).bits / 8) + Transform(transform).nbytes


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


def candidates(
    shapes: Sequence[tuple[str, tuple[int, ...]]], config: OMCConfig
) -> list[str]:
    """Names of the parameters that may be compressed (WMOQ and patterns).

    Arguments
    ---------
    shapes : list of (name, shape)
        The module's parameters.
    config : OMCConfig
        Selection settings.

    Returns
    -------
    list of str

    Example
    -------
    >>> shapes = [("lin.weight", (4, 3)), ("lin.bias", (4,))]
    >>> candidates(shapes, OMCConfig())
    ['lin.weight']
    """
    return [
        name
        for name, shape in shapes
        if (len(shape) >= 2 or not config.weights_only)
        and _matches(name, config.include)
        and not _matches(name, config.exclude)
    ]


def round_seed(seed: int, round: int, client: int | str) -> int:
    """A 64-bit seed derived from ``(seed, round, client)``, stable across runs.

    Arguments
    ---------
    seed : int
        Base seed.
    round : int
        Federated round.
    client : int or str
        Client id.

    Returns
    -------
    int

    Example
    -------
    >>> round_seed(0, 1, "spk1") == round_seed(0, 1, "spk1")
    True
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
    """Partial parameter quantization: choose candidates that stay float32.

    Variables are taken in policy order while the float32 values stay within
    ``fraction`` of the candidates' values; a variable that would overshoot is
    skipped and the next one is tried.

    Arguments
    ---------
    sizes : list of (name, numel)
        The candidates.
    fraction : float
        Fraction of the candidates' values to leave in float32.
    policy : str
        ``"largest"``, ``"smallest"`` or ``"random"`` (``"fixed"`` is handled
        by patterns and selects nothing here).
    seed, round, client
        Seed of the random policy, re-drawn per round and client.

    Returns
    -------
    set of str

    Example
    -------
    >>> sizes = [("a", 60), ("b", 30), ("c", 10)]
    >>> sorted(keep_fp32(sizes, 0.1, "largest"))
    ['c']
    >>> sorted(keep_fp32(sizes, 0.4, "largest"))
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
) -> Plan:
    """Decide, for every parameter, whether it is compressed and in which format.

    Arguments
    ---------
    shapes : torch.nn.Module or iterable of (name, shape)
        The parameters (a module's ``named_parameters`` are used as is).
    config : OMCConfig
        Selection settings.
    round, client
        Draw of the random partial-quantization policy.

    Returns
    -------
    Plan

    Example
    -------
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    >>> plan = make_plan(model, OMCConfig(format="e3m7"))
    >>> for entry in plan.entries:
    ...     print(entry.name, entry.format, entry.nbytes)
    0.weight e3m7 92
    0.bias None 32
    1.weight None 32
    1.bias None 32
    """
    if isinstance(shapes, torch.nn.Module):
        shapes = [(n, tuple(p.shape)) for n, p in shapes.named_parameters()]
    shapes = [(name, tuple(int(s) for s in shape)) for name, shape in shapes]
    if not shapes:
        raise ValueError("make_plan: the module has no parameters")
    names = [n for n, _ in shapes]
    _check_patterns_match(names, config)

    chosen = candidates(shapes, config)
    sizes = [(n, math.prod(dict(shapes)[n])) for n in chosen]
    fp32 = {n for n in chosen if _matches(n, config.fp32_patterns)}
    remaining = [(n, s) for n, s in sizes if n not in fp32]
    fp32 |= keep_fp32(
        remaining, config.fp32_fraction, config.fp32_policy, config.seed, round, client
    )
    compressed = set(chosen) - fp32

    entries = []
    for name, shape in shapes:
        numel = math.prod(shape)
        if name in compressed:
            fmt = config.format_of(name)
            nbytes = compressed_nbytes(numel, fmt, config.transform)
            entries.append(PlanEntry(name, shape, get_format(fmt).name, nbytes))
        else:
            entries.append(PlanEntry(name, shape, None, 4 * numel))
    return Plan(tuple(entries))
