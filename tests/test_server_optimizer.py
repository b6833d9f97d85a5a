"""FedAdam and FedYogi (``server_optimizer``) against a float64 reference.

* One and three rounds of ``adam`` and ``yogi`` equal a hand-written float64
  Algorithm 2 of Reddi et al. (ICLR 2021) within float32 tolerance; buffers
  are averaged, never stepped; ``sgd`` is unchanged (and bit for bit, the
  other server tests).
* A round whose model or moments would not be finite changes nothing but
  resets both moments; the honest rounds after it start afresh and move.
* A checkpoint keeps the second moment: resumed equals uninterrupted, bit for
  bit; other optimizer settings are refused, naming them.
* Bad settings raise.
"""

from __future__ import annotations

import pytest
import torch
from federated_fixtures import (
    CLIENTS,
    pinned_fold,
    reply_meta,
    small_model,
    small_server,
)

from speechbrain_omc.federated import wire
from speechbrain_omc.federated.aggregation import Aggregation
from speechbrain_omc.federated.checkpoint import CheckpointMismatch

BETAS, TAU, LR = (0.9, 0.99), 1e-3, 0.05
BUFFER = "norm.running_mean"
# float32 tolerance: the server folds in float32 (about 1e-7 a value) and the
# step amplifies an error in delta at most LR * (1 - b1) / tau = 5 times;
# three rounds stay under 5e-7 here.
TOL = dict(rtol=1e-5, atol=2e-6)


def _server(name: str, **settings):
    defaults = dict(
        omc=None,
        server_optimizer=name,
        server_betas=BETAS,
        server_eps=TAU,
        server_lr=LR,
        aggregation=Aggregation(norm_bound=None),
        run_id="run",
        reference_key=bytes(32),
    )
    return small_server(**{**defaults, **settings})


def _replies(server) -> dict[str, bytes]:
    """Each sampled client: the broadcast plus its own seeded noise."""
    replies = {}
    for client, data in server.configure_round().items():
        received = wire.decode(data)
        round_ = received.meta["round"]
        gen = torch.Generator().manual_seed(100 * round_ + CLIENTS.index(client))
        entries = {
            name: value + 0.1 * torch.randn(value.shape, generator=gen)
            for name, value in received.entries.items()
        }
        examples = 3 + 2 * CLIENTS.index(client)
        replies[client] = wire.encode(entries, reply_meta(received, examples))
    return replies


class Reference:
    """Algorithm 2 in float64, from m = 0 and v = tau**2, no bias correction."""

    def __init__(self, name: str, model: dict) -> None:
        self.name = name
        self.x = {n: v.double() for n, v in model.items()}
        self.m = {n: torch.zeros_like(v) for n, v in self.x.items() if n != BUFFER}
        self.v = {n: torch.full_like(v, TAU**2) for n, v in self.m.items()}

    def step(self, replies: dict[str, bytes]) -> None:
        messages = [wire.decode(data) for data in replies.values()]
        total = sum(m.meta["num_examples"] for m in messages)
        b1, b2 = BETAS
        for name, x in self.x.items():
            mean = sum(
                m.meta["num_examples"] * m.entries[name].double() for m in messages
            )
            mean = mean / total
            if name == BUFFER:
                self.x[name] = mean
                continue
            delta = mean - x
            self.m[name] = b1 * self.m[name] + (1 - b1) * delta
            v, square = self.v[name], delta**2
            if self.name == "adam":
                self.v[name] = b2 * v + (1 - b2) * square
            else:
                self.v[name] = v - (1 - b2) * square * torch.sign(v - square)
            self.x[name] = x + LR * self.m[name] / (self.v[name].sqrt() + TAU)


def _assert_close(server, reference: Reference) -> None:
    for name, value in reference.x.items():
        assert torch.allclose(server.model[name].double(), value, **TOL), name
    assert sorted(server.momentum) == sorted(server.second_moment)
    assert sorted(server.momentum) == sorted(reference.m)  # buffers: none
    for name in reference.m:
        assert torch.allclose(server.momentum[name].double(), reference.m[name], **TOL)
        assert torch.allclose(
            server.second_moment[name].double(), reference.v[name], **TOL
        )


