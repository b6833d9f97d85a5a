"""A local Flower Deployment Engine: one SuperLink and N SuperNodes on loopback.

Starts real ``flower-superlink`` and ``flower-supernode`` processes talking
over TCP on 127.0.0.1 (insecure, i.e. without TLS: for a test or a demo on one
machine only), submits the app with ``flwr run`` and stops every process it
started, including the ``flower-superexec``, ``flwr-serverapp`` and
``flwr-clientapp`` processes that Flower spawns in new sessions. Each process
is tagged with an environment variable, so that :meth:`LocalDeployment.stop`
also finds descendants whose parent already exited.

For a real deployment run the same commands on different machines with TLS,
see ``recipes/SynthSpeech/federated/FLOWER.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    """Ask the kernel for ``count`` distinct free TCP ports on ``host``.

    Arguments
    ---------
    count : int
        How many ports.
    host : str
        Interface to bind.

    Returns
    -------
    list of int
        Ports that were free a moment ago (all sockets are held until every
        port is chosen, so they are distinct).

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

    Arguments
    ---------
    config : Mapping
        Keys and values (str, int, float or bool).

    Returns
    -------
    str
        The flag's value.

    Example
    -------
    >>> format_node_config({"partition-id": 0, "manifest": "/data/c0.csv"})
    'partition-id=0 manifest="/data/c0.csv"'
    """
    return " ".join(f"{key}={_toml_value(value)}" for key, value in config.items())


def format_run_config(config: Mapping[str, Any]) -> list[str]:
    """Render ``flwr run --run-config`` arguments, one flag per key.

    Arguments
    ---------
    config : Mapping
        Keys of ``[tool.flwr.app.config]`` and their new values.

    Returns
    -------
    list of str
        ``["--run-config", "key=value", ...]``.

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


def _tagged_pids(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours
            continue
        if state != "Z" and needle in environ.split(b"\0"):
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
        Extra environment for all processes (e.g. ``OMP_NUM_THREADS``).
    simulation : bool
        Start the SuperLink with ``--simulation`` and no SuperNodes: the run
        goes to Flower's Simulation Engine (Ray), with one virtual SuperNode
        per entry of ``node_configs`` (their node configs are Flower's
        ``partition-id`` / ``num-partitions``; the entries' content is
        ignored).
    federation_config : Mapping, optional
        Simulation options for ``flwr run --federation-config`` (default:
        ``num-supernodes`` and one CPU per virtual client).

    Example
    -------
    ::

        with LocalDeployment(tmp, [{"partition-id": 0}, {"partition-id": 1}]) as d:
            d.run("recipes/SynthSpeech/federated/flower", {"num-server-rounds": 2})
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
        self._logs: list[Any] = []
        self.superlink_port: int | None = None

    # ------------------------------------------------------------------ start
    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait until it serves, then the SuperNodes.

        Returns
        -------
        LocalDeployment
            ``self``.
        """
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
            link = self._spawn(
                "superlink",
                [
                    "flower-superlink",
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(link_port),
                    "--disable-runtime-dependency-installation",
                    *(["--simulation"] if self.simulation else []),
                ],
            )
            deadline = time.monotonic() + self.startup_timeout
            _wait_http_ok(f"http://127.0.0.1:{link_port}/health", deadline, link)
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
                deadline = time.monotonic() + self.startup_timeout
                _wait_http_ok(f"http://127.0.0.1:{port}/health", deadline, node)
        except BaseException:
            self.stop()
            raise
        return self

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
    def run(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        timeout: float = 600.0,
    ) -> str:
        """Submit the app with ``flwr run --stream`` and wait for the run's end.

        Arguments
        ---------
        app_dir : str or Path
            Folder holding the app's ``pyproject.toml``.
        run_config : Mapping, optional
            Overrides of ``[tool.flwr.app.config]``.
        timeout : float
            Seconds before the run is abandoned (``TimeoutError``).

        Returns
        -------
        str
            What ``flwr run --stream`` printed (the ServerApp's log).
        """
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
        log_path = self.workdir / "flwr-run.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs.append(proc)
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                dead = [p.args[0] for p in self.procs[:-1] if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    output = log_path.read_text(errors="replace")
                    why = f"{dead} exited" if dead else f"timed out after {timeout}s"
                    raise TimeoutError(f"flwr run: {why}\n{output[-4000:]}")
                time.sleep(0.5)
        output = log_path.read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run failed ({proc.returncode}):\n{output}")
        return output

    def logs(self) -> str:
        """Tails of every process's log, for a failure report.

        Returns
        -------
        str
            The last 3000 characters of each log file.
        """
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(
                f"==== {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            )
        return "\n".join(parts)

    # ------------------------------------------------------------------- stop
    def stop(self, grace: float = 10.0) -> None:
        """Stop every process of this deployment: SIGTERM, then SIGKILL.

        Arguments
        ---------
        grace : float
            Seconds to wait after SIGTERM before killing what is left.
        """
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
        """Processes of this deployment that are still alive (should be none).

        Returns
        -------
        list of int
            Process ids.
        """
        return _tagged_pids(self.tag)

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a Flower app on a local SuperLink and SuperNodes, then stop them.

    Arguments
    ---------
    argv : sequence of str, optional
        Command-line arguments; see ``--help``.

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_omc.federated.flower.deployment",
        description=main.__doc__,
    )
    parser.add_argument("app_dir", help="Flower app folder (with pyproject.toml)")
    parser.add_argument(
        "--node-config",
        action="append",
        default=[],
        help="one per SuperNode, e.g. 'partition-id=0 num-partitions=2'",
    )
    parser.add_argument(
        "--simulation",
        type=int,
        metavar="N",
        help="run in the Simulation Engine with N virtual SuperNodes instead",
    )
    parser.add_argument(
        "--workdir",
        default="results/flower_deployment",
        help="logs and FLWR_HOME (must not be inside the app folder)",
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        help="TOML key=value overriding the app's run config (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if not args.simulation and not args.node_config:
        parser.error("give --node-config (one per SuperNode) or --simulation N")
    try:
        import tomllib
    except ImportError:  # Python < 3.11; tomli comes with flwr
        import tomli as tomllib

    run_config: dict[str, Any] = {}
    for item in args.run_config:
        run_config.update(tomllib.loads(item))
    nodes = [{}] * args.simulation if args.simulation else args.node_config
    logging.basicConfig(level=logging.INFO)
    deployment = LocalDeployment(args.workdir, nodes, simulation=bool(args.simulation))
    with deployment:
        try:
            print(deployment.run(args.app_dir, run_config, timeout=args.timeout))
        except Exception:
            print(deployment.logs(), file=sys.stderr)
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
