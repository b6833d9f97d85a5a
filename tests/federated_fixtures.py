"""Small models, servers and replies shared by the federated server's tests."""

from __future__ import annotations

import torch

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.server import FedAvgServer

CLIENTS = ["c0", "c1", "c2", "c3"]
OMC = OMCConfig(format="e3m7", fp32_fraction=0.4, fp32_policy="random", seed=3)
#: The shapes of :func:`small_model`'s weights (the first has a bias).
SHAPES = ((16, 8), (16, 16), (4, 16))


def small_model(shapes=SHAPES, seed: int = 0, names=None) -> dict:
    """Weights (``layer1``, ``layer2``... unless named), a bias on the first
    and a running mean after the last, drawn from ``seed``."""
    names = names or [f"layer{i}" for i in range(1, len(shapes) + 1)]
    gen = torch.Generator().manual_seed(seed)
    model = {}
    for i, (name, shape) in enumerate(zip(names, shapes)):
        model[f"{name}.weight"] = torch.randn(shape, generator=gen)
        if i == 0:
            model[f"{name}.bias"] = torch.randn(shape[0], generator=gen)
    model["norm.running_mean"] = torch.zeros(shapes[-1][0])
    return model


def small_server(model=None, clients=CLIENTS, **settings) -> FedAvgServer:
    """A server of :func:`small_model` (3 of 4 clients, ``OMC``, seed 7,
    ``max_examples`` 10), any setting overridden."""
    defaults = dict(
        clients_per_round=3,
        omc=OMC,
        seed=7,
        buffers=["norm.running_mean"],
        max_examples=10,
    )
    return FedAvgServer(model or small_model(), clients, **{**defaults, **settings})


def shifted(received: wire.Message, shift: float) -> dict:
    """Every value of a broadcast plus ``shift``, in the form received."""
    out = {}
    for name, value in received.entries.items():
        if isinstance(value, CompressedTensor):
            new = value.decompress() + shift
            out[name] = CompressedTensor.compress(new, value.format)
        else:
            out[name] = value + shift
    return out


def reply_meta(received: wire.Message, num_examples: int, **changes) -> dict:
    """A reply's metadata, bound to the broadcast, with ``changes``."""
    meta = {k: received.meta[k] for k in ("round", "client", "run", "nonce")}
    meta.update(type="update", num_examples=num_examples)
    meta.update(changes)
    return meta


def shifted_reply(data, shift=1.0, num_examples=10, **changes) -> bytes:
    """What a well-behaved client sends: every value + shift, in kind."""
    received = wire.decode(data)
    meta = reply_meta(received, num_examples, **changes)
    return wire.encode(shifted(received, shift), meta)


def pinned_fold(replies: dict, order=None) -> dict:
    """The server's fold, pinned: a running weighted mean in ``order``
    (sorted ids by default), ``m <- m * (1 - w / W) + x * (w / W)`` with
    ``W`` the weights so far."""
    out, total = {}, 0
    for client in order or sorted(replies):
        message = wire.decode(replies[client])
        weight = message.meta["num_examples"]
        total += weight
        share = weight / total
        for name, value in message.decompressed().items():
            if name not in out:
                out[name] = value.clone()
            else:
                out[name].mul_(1.0 - share).add_(value, alpha=share)
    return out
