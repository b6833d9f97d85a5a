"""Data of the ASR task: character label encoder and datasets from manifests.

The manifests come from :func:`speechbrain_omc.data.librispeech.prepare_librispeech`;
:func:`dataset_from_csv` replaces their ``$data_root`` with ``data_folder``.

Example
-------
>>> import tempfile
>>> from speechbrain_omc.data.prepare_synthspeech import bundled_corpus
>>> out = Path(tempfile.mkdtemp())
>>> hparams = {"data_folder": bundled_corpus(), "output_folder": out,
...            "splits": ["dev"], "skip_prep": False}
>>> prepare_data(hparams, progress=False)
>>> encoder = build_label_encoder(out / "dev.csv", out / "label_encoder.txt")
>>> len(encoder)  # 24 letters of the dev transcripts, space, CTC blank
26
>>> dev = dataset_from_csv(out / "dev.csv", hparams, encoder, sorting="ascending")
>>> sorted(dev[0])
['id', 'sig', 'tokens', 'wrd']
"""

from __future__ import annotations

import csv
from pathlib import Path

import speechbrain as sb
import torch

__all__ = ["build_label_encoder", "dataio_prepare", "dataset_from_csv", "prepare_data"]


def build_label_encoder(train_csv, path, blank_index=0):
    """Character CTC label encoder of a training manifest, saved to ``path``.

    The labels are the sorted characters of ``wrd`` (space included) plus the
    CTC blank at ``blank_index``; an encoder already at ``path`` is loaded.
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
    """A dataset of one manifest with keys ``id``, ``sig``, ``wrd``, ``tokens``.

    Arguments
    ---------
    csv_path : str or Path
        SpeechBrain CSV whose ``wav`` paths start with ``$data_root``.
    hparams : dict
        Needs ``data_folder``; ``avoid_if_longer_than`` applies when sorted.
    label_encoder : sb.dataio.encoder.CTCTextEncoder
        Encodes ``wrd`` characters into ``tokens``.
    sorting : str, optional
        ``"ascending"`` or ``"descending"`` by duration; otherwise file order.
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
    """Train, valid and test datasets and the label encoder of the centralized
    recipe.

    ``hparams`` needs ``train_csv``, ``valid_csv``, ``test_csv`` (a list, keyed
    by stem in the result), ``data_folder``, ``save_folder``, ``blank_index``
    and ``sorting``; ``label_encoder`` defaults to :func:`build_label_encoder`
    of ``train_csv``.
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
    """Write the manifests of ``hparams["splits"]`` to ``output_folder``, unless
    done already (``hparams`` also needs ``data_folder`` and ``skip_prep``).
    """
    from speechbrain_omc.data.librispeech import prepare_librispeech

    prepare_librispeech(
        data_folder=hparams["data_folder"],
        save_folder=hparams["output_folder"],
        splits=hparams["splits"],
        skip_prep=hparams["skip_prep"],
        progress=progress,
    )
