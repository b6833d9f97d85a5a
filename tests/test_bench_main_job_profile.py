"""benchmarks/main_job_profile.py: samples charged to the parts of a step."""

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("main_job_profile")


def test_each_sample_goes_to_the_first_part_on_its_stack(bench):
    step = "UpdatePolicy.step (speechbrain_omc/engine/updates.py:9)"
    decode = "OMCHandle._decode (speechbrain_omc/engine/handle.py:3)"
    fit = "OMCMixin.fit_batch (speechbrain_omc/brain.py:1)"
    stacks = [
        (f"{fit};{step};adam_step (speechbrain_omc/codec/kernels.py:1)", 5),
        (f"{fit};{step};HeldGradients.release (clipping.py:2)", 2),
        # A decode inside backward is the decoding's, not the backward's.
        (f"{fit};_engine_run_backward (graph.py:1);{decode};decode_prepared (k:1)", 4),
        (f"{fit};_engine_run_backward (graph.py:1)", 7),
        (f"Brain.evaluate (core.py:1);{decode}", 1),
        ("Brain.evaluate (core.py:1);forward (m.py:1)", 3),
        (f"{fit};compute_forward (asr.py:1)", 6),
        ("<module> (federation.py:1)", 8),
    ]
    counts = bench.attribute(stacks)
    names = [name for name, _, _ in bench.PARTS]
    assert counts[names[0]] == 7 and counts[(names[0], "kernel")] == 5
    assert counts[names[2]] == 5 and counts[(names[2], "kernel")] == 4
    assert counts["evaluation (validation and test)"] == 3
    assert counts["backward"] == 7
    assert counts["forward and loss (training)"] == 6
    assert counts[names[-1]] == 8
    assert sum(v for k, v in counts.items() if isinstance(k, str)) == 36

    fp32 = bench.attribute([(f"{fit};_engine_run_backward (graph.py:1)", 24)])
    omc = bench.table({"fed_fp32.yaml": fp32, "fed_omc.yaml": counts}, rate=10)
    assert "| **total** | 2.4 | 3.6 | +1.2 (1.500x) |" in omc
    assert "| backward | 2.4 | 0.7 | -1.7 |" in omc
    assert f"| {names[0]}: kernel | - | 0.5 | |" in omc
    assert f"| {names[0]}: the rest (Python, copies) | - | 0.2 | |" in omc
