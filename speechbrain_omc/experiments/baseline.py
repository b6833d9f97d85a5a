"""The float32 federated baseline: which setting makes it learn.

::

    python -m speechbrain_omc.experiments.baseline --output benchmarks/results/baseline

runs the main job's float32 federation (packaged ``fed_fp32.yaml``, 40
rounds, one seed: a screen) once per setting below, resumably, and writes
``baseline.{md,csv,png}``; each row's difference is to the reference row,
the setting the screen began from (:data:`~.grid.SGD_SETTING`: SGD, two
encoder layers), on the same seed. Each cell changes one thing that federated
ASR practice tunes: the server optimizer (FedAvgM, FedAdam, FedYogi: Reddi
et al., ICLR 2021), the clients' learning rate and local work, the clients
per round and the model's depth. The speaker partition stays non-IID.

Example
-------
>>> cells = baseline_cells()
>>> cells[0].is_reference, all(c.hparams == "fed_fp32.yaml" for c in cells)
(True, True)
>>> [c.name for c in cells if c.factor == "server optimizer"][:2]
['fedavgm_0.9', 'fedadam_0.01']
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from speechbrain_omc.experiments import report
from speechbrain_omc.experiments.grid import FLOAT32, SGD_SETTING, Cell, GridSettings
from speechbrain_omc.experiments.paper_table import Experiment
from speechbrain_omc.experiments.paper_table import main as run

__all__ = ["BASELINE", "baseline_cells", "main"]


#: The centralized recipe's optimizer and learning rate, fresh each round.
ADAM = {"client_optimizer": "adam", "lr": 0.001}
#: ... and its SpecAugment.
ADAM_SPECAUGMENT = {**ADAM, "augment_prob": 1.0}


def _cell(name: str, factor: str, label: str, **overrides) -> Cell:
    return Cell(name, factor, label, hparams="fed_fp32.yaml", overrides=overrides)


def baseline_cells() -> list[Cell]:
    """The packaged float32 setting first, then one change per cell."""
    adaptive = [
        _cell(
            f"fed{name}_{lr}",
            "server optimizer",
            f"Fed{name.capitalize()}, server lr {lr}",
            server_optimizer=name,
            server_lr=lr,
        )
        for name, lr in (("adam", 0.01), ("adam", 0.003), ("yogi", 0.01))
    ]
    return [
        FLOAT32,
        _cell(
            "fedavgm_0.9",
            "server optimizer",
            "FedAvgM, momentum 0.9, server lr 1",
            server_momentum=0.9,
        ),
        *adaptive,
        _cell("client_lr_0.1", "client", "client lr 0.1", lr=0.1),
        _cell("client_lr_0.2", "client", "client lr 0.2", lr=0.2),
        _cell("all_clients", "round", "8 clients a round", clients_per_round=8),
        _cell("client_adam", "client", "client Adam (lr 1e-3)", **ADAM),
        _cell(
            "client_adam_all_clients",
            "combined",
            "client Adam, 8 clients a round",
            **ADAM,
            clients_per_round=8,
        ),
        _cell(
            "client_adam_layers_4",
            "combined",
            "client Adam, 4 encoder layers",
            **ADAM,
            num_encoder_layers=4,
        ),
        _cell(
            "adam_specaugment",
            "combined",
            "client Adam, SpecAugment",
            **ADAM_SPECAUGMENT,
        ),
        _cell(
            "adam_specaugment_layers_4",
            "combined",
            "client Adam, SpecAugment, 4 encoder layers",
            **ADAM_SPECAUGMENT,
            num_encoder_layers=4,
        ),
    ]


#: The main job's 40 rounds, one seed (a screen; the chosen setting gets 8).
BASELINE = Experiment(
    "baseline",
    "Float32 baseline: which setting makes federated training learn",
    baseline_cells,
    GridSettings(rounds=40, seeds=(1986,), overrides=SGD_SETTING),
    plot=report.plot_differences,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the screen and write its report; 1 when a run failed.

    Arguments as :func:`speechbrain_omc.experiments.paper_table.main`.
    """
    return run(argv, experiment=BASELINE)


if __name__ == "__main__":
    sys.exit(main())
