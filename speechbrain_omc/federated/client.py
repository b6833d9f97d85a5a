"""Federated OMC client: drives one SpeechBrain Brain, speaks wire messages.

One :class:`OMCClient` owns one Brain (with :class:`~speechbrain_omc.OMCMixin`)
and reuses it for every round and client id. A round is
:meth:`OMCClient.train`: bytes in, bytes out. The message is the plan
(exactly its compressed entries go under OMC), and every draw is seeded from
the message, so a round depends on its message only. A bad message leaves the
Brain usable by the next one. See docs/federated_server.md.

Example
-------
>>> import torch
>>> from speechbrain_omc import OMCBrain, OMCConfig
>>> from speechbrain_omc.federated import wire
>>> from speechbrain_omc.federated.server import FedAvgServer
>>> class Regressor(OMCBrain):
...     def compute_forward(self, batch, stage):
...         return self.modules.lin(batch[0])
...     def compute_objectives(self, predictions, batch, stage):
...         return torch.nn.functional.mse_loss(predictions, batch[1])
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> brain = Regressor(
...     modules={"lin": torch.nn.Linear(8, 8)},
...     opt_class=lambda params: torch.optim.SGD(params, lr=0.1),
...     hparams={"omc": OMCConfig(format="e3m7")},
... )
>>> data = [(torch.randn(8), torch.zeros(8)) for _ in range(16)]
>>> client = OMCClient(brain, {"a": data, "b": data},
...                    train_loader_kwargs={"batch_size": 4})
>>> server = FedAvgServer(client.get_model(), ["a", "b"], clients_per_round=2,
...                       omc=OMCConfig(format="e3m7"),
...                       roles=client.parameter_roles())
>>> messages = server.configure_round()
>>> replies = {c: client.train(m) for c, m in messages.items()}
>>> wire.decode(replies["a"]).formats()
{'lin.weight': 'e3m7', 'lin.bias': 'float32'}
>>> report = server.aggregate(replies)
>>> report.accepted, report.bytes_up == sum(len(r) for r in replies.values())
(['a', 'b'], True)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import speechbrain as sb
import torch
from speechbrain.dataio.sampler import ReproducibleRandomSampler

from speechbrain_omc.codec.compressed import CompressedTensor
from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.handle import OMCHandle, compress_module
from speechbrain_omc.engine.parameter import CompressedParameter
from speechbrain_omc.engine.selection import Plan, PlanEntry, parameter_roles
from speechbrain_omc.federated import wire
from speechbrain_omc.federated.directions import (
    check_wire_mode,
    compress_entries,
    decompressed_message,
    module_formats,
)

logger = logging.getLogger(__name__)

__all__ = ["OMCClient", "seed_everything"]

# Modules whose buffers training changes (running mean and variance).
_RUNNING_STATS = (torch.nn.modules.batchnorm._NormBase,)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators.

    Arguments
    ---------
    seed : int
        Any non-negative integer.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**63)


def _hook_keys(modules: torch.nn.Module) -> set[tuple[int, int]]:
    # The state-dict hooks there are now (an OMC handle registers them).
    return {
        (id(module), key)
        for module in modules.modules()
        for table in (module._state_dict_hooks, module._load_state_dict_pre_hooks)
        for key in table
    }


def _finite_or_none(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


class OMCClient:
    """A federated client around one Brain, reused across rounds.

    Arguments
    ---------
    brain : sb.Brain
        A Brain with :class:`~speechbrain_omc.OMCMixin`; ``hparams["omc"]``
        gives the update settings, each message the plan.
    train_data : mapping, callable or dataset
        ``{client_id: dataset}``, a function of the client id, or one dataset.
    local_epochs : int
        Epochs per round, unless the server's ``config`` says otherwise.
    max_steps : int, optional
        Cap on optimizer steps per round.
    train_loader_kwargs : mapping, optional
        Passed to ``Brain.make_dataloader`` (``shuffle`` is seeded per round).
    progressbar : bool
    buffers : str
        Which floating-point buffers travel: ``"running_stats"``, ``"all"`` or
        ``"none"``.
    wire_mode : str
        The server's: ``"both"``, ``"download"`` or ``"upload"``.
    """

    def __init__(
        self,
        brain: sb.Brain,
        train_data,
        local_epochs: int = 1,
        max_steps: int | None = None,
        train_loader_kwargs: Mapping | None = None,
        progressbar: bool = False,
        buffers: str = "running_stats",
        wire_mode: str = "both",
    ) -> None:
        if buffers not in ("running_stats", "all", "none"):
            raise ValueError(f"buffers must be running_stats, all or none: {buffers!r}")
        if not hasattr(brain, "omc_config"):
            raise TypeError("OMCClient needs a Brain with speechbrain_omc.OMCMixin")
        if brain.checkpointer is not None:
            logger.info(
                "OMCClient: detaching the Brain's checkpointer so that no local "
                "checkpoint is recovered over the received global model"
            )
            brain.checkpointer = None
        self.brain = brain
        self.train_data = train_data
        self.local_epochs = int(local_epochs)
        self.max_steps = max_steps
        self.train_loader_kwargs = dict(train_loader_kwargs or {})
        self.progressbar = progressbar
        self.buffers = buffers
        self.wire_mode = check_wire_mode(wire_mode, brain.omc_config)
        self._names: list[str] | None = None
        self._buffer_names: set[str] | None = None

    # ----------------------------------------------------------- the model
    def _buffers(self) -> dict[str, torch.Tensor]:
        modules = self.brain.modules
        if self._buffer_names is None:
            # Once: state_dict() serialises every compressed parameter.
            state_keys = set(modules.state_dict(keep_vars=True))
            owners = dict(modules.named_modules())
            self._buffer_names = {
                name
                for name, buf in modules.named_buffers()
                if self.buffers != "none"
                and buf.is_floating_point()
                and name in state_keys
                and (
                    self.buffers == "all"
                    or isinstance(owners[name.rpartition(".")[0]], _RUNNING_STATS)
                )
            }
        return {
            name: buf
            for name, buf in modules.named_buffers()
            if name in self._buffer_names
        }

    def _params(self) -> dict[str, torch.Tensor]:
        return dict(self.brain.modules.named_parameters())

    def _slots(self) -> dict:
        return self.brain.omc.slots if self.brain.omc is not None else {}

    def entry_names(self) -> list[str]:
        """Names of the model's entries (tied weights once), in wire order."""
        if self._names is None:
            keys = self.brain.modules.state_dict(keep_vars=True)
            wanted = set(self._params()) | set(self._slots()) | set(self._buffers())
            self._names = [k for k in keys if k in wanted]
        return list(self._names)

    def buffer_names(self) -> list[str]:
        """The entries that are buffers, not parameters (never compressed)."""
        buffers = self._buffers()
        return [n for n in self.entry_names() if n in buffers]

    def parameter_roles(self) -> dict[str, str]:
        """The role of every parameter entry, for the server's plans."""
        return parameter_roles(self.brain.modules)

    def get_model(self) -> dict[str, torch.Tensor]:
        """The current model in float32, in :meth:`entry_names` order."""
        slots, params, buffers = self._slots(), self._params(), self._buffers()
        out = {}
        for name in self.entry_names():
            if name in slots:
                out[name] = slots[name].codes.decompress()
            else:
                value = params.get(name, buffers.get(name))
                out[name] = value.detach().to("cpu", torch.float32).clone()
        return out

    def entries(self) -> dict[str, wire.Entry]:
        """The current model as wire entries: compressed payloads stay so."""
        slots, params, buffers = self._slots(), self._params(), self._buffers()
        out = {}
        for name in self.entry_names():
            if name in slots:
                out[name] = slots[name].codes
            else:
                out[name] = params.get(name, buffers.get(name)).detach()
        return out

    def load(self, message: wire.Message, seed: int = 0) -> None:
        """Put the Brain's modules under the message's plan and load its values.

        Arguments
        ---------
        message : wire.Message
            A decoded global model.
        seed : int
            Seed of the OMC update state (stochastic rounding).

        Raises
        ------
        ValueError
            The entries do not match the model, or are not finite (nothing loaded).
        """
        names = self.entry_names()
        missing = [n for n in names if n not in message.entries]
        extra = [n for n in message.entries if n not in names]
        if missing or extra:
            raise ValueError(
                "the message does not match the Brain's model: missing "
                f"{missing[:5]}, unexpected {extra[:5]}"
            )
        for name, value in message.entries.items():
            if isinstance(value, torch.Tensor):
                bad = int((~torch.isfinite(value)).sum())
                if bad:
                    raise ValueError(
                        f"{name} has {bad} non-finite values: the message is refused"
                    )
        buffer_names = set(self.buffer_names())
        wanted = {
            name: value.format.name
            for name, value in message.entries.items()
            if isinstance(value, CompressedTensor)
        }
        bad = sorted(buffer_names & set(wanted))
        if bad:
            raise ValueError(f"buffers cannot be compressed: {bad[:5]}")
        self._apply_plan(message, wanted, seed)
        slots, params, buffers = self._slots(), self._params(), self._buffers()
        with torch.no_grad():
            for name, value in message.entries.items():
                if name in slots:
                    self.brain.omc.load_value(name, value.to_bytes())
                else:
                    target = params.get(name, buffers.get(name))
                    if tuple(target.shape) != tuple(value.shape):
                        raise ValueError(
                            f"{name}: shape {tuple(value.shape)} does not match "
                            f"the model's {tuple(target.shape)}"
                        )
                    target.copy_(value)

    def _apply_plan(self, message: wire.Message, wanted: dict, seed: int) -> None:
        brain = self.brain
        base = brain.omc_config
        if base is None and wanted:
            # A float32 Brain receiving compressed entries: default settings.
            base = OMCConfig()
        current = {n: s.codes.format.name for n, s in self._slots().items()}
        if brain.omc is not None and current == wanted:
            # Same plan: restart the update state, reseed stochastic rounding.
            brain.omc.reset_state(seed)
            return
        if brain.omc is not None:
            brain.omc.restore()
            brain.omc = None
        if base is None:
            return  # float32 federation, float32 Brain
        params = self._params()
        with torch.no_grad():
            for name in wanted:
                # Replaced by the payload next; compression refuses non-finite
                # values (a diverged local training).
                if not bool(torch.isfinite(params[name]).all()):
                    params[name].zero_()
        plan = _server_plan(params, self.parameter_roles(), message, wanted)
        # An empty plan still installs a handle, so that the Brain does not
        # compress under its own plan at fit start.
        brain.omc = compress_module(brain.modules, replace(base, seed=seed), plan=plan)

    # ------------------------------------------------- one-direction modes
    def _arrived(self, message: wire.Message) -> wire.Message:
        # Outside the default, training is float32: nothing goes under OMC.
        if self.wire_mode == "both":
            return message
        return decompressed_message(message)

    def _reply_entries(self, round: int, client: str) -> dict[str, wire.Entry]:
        entries = self.entries()
        if self.wire_mode != "upload":
            return entries
        config = self.brain.omc_config
        plan = module_formats(self.brain.modules, entries, config, round, client)
        return compress_entries(entries, plan, config)

    # ------------------------------------------------------------ training
    def _dataset(self, client: str):
        data = self.train_data
        if isinstance(data, Mapping):
            if client not in data:
                raise KeyError(f"no training data for client {client!r}")
            return data[client]
        if callable(data) and not hasattr(data, "__getitem__"):
            return data(client)
        return data

    @contextmanager
    def _recovering(self) -> Iterator[None]:
        # Undo what a failed message left half done (see docs/federated_server.md).
        brain = self.brain
        sampler, limit = brain.train_sampler, brain.optimizer_step_limit
        hooks = _hook_keys(brain.modules)
        try:
            yield
        except BaseException:
            brain.train_sampler, brain.optimizer_step_limit = sampler, limit
            if not _omc_consistent(brain):
                logger.warning(
                    "the message failed with the modules half under OMC; they "
                    "are taken out of it (the next message installs its plan)"
                )
                _out_of_omc(brain, hooks)
            raise

    def train(self, data: bytes) -> bytes:
        """One round: load the global model, train locally, encode the reply.

        Arguments
        ---------
        data : bytes
            The server's message.

        Returns
        -------
        bytes
        """
        with self._recovering():
            return self._train(data)

    def _train(self, data: bytes) -> bytes:
        message = wire.decode(data)
        meta = message.meta
        if meta.get("type") != "global":
            raise ValueError(f"expected a global model, got type {meta.get('type')!r}")
        client, round_, seed = str(meta["client"]), meta["round"], int(meta["seed"])
        config = meta.get("config", {})
        seed_everything(seed)
        self.load(self._arrived(message), seed=seed)
        dataset = self._dataset(client)
        epochs = int(config.get("local_epochs", self.local_epochs))
        max_steps = config.get("max_steps", self.max_steps)
        loader_kwargs = dict(self.train_loader_kwargs)
        brain = self.brain
        brain.train_sampler = None
        if loader_kwargs.pop("shuffle", False):
            sampler = ReproducibleRandomSampler(dataset, seed=seed % 2**31)
            loader_kwargs["sampler"] = brain.train_sampler = sampler
        stage_losses: dict = {}
        limit = brain.optimizer_step_limit
        brain.optimizer_step = 0
        brain.optimizer_step_limit = max_steps
        try:
            with _capture_stage_loss(brain, stage_losses):
                brain.fit(
                    range(1, epochs + 1),
                    dataset,
                    progressbar=self.progressbar,
                    train_loader_kwargs=loader_kwargs,
                )
        finally:
            brain.optimizer_step_limit = limit
        # No timings in the reply: its bytes must depend on the round only,
        # so that runs (and their byte counts) are reproducible.
        metrics = {
            "train_loss": _finite_or_none(stage_losses.get(sb.Stage.TRAIN)),
            "steps": int(brain.optimizer_step),
        }
        if brain.omc is not None:
            metrics["skipped_updates"] = int(brain.omc.skipped_updates)
        reply = {
            "type": "update",
            "round": round_,
            "client": client,
            "num_examples": len(dataset),
            "metrics": metrics,
        }
        # The reply is bound to the broadcast it answers: echo the run's id
        # and the nonce (the server refuses a reply without them).
        for key in ("run", "nonce"):
            if key in meta:
                reply[key] = meta[key]
        return wire.encode(self._reply_entries(round_, client), reply)

    def evaluate(
        self,
        data: bytes,
        dataset,
        loader_kwargs: Mapping | None = None,
    ) -> dict:
        """Load a global model and evaluate it on ``dataset`` (TEST stage).

        Arguments
        ---------
        data : bytes
        dataset : Dataset or DataLoader
        loader_kwargs : mapping, optional

        Returns
        -------
        dict
            ``loss`` plus whatever the Brain left in ``stage_stats``.
        """
        with self._recovering():
            return self._evaluate(data, dataset, loader_kwargs)

    def _evaluate(self, data: bytes, dataset, loader_kwargs: Mapping | None) -> dict:
        message = self._arrived(wire.decode(data))
        self.load(message, seed=int(message.meta.get("seed", 0)))
        self.brain.stage_stats = {}
        loss = self.brain.evaluate(
            dataset,
            progressbar=self.progressbar,
            test_loader_kwargs=dict(loader_kwargs or {}),
        )
        stats = dict(getattr(self.brain, "stage_stats", None) or {})
        stats.setdefault("loss", _finite_or_none(loss))
        return stats


