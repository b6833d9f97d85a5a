"""The federated clients' optimizer, named in hparams.

A client builds its optimizer afresh at every round (its state never leaves
it), so the choice is one YAML key, ``client_optimizer``, that a command line
can change (``--client_optimizer sgd --lr 0.05``) and a resumed run can check.

Example
-------
>>> import torch
>>> params = [torch.nn.Parameter(torch.zeros(3))]
>>> type(client_optimizer(params, name="adam", lr=1e-3)).__name__
'Adam'
>>> client_optimizer(params, name="sgd", lr=0.05, momentum=0.9).defaults["momentum"]
0.9
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["CLIENT_OPTIMIZERS", "client_optimizer"]

#: The optimizers OMC's fused update implements, by their hparams name.
CLIENT_OPTIMIZERS = ("adam", "sgd")


def client_optimizer(
    params: Iterable,
    name: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam (``momentum`` unused) or SGD with momentum over ``params``.

    Arguments
    ---------
    params : iterable
        The parameters (or parameter groups), as a ``torch.optim`` takes them.
    name : str
        ``adam`` or ``sgd``.
    lr : float
        The learning rate (Adam's 1e-3 is an SGD's 0.05 of this task).
    momentum : float
        SGD's momentum.
    weight_decay : float
        L2 penalty, as both optimizers define it.

    Returns
    -------
    torch.optim.Optimizer
    """
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    raise ValueError(
        f"client_optimizer must be one of {', '.join(CLIENT_OPTIMIZERS)}, got {name!r}"
    )
