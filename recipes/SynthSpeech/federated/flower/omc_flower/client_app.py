"""The app's ``ClientApp``, the library's.

See :mod:`speechbrain_omc.federated.flower.client_app`.
"""

from speechbrain_omc.federated.flower.client_app import app

__all__ = ["app"]
