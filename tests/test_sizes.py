"""Plan sizes: the analytic bytes equal what a real model and server produce."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from flower_harness import honest_reply

from speechbrain_omc.engine.accounting import parameter_bytes
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.handle import compress_module
from speechbrain_omc.engine.selection import make_plan, parameter_roles
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.server import FedAvgServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from plan_sizes import conformer_ctc, model_shapes, plan_sizes, round_sizes  # noqa: E402

TINY = dict(d_model=32, nhead=4, layers=2, d_ffn=64, kernel_size=7, vocab=30)
CONFIGS = [
    OMCConfig(format="e3m7", fp32_fraction=0.1, fp32_policy="random", seed=4),
    OMCConfig(format="int8", fp32_fraction=0.0),
    OMCConfig(format="bf16", fp32_fraction=0.25, fp32_policy="largest"),
    None,
    # The lossless format: no transform bytes, whatever the config asks.
    OMCConfig(format="fp32", fp32_fraction=0.1, fp32_policy="random", seed=4),
]
IDS = ["e3m7", "int8", "bf16", "float32", "lossless fp32"]


def _server(model, config, clients, per_round):
    shapes, roles = model_shapes(model)
    values = {n: torch.randn(s) * 0.1 for n, s in shapes}
    return FedAvgServer(
        values,
        clients,
        per_round,
        omc=config,
        seed=2,
        max_examples=100,
        roles=roles,
        client_config={"local_epochs": 1},
    )


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_message_bytes_are_exact(config):
    """Every broadcast and reply of a real round of a real Conformer-CTC (tiny,
    on the CPU) has the analytic length to the byte."""
    model = conformer_ctc(TINY, device="cpu")
    clients = [f"client_{i:03d}" for i in range(6)]
    server = _server(model, config, clients, 6)
    for client, data in server.configure_round().items():
        meta = wire.decode(data).meta
        sizes = plan_sizes(model, config, round=1, client=client, meta=meta)
        assert sizes.message_bytes == len(data)
        assert sizes.float32_message_bytes == wire.decode(data).float32_nbytes()
        reply = honest_reply(data, shift=0.01, num_examples=3)
        reply_sizes = plan_sizes(
            model, config, round=1, client=client, meta=wire.decode(reply).meta
        )
        assert reply_sizes.message_bytes == len(reply)


@pytest.mark.parametrize(
    "config",
    [c for c in CONFIGS if c is not None],
    ids=[i for i, c in zip(IDS, CONFIGS) if c is not None],
)
def test_plan_bytes_are_the_clients_parameter_memory(config):
    model = conformer_ctc(TINY, device="cpu")
    sizes = plan_sizes(model, config, round=3, client="client_007")
    plan = make_plan(model, config, round=3, client="client_007")
    compress_module(model, config, plan=plan)
    assert parameter_bytes(model) == sizes.plan_bytes
    assert sizes.float32_bytes == 4 * sizes.parameters


def test_a_round_adds_up_and_matches_a_real_server():
    model = conformer_ctc(TINY, device="cpu")
    config = CONFIGS[0]
    clients = [f"client_{i:03d}" for i in range(20)]
    server = _server(model, config, clients, 8)
    messages = server.configure_round()
    # The round's variables, each compressed once for all its clients.
    cached = sum(len(value.to_bytes()) for value, _ in server.planner.cache.values())
    replies = {
        c: honest_reply(m, shift=0.01, num_examples=3) for c, m in messages.items()
    }
    report = server.aggregate(replies)
    sizes = round_sizes(model, config, 8, round=1, clients=list(messages))
    # Metadata values differ in their digits (seeds): a few bytes; the
    # replies' metrics are OMCClient's three (the fake client sends two).
    assert abs(sizes.bytes_down - report.bytes_down) <= 8 * 2
    assert abs(sizes.bytes_up - report.bytes_up) <= 8 * 48
    assert abs(sizes.float32_bytes_down - report.float32_bytes_down) <= 8 * 2
    assert sizes.bytes_down < sizes.float32_bytes_down
    assert sizes.server_streaming["running"] == server.model_nbytes()
    assert sizes.server_streaming["broadcast"] == cached


def test_presets_are_built_on_meta_without_memory():
    large = conformer_ctc("conformer_large")
    big = conformer_ctc("conformer_130m")
    assert {p.device.type for p in big.parameters()} == {"meta"}
    assert sum(p.numel() for p in large.parameters()) == 76_237_248
    count = sum(p.numel() for p in big.parameters())
    assert 125e6 < count < 135e6  # the paper group's ~130M
    # Roles come from the module: the conformer's norms and position biases
    # stay float32 under weights-only quantization.
    roles = parameter_roles(big)
    assert "position bias" in roles.values() and "normalisation" in roles.values()
    sizes = plan_sizes(big, OMCConfig(format="e3m7", fp32_fraction=0.1))
    # e3m7 on ~90 % of the values, float32 on the rest: about 13 bits a value.
    assert 12.5 < sizes.bits_per_parameter < 14
    assert 0.55 < sizes.saving < 0.62


def test_streaming_server_memory_does_not_depend_on_the_clients():
    model = conformer_ctc("conformer_large")
    config = CONFIGS[0]
    small, large = (round_sizes(model, config, k) for k in (10, 100))
    assert small.server_streaming_bytes == pytest.approx(
        large.server_streaming_bytes, rel=1e-3
    )
    assert large.bytes_down == pytest.approx(10 * small.bytes_down, rel=1e-3)
    assert large.server_before_bytes > 50 * large.server_streaming_bytes
