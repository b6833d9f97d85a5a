"""Training-step benchmark: float32 baselines against OMC fused steps.

Every configuration runs in a fresh subprocess, in the environment the user
has (no allocator or thread variables are set here); configurations run in
rounds, interleaved, so that ratios compare runs made on the same machine at
the same time. Reported per configuration: exact parameter bytes, peak
resident memory of the training steps, and seconds per step (median of the
timed steps after a warm-up).

Configurations:

* ``fp32``: float32 SGD, ``optimizer.step()`` after backward;
* ``fp32-hook``: float32 SGD applied inside backward through
  ``register_post_accumulate_grad_hook`` (gradients freed as they are used),
  the strongest uncompressed baseline;
* ``fused:16/11/8``: OMC fused mode, bf16 / e3m7 / e4m3 weight matrices,
  10 % of values float32; those float32 parameters are stepped inside
  backward as in ``fp32-hook``, the compressed ones by the fused update.

Peak memory: the kernel's high-water mark (VmHWM) is reset through
``/proc/self/clear_refs`` once the model is built (and compressed), so the
figure is the steps' own peak, not the float32 model's construction.

Usage::

    python benchmarks/train_step.py                  # all settings, 1 round
    python benchmarks/train_step.py --setting large --steps 5 --rounds 3
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
    """The runs of one setting: the two float32 baselines, then OMC per width."""
    checkpointing = [False, True] if setting == "large" else [False]
    runs = []
    for ckpt in checkpointing:
        for mode in ("fp32", "fp32-hook"):
            runs.append(dict(setting=setting, mode=mode, bits=32, ckpt=ckpt))
        for bits in FORMATS:
            runs.append(dict(setting=setting, mode="fused", bits=bits, ckpt=ckpt))
    return runs


# ---------------------------------------------------------------- one run
def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _vm_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


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


def sgd_in_backward(params, lr: float) -> None:
    """PyTorch's optimizer-in-backward pattern: step each parameter as its
    gradient is accumulated, then free the gradient."""
    optimizers = {p: torch.optim.SGD([p], lr=lr) for p in params}

    def step(param):
        optimizers[param].step()
        param.grad = None

    for param in params:
        param.register_post_accumulate_grad_hook(step)


def run_one(spec: dict, steps: int) -> dict:
    """Build, compress and train; measure. Runs inside the subprocess."""
    from speechbrain_omc import OMCConfig, compress_module, kernels, parameter_bytes

    torch.set_num_threads(int(os.environ.get("OMC_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    shape = SETTINGS[spec["setting"]]
    model = build_model(
        shape["d_model"], shape["nhead"], shape["layers"], shape["d_ffn"], spec["ckpt"]
    )
    numel = sum(p.numel() for p in model.parameters())
    lr = 1e-3
    handle = optimizer = None
    if spec["mode"] == "fused":
        config = OMCConfig(format=FORMATS[spec["bits"]], fp32_fraction=0.1)
        handle = compress_module(model, config)
        handle.set_sgd(lr=lr)
    if spec["mode"] == "fp32":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:  # fp32-hook, and OMC's float32 parameters alike
        sgd_in_backward(list(model.parameters()), lr)
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
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if handle is not None:
            handle.step()
        return loss.item()

    rss_before = _vm_hwm_bytes()
    rss_start = _vm_rss_bytes()
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
        "start_rss": rss_start,
        "sec_per_step": statistics.median(times[1:]),
        "step_times": times[1:],
        "losses": losses,
        "codec": kernels.status() if handle is not None else None,
    }


# -------------------------------------------------------------- the driver
def spawn(spec: dict, steps: int) -> dict:
    """Run one configuration in a fresh interpreter and parse its JSON."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--one", json.dumps(spec), "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _key(r: dict) -> tuple:
    return (r["setting"], r["ckpt"], r["mode"], r["bits"])


