"""Federated OMC as a Flower app (Flower 1.42 Message API).

* :mod:`.records`: OMC wire messages as ``uint8`` arrays in ``ArrayRecord``;
* :mod:`.strategy`: :class:`~.strategy.OMCFedAvg`, a ``FedAvg`` that hands
  the bytes to :class:`~speechbrain_omc.federated.server.FedAvgServer`
  (validation, float32 averaging, re-compression);
* :mod:`.server_app`, :mod:`.client_app`: the ``ServerApp`` and
  ``ClientApp``; :mod:`.task`: their glue to the task module
  (:mod:`speechbrain_omc.asr` by default) that builds the Brain, the data
  and the server as the embedded simulation does.

The app folder for ``flwr run`` is ``recipes/SynthSpeech/federated/flower``
(its ``pyproject.toml`` names these components); see
``recipes/SynthSpeech/federated/FLOWER.md``. The two app modules import
``flwr``: install the ``flower`` extra.
"""
