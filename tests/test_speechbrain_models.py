"""SpeechBrain's own model classes train under OMC without edits to them.

For each model: 20 SGD steps on a fixed random batch in fused and in simple
mode; the loss falls, and both modes give the same losses.
"""

import copy

import pytest
import speechbrain as sb
import torch
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
from speechbrain.lobes.models.CRDNN import CRDNN
from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR

from speechbrain_omc import OMCConfig, compress_module, make_plan, parameter_roles
from speechbrain_omc.engine.parameter import CompressedParameter
from speechbrain_omc.engine.selection import NORMALISATION_TYPES
from speechbrain_omc.federated.server import FedAvgServer

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


def cnn_conformer():
    """The recipes' model: SpeechBrain's CNN front end, a RelPosMHAXL conformer
    encoder with a transformer decoder, an LSTM and CTC/decoder heads."""
    return torch.nn.ModuleDict(
        {
            "CNN": ConvolutionFrontEnd(
                input_shape=[8, 10, FEATS], num_blocks=2, num_layers_per_block=1,
                out_channels=[8, 8], kernel_sizes=[3, 3], strides=[2, 2],
                residuals=[False, False],
            ),
            "asr": TransformerASR(
                tgt_vocab=VOCAB, input_size=FEATS * 8 // 4, d_model=32, nhead=4,
                num_encoder_layers=2, num_decoder_layers=1, d_ffn=64,
                dropout=0.0, encoder_module="conformer",
                attention_type="RelPosMHAXL", normalize_before=True,
                causal=False, kernel_size=7,
            ),
            "lstm": sb.nnet.RNN.LSTM(hidden_size=8, input_size=32, num_layers=1),
            "ctc": sb.nnet.linear.Linear(input_size=32, n_neurons=VOCAB),
        }
    )  # fmt: skip


def _owners(model):
    return {
        f"{prefix}.{attr}".lstrip("."): owner
        for prefix, owner in model.named_modules()
        for attr, param in owner._parameters.items()
        if param is not None
    }


def test_weights_only_keeps_norms_and_position_biases_float32():
    """WMOQ on SpeechBrain's own modules: matrices compressed, nothing else."""
    model = cnn_conformer()
    owners = _owners(model)
    plan = make_plan(model, OMCConfig(format="e3m7"))
    norms = [n for n in owners if isinstance(owners[n], NORMALISATION_TYPES)]
    biases = [n for n in owners if n.endswith(("pos_bias_u", "pos_bias_v"))]
    # The cases the shape rule got wrong are there: 2-D LayerNorm gains and
    # shifts in the CNN blocks, 2-D position biases in every attention layer.
    assert "CNN.convblock_0.convs.norm_0.norm.weight" in norms
    assert plan["CNN.convblock_0.convs.norm_0.norm.weight"].shape == (10, 8)
    assert len(biases) == 4 and all(len(plan[n].shape) == 2 for n in biases)
    for name in norms:
        assert not plan[name].compressed, name
        assert plan[name].reason == "WMOQ: normalisation", name
    for name in biases:
        assert not plan[name].compressed, name
        assert plan[name].reason == "WMOQ: position bias", name
    # Every other parameter with two or more dimensions is a weight matrix of
    # a conv, linear, embedding, LSTM or attention layer, and is compressed.
    matrices = [
        e for e in plan.entries if len(e.shape) >= 2 and e.name not in norms + biases
    ]
    assert all(e.compressed and e.reason == "matrix" for e in matrices)
    kinds = {
        (type(owners[e.name]).__name__, e.name.rsplit(".", 1)[1]) for e in matrices
    }
    assert {
        ("Conv2d", "weight"),  # CNN front end
        ("Conv1d", "weight"),  # conformer convolution module
        ("Linear", "weight"),
        ("Embedding", "weight"),  # decoder's token embedding
        ("LSTM", "weight_ih_l0"),
        ("LSTM", "weight_hh_l0"),
        ("RelPosMHAXL", "in_proj_weight"),
        ("MultiheadAttention", "in_proj_weight"),  # decoder's regular MHA
    } <= kinds
    assert all(not e.compressed for e in plan.entries if len(e.shape) < 2)
    # The table says why, row by row.
    table = plan.table()
    for name in [norms[0], biases[0], matrices[0].name]:
        row = next(r for r in table.splitlines() if r.startswith(name + " "))
        assert row.endswith(plan[name].reason)
    assert "WMOQ: normalisation" in table.splitlines()[-1]
    assert "WMOQ: position bias 4" in table.splitlines()[-1]
    # The engine follows the plan: those parameters stay float32 tensors.
    compress_module(model, OMCConfig(format="e3m7"))
    params = dict(model.named_parameters())
    assert not any(isinstance(params[n], CompressedParameter) for n in norms + biases)
    assert all(isinstance(params[e.name], CompressedParameter) for e in matrices)


def test_server_plans_from_shapes_and_roles_equal_the_models_plans():
    model = cnn_conformer()
    config = OMCConfig(format="e3m7", fp32_fraction=0.1, fp32_policy="random")
    state = {n: p.detach() for n, p in model.named_parameters()}
    clients = ["a", "b", "c"]
    server = FedAvgServer(state, clients, 2, omc=config, roles=parameter_roles(model))
    blind = FedAvgServer(state, clients, 2, omc=config)  # shapes only
    differs = False
    for round in (1, 2, 3):
        for client in clients:
            plan = make_plan(model, config, round=round, client=client)
            expected = {e.name: e.format or "float32" for e in plan.entries}
            assert server.formats(round, client) == expected
            differs |= blind.formats(round, client) != expected
    assert differs, "without roles the server compresses norms and biases"
