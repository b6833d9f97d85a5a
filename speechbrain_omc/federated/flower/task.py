"""Glue between the Flower apps and the task that builds Brain, data and server.

The apps build what the embedded simulation builds, with the functions of a
*task module* named by the run config's ``task`` (default
:mod:`speechbrain_omc.asr`, imported lazily so that this package imports
nothing above it). Paths are absolute or relative to the working directory.
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
    """A run or node config's path, made absolute under the working directory.

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
    """The task module named ``name`` (default :data:`DEFAULT_TASK`).

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
        ``hparams`` (a file, or a name the task knows), ``overrides``, ``task``.

    Returns
    -------
    dict
    """
    from hyperpyyaml import load_hyperpyyaml

    name = run_config.get("hparams") or DEFAULT_HPARAMS
    path = resolve_path(name)
    if not path.is_file():
        path = load_task(run_config.get("task")).hparams_file(name)
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
    """The client a SuperNode serves: ``client-id``, the stem of ``manifest``,
    or ``client_<partition-id>``.

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
    client_id : str
    num_examples : int
    eval_data : dict
        Split name (``valid``, ``test``) to dataset, where available.
    eval_opts : dict
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

    With ``manifest`` in the node config, that CSV is the client's data;
    otherwise the task prepares its partition (locked: nodes on one machine
    take turns) and the nodes of one process share one Brain.

    Arguments
    ---------
    run_config : Mapping
    node_config : Mapping
        ``partition-id`` or ``manifest``, ``label-encoder``, ``valid-csv``,
        ``test-csv``.

    Returns
    -------
    NodeSetup
    """
    task = load_task(run_config.get("task"))
    client_id = node_client_id(node_config)
    if node_config.get("manifest"):
        return _own_data_node(run_config, node_config, task, client_id)
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


def _own_data_node(run_config, node_config, task, client_id: str) -> NodeSetup:
    # A node with its own data (a deployment's device).
    hparams = load_hparams(run_config)
    manifest = resolve_path(str(node_config["manifest"]))
    encoder_path = resolve_path(str(node_config.get("label-encoder") or ""))
    if not node_config.get("label-encoder") or not encoder_path.is_file():
        # Built from one client's transcripts the labels would differ
        # between clients: every node must load the federation's encoder.
        raise FileNotFoundError(
            "a node config with manifest needs label-encoder: the federation's "
            f"saved label_encoder.txt (got {node_config.get('label-encoder')!r})"
        )
    encoder = task.build_label_encoder(manifest, encoder_path, hparams["blank_index"])
    train_data = task.dataset_from_csv(manifest, hparams, encoder)
    eval_data = {
        split: task.dataset_from_csv(
            resolve_path(str(node_config[f"{split}-csv"])),
            hparams,
            encoder,
            "ascending",
        )
        for split in ("valid", "test")
        if node_config.get(f"{split}-csv")
    }
    client = _omc_client(task, hparams, encoder, train_data)
    opts = dict(hparams["valid_dataloader_opts"])
    return NodeSetup(client, client_id, len(train_data), eval_data, opts)


def _omc_client(task, hparams: dict, label_encoder, train_data):
    # The Brain and client arguments of the embedded run_federation.
    from speechbrain_omc.federated.client import OMCClient

    brain = task.build_brain(hparams)
    brain.tokenizer = label_encoder
    return OMCClient(
        brain,
        train_data,
        local_epochs=hparams["local_epochs"],
        max_steps=hparams.get("max_local_steps"),
        train_loader_kwargs=hparams["train_dataloader_opts"],
        progressbar=False,
        wire_mode=hparams.get("omc_wire", "both"),
    )


class _ClientDatasets(Mapping):
    """Client id to its training dataset, built when first asked for, under
    the folder's lock (another process may be rewriting the manifests)."""

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
    datasets = _ClientDatasets(task, hparams, label_encoder, clients)
    client = _omc_client(task, hparams, label_encoder, datasets)
    _SHARED[key] = _SharedPartition(client, eval_data, hparams)
    return _SHARED[key]


def initial_model(
    run_config: Mapping[str, Any],
) -> tuple[dict, list[str], dict, dict[str, str]]:
    """The initial global model (the hparams seed torch: the embedded run's).

    Arguments
    ---------
    run_config : Mapping

    Returns
    -------
    model : dict
        In wire order.
    buffers : list of str
    hparams : dict
    roles : dict
    """
    from speechbrain_omc.federated.client import OMCClient

    task = load_task(run_config.get("task"))
    hparams = load_hparams(run_config)
    client = OMCClient(task.build_brain(hparams), {})
    return client.get_model(), client.buffer_names(), hparams, client.parameter_roles()
