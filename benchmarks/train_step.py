"""Training-step benchmark: float32 SGD against OMC simple and fused modes.

Every configuration runs in a fresh subprocess; all of them in one run, so
ratios are against the float32 baseline measured on the same machine at the
same time. Reported per configuration: exact parameter bytes, peak resident
memory of the training steps, and seconds per step.

Peak memory: the kernel's high-water mark (VmHWM) is reset through
``/proc/self/clear_refs`` once the model is built (and compressed), so the
figure is the steps' own peak, not the float32 model's construction. glibc's
dynamic mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) for every
configuration alike, so freed tensors are returned to the system.

Usage::

    python benchmarks/train_step.py                 # both settings
    python benchmarks/train_step.py --setting large --steps 3
    python benchmarks/train_step.py --output benchmarks/results/train_step.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

SETTINGS = {
    # SpeechBrain's LibriSpeech conformer_small encoder shape, CTC head.
    "small": dict(d_model=144, nhead=4, layers=12, d_ffn=1024, batch=8, seconds=10.0),
    # The on-device setting: conformer_large shape, one utterance.
    "large": dict(d_model=512, nhead=8, layers=12, d_ffn=2048, batch=1, seconds=5.0),
}
FORMATS = {16: "bf16", 11: "e3m7", 8: "e4m3"}


def configurations(setting: str) -> list[dict]:
    """The runs of one setting: float32, then simple and fused per width."""
    checkpointing = [False, True] if setting == "large" else [False]
    runs = []
    for ckpt in checkpointing:
        runs.append(dict(setting=setting, mode="fp32", bits=32, ckpt=ckpt))
        for mode in ("simple", "fused"):
            for bits in FORMATS:
                runs.append(dict(setting=setting, mode=mode, bits=bits, ckpt=ckpt))
    return runs


# ---------------------------------------------------------------- one run
def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Checkpointed(torch.nn.Module):
    """Activation checkpointing around an unmodified SpeechBrain layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


def build_model(d_model, nhead, layers, d_ffn, ckpt):
    """CNN front end + conformer encoder + CTC head, as SpeechBrain recipes do."""
    from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
    from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR

    front = ConvolutionFrontEnd(
        input_shape=(8, 10, 80), num_blocks=2, num_layers_per_block=1,
        out_channels=(64, 32), kernel_sizes=(3, 3), strides=(2, 2),
        residuals=(False, False),
    )  # fmt: skip
    asr = TransformerASR(
        tgt_vocab=32, input_size=640, d_model=d_model, nhead=nhead,
        num_encoder_layers=layers, num_decoder_layers=0, d_ffn=d_ffn, dropout=0.1,
        encoder_module="conformer", attention_type="RelPosMHAXL",
        normalize_before=True, causal=False, kernel_size=31,
    )  # fmt: skip
    if ckpt:
        encoder = asr.encoder
        for i, layer in enumerate(encoder.layers):
            encoder.layers[i] = Checkpointed(layer)
    return torch.nn.ModuleDict(
        {"front": front, "asr": asr, "ctc": torch.nn.Linear(d_model, 32)}
    )


