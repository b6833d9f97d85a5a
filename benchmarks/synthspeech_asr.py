"""Run the SynthSpeech Conformer-CTC recipe in float32 and under OMC; record.

::

    python benchmarks/synthspeech_asr.py --seeds 1986 1987 1988 --jobs 2 \
        --record benchmarks/results/synthspeech_asr_runs.md

runs ``recipes/SynthSpeech/ASR/train.py`` for every variant and seed, each in
a fresh process with one PyTorch thread, ``--jobs`` at a time: float32 Adam
(``hparams/conformer_ctc.yaml``), the OMC twin with fused Adam
(``hparams/conformer_ctc_omc.yaml``) and, with ``--variants``, the twin with
the other ``max_grad_norm`` choices or in simple mode. It measures each run's
wall-clock minutes and the machine's load average while it ran (sampled
every few seconds: the machines here are shared, and a loaded machine
stretches the minutes), and parses the recipe's ``train_log.txt`` for the
test WER and CER and the per-epoch dev WER. The report gives every run and,
per variant, the mean test WER over seeds with its 95 % Student-t interval
and the paired difference to float32 (same seeds). It is printed and, with
``--record``, written as Markdown. Extra arguments after ``--`` go to every
run (``-- --number_of_epochs 2``).
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
#: name -> (hparams file, overrides of that file)
VARIANTS = {
    "float32": ("conformer_ctc.yaml", []),
    "OMC fused Adam": ("conformer_ctc_omc.yaml", []),
    "OMC fused Adam, per_parameter clipping": (
        "conformer_ctc_omc.yaml",
        ["--omc_fused_clipping=per_parameter"],
    ),
    "OMC fused Adam, two_pass clipping": (
        "conformer_ctc_omc.yaml",
        ["--omc_fused_clipping=two_pass"],
    ),
    "OMC simple Adam": (
        "conformer_ctc_omc.yaml",
        ["--omc_update_mode=simple", "--omc_state_format=null"],
    ),
}
DEFAULT_VARIANTS = ["float32", "OMC fused Adam"]
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
    name: str, seed: int, output: Path, threads: int, extra: list[str]
) -> dict:
    """Train and test one variant with one seed in a fresh process.

    Arguments
    ---------
    name : str
        A key of :data:`VARIANTS`.
    seed : int
        The recipe's ``--seed``.
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
    hparams, overrides = VARIANTS[name]
    if (output / "save").is_dir() and any((output / "save").glob("CKPT+*")):
        raise FileExistsError(f"{output} holds checkpoints; pick a fresh --output")
    cmd = [
        "python",
        str((RECIPE / "train.py").relative_to(ROOT)),
        str((RECIPE / "hparams" / hparams).relative_to(ROOT)),
        "--output_folder",
        str(output.relative_to(ROOT) if output.is_relative_to(ROOT) else output),
        "--noprogressbar",
        "--seed",
        str(seed),
        *overrides,
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
        "seed": seed,
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
        "| run | seed | test WER % | test CER % | best dev epoch | minutes | load avg "
        "(start / mean / max) | parameter bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ld = r["load"]
        nbytes = (
            f"{r['param_bytes']:,} ({r['param_bytes'] / r['float32_bytes']:.1%})"
            if r["param_bytes"]
            else "?"
        )
        lines.append(
            f"| {r['name']} | {r['seed']} | {r['wer']:.2f} | {r['cer']:.2f} | "
            f"{r['epoch_loaded']} | "
            f"{r['minutes']:.1f} | {ld['start']:.1f} / {ld['mean']:.1f} / "
            f"{ld['max']:.1f} | {nbytes} |"
        )
    lines += ["", "Commands (from the repository root):", ""]
    lines += [f"- {r['name']}, seed {r['seed']}: `{r['command']}`" for r in runs]
    lines += ["", "Dev WER % per epoch:", ""]
    header = (
        "| epoch | " + " | ".join(f"{r['name']} ({r['seed']})" for r in runs) + " |"
    )
    lines += [header, "|---" * (len(runs) + 1) + "|"]
    for i in range(max(len(r["epochs"]) for r in runs)):
        cells = [
            f"{r['epochs'][i][2]:.2f}" if i < len(r["epochs"]) else "" for r in runs
        ]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(runs: list[dict]) -> str:
    """Per variant: mean test WER over seeds, and the paired difference.

    Arguments
    ---------
    runs : list of dict
        As returned by :func:`run_variant`.

    Returns
    -------
    str
        A Markdown table: seeds, mean test WER and CER with the 95 % Student-t
        interval over seeds, min-max, and the mean of (variant - float32) over
        the seeds both ran, with its interval.
    """
    from speechbrain_omc.asr.stats import mean_ci

    by_name: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_name.setdefault(r["name"], {})[r["seed"]] = r
    reference = by_name.get("float32", {})
    lines = [
        "| variant | seeds | test WER % (mean, 95 % CI) | min-max | test CER % "
        "(mean) | WER - float32, paired (mean, 95 % CI) | minutes (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, seeds in by_name.items():
        wers = [seeds[s]["wer"] for s in sorted(seeds)]
        common = sorted(set(seeds) & set(reference))
        paired = (
            mean_ci([seeds[s]["wer"] - reference[s]["wer"] for s in common]).format()
            if name != "float32" and common
            else "-"
        )
        lines.append(
            f"| {name} | {', '.join(map(str, sorted(seeds)))} | "
            f"{mean_ci(wers).format()} | {min(wers):.2f}-{max(wers):.2f} | "
            f"{sum(seeds[s]['cer'] for s in seeds) / len(seeds):.2f} | {paired} | "
            f"{sum(seeds[s]['minutes'] for s in seeds) / len(seeds):.1f} |"
        )
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
    from concurrent.futures import ThreadPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "results" / "benchmarks" / "synthspeech_asr",
        help="parent of the runs' output folders (fresh ones)",
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS")
    parser.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS)
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1986])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--record", type=Path, help="write the report here")
    parser.add_argument("extra", nargs="*", help="arguments for train.py (after --)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.time()

    def one(job: tuple[str, int]) -> dict:
        name, seed = job
        folder = args.output / stamp / re.sub(r"\W+", "_", name).strip("_") / str(seed)
        print(f"running {name}, seed {seed} -> {folder}", flush=True)
        run = run_variant(name, seed, folder, args.threads, args.extra)
        print(report([run]).splitlines()[2], flush=True)
        return run

    # Seeds outermost: with fewer jobs than runs, every variant has its
    # first seed done before any variant's second.
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one, jobs))
    runs.sort(key=lambda r: (list(VARIANTS).index(r["name"]), r["seed"]))
    text = (
        f"Recorded {time.strftime('%Y-%m-%d %H:%M')} on {machine()}; "
        f"{len(runs)} runs, {args.jobs} at a time, "
        f"{(time.time() - started) / 60:.0f} minutes in all.\n\n"
        + summary(runs)
        + "\n\n"
        + report(runs)
        + "\n"
    )
    print(text)
    if args.record:
        args.record.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
