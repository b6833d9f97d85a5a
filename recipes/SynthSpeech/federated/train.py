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

The Brain, the data pipeline, the server and the round loop come from the
library (:mod:`speechbrain_omc.asr`, shared with the centralized recipe, the
Flower app and the paper-table runner); this file wires them to the hparams.

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

import json
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_omc.asr import run_federation

if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    hparams["noprogressbar"] = bool(run_opts.get("noprogressbar", False))
    if hparams.get("num_threads"):
        # One intra-op thread by default: on a small shared CPU, more threads
        # than free cores slow every step down several times.
        torch.set_num_threads(int(hparams["num_threads"]))
    # Prepares manifests and the client partition, then runs (or resumes) it.
    summary = run_federation(hparams, run_opts)
    print(json.dumps(summary, indent=2))
