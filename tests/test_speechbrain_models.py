"""SpeechBrain's own model classes train under OMC without edits to them.

For each model: 20 SGD steps on a fixed random batch in fused and in simple
mode; the loss falls, and both modes give the same losses.
"""

import copy

import pytest
import speechbrain as sb
import torch
from speechbrain.lobes.models.CRDNN import CRDNN
from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR

from speechbrain_omc import OMCConfig, compress_module
from speechbrain_omc.parameter import CompressedParameter

VOCAB, FEATS = 12, 20


def conformer():
    return TransformerASR(
        tgt_vocab=VOCAB, input_size=FEATS, d_model=32, nhead=4,
        num_encoder_layers=2, num_decoder_layers=1, d_ffn=64, dropout=0.0,
        encoder_module="conformer", attention_type="RelPosMHAXL",
        normalize_before=True, causal=False, kernel_size=7,
    )  # fmt: skip


def transformer():
    return TransformerASR(
        tgt_vocab=VOCAB, input_size=FEATS, d_model=32, nhead=4,
        num_encoder_layers=2, num_decoder_layers=1, d_ffn=64, dropout=0.0,
        encoder_module="transformer", attention_type="regularMHA", causal=False,
    )  # fmt: skip


def crdnn():
    return CRDNN(
        input_shape=[None, None, FEATS], dropout=0.0, cnn_blocks=1, cnn_channels=[4],
        rnn_class=sb.nnet.RNN.LSTM, rnn_layers=1, rnn_neurons=16, dnn_blocks=1,
        dnn_neurons=32, time_pooling=False, inter_layer_pooling_size=[2],
    )  # fmt: skip


class Seq2Seq(torch.nn.Module):
    """TransformerASR plus CTC and decoder heads (sb.nnet.linear.Linear)."""

    def __init__(self, factory):
        super().__init__()
        self.asr = factory()
        self.ctc = sb.nnet.linear.Linear(input_size=32, n_neurons=VOCAB)
        self.seq = sb.nnet.linear.Linear(input_size=32, n_neurons=VOCAB)

    def loss(self, x, lens, tokens):
        enc, dec = self.asr(x, tokens[:, :-1], lens)
        ctc = torch.nn.functional.log_softmax(self.ctc(enc), -1)
        seq = torch.nn.functional.log_softmax(self.seq(dec), -1)
        token_lens = torch.full((len(tokens),), tokens.shape[1] - 1)
        ctc_loss = torch.nn.functional.ctc_loss(
            ctc.transpose(0, 1),
            tokens[:, 1:],
            torch.full((len(x),), x.shape[1]),
            token_lens,
        )
        nll = torch.nn.functional.nll_loss(seq.transpose(1, 2), tokens[:, 1:])
        return ctc_loss + nll


class CTCOnly(torch.nn.Module):
    def __init__(self, factory):
        super().__init__()
        self.enc = factory()
        self.ctc = sb.nnet.linear.Linear(input_size=32, n_neurons=VOCAB)

    def loss(self, x, lens, tokens):
        logp = torch.nn.functional.log_softmax(self.ctc(self.enc(x)), -1)
        return torch.nn.functional.ctc_loss(
            logp.transpose(0, 1),
            tokens[:, 1:],
            torch.full((len(x),), x.shape[1]),
            torch.full((len(tokens),), tokens.shape[1] - 1),
        )


MODELS = {
    "conformer_RelPosMHAXL": lambda: Seq2Seq(conformer),
    "transformer_regularMHA": lambda: Seq2Seq(transformer),
    "CRDNN_LSTM": lambda: CTCOnly(crdnn),
}


def train(model, mode, batch, steps=20, lr=0.1):
    handle = compress_module(model, OMCConfig(format="e3m7", update_mode=mode))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    handle.set_sgd(lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.loss(*batch)
        loss.backward()
        optimizer.step()
        handle.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return handle, losses


@pytest.mark.parametrize("name", sorted(MODELS))
def test_speechbrain_model_trains_under_omc_in_both_modes(name):
    torch.manual_seed(0)
    base = MODELS[name]()
    batch = (
        torch.randn(2, 16, FEATS),
        torch.ones(2),
        torch.randint(1, VOCAB, (2, 5)),
    )
    runs = {}
    for mode in ("fused", "simple"):
        handle, losses = train(copy.deepcopy(base), mode, batch)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < 0.5 * losses[0], (mode, losses)
        runs[mode] = (handle, losses)
    assert runs["fused"][1] == runs["simple"][1]


def test_every_weight_kind_is_compressed():
    """Convolutions, embeddings, LSTM, raw MHA in_proj_weight, sb Linear."""
    seen = set()
    for factory in MODELS.values():
        model = factory()
        compress_module(model, OMCConfig())
        for owner in model.modules():
            for attr, param in owner._parameters.items():
                if isinstance(param, CompressedParameter):
                    seen.add((type(owner).__name__, attr))
    for expected in [
        ("Conv1d", "weight"),
        ("Embedding", "weight"),
        ("LSTM", "weight_ih_l0"),
        ("MultiheadAttention", "in_proj_weight"),
        ("Linear", "weight"),
    ]:
        assert expected in seen, expected


def test_conformer_small_parameter_bytes_drop_by_55_percent():
    """e3m7, WMOQ, 10 % float32: plan arithmetic equals measured storage."""
    from speechbrain_omc import parameter_bytes
    from speechbrain_omc.demo import conformer_small

    model = conformer_small()
    float32_bytes = parameter_bytes(model)
    assert 8e6 < float32_bytes / 4 < 12e6  # about 10M parameters
    handle = compress_module(model, OMCConfig(format="e3m7", fp32_fraction=0.1))
    measured = parameter_bytes(model)
    assert measured == handle.plan.nbytes == handle.parameter_bytes()
    assert measured == sum(
        len(s.codes.packed) + s.codes.transform.nbytes for s in handle.slots.values()
    ) + sum(
        p.numel() * 4
        for p in model.parameters()
        if not isinstance(p, CompressedParameter)
    )
    assert measured <= 0.45 * float32_bytes
