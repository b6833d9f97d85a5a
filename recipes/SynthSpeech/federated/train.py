#!/usr/bin/env python3
"""Federated Conformer-CTC with Online Model Compression, simulated in one process.

The whole federation runs here, on the bundled SynthSpeech corpus by default
(or LibriSpeech, partitioned by speaker): the training speakers are grouped
into clients, and every round the server samples clients, sends each the
compressed global model as bytes, lets one reused SpeechBrain Brain train it
on that client's speakers, validates and averages the compressed replies in
float32, and checkpoints. No server process, no network: the messages are the
same bytes a deployment would send (the Flower app in ``flower/`` sends them
over the network).

The Brain, the data pipeline, the server, the round loop and the command
line come from the library (:mod:`speechbrain_omc.asr`, shared with the
centralized recipe, the Flower app and the paper-table runner, and run as
``python -m speechbrain_omc.asr.federation``); this file is that entry point
beside its hparams.

To run (from the repository root)::

    python recipes/SynthSpeech/federated/train.py \
        recipes/SynthSpeech/federated/hparams/fed_omc.yaml
    python recipes/SynthSpeech/federated/train.py \
        recipes/SynthSpeech/federated/hparams/fed_fp32.yaml
    python recipes/SynthSpeech/federated/train.py \
        recipes/SynthSpeech/federated/hparams/fed_librispeech_omc.yaml \
        --data_folder /path/to/LibriSpeech

Any hyperparameter can be overridden (``--rounds 4 --clients_per_round 2``).
Outputs (``rounds.csv``, ``rounds.png``, ``test_errors.csv``,
``summary.json``, ``final_model.pt``, ``save/server.ckpt``) and resuming
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
