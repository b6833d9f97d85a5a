"""SpeechBrain integration: a Brain whose modules train under OMC.

A recipe keeps its model YAML and adds an OMC section to its hparams (the
whole block is ``hparams/omc.yaml``; flat keys, so that ``--omc_format=e4m7``
overrides one)::

    omc_format: e3m7
    omc_fp32_fraction: 0.1
    omc: !new:speechbrain_omc.OMCConfig
        format: !ref <omc_format>
        fp32_fraction: !ref <omc_fp32_fraction>

and derives its Brain from :class:`OMCBrain` (or mixes :class:`OMCMixin` into
an existing ``sb.Brain`` subclass). The mixin overrides hooks only: modules
are compressed once at fit (or evaluate) start, before SpeechBrain builds the
optimizer and recovers checkpoints; compressed payloads travel through the
modules' state dicts, so the ``Checkpointer`` saves and recovers them as is.
"""

from __future__ import annotations

import logging

import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)

from speechbrain_omc.config import OMCConfig
from speechbrain_omc.engine import OMCHandle, compress_module
from speechbrain_omc.sgd import SGDSettings

logger = logging.getLogger(__name__)


@register_checkpoint_hooks
class OMCUpdateState:
    """Checkpointer recoverable for fused-mode update state (momentum, steps).

    Arguments
    ---------
    handle : OMCHandle
        The engine whose state is saved.
    """

    def __init__(self, handle: OMCHandle):
        self.handle = handle

    @mark_as_saver
    def _save(self, path):
        torch.save(self.handle.optimizer_state_dict(), path)

    @mark_as_loader
    def _recover(self, path, end_of_epoch):
        del end_of_epoch
        self.handle.load_optimizer_state_dict(torch.load(path, map_location="cpu"))


class OMCMixin:
    """Puts a Brain's ``modules`` under OMC; mix in before ``sb.Brain``.

    The configuration is ``hparams["omc"]`` (an :class:`OMCConfig`, or a dict
    of its arguments); without it the Brain trains in float32 as usual, so one
    ``train.py`` serves both. In fused mode the Brain's optimizer must be
    ``torch.optim.SGD``: its learning rate (scheduled or not), momentum and
    weight decay are applied to the compressed parameters inside backward,
    and the optimizer itself trains the float32 parameters. In simple mode
    any optimizer works, and SpeechBrain's gradient clipping covers the
    compressed parameters too: they are parameters like the others.

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
            self.checkpointer.add_recoverable("omc_update", OMCUpdateState(self.omc))
        if config.update_mode == "fused":
            logger.info(
                "OMC fused mode: gradient clipping (max_grad_norm=%s) covers the "
                "float32 parameters only; compressed ones are updated in backward",
                self.max_grad_norm,
            )

    def on_fit_start(self):
        """Compress the modules, then let SpeechBrain build and recover."""
        self._omc_compress()
        super().on_fit_start()

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Compress the modules before the best checkpoint is recovered."""
        self._omc_compress()
        super().on_evaluate_start(max_key=max_key, min_key=min_key)

    def init_optimizers(self):
        """Build the optimizer; in fused mode, read its SGD settings too.

        Compressed parameters are parameters like the others, so any
        optimizer (and a recipe's own ``init_optimizers``) covers them; in
        fused mode their gradients are consumed in backward, and the
        optimizer only steps the float32 ones.
        """
        super().init_optimizers()
        if self.omc is not None and self.omc.mode == "fused" and self.opt_class:
            self.omc.sgd = SGDSettings.from_optimizer(self.optimizer)

    def fit_batch(self, batch):
        """Hand the optimizer's current SGD settings to fused updates."""
        if self.omc is not None and self.omc.mode == "fused" and self.opt_class:
            self.omc.sgd = SGDSettings.from_optimizer(self.optimizer)
        return super().fit_batch(batch)

    def optimizers_step(self):
        """Step as SpeechBrain does; fused mode then finishes the OMC step."""
        super().optimizers_step()
        if self.omc is not None:
            self.omc.step()


class OMCBrain(OMCMixin, sb.Brain):
    """``sb.Brain`` with OMC; see :class:`OMCMixin`."""
