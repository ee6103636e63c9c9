"""The harm rule and the rates, as pure functions: no TensorFlow involved."""

import subprocess
import sys

import numpy as np
import pytest

from dqc.qc import (Evaluation, QualityControl, evaluate_predictions, is_harmful,
                    per_image_tolerance_problems)


def ev(fpr: float, fnr: float) -> Evaluation:
    return Evaluation(acc=0.0, fp=0, fn=0, fpr=fpr, fnr=fnr)


def test_threshold_scales_with_number_of_images():
    ref = ev(0.10, 0.10)
    new = ev(0.16, 0.10)  # a rise of 0.06
    assert is_harmful(new, ref, n_images=1, error=0.02)       # limit 0.02
    assert is_harmful(new, ref, n_images=2, error=0.02)       # limit 0.04
    assert not is_harmful(new, ref, n_images=3, error=0.02)   # limit 0.06: equal, not harmful
    assert not is_harmful(new, ref, n_images=5, error=0.02)   # limit 0.10


def test_rise_equal_to_threshold_is_not_harmful_despite_rounding():
    # 0.1 + 0.02 is 0.12000000000000001 in floating point; 6/50 is 0.12
    assert not is_harmful(ev(6 / 50, 0.0), ev(5 / 50, 0.0), 1, 0.02)
    assert not is_harmful(ev(0.0, 7 / 50), ev(0.0, 2 / 50), 5, 0.02)
    assert is_harmful(ev(0.0, 8 / 50), ev(0.0, 2 / 50), 5, 0.02)


@pytest.mark.parametrize("new", [ev(0.5, 0.0), ev(0.0, 0.5)])
def test_either_rate_alone_triggers(new):
    assert is_harmful(new, ev(0.0, 0.0), 1, 0.02)


def test_falling_rates_are_never_harmful():
    assert not is_harmful(ev(0.0, 0.0), ev(0.9, 0.9), 1, 0.0)


def test_rates_use_standard_denominators_and_legacy_option():
    y = np.array([0, 0, 0, 0, 1, 1])          # 4 HC, 2 PD
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])  # 1 FP, 1 FN (0.5 counts as PD)
    e = evaluate_predictions(y, s)
    assert (e.fp, e.fn) == (1, 1)
    assert e.fpr == pytest.approx(1 / 4) and e.fnr == pytest.approx(1 / 2)
    assert e.acc == pytest.approx(4 / 6)
    legacy = evaluate_predictions(y, s, legacy_rates=True)
    assert legacy.fpr == pytest.approx(1 / 2) and legacy.fnr == pytest.approx(1 / 4)


def test_small_validation_set_warning():
    assert per_image_tolerance_problems(50, 50, 0.02) == []
    problems = per_image_tolerance_problems(24, 24, 0.02)
    assert len(problems) == 2 and "1/24" in problems[0]
    assert len(per_image_tolerance_problems(60, 20, 0.02)) == 1


class FakeModel:
    """A scalar 'model': an update adds the ids' harm to the error rates."""

    def __init__(self, harm: dict[str, float]):
        self.harm, self.fnr, self.calls = harm, 0.0, []

    def train(self, center, ids):
        self.calls.append(list(ids))
        self.fnr += sum(self.harm.get(s, 0.0) for s in ids)
        return 0.0, 1.0

    def evaluate(self, ids):
        return ev(0.0, self.fnr)

    def snapshot(self):
        return self.fnr

    def restore(self, value):
        self.fnr = value


def make_policy(model, error=0.02, revisit=2, studies=None):
    return QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                          error=error, revisit=revisit,
                          studies=studies or {s: "A" for s in "abcdefg"})


def test_reference_is_last_accepted_row_not_last_row():
    # a: +0.015, accepted (reference 0.015). b: +0.05, rejected and undone (its rows read
    # 0.065). c: +0.03 reads 0.045: harmful against the accepted 0.015, though it would look
    # like an improvement against b's rejected 0.065.
    model = FakeModel({"a": 0.015, "b": 0.05, "c": 0.03})
    qc = make_policy(model)
    qc.baseline()
    qc.cycle = 10
    for s in "abc":
        qc.verify_batch("A", [s])
    ignored = [(r["Subject"], r["Ignored"]) for r in qc.state.log]
    assert ignored == [("n/a", 0), ("batch", 0), ("batch", 1), ("b", 1), ("batch", 1), ("c", 1)]
    assert qc.state.reference.fnr == pytest.approx(0.015)
    assert model.fnr == pytest.approx(0.015)  # b's and c's updates were undone


def test_batch_retry_flags_only_the_harmful_image():
    model = FakeModel({"c": 0.5})
    qc = make_policy(model)
    qc.baseline()
    qc.cycle = 10
    qc.verify_batch("A", ["a", "b", "c", "d", "e"])
    rows = [(r["Subject"], r["Ignored"]) for r in qc.state.log[1:]]
    assert rows == [("batch", 1), ("a", 0), ("b", 0), ("c", 1), ("d", 0), ("e", 0)]
    assert qc.state.schedule == {12: ["c"]}
    assert qc.select("A", list("abcdefg")) == list("abdefg")
    assert qc.status("c") == "pending"


def test_policy_module_does_not_import_a_deep_learning_backend():
    code = ("import sys, dqc.qc; bad = {'tensorflow', 'keras', 'jax', 'torch'} & "
            "set(m.split('.')[0] for m in sys.modules); print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
