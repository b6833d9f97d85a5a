"""Test harness: a Flower Deployment Engine on loopback, and in-process fakes.

:class:`LocalDeployment` starts real ``flower-superlink`` and
``flower-supernode`` processes on 127.0.0.1 (insecure: one machine only),
submits the app with ``flwr run`` and stops every process it started,
found by an environment tag (Flower spawns some in new sessions). Without
Flower processes: :class:`FakeGrid` (nodes are a Python function),
:func:`honest_reply` and :func:`app_handler` (nodes answering as the
ClientApp would).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from test_federated_recipe import TINY

logger = logging.getLogger(__name__)

#: Environment variable that marks every process of one deployment.
TAG_VARIABLE = "OMC_FLOWER_DEPLOYMENT_ID"

#: Name of the SuperLink connection written into the private ``FLWR_HOME``.
CONNECTION = "omc-local"

#: Environment for all Flower processes: no dependency installation (``flwr
#: run`` would otherwise build a fresh environment and download packages, e.g.
#: a CUDA torch), no update check and no telemetry (nothing leaves the host).
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free a moment ago on ``host``.

    Example
    -------
    >>> ports = free_ports(3)
    >>> len(set(ports))
    3
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def format_node_config(config: Mapping[str, Any]) -> str:
    """Render a ``--node-config`` value (space-separated TOML ``key=value``).

    Example
    -------
    >>> format_node_config({"partition-id": 0, "manifest": "/data/c0.csv"})
    'partition-id=0 manifest="/data/c0.csv"'
    """
    return " ".join(f"{key}={_toml_value(value)}" for key, value in config.items())


def format_run_config(config: Mapping[str, Any]) -> list[str]:
    """Render ``flwr run --run-config`` arguments, one flag per key.

    Example
    -------
    >>> format_run_config({"num-server-rounds": 2, "hparams": "a.yaml"})
    ['--run-config', 'num-server-rounds=2', '--run-config', 'hparams="a.yaml"']
    """
    args = []
    for key, value in config.items():
        args += ["--run-config", f"{key}={_toml_value(value)}"]
    return args


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON string escaping is valid TOML basic-string escaping.
    return json.dumps(str(value))


def _tagged_pids(tag: str, program: str | None = None) -> list[int]:
    """Live processes whose environment carries ``tag`` (and whose command
    line names ``program``)."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if state == "Z" or needle not in environ.split(b"\0"):
            continue
        if program is None or program.encode() in command:
            pids.append(int(entry.name))
    return pids


def _wait_http_ok(url: str, deadline: float, proc: subprocess.Popen) -> None:
    import httpx  # a Flower dependency

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).is_success:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in time")


