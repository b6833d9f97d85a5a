"""Deprecated alias of ``python -m speechbrain_omc.experiments.main_job``.

Run by name (not imported), so that this package imports nothing above it.
"""

import runpy
import sys

if __name__ == "__main__":
    print(
        "speechbrain_omc.federated.demo is deprecated: "
        "use python -m speechbrain_omc.experiments.main_job",
        file=sys.stderr,
    )
    runpy.run_module("speechbrain_omc.experiments.main_job", run_name="__main__")
