"""What a federated server sends, and what it expects back.

Every draw is a seeded function of ``(seed, round, client)``: the clients of
a round, each client's plan and its RNG seed. The server has shapes, not
modules: the parameters' roles come from whoever built the model, so that
its plans equal those :func:`~speechbrain_omc.engine.selection.make_plan`
gives on the model itself. The message is the plan: a client answers each
entry in the form it received (see :mod:`~speechbrain_omc.federated.directions`)
and echoes the run's id and its round's nonce, which bind its reply.

Example
-------
>>> from speechbrain_omc.federated.server_state import ServerState
>>> state = ServerState({"w": torch.ones(4, 4)}, run_id="run")
>>> planner = Planner(state, ["a", "b", "c"], 2, omc=OMCConfig(format="e3m7"))
>>> planner.sample_clients(1) == planner.sample_clients(1)
True
>>> planner.formats(1, "a")
{'w': 'e3m7'}
>>> wire.decode(planner.message("a", 1)[0]).meta["nonce"] == planner.nonce(1, "a")
True
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import torch

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.selection import (
    make_plan,
    resolve_roles,
    role_of,
    round_seed,
)
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.directions import (
    check_wire_mode,
    first_compression,
    wire_formats,
)
from speechbrain_omc.federated.server_state import ServerState
from speechbrain_omc.federated.validation import (
    MAX_EXAMPLES,
    ReplyExpectation,
    is_int,
)

__all__ = ["Planner"]


class Planner:
    """Sampling, plans, seeds, nonces and the round's compressed broadcast.

    Arguments
    ---------
    state : ServerState
        The server's state (its model is what is sent).
    clients : sequence of str
    clients_per_round : int
    omc : OMCConfig, optional
        ``None`` sends float32.
    seed : int
    roles : mapping, optional
        Parameter name to role; names left out are inferred.
    wire_mode : str
    client_config : mapping, optional
    max_examples : int or mapping, optional
        As in :class:`~speechbrain_omc.federated.server.FedAvgServer`.
    """

    def __init__(
        self,
        state: ServerState,
        clients: Sequence[str],
        clients_per_round: int,
        omc: OMCConfig | None = None,
        seed: int = 0,
        roles: Mapping[str, str] | None = None,
        wire_mode: str = "both",
        client_config: Mapping | None = None,
        max_examples: int | Mapping[str, int] | None = None,
    ) -> None:
        clients = _checked_clients(clients, clients_per_round)
        if roles is not None and not isinstance(roles, Mapping):
            raise TypeError(f"FedAvgServer: roles must be a mapping, got {roles!r}")
        wrong = sorted(state.buffers & set(roles or {}))
        if wrong:
            raise ValueError(f"FedAvgServer: buffers have no role: {wrong[:5]}")
        self.state = state
        # Checked now (unknown names or roles), not at the first broadcast.
        self.roles = resolve_roles(state.shapes(), roles)
        self.clients = clients
        self.clients_per_round = int(clients_per_round)
        self.omc = omc
        self.wire_mode = check_wire_mode(wire_mode, omc)
        self.seed = int(seed)
        self.client_config = dict(client_config or {})
        self.max_examples = _bounds(max_examples, clients)
        # Never kept by a checkpoint: the nonces of a round done again after
        # a resume differ, and late replies to the lost broadcast are refused.
        self._nonce_key = secrets.token_bytes(32)
        # (round, name, format) -> the compressed entry and its expectation;
        # (round, name, "reach") -> a float32 entry's largest magnitude.
        self.cache: dict[tuple, tuple[CompressedTensor, wire.Expected] | float] = {}
        self._float32_expected = wire.expect_like(state.model)

    def sample_clients(self, round: int) -> list[str]:
        """The clients of ``round``, in sampled order (a seeded draw)."""
        rng = random.Random(round_seed(self.seed, round, "sample"))
        return rng.sample(self.clients, self.clients_per_round)

    def formats(self, round: int, client: str) -> dict[str, str]:
        """One client's plan in one round: entry name to ``"float32"`` or a format."""
        out = dict.fromkeys(self.state.model, "float32")
        if self.omc is None:
            return out
        plan = make_plan(
            self.state.shapes(), self.omc, round=round, client=client, roles=self.roles
        )
        for entry in plan.compressed:
            out[entry.name] = entry.format
        return out

    def client_seed(self, round: int, client: str) -> int:
        """Seed of a client's randomness in a round (data order, dropout...)."""
        return round_seed(self.seed, round, f"client:{client}")

    def nonce(self, round: int, client: str) -> str:
        """The nonce a reply of ``client`` in ``round`` must echo (32 hex).

        Keyed by a secret of this server's process: no client can forge another
        round's.
        """
        text = f"{self.state.run_id}/{round}/{client}".encode()
        return hmac.new(self._nonce_key, text, hashlib.sha256).hexdigest()[:32]

    def settings(self) -> dict:
        """What of the planner a resumed run must match.

        Roles only where names and shapes would not give them, the wire mode only
        when not ``"both"``.
        """
        settings = {
            "clients": list(self.clients),
            "clients_per_round": self.clients_per_round,
            "seed": self.seed,
            "omc": None if self.omc is None else asdict(self.omc),
            "client_config": self.client_config,
            "max_examples": self.max_examples,
        }
        model = self.state.model
        roles = {
            name: role
            for name, role in self.roles.items()
            if role != role_of(name, model[name].shape)
        }
        if roles:  # other roles give other plans
            settings["roles"] = roles
        if self.wire_mode != "both":
            settings["wire_mode"] = self.wire_mode
        return settings

    def keep_round(self, round: int | None) -> None:
        """Drop the cached broadcasts of every other round (all: ``None``)."""
        self.cache = {k: v for k, v in self.cache.items() if k[0] == round}

    def message(self, client: str, round: int) -> tuple[bytes, dict, dict]:
        """The global model for one client: the message, its entries and metadata."""
        entries = {}
        for name, fmt in self._wire_formats(round, client, "down").items():
            if fmt == "float32":
                entries[name] = self.state.model[name]
            else:
                entries[name] = self._compressed(round, name, fmt)[0]
        meta = {
            "type": "global",
            "round": round,
            "client": client,
            "seed": self.client_seed(round, client),
            "config": self.client_config,
            "run": self.state.run_id,
            "nonce": self.nonce(round, client),
        }
        return wire.encode(entries, meta), entries, meta

    def expectation(self, round: int, client: str) -> ReplyExpectation:
        """What a reply of ``client`` in ``round`` must be (rebuilt per reply)."""
        expect, sent, reaches = {}, {}, {}
        for name, fmt in self._wire_formats(round, client, "up").items():
            if fmt == "float32":
                expect[name] = self._float32_expected[name]
                reaches[name] = self._reach(round, name)
            else:
                sent[name], expect[name] = self._compressed(round, name, fmt)
        return ReplyExpectation(
            self.state.run_id,
            round,
            client,
            self.nonce(round, client),
            MAX_EXAMPLES if self.max_examples is None else self.max_examples[client],
            expect,
            sent=sent,
            reaches=reaches,
        )

    def _wire_formats(self, round: int, client: str, way: str) -> dict[str, str]:
        # The plan, or float32 where the wire mode leaves that way float32.
        return wire_formats(self.formats(round, client), self.wire_mode, way)

    def _compressed(self, round: int, name: str, fmt: str):
        # One variable in one format is compressed once for all the round.
        key = (round, name, fmt)
        if key not in self.cache:
            value = first_compression(
                self.state.model[name], fmt, self.omc or OMCConfig()
            )
            self.cache[key] = (value, wire.expect_like({name: value})[name])
        return self.cache[key]

    def _reach(self, round: int, name: str) -> float:
        # The largest magnitude of a float32 entry as broadcast this round.
        key = (round, name, "reach")
        if key not in self.cache:
            value = self.state.model[name]
            low, high = torch.aminmax(value) if value.numel() else (0.0, 0.0)
            self.cache[key] = max(-float(low), float(high))
        return self.cache[key]


def _checked_clients(clients: Sequence[str], per_round: int) -> list[str]:
    if not clients:
        raise ValueError("FedAvgServer: no clients")
    clients = [str(c) for c in clients]
    if len(set(clients)) != len(clients):
        raise ValueError("FedAvgServer: duplicate client ids")
    if not 1 <= int(per_round) <= len(clients):
        raise ValueError(
            f"FedAvgServer: clients_per_round={per_round} must be "
            f"between 1 and the {len(clients)} clients"
        )
    return clients


def _bounds(max_examples, clients: list[str]) -> dict[str, int] | None:
    if max_examples is None:
        return None  # every client weighs the same
    if isinstance(max_examples, Mapping):
        bounds = {str(c): max_examples.get(c) for c in clients}
        missing = [c for c, b in bounds.items() if b is None]
        if missing:
            raise ValueError(f"FedAvgServer: no max_examples for {missing[:5]}")
    else:
        bounds = dict.fromkeys(clients, max_examples)
    for client, bound in bounds.items():
        if not is_int(bound) or not 1 <= bound <= MAX_EXAMPLES:
            raise ValueError(
                f"FedAvgServer: max_examples of {client} must be an integer "
                f"in [1, 2**53], got {bound!r}"
            )
    return bounds
