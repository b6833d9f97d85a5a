"""Federated client: one Brain reused across rounds, plans from messages."""

import pytest
import speechbrain as sb
import torch

from speechbrain_omc import OMCBrain, OMCConfig
from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.client import OMCClient
from speechbrain_omc.federated.server import FedAvgServer

OMC = OMCConfig(format="e3m7", fp32_fraction=0.3, fp32_policy="random", seed=1)


class Regressor(OMCBrain):
    def compute_forward(self, batch, stage):
        hidden = self.modules.net(batch[0])
        if stage == sb.Stage.TRAIN:
            hidden = self.modules.drop(hidden)
        return self.modules.head(hidden)

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TEST:
            self.stage_stats = {"mse": stage_loss}


def make_brain(omc=OMC, lr=0.05, checkpointer=None, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.Tanh()
    )
    modules = {
        "net": net,
        "drop": torch.nn.Dropout(0.2),
        "head": torch.nn.Linear(12, 3),
    }
    return Regressor(
        modules=modules,
        opt_class=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.5),
        hparams={"omc": omc} if omc is not None else {},
        checkpointer=checkpointer,
    )


def make_data():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 3, generator=gen)
    out = {}
    for client in ("a", "b", "c"):
        x = torch.randn(20, 6, generator=gen)
        out[client] = [(xi, xi @ w) for xi in x]
    return out


def make_client(brain=None, **kwargs):
    brain = brain or make_brain()
    return OMCClient(
        brain,
        make_data(),
        train_loader_kwargs={"batch_size": 4, "shuffle": True},
        **kwargs,
    )


def make_server(client, omc=OMC, **kwargs):
    return FedAvgServer(
        client.get_model(),
        ["a", "b", "c"],
        clients_per_round=2,
        omc=omc,
        seed=11,
        buffers=client.buffer_names(),
        **kwargs,
    )


def test_entries_and_buffers():
    client = make_client()
    assert client.entry_names() == [
        "net.0.weight",
        "net.0.bias",
        "net.1.weight",
        "net.1.bias",
        "net.1.running_mean",
        "net.1.running_var",
        "head.weight",
        "head.bias",
    ]
    assert client.buffer_names() == ["net.1.running_mean", "net.1.running_var"]
    assert all(v.dtype == torch.float32 for v in client.get_model().values())


def test_reply_has_the_received_plan_and_metadata():
    client = make_client()
    server = make_server(client, client_config={"local_epochs": 2})
    messages = server.configure_round()
    for name, data in messages.items():
        reply = wire.decode(client.train(data))
        assert reply.formats() == wire.decode(data).formats()
        assert reply.meta["type"] == "update"
        assert reply.meta["round"] == 1 and reply.meta["client"] == name
        assert reply.meta["num_examples"] == 20
        assert reply.meta["metrics"]["steps"] == 10  # 2 epochs of 5 batches
        assert reply.meta["metrics"]["train_loss"] > 0
        # The running statistics were trained and travel in float32.
        assert not torch.equal(reply.entries["net.1.running_mean"], torch.zeros(12))


def test_max_steps_caps_local_training():
    client = make_client(max_steps=3)
    server = make_server(client)
    data = next(iter(server.configure_round().values()))
    assert wire.decode(client.train(data)).meta["metrics"]["steps"] == 3


def test_a_round_depends_only_on_its_message():
    """Same message -> same reply bytes, whatever the Brain served before."""
    client = make_client()
    server = make_server(client)
    messages = list(server.configure_round().items())
    first = client.train(messages[0][1])
    client.train(messages[1][1])  # another client, another plan
    assert client.train(messages[0][1]) == first
    # A fresh process (a fresh Brain with other initial weights) agrees.
    fresh = make_client(make_brain(seed=123))
    assert fresh.train(messages[0][1]) == first


def test_received_weights_are_not_overwritten_by_local_checkpoints(tmp_path):
    # A stale local checkpoint with other weights must not be recovered.
    stale = make_brain(seed=99)
    checkpointer = sb.utils.checkpoints.Checkpointer(
        tmp_path, recoverables={"net": stale.modules.net, "head": stale.modules.head}
    )
    checkpointer.save_checkpoint()
    brain = make_brain(lr=0.0, checkpointer=checkpointer, seed=1)
    client = make_client(brain)
    assert brain.checkpointer is None
    server = make_server(make_client(make_brain(seed=2)), omc=OMC)
    data = server.configure_round()["a" if "a" in server.sample_clients(1) else "b"]
    sent = wire.decode(data)
    reply = wire.decode(client.train(data))  # lr 0: the model comes back as sent
    for name, value in sent.entries.items():
        if name in ("net.1.running_mean", "net.1.running_var"):
            continue  # batch norm statistics move even at lr 0
        got = reply.entries[name]
        if isinstance(value, CompressedTensor):
            assert got.to_bytes() == value.to_bytes(), name
        else:
            assert torch.equal(got, value), name