@pytest.mark.parametrize("rounds", [1, 3])
@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_rounds_equal_a_float64_reference_of_algorithm_2(name, rounds):
    server = _server(name)
    reference = Reference(name, server.model)
    for _ in range(rounds):
        before = server.model["layer2.weight"].clone()
        replies = _replies(server)
        reference.step(replies)
        assert server.aggregate(replies).model_updated
        _assert_close(server, reference)
        # Adaptive: a weight moves by about LR, whatever the change's scale.
        moved = (server.model["layer2.weight"] - before).abs()
        assert 0.2 * LR < float(moved.median()) and float(moved.max()) < 2.4 * LR


def test_adam_and_yogi_differ():
    adam, yogi = _server("adam"), _server("yogi")
    for _ in range(3):
        adam.aggregate(_replies(adam))
        yogi.aggregate(_replies(yogi))
    assert not torch.equal(adam.model["layer1.weight"], yogi.model["layer1.weight"])


def test_sgd_named_is_the_default_bit_for_bit_and_keeps_no_second_moment():
    plain = dict(omc=None, aggregation=Aggregation(norm_bound=None))
    named = small_server(server_optimizer="sgd", server_betas=(0.5, 0.5), **plain)
    default = small_server(**plain)
    assert named.settings() == default.settings()  # older checkpoints resume
    assert "server_optimizer" not in default.settings()
    for server in (named, default):
        replies = _replies(server)
        server.aggregate(replies)
        for name, value in pinned_fold(replies).items():
            assert torch.equal(server.model[name], value), name
        assert server.second_moment == {} and server.momentum == {}


@pytest.mark.parametrize("name", ["adam", "yogi"])
@pytest.mark.parametrize(
    "bad, why",
    [(float("nan"), "model"), (float("inf"), "model"), (1e30, "v overflows")],
)
def test_a_nonfinite_round_changes_nothing_and_resets_both_moments(
    name, bad, why, caplog
):
    server = _server(name)
    server.aggregate(_replies(server))
    before = {n: v.clone() for n, v in server.model.items()}
    combined = {n: v.clone() for n, v in server.model.items()}
    combined["layer2.weight"][1, 2] = bad
    assert not server.state.apply(combined, round=2)
    assert all(torch.equal(server.model[n], v) for n, v in before.items())
    assert server.momentum == {} and server.second_moment == {}
    assert "moments are reset" in caplog.text
    # Honest rounds after it move the model, from fresh moments.
    reference = Reference(name, server.model)
    for _ in range(2):
        replies = _replies(server)
        reference.step(replies)
        assert server.aggregate(replies).model_updated
        _assert_close(server, reference)
    assert not torch.equal(server.model["layer2.weight"], before["layer2.weight"])


@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(name, tmp_path):
    uninterrupted = _server(name)
    for _ in range(4):
        uninterrupted.aggregate(_replies(uninterrupted))

    first = _server(name)
    for _ in range(2):
        first.aggregate(_replies(first))
    first.save(tmp_path / "server.ckpt")
    resumed = _server(name)
    resumed.load(tmp_path / "server.ckpt")
    assert resumed.round == 2 and sorted(resumed.second_moment) == sorted(
        first.second_moment
    )
    for moments in ("momentum", "second_moment"):
        saved, loaded = getattr(first, moments), getattr(resumed, moments)
        assert all(torch.equal(loaded[n], v) for n, v in saved.items()), moments
    for _ in range(2):
        resumed.aggregate(_replies(resumed))
    for name_, value in uninterrupted.model.items():
        assert torch.equal(resumed.model[name_], value), name_
    for name_, value in uninterrupted.second_moment.items():
        assert torch.equal(resumed.second_moment[name_], value), name_


