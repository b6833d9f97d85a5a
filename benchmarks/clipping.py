"""What honouring ``max_grad_norm`` costs in fused mode, through ``OMCBrain``.

On the on-device setting of ``benchmarks/train_step.py`` (conformer_large
shape, one 5 s utterance, SGD lr 1e-3), every step is SpeechBrain's own
``fit_batch`` with its default ``max_grad_norm`` of 5:

* ``sb.Brain``: float32 SpeechBrain, the reference;
* ``OMCBrain`` e3m7 (10 % of the values float32) with each ``fused_clipping``:
  ``deferred`` (the default: compressed gradients held in bfloat16 until
  backward ends, then SpeechBrain's global clipping), ``previous_norm`` (the
  previous default: no held gradients, the last step's norm),
  ``two_pass`` (a measuring forward and backward first).

Each configuration runs in a fresh process; configurations are interleaved
over ``--rounds``. Reported: peak RSS of the timed steps, seconds per step
(median), and the loss after the steps (the clipping modes differ there).

Usage::

    python benchmarks/clipping.py --rounds 2 --steps 4 \
        --output benchmarks/results/clipping.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402

CONFIGS = ["sb.Brain", "deferred", "previous_norm", "two_pass"]


def run_one(name: str, steps: int) -> dict:
    """Build the model and Brain, train ``1 + steps`` batches; measure."""
    import speechbrain as sb

    from speechbrain_omc import OMCBrain, OMCConfig

    shape = ts.SETTINGS["large"]
    model = ts._seeded_model({"setting": "large", "ckpt": False})
    feats, lens, tokens = ts._batch(shape)

    class CTC(OMCBrain if name != "sb.Brain" else sb.Brain):
        def compute_forward(self, batch, stage):
            return ts._loss(self.modules, shape, feats, lens, tokens)

        def compute_objectives(self, predictions, batch, stage):
            return predictions

    hparams = {} if name == "sb.Brain" else {
        "omc": OMCConfig(format="e3m7", fp32_fraction=0.1, fused_clipping=name)
    }  # fmt: skip
    brain = CTC(
        modules=dict(model.items()),
        opt_class=lambda params: torch.optim.SGD(params, lr=1e-3),
        hparams=hparams,
        run_opts={"device": "cpu", "max_grad_norm": 5.0},
    )
    brain.on_fit_start()  # compress, build the optimizer
    brain.modules.train()

    def step() -> float:
        return float(brain.fit_batch(None))

    return {"config": name, **ts._timed_steps(step, steps)}


def spawn(name: str, steps: int) -> dict:
    """One configuration in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--one", name, "--steps", str(steps)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Medians over rounds, ratios to ``sb.Brain``."""
    rows = {}
    for r in results:
        rows.setdefault(r["config"], []).append(r)
    base = rows["sb.Brain"]
    base_peak = statistics.median(r["steady_peak_rss"] for r in base)
    base_time = statistics.median(r["sec_per_step"] for r in base)
    lines = [
        "| configuration | peak RSS MB (vs sb.Brain) | s/step (vs sb.Brain) "
        "| loss after the steps |",
        "|---|---|---|---|",
    ]
    for name in CONFIGS:
        runs = rows.get(name, [])
        if not runs:
            continue
        peak = statistics.median(r["steady_peak_rss"] for r in runs)
        sec = statistics.median(r["sec_per_step"] for r in runs)
        loss = runs[0]["losses"][-1]
        label = name if name == "sb.Brain" else f"OMCBrain, {name}"
        lines.append(
            f"| {label} | {peak / 1e6:,.0f} ({peak / base_peak:.2f}x) "
            f"| {sec:.2f} ({sec / base_time:.2f}x) | {loss:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps)))
        return
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    for round_ in range(args.rounds):
        for name in CONFIGS:
            results.append(spawn(name, args.steps))
            print(f"round {round_ + 1}: {name} done", file=sys.stderr)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = "python benchmarks/clipping.py " + " ".join(sys.argv[1:])
    text = (
        "# Fused clipping through OMCBrain (on-device setting)\n\n"
        f"`{command}` on {ts._environment()}, "
        f"{time.strftime('%Y-%m-%d')}; load average {load_before} before, "
        f"{load_after} after. Medians over {args.rounds} interleaved rounds of "
        f"{args.steps} timed steps after a warm-up, SpeechBrain's `fit_batch` "
        "with `max_grad_norm: 5`.\n\n" + table(results) + "\n"
    )
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        Path(args.output).with_suffix(".json").write_text(
            json.dumps(results, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
