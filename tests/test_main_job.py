"""The main job's reading of the multi-seed record (the job itself runs in
tests/test_federated_recipe.py)."""

import math

import pytest

from speechbrain_omc.asr.stats import Interval
from speechbrain_omc.experiments.main_job import read_seed_comparison, reading

HEADER = "cell,seed,test_WER,valid_WER\n"


def _record(tmp_path, rows: str):
    path = tmp_path / "runs.csv"
    path.write_text(HEADER + rows, encoding="utf-8")
    return path


def test_the_record_pairs_the_seeds_both_configurations_ran(tmp_path):
    path = _record(
        tmp_path,
        "float32,1,10.0,9\ndefault,1,10.5,9\nfloat32,2,12.0,9\n"
        "default,2,12.1,9\ndefault,3,30.0,9\nbf16_sr,1,50.0,9\n",
    )
    record = read_seed_comparison(path)
    # Seed 3 has no float32 twin and bf16_sr is another configuration.
    assert record.difference.n == 2
    assert record.difference.value == pytest.approx(0.3)
    assert record.omc.value == pytest.approx(11.3)
    assert record.float32.value == pytest.approx(11.0)
    # Student-t with one degree of freedom: 12.706 standard errors.
    assert record.difference.high - 0.3 == pytest.approx(12.706 * 0.2, rel=1e-3)


def test_a_missing_short_or_malformed_record_gives_nothing(tmp_path):
    assert read_seed_comparison(tmp_path / "absent.csv") is None
    one_seed = _record(tmp_path, "float32,1,10,9\ndefault,1,11,9\n")
    assert read_seed_comparison(one_seed) is None
    bad = _record(tmp_path, "float32,1,ten,9\ndefault,1,11,9\nfloat32,2,,9\n")
    assert read_seed_comparison(bad) is None
    pairs = "float32,1,10,9\ndefault,1,11,9\nfloat32,2,10,9\ndefault,2,11,9\n"
    assert read_seed_comparison(_record(tmp_path, pairs)) is not None
    for contradiction in ("default,2,nan,9\n", "float32,1,12,9\n", "default, 2,9,9\n"):
        record = _record(tmp_path, pairs + contradiction)
        assert read_seed_comparison(record) is None, contradiction


def test_the_reading_states_the_record_and_whether_this_run_agrees(tmp_path):
    path = _record(
        tmp_path,
        "".join(f"float32,{s},{10 + s % 2},9\ndefault,{s},{10.5 + s % 2},9\n"
                for s in range(8)),
    )  # fmt: skip
    record = read_seed_comparison(path)
    assert record.difference.value == pytest.approx(0.5)
    assert record.difference.low == pytest.approx(0.5)  # no spread
    results = {"OMC": {"test_utterances": 800, "test_words": 4000}}
    near = reading(results, Interval(0.4, -0.6, 1.4, 0.5, 800), record)
    assert "over 8 seeds" in near and "+0.50 points [+0.50, +0.50]" in near
    assert "OMC ends 0.50 points above float32" in near
    assert "agrees with it" in near
    far = reading(results, Interval(-2.0, -2.9, -1.1, 0.5, 800), record)
    assert "lies outside the record's interval" in far
    assert "The record over" not in reading(results, None)


def test_a_record_within_noise_says_so(tmp_path):
    rows = "float32,1,10\ndefault,1,10.5\nfloat32,2,11\ndefault,2,10.7\n"
    path = tmp_path / "runs.csv"
    path.write_text("cell,seed,test_WER\n" + rows, encoding="utf-8")
    record = read_seed_comparison(path)
    assert math.isclose(record.difference.value, 0.1)
    assert record.verdict() == "over seeds, OMC cannot be told from float32"
