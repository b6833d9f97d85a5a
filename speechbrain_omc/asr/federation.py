"""Federated Conformer-CTC with OMC, simulated in one process.

Every round the server sends each sampled client the compressed global model
as bytes; one reused Brain trains it on that client's speakers, and each
reply is folded into the server's running sums before the next client starts
(:func:`~speechbrain_omc.federated.simulation.run_round`). The Flower app
builds the same server and clients with :func:`prepare_federation`,
:func:`build_brain` and :func:`build_server`. ::

    python -m speechbrain_omc.asr.federation fed_omc.yaml --rounds 4

Example
-------
>>> run_settings({"lr": 0.05, "batch_size": 4})["lr"]
0.05
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from speechbrain_omc.asr.brain import FedASR
from speechbrain_omc.asr.data import build_label_encoder, dataset_from_csv
from speechbrain_omc.asr.stats import bootstrap_wer
from speechbrain_omc.data.librispeech import prepare_librispeech
from speechbrain_omc.data.partition import client_manifests, partition_manifest
from speechbrain_omc.engine.accounting import (
    float32_parameter_bytes,
    parameter_bytes,
    peak_rss_since_reset,
    reset_peak_rss,
)
from speechbrain_omc.federated.aggregation import Aggregation
from speechbrain_omc.federated.checkpoint import CheckpointStore
from speechbrain_omc.federated.client import OMCClient
from speechbrain_omc.federated.defence import (
    DEFAULT_NORM_BOUND,
    DEFAULT_NORM_REFERENCE,
)
from speechbrain_omc.federated.round_log import RoundLog
from speechbrain_omc.federated.server import FedAvgServer
from speechbrain_omc.federated.simulation import run_round

logger = logging.getLogger(__name__)

__all__ = [
    "build_brain",
    "build_server",
    "main",
    "prepare_federation",
    "run_federation",
    "run_settings",
]


def prepare_federation(hparams: dict) -> tuple[dict[str, Path], dict[str, Path]]:
    """Write the manifests and the client partition of the training split.

    Arguments
    ---------
    hparams : dict

    Returns
    -------
    clients : dict
        Client id to its manifest.
    manifests : dict
        Split name to its manifest.
    """
    out = Path(hparams["output_folder"])
    splits = [hparams["train_split"], hparams["valid_split"], hparams["test_split"]]
    csvs = prepare_librispeech(
        hparams["data_folder"],
        out / "manifests",
        splits=splits,
        skip_prep=hparams.get("skip_prep", False),
        progress=False,
    )
    partition_dir = out / "partition"
    # Deterministic for its seed: rewriting it on a resumed run changes nothing.
    partition_manifest(
        csvs[hparams["train_split"]],
        partition_dir,
        mode=hparams["partition_mode"],
        num_clients=hparams["num_clients"],
        min_utterances=hparams.get("min_utterances", 1),
        seed=hparams["partition_seed"],
    )
    clients = {path.stem: path for path in client_manifests(partition_dir)}
    return clients, csvs


def run_settings(hparams: dict) -> dict:
    """The clients' settings a server checkpoint must match to be resumed."""
    keys = (
        "partition_mode",
        "num_clients",
        "partition_seed",
        "local_epochs",
        "max_local_steps",
        "batch_size",
        "client_optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "max_grad_norm",
        "augment_prob",
        "dropout",
    )
    return {key: hparams.get(key) for key in keys}


def build_server(
    hparams: dict,
    model: dict,
    clients: list[str],
    buffers: list[str],
    max_examples: int | dict[str, int],
    roles: dict[str, str] | None = None,
) -> FedAvgServer:
    """The federation's server, as both the embedded run and Flower build it.

    Arguments
    ---------
    hparams : dict
    model : dict
        The initial global model.
    clients : list of str
    buffers : list of str
    max_examples : int or dict
        Bound of a client's ``num_examples``.
    roles : dict, optional
        ``OMCClient.parameter_roles()`` (the server has shapes only).

    Returns
    -------
    FedAvgServer
    """
    return FedAvgServer(
        model,
        clients,
        min(int(hparams["clients_per_round"]), len(clients)),
        omc=hparams.get("omc"),
        seed=hparams["seed"],
        server_lr=hparams.get("server_lr", 1.0),
        server_momentum=hparams.get("server_momentum", 0.0),
        server_optimizer=hparams.get("server_optimizer", "sgd"),
        server_betas=hparams.get("server_betas", (0.9, 0.99)),
        server_eps=hparams.get("server_eps", 1e-3),
        buffers=buffers,
        client_config={"local_epochs": hparams["local_epochs"]},
        max_examples=max_examples,
        aggregation=Aggregation(
            hparams.get("aggregation", "fedavg"),
            trim_fraction=hparams.get("trim_fraction", 0.2),
            clip_norm=hparams.get("clip_norm"),
            # Absent keys: the defaults (bounded); null: off.
            norm_bound=hparams.get("norm_bound", DEFAULT_NORM_BOUND),
            norm_reference=hparams.get("norm_reference", DEFAULT_NORM_REFERENCE),
        ),
        run_settings=run_settings(hparams),
        roles=roles,
        memory_budget=int(hparams.get("aggregation_memory_mb", 1024) * 2**20),
        measure_memory=bool(hparams.get("measure_server_memory", False)),
        wire_mode=hparams.get("omc_wire", "both"),
    )


