"""Entry points of the federated OMC Flower app (see ``pyproject.toml``).

The app's code is the library's (:mod:`speechbrain_omc.federated.flower`);
these modules only name its ``ServerApp`` and ``ClientApp`` for ``flwr run``.
"""
