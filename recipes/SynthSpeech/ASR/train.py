#!/usr/bin/env python3
"""Recipe for a Conformer-CTC ASR system on SynthSpeech or LibriSpeech, with
or without Online Model Compression (OMC).

The encoder is SpeechBrain's own: a convolutional front-end over Fbank
features and a Conformer (``TransformerASR`` with ``encoder_module:
conformer`` and no decoder layers), followed by a linear CTC head over
characters. Decoding is greedy CTC; WER and CER are computed with
``ErrorRateStats`` on the held-out test speakers at the end of training.

The Brain (:class:`speechbrain_omc.asr.ASR`, an
:class:`~speechbrain_omc.OMCBrain`) and the data pipeline
(:func:`speechbrain_omc.asr.dataio_prepare`) come from the library, which the
federated recipe and the Flower app share; this file only wires them to the
hparams. The same script trains in float32 or under OMC: the Brain
compresses the modules when the hparams file has an ``omc:`` entry.

To run (from the repository root; outputs go to ``results/``)::

    python recipes/SynthSpeech/ASR/train.py \
        recipes/SynthSpeech/ASR/hparams/conformer_ctc.yaml
    python recipes/SynthSpeech/ASR/train.py \
        recipes/SynthSpeech/ASR/hparams/conformer_ctc_omc.yaml
    python recipes/SynthSpeech/ASR/train.py \
        recipes/SynthSpeech/ASR/hparams/librispeech_conformer_ctc.yaml \
        --data_folder /path/to/LibriSpeech

Any hyperparameter can be overridden on the command line
(``--number_of_epochs 2``); SpeechBrain's ``--debug`` runs two epochs of two
batches.

Authors
-------
* speechbrain-omc contributors
"""

import logging
import sys
from pathlib import Path

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import run_on_main

from speechbrain_omc.asr import ASR, bootstrap_wer, dataio_prepare, prepare_data

logger = logging.getLogger(__name__)

if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    run_on_main(
        prepare_data,
        kwargs={"hparams": hparams, "progress": not run_opts.get("noprogressbar")},
    )
    train_data, valid_data, test_datasets, label_encoder = dataio_prepare(hparams)

    asr_brain = ASR(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.tokenizer = label_encoder
    if len(label_encoder) > hparams["output_neurons"]:
        raise ValueError(
            f"the training transcripts have {len(label_encoder)} labels (with the "
            f"blank) but output_neurons is {hparams['output_neurons']}"
        )

    train_loader_opts = dict(hparams["train_dataloader_opts"])
    if hparams.get("sorting", "random") != "random":
        train_loader_opts["shuffle"] = False
    asr_brain.fit(
        asr_brain.hparams.epoch_counter,
        train_data,
        valid_data,
        train_loader_kwargs=train_loader_opts,
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    if asr_brain.omc is not None:
        nbytes = asr_brain.omc.parameter_bytes()
        float32_bytes = asr_brain.omc.plan.float32_nbytes
    else:
        nbytes = float32_bytes = sum(
            4 * p.numel() for p in asr_brain.modules.parameters()
        )
    logger.info("Parameter bytes: %d (float32: %d)", nbytes, float32_bytes)

    for name, test_data in test_datasets.items():
        asr_brain.hparams.wer_file = str(
            Path(hparams["output_folder"]) / f"wer_{name}.txt"
        )
        asr_brain.evaluate(
            test_data,
            min_key="WER",
            test_loader_kwargs=hparams["test_dataloader_opts"],
        )
        # One run's WER with its 95 % bootstrap interval over utterances.
        errors = asr_brain.utterance_errors
        interval = bootstrap_wer([e for _, e, _ in errors], [w for _, _, w in errors])
        logger.info(
            "%s WER %s (95 %% bootstrap CI over %d utterances, %d words)",
            name,
            interval.format(),
            len(errors),
            sum(w for _, _, w in errors),
        )
