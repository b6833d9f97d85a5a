"""Simulated client availability: which sampled clients drop out of a round.

A seeded draw per round; the server records the dropped clients as failed,
as for a client that crashed.

Example
-------
>>> clients = [f"c{i}" for i in range(10)]
>>> sorted(simulated_dropouts(clients, 0.3, seed=1, round=1))
['c4', 'c6', 'c9']
>>> simulated_dropouts(clients, 0.3, seed=1, round=1) == simulated_dropouts(
...     list(reversed(clients)), 0.3, seed=1, round=1)  # order does not matter
True
>>> len(simulated_dropouts(clients, 0.0, seed=1, round=1))
0
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from speechbrain_omc.engine.selection import round_seed

__all__ = ["DROPOUT_REASON", "simulated_dropouts"]

#: What the round's report says about a dropped client.
DROPOUT_REASON = "dropped out (simulated unavailability)"


def simulated_dropouts(
    clients: Iterable[str], fraction: float, seed: int, round: int
) -> set[str]:
    """The clients of a round that are unavailable: a seeded draw.

    Arguments
    ---------
    clients : iterable of str
        In any order.
    fraction : float
        In ``[0, 1)``, rounded to the nearest count (half up).
    seed : int
    round : int

    Returns
    -------
    set of str
    """
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dropout fraction must be in [0, 1), got {fraction}")
    ordered = sorted(str(c) for c in clients)
    count = math.floor(fraction * len(ordered) + 0.5)
    if not count:
        return set()
    rng = random.Random(round_seed(seed, round, "dropout"))
    return set(rng.sample(ordered, count))
