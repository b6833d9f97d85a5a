"""Federated OMC as a Flower app (Flower 1.42 Message API): the generic part.

* :mod:`.records`: OMC wire messages as ``uint8`` arrays in ``ArrayRecord``;
* :mod:`.strategy`: :class:`~.strategy.OMCFedAvg`, a ``FedAvg`` that hands
  the bytes to :class:`~speechbrain_omc.federated.server.FedAvgServer`
  (validation, float32 averaging, re-compression).

The app itself (``ServerApp``, ``ClientApp`` and the glue to the recipe)
lives in its app folder, ``recipes/SynthSpeech/federated/flower``; see
``recipes/SynthSpeech/federated/FLOWER.md``.
"""