def build_brain(hparams: dict, run_opts: dict | None = None) -> FedASR:
    """The one Brain of a federated process, without a checkpointer (which
    would load a local checkpoint over the model a client received).

    Arguments
    ---------
    hparams : dict
    run_opts : dict, optional

    Returns
    -------
    FedASR
    """
    run_opts = dict(run_opts or {})
    run_opts.setdefault("max_grad_norm", hparams.get("max_grad_norm", 5.0))
    return FedASR(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=None,
    )


def _omc_summary(omc) -> dict | None:
    if omc is None:
        return None
    plain = {}
    for f in fields(omc):
        value = getattr(omc, f.name)
        plain[f.name] = list(value) if isinstance(value, tuple) else value
    return plain


def write_test_errors(errors: list[tuple[str, int, int]], path: Path) -> None:
    """Write ``FedASR.utterance_errors`` as CSV (``ID, edits, words``)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "edits", "words"])
        writer.writerows(sorted(errors))


def read_test_errors(path: str | Path) -> dict[str, tuple[int, int]]:
    """Read :func:`write_test_errors`' file: utterance id to (edits, words)."""
    with open(path, newline="", encoding="utf-8") as f:
        return {r["ID"]: (int(r["edits"]), int(r["words"])) for r in csv.DictReader(f)}


def run_federation(hparams: dict, run_opts: dict | None = None) -> dict:
    """Run (or resume) the federation, holding its save folder's lock throughout.

    Arguments
    ---------
    hparams : dict
    run_opts : dict, optional

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    save = Path(hparams["save_folder"])
    save.mkdir(parents=True, exist_ok=True)
    with CheckpointStore(save / "server.ckpt") as store:
        return _federate(hparams, run_opts, store)


@dataclass
class _Setup:
    """What one embedded run holds: its Brain, client, server and data."""

    brain: FedASR
    client: OMCClient
    server: FedAvgServer
    valid_data: Any
    test_data: Any
    num_clients: int


def _setup(hparams: dict, run_opts: dict | None, save: Path) -> _Setup:
    client_csvs, csvs = prepare_federation(hparams)
    label_encoder = build_label_encoder(
        csvs[hparams["train_split"]],
        save / "label_encoder.txt",
        blank_index=hparams["blank_index"],
    )
    client_data = {
        cid: dataset_from_csv(path, hparams, label_encoder)
        for cid, path in client_csvs.items()
    }
    evals = [
        dataset_from_csv(csvs[hparams[split]], hparams, label_encoder, "ascending")
        for split in ("valid_split", "test_split")
    ]
    brain = build_brain(hparams, run_opts)
    brain.tokenizer = label_encoder
    client = OMCClient(
        brain,
        client_data,
        local_epochs=hparams["local_epochs"],
        max_steps=hparams.get("max_local_steps"),
        train_loader_kwargs=hparams["train_dataloader_opts"],
        progressbar=hparams.get("client_progressbar", False),
        wire_mode=hparams.get("omc_wire", "both"),
    )
    # A client's weight is bounded by what the server knows: its partition.
    sizes = {cid: len(data) for cid, data in client_data.items()}
    server = build_server(
        hparams,
        client.get_model(),
        list(client_data),
        client.buffer_names(),
        sizes,
        roles=client.parameter_roles(),
    )
    return _Setup(brain, client, server, *evals, num_clients=len(client_data))


class _Trainer:
    """A client's local training as the round calls it, with its costs."""

    # Peak RSS covers the training steps only (the mark is reset before each
    # client), and not with measure_server_memory, which uses the same mark.

    def __init__(self, client: OMCClient, hparams: dict):
        self.client = client
        self.fail = set(hparams.get("fail_clients") or [])
        self.measure_rss = not hparams.get("measure_server_memory", False)
        self.peak_rss = 0
        self.cpu_seconds = 0.0

    def __call__(self, cid: str, message: bytes) -> bytes:
        if cid in self.fail:
            raise RuntimeError(f"injected failure of {cid} (fail_clients)")
        if self.measure_rss:
            reset_peak_rss()
        cpu = time.process_time()
        reply = self.client.train(message)
        self.cpu_seconds += time.process_time() - cpu
        if self.measure_rss:
            self.peak_rss = max(self.peak_rss, peak_rss_since_reset())
        return reply