def test_float32_federation_with_a_float32_brain():
    client = make_client(make_brain(omc=None))
    server = make_server(client, omc=None)
    messages = server.configure_round()
    replies = {c: client.train(m) for c, m in messages.items()}
    assert set(
        wire.decode(replies["a" if "a" in replies else "b"]).formats().values()
    ) == {"float32"}
    assert client.brain.omc is None
    assert server.aggregate(replies).accepted == sorted(replies)


def test_float32_message_to_an_omc_brain_stays_float32():
    # The plan is the message: an OMC Brain does not compress on its own.
    client = make_client()
    server = make_server(client, omc=None)
    data = next(iter(server.configure_round().values()))
    assert set(wire.decode(client.train(data)).formats().values()) == {"float32"}
    assert client.brain.omc is not None and not client.brain.omc.slots


def test_federation_learns_and_memory_stays_compressed():
    client = make_client()
    server = make_server(client)
    test = make_data()["c"]
    before = client.evaluate(server.message_for("eval"), test, {"batch_size": 10})
    for _ in range(6):
        messages = server.configure_round()
        report = server.aggregate({c: client.train(m) for c, m in messages.items()})
        assert len(report.accepted) == 2
    after = client.evaluate(server.message_for("eval"), test, {"batch_size": 10})
    assert after["mse"] < 0.5 * before["mse"]
    assert client.brain.omc.slots  # compressed weights during evaluation too


def test_mismatched_message_is_refused():
    client = make_client()
    message = wire.encode({"other.weight": torch.zeros(2, 2)}, {"type": "global"})
    with pytest.raises(ValueError, match="does not match"):
        client.load(wire.decode(message))
    with pytest.raises(ValueError, match="expected a global model"):
        client.train(wire.encode({}, {"type": "update"}))


def test_brain_without_mixin_is_refused():
    class Plain(sb.Brain):
        pass

    with pytest.raises(TypeError, match="OMCMixin"):
        OMCClient(Plain(modules={"lin": torch.nn.Linear(2, 2)}), [])


def test_constant_buffers_stay_home():
    brain = make_brain()
    brain.modules.head.register_buffer("table", torch.arange(4.0))  # a constant
    assert "head.table" not in make_client(brain).entry_names()
    assert "head.table" in make_client(brain, buffers="all").buffer_names()
    assert make_client(brain, buffers="none").buffer_names() == []
    with pytest.raises(ValueError, match="buffers"):
        make_client(brain, buffers="some")


def _compressing(server, name="net.0.weight"):
    """A client of round 1 whose plan compresses ``name``."""
    sampled = server.sample_clients(1)
    return next(c for c in sampled if server.formats(1, c)[name] != "float32")


def test_a_message_with_non_finite_values_is_refused_before_loading():
    client = make_client()
    server = make_server(client)
    entries, meta = _float32_round(server)
    entries["net.0.weight"] = torch.full_like(entries["net.0.weight"], float("nan"))
    before = client.get_model()
    with pytest.raises(ValueError, match="net.0.weight has 72 non-finite"):
        client.train(wire.encode(entries, meta))
    after = client.get_model()
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("failure", ["diverged weights", "failing compression"])
def test_a_worker_recovers_after_an_exception(failure, monkeypatch):
    """An exception while handling one message (here while the client puts
    its modules under the message's plan) leaves the Brain usable: the next
    message trains and evaluates as on a fresh worker (before: every later
    message raised 'holds compressed parameters of another handle')."""
    from speechbrain_omc.federated import client as client_module

    client = make_client()
    server = make_server(client)
    messages = server.configure_round()
    name = _compressing(server)
    if failure == "diverged weights":
        # The Brain's own float32 weight went non-finite (a diverged local
        # training): compressing it under the next plan must not fail.
        client.train(wire.encode(*_float32_round(server)))
        with torch.no_grad():
            client.brain.modules.net[0].weight.fill_(float("nan"))
    else:
        client.train(wire.encode(*_float32_round(server)))  # an empty plan
        calls = []
        original = client_module.compress_module

        def failing(module, config, plan):
            calls.append(1)
            if len(calls) == 1:
                # Half-way, as a compression error leaves it: some parameters
                # compressed, no handle returned.
                original(module, config, plan)
                module.__dict__.pop("_omc_handle")
                raise ValueError("x has 512 non-finite value(s)")
            return original(module, config, plan)

        monkeypatch.setattr(client_module, "compress_module", failing)
        with pytest.raises(ValueError, match="non-finite"):
            client.train(messages[name])
    reply = client.train(messages[name])
    fresh = make_client(make_brain(seed=123))
    assert reply == fresh.train(messages[name])
    test = make_data()["c"]
    got = client.evaluate(server.message_for("eval"), test, {"batch_size": 10})
    want = fresh.evaluate(server.message_for("eval"), test, {"batch_size": 10})
    assert got == want


def _float32_round(server):
    """A float32 broadcast of the server's model (an empty OMC plan)."""
    sent = wire.decode(server.message_for("a"))
    return sent.decompressed(), sent.meta
