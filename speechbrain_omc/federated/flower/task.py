"""Glue between the Flower apps and the ASR task of the embedded simulation.

The ``ServerApp`` and ``ClientApp`` build exactly what the embedded
simulation (:func:`speechbrain_omc.asr.federation.run_federation`) builds in
its one process: the same hyperparameters (file plus overrides), the same
Brain (``build_brain``), the same :class:`~speechbrain_omc.federated.client.
OMCClient` on a client's manifest and the same server (``build_server``).
Those functions come from a *task module*, named by the run config's
``task`` (default :mod:`speechbrain_omc.asr`): an importable module, so the
installed package runs the app without any file of the repository.

Paths in the run config (``hparams``) and in a node config (``manifest``...)
may be absolute or relative to the working directory of the process (the
SuperLink's or SuperNode's); ``hparams`` may also name a packaged file
(``fed_omc.yaml``, the default; see :func:`speechbrain_omc.asr.hparams_file`).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HPARAMS",
    "DEFAULT_TASK",
    "NodeSetup",
    "build_node",
    "initial_model",
    "load_hparams",
    "load_task",
    "node_client_id",
    "resolve_path",
]

#: The task module whose functions build the Brain, data and server.
DEFAULT_TASK = "speechbrain_omc.asr"
#: The packaged hyperparameters of federated OMC on SynthSpeech.
DEFAULT_HPARAMS = "fed_omc.yaml"


def resolve_path(path: str | Path) -> Path:
    """An absolute path: as given, or under the working directory.

    Arguments
    ---------
    path : str or Path
        The path from a run or node config.

    Returns
    -------
    Path

    Example
    -------
    >>> resolve_path("/data/client_000.csv")
    PosixPath('/data/client_000.csv')
    >>> resolve_path("client_000.csv") == Path.cwd() / "client_000.csv"
    True
    """
    path = Path(path).expanduser()
    return path if path.is_absolute() else (Path.cwd() / path).resolve()


def load_task(name: str | None = None):
    """The task module (imported by name, once per process).

    Arguments
    ---------
    name : str, optional
        A module with ``prepare_federation``, ``build_brain``,
        ``build_server``, ``build_label_encoder``, ``dataset_from_csv``,
        ``round_row``, ``write_csv`` and ``plot_rounds``; default
        :data:`DEFAULT_TASK`.

    Returns
    -------
    module

    Example
    -------
    >>> load_task().__name__
    'speechbrain_omc.asr'
    """
    return importlib.import_module(name or DEFAULT_TASK)


def load_hparams(run_config: Mapping[str, Any]) -> dict:
    """Load the task's hyperparameters named by a run config.

    Arguments
    ---------
    run_config : Mapping
        ``hparams`` (a file, or a packaged name) and ``overrides`` (YAML
        mapping string).

    Returns
    -------
    dict
        As ``load_hyperpyyaml`` returns them (modules instantiated, seeded).
    """
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_omc.asr import hparams_file

    name = run_config.get("hparams") or DEFAULT_HPARAMS
    candidate = resolve_path(name)
    path = candidate if candidate.is_file() else hparams_file(name)
    with open(path, encoding="utf-8") as fin:
        return load_hyperpyyaml(fin, run_config.get("overrides") or {})


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    # SuperNodes on one machine share the run's output folder: one at a
    # time prepares the manifests and reads them.
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".flower-prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def node_client_id(node_config: Mapping[str, Any]) -> str:
    """The client id a SuperNode serves, from its node config alone.

    ``client-id`` if given, else the stem of ``manifest``, else
    ``client_<partition-id>`` as the task's partition names clients.

    Arguments
    ---------
    node_config : Mapping
        The SuperNode's ``--node-config`` (or the Simulation Engine's).

    Returns
    -------
    str

    Example
    -------
    >>> node_client_id({"partition-id": 1, "num-partitions": 2})
    'client_001'
    >>> node_client_id({"manifest": "/data/partition/client_007.csv"})
    'client_007'
    """
    if node_config.get("client-id"):
        return str(node_config["client-id"])
    if node_config.get("manifest"):
        return Path(str(node_config["manifest"])).stem
    if "partition-id" in node_config:
        return f"client_{int(node_config['partition-id']):03d}"
    raise ValueError(
        "the node config names no client: give partition-id, manifest or client-id"
    )


@dataclass
class NodeSetup:
    """What one SuperNode holds for the run.

    Arguments
    ---------
    client : OMCClient
        The Brain-driving client (one Brain per process).
    client_id : str
        The client (partition) it serves.
    num_examples : int
        Its training examples.
    eval_data : dict
        Split name (``valid``, ``test``) to dataset, where available.
    eval_opts : dict
        Dataloader options of evaluation.
    """

    client: Any
    client_id: str
    num_examples: int
    eval_data: dict
    eval_opts: dict


def build_node(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> NodeSetup:
    """Build a SuperNode's client as the embedded simulation builds it.

    Data: with ``manifest`` in the node config, that CSV is the client's
    training data, ``label-encoder`` (a saved ``label_encoder.txt``) its
    encoder and ``valid-csv`` / ``test-csv`` its evaluation data. Otherwise
    the task prepares its manifests and partition under its
    ``output_folder`` (as the embedded run does; locked, so SuperNodes on one
    machine take turns) and the client is ``client_<partition-id>``; the
    nodes a process serves then share one Brain and one prepared partition
    (as the embedded run's clients share its Brain): the Simulation Engine
    runs a thousand virtual nodes in a couple of workers.

    Arguments
    ---------
    run_config : Mapping
        ``task``, ``hparams``, ``overrides``.
    node_config : Mapping
        ``partition-id`` or ``manifest`` (and the keys above).

    Returns
    -------
    NodeSetup
    """
    from speechbrain_omc.federated.client import OMCClient

    task = load_task(run_config.get("task"))
    client_id = node_client_id(node_config)
    if not node_config.get("manifest"):
        shared = _shared_partition(run_config, task)
        if client_id not in shared.client.train_data:
            raise ValueError(
                f"node serves {client_id!r}, but the partition has "
                f"{len(shared.client.train_data)} other clients"
            )
        return NodeSetup(
            shared.client,
            client_id,
            len(shared.client.train_data[client_id]),
            shared.eval_data,
            dict(shared.hparams["valid_dataloader_opts"]),
        )
    hparams = load_hparams(run_config)
    splits = {"valid": hparams["valid_split"], "test": hparams["test_split"]}
    eval_csvs: dict[str, Path] = {}
    # A node with its own data (a deployment's device).
    manifest = resolve_path(str(node_config["manifest"]))
    encoder_path = resolve_path(str(node_config.get("label-encoder") or ""))
    if not node_config.get("label-encoder") or not encoder_path.is_file():
        # Built from one client's transcripts the labels would differ
        # between clients: every node must load the federation's encoder.
        raise FileNotFoundError(
            "a node config with manifest needs label-encoder: the federation's "
            f"saved label_encoder.txt (got {node_config.get('label-encoder')!r})"
        )
    label_encoder = task.build_label_encoder(
        manifest, encoder_path, hparams["blank_index"]
    )
    for split in splits:
        if node_config.get(f"{split}-csv"):
            eval_csvs[split] = resolve_path(str(node_config[f"{split}-csv"]))
    data = _datasets(task, hparams, label_encoder, manifest, eval_csvs)
    train_data, eval_data = data
    brain = task.build_brain(hparams)
    brain.tokenizer = label_encoder
    # The same arguments as the embedded run_federation.
    client = OMCClient(
        brain,
        train_data,
        local_epochs=hparams["local_epochs"],
        max_steps=hparams.get("max_local_steps"),
        train_loader_kwargs=hparams["train_dataloader_opts"],
        progressbar=False,
        wire_mode=hparams.get("omc_wire", "both"),
    )
    return NodeSetup(
        client,
        client_id,
        len(train_data),
        eval_data,
        dict(hparams["valid_dataloader_opts"]),
    )


class _ClientDatasets(Mapping):
    """Client id to its training dataset, built when first asked for.

    Read under the output folder's lock: another process's
    ``prepare_federation`` rewrites every client manifest (old ones removed
    first), and an unlocked read could meet a missing or half-written file.
    """

    def __init__(self, task, hparams, label_encoder, manifests):
        self._make = lambda path: task.dataset_from_csv(path, hparams, label_encoder)
        self._manifests = manifests
        self._folder = Path(hparams["output_folder"])
        self._built: dict[str, Any] = {}

    def __getitem__(self, client):
        if client not in self._built:
            path = self._manifests[client]
            with _folder_lock(self._folder):
                self._built[client] = self._make(path)
        return self._built[client]

    def __iter__(self):
        return iter(self._manifests)

    def __len__(self):
        return len(self._manifests)


@dataclass
class _SharedPartition:
    client: Any  # an OMCClient over every client of the partition
    eval_data: dict
    hparams: dict


_SHARED: dict[str, _SharedPartition] = {}


def _shared_partition(run_config, task) -> _SharedPartition:
    # Once per process and run config: load the hparams, prepare (or read)
    # the partition and build the Brain that all the process's nodes use.
    key = repr(sorted((str(k), str(v)) for k, v in dict(run_config).items()))
    if key in _SHARED:
        return _SHARED[key]
    from speechbrain_omc.federated.client import OMCClient

    hparams = load_hparams(run_config)
    splits = {"valid": hparams["valid_split"], "test": hparams["test_split"]}
    with _folder_lock(Path(hparams["output_folder"])):
        Path(hparams["save_folder"]).mkdir(parents=True, exist_ok=True)
        clients, csvs = task.prepare_federation(hparams)
        label_encoder = task.build_label_encoder(
            csvs[hparams["train_split"]],
            Path(hparams["save_folder"]) / "label_encoder.txt",
            blank_index=hparams["blank_index"],
        )
        # Read while no other process rewrites the manifests.
        eval_data = {
            name: task.dataset_from_csv(
                csvs[split], hparams, label_encoder, "ascending"
            )
            for name, split in splits.items()
        }
    brain = task.build_brain(hparams)
    brain.tokenizer = label_encoder
    # The same arguments as the embedded run_federation.
    client = OMCClient(
        brain,
        _ClientDatasets(task, hparams, label_encoder, clients),
        local_epochs=hparams["local_epochs"],
        max_steps=hparams.get("max_local_steps"),
        train_loader_kwargs=hparams["train_dataloader_opts"],
        progressbar=False,
        wire_mode=hparams.get("omc_wire", "both"),
    )
    _SHARED[key] = _SharedPartition(client, eval_data, hparams)
    return _SHARED[key]


def _datasets(task, hparams, label_encoder, manifest, eval_csvs):
    train = task.dataset_from_csv(manifest, hparams, label_encoder)
    evals = {
        name: task.dataset_from_csv(path, hparams, label_encoder, "ascending")
        for name, path in eval_csvs.items()
    }
    return train, evals


def initial_model(
    run_config: Mapping[str, Any],
) -> tuple[dict, list[str], dict, dict[str, str]]:
    """The initial global model, as the embedded simulation makes it.

    The hparams seed torch before the modules are created, so the
    Brain built here starts from the same weights as the embedded run's.

    Arguments
    ---------
    run_config : Mapping
        ``task``, ``hparams``, ``overrides``.

    Returns
    -------
    model : dict
        Name to float32 tensor, in wire order.
    buffers : list of str
        Entries that are buffers.
    hparams : dict
        The loaded hyperparameters.
    roles : dict
        The parameters' roles, for the server's plans (it has shapes only).
    """
    from speechbrain_omc.federated.client import OMCClient

    task = load_task(run_config.get("task"))
    hparams = load_hparams(run_config)
    client = OMCClient(task.build_brain(hparams), {})
    return client.get_model(), client.buffer_names(), hparams, client.parameter_roles()