def _server_plan(
    params: Mapping[str, torch.Tensor],
    roles: Mapping[str, str],
    message: wire.Message,
    wanted: Mapping[str, str],
) -> Plan:
    # The message's plan, as the engine takes it: the server decided (its
    # reasons are its own, the log says so rather than guessing them).
    entries = []
    for name, param in params.items():
        shape, role = tuple(param.shape), roles[name]
        if name in wanted:
            nbytes = message.entries[name].nbytes
            entries.append(
                PlanEntry(name, shape, wanted[name], nbytes, role, "server plan")
            )
        else:
            entries.append(
                PlanEntry(name, shape, None, 4 * param.numel(), role, "server plan")
            )
    return Plan(tuple(entries))


@contextmanager
def _capture_stage_loss(brain: sb.Brain, store: dict) -> Iterator[None]:
    # Each stage's loss, as on_stage_end receives it, into `store`.
    own = brain.__dict__.get("on_stage_end")
    original = brain.on_stage_end

    def on_stage_end(stage, stage_loss, epoch=None):
        store[stage] = stage_loss
        return original(stage, stage_loss, epoch)

    brain.on_stage_end = on_stage_end
    try:
        yield
    finally:
        if own is None:
            del brain.on_stage_end  # the class method shows through again
        else:
            brain.on_stage_end = own


def _omc_consistent(brain: sb.Brain) -> bool:
    # Every compressed parameter is the current handle's, which owns the
    # modules (or there is neither).
    modules, handle = brain.modules, brain.omc
    owner = modules.__dict__.get("_omc_handle")
    found = {
        id(p): p
        for m in modules.modules()
        for p in m._parameters.values()
        if isinstance(p, CompressedParameter)
    }
    if handle is None:
        return owner is None and not found
    ours = {id(p) for p in handle.parameters().values()}
    return owner is handle and set(found) == ours


def _out_of_omc(brain: sb.Brain, hooks: set) -> None:
    # Every parameter float32 again, no handle, the failed attempt's hooks
    # removed.
    modules = brain.modules
    owner = modules.__dict__.get("_omc_handle")
    for handle in (brain.omc, owner if owner is not brain.omc else None):
        if handle is not None:
            handle.restore()
    # Compressed parameters of a handle that was never returned: a blank
    # handle's restore() brings every one back to float32.
    OMCHandle(modules, brain.omc_config or OMCConfig(), Plan(())).restore()
    brain.omc = None
    for module in modules.modules():  # hooks the failed attempt added
        for table in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
            for key in list(table):
                if (id(module), key) not in hooks:
                    del table[key]
