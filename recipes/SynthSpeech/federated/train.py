#!/usr/bin/env python3
"""Federated Conformer-CTC with Online Model Compression, simulated in one process.

The entry point of :mod:`speechbrain_omc.asr.federation` beside its hparams:
the training speakers are grouped into clients, and every round the server
samples clients, sends each the compressed global model as bytes, lets one
reused Brain train it and averages the validated replies in float32. The
Flower app in ``flower/`` sends the same bytes over the network.

To run (from the repository root)::

    python recipes/SynthSpeech/federated/train.py \
        recipes/SynthSpeech/federated/hparams/fed_omc.yaml
    python recipes/SynthSpeech/federated/train.py \
        recipes/SynthSpeech/federated/hparams/fed_librispeech_omc.yaml \
        --data_folder /path/to/LibriSpeech

Any hyperparameter can be overridden (``--rounds 4``); outputs and resuming
after a crash are described in the README.

Authors
-------
* speechbrain-omc contributors
"""

from speechbrain_omc.asr.federation import main

if __name__ == "__main__":
    # Parses the hparams file and overrides, creates the experiment folder,
    # prepares manifests and the client partition, then runs (or resumes)
    # the federation and prints its summary.
    main()
