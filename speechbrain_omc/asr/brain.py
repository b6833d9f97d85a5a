"""The Conformer-CTC Brains of the SynthSpeech / LibriSpeech ASR task.

:class:`ASR` is the centralized recipe's Brain (Fbank, CNN front end,
``TransformerASR`` encoder, CTC head, greedy decoding); :class:`FedASR` the
same as a federated client. Both are :class:`~speechbrain_omc.OMCBrain`
subclasses: float32, or OMC when the hparams have an ``omc`` entry.

Example
-------
>>> issubclass(FedASR, ASR)
True
>>> utterance_errors([{"key": "u1", "num_edits": 1, "num_ref_tokens": 4}])
[('u1', 1, 4)]
"""

from __future__ import annotations

import speechbrain as sb

from speechbrain_omc.brain import OMCBrain

__all__ = ["ASR", "FedASR", "utterance_errors"]


def utterance_errors(scores) -> list[tuple[str, int, int]]:
    """Per-utterance word errors of an ``ErrorRateStats``' ``scores``.

    Arguments
    ---------
    scores : list of dict
        ``ErrorRateStats.scores`` (``key``, ``num_edits``, ``num_ref_tokens``).

    Returns
    -------
    list of (str, int, int)
        Utterance id, edits, reference words (what
        :func:`speechbrain_omc.asr.stats.bootstrap_wer` resamples).
    """
    return [(s["key"], int(s["num_edits"]), int(s["num_ref_tokens"])) for s in scores]


class ASR(OMCBrain):
    """Conformer-CTC Brain; trains under OMC when ``hparams`` has ``omc``.

    Modules ``normalize``, ``CNN``, ``encoder`` (``TransformerASR``) and
    ``ctc_lin``; the label encoder is set as ``tokenizer`` after
    construction. After VALID or TEST, ``utterance_errors`` holds each
    utterance's (id, edits, reference words).
    """

    def compute_forward(self, batch, stage):
        """Waveform -> Fbank -> CNN -> Conformer -> CTC log-probs, lengths."""
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
        """CTC loss; on VALID and TEST also greedy decoding, WER and CER."""
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
        """Fresh WER and CER trackers for VALID and TEST."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()

    def _error_stats(self) -> dict:
        # Kept per utterance: one run's confidence interval is a bootstrap
        # over utterances, which needs more than the summed rate.
        self.utterance_errors = utterance_errors(self.wer_metric.scores)
        return {
            "CER": self.cer_metric.summarize("error_rate"),
            "WER": self.wer_metric.summarize("error_rate"),
        }

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log statistics, anneal the learning rate, keep the best checkpoint."""
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            return
        stage_stats.update(self._error_stats())

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


class FedASR(ASR):
    """:class:`ASR` as a federated client: the stage end only records
    ``stage_stats``; annealing and checkpoints belong to the server's rounds.
    """

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Record the stage's loss, and WER/CER outside training."""
        stats = {"loss": float(stage_loss)}
        if stage != sb.Stage.TRAIN:
            stats.update({k: float(v) for k, v in self._error_stats().items()})
        self.stage_stats = stats
