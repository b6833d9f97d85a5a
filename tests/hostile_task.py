"""A task module for the Flower app whose clients 001 and 002 are hostile.

Named by the run config's ``task`` in a test (see
test_flower_deployment.py): it is :mod:`speechbrain_omc.asr` with
``OMCClient.train`` changed, in the process that imports it, so that
``client_001`` answers with a lone surrogate as its ``round`` and
``client_002`` with FLT_MAX in every value (in the form received). Every
other client, and everything else, is the real task's.
"""

import torch

from speechbrain_omc.asr import *  # noqa: F403 - the task's functions
from speechbrain_omc.asr import __all__  # noqa: F401
from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.federated import client as _client
from speechbrain_omc.federated import wire

_honest_train = _client.OMCClient.train


def _hostile_train(self, data):
    reply = wire.decode(_honest_train(self, data))
    client = reply.meta["client"]
    if client == "client_001":
        return wire.encode(reply.entries, {**reply.meta, "round": "\udcff"})
    if client == "client_002":
        big = torch.finfo(torch.float32).max
        entries = {}
        for name, value in reply.entries.items():
            if isinstance(value, CompressedTensor):
                full = torch.full(tuple(value.shape), big)
                entries[name] = CompressedTensor.compress(full, value.format)
            else:
                entries[name] = torch.full_like(value, big)
        return wire.encode(entries, reply.meta)
    return wire.encode(reply.entries, reply.meta)


_client.OMCClient.train = _hostile_train
