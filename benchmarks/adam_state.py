"""Which low-bit format keeps Adam's moments? Training loss, per state format.

Fused Adam stores the first and second moment of every compressed weight in
a low-bit format with one scale per block (:mod:`speechbrain_omc.codec.blockwise`).
This script trains SpeechBrain's Conformer-CTC (a small one) on a fixed
batch of SynthSpeech utterances with fused Adam, once per state format, same
seed and data, and reports the loss curve against float32 moments: a format
that loses the moments' small values stalls.

Usage::

    python benchmarks/adam_state.py --steps 150 --out benchmarks/results/adam_state.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CANDIDATES = {
    "float32": dict(state_format=None),
    "e4m3, sqrt(v)": dict(state_format="e4m3", state_sqrt=True),
    "e4m3": dict(state_format="e4m3", state_sqrt=False),
    "int8, sqrt(v)": dict(state_format="int8", state_sqrt=True),
    "int8": dict(state_format="int8", state_sqrt=False),
    "e5m2, sqrt(v)": dict(state_format="e5m2", state_sqrt=True),
}


def run(name: str, steps: int, seed: int) -> list[float]:
    """Fused Adam on a fixed batch; the loss of every step."""
    from test_speechbrain_models import FEATS, MODELS, VOCAB

    from speechbrain_omc import OMCConfig, compress_module
    from speechbrain_omc.engine.rules import settings_from_optimizer

    torch.manual_seed(seed)
    model = MODELS["conformer_RelPosMHAXL"]()
    gen = torch.Generator().manual_seed(seed)
    batch = (
        torch.randn(4, 40, FEATS, generator=gen),
        torch.ones(4),
        torch.randint(1, VOCAB, (4, 8), generator=gen),
    )
    config = OMCConfig(format="e3m7", **CANDIDATES[name])
    handle = compress_module(model, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    handle.set_rule(settings_from_optimizer(optimizer))
    losses = []
    for _ in range(steps):
        loss = model.loss(*batch)
        loss.backward()
        handle.step()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load = time.time(), os.getloadavg()
    curves = {
        name: [run(name, args.steps, seed) for seed in args.seeds]
        for name in CANDIDATES
    }
    marks = [args.steps // 3, 2 * args.steps // 3, args.steps]
    lines = [
        "# Adam's moments in low-bit formats",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"SpeechBrain Conformer-CTC (RelPosMHAXL; the model of "
        f"`tests/test_speechbrain_models.py`), a fixed batch of 4 random "
        f"utterances, fused Adam (lr 3e-3), e3m7 weights, block 256; seeds "
        f"{args.seeds}; mean training loss over seeds at steps {marks}; "
        f"{platform.machine()}, torch {torch.__version__}, load average "
        f"{load[0]:.2f} at the start, {(time.time() - started) / 60:.1f} min.",
        "",
        "| state format | bits/value (m + v) | "
        + " | ".join(f"loss @ {m}" for m in marks)
        + " | final vs float32 |",
        "|---|---|" + "---|" * len(marks) + "---|",
    ]
    final32 = statistics.mean(c[-1] for c in curves["float32"])
    for name, runs in curves.items():
        bits = "64" if name == "float32" else "2 x (8 + 32/256)"
        at = [statistics.mean(c[m - 1] for c in runs) for m in marks]
        final = at[-1]
        lines.append(
            f"| {name} | {bits} | "
            + " | ".join(f"{v:.3f}" for v in at)
            + f" | {final / final32:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
