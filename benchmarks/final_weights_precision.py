"""Is OMC's accuracy cost in training or in the final weights' precision?

The parity record (``benchmarks/results/parity``) trains float32 and OMC's
default (e3m7 weights, per-variable scale, 10 % of values float32) on the
main job's federation over eight seeds. This benchmark takes each seed's
float32 final model and scores it on the held-out test speakers twice: as
trained, and with every weight matrix stored as OMC's default stores it
(e3m7 with a per-variable scale, nearest rounding, 10 % of its values kept
float32: the largest in magnitude, or a random tenth). A test WER that rises
by about the parity gap says the cost is the stored weights' precision; one
that does not says it is in training (stochastic rounding of every update,
quantized weights in every forward).

Usage (from the repository, after the parity grid has run; a minute a seed)::

    python benchmarks/final_weights_precision.py [--record FOLDER] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_omc.asr import hparams_file
from speechbrain_omc.asr.federation import _setup
from speechbrain_omc.asr.stats import mean_ci
from speechbrain_omc.codec.compressed import CompressedTensor

#: Each row's weights: as trained, or e3m7 with this tenth kept float32.
VARIANTS = {
    "float32": None,
    "e3m7, 10 % largest float32": "largest",
    "e3m7, 10 % random float32": "random",
}


def quantized(value: torch.Tensor, keep: str, generator: torch.Generator):
    """``value`` as e3m7 with a per-variable scale, a tenth of it float32."""
    flat = value.reshape(-1)
    k = max(1, flat.numel() // 10)
    if keep == "largest":
        kept = flat.abs().topk(k).indices
    else:
        kept = torch.randperm(flat.numel(), generator=generator)[:k]
    rest = torch.ones_like(flat, dtype=torch.bool)
    rest[kept] = False
    out = flat.clone()
    # The scale is fitted to the values that are stored in e3m7.
    codes = CompressedTensor.compress(flat[rest], "e3m7", "scale")
    out[rest] = codes.decompress()
    return out.view_as(value)


def test_wer(model: dict, seed: int, folder: Path) -> float:
    """Test WER of a float32 state dict, through the main job's own path."""
    with open(hparams_file("fed_fp32.yaml"), encoding="utf-8") as f:
        hparams = load_hyperpyyaml(
            f,
            {"output_folder": str(folder), "seed": seed},
        )
    run = _setup(hparams, None, folder)
    for name, value in model.items():
        run.server.model[name].copy_(value)
    message = run.server.message_for("eval")
    result = run.client.evaluate(
        message, run.test_data, hparams["valid_dataloader_opts"]
    )
    return float(result["WER"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--record", type=Path, default=Path("benchmarks/results/parity")
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    seeds = sorted(
        int(p.parent.name)
        for p in (args.record / "runs" / "float32").glob("*/final_model.pt")
    )
    if not seeds:
        raise SystemExit(f"no float32 final models under {args.record}/runs/float32")
    wer = {v: [] for v in VARIANTS}
    for seed in seeds:
        model = torch.load(
            args.record / "runs" / "float32" / str(seed) / "final_model.pt",
            weights_only=True,
        )
        generator = torch.Generator().manual_seed(seed)
        matrices = {n for n, v in model.items() if v.dim() >= 2}
        for variant, keep in VARIANTS.items():
            state = {
                n: quantized(v, keep, generator) if keep and n in matrices else v
                for n, v in model.items()
            }
            with tempfile.TemporaryDirectory() as folder:
                wer[variant].append(test_wer(state, seed, Path(folder)))
        print(seed, {v: round(w[-1], 2) for v, w in wer.items()}, flush=True)
    lines = [
        "# Final weights' precision: float32 federated models stored as OMC "
        "stores them",
        "",
        f"Written by `python benchmarks/final_weights_precision.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`; the float32 final "
        f"models of `{args.record}` (seeds {seeds}), scored on the held-out test "
        "speakers as the main job scores them. Weight matrices only (as OMC's "
        "default); biases and norms stay float32.",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, one torch thread (a scoring, not a timing).",
        "",
        "| weights | test WER % per seed | mean [95 % CI over seeds] "
        "| vs float32, paired |",
        "|---|---|---|---|",
    ]
    for variant in VARIANTS:
        ci = mean_ci(wer[variant])
        diff = mean_ci([a - b for a, b in zip(wer[variant], wer["float32"])])
        delta = (
            "-"
            if variant == "float32"
            else (f"{diff.value:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]")
        )
        lines.append(
            f"| {variant} | {', '.join(f'{w:.2f}' for w in wer[variant])} | "
            f"{ci.value:.2f} [{ci.low:.2f}, {ci.high:.2f}] | {delta} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
