"""The per-round log, now :mod:`speechbrain_omc.federated.round_log` (kept for imports).

Example
-------
>>> from speechbrain_omc.federated import round_log
>>> write_csv is round_log.write_csv
True
"""

from speechbrain_omc.federated.round_log import (
    CSV_FIELDS,
    plot_rounds,
    round_row,
    write_csv,
)

__all__ = ["CSV_FIELDS", "plot_rounds", "round_row", "write_csv"]