def _federate(hparams: dict, run_opts: dict | None, store: CheckpointStore) -> dict:
    """:func:`run_federation`'s run, its checkpoint folder locked."""
    start = time.perf_counter()
    run = _setup(hparams, run_opts, store.path.parent)
    server, client = run.server, run.client
    if hparams.get("fresh_start"):
        store.discard()
    title = (
        f"{hparams['experiment_name']}: {run.num_clients} clients, "
        f"{hparams['clients_per_round']} per round"
    )
    log = RoundLog(server, store, hparams["output_folder"], title)
    first_round = log.resume()
    rounds = int(hparams["rounds"])
    eval_every = max(1, int(hparams.get("eval_every", 1)))
    quiet = hparams.get("noprogressbar", False)
    trainer = _Trainer(client, hparams)
    bar = tqdm(total=rounds, initial=server.round, desc="rounds", disable=quiet)
    while server.round < rounds:
        # One client at a time, each reply folded in as it comes.
        report = run_round(
            server, trainer, hparams.get("dropout", 0.0), _client_bar(server, quiet)
        )
        evaluation = None
        if report.round % eval_every == 0 or report.round == rounds:
            evaluation = client.evaluate(
                server.message_for("eval"),
                run.valid_data,
                hparams["valid_dataloader_opts"],
            )
        row = log.on_round(report, evaluation)
        bar.update(1)
        bar.set_postfix(
            WER=row.get("valid_WER"),
            MiB=round((row["bytes_down"] + row["bytes_up"]) / 2**20, 2),
        )
        _log_round(report, row)
    bar.close()
    log.finish()
    trained_here = server.round - first_round
    fields = {
        **_settings_summary(hparams, run.num_clients),
        **_test(run, hparams, Path(hparams["output_folder"])),
        "parameter_bytes": parameter_bytes(run.brain.modules),
        "float32_parameter_bytes": float32_parameter_bytes(run.brain.modules),
        "parameters": sum(
            v.numel() for n, v in server.model.items() if n not in server.buffers
        ),
        # Of the rounds trained by this process (a resumed run: the rest).
        "peak_train_rss_bytes": trainer.peak_rss or None,
        "train_cpu_seconds_per_round": (
            round(trainer.cpu_seconds / trained_here, 3) if trained_here else None
        ),
        # CPU time does not depend on what else the machine runs.
        "cpu_minutes_this_process": round(time.process_time() / 60, 2),
    }
    return log.write_summary(fields, start)


def _client_bar(server: FedAvgServer, quiet: bool):
    def progress(clients):
        return tqdm(
            clients,
            desc=f"round {server.round + 1} clients",  # the round being run
            leave=False,
            dynamic_ncols=True,
            disable=quiet,
        )

    return progress


def _log_round(report, row: dict) -> None:
    logger.info(
        "round %d: %d/%d clients averaged, %d bytes down, %d up (float32: %d, %d), "
        "valid WER %s, %.1f s",
        report.round,
        len(report.accepted),
        len(report.sampled),
        report.bytes_down,
        report.bytes_up,
        report.float32_bytes_down,
        report.float32_bytes_up,
        row.get("valid_WER"),
        row["seconds"],
    )


def _settings_summary(hparams: dict, num_clients: int) -> dict:
    omc = hparams.get("omc")
    return {
        "experiment": hparams["experiment_name"],
        "omc": _omc_summary(omc),
        "omc_wire": hparams.get("omc_wire", "both") if omc else None,
        "seed": hparams["seed"],
        "rounds": int(hparams["rounds"]),
        "num_clients": num_clients,
        "clients_per_round": hparams["clients_per_round"],
        "local_epochs": hparams["local_epochs"],
    }


def _test(run: _Setup, hparams: dict, out: Path) -> dict:
    # The final global model, as clients receive it, on the held-out speakers.
    message = run.server.message_for("eval")
    opts = hparams["valid_dataloader_opts"]
    test = run.client.evaluate(message, run.test_data, opts)
    errors = list(getattr(run.brain, "utterance_errors", []))
    write_test_errors(errors, out / "test_errors.csv")
    edits, words = [e for _, e, _ in errors], [w for _, _, w in errors]
    interval = bootstrap_wer(edits, words) if errors else None
    return {
        "test_WER": test.get("WER"),
        "test_WER_ci95": None if interval is None else [interval.low, interval.high],
        "test_WER_se": None if interval is None else interval.se,
        "test_utterances": len(errors),
        "test_words": sum(words),
        "test_CER": test.get("CER"),
        "test_loss": test.get("loss"),
    }


def main(argv: list[str] | None = None) -> dict:
    """Command line (default ``sys.argv[1:]``): a hparams file (path or
    packaged name) and overrides; the run's summary."""
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_omc.asr import hparams_file

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv[0] = str(hparams_file(argv[0]))
    path, run_opts, overrides = sb.parse_arguments(argv)
    with open(path, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=path,
        overrides=overrides,
    )
    hparams["noprogressbar"] = bool(run_opts.get("noprogressbar", False))
    if hparams.get("num_threads"):
        # One intra-op thread by default: on a small shared CPU, more threads
        # than free cores slow every step down several times.
        torch.set_num_threads(int(hparams["num_threads"]))
    summary = run_federation(hparams, run_opts)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
