"""Accuracy parity with power: float32, OMC's default and bf16 + stochastic
rounding on the main job's federation, eight seeds each.

::

    python -m speechbrain_omc.experiments.parity --output benchmarks/results/parity

runs the packaged ``fed_fp32.yaml`` / ``fed_omc.yaml`` (client Adam, four
encoder layers, 40 rounds of 4 clients) once per configuration and seed,
resumably (as :mod:`~speechbrain_omc.experiments.paper_table`), seed-major
so that whole seeds finish first, and writes ``parity.{md,csv,png}``: each
mean with its 95 % interval over seeds, and each configuration's difference
to float32 paired by seed. The record (``--output
benchmarks/results/parity``) keeps every finished run's summary in the
repository, so it resumes on any clone, across sessions.

Example
-------
>>> [c.name for c in parity_cells()]
['float32', 'default', 'bf16_sr']
>>> PARITY.settings.seeds
(1986, 1987, 1988, 1989, 1990, 1991, 1992, 1993)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from speechbrain_omc.experiments import report
from speechbrain_omc.experiments.grid import (
    ADAM_SETTING,
    PARITY_SEEDS,
    Cell,
    GridSettings,
    paper_grid,
)
from speechbrain_omc.experiments.paper_table import Experiment
from speechbrain_omc.experiments.paper_table import main as run

__all__ = ["PARITY", "parity_cells", "main"]

#: The paper table's cells compared here, float32 (the reference) first.
CELLS = ("float32", "default", "bf16_sr")


def parity_cells() -> list[Cell]:
    """float32, OMC's default and bf16 + stochastic rounding, as the paper
    table defines them."""
    by_name = {cell.name: cell for cell in paper_grid()}
    return [by_name[name] for name in CELLS]


#: The main job's 40 rounds, eight seeds.
PARITY = Experiment(
    "parity",
    "Parity: OMC's default and bf16 + stochastic rounding against float32",
    parity_cells,
    GridSettings(rounds=40, seeds=PARITY_SEEDS, overrides=ADAM_SETTING),
    plot=report.plot_differences,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the comparison and write its report; 1 when a run failed.

    Arguments as :func:`speechbrain_omc.experiments.paper_table.main`.
    """
    return run(argv, experiment=PARITY)


if __name__ == "__main__":
    sys.exit(main())
