"""The Conformer-CTC ASR task shared by the recipes, the Flower app and the
experiments (so the recipes are leaves and the package needs no repository
file): :mod:`.brain` (the Brains), :mod:`.data` (label encoder, datasets),
:mod:`.federation` (the embedded simulation; its per-round CSV and plot are
:mod:`~speechbrain_omc.federated.round_log`'s), :mod:`.stats` (WER
intervals) and ``hparams/`` (the packaged federated hyperparameters).

Example
-------
>>> hparams_file("fed_omc.yaml").name
'fed_omc.yaml'
>>> sorted(p.name for p in HPARAMS_DIR.glob("*.yaml"))
['fed_fp32.yaml', 'fed_omc.yaml', 'fed_scale.yaml']
"""

from __future__ import annotations

from pathlib import Path

from speechbrain_omc.federated.round_log import (
    CSV_FIELDS,
    plot_rounds,
    round_row,
    write_csv,
)

from .brain import ASR, FedASR, utterance_errors
from .data import build_label_encoder, dataio_prepare, dataset_from_csv, prepare_data
from .stats import Interval, bootstrap_wer, mean_ci, paired_difference

#: Names of :mod:`.federation`, imported on first use: importing it with the
#: package would make ``python -m speechbrain_omc.asr.federation`` run a
#: module already in ``sys.modules`` (runpy warns of unpredictable behaviour).
_FEDERATION = (
    "build_brain",
    "build_server",
    "prepare_federation",
    "read_test_errors",
    "run_federation",
    "run_settings",
    "write_test_errors",
)


def __getattr__(name: str):
    if name in _FEDERATION:
        from . import federation

        return getattr(federation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The packaged hyperparameter files.
HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"


def hparams_file(name: str | Path) -> Path:
    """A hyperparameter file: an existing path, or a packaged file's name.

    Arguments
    ---------
    name : str or Path
        A YAML path, or the bare name of one in :data:`HPARAMS_DIR`
        (``fed_omc.yaml``, ``fed_omc``); a path with a folder must exist.

    Returns
    -------
    Path
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    if path.parent != Path("."):
        raise FileNotFoundError(f"no hparams file {str(name)!r}")
    packaged = HPARAMS_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.name for p in HPARAMS_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no hparams file {name!r} (packaged: {known})")


__all__ = [
    "ASR",
    "CSV_FIELDS",
    "FedASR",
    "HPARAMS_DIR",
    "Interval",
    "bootstrap_wer",
    "build_brain",
    "build_label_encoder",
    "build_server",
    "dataio_prepare",
    "dataset_from_csv",
    "hparams_file",
    "mean_ci",
    "paired_difference",
    "plot_rounds",
    "prepare_data",
    "prepare_federation",
    "read_test_errors",
    "round_row",
    "run_federation",
    "run_settings",
    "utterance_errors",
    "write_csv",
    "write_test_errors",
]
