"""Federation at scale: server time, memory and bytes per round; the 130M numbers.

::

    PYTHONPATH=. python benchmarks/federated_scale.py                  # all parts
    PYTHONPATH=. python benchmarks/federated_scale.py --parts analytic  # one part
    PYTHONPATH=. python benchmarks/federated_scale.py --render-only    # the .md again

Parts (each recorded in ``benchmarks/results/federated_scale.json`` under its
name, the measured part under ``measured_<runner>_<clients per round>``, with
the command, the machine and the load average before and after;
``benchmarks/results/federated_scale.md`` is rendered from it):

``measured``
    ``fed_scale.yaml`` (packaged; the federated recipe's too: 1,000
    utterance-level clients, a 6M-parameter Conformer, one local step, 10 % seeded
    dropouts) with 10, 100 and 1,000 clients per round, each in fresh
    processes, in both runners:

    * ``embedded``: the embedded simulation's round
      (:func:`speechbrain_omc.federated.simulation.run_round`, the server
      built by :func:`speechbrain_omc.asr.build_server`) in this process, with
      its client (one Brain, every client's data) in a worker process
      that answers each message (bytes through files, orders over a pipe): the
      embedded runner with its
      client moved out, so that the process's RSS is the server's own;
    * ``flower``: the Flower app in Flower's Simulation Engine (a local
      SuperLink with ``--simulation``, 1,000 virtual SuperNodes, Ray with one
      CPU per actor): the ServerApp's process holds the server, Flower's
      in-memory state and Ray's driver; the clients run in Ray's actors.
      ``--max-in-flight`` sets the app's window of messages in flight
      (recorded under ``measured_flower_<clients per round>_window<n>``).

    Per round, from the server's own report: its seconds (encode, decode,
    validate, aggregate), bytes down and up (``len()`` of the messages), and
    its process's resident memory when the round opened and at its peak
    (``/proc/self/status``; the peak mark is reset when a round opens).

``analytic``
    From the selection plan alone (``benchmarks/plan_sizes.py``, models on
    the ``meta`` device): a ~130M-parameter Conformer and SpeechBrain's
    conformer_large, per format and partial-quantization fraction, for 100
    and 1,000 clients per round: bytes per round down and up, the server's
    memory with streaming aggregation and before it, a client's parameter
    memory.

``deployment``
    One round of a conformer_large-sized model (fed_omc.yaml with
    conformer_large's shape: 76M parameters) through Flower's Deployment
    Engine on loopback: a SuperLink and two SuperNodes (each a client with
    three utterances), bytes from the server's report, seconds, and the peak
    RSS of every Flower process (``VmHWM``, sampled every 0.1 s).

Needs about an hour on two shared cores (most of it the 1,000-client rounds);
run the parts, runners and settings in separate invocations (``--parts``,
``--runners``, ``--clients-per-round``, ``--rounds``): each is recorded on its
own.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # flower_harness: the loopback deployment
sys.path.insert(0, str(REPO / "benchmarks"))  # plan_sizes: the analytic tables

from speechbrain_omc.federated.flower.streaming import DEFAULT_WINDOW  # noqa: E402

OUT = REPO / "benchmarks" / "results"
RECORD = OUT / "federated_scale.json"
# The packaged files (the recipe's hparams/ holds identical copies).
SCALE_HPARAMS = REPO / "speechbrain_omc/asr/hparams/fed_scale.yaml"
OMC_HPARAMS = REPO / "speechbrain_omc/asr/hparams/fed_omc.yaml"
APP = REPO / "recipes/SynthSpeech/federated/flower"
MIB = 2**20
PARTS = ("measured", "analytic", "deployment")

#: conformer_large's shape in the recipe's hparams (as benchmarks/train_step.py).
CONFORMER_LARGE = {
    "d_model": 512,
    "nhead": 8,
    "num_encoder_layers": 12,
    "d_ffn": 2048,
    "kernel_size": 31,
    "n_mels": 80,
    "cnn_channels": 64,
    "cnn_out_channels": 32,
}


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _machine() -> str:
    model = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()} {model}, {os.cpu_count()} CPUs, {memory:.0f} GiB, "
        f"Python {platform.python_version()}"
    )


# ------------------------------------------------------------------ embedded
def _client_process(conn, overrides: dict) -> None:
    """The embedded simulation's client in its own process: build, announce,
    answer."""
    import torch
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_omc import asr
    from speechbrain_omc.federated.client import OMCClient

    with open(SCALE_HPARAMS, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    hparams["noprogressbar"] = True
    torch.set_num_threads(1)
    save = Path(hparams["save_folder"])
    save.mkdir(parents=True, exist_ok=True)
    client_csvs, csvs = asr.prepare_federation(hparams)
    encoder = asr.build_label_encoder(
        csvs[hparams["train_split"]],
        save / "label_encoder.txt",
        blank_index=hparams["blank_index"],
    )
    data = {
        cid: asr.dataset_from_csv(path, hparams, encoder)
        for cid, path in client_csvs.items()
    }
    brain = asr.build_brain(hparams)
    brain.tokenizer = encoder
    client = OMCClient(
        brain,
        data,
        local_epochs=hparams["local_epochs"],
        max_steps=hparams.get("max_local_steps"),
        train_loader_kwargs=hparams["train_dataloader_opts"],
    )
    buffer = io.BytesIO()
    torch.save(client.get_model(), buffer)
    conn.send(
        {
            "model": buffer.getvalue(),
            "buffers": client.buffer_names(),
            "roles": client.parameter_roles(),
            "sizes": {cid: len(d) for cid, d in data.items()},
        }
    )
    busy = 0.0
    while True:
        order = conn.recv()
        if order is None:
            conn.send({"busy": busy})
            return
        message = Path(order).read_bytes()
        start = time.perf_counter()
        try:
            reply = client.train(message)
            status = "ok"
        except Exception as error:  # reported to the server as the client's
            reply, status = b"", "ERROR " + repr(error)[:500]
        busy += time.perf_counter() - start
        del message
        Path(order).with_suffix(".reply").write_bytes(reply)
        conn.send(status)


def run_embedded(k: int, rounds: int, workdir: Path) -> dict:
    """One configuration of the embedded runner (this process is the server)."""
    import torch
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_omc import asr
    from speechbrain_omc.codec.memory import trim_heap
    from speechbrain_omc.federated.simulation import run_round

    torch.set_num_threads(1)
    overrides = {
        "output_folder": str(workdir),
        "clients_per_round": k,
        "rounds": rounds,
        "measure_server_memory": True,
    }
    with open(SCALE_HPARAMS, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    context = mp.get_context("spawn")
    mine, theirs = context.Pipe()
    worker = context.Process(target=_client_process, args=(theirs, overrides))
    worker.start()
    init = mine.recv()
    model = torch.load(io.BytesIO(init.pop("model")))
    server = asr.build_server(
        hparams, model, list(init["sizes"]), init["buffers"], init["sizes"],
        roles=init["roles"],
    )  # fmt: skip
    del model, init
    gc.collect()

    # The bytes travel through files (the page cache, not this process's
    # memory): writing a message copies nothing, and a reply is read into
    # one buffer of its exact size, as a server would take it from a socket.
    # A pipe's receive grows a buffer chunk by chunk and copies it, which
    # the server's RSS would count.
    wire_dir = workdir / "wire"
    wire_dir.mkdir(parents=True, exist_ok=True)

    def train(client: str, message: bytes) -> bytes:
        path = wire_dir / "message.bin"
        path.write_bytes(message)
        del message  # sent: the server holds one message at a time
        mine.send(str(path))
        status = mine.recv()
        if status != "ok":
            raise RuntimeError(status[6:])
        return path.with_suffix(".reply").read_bytes()

    # Round 1 starts, as later rounds do, from a trimmed heap: memory freed
    # while building the server would otherwise be reused unseen.
    trim_heap()

    out, sampled = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        report = run_round(server, train, hparams["dropout"])
        out.append(_round_record(report, time.perf_counter() - start))
        sampled = sampled or report.sampled
    mine.send(None)
    client_seconds = mine.recv()["busy"]
    worker.join(60)
    shapes = server.state.shapes()
    return {
        "runner": "embedded",
        "clients_per_round": k,
        "rounds": out,
        "model_float32_bytes": server.model_nbytes(),
        "client_seconds_total": round(client_seconds, 2),
        **_predicted(shapes, server.roles, server.omc, sampled),
    }


def _predicted(shapes, roles, omc, sampled: list[str]) -> dict:
    """The largest message of round 1 and the server's predicted rise."""
    from plan_sizes import round_sizes

    sizes = round_sizes(
        shapes, omc, len(sampled), round=1, roles=roles, clients=sampled
    )
    parts = sizes.server_streaming
    return {
        "largest_message": sizes.largest_message,
        "predicted_rise": parts["running"]
        + parts["broadcast"]
        + parts["message"]
        + parts["decoding"],
    }


