#!/usr/bin/env python3
"""Federated Conformer-CTC with Online Model Compression, simulated in one process.

The whole federation runs here, on the bundled SynthSpeech corpus by default
(or LibriSpeech, partitioned by speaker): the training speakers are grouped
into clients, and every round the server
(:class:`speechbrain_omc.federated.server.FedAvgServer`) samples clients,
sends each the compressed global model as bytes, lets one reused
SpeechBrain Brain (:class:`speechbrain_omc.federated.client.OMCClient`) train
it on that client's speakers, validates and averages the compressed replies in
float32, and checkpoints. No server process, no network: the messages are the
same bytes a deployment would send (the Flower app under
``speechbrain_omc/federated/flower`` sends them over the network).

To run (from the repository root)::

    python recipes/SynthSpeech/federated/train.py \
        recipes/SynthSpeech/federated/hparams/fed_omc.yaml
    python recipes/SynthSpeech/federated/train.py \
        recipes/SynthSpeech/federated/hparams/fed_fp32.yaml
    python recipes/SynthSpeech/federated/train.py \
        recipes/SynthSpeech/federated/hparams/fed_librispeech_omc.yaml \
        --data_folder /path/to/LibriSpeech

Any hyperparameter can be overridden (``--rounds 4 --clients_per_round 2``).

Outputs in ``<output_folder>``:

* ``rounds.csv``: per round the clients sampled and averaged, bytes down and
  up (``len()`` of the messages) and their float32 equivalents, the mean
  client training loss, validation loss/WER/CER, seconds and the 1-minute
  load average of the machine;
* ``rounds.png``: validation WER and cumulative bytes against rounds;
* ``summary.json``: test WER/CER of the final global model on the held-out
  speakers, total bytes, parameter memory of the client model;
* ``save/server.ckpt`` (and ``server.ckpt.prev``, the round before): the
  server state after the last completed round, written atomically. Started
  again after a crash (even SIGKILL), the run resumes from it and ends with
  the same final model as an uninterrupted run: every random draw is a
  function of ``(seed, round, client)``. A corrupt checkpoint is reported and
  the previous one used; one saved with other settings (compression, server
  optimizer, clients, their training hyperparameters, the model) is refused
  with the differences named, unless ``--fresh_start True`` sets it aside;
* ``final_model.pt``: the final global model (float32 state dict), written
  before the final test.

Each round streams: the clients train one after another, and each reply is
validated and folded into the server's running sums before the next client
starts (:func:`speechbrain_omc.federated.simulation.run_round`), so the
server's memory does not grow with ``clients_per_round``. ``dropout`` makes
a seeded fraction of each round's sampled clients unavailable. A client
that raises is logged and left out of its round (``fail_clients`` makes
chosen clients raise, for testing). A client's
``num_examples`` (its FedAvg weight) may not exceed its partition's size;
``aggregation`` picks FedAvg or a robust rule (``median``, ``trimmed_mean``,
``norm_clip``, see :mod:`speechbrain_omc.federated.aggregation`).

Authors
-------
* speechbrain-omc contributors
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from tqdm import tqdm

from speechbrain_omc.accounting import float32_parameter_bytes, parameter_bytes
from speechbrain_omc.data.librispeech import prepare_librispeech
from speechbrain_omc.federated.aggregation import Aggregation
from speechbrain_omc.federated.checkpoint import CheckpointStore, atomic_save
from speechbrain_omc.federated.client import OMCClient
from speechbrain_omc.federated.partition import client_manifests, partition_manifest
from speechbrain_omc.federated.server import FedAvgServer, RoundReport
from speechbrain_omc.federated.simulation import run_round

logger = logging.getLogger(__name__)

_ASR_RECIPE = Path(__file__).resolve().parents[1] / "ASR" / "train.py"


def _load_asr_recipe():
    """The centralized ASR recipe module (``ASR``, ``dataset_from_csv``...)."""
    name = "synthspeech_asr_recipe"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _ASR_RECIPE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


asr_recipe = _load_asr_recipe()


class FedASR(asr_recipe.ASR):
    """The centralized recipe's Conformer-CTC Brain, as a federated client.

    Same forward, loss and decoding; the stage end only records statistics
    in ``stage_stats`` (which :class:`OMCClient` reports): learning-rate
    annealing and checkpoints belong to the server's rounds, not to a
    client's local epochs.
    """

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Record the stage's loss, and WER/CER outside training.

        Arguments
        ---------
        stage : sb.Stage
            The stage that ended.
        stage_loss : float
            Average loss over the stage.
        epoch : int, optional
            The epoch number.
        """
        stats = {"loss": float(stage_loss)}
        if stage != sb.Stage.TRAIN:
            stats["WER"] = float(self.wer_metric.summarize("error_rate"))
            stats["CER"] = float(self.cer_metric.summarize("error_rate"))
        self.stage_stats = stats


