"""The package installed without the repository runs the Flower app.

``pip install <repo>`` (not editable) into a fresh virtual environment that
sees the packages of the interpreter running the tests (so that torch and the
other pinned dependencies are not downloaded again, whether the suite runs
from a plain interpreter or from a virtual environment of its own), then,
from a working directory outside the repository and without ``PYTHONPATH``:

* the package and its packaged hparams are the environment's copy;
* the Flower app's server and client code runs a two-round federation
  (``tests/jobs/installed_flower.py``);
* the embedded simulation's command runs one round with the corpus given by
  ``$SPEECHBRAIN_OMC_SYNTHSPEECH``.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "SynthSpeech"


def make_venv(env_dir: Path) -> Path:
    """A virtual environment that sees the running interpreter's packages.

    ``--system-site-packages`` gives it the base interpreter's packages
    only: made from inside a virtual environment, it would miss that
    environment's (torch, wheel...). A ``.pth`` file lists the running
    interpreter's site directories after the new environment's own, so
    that what is installed into it comes first. Their own ``.pth`` files
    are not run: an editable install of this repository stays out of it.

    Arguments
    ---------
    env_dir : Path
        Where the environment is made.

    Returns
    -------
    Path
        Its Python interpreter.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)],
        check=True,
    )
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = [d for d in site.getsitepackages() if Path(d).is_dir()]
    (Path(purelib) / "_running_interpreter.pth").write_text(
        "".join(f"{d}\n" for d in outer)
    )
    return python


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("install")
    python = make_venv(folder / "venv")
    # No build isolation and no dependencies: nothing is downloaded.
    result = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return python, folder


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.slow
def test_the_environment_sees_the_running_interpreters_packages(venv):
    # Made from inside a virtual environment, --system-site-packages alone
    # would show the base interpreter's packages instead (or none).
    wheel = pytest.importorskip("wheel")
    python, folder = venv
    code = "import torch, wheel; print(torch.__file__); print(wheel.__file__)"
    seen = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        cwd=folder,
        env=_env(),
        check=True,
    ).stdout.split()
    assert seen == [torch.__file__, wheel.__file__]


@pytest.mark.slow
def test_installed_package_ships_the_kernel_source(venv):
    # The codec's C++ source is package data: the installed kernels build.
    python, folder = venv
    code = (
        "from speechbrain_omc.codec import kernels; "
        "print(kernels._SOURCE); print(kernels._SOURCE.is_file())"
    )
    source, present = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        cwd=folder,
        env=_env(),
        check=True,
    ).stdout.split()
    assert present == "True"
    assert source.startswith(str(python.parent.parent)), source
    assert source.endswith("speechbrain_omc/codec/_native/codec.cpp")


@pytest.mark.slow
def test_installed_package_runs_the_flower_app(venv):
    python, folder = venv
    work = folder / "elsewhere"
    work.mkdir()
    result = subprocess.run(
        [
            str(python),
            str(ROOT / "tests" / "jobs" / "installed_flower.py"),
            str(CORPUS),
            str(work / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=work,
        env=_env(),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    site = str(python.parent.parent)
    assert report["package"].startswith(site), report["package"]
    assert report["hparams"].startswith(site), report["hparams"]
    outside = [f for f in report["modules"] if not f.startswith(site)]
    assert len(report["modules"]) > 10 and not outside, outside
    summary = report["summary"]
    assert summary["rounds"] == 2 and summary["left_out"] == 0
    assert summary["clients"] == ["client_000", "client_001"]
    assert 0 < summary["bytes_down"] < summary["float32_bytes_down"]
    assert summary["test_WER"] is not None
    assert (work / "run" / "result" / "final_model.pt").is_file()


@pytest.mark.slow
def test_installed_package_runs_the_embedded_federation(venv):
    python, folder = venv
    work = folder / "elsewhere_embedded"
    work.mkdir()
    tiny = [
        "--rounds", "1", "--num_clients", "2", "--clients_per_round", "1",
        "--max_local_steps", "2", "--d_model", "16", "--nhead", "2",
        "--num_encoder_layers", "1", "--d_ffn", "32", "--cnn_channels", "4",
        "--cnn_out_channels", "4", "--n_mels", "20",
    ]  # fmt: skip
    result = subprocess.run(
        [str(python), "-m", "speechbrain_omc.asr.federation", "fed_omc.yaml"]
        + ["--output_folder", str(work / "out"), "--noprogressbar", *tiny],
        capture_output=True,
        text=True,
        cwd=work,
        env={**_env(), "SPEECHBRAIN_OMC_SYNTHSPEECH": str(CORPUS)},
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["test_utterances"] == 816
