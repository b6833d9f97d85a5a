"""One direction of the wire compressed, training float32 (``omc_wire``).

``download``: the broadcast in the plan's formats, decoded by the client,
trained and sent back in float32. ``upload``: a float32 broadcast, float32
training, the reply compressed under the round's plan. The server sends and
expects each mode's forms and refuses any other.

The federated recipe (tiny model, real components) shows the plumbing:
under the lossless ``fp32`` format both modes train what float32 trains, bit
for bit; under e3m7 the bytes of each direction are the compressed or the
float32 messages, to the byte, as the ``both`` and float32 runs recorded
them; and the clients' parameters stay float32.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml
from test_federated_recipe import TINY
from test_federated_server import CLIENTS, OMC, _model, honest_reply
from test_lossless_recipes import MAX_GRAD_NORM, assert_same_bits

from speechbrain_omc import OMCBrain, OMCConfig
from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.client import OMCClient
from speechbrain_omc.federated.server import FedAvgServer, UpdateRejected

BUFFERS = ["norm.running_mean"]


def _server(mode: str, **kwargs) -> FedAvgServer:
    return FedAvgServer(
        _model(),
        CLIENTS,
        clients_per_round=3,
        omc=OMC,
        seed=7,
        buffers=BUFFERS,
        max_examples=10,
        wire_mode=mode,
        **kwargs,
    )


def _float32_reply(data: bytes) -> bytes:
    """An honest reply with every entry in float32."""
    received = wire.decode(data)
    plain = wire.Message(received.decompressed(), received.meta).to_bytes()
    return honest_reply(plain)


def _compressed_reply(server: FedAvgServer, data: bytes) -> bytes:
    """An honest reply in the round's plan formats (as under ``both``)."""
    received = wire.decode(data)
    plan = server.formats(received.meta["round"], received.meta["client"])
    entries = {
        name: value
        if plan[name] == "float32"
        else CompressedTensor.compress(value, plan[name])
        for name, value in received.decompressed().items()
    }
    return honest_reply(wire.Message(entries, received.meta).to_bytes())


@pytest.mark.parametrize("mode", ["both", "download", "upload"])
def test_each_mode_broadcasts_and_accepts_its_forms(mode):
    server = _server(mode)
    messages = server.configure_round()
    compressed_down = mode in ("both", "download")
    for client, data in messages.items():
        plan = server.formats(1, client)
        assert "e3m7" in plan.values()
        sent = wire.decode(data).formats()
        assert sent == (plan if compressed_down else dict.fromkeys(plan, "float32"))
    make = _float32_reply if mode == "download" else _compressed_reply
    replies = {
        c: (make(d) if mode == "download" else make(server, d))
        for c, d in messages.items()
    }
    report = server.aggregate(replies)
    assert report.accepted == sorted(messages) and not report.rejected
    # Bytes are the messages' lengths, whatever the mode.
    assert report.bytes_down == sum(len(d) for d in messages.values())
    assert report.bytes_up == sum(len(r) for r in replies.values())
    assert (report.bytes_down < report.float32_bytes_down) == compressed_down
    assert (report.bytes_up < report.float32_bytes_up) == (mode != "download")


def _reply(server: FedAvgServer, data: bytes, compressed: bool) -> bytes:
    return _compressed_reply(server, data) if compressed else _float32_reply(data)


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("download", "arrived compressed, expected float32"),
        ("upload", "arrived as float32, expected e3m7"),
        ("both", "arrived as float32, expected e3m7"),
    ],
)
def test_a_reply_in_the_wrong_form_for_the_mode_is_rejected(mode, reason):
    server = _server(mode)
    messages = server.configure_round()
    bad = sorted(messages)[0]
    right = mode != "download"  # whether the mode's replies are compressed
    replies = {c: _reply(server, d, right != (c == bad)) for c, d in messages.items()}
    with pytest.raises(UpdateRejected, match=reason):
        server.validate(bad, replies[bad])
    report = server.aggregate(replies)
    assert report.accepted == sorted(messages)[1:]
    assert reason in report.rejected[bad]


def test_the_mode_is_checked_and_a_checkpoint_must_match_it(tmp_path):
    with pytest.raises(ValueError, match="omc_wire must be one of"):
        _server("sideways")
    with pytest.raises(ValueError, match="needs OMC settings"):
        FedAvgServer(_model(), CLIENTS, 3, omc=None, wire_mode="upload")
    # The default leaves the settings as they were (older checkpoints resume).
    assert "wire_mode" not in _server("both").settings()
    assert _server("download").settings()["wire_mode"] == "download"
    path = tmp_path / "server.ckpt"
    _server("download").save(path)
    with pytest.raises(Exception, match="wire_mode"):
        _server("upload").load(path)


class _Regressor(OMCBrain):
    def compute_forward(self, batch, stage):
        return self.modules.lin(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])


def _client(mode: str, omc: OMCConfig) -> OMCClient:
    torch.manual_seed(0)
    brain = _Regressor(
        modules={"lin": torch.nn.Linear(8, 8)},
        opt_class=lambda params: torch.optim.SGD(params, lr=0.1),
        hparams={"omc": omc},
    )
    data = [(torch.randn(8), torch.zeros(8)) for _ in range(8)]
    return OMCClient(
        brain,
        {"a": data, "b": data},
        train_loader_kwargs={"batch_size": 4},
        wire_mode=mode,
    )


