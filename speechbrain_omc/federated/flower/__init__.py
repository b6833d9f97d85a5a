"""Federated OMC as a Flower app (Flower 1.42 Message API).

* :mod:`.records`: OMC wire messages as ``uint8`` arrays in ``ArrayRecord``;
* :mod:`.strategy`: :class:`~.strategy.OMCFedAvg`, a ``FedAvg`` that hands
  the bytes to :class:`~speechbrain_omc.federated.server.FedAvgServer`
  (validation, float32 averaging, re-compression);
* :mod:`.client_app` / :mod:`.server_app`: the ``ClientApp`` and
  ``ServerApp`` around :class:`~speechbrain_omc.federated.client.OMCClient`
  and the embedded recipe's builders (:mod:`.recipe`);
* :mod:`.deployment`: a local SuperLink with SuperNodes (or the Simulation
  Engine) on loopback, for tests and demos.

The app folder for ``flwr run`` is ``recipes/SynthSpeech/federated/flower``;
see ``recipes/SynthSpeech/federated/FLOWER.md``.
"""
