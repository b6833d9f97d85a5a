"""The app's ``ServerApp``, the library's.

See :mod:`speechbrain_omc.federated.flower.server_app`.
"""

from speechbrain_omc.federated.flower.server_app import app

__all__ = ["app"]
