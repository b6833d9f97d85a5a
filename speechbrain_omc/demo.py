"""Demo: put a SpeechBrain conformer under OMC and show what it stores.

Run with ``python -m speechbrain_omc.demo``. Builds SpeechBrain's
``TransformerASR`` with a conformer encoder in the LibriSpeech
``conformer_small`` shape, compresses it (e3m7, per-variable scale,
weight-matrices-only, 10 % of values float32), prints the per-parameter byte
table, trains a few fused SGD steps on random features and reports the loss.
"""

from __future__ import annotations

import argparse
import time

import torch
from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR

from speechbrain_omc import OMCConfig, compress_module, parameter_bytes


def conformer_small(vocab: int = 32, input_size: int = 80) -> torch.nn.ModuleDict:
    """SpeechBrain's LibriSpeech ``conformer_small`` encoder shape with a CTC head.

    Arguments
    ---------
    vocab : int
        Output tokens.
    input_size : int
        Feature dimension.

    Returns
    -------
    torch.nn.ModuleDict
    """
    encoder = TransformerASR(
        tgt_vocab=vocab, input_size=input_size, d_model=144, nhead=4,
        num_encoder_layers=12, num_decoder_layers=0, d_ffn=1024, dropout=0.1,
        encoder_module="conformer", attention_type="RelPosMHAXL",
        normalize_before=True, causal=False, kernel_size=31,
    )  # fmt: skip
    return torch.nn.ModuleDict({"encoder": encoder, "ctc": torch.nn.Linear(144, vocab)})


def main(argv: list[str] | None = None) -> None:
    """Entry point of the demo.

    Arguments
    ---------
    argv : list of str, optional
        Command-line arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="e3m7")
    parser.add_argument("--fp32-fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = conformer_small()
    float32_bytes = parameter_bytes(model)
    config = OMCConfig(format=args.format, fp32_fraction=args.fp32_fraction)
    handle = compress_module(model, config)
    handle.set_sgd(lr=0.05)
    print(handle.table())
    stored = parameter_bytes(model)
    print(
        f"\nparameter storage: {stored:,} bytes under OMC against "
        f"{float32_bytes:,} in float32 ({1 - stored / float32_bytes:.1%} saved)"
    )

    feats = torch.randn(2, 200, 80)
    lens = torch.ones(2)
    tokens = torch.randint(1, 32, (2, 20))
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        logits = model["ctc"](model["encoder"].encode(feats, lens))
        logp = torch.nn.functional.log_softmax(logits, -1).transpose(0, 1)
        loss = torch.nn.functional.ctc_loss(
            logp, tokens, torch.full((2,), logp.shape[0]), torch.full((2,), 20)
        )
        loss.backward()
        handle.step()
        print(
            f"step {step}: CTC loss {loss.item():.3f}, "
            f"{time.perf_counter() - start:.2f} s, peak decompressed "
            f"{handle.peak_live_bytes / 2**20:.2f} MiB"
        )
        handle.reset_peak()


if __name__ == "__main__":
    main()