def run_one(spec: dict, steps: int) -> dict:
    """Build, compress and train; measure. Runs inside the subprocess."""
    from speechbrain_omc import OMCConfig, compress_module, parameter_bytes

    torch.set_num_threads(int(os.environ.get("OMC_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    shape = SETTINGS[spec["setting"]]
    model = build_model(
        shape["d_model"], shape["nhead"], shape["layers"], shape["d_ffn"], spec["ckpt"]
    )
    numel = sum(p.numel() for p in model.parameters())
    lr = 1e-3
    handle = None
    if spec["mode"] != "fp32":
        config = OMCConfig(
            format=FORMATS[spec["bits"]], fp32_fraction=0.1, update_mode=spec["mode"]
        )
        handle = compress_module(model, config)
        handle.set_sgd(lr=lr)
    params = list(model.parameters())
    if handle is not None and handle.mode == "simple":
        params += handle.shadow_parameters()
    optimizer = torch.optim.SGD(params, lr=lr)
    stored = parameter_bytes(model)

    frames = int(shape["seconds"] * 100)
    feats = torch.randn(shape["batch"], frames, 80)
    lens = torch.ones(shape["batch"])
    tokens = torch.randint(1, 32, (shape["batch"], int(shape["seconds"] * 3)))

    def step():
        x = model["front"](feats)
        enc = model["asr"].encode(x, lens)
        logp = torch.nn.functional.log_softmax(model["ctc"](enc), -1).transpose(0, 1)
        loss = torch.nn.functional.ctc_loss(
            logp,
            tokens,
            torch.full((shape["batch"],), logp.shape[0]),
            torch.full((shape["batch"],), tokens.shape[1]),
        )
        loss.backward()
        if handle is not None and handle.mode == "simple":
            with handle.decompressed_step():
                optimizer.step()
        else:
            optimizer.step()
            if handle is not None:
                handle.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    rss_before = _vm_hwm_bytes()
    _reset_hwm()
    times, losses = [], []
    for _ in range(steps + 1):  # the first step warms up and is not timed
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    return {
        **spec,
        "numel": numel,
        "param_bytes": stored,
        "float32_param_bytes": 4 * numel,
        "peak_rss": _vm_hwm_bytes(),
        "setup_peak_rss": rss_before,
        "sec_per_step": statistics.median(times[1:]),
        "losses": losses,
        "peak_decompressed": handle.peak_live_bytes if handle else None,
    }


# -------------------------------------------------------------- the driver
def spawn(spec: dict, steps: int) -> dict:
    """Run one configuration in a fresh interpreter and parse its JSON."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--one", json.dumps(spec), "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Markdown table with ratios against the float32 run of the same group."""
    lines = [
        "| setting | ckpt | mode | bits | param MB | param ratio | peak RSS MB "
        "| peak ratio | s/step | time ratio | first/last loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for r in results:
        if r["mode"] == "fp32":
            base[(r["setting"], r["ckpt"])] = r
    for r in results:
        b = base[(r["setting"], r["ckpt"])]
        lines.append(
            f"| {r['setting']} | {'yes' if r['ckpt'] else 'no'} | {r['mode']} "
            f"| {r['bits']} | {r['param_bytes'] / 1e6:.1f} "
            f"| {r['param_bytes'] / b['param_bytes']:.3f} "
            f"| {r['peak_rss'] / 1e6:.0f} | {r['peak_rss'] / b['peak_rss']:.3f} "
            f"| {r['sec_per_step']:.2f} | {r['sec_per_step'] / b['sec_per_step']:.2f} "
            + (
                f"| {r['losses'][0]:.2f} / {r['losses'][-1]:.2f} |"
                if r.get("losses")
                else "| n/a |"
            )
        )
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=[*SETTINGS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="MODE:BITS",
        help="run only these configurations, e.g. fp32:32 fused:11",
    )
    parser.add_argument(
        "--include",
        type=Path,
        help="JSON lines of earlier results (this script's output) to table too",
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), args.steps)))
        return

    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    results = []
    if args.include:
        lines = args.include.read_text().splitlines()
        results = [json.loads(line) for line in lines if line.startswith("{")]
    for setting in settings:
        for spec in configurations(setting):
            if args.only and f"{spec['mode']}:{spec['bits']}" not in args.only:
                continue
            result = spawn(spec, args.steps)
            results.append(result)
            print(json.dumps(result), flush=True)
    report = table(results)
    print(report)
    if args.output:
        load = os.getloadavg()
        command = " ".join(["python", *sys.argv])
        args.output.write_text(
            "# Training-step benchmark\n\n"
            f"Command: `{command}`\n\n"
            f"Machine: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch threads "
            f"{os.environ.get('OMC_BENCH_THREADS', '2')}; load average at the end "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}. "
            f"Median of {args.steps} timed steps after one warm-up step; every "
            "configuration in a fresh process; OMC runs use weight-matrices-only "
            "with 10 % of values float32 and SGD (lr 1e-3).\n\n"
            f"{report}\n\n<details><summary>raw</summary>\n\n```json\n"
            + "\n".join(json.dumps(r) for r in results)
            + "\n```\n</details>\n"
        )


if __name__ == "__main__":
    main()