def _saved_after_a_round(server) -> dict:
    server.aggregate(_replies(server))
    return server.state_dict()


@pytest.mark.parametrize(
    "saved_by, resumed_by, named",
    [
        ("sgd", "adam", "server_optimizer: checkpoint 'sgd', this run 'adam'"),
        ("adam", "sgd", "server_optimizer: checkpoint 'adam', this run 'sgd'"),
        ("adam", "yogi", "server_optimizer: checkpoint 'adam', this run 'yogi'"),
        ("adam", "adam betas", "server_betas: checkpoint [0.9, 0.99], this run"),
    ],
)
def test_a_checkpoint_of_other_optimizer_settings_is_refused_naming_them(
    saved_by, resumed_by, named
):
    def server(setting):
        if setting == "sgd":
            return _server("sgd", server_lr=1.0)
        if setting == "adam betas":
            return _server("adam", server_betas=(0.8, 0.99))
        return _server(setting)

    state = _saved_after_a_round(server(saved_by))
    other = server(resumed_by)
    with pytest.raises(CheckpointMismatch, match=named.replace("[", r"\[")):
        other.load_state_dict(state)
    assert other.round == 0


def test_a_checkpoint_without_its_second_moment_resumes_only_sgd():
    sgd_state = _saved_after_a_round(_server("sgd", server_lr=1.0))
    del sgd_state["second_moment"]  # as saved before adam and yogi
    resumed = _server("sgd", server_lr=1.0)
    resumed.load_state_dict(sgd_state)
    assert resumed.round == 1 and resumed.second_moment == {}

    adam_state = _saved_after_a_round(_server("adam"))
    missing = {k: v for k, v in adam_state.items() if k != "second_moment"}
    negative = {
        **adam_state,
        "second_moment": {n: -v for n, v in adam_state["second_moment"].items()},
    }
    partial = dict(adam_state["second_moment"])
    partial.pop("layer1.bias")
    for state, error in [
        (missing, "no second moment"),
        (negative, "second_moment layer1.weight is negative"),
        ({**adam_state, "second_moment": partial}, "second_moment and momentum"),
    ]:
        other = _server("adam")
        with pytest.raises(ValueError, match=error):
            other.load_state_dict(state)
        assert other.round == 0 and other.second_moment == {}


@pytest.mark.parametrize(
    "settings, error",
    [
        ({"server_optimizer": "lamb"}, "'lamb' is not one of sgd, adam, yogi"),
        ({"server_betas": (1.0, 0.99)}, "server_betas must be two numbers"),
        ({"server_betas": (0.9, -0.1)}, "server_betas must be two numbers"),
        ({"server_betas": (0.9,)}, "server_betas must be two numbers"),
        ({"server_betas": "ab"}, "server_betas must be two numbers"),
        ({"server_eps": 0.0}, "server_eps must be a number > 0"),
        ({"server_eps": -1e-3}, "server_eps must be a number > 0"),
        ({"server_eps": float("nan")}, "server_eps must be a number > 0"),
        ({"server_momentum": 0.9}, "server_momentum is FedAvgM's"),
    ],
)
def test_bad_optimizer_settings_raise(settings, error):
    with pytest.raises(ValueError, match=error):
        _server("adam", **settings)


def test_the_recipe_passes_its_settings_to_the_server():
    from speechbrain_omc.asr.federation import build_server
    from speechbrain_omc.federated.server_optimizer import ServerOptimizer

    hparams = {"clients_per_round": 3, "seed": 7, "local_epochs": 1}
    settings = {"server_optimizer": "yogi", "server_betas": [0.8, 0.9]}
    server = build_server(
        {**hparams, **settings, "server_eps": 1e-4}, small_model(), CLIENTS, [], 10
    )
    assert server.optimizer == ServerOptimizer("yogi", (0.8, 0.9), 1e-4)
    assert build_server(hparams, small_model(), CLIENTS, [], 10).optimizer.name == "sgd"
