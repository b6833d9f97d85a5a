"""Federated OMC as a Flower app (Flower Message API): :mod:`.records`,
:mod:`.strategy`, :mod:`.streaming`, :mod:`.server_app`, :mod:`.client_app`
and :mod:`.task`, their glue to the task module. The app folder for ``flwr
run`` is ``recipes/SynthSpeech/federated/flower``; install the ``flower`` extra.
"""