def summarise(results: list[dict]) -> list[dict]:
    """One row per configuration: medians over its rounds, ranges kept."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(_key(r), []).append(r)
    rows = []
    for runs in groups.values():
        rss = [r["peak_rss"] for r in runs]
        sec = [r["sec_per_step"] for r in runs]
        rows.append(
            {
                **runs[0],
                "peak_rss": statistics.median(rss),
                "peak_rss_range": (min(rss), max(rss)),
                "sec_per_step": statistics.median(sec),
                "sec_range": (min(sec), max(sec)),
                "rounds": len(runs),
            }
        )
    return rows


def table(results: list[dict]) -> str:
    """Markdown table with ratios against both float32 baselines of the group."""
    rows = summarise(results)
    lines = [
        "| setting | ckpt | mode | bits | param MB | peak RSS MB (range) "
        "| vs fp32 | vs fp32-hook | s/step (range) | vs fp32 | vs fp32-hook "
        "| first/last loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["setting"], r["ckpt"], r["mode"]): r for r in rows}
    for r in rows:
        fp32 = base.get((r["setting"], r["ckpt"], "fp32"), r)
        hook = base.get((r["setting"], r["ckpt"], "fp32-hook"), r)
        lo, hi = r["peak_rss_range"]
        slo, shi = r["sec_range"]
        lines.append(
            f"| {r['setting']} | {'yes' if r['ckpt'] else 'no'} | {r['mode']} "
            f"| {r['bits']} | {r['param_bytes'] / 1e6:.1f} "
            f"| {r['peak_rss'] / 1e6:.0f} ({lo / 1e6:.0f}-{hi / 1e6:.0f}) "
            f"| {r['peak_rss'] / fp32['peak_rss']:.3f} "
            f"| {r['peak_rss'] / hook['peak_rss']:.3f} "
            f"| {r['sec_per_step']:.3f} ({slo:.3f}-{shi:.3f}) "
            f"| {r['sec_per_step'] / fp32['sec_per_step']:.2f} "
            f"| {r['sec_per_step'] / hook['sec_per_step']:.2f} "
            f"| {r['losses'][0]:.2f} / {r['losses'][-1]:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=[*SETTINGS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs per configuration")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="MODE:BITS",
        help="run only these configurations, e.g. fp32:32 fp32-hook:32 fused:11",
    )
    parser.add_argument("--no-ckpt", action="store_true", help="skip checkpointing")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), args.steps)))
        return

    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    specs = [
        spec
        for setting in settings
        for spec in configurations(setting)
        if (not args.only or f"{spec['mode']}:{spec['bits']}" in args.only)
        and not (args.no_ckpt and spec["ckpt"])
    ]
    load_before = os.getloadavg()
    started = time.time()
    results = []
    for _ in range(args.rounds):  # interleaved: every configuration per round
        for spec in specs:
            result = spawn(spec, args.steps)
            results.append(result)
            print(json.dumps(result), flush=True)
    load_after = os.getloadavg()
    report = table(results)
    print(report)
    if args.output:
        command = " ".join(["python", *sys.argv])
        codec = next((r["codec"] for r in results if r.get("codec")), "n/a")
        args.output.write_text(
            "# Training-step benchmark\n\n"
            f"Command: `{command}`\n\n"
            f"Machine: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, torch threads "
            f"{os.environ.get('OMC_BENCH_THREADS', '2')}; {codec}; default "
            "environment (no allocator variables). Load average (1/5/15 min) "
            f"before {load_before[0]:.2f} / {load_before[1]:.2f} / "
            f"{load_before[2]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f} "
            f"/ {load_after[2]:.2f}; {(time.time() - started) / 60:.1f} min. "
            f"Every configuration in a fresh process, {args.rounds} round(s) "
            f"interleaved; per run the median of {args.steps} timed steps after "
            "one warm-up step; the table gives the median over rounds and the "
            "range. OMC runs: weight matrices only, 10 % of values float32, "
            "fused SGD (lr 1e-3).\n\n"
            f"{report}\n\n<details><summary>raw</summary>\n\n```json\n"
            + "\n".join(json.dumps(r) for r in results)
            + "\n```\n</details>\n"
        )


if __name__ == "__main__":
    main()