@pytest.mark.parametrize("mode", ["download", "upload"])
def test_the_client_trains_float32_and_replies_in_its_mode(mode):
    omc = OMCConfig(format="e3m7", fp32_fraction=0.0)
    client = _client(mode, omc)
    server = FedAvgServer(
        client.get_model(),
        ["a", "b"],
        2,
        omc=omc,
        roles=client.parameter_roles(),
        wire_mode=mode,
    )
    messages = server.configure_round()
    replies = {c: client.train(m) for c, m in messages.items()}
    # Trained in float32: no compressed parameter on the client.
    assert client.brain.omc is None or not client.brain.omc.slots
    for c, reply in replies.items():
        formats = wire.decode(reply).formats()
        if mode == "download":
            assert set(formats.values()) == {"float32"}
        else:
            assert (
                formats
                == server.formats(1, c)
                == {
                    "lin.weight": "e3m7",
                    "lin.bias": "float32",
                }
            )
    report = server.aggregate(replies)
    assert report.accepted == ["a", "b"]
    with pytest.raises(ValueError, match="needs OMC settings"):
        _client(mode, None)


# ------------------------------------------------------- the federated recipe
def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny federations, 2 rounds, clipping that bites (see
    test_lossless_recipes): float32, and OMC's plan on both, one or the
    other direction, under e3m7 and under the lossless fp32."""
    from speechbrain_omc.asr import HPARAMS_DIR, run_federation

    root = tmp_path_factory.mktemp("directions")
    common = {
        **TINY,
        "rounds": 2,
        "eval_every": 1000,
        "test_split": "dev",
        "max_grad_norm": MAX_GRAD_NORM,
    }
    cases = {
        "float32": ("fed_fp32.yaml", {}),
        "both": ("fed_omc.yaml", {}),
        "download": ("fed_omc.yaml", {"omc_wire": "download"}),
        "upload": ("fed_omc.yaml", {"omc_wire": "upload"}),
        "fp32_download": (
            "fed_omc.yaml",
            {"omc_format": "fp32", "omc_wire": "download"},
        ),
        "fp32_upload": ("fed_omc.yaml", {"omc_format": "fp32", "omc_wire": "upload"}),
    }
    out = {}
    for name, (file, extra) in cases.items():
        folder = root / name
        with open(HPARAMS_DIR / file, encoding="utf-8") as f:
            hparams = load_hyperpyyaml(
                f, {**common, **extra, "output_folder": str(folder)}
            )
        hparams["noprogressbar"] = True
        summary = run_federation(hparams)
        model = torch.load(folder / "final_model.pt", weights_only=True)
        out[name] = (summary, model, _rows(folder / "rounds.csv"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["download", "upload"])
def test_one_direction_under_fp32_trains_what_float32_trains(runs, mode):
    f32, f32_model, f32_rows = runs["float32"]
    summary, model, rows = runs[f"fp32_{mode}"]
    assert summary["omc"]["format"] == "fp32" and summary["omc_wire"] == mode
    assert list(model) == list(f32_model)
    for name, value in f32_model.items():
        assert_same_bits(model[name], value, name)
    for key in ("test_WER", "test_CER", "test_loss", "valid_WER"):
        assert summary[key] == f32[key], key
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in f32_rows]
    # Not vacuous: one direction carried compressed entries (a header each).
    way = "down" if mode == "download" else "up"
    for row in rows:
        assert int(row[f"bytes_{way}"]) > int(row[f"float32_bytes_{way}"])


@pytest.mark.slow
def test_one_direction_sends_the_compressed_bytes_of_that_direction(runs):
    float32, both = runs["float32"][2], runs["both"][2]
    download, upload = runs["download"][2], runs["upload"][2]
    for r32, rboth, rdown, rup in zip(float32, both, download, upload, strict=True):
        # Download only: the broadcasts of OMC, to the byte; float32 replies.
        assert int(rdown["bytes_down"]) == int(rboth["bytes_down"])
        assert int(rdown["bytes_up"]) == int(rdown["float32_bytes_up"])
        # Upload only: the broadcasts of float32, to the byte; replies that
        # save what OMC's save (the same plans, the same payload sizes).
        assert int(rup["bytes_down"]) == int(r32["bytes_down"])
        assert int(rup["bytes_down"]) == int(rup["float32_bytes_down"])
        saved = int(rboth["float32_bytes_up"]) - int(rboth["bytes_up"])
        assert saved > 0
        assert int(rup["float32_bytes_up"]) - int(rup["bytes_up"]) == saved
        assert int(rdown["float32_bytes_down"]) == int(r32["bytes_down"])
    # Summaries add up the rounds; the clients held float32 parameters.
    for name in ("download", "upload"):
        summary, rows = runs[name][0], runs[name][2]
        assert summary["omc_wire"] == name
        assert summary["bytes_total"] == sum(
            int(r["bytes_down"]) + int(r["bytes_up"]) for r in rows
        )
        assert summary["parameter_bytes"] == summary["float32_parameter_bytes"]
    assert (
        runs["both"][0]["parameter_bytes"] < runs["both"][0]["float32_parameter_bytes"]
    )
