"""Entry points of the federated OMC Flower app (see ``pyproject.toml``)."""