def _round_record(report, wall: float | None) -> dict:
    return {
        "round": report.round,
        "sampled": len(report.sampled),
        "accepted": len(report.accepted),
        "dropped": sum("dropped out" in r for r in report.rejected.values()),
        "other_rejections": sorted(
            {r for r in report.rejected.values() if "dropped out" not in r}
        )[:3],
        "bytes_down": report.bytes_down,
        "bytes_up": report.bytes_up,
        "server_seconds": {k: round(v, 4) for k, v in report.seconds.items()},
        "rss_before": (report.rss or {}).get("before"),
        "rss_peak": (report.rss or {}).get("peak"),
        "wall_seconds": None if wall is None else round(wall, 2),
    }


# -------------------------------------------------------------------- flower
def run_flower(k: int, rounds: int, workdir: Path, window: int) -> dict:
    """One configuration in Flower's Simulation Engine (1,000 virtual nodes).

    Arguments
    ---------
    k : int
        Clients per round.
    rounds : int
        Rounds to run.
    workdir : Path
        A fresh folder for the run.
    window : int
        The ServerApp's ``max-in-flight``: train messages unanswered at once.

    Returns
    -------
    dict
        The run's rounds, sizes and predicted rise.
    """
    import yaml
    from flower_harness import LocalDeployment

    num_clients = 1000
    overrides = {
        "output_folder": str(workdir / "out"),
        "clients_per_round": k,
        "rounds": rounds,
        "measure_server_memory": True,
    }
    run_config = {
        "hparams": str(SCALE_HPARAMS),
        "overrides": yaml.safe_dump(overrides, default_flow_style=True).strip(),
        "result-dir": str(workdir / "result"),
        "evaluate-nodes": 0,
        "min-nodes": num_clients,
        "round-timeout": 3600,
        "max-in-flight": window,
    }
    nodes = [{"partition-id": i} for i in range(num_clients)]
    federation = {"num-supernodes": num_clients, "client-resources-num-cpus": 1}
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with LocalDeployment(
        workdir / "flower",
        nodes,
        simulation=True,
        federation_config=federation,
        env=env,
    ) as deployment:
        deployment.run(APP, run_config, timeout=7200)
    wall = time.perf_counter() - start
    history = json.loads((workdir / "result" / "flower_history.json").read_text())
    rows = list(csv.DictReader(open(workdir / "result" / "rounds.csv")))
    out = []
    for entry, row in zip(history, rows):
        report = _Report(entry)
        out.append(_round_record(report, float(row["seconds"])))
    model_bytes = _model_nbytes(workdir / "result" / "final_model.pt")
    # The plan's shapes and roles, from the recipe's modules as the app's
    # Brain holds them.
    import torch
    from hyperpyyaml import load_hyperpyyaml
    from plan_sizes import model_shapes

    with open(SCALE_HPARAMS, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    shapes, roles = model_shapes(torch.nn.ModuleDict(hparams["modules"]))
    return {
        "runner": "flower",
        "clients_per_round": k,
        "window": window,
        "rounds": out,
        "model_float32_bytes": model_bytes,
        "run_seconds": round(wall, 1),
        **_predicted(shapes, roles, hparams["omc"], history[0]["sampled"]),
    }


class _Report:
    """A RoundReport's fields from the Flower app's history."""

    def __init__(self, entry: dict):
        self.__dict__.update(entry)


def _model_nbytes(path: Path) -> int:
    import torch

    return sum(4 * v.numel() for v in torch.load(path, weights_only=True).values())


# ---------------------------------------------------------------- analytic
FORMATS = ["bf16", "e3m7", "e4m3", "int8"]
FRACTIONS = [0.0, 0.1, 0.25]


def run_analytic() -> dict:
    """The plan-size tables (nothing allocated: models on ``meta``)."""
    from plan_sizes import PRESETS, conformer_ctc, round_sizes

    from speechbrain_omc.engine.config import OMCConfig

    out = {}
    for preset in ("conformer_130m", "conformer_large"):
        model = conformer_ctc(preset)
        rows = []
        configs = [("float32", 0.0, None)] + [
            (fmt, fraction, OMCConfig(format=fmt, fp32_fraction=fraction))
            for fmt in FORMATS
            for fraction in FRACTIONS
        ]
        for fmt, fraction, config in configs:
            entry = {"format": fmt, "fp32_fraction": fraction}
            for k in (100, 1000):
                sizes = round_sizes(model, config, k)
                entry[str(k)] = {
                    "bytes_down": sizes.bytes_down,
                    "bytes_up": sizes.bytes_up,
                    "float32_bytes_down": sizes.float32_bytes_down,
                    "largest_message": sizes.largest_message,
                    "server_streaming": sizes.server_streaming,
                    "server_before": sizes.server_before,
                    "client_parameter_bytes": sizes.client_parameter_bytes,
                    "client_float32_bytes": sizes.client_float32_bytes,
                }
            rows.append(entry)
        out[preset] = {
            "shape": PRESETS[preset],
            "parameters": sum(p.numel() for p in model.parameters()),
            "rows": rows,
        }
    return out


# -------------------------------------------------------------- deployment
def _sampler(tag: str, peaks: dict, stop: threading.Event) -> None:
    from flower_harness import _tagged_pids

    while not stop.is_set():
        for pid in _tagged_pids(tag):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            match = re.search(r"VmHWM:\s+(\d+) kB", status)
            if match is None:
                continue
            words = command.decode(errors="replace").split("\0")
            program = next(
                (Path(w).name for w in words if Path(w).name.startswith("fl")), words[0]
            )
            entry = peaks.setdefault(pid, {"program": program, "peak": 0})
            entry["peak"] = max(entry["peak"], int(match.group(1)) * 1024)
        stop.wait(0.1)


def run_deployment(workdir: Path) -> dict:
    """One round of a conformer_large-sized model on loopback (two SuperNodes)."""
    import yaml
    from flower_harness import LocalDeployment
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_omc import asr

    overrides = {
        **CONFORMER_LARGE,
        "output_folder": str(workdir / "out"),
        "num_clients": 2,
        "clients_per_round": 2,
        "rounds": 1,
        "local_epochs": 1,
        "max_local_steps": 1,
        "batch_size": 3,
        "eval_every": 1000,
        "measure_server_memory": True,
    }
    with open(OMC_HPARAMS, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    save = Path(hparams["save_folder"])
    save.mkdir(parents=True, exist_ok=True)
    clients, csvs = asr.prepare_federation(hparams)
    encoder = save / "label_encoder.txt"
    asr.build_label_encoder(
        csvs[hparams["train_split"]], encoder, blank_index=hparams["blank_index"]
    )
    del hparams
    gc.collect()
    nodes = []
    for cid in sorted(clients)[:2]:  # three utterances each
        lines = clients[cid].read_text().splitlines()
        small = workdir / f"{cid}.csv"
        small.write_text("\n".join(lines[:4]) + "\n")
        nodes.append({"manifest": str(small), "label-encoder": str(encoder)})
    run_config = {
        "hparams": str(OMC_HPARAMS),
        "overrides": yaml.safe_dump(overrides, default_flow_style=True).strip(),
        "result-dir": str(workdir / "result"),
        "evaluate-nodes": 0,
        "min-nodes": 2,
        "round-timeout": 3600,
    }
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    peaks: dict = {}
    stop = threading.Event()
    with LocalDeployment(workdir / "flower", nodes, env=env) as deployment:
        sampler = threading.Thread(
            target=_sampler, args=(deployment.tag, peaks, stop), daemon=True
        )
        sampler.start()
        start = time.perf_counter()
        log = deployment.run(APP, run_config, timeout=3600)
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
    history = json.loads((workdir / "result" / "flower_history.json").read_text())
    summary = json.loads((workdir / "result" / "summary.json").read_text())
    row = next(csv.DictReader(open(workdir / "result" / "rounds.csv")))
    report = history[0]
    by_program: dict[str, list[int]] = {}
    for entry in peaks.values():
        by_program.setdefault(entry["program"], []).append(entry["peak"])
    return {
        "parameters": _parameters(workdir / "result" / "final_model.pt"),
        "model_float32_bytes": _model_nbytes(workdir / "result" / "final_model.pt"),
        "bytes_down": report["bytes_down"],
        "bytes_up": report["bytes_up"],
        "float32_bytes_down": report["float32_bytes_down"],
        "float32_bytes_up": report["float32_bytes_up"],
        "accepted": report["accepted"],
        "rejected": report["rejected"],
        "server_seconds": report["seconds"],
        "server_rss": report["rss"],
        "round_seconds": float(row["seconds"]),
        "run_seconds": round(wall, 1),
        "test_WER": summary.get("test_WER"),
        "peak_rss": {p: sorted(v, reverse=True) for p, v in by_program.items()},
        "log_tail": log[-1500:],
    }


def _parameters(path: Path) -> int:
    import torch

    return sum(v.numel() for v in torch.load(path, weights_only=True).values())


# -------------------------------------------------------------------- main
def _child(args: list[str]) -> dict:
    """Run one configuration in a fresh process; its JSON result."""
    command = [sys.executable, __file__, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _save(record: dict) -> None:
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Run the chosen parts and record them; see the module docstring.

    Arguments
    ---------
    argv : list of str, optional
        The command line.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--runners", nargs="+", default=["embedded", "flower"])
    parser.add_argument(
        "--clients-per-round", nargs="+", type=int, default=[10, 100, 1000]
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_WINDOW,
        help="flower runner: train messages unanswered at once (the app's "
        "max-in-flight; default %(default)s, the app's own)",
    )
    parser.add_argument("--workdir", default="results/benchmark_federated_scale")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--wrapper",
        default="",
        help="how the command was wrapped (e.g. 'nice -n -10'), "
        "recorded in front of it",
    )
    parser.add_argument("--worker", choices=["embedded", "flower", "deployment"])
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()

    if args.worker:  # one configuration, in this fresh process
        k = args.clients_per_round[0]
        folder = {
            "embedded": workdir / f"embedded-{k}",
            "flower": workdir / f"flower-{k}-window{args.max_in_flight}",
            "deployment": workdir / "deployment",
        }[args.worker]
        # A fresh run: the apps resume from a checkpoint they find.
        shutil.rmtree(folder, ignore_errors=True)
        if args.worker == "embedded":
            result = run_embedded(k, args.rounds, folder)
        elif args.worker == "flower":
            result = run_flower(k, args.rounds, folder, args.max_in_flight)
        else:
            result = run_deployment(folder)
        print(json.dumps(result))
        return

    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    if not args.render_only:
        given = list(argv if argv is not None else sys.argv[1:])
        if "--wrapper" in given:  # recorded in front instead
            at = given.index("--wrapper")
            del given[at : at + 2]
        given = [a for a in given if not a.startswith("--wrapper=")]
        command = "PYTHONPATH=. python benchmarks/federated_scale.py " + shlex.join(
            given
        )
        if args.wrapper:
            command = f"{args.wrapper} {command}"
        # One record entry per runner and clients per round of the measured
        # part: each can be run (and re-run) in its own invocation, as the
        # shared machine allows.
        jobs = []
        for part in args.parts:
            if part != "measured":
                jobs.append((part, None, None))
                continue
            for runner in args.runners:
                for k in args.clients_per_round:
                    name = f"measured_{runner}_{k}"
                    if runner == "flower":
                        name += f"_window{args.max_in_flight}"
                    jobs.append((name, runner, k))
        for name, runner, k in jobs:
            entry = {
                "command": command.strip(),
                "machine": _machine(),
                "load_before": _load(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            begin = time.perf_counter()
            if name == "analytic":
                entry["result"] = run_analytic()
            elif runner is not None:
                print(f"{runner}, {k} clients per round ...", flush=True)
                flower = ["--max-in-flight", str(args.max_in_flight)]
                entry["result"] = _child(
                    ["--worker", runner, "--clients-per-round", str(k)]
                    + ["--rounds", str(args.rounds)]
                    + ["--workdir", str(workdir)]
                    + (flower if runner == "flower" else [])
                )
            else:
                entry["result"] = _child(
                    ["--worker", "deployment", "--workdir", str(workdir)]
                )
            entry["minutes"] = round((time.perf_counter() - begin) / 60, 1)
            entry["load_after"] = _load()
            record[name] = entry
            _save(record)
    from federated_scale_report import render  # benchmarks/, next to this file

    (OUT / "federated_scale.md").write_text(render(record), encoding="utf-8")


if __name__ == "__main__":
    main()
