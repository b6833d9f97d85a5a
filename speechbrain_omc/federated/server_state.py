"""What a federated server keeps between rounds, and its checkpoints.

The global model is kept in float32, so that the rounding of each broadcast
does not accumulate over rounds; :meth:`ServerState.state_dict` holds all
that a resumed run needs.

Example
-------
>>> state = ServerState({"w": torch.zeros(2)})
>>> state.apply({"w": torch.ones(2)}, round=1), state.model["w"]
(True, tensor([1., 1.]))
>>> state.apply({"w": torch.full((2,), float("nan"))}, round=2), state.model["w"]
(False, tensor([1., 1.]))
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from speechbrain_omc.federated.checkpoint import (
    CheckpointMismatch,
    CheckpointStore,
    diff_settings,
)
from speechbrain_omc.federated.defence import check_carried
from speechbrain_omc.federated.server_optimizer import ServerOptimizer, adaptive_step
from speechbrain_omc.federated.validation import is_int, nonfinite

logger = logging.getLogger(__name__)

__all__ = [
    "STATE_VERSION",
    "ServerState",
    "load_checkpoint",
    "save_checkpoint",
    "saved_clients",
]

STATE_VERSION = 2


class ServerState:
    """The global model, the server optimizer and what a checkpoint restores.

    Arguments
    ---------
    model : mapping
        Initial global model (copied in float32).
    buffers : iterable of str
        Entries that are not parameters: never moved by the server optimizer.
    server_lr : float
        Applied to the combined change (1 is FedAvg).
    server_momentum : float
        FedAvgM momentum; 0 disables (``sgd`` only).
    run_id : str, optional
        Random by default.
    reference_key : bytes, optional
        The 32-byte secret of the reference draw; random by default.
    optimizer : ServerOptimizer, optional
        ``sgd`` (FedAvg, FedAvgM) by default, or FedAdam, FedYogi.
    """

    def __init__(
        self,
        model: Mapping[str, torch.Tensor],
        buffers: Iterable[str] = (),
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        run_id: str | None = None,
        reference_key: bytes | None = None,
        optimizer: ServerOptimizer | None = None,
    ) -> None:
        if not server_lr > 0 or not 0 <= server_momentum < 1:
            raise ValueError("FedAvgServer: need server_lr > 0 and 0 <= momentum < 1")
        self.optimizer = optimizer or ServerOptimizer()
        if self.optimizer.adaptive and server_momentum:
            raise ValueError(
                f"FedAvgServer: server_momentum is FedAvgM's; "
                f"{self.optimizer.name} takes its momentum from server_betas"
            )
        self.model: dict[str, torch.Tensor] = {}
        for name, value in model.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"FedAvgServer: {name} is not a float tensor")
            self.model[name] = value.detach().to("cpu", torch.float32).clone()
        self.buffers = frozenset(buffers)
        unknown = self.buffers - set(self.model)
        if unknown:
            raise ValueError(f"FedAvgServer: unknown buffers {sorted(unknown)}")
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.momentum: dict[str, torch.Tensor] = {}  # adam, yogi: the first moment
        self.second_moment: dict[str, torch.Tensor] = {}
        self.round = 0  # completed rounds
        self.run_id = str(run_id) if run_id is not None else secrets.token_hex(16)
        if reference_key is None:
            reference_key = secrets.token_bytes(32)
        if not isinstance(reference_key, bytes) or len(reference_key) != 32:
            raise ValueError("FedAvgServer: reference_key must be 32 bytes")
        self.reference_key = reference_key
        self.carried: dict | None = None  # the last committed round's limits

    def model_nbytes(self) -> int:
        """Bytes of the float32 global model (parameters and buffers)."""
        return sum(4 * value.numel() for value in self.model.values())

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The parameters' names and shapes (buffers never travel compressed)."""
        return [
            (name, tuple(value.shape))
            for name, value in self.model.items()
            if name not in self.buffers
        ]

    def apply(self, combined: dict[str, torch.Tensor], round: int) -> bool:
        """Apply the server step to a combination and commit it if finite.

        Arguments
        ---------
        combined : dict
            The round's combined model (overwritten, entry by entry).
        round : int

        Returns
        -------
        bool
            Whether the model changed; a non-finite result also resets the
            optimizer's state.
        """
        if self.optimizer.adaptive:
            return self._apply_adaptive(combined, round)
        lr, beta = self.server_lr, self.server_momentum
        momentum, bad = self._step(combined, lr, beta)
        if bad:
            self._discard(round, bad, "momentum is" if self.momentum else "")
            return False
        for name in list(self.model):
            if beta > 0 and name in momentum:
                self.model[name] = self.model[name] + lr * momentum[name]
            else:
                self.model[name] = combined[name]
        if beta > 0:
            self.momentum = {**self.momentum, **momentum}
        return True

    def _step(self, combined: dict, lr: float, beta: float) -> tuple[dict, list]:
        # The new momentum, and the entries whose new value is not finite
        # (with momentum a new entry is computed to check it, then dropped).
        plain_fedavg = lr == 1.0 and beta == 0.0
        momentum: dict[str, torch.Tensor] = {}
        bad = []
        for name, master in self.model.items():
            value = combined[name]
            if name in self.buffers or plain_fedavg:
                if nonfinite(value):
                    bad.append(name)
                continue
            delta = value.sub_(master)  # combined - master, in place
            if beta > 0:
                previous = self.momentum.get(name)
                if previous is not None:
                    delta = previous * beta + delta
                momentum[name] = combined[name] = delta
                new = master + lr * delta
                finite = not nonfinite(new)
                del new
                if not finite or nonfinite(delta):
                    bad.append(name)
            else:
                # lr * delta + master: the same bits as master + lr * delta.
                combined[name] = delta.mul_(lr).add_(master)
                if nonfinite(combined[name]):
                    bad.append(name)
        return momentum, bad

    def _discard(self, round: int, bad: list[str], reset: str) -> None:
        logger.error(
            "round %d: the combined model is not finite (%s); the model is unchanged%s",
            round,
            ", ".join(bad[:5]),
            f"; the server {reset} reset" if reset else "",
        )
        # The state would lead here again every round.
        self.momentum, self.second_moment = {}, {}

    def _apply_adaptive(self, combined: dict, round: int) -> bool:
        # The moments are updated in place: a discarded round resets them.
        first, second, bad = {}, {}, []
        for name, master in self.model.items():
            if name not in self.buffers:
                delta = combined[name].sub_(master)  # combined - master, in place
                first[name], second[name] = adaptive_step(
                    self.optimizer,
                    master,
                    delta,
                    self.momentum.get(name),
                    self.second_moment.get(name),
                    self.server_lr,
                )
                if nonfinite(first[name]) or nonfinite(second[name]):
                    bad.append(name)
                    continue
            if nonfinite(combined[name]):
                bad.append(name)
        if bad:
            self._discard(round, bad, "moments are" if self.momentum else "")
            return False
        self.model = {name: combined[name] for name in self.model}
        self.momentum, self.second_moment = first, second
        return True

    # ---------------------------------------------------------- checkpoints
    def settings(self) -> dict:
        """What of the state a resumed run must match."""
        return {
            "server_lr": self.server_lr,
            "server_momentum": self.server_momentum,
            **self.optimizer.settings(),
            "buffers": sorted(self.buffers),
            "model": {n: list(v.shape) for n, v in self.model.items()},
        }

    def state_dict(self, settings: Mapping) -> dict:
        """Everything needed to continue after the last completed round.

        Arguments
        ---------
        settings : mapping
            What a resumed run must match.

        Returns
        -------
        dict
        """
        return {
            "version": STATE_VERSION,
            "round": self.round,
            "run_id": self.run_id,
            "model": {n: v.clone() for n, v in self.model.items()},
            "momentum": {n: v.clone() for n, v in self.momentum.items()},
            "second_moment": {n: v.clone() for n, v in self.second_moment.items()},
            "settings": dict(settings),
            "reference_key": self.reference_key,
            "limits": self.carried,
        }

    def load_state_dict(
        self, state: Mapping, settings: Mapping, norm_reference: int
    ) -> None:
        """Restore :meth:`state_dict` after checking all of it.

        Arguments
        ---------
        state : mapping
        settings : mapping
            This server's settings, which the saved ones must match.
        norm_reference : int
            This run's, for a checkpoint whose settings have no update-norm bound.

        Raises
        ------
        CheckpointMismatch
            Saved with other settings (each difference named).
        ValueError
            Malformed state (nothing is changed).
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, Mapping) else None
            raise ValueError(f"unsupported server state version {version!r}")
        if not isinstance(state["settings"], Mapping):
            raise ValueError("server state: settings is not a mapping")
        saved = _undefended_if_older(state["settings"], norm_reference)
        _check_settings(_sgd_if_absent(saved), _sgd_if_absent(settings))
        round_ = state["round"]
        if not is_int(round_) or round_ < 0:
            raise ValueError(f"server state: bad round {round_!r}")
        model = self._checked(state["model"], "model", complete=True)
        momentum = self._checked(state["momentum"], "momentum", complete=False)
        second = self._second_moment(state, momentum)
        run_id = state["run_id"]
        if not isinstance(run_id, str) or not 0 < len(run_id) <= 64:
            raise ValueError(f"server state: bad run id {str(run_id)[:80]!r}")
        # Absent from older checkpoints: a new key, nothing carried.
        key = state.get("reference_key", self.reference_key)
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("server state: bad reference key")
        carried = check_carried(state.get("limits"), self.model)
        self.run_id, self.reference_key, self.carried = run_id, key, carried
        self.model, self.momentum, self.round = model, momentum, round_
        self.second_moment = second

    def _checked(self, tensors: Mapping, what: str, complete: bool) -> dict:
        if not isinstance(tensors, Mapping):
            raise ValueError(f"server state: {what} is not a mapping")
        names = list(tensors)
        if complete and names != list(self.model):
            raise ValueError(f"server state: {what} holds other entries")
        out = {}
        for name in names:
            value = tensors[name]
            if name not in self.model or not isinstance(value, torch.Tensor):
                raise ValueError(f"server state: {what} entry {name!r} is not ours")
            if tuple(value.shape) != tuple(self.model[name].shape):
                raise ValueError(
                    f"server state: {what} {name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(self.model[name].shape)}"
                )
            value = value.to(torch.float32)
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"server state: {what} {name} is not finite")
            out[name] = value.clone()
        return out

    def _second_moment(self, state: Mapping, momentum: dict) -> dict:
        # Only adam and yogi keep one, over the first moment's entries, >= 0.
        second = state.get("second_moment", {})
        if self.optimizer.adaptive and "second_moment" not in state:
            raise ValueError("server state: no second moment (saved by sgd?)")
        second = self._checked(second, "second_moment", complete=False)
        if set(second) != set(momentum) and (self.optimizer.adaptive or second):
            raise ValueError("server state: second_moment and momentum differ")
        for name, value in second.items():
            if bool((value < 0).any()):
                raise ValueError(f"server state: second_moment {name} is negative")
        return second


def _sgd_if_absent(settings: Mapping) -> Mapping:
    # sgd settings name no optimizer (as before adam and yogi): say it.
    return {"server_optimizer": "sgd", **settings}


def _check_settings(saved: Mapping, current: Mapping) -> None:
    differences = diff_settings(saved, current)
    if not differences:
        return
    hint = ""
    if any(d.startswith("aggregation.norm_") for d in differences):
        hint = (
            "\n(a run saved without the update-norm bound resumes with "
            "--norm_bound null; --fresh_start True starts over)"
        )
    raise CheckpointMismatch(
        "the checkpoint was saved with other settings; resuming would "
        "not reproduce the run:\n  " + "\n  ".join(differences) + hint
    )


def _undefended_if_older(saved: Mapping, norm_reference: int) -> Mapping:
    # Settings saved before the update-norm bound read as the undefended run
    # they were (norm_reference does nothing without the bound: this run's).
    aggregation = saved.get("aggregation")
    if not isinstance(aggregation, Mapping) or "norm_bound" in aggregation:
        return saved
    older = {"norm_bound": None, "norm_reference": norm_reference}
    return {**saved, "aggregation": {**older, **aggregation}}


def save_checkpoint(
    path: str | Path | CheckpointStore, state: Mapping, extra: Mapping | None = None
) -> None:
    """Save a server's state atomically (the previous checkpoint is kept).

    Arguments
    ---------
    path : str, Path or CheckpointStore
    state : mapping
        The server's ``state_dict()``.
    extra : mapping, optional
        More plain data stored alongside.
    """
    store = path if isinstance(path, CheckpointStore) else CheckpointStore(path)
    store.save({"server": state, "extra": dict(extra or {})})


def load_checkpoint(
    path: str | Path | CheckpointStore, load_state: Callable[[Mapping], None]
) -> tuple[dict, Path] | None:
    """Restore the newest usable checkpoint (see :class:`CheckpointStore`).

    Arguments
    ---------
    path : str, Path or CheckpointStore
    load_state : callable
        Restores a server's state (its ``load_state_dict``).

    Returns
    -------
    tuple or None
        The ``extra`` data and the file used; ``None`` without a checkpoint.
    """
    store = path if isinstance(path, CheckpointStore) else CheckpointStore(path)

    def apply(checkpoint):
        extra = checkpoint.get("extra", {})
        if not isinstance(extra, Mapping):
            raise ValueError("extra is not a mapping")
        load_state(checkpoint["server"])
        return dict(extra)

    return store.load(apply)


def saved_clients(path: str | Path | CheckpointStore) -> list[str] | None:
    """The client ids of the newest readable server checkpoint.

    A resumed run takes its clients from here: no node can join under a new id.

    Arguments
    ---------
    path : str, Path or CheckpointStore

    Returns
    -------
    list of str or None
        ``None`` without a checkpoint.

    Example
    -------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "server.ckpt"
    >>> saved_clients(path) is None
    True
    >>> save_checkpoint(path, ServerState({"w": torch.zeros(2)}).state_dict(
    ...     {"clients": ["b", "a"]}))
    >>> saved_clients(path)
    ['b', 'a']
    """
    store = path if isinstance(path, CheckpointStore) else CheckpointStore(path)

    def clients(checkpoint: Mapping) -> list[str]:
        value = checkpoint["server"]["settings"]["clients"]
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise ValueError("the saved clients are not a list of ids")
        return list(value)

    loaded = store.load(clients)
    return None if loaded is None else loaded[0]