class LocalDeployment:
    """SuperLink plus SuperNodes on 127.0.0.1, as a context manager.

    Arguments
    ---------
    workdir : str or Path
        Holds the private ``FLWR_HOME`` (CLI connection config, installed
        apps) and one log file per process; the SuperLink runs here, so a
        relative path in the run config resolves against it.
    node_configs : sequence of Mapping or str
        One ``--node-config`` per SuperNode (e.g. its partition's manifest),
        as a mapping or as the flag's string.
    startup_timeout : float
        Seconds to wait for each process's HTTP ``/health``.
    env : Mapping, optional
        Extra environment for all processes.
    simulation : bool
        A ``--simulation`` SuperLink (Ray) with one virtual SuperNode per
        entry of ``node_configs`` (their content ignored), no SuperNodes.
    federation_config : Mapping, optional
        ``flwr run --federation-config`` options of a simulation.

    Used as a context manager, it starts, and stops on leaving (printing
    the logs if the block raised).
    """

    def __init__(
        self,
        workdir: str | Path,
        node_configs: Sequence[Mapping[str, Any] | str],
        startup_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        simulation: bool = False,
        federation_config: Mapping[str, Any] | None = None,
    ):
        self.workdir = Path(workdir).resolve()
        self.node_configs = [
            c if isinstance(c, str) else format_node_config(c) for c in node_configs
        ]
        self.startup_timeout = startup_timeout
        self.simulation = simulation
        self.federation_config = dict(
            federation_config
            or {
                "num-supernodes": len(self.node_configs),
                "client-resources-num-cpus": 1,
            }
        )
        self.tag = uuid.uuid4().hex
        self.flwr_home = self.workdir / "flwr-home"
        self.env = {**os.environ, **FLOWER_ENV, **(env or {})}
        self.env.update({TAG_VARIABLE: self.tag, "FLWR_HOME": str(self.flwr_home)})
        if simulation:
            # Ray would address its processes by the host's network IP; off
            # its "cluster" mode it uses the loopback address instead.
            self.env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.procs: list[subprocess.Popen] = []
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self.runs: list[subprocess.Popen] = []
        self._logs: list[Any] = []
        self.superlink_port: int | None = None

    # ------------------------------------------------------------------ start
    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait until it serves, then the SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        nodes = [] if self.simulation else self.node_configs
        link_port, *node_ports = free_ports(1 + len(nodes))
        self.superlink_port = link_port
        # The CLI reads SuperLink connections from $FLWR_HOME/config.toml.
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\n'
            "insecure = true\n",
            encoding="utf-8",
        )
        try:
            self._start_superlink()
            for index, (config, port) in enumerate(zip(nodes, node_ports)):
                node = self._spawn(
                    f"supernode-{index}",
                    [
                        "flower-supernode",
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{link_port}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--node-config",
                        config,
                    ],
                )
                self.nodes.append(node)
                deadline = time.monotonic() + self.startup_timeout
                _wait_http_ok(f"http://127.0.0.1:{port}/health", deadline, node)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_superlink(self) -> None:
        port = self.superlink_port
        self.superlink = self._spawn(
            f"superlink-{len(self._logs)}",
            [
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
                # State in a file, not in memory: a restarted SuperLink still
                # knows its SuperNodes (which otherwise give up on a 401).
                "--database",
                str(self.workdir / "superlink.db"),
                *(["--simulation"] if self.simulation else []),
            ],
        )
        deadline = time.monotonic() + self.startup_timeout
        _wait_http_ok(f"http://127.0.0.1:{port}/health", deadline, self.superlink)

    def restart_superlink(self) -> None:
        """Start the SuperLink again on its port and database (after :meth:`kill`)."""
        if self.superlink is not None and self.superlink.poll() is None:
            raise RuntimeError("the SuperLink is still running")
        self._start_superlink()

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115
        self._logs.append(log)
        logger.info("starting %s: %s", name, " ".join(command))
        # A new session per process: one killpg reaches it and its own children.
        proc = subprocess.Popen(
            command,
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    # -------------------------------------------------------------------- run
    def submit(
        self, app_dir: str | Path, run_config: Mapping[str, Any] | None = None
    ) -> subprocess.Popen:
        """Submit the app (``flwr run --stream``, output in ``flwr-run-<n>.log``)."""
        if self.superlink_port is None:
            raise RuntimeError("start() the deployment first")
        command = [
            "flwr",
            "run",
            str(Path(app_dir).resolve()),
            CONNECTION,
            "--stream",
            *format_run_config(run_config or {}),
        ]
        if self.simulation:
            command += [
                "--federation-config",
                format_node_config(self.federation_config),
            ]
        proc = self._spawn(f"flwr-run-{len(self.runs)}", command)
        self.runs.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float = 600.0) -> str:
        """Wait for a submitted run to end; what ``flwr run`` printed."""
        log_path = self.workdir / f"flwr-run-{self.runs.index(proc)}.log"
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            dead = [
                p.args[0] for p in [self.superlink, *self.nodes] if p.poll() is not None
            ]
            if dead or time.monotonic() > deadline:
                output = log_path.read_text(errors="replace")
                why = f"{dead} exited" if dead else f"timed out after {timeout}s"
                raise TimeoutError(f"flwr run: {why}\n{output[-4000:]}")
            time.sleep(0.5)
        output = log_path.read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run failed ({proc.returncode}):\n{output}")
        return output

    def run(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        timeout: float = 600.0,
    ) -> str:
        """Submit the app and wait for the run's end."""
        return self.wait(self.submit(app_dir, run_config), timeout)

    def kill(self, what: str) -> list[int]:
        """SIGKILL, as a crash would, the ``"serverapp"`` (with its ``flwr
        run``) or the ``"superlink"`` (also the SuperLink and its SuperExec);
        the process ids killed."""
        if what not in ("serverapp", "superlink"):
            raise ValueError(f"cannot kill {what!r}")
        # ServerApps run on the SuperLink's side only (ClientApps are
        # flwr-clientapp processes of the SuperNodes).
        pids = set(_tagged_pids(self.tag, "flwr-serverapp"))
        pids |= {p.pid for p in self.runs if p.poll() is None}
        if what == "superlink" and self.superlink is not None:
            # The SuperLink's own SuperExec, not the SuperNodes' ones.
            parent = f"--parent-pid\0{self.superlink.pid}\0"
            pids |= set(_tagged_pids(self.tag, parent))
            pids.add(self.superlink.pid)
        for pid in sorted(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            if proc.pid in pids:
                proc.wait(timeout=10)  # reap our children
        while set(_tagged_pids(self.tag)) & pids and time.monotonic() < deadline:
            time.sleep(0.1)  # the others are reaped by their parents
        return sorted(pids)

    def logs(self) -> str:
        """The last 3000 characters of every process's log."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(
                f"==== {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            )
        return "\n".join(parts)

    # ------------------------------------------------------------------- stop
    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process of this deployment, SIGKILL after ``grace``."""
        for proc in reversed(self.procs):  # SuperNodes before the SuperLink
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for proc in self.procs:
                proc.poll()  # reap what exited
            if not _tagged_pids(self.tag):
                break
            time.sleep(0.2)
        for pid in _tagged_pids(self.tag):
            logger.warning("killing leftover Flower process %d", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def leftover_pids(self) -> list[int]:
        """Processes of this deployment still alive (should be none)."""
        return _tagged_pids(self.tag)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            print(self.logs())
            raise

    def __exit__(self, exc_type, *exc_info: object) -> None:
        if exc_type is not None:
            print(self.logs())
        self.stop()


class FakeGrid:
    """A grid without a SuperLink, for unit tests of the strategy and apps.

    Delivers each message to ``handler(node, message)`` and wraps what it
    returns as the reply's content; ``None`` is no reply (a node that timed
    out), an ``Error`` an error reply. Each ``send_and_receive`` call's
    message types and ``timeout`` are recorded in :attr:`calls` (no time
    passes here: a test checks that the configured timeout reaches the
    grid). ``push_messages`` / ``pull_messages`` (what a
    :class:`~speechbrain_omc.federated.flower.streaming.StreamingGrid` uses)
    deliver at push time and hand the replies out at the next pull, in the
    order ``reply_order`` gives (default: as pushed); :attr:`most_open` is
    the largest number of messages pushed and not yet pulled.

    Arguments
    ---------
    nodes : iterable of int
        The connected node ids.
    handler : callable
        ``(node id, Message) -> RecordDict | Error | None``.
    """

    def __init__(self, nodes, handler, reply_order=None):
        self.nodes = list(nodes)
        self.handler = handler
        self.reply_order = reply_order
        self.sent: list = []
        self.calls: list[tuple[list[str], float | None]] = []
        self._open: dict[str, Any] = {}  # message id -> reply (None: silent)
        self.most_open = 0

    def get_node_ids(self):
        """The connected nodes."""
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        """Deliver the messages; the replies that came back."""
        messages = list(messages)
        self.calls.append(([m.metadata.message_type for m in messages], timeout))
        replies = [self._answer(message) for message in messages]
        return [reply for reply in replies if reply is not None]

    def _answer(self, message):
        from flwr.app import Error, Message

        self.sent.append(message)
        answer = self.handler(message.metadata.dst_node_id, message)
        if isinstance(answer, Error):
            return Message(answer, reply_to=message)
        if answer is not None:
            return Message(content=answer, reply_to=message)
        return None

    def push_messages(self, messages):
        """Deliver now; the replies wait for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._open[message.metadata.message_id] = self._answer(message)
            ids.append(message.metadata.message_id)
        self.most_open = max(self.most_open, len(self._open))
        return ids

    def pull_messages(self, message_ids):
        """The replies that are there for these ids (a silent node's never)."""
        ready = [
            i for i in message_ids if i in self._open and self._open[i] is not None
        ]
        replies = [self._open.pop(i) for i in ready]
        if self.reply_order is not None:
            replies = self.reply_order(replies)
        return replies


def honest_reply(data, shift: float, num_examples: int, **meta) -> bytes:
    """A client that adds ``shift`` to every value and answers in kind.

    Arguments
    ---------
    data : bytes-like
        The server's broadcast.
    shift : float
        Added to every value.
    num_examples : int
        Claimed in the reply.
    **meta
        Metadata to change (for hostile variants).

    Returns
    -------
    bytes
    """
    from speechbrain_omc.codec.compressed import CompressedTensor
    from speechbrain_omc.federated import wire

    received = wire.decode(data)
    entries = {}
    for name, value in received.entries.items():
        if isinstance(value, CompressedTensor):
            new = value.decompress() + shift
            entries[name] = CompressedTensor.compress(new, value.format)
        else:
            entries[name] = value + shift
    reply = {k: received.meta[k] for k in ("round", "client", "run", "nonce")}
    reply.update(type="update", num_examples=num_examples)
    reply["metrics"] = {"train_loss": 1.0 + shift, "steps": 2}
    reply.update(meta)
    return wire.encode(entries, reply)


def app_handler(client_of: Mapping[int, str], test_reply=None):
    """Nodes that answer the app's messages as its ClientApp would.

    Arguments
    ---------
    client_of : mapping
        Node id to the client it serves.
    test_reply : callable, optional
        ``(node) -> content`` for the final test's evaluation (default: the
        honest metrics).

    Returns
    -------
    callable
        A :class:`FakeGrid` handler.
    """
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from speechbrain_omc.federated.flower.records import (
        payload_from_record,
        payload_to_record,
    )
    from speechbrain_omc.federated.flower.strategy import CLIENT_ID_KEY, QUERY_KEY

    def handler(node, message):
        kind = message.metadata.message_type
        if kind == "query":
            return RecordDict(
                {QUERY_KEY: ConfigRecord({CLIENT_ID_KEY: client_of[node]})}
            )
        data = payload_from_record(message.content)
        k = sorted(client_of).index(node) + 1
        if kind == "train":
            reply = honest_reply(data, shift=0.01 * k, num_examples=5)
            return RecordDict({"arrays": payload_to_record(reply)})
        if message.content["config"].get("split") == "test" and test_reply:
            return test_reply(node)
        # Every node holds the same evaluation speakers (as in the recipe).
        metrics = {"num-examples": 4, "loss": 1.0, "WER": 20.0, "CER": 5.0}
        return RecordDict({"metrics": MetricRecord(metrics)})

    return handler


#: A tiny configuration of the recipe, for ServerApp tests in one process.
TINY_APP = {**TINY, "num_clients": 3, "server_momentum": 0.5}


def app_run_config(folder: Path, **extra: Any) -> dict:
    """A run config of the app for the tiny recipe, outputs under ``folder``.

    Arguments
    ---------
    folder : Path
        Holds ``out`` (the recipe's output folder) and ``result``.
    **extra
        More run config keys.

    Returns
    -------
    dict
    """
    import yaml

    overrides = dict(TINY_APP, output_folder=str(folder / "out"))
    return {
        "hparams": "fed_omc.yaml",  # the packaged file, by name
        "overrides": yaml.safe_dump(overrides, default_flow_style=True).strip(),
        "result-dir": str(folder / "result"),
        "round-timeout": 5,
        **extra,
    }
