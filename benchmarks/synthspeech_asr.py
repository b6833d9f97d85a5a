"""Run the SynthSpeech Conformer-CTC recipe in float32 and under OMC; record.

::

    python benchmarks/synthspeech_asr.py \
        --record benchmarks/results/synthspeech_asr.md

runs ``recipes/SynthSpeech/ASR/train.py`` with ``hparams/conformer_ctc.yaml``
and then ``hparams/conformer_ctc_omc.yaml`` (one after the other, each in a
fresh process, same seed), measures each run's wall-clock minutes and the
machine's load average while it ran (sampled every few seconds: the
machines here are shared, and a loaded machine stretches the minutes), and
parses the recipe's ``train_log.txt`` for the test WER and CER and the
per-epoch dev WER. The report is printed and, with ``--record``, written as
Markdown. Extra arguments after ``--`` go to both runs (``-- --number_of_epochs
2``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "SynthSpeech" / "ASR"
VARIANTS = {
    "float32": "conformer_ctc.yaml",
    "OMC e3m7": "conformer_ctc_omc.yaml",
}
_NUMBER = r"([0-9.e+-]+)"


class LoadSampler(threading.Thread):
    """Samples ``os.getloadavg()[0]`` every ``interval`` seconds.

    Arguments
    ---------
    interval : float
        Seconds between samples.
    """

    def __init__(self, interval: float = 5.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[float] = [os.getloadavg()[0]]
        self._halt = threading.Event()

    def run(self):
        while not self._halt.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        """Stop sampling.

        Returns
        -------
        dict
            ``start``, ``mean`` and ``max`` of the 1-minute load average.
        """
        self._halt.set()
        self.join()
        self.samples.append(os.getloadavg()[0])
        return {
            "start": self.samples[0],
            "mean": sum(self.samples) / len(self.samples),
            "max": max(self.samples),
        }


def parse_train_log(path: Path) -> dict:
    """Test WER/CER, best epoch and per-epoch dev WER of a recipe's log.

    Arguments
    ---------
    path : Path
        The recipe's ``train_log.txt``.

    Returns
    -------
    dict
        ``wer``, ``cer``, ``epoch_loaded``, ``epochs`` (list of
        ``(epoch, train_loss, dev_wer, dev_cer)``).
    """
    epochs, result = [], {}
    for line in path.read_text().splitlines():
        m = re.match(
            rf"epoch: (\d+), .*train loss: {_NUMBER} .*valid CER: {_NUMBER}, "
            rf"valid WER: {_NUMBER}",
            line,
        )
        if m:
            epochs.append(
                (int(m[1]), float(m[2]), float(m[4].rstrip(",")), float(m[3]))
            )
        m = re.match(
            rf"Epoch loaded: (\d+) - .*test CER: {_NUMBER}, test WER: {_NUMBER}", line
        )
        if m:
            result = {
                "epoch_loaded": int(m[1]),
                "cer": float(m[2].rstrip(",")),
                "wer": float(m[3]),
            }
    if not result:
        raise ValueError(f"no test line in {path}")
    return {**result, "epochs": epochs}


def run_variant(
    name: str, hparams: str, output: Path, threads: int, extra: list[str]
) -> dict:
    """Train and test one variant in a fresh process.

    Arguments
    ---------
    name : str
        Label of the variant.
    hparams : str
        Hparams file name under the recipe's ``hparams/``.
    output : Path
        Output folder of the run (must not hold checkpoints of another run).
    threads : int
        ``OMP_NUM_THREADS`` of the run.
    extra : list of str
        More command-line arguments for ``train.py``.

    Returns
    -------
    dict
        The command, minutes, load statistics, parsed log and parameter bytes.
    """
    if (output / "save").is_dir() and any((output / "save").glob("CKPT+*")):
        raise FileExistsError(f"{output} holds checkpoints; pick a fresh --output")
    cmd = [
        "python",
        str((RECIPE / "train.py").relative_to(ROOT)),
        str((RECIPE / "hparams" / hparams).relative_to(ROOT)),
        "--output_folder",
        str(output.relative_to(ROOT) if output.is_relative_to(ROOT) else output),
        "--noprogressbar",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    output.mkdir(parents=True, exist_ok=True)
    sampler = LoadSampler()
    sampler.start()
    start = time.perf_counter()
    with open(output / "stdout.txt", "w") as log:
        proc = subprocess.run(
            [sys.executable, *cmd[1:]], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    minutes = (time.perf_counter() - start) / 60
    load = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed; see {output / 'stdout.txt'}")
    text = (output / "stdout.txt").read_text()
    m = re.search(r"Parameter bytes: (\d+) \(float32: (\d+)\)", text)
    return {
        "name": name,
        "command": f"OMP_NUM_THREADS={threads} " + shlex.join(cmd),
        "minutes": minutes,
        "load": load,
        "param_bytes": int(m[1]) if m else None,
        "float32_bytes": int(m[2]) if m else None,
        **parse_train_log(output / "train_log.txt"),
    }


def report(runs: list[dict]) -> str:
    """Markdown report of the runs.

    Arguments
    ---------
    runs : list of dict
        As returned by :func:`run_variant`.

    Returns
    -------
    str
    """
    lines = [
        "| run | test WER % | test CER % | best dev epoch | minutes | load avg "
        "(start / mean / max) | parameter bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ld = r["load"]
        nbytes = (
            f"{r['param_bytes']:,} ({r['param_bytes'] / r['float32_bytes']:.1%})"
            if r["param_bytes"]
            else "?"
        )
        lines.append(
            f"| {r['name']} | {r['wer']:.2f} | {r['cer']:.2f} | {r['epoch_loaded']} | "
            f"{r['minutes']:.1f} | {ld['start']:.1f} / {ld['mean']:.1f} / "
            f"{ld['max']:.1f} | {nbytes} |"
        )
    lines += ["", "Commands (from the repository root):", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in runs]
    lines += ["", "Dev WER % per epoch:", ""]
    header = "| epoch | " + " | ".join(r["name"] for r in runs) + " |"
    lines += [header, "|---" * (len(runs) + 1) + "|"]
    for i in range(max(len(r["epochs"]) for r in runs)):
        cells = [
            f"{r['epochs'][i][2]:.2f}" if i < len(r["epochs"]) else "" for r in runs
        ]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    """One line about the machine and the software versions.

    Returns
    -------
    str
    """
    import speechbrain
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, speechbrain {speechbrain.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "results" / "benchmarks" / "synthspeech_asr",
        help="parent of the runs' output folders (fresh ones)",
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS)
    )
    parser.add_argument("--record", type=Path, help="write the report here")
    parser.add_argument("extra", nargs="*", help="arguments for train.py (after --)")
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    for name in args.variants:
        folder = args.output / stamp / VARIANTS[name].removesuffix(".yaml")
        print(f"running {name} -> {folder}", flush=True)
        runs.append(run_variant(name, VARIANTS[name], folder, args.threads, args.extra))
        print(report(runs[-1:]).splitlines()[2], flush=True)
    runs.sort(key=lambda r: list(VARIANTS).index(r["name"]))
    text = (
        f"Recorded {time.strftime('%Y-%m-%d %H:%M')} on {machine()}.\n\n"
        + report(runs)
        + "\n"
    )
    print(text)
    if args.record:
        args.record.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
