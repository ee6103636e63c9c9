"""The fast paths change no decision: cache on/off and the naive (authors') way agree."""

import keras
import numpy as np
import pandas as pd
import pytest

from dqc.checkpoint import cycle_paths
from dqc.runs import QCSpec, RunSpec, authors_way, run_quality_control

#: error 0 and a naive path that predicts one volume at a time: the most float-sensitive
#: comparison of decisions in the suite (make test runs it again with oneDNN off)
pytestmark = pytest.mark.decisions


@pytest.fixture(scope="module")
def cohort(pretrained_one):
    return pretrained_one


def qc(cohort, out, naive=False, **options):
    spec = RunSpec(train_csv=str(cohort["train"]), out=str(out), prefix="qc",
                   cycles=range(cohort["start"], cohort["start"] + 2), seed=42,
                   encoder=str(cohort["encoder"]), classifier=str(cohort["classifier"]),
                   verbose=False, echo=lambda line: None, **options)
    spec = authors_way(spec) if naive else spec
    policy = run_quality_control(spec, QCSpec(val_csv=str(cohort["val"]), error=0.0,
                                              revisit=1, name="qc"))
    return pd.DataFrame(policy.state.log), policy.eliminated(), spec.execution.timings


def final_weights(out, cycle):
    paths = cycle_paths(out, "qc", cycle)
    return [w for part in ("encoder", "classifier")
            for w in keras.saving.load_model(paths[part]).get_weights()]


def test_cache_off_and_naive_make_the_same_decisions(cohort, tmp_path):
    log, eliminated, fast = qc(cohort, tmp_path / "fast")
    last = cohort["start"] + 1
    weights = final_weights(tmp_path / "fast", last)
    for name, options in {"nocache": {"cache": False}, "naive": {"naive": True}}.items():
        other_log, other_eliminated, timings = qc(cohort, tmp_path / name, **options)
        pd.testing.assert_frame_equal(log, other_log)
        assert other_eliminated == eliminated
        other = final_weights(tmp_path / name, last)
        assert all(np.array_equal(a, b) for a, b in zip(weights, other))
    # the naive path predicted one image at a time and read each from disk every time
    n_val = len(pd.read_csv(cohort["val"]))
    assert timings.calls["evaluate"] == n_val * fast.calls["evaluate"] // -(-n_val // 16)
