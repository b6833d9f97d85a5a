"""SpeechBrain integration: a Brain whose modules train under OMC.

A recipe adds an OMC section to its hparams (``hparams/omc.yaml``, flat
``omc_*`` keys) and derives its Brain from :class:`OMCBrain` (or mixes
:class:`OMCMixin` into its own). Modules are compressed once at fit (or
evaluate) start, before the optimizer is built and checkpoints recovered;
payloads travel in the state dicts, so the ``Checkpointer`` works as is.
:meth:`OMCMixin.export_float32` writes a float32 checkpoint plain
SpeechBrain reads; :mod:`speechbrain_omc.checkpoints` has the rest.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import (
    Checkpointer,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_barrier, if_main_process

from speechbrain_omc.engine.config import OMCConfig
from speechbrain_omc.engine.handle import OMCHandle, compress_module
from speechbrain_omc.engine.rules import settings_from_optimizer
from speechbrain_omc.engine.updates import UpdatePolicy
from speechbrain_omc.export import OMC_STATE_RECOVERABLE, export_checkpoints

logger = logging.getLogger(__name__)


@register_checkpoint_hooks
class OMCUpdateState:
    """Checkpointer recoverable for fused-mode update state (momentum, steps).

    Arguments
    ---------
    updates : UpdatePolicy
        The update policy whose state is saved.
    """

    def __init__(self, updates: UpdatePolicy):
        self.updates = updates

    @mark_as_saver
    def _save(self, path):
        torch.save(self.updates.state_dict(), path)

    @mark_as_loader
    def _recover(self, path, end_of_epoch):
        del end_of_epoch
        self.updates.load_state_dict(torch.load(path, map_location="cpu"))


class OMCMixin:
    """Puts a Brain's ``modules`` under OMC; mix in before ``sb.Brain``.

    The configuration is ``hparams["omc"]`` (an :class:`OMCConfig` or a dict);
    without it the Brain trains in float32. Fused mode reads the optimizer's
    settings (``SGD``, ``Adam`` or ``AdamW``, scheduled learning rate included)
    every batch and hands them to the update policy, which honours
    ``max_grad_norm`` as ``OMCConfig.fused_clipping`` says; simple mode runs any
    optimizer.

    Example
    -------
    >>> class Model(OMCBrain):
    ...     def compute_forward(self, batch, stage):
    ...         return self.modules.lin(batch[0])
    ...     def compute_objectives(self, predictions, batch, stage):
    ...         return torch.nn.functional.mse_loss(predictions, batch[1])
    >>> brain = Model(
    ...     modules={"lin": torch.nn.Linear(8, 8)},
    ...     opt_class=lambda params: torch.optim.SGD(params, lr=0.1),
    ...     hparams={"omc": OMCConfig(format="bf16")},
    ... )
    >>> batches = [(torch.randn(4, 8), torch.zeros(4, 8))] * 3
    >>> brain.fit(range(1), torch.utils.data.DataLoader(batches, batch_size=None))
    >>> brain.omc.parameter_bytes()  # 64 bfloat16 weights + scale + 8 biases
    164
    """

    omc: OMCHandle | None = None
    _omc_state_logged: bool = False

    @property
    def omc_config(self) -> OMCConfig | None:
        """The configuration from ``hparams["omc"]``; ``None`` disables OMC."""
        config = getattr(self.hparams, "omc", None) if self.hparams else None
        if config is None or isinstance(config, OMCConfig):
            return config
        if isinstance(config, dict):
            return OMCConfig(**config)
        raise TypeError(
            f"hparams['omc'] must be an OMCConfig or a dict, got {type(config)}"
        )

    def _omc_compress(self) -> None:
        config = self.omc_config
        if self.omc is not None or config is None:
            return
        if self.scaler.is_enabled():
            raise ValueError(
                "OMC does not support fp16 gradient scaling: fused updates and "
                "simple-mode clipping would see scaled gradients; use "
                "precision fp32 or bf16"
            )
        if config.update_mode == "fused" and self.grad_accumulation_factor > 1:
            raise ValueError(
                "fused OMC updates apply each gradient in backward and cannot "
                "accumulate gradients; set grad_accumulation_factor: 1 or "
                "update_mode: simple"
            )
        self.omc = compress_module(self.modules, config)
        if self.checkpointer is not None:
            # Optional: a float32 checkpoint (an export, a float32 run) has
            # none, and the update state then starts afresh.
            self.checkpointer.add_recoverable(
                OMC_STATE_RECOVERABLE,
                OMCUpdateState(self.omc.updates),
                optional_load=True,
            )
        if config.update_mode == "fused":
            logger.info(
                "OMC fused mode: compressed parameters are updated in backward; "
                "max_grad_norm=%s is applied to them by %s clipping",
                self.max_grad_norm,
                config.fused_clipping,
            )

    def fit(self, *args, **kwargs) -> None:
        """Train as ``sb.Brain.fit``; then, with ``omc_export_float32: <folder>``
        in the hparams, :meth:`export_float32` there.
        """
        super().fit(*args, **kwargs)
        out_dir = getattr(self.hparams, "omc_export_float32", None)
        if out_dir and not self.test_only:
            self.export_float32(out_dir, overwrite=True)

    def export_float32(
        self,
        out_dir: str | os.PathLike,
        name: str = "float32",
        overwrite: bool = False,
        meta: dict | None = None,
    ) -> Path:
        """Save the current state as a float32 checkpoint plain SpeechBrain reads.

        The recoverables (or each of ``self.modules`` without a checkpointer) go
        to ``out_dir/CKPT+<name>`` (replacing one with ``overwrite``; ``meta`` adds
        to ``CKPT.yaml``) with every compressed parameter decoded and no
        ``omc_update`` state; returns that folder. Under DDP every process calls
        it; the main process writes.

        Example
        -------
        >>> class Model(OMCBrain):
        ...     def compute_forward(self, batch, stage):
        ...         return self.modules.lin(batch)
        >>> brain = Model(
        ...     modules={"lin": torch.nn.Linear(4, 2)},
        ...     hparams={"omc": OMCConfig(format="e3m7")},
        ... )
        >>> _ = brain.on_evaluate_start()  # compresses
        >>> path = brain.export_float32(getfixture("tmp_path") / "float32")
        >>> path.name, sorted(p.name for p in path.iterdir())
        ('CKPT+float32', ['CKPT.yaml', 'lin.ckpt'])
        """
        out_dir = Path(out_dir)
        if self.checkpointer is not None:
            recoverables = {
                key: obj
                for key, obj in self.checkpointer.recoverables.items()
                if key != OMC_STATE_RECOVERABLE
            }
            hooks = self.checkpointer.custom_save_hooks
            save_hooks = {k: h for k, h in hooks.items() if k in recoverables}
        else:
            recoverables, save_hooks = dict(self.modules.items()), {}
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(
            prefix=f".{out_dir.name}.staging-", dir=out_dir.parent
        ) as staging:
            # SpeechBrain's own save hooks write the files (every process
            # takes part, as in any save), then the exporter decodes them.
            staged = Checkpointer(staging, recoverables, custom_save_hooks=save_hooks)
            staged.save_checkpoint(meta=meta or {}, name=name)
            if if_main_process():
                summary = export_checkpoints(
                    staging, out_dir, overwrite=overwrite, progress=False
                )
                logger.info("OMC float32 export: %s", summary)
            ddp_barrier()
        return out_dir / f"CKPT+{name}"

    def on_fit_start(self):
        """Compress the modules, then let SpeechBrain build and recover."""
        self._omc_compress()
        super().on_fit_start()
        if self.omc is not None:
            # Before any step: the optimizer state that does not exist yet
            # is predicted from the state format.
            logger.info(
                "OMC training state at the start of training:\n%s",
                self.omc.memory_table(),
            )

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Compress the modules before the best checkpoint is recovered."""
        self._omc_compress()
        super().on_evaluate_start(max_key=max_key, min_key=min_key)

    def init_optimizers(self):
        """Build the optimizer; in fused mode, read its rule's settings too.

        Compressed parameters are parameters like the others, so any
        optimizer (and a recipe's own ``init_optimizers``) covers them; in
        fused mode their gradients are consumed in backward, and the
        optimizer only steps the float32 ones.
        """
        super().init_optimizers()
        self._omc_read_optimizer()

    def _omc_read_optimizer(self) -> None:
        if self.omc is None or self.omc.mode != "fused":
            return
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None and getattr(self, "optimizers_dict", None):
            optimizer = next(iter(self.optimizers_dict.values()))
        updates = self.omc.updates
        if optimizer is not None:
            updates.set_rule(settings_from_optimizer(optimizer))
        updates.max_grad_norm = self.max_grad_norm

    def fit_batch(self, batch):
        """Hand the optimizer's current settings to fused updates; with
        two-pass clipping, measure the gradient norm first."""
        self._omc_read_optimizer()
        updates = self.omc.updates if self.omc is not None else None
        if (
            updates is not None
            and updates.mode == "fused"
            and updates.config.fused_clipping == "two_pass"
            and self.max_grad_norm is not None
            and self.max_grad_norm < float("inf")
        ):
            self._omc_measure_gradient_norm(batch)
        return super().fit_batch(batch)

    def _omc_measure_gradient_norm(self, batch) -> None:
        """Two-pass clipping's first pass: forward and backward, no update."""
        # The random state is restored afterwards: the training pass draws
        # the same dropout masks, so the norm is its gradient's.
        devices = [self.device] if torch.device(self.device).type == "cuda" else []
        updates = self.omc.updates
        with torch.random.fork_rng(devices=devices), updates.measuring():
            outputs = self.compute_forward(batch, sb.Stage.TRAIN)
            loss = self.compute_objectives(outputs, batch, sb.Stage.TRAIN)
            loss.backward()
        dense = [p.grad for p in self.modules.parameters() if p.grad is not None]
        dense_sq = sum(float(torch.linalg.vector_norm(g)) ** 2 for g in dense)
        for param in self.modules.parameters():
            param.grad = None
        total = (updates.gradient_norm_sq + dense_sq) ** 0.5
        updates.clip_coef = min(1.0, self.max_grad_norm / (total + 1e-6))

    def optimizers_step(self):
        """The update policy finishes its step first; then SpeechBrain's.

        With deferred clipping, SpeechBrain's clipping runs here over every
        gradient, held compressed ones included, and SpeechBrain's own step finds
        only float32 gradients, clipped already. Under DDP the fused updates run
        here; with two-pass clipping float32 gradients take the measured coefficient.
        """
        omc = self.omc
        updates = omc.updates if omc is not None else None
        if updates is not None and updates.holds_gradients:
            for optimizer in self._omc_valid_optimizers():
                updates.clip_grad_norm_(
                    optimizer.param_groups[0]["params"], self.max_grad_norm
                )
            updates.step()
            # Clipped once already: torch's clipping with an infinite limit
            # multiplies by exactly 1.
            limit, self.max_grad_norm = self.max_grad_norm, float("inf")
            try:
                super().optimizers_step()
            finally:
                self.max_grad_norm = limit
        elif updates is not None:
            coef = updates.clip_coef
            updates.step()
            if coef is not None and coef < 1.0:
                for param in self.modules.parameters():
                    if param.grad is not None:
                        param.grad.mul_(coef)
            super().optimizers_step()
        else:
            super().optimizers_step()
        if omc is not None and not self._omc_state_logged:
            # After the first step: the optimizer state now exists, so the
            # table reports stored bytes, not predictions.
            self._omc_state_logged = True
            logger.info(
                "OMC training state after the first step:\n%s",
                omc.memory_table(),
            )

    def _omc_valid_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers SpeechBrain steps now (not frozen), as it finds them."""
        if self.optimizers_dict is not None:
            return list(self.freeze_optimizers(self.optimizers_dict).values())
        if self.opt_class is not None:
            return [self.optimizer]
        return []


class OMCBrain(OMCMixin, sb.Brain):
    """``sb.Brain`` with OMC; see :class:`OMCMixin`."""
