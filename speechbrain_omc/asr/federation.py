"""Federated Conformer-CTC with OMC, simulated in one process.

The training speakers are grouped into clients; every round the server
(:class:`speechbrain_omc.federated.server.FedAvgServer`) samples clients,
sends each the compressed global model as bytes, lets one reused SpeechBrain
Brain (:class:`~speechbrain_omc.federated.client.OMCClient` driving a
:class:`~speechbrain_omc.asr.brain.FedASR`) train it on that client's
speakers, validates and averages the compressed replies in float32, and
checkpoints. No server process, no network: the messages are the bytes a
deployment sends (the Flower app sends them over the network, built by the
same :func:`prepare_federation`, :func:`build_brain` and
:func:`build_server`).

Each round streams: the clients train one after another, and each reply is
validated and folded into the server's running sums before the next client
starts (:func:`speechbrain_omc.federated.simulation.run_round`), so the
server's memory does not grow with ``clients_per_round``. ``dropout`` makes
a seeded fraction of each round's sampled clients unavailable; a client that
raises is logged and left out of its round (``fail_clients`` makes chosen
clients raise, for testing).

Run a hparams file (the packaged SynthSpeech ones by name, see
:func:`speechbrain_omc.asr.hparams_file`)::

    python -m speechbrain_omc.asr.federation fed_omc.yaml --rounds 4

Outputs in ``<output_folder>``: ``rounds.csv`` and ``rounds.png`` (per
round, :mod:`speechbrain_omc.asr.rounds`), ``test_errors.csv`` (per test
utterance: edits and reference words), ``summary.json`` (test WER with its
95 % bootstrap interval over utterances, bytes, parameter memory, peak RSS of
the training steps, seconds), ``final_model.pt`` and ``save/server.ckpt``
(resume after a crash: every random draw is a function of ``(seed, round,
client)``, so a resumed run ends with the same model).

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
from dataclasses import fields
from pathlib import Path

import torch

from speechbrain_omc.asr.brain import FedASR
from speechbrain_omc.asr.data import build_label_encoder, dataset_from_csv
from speechbrain_omc.asr.rounds import plot_rounds, round_row, write_csv
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
from speechbrain_omc.federated.checkpoint import CheckpointStore, atomic_save
from speechbrain_omc.federated.client import OMCClient
from speechbrain_omc.federated.defence import (
    DEFAULT_NORM_BOUND,
    DEFAULT_NORM_REFERENCE,
)
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
        Needs ``data_folder``, ``output_folder``, ``train_split``,
        ``valid_split``, ``test_split``, ``skip_prep``, ``partition_mode``,
        ``num_clients`` and ``partition_seed``.

    Returns
    -------
    clients : dict
        Client id (``client_000``...) to its manifest.
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
    """The clients' settings a server checkpoint must match to be resumed.

    Arguments
    ---------
    hparams : dict
        Loaded hyperparameters.

    Returns
    -------
    dict
    """
    keys = (
        "partition_mode",
        "num_clients",
        "partition_seed",
        "local_epochs",
        "max_local_steps",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "max_grad_norm",
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
        Loaded hyperparameters.
    model : dict
        The initial global model.
    clients : list of str
        Client ids.
    buffers : list of str
        Entries that are buffers.
    max_examples : int or dict
        Bound of a client's ``num_examples`` (per client: its partition size).
    roles : dict, optional
        Parameter roles of the model (``OMCClient.parameter_roles()``): the
        server has shapes only, and needs them to keep normalisation weights
        and position biases float32 exactly as the model's own plan does.

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
    """The one Brain of a federated process, without a checkpointer.

    Without a checkpointer SpeechBrain's ``recover_if_possible`` cannot load
    a local checkpoint over the model a client received.

    Arguments
    ---------
    hparams : dict
        Loaded hyperparameters.
    run_opts : dict, optional
        SpeechBrain run options (device...).

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
    """Per-utterance test errors as CSV (``ID, edits, words``).

    Arguments
    ---------
    errors : list of (str, int, int)
        ``FedASR.utterance_errors`` of the test stage.
    path : Path
        Destination.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "edits", "words"])
        writer.writerows(sorted(errors))


def read_test_errors(path: str | Path) -> dict[str, tuple[int, int]]:
    """Read :func:`write_test_errors`' file.

    Arguments
    ---------
    path : str or Path
        A ``test_errors.csv``.

    Returns
    -------
    dict
        Utterance id to (edits, words).
    """
    with open(path, newline="", encoding="utf-8") as f:
        return {r["ID"]: (int(r["edits"]), int(r["words"])) for r in csv.DictReader(f)}


def run_federation(hparams: dict, run_opts: dict | None = None) -> dict:
    """Run (or resume) the federation described by ``hparams``.

    The run holds its save folder's lock from start to end (see
    :meth:`~speechbrain_omc.federated.checkpoint.CheckpointStore.lock`): a
    second run on the same folder is refused before it changes anything.

    Arguments
    ---------
    hparams : dict
        Loaded hyperparameters (see the packaged ``fed_omc.yaml``).
    run_opts : dict, optional
        SpeechBrain run options.

    Returns
    -------
    dict
        The summary also written to ``summary.json``.

    Raises
    ------
    CheckpointLocked
        Another server runs on the same save folder.
    """
    save = Path(hparams["save_folder"])
    save.mkdir(parents=True, exist_ok=True)
    with CheckpointStore(save / "server.ckpt") as store:
        return _federate(hparams, run_opts, store)


def _federate(hparams: dict, run_opts: dict | None, store: CheckpointStore) -> dict:
    """:func:`run_federation`'s run, its checkpoint folder locked."""
    from tqdm import tqdm

    start = time.perf_counter()
    out = Path(hparams["output_folder"])
    save = store.path.parent
    client_csvs, csvs = prepare_federation(hparams)
    valid_csv, test_csv = csvs[hparams["valid_split"]], csvs[hparams["test_split"]]
    label_encoder = build_label_encoder(
        csvs[hparams["train_split"]],
        save / "label_encoder.txt",
        blank_index=hparams["blank_index"],
    )
    client_data = {
        cid: dataset_from_csv(path, hparams, label_encoder)
        for cid, path in client_csvs.items()
    }
    valid_data = dataset_from_csv(valid_csv, hparams, label_encoder, "ascending")
    test_data = dataset_from_csv(test_csv, hparams, label_encoder, "ascending")

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
    omc = hparams.get("omc")
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
    if hparams.get("fresh_start"):
        store.discard()
    extra = server.load(store)
    rows: list[dict] = list(extra.get("log", [])) if extra else []
    first_round = server.round
    rounds = int(hparams["rounds"])
    eval_every = max(1, int(hparams.get("eval_every", 1)))
    fail = set(hparams.get("fail_clients") or [])
    valid_opts = hparams["valid_dataloader_opts"]
    title = (
        f"{hparams['experiment_name']}: {len(client_data)} clients, "
        f"{hparams['clients_per_round']} per round"
    )

    bar = tqdm(
        total=rounds,
        initial=server.round,
        desc="rounds",
        dynamic_ncols=True,
        disable=hparams.get("noprogressbar", False),
    )
    # Peak RSS of the training steps only: the high-water mark is reset
    # before each client's local training and read after it, so imports,
    # validation and the final test do not count. Not with
    # measure_server_memory: the server's round peak uses the same mark.
    measure_train_rss = not hparams.get("measure_server_memory", False)
    peak_train_rss = 0
    train_cpu = 0.0

    def train(cid: str, message: bytes) -> bytes:
        nonlocal peak_train_rss, train_cpu
        if cid in fail:
            raise RuntimeError(f"injected failure of {cid} (fail_clients)")
        if measure_train_rss:
            reset_peak_rss()
        cpu = time.process_time()
        reply = client.train(message)
        train_cpu += time.process_time() - cpu
        if measure_train_rss:
            peak_train_rss = max(peak_train_rss, peak_rss_since_reset())
        return reply

    def progress(clients):
        return tqdm(
            clients,
            desc=f"round {server.round + 1} clients",  # the round being run
            leave=False,
            dynamic_ncols=True,
            disable=hparams.get("noprogressbar", False),
        )

    while server.round < rounds:
        round_start = time.perf_counter()
        # One client at a time, each reply folded in as it comes (the
        # server's memory does not grow with the clients per round).
        report = run_round(server, train, hparams.get("dropout", 0.0), progress)
        stats = None
        if report.round % eval_every == 0 or report.round == rounds:
            stats = client.evaluate(server.message_for("eval"), valid_data, valid_opts)
        row = round_row(report, stats, time.perf_counter() - round_start)
        rows.append(row)
        server.save(store, extra={"log": rows})
        write_csv(rows, out / "rounds.csv")
        plot_rounds(rows, out / "rounds.png", title)
        bar.update(1)
        bar.set_postfix(
            WER=row.get("valid_WER"),
            MiB=round((row["bytes_down"] + row["bytes_up"]) / 2**20, 2),
        )
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
    bar.close()
    write_csv(rows, out / "rounds.csv")
    if rows:
        plot_rounds(rows, out / "rounds.png", title)

    # The final model is saved first: a failing test must not lose it.
    atomic_save(server.state_dict()["model"], out / "final_model.pt")
    # The final global model, as clients receive it, on the held-out speakers.
    test = client.evaluate(server.message_for("eval"), test_data, valid_opts)
    errors = list(getattr(brain, "utterance_errors", []))
    write_test_errors(errors, out / "test_errors.csv")
    interval = (
        bootstrap_wer([e for _, e, _ in errors], [w for _, _, w in errors])
        if errors
        else None
    )
    trained_here = server.round - first_round
    summary = {
        "experiment": hparams["experiment_name"],
        "omc": _omc_summary(omc),
        "omc_wire": hparams.get("omc_wire", "both") if omc else None,
        "seed": hparams["seed"],
        "rounds": rounds,
        "num_clients": len(client_data),
        "clients_per_round": hparams["clients_per_round"],
        "local_epochs": hparams["local_epochs"],
        "test_WER": test.get("WER"),
        "test_WER_ci95": None if interval is None else [interval.low, interval.high],
        "test_WER_se": None if interval is None else interval.se,
        "test_utterances": len(errors),
        "test_words": sum(w for _, _, w in errors),
        "test_CER": test.get("CER"),
        "test_loss": test.get("loss"),
        "valid_WER": next(
            (r["valid_WER"] for r in reversed(rows) if r.get("valid_WER") is not None),
            None,
        ),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "float32_bytes_down": sum(r["float32_bytes_down"] for r in rows),
        "float32_bytes_up": sum(r["float32_bytes_up"] for r in rows),
        "parameter_bytes": parameter_bytes(brain.modules),
        "float32_parameter_bytes": float32_parameter_bytes(brain.modules),
        "parameters": sum(
            v.numel() for n, v in server.model.items() if n not in server.buffers
        ),
        "left_out": sum(r["sampled"] - r["clients"] for r in rows),
        "train_minutes": round(sum(float(r["seconds"]) for r in rows) / 60, 2),
        # Of the rounds trained by this process (a resumed run: the rest).
        "peak_train_rss_bytes": peak_train_rss or None,
        "train_cpu_seconds_per_round": (
            round(train_cpu / trained_here, 3) if trained_here else None
        ),
        "minutes_this_process": round((time.perf_counter() - start) / 60, 2),
        # CPU time does not depend on what else the machine runs.
        "cpu_minutes_this_process": round(time.process_time() / 60, 2),
    }
    summary["bytes_total"] = summary["bytes_down"] + summary["bytes_up"]
    summary["float32_bytes_total"] = (
        summary["float32_bytes_down"] + summary["float32_bytes_up"]
    )
    (out / "summary.json").write_text(
        json.dumps(summary, indent=2) + "\n", encoding="utf-8"
    )
    logger.info("summary: %s", json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Command line: a hparams file (path or packaged name) and overrides.

    Arguments
    ---------
    argv : list of str, optional
        Command line without the program; ``sys.argv[1:]`` by default.

    Returns
    -------
    dict
        The run's summary.
    """
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