CSV_FIELDS = [
    "round",
    "sampled",
    "clients",
    "rejected",
    "bytes_down",
    "bytes_up",
    "float32_bytes_down",
    "float32_bytes_up",
    "train_loss",
    "valid_loss",
    "valid_WER",
    "valid_CER",
    "seconds",
    "load1",
    "server_encode_s",
    "server_decode_s",
    "server_validate_s",
    "server_aggregate_s",
    "server_rss_before_mb",
    "server_rss_peak_mb",
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


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def round_row(
    report: RoundReport, evaluation: dict | None, seconds: float
) -> dict[str, object]:
    """One round's line of ``rounds.csv`` (both the embedded run and Flower's).

    Arguments
    ---------
    report : RoundReport
        The server's report of the round.
    evaluation : dict, optional
        Validation ``loss``, ``WER`` and ``CER``, if the round evaluated.
    seconds : float
        Wall-clock time of the round.

    Returns
    -------
    dict
        Keys :data:`CSV_FIELDS`.
    """
    evaluation = evaluation or {}
    memory = report.rss or {}
    server = {f"server_{k}_s": round(v, 4) for k, v in report.seconds.items()}
    server.update(
        {
            f"server_rss_{k}_mb": round(memory[k] / 2**20, 2) if k in memory else None
            for k in ("before", "peak")
        }
    )
    return {
        "round": report.round,
        "sampled": len(report.sampled),
        "clients": len(report.accepted),
        "rejected": "; ".join(f"{c}: {r}" for c, r in report.rejected.items()),
        "bytes_down": report.bytes_down,
        "bytes_up": report.bytes_up,
        "float32_bytes_down": report.float32_bytes_down,
        "float32_bytes_up": report.float32_bytes_up,
        "train_loss": _mean(
            m.get("train_loss") for m in report.client_metrics.values()
        ),
        "valid_loss": evaluation.get("loss"),
        "valid_WER": evaluation.get("WER"),
        "valid_CER": evaluation.get("CER"),
        "seconds": round(seconds, 2),
        "load1": round(os.getloadavg()[0], 2),
        **server,
    }


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
        ),
        run_settings=run_settings(hparams),
        roles=roles,
        memory_budget=int(hparams.get("aggregation_memory_mb", 1024) * 2**20),
        measure_memory=bool(hparams.get("measure_server_memory", False)),
    )


def write_csv(rows: list[dict], path: Path) -> None:
    """Write the per-round log atomically.

    Arguments
    ---------
    rows : list of dict
        One row per round, keys :data:`CSV_FIELDS`.
    path : Path
        Destination.
    """
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS}
            )
    os.replace(tmp, path)


