#!/usr/bin/env python3
"""Recipe for a Conformer-CTC ASR system on SynthSpeech or LibriSpeech, with
or without Online Model Compression (OMC).

The encoder is SpeechBrain's own: a convolutional front-end over Fbank
features and a Conformer (``TransformerASR`` with ``encoder_module:
conformer`` and no decoder layers), followed by a linear CTC head over
characters. Decoding is greedy CTC; WER and CER are computed with
``ErrorRateStats`` on the held-out test speakers at the end of training.

The same script trains in float32 or under OMC: the Brain is an
:class:`speechbrain_omc.OMCBrain`, which compresses the modules when the
hparams file has an ``omc:`` entry and trains them as usual when it has not.

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

Other recipes (for example the federated one) import :class:`ASR`,
:func:`dataio_prepare`, :func:`dataset_from_csv` and
:func:`build_label_encoder` from this file; importing it trains nothing.

Authors
-------
* speechbrain-omc contributors
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import run_on_main

from speechbrain_omc import OMCBrain

logger = logging.getLogger(__name__)


class ASR(OMCBrain):
    """Conformer-CTC Brain; trains under OMC when ``hparams`` has ``omc``.

    Expects the modules ``normalize``, ``CNN``, ``encoder`` (a
    ``TransformerASR``) and ``ctc_lin``, and the hparams ``compute_features``,
    ``log_softmax``, ``ctc_cost``, ``blank_index``, ``error_rate_computer``,
    ``cer_computer``, ``train_logger`` and optionally ``wav_augment``,
    ``fea_augment``, ``lr_annealing``, ``wer_file``. The label encoder is
    passed as the ``tokenizer`` attribute after construction.
    """

    def compute_forward(self, batch, stage):
        """Forward pass: waveform -> Fbank -> CNN -> Conformer -> CTC log-probs.

        Arguments
        ---------
        batch : PaddedBatch
            With ``sig`` (waveforms and relative lengths).
        stage : sb.Stage
            TRAIN, VALID or TEST.

        Returns
        -------
        p_ctc : torch.Tensor
            CTC log-probabilities, (batch, frames, labels).
        wav_lens : torch.Tensor
            Relative lengths of the (possibly augmented) batch.
        """
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        if stage == sb.Stage.TRAIN and getattr(self.hparams, "wav_augment", None):
            wavs, wav_lens = self.hparams.wav_augment(wavs, wav_lens)

        feats = self.hparams.compute_features(wavs)
        epoch_counter = getattr(self.hparams, "epoch_counter", None)
        epoch = epoch_counter.current if epoch_counter is not None else None
        feats = self.modules.normalize(feats, wav_lens, epoch=epoch)
        if stage == sb.Stage.TRAIN and getattr(self.hparams, "fea_augment", None):
            feats, _ = self.hparams.fea_augment(feats, wav_lens)

        src = self.modules.CNN(feats)
        encoded = self.modules.encoder.encode(src, wav_lens)
        logits = self.modules.ctc_lin(encoded)
        return self.hparams.log_softmax(logits), wav_lens

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss; on VALID and TEST also greedy decoding, WER and CER.

        Arguments
        ---------
        predictions : tuple
            ``compute_forward``'s output.
        batch : PaddedBatch
            With ``id``, ``tokens`` and ``wrd``.
        stage : sb.Stage
            TRAIN, VALID or TEST.

        Returns
        -------
        torch.Tensor
            The mean CTC loss of the batch.
        """
        p_ctc, wav_lens = predictions
        tokens, tokens_lens = batch.tokens
        if stage == sb.Stage.TRAIN and getattr(self.hparams, "wav_augment", None):
            tokens = self.hparams.wav_augment.replicate_labels(tokens)
            tokens_lens = self.hparams.wav_augment.replicate_labels(tokens_lens)

        loss = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)

        if stage != sb.Stage.TRAIN:
            sequences = sb.decoders.ctc_greedy_decode(
                p_ctc, wav_lens, blank_id=self.hparams.blank_index
            )
            predicted = [
                "".join(self.tokenizer.decode_ndim(seq)).split() for seq in sequences
            ]
            targets = [wrd.split() for wrd in batch.wrd]
            self.wer_metric.append(batch.id, predicted, targets)
            self.cer_metric.append(batch.id, predicted, targets)
        return loss

    def on_stage_start(self, stage, epoch=None):
        """Fresh WER and CER trackers for VALID and TEST.

        Arguments
        ---------
        stage : sb.Stage
            The stage that starts.
        epoch : int, optional
            The epoch number.
        """
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log statistics, anneal the learning rate, keep the best checkpoint.

        Arguments
        ---------
        stage : sb.Stage
            The stage that ended.
        stage_loss : float
            Average loss over the stage.
        epoch : int, optional
            The epoch number.
        """
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            return
        stage_stats["CER"] = self.cer_metric.summarize("error_rate")
        stage_stats["WER"] = self.wer_metric.summarize("error_rate")

        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            annealing = getattr(self.hparams, "lr_annealing", None)
            if annealing is not None:
                old_lr, lr = annealing(epoch)
                sb.nnet.schedulers.update_learning_rate(self.optimizer, lr)
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": lr},
                train_stats=self.train_stats,
                valid_stats=stage_stats,
            )
            self.checkpointer.save_and_keep_only(
                meta={"WER": stage_stats["WER"]},
                min_keys=["WER"],
                num_to_keep=self.hparams.ckpt_to_keep,
            )
        elif stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                test_stats=stage_stats,
            )
            if getattr(self.hparams, "wer_file", None):
                with open(self.hparams.wer_file, "w", encoding="utf-8") as w:
                    self.wer_metric.write_stats(w)


def build_label_encoder(train_csv, path, blank_index=0):
    """Character CTC label encoder of a training manifest, saved to ``path``.

    The labels are the sorted characters of the manifest's ``wrd`` column
    (the space among them, as word separator), with the CTC blank at
    ``blank_index``: the encoder depends on the set of characters only, so
    it is the same for any manifest with the same characters. An encoder
    already saved at ``path`` is loaded instead.

    Arguments
    ---------
    train_csv : str or Path
        A SpeechBrain CSV with a ``wrd`` column.
    path : str or Path
        Where the encoder is saved (``label_encoder.txt``).
    blank_index : int
        Index of the CTC blank.

    Returns
    -------
    sb.dataio.encoder.CTCTextEncoder
        The encoder.
    """
    with open(train_csv, newline="", encoding="utf-8") as f:
        chars = sorted({c for row in csv.DictReader(f) for c in row["wrd"]})
    encoder = sb.dataio.encoder.CTCTextEncoder()
    encoder.load_or_create(
        path=str(path),
        from_iterables=[chars],
        sequence_input=False,
        special_labels={"blank_label": blank_index},
    )
    # The label set is exactly the manifest's characters plus the blank.
    encoder.expect_len(len(encoder))
    return encoder


def dataset_from_csv(csv_path, hparams, label_encoder, sorting=None):
    """A ``DynamicItemDataset`` of one manifest with the recipe's pipelines.

    Output keys: ``id``, ``sig`` (16 kHz waveform), ``wrd``, ``tokens``.

    Arguments
    ---------
    csv_path : str or Path
        SpeechBrain CSV (``ID, duration, wav, spk_id, wrd``) whose ``wav``
        paths start with ``$data_root``.
    hparams : dict
        Needs ``data_folder``; ``avoid_if_longer_than`` filters long
        utterances when ``sorting`` is given.
    label_encoder : sb.dataio.encoder.CTCTextEncoder
        Encodes ``wrd`` characters into ``tokens``.
    sorting : str, optional
        ``"ascending"`` or ``"descending"`` by duration, or ``"random"`` /
        ``None`` to keep the manifest order.

    Returns
    -------
    sb.dataio.dataset.DynamicItemDataset
        The dataset.
    """
    dataset = sb.dataio.dataset.DynamicItemDataset.from_csv(
        csv_path=str(csv_path),
        replacements={"data_root": str(hparams["data_folder"])},
    )
    if sorting in ("ascending", "descending"):
        dataset = dataset.filtered_sorted(
            sort_key="duration",
            reverse=sorting == "descending",
            key_max_value={"duration": hparams.get("avoid_if_longer_than", 1e9)},
        )

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "char_list", "tokens")
    def text_pipeline(wrd):
        yield wrd
        char_list = list(wrd)
        yield char_list
        yield torch.LongTensor(label_encoder.encode_sequence(char_list))

    sb.dataio.dataset.add_dynamic_item([dataset], audio_pipeline)
    sb.dataio.dataset.add_dynamic_item([dataset], text_pipeline)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig", "wrd", "tokens"])
    return dataset


def dataio_prepare(hparams, label_encoder=None):
    """Datasets and label encoder of the recipe, from the prepared manifests.

    Arguments
    ---------
    hparams : dict
        Needs ``train_csv``, ``valid_csv``, ``test_csv`` (a list),
        ``data_folder``, ``save_folder``, ``blank_index`` and ``sorting``.
    label_encoder : sb.dataio.encoder.CTCTextEncoder, optional
        Reuse this encoder; by default :func:`build_label_encoder` builds (or
        loads) ``<save_folder>/label_encoder.txt`` from ``train_csv``.

    Returns
    -------
    train_data : DynamicItemDataset
        Sorted as ``hparams["sorting"]`` says.
    valid_data : DynamicItemDataset
        Sorted by ascending duration.
    test_datasets : dict
        Test split name (the CSV's stem) to its dataset.
    label_encoder : sb.dataio.encoder.CTCTextEncoder
        Characters plus the CTC blank.
    """
    if label_encoder is None:
        label_encoder = build_label_encoder(
            hparams["train_csv"],
            Path(hparams["save_folder"]) / "label_encoder.txt",
            blank_index=hparams["blank_index"],
        )
    sorting = hparams.get("sorting", "random")
    if sorting not in ("ascending", "descending", "random"):
        raise NotImplementedError("sorting must be random, ascending or descending")
    train_data = dataset_from_csv(
        hparams["train_csv"], hparams, label_encoder, sorting=sorting
    )
    valid_data = dataset_from_csv(
        hparams["valid_csv"], hparams, label_encoder, sorting="ascending"
    )
    test_datasets = {
        Path(csv_path).stem: dataset_from_csv(
            csv_path, hparams, label_encoder, sorting="ascending"
        )
        for csv_path in hparams["test_csv"]
    }
    return train_data, valid_data, test_datasets, label_encoder


def prepare_data(hparams, progress=True):
    """Write the manifests of ``hparams["splits"]`` (skipped when done).

    Arguments
    ---------
    hparams : dict
        Needs ``data_folder``, ``output_folder`` (manifests go there),
        ``splits`` and ``skip_prep``.
    progress : bool
        Progress bars while scanning the corpus.
    """
    from speechbrain_omc.data.librispeech import prepare_librispeech

    prepare_librispeech(
        data_folder=hparams["data_folder"],
        save_folder=hparams["output_folder"],
        splits=hparams["splits"],
        skip_prep=hparams["skip_prep"],
        progress=progress,
    )


def main(argv=None):
    """Prepare data, train, evaluate on the test splits.

    Arguments
    ---------
    argv : list of str, optional
        Command line (without the program); ``sys.argv[1:]`` by default.

    Returns
    -------
    ASR
        The trained Brain.
    """
    argv = sys.argv[1:] if argv is None else argv
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
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
    return asr_brain


if __name__ == "__main__":
    main()
