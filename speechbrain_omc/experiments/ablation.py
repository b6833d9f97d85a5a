"""The ablation ladder: from float32 to OMC's default, one mechanism at a time.

::

    python -m speechbrain_omc.experiments.ablation                 # every rung
    python -m speechbrain_omc.experiments.ablation --cells default clip_previous_norm

runs the main job's federation for every rung and seed, resumably (as
:mod:`~speechbrain_omc.experiments.paper_table`), and writes
``ablation.{md,csv,png}`` to ``--output`` (default ``results/ablation``).
The record, ``--output benchmarks/results/ablation``, keeps each finished
run's ``summary.json`` in the repository (checkpoints and models stay
untracked) and its ``reading.md``: the ladder resumes on any clone.
Each rung changes one thing, so that a WER cost can be pinned on a mechanism:

==================  ==========================================================
factor              rungs
==================  ==========================================================
baseline            float32
wire                float32 training with the default's plan (e3m7...) on
                    one direction of the wire only: compressed download
                    (replies float32), compressed upload (broadcasts
                    float32)
lossless            the fused update path with ``fp32`` weights (codes are
                    the float32 bits): float32 training bit for bit, with
                    SpeechBrain's clipping (deferred) or each other clipping
clipping            the default's weights (e3m7) with each clipping mode
held gradients      deferred clipping holding float32 instead of bfloat16
rounding            nearest re-compression instead of stochastic
format              fp32, e5m10, bf16, e3m7 (default), int8
PPQ                 0 % and 25 % float32; 10 % fixed (largest) instead of
                    re-drawn per round and client
==================  ==========================================================

Example
-------
>>> cells = ablation_ladder()
>>> cells[0].name, len({c.name for c in cells}) == len(cells)
('float32', True)
>>> [c.name for c in cells if c.factor == "clipping"]
['clip_previous_norm', 'clip_per_parameter', 'clip_two_pass']
>>> [c.name for c in cells if c.factor == "wire"]
['wire_download', 'wire_upload']
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from speechbrain_omc.experiments import report
from speechbrain_omc.experiments.grid import (
    DEFAULT,
    DEFAULT_OMC,
    FLOAT32,
    SGD_SETTING,
    Cell,
    GridSettings,
)
from speechbrain_omc.experiments.paper_table import Experiment
from speechbrain_omc.experiments.paper_table import main as run

__all__ = ["ABLATION", "ablation_ladder", "main"]

CLIPPINGS = ("previous_norm", "per_parameter", "two_pass")


def _rung(name: str, factor: str, label: str, **changes) -> Cell:
    return Cell(name, factor, label, overrides={**DEFAULT_OMC, **changes})


def ablation_ladder() -> list[Cell]:
    """The rungs (see the module docstring), float32 first."""
    lossless = {"omc_format": "fp32"}
    return [
        FLOAT32,
        *(
            _rung(f"wire_{w}", "wire", f"compressed {w} only", omc_wire=w)
            for w in ("download", "upload")
        ),
        _rung("lossless", "lossless", "fp32 weights, deferred clipping", **lossless),
        *(
            _rung(
                f"lossless_{c}",
                "lossless",
                f"fp32 weights, {c} clipping",
                **lossless,
                omc_fused_clipping=c,
            )
            for c in CLIPPINGS
        ),
        DEFAULT,
        *(
            _rung(f"clip_{c}", "clipping", f"{c} clipping", omc_fused_clipping=c)
            for c in CLIPPINGS
        ),
        _rung(
            "held_fp32",
            "held gradients",
            "deferred clipping, float32 held gradients",
            omc_held_grad_format="fp32",
        ),
        _rung(
            "rounding_nearest",
            "rounding",
            "nearest re-compression",
            omc_update_rounding="nearest",
        ),
        *(
            _rung(f"format_{f}", "format", f"format {f}", omc_format=f)
            for f in ("e5m10", "bf16", "int8")
        ),
        _rung("ppq_0", "PPQ", "PPQ 0 %", omc_fp32_fraction=0.0),
        _rung("ppq_25", "PPQ", "PPQ 25 % random", omc_fp32_fraction=0.25),
        _rung(
            "ppq_fixed",
            "PPQ",
            "PPQ 10 % largest, the same every round",
            omc_fp32_policy="largest",
        ),
    ]


#: The main job's 40 rounds, five seeds.
ABLATION = Experiment(
    "ablation",
    "Ablation ladder: float32 to OMC's default, one mechanism at a time",
    ablation_ladder,
    GridSettings(
        rounds=40, seeds=(1986, 1987, 1988, 1989, 1990), overrides=SGD_SETTING
    ),
    plot=report.plot_differences,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the ladder and write its report; 1 when a run failed.

    Arguments as :func:`speechbrain_omc.experiments.paper_table.main`.
    """
    return run(argv, experiment=ABLATION)


if __name__ == "__main__":
    sys.exit(main())