def plot_rounds(rows: list[dict], path: Path, title: str = "") -> None:
    """Validation WER and cumulative bytes against rounds, as a PNG.

    Arguments
    ---------
    rows : list of dict
        The per-round log.
    path : Path
        Destination PNG.
    title : str
        Figure title.
    """
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no font debug lines
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax_wer, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    points = [
        (r["round"], r["valid_WER"]) for r in rows if r.get("valid_WER") is not None
    ]
    if points:
        ax_wer.plot(*zip(*points), marker="o")
    ax_wer.set_xlabel("round")
    ax_wer.set_ylabel("validation WER (%)")
    ax_wer.grid(alpha=0.3)
    total, total32 = [], []
    for r in rows:
        previous = total[-1] if total else 0
        previous32 = total32[-1] if total32 else 0
        total.append(previous + (r["bytes_down"] + r["bytes_up"]) / 2**20)
        total32.append(
            previous32 + (r["float32_bytes_down"] + r["float32_bytes_up"]) / 2**20
        )
    ax_bytes.plot(rounds, total, marker="o", label="sent (measured)")
    ax_bytes.plot(rounds, total32, linestyle="--", label="float32 equivalent")
    ax_bytes.set_xlabel("round")
    ax_bytes.set_ylabel("cumulative MiB communicated")
    ax_bytes.legend()
    ax_bytes.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def build_brain(hparams: dict, run_opts: dict | None = None) -> FedASR:
    """The one Brain of this process, without a checkpointer.

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


def run_federation(hparams: dict, run_opts: dict | None = None) -> dict:
    """Run (or resume) the federation described by ``hparams``.

    Arguments
    ---------
    hparams : dict
        Loaded hyperparameters (see ``hparams/fed_omc.yaml``).
    run_opts : dict, optional
        SpeechBrain run options.

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    start = time.perf_counter()
    out = Path(hparams["output_folder"])
    save = Path(hparams["save_folder"])
    save.mkdir(parents=True, exist_ok=True)
    client_csvs, csvs = prepare_federation(hparams)
    valid_csv, test_csv = csvs[hparams["valid_split"]], csvs[hparams["test_split"]]
    label_encoder = asr_recipe.build_label_encoder(
        csvs[hparams["train_split"]],
        save / "label_encoder.txt",
        blank_index=hparams["blank_index"],
    )
    client_data = {
        cid: asr_recipe.dataset_from_csv(path, hparams, label_encoder)
        for cid, path in client_csvs.items()
    }
    valid_data = asr_recipe.dataset_from_csv(
        valid_csv, hparams, label_encoder, "ascending"
    )
    test_data = asr_recipe.dataset_from_csv(
        test_csv, hparams, label_encoder, "ascending"
    )

    brain = build_brain(hparams, run_opts)
    brain.tokenizer = label_encoder
    client = OMCClient(
        brain,
        client_data,
        local_epochs=hparams["local_epochs"],
        max_steps=hparams.get("max_local_steps"),
        train_loader_kwargs=hparams["train_dataloader_opts"],
        progressbar=hparams.get("client_progressbar", False),
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
    store = CheckpointStore(save / "server.ckpt")
    if hparams.get("fresh_start"):
        store.discard()
    extra = server.load(store)
    rows: list[dict] = list(extra.get("log", [])) if extra else []
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

    def train(cid: str, message: bytes) -> bytes:
        if cid in fail:
            raise RuntimeError(f"injected failure of {cid} (fail_clients)")
        return client.train(message)

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
    summary = {
        "experiment": hparams["experiment_name"],
        "omc": None
        if omc is None
        else {
            "format": omc.format,
            "transform": omc.transform,
            "weights_only": omc.weights_only,
            "fp32_fraction": omc.fp32_fraction,
            "fp32_policy": omc.fp32_policy,
        },
        "seed": hparams["seed"],
        "rounds": rounds,
        "num_clients": len(client_data),
        "clients_per_round": hparams["clients_per_round"],
        "local_epochs": hparams["local_epochs"],
        "test_WER": test.get("WER"),
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
    """Parse the command line, set up the experiment folder, run.

    Arguments
    ---------
    argv : list of str, optional
        Command line without the program; ``sys.argv[1:]`` by default.

    Returns
    -------
    dict
        The run's summary.
    """
    argv = sys.argv[1:] if argv is None else argv
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
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
