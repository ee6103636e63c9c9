"""The criteria beside the paper's rule (`--criterion`): pure functions, the policy with
stand-in callables (no TensorFlow), and the log the QC script writes under each."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dqc.criteria import (CRITERIA, CRITERION_COLUMNS, LOG_COLUMNS, MIN_WINDOW,
                          PRETRAINING_WINDOW, Combined, HeldOut, Loss, McNemar, Rates, TrainLoss,
                          Witnessed, Confirmed, Anchored, Balanced, Separated, Abstaining, Pooled,
                          Centered, Verdict,
                          at_least, center_floor,
                          binomial_tail, make_criterion, mcnemar_verdict, robust_limit,
                          self_set_verdict)
from dqc.errors import DQCError
from dqc.qc import (Evaluation, QCState, QualityControl, describe_calibration,
                    evaluate_predictions, mixed_draw, one_label_centers)

ROOT = Path(__file__).resolve().parents[1]
TRUTH = "000000111111"


def predicted(wrong: set[int], truth: str = TRUTH) -> Evaluation:
    """An evaluation whose predictions are wrong exactly at the `wrong` positions."""
    pred = "".join(("1" if t == "0" else "0") if i in wrong else t for i, t in enumerate(truth))
    return Evaluation(acc=0.0, fp=0, fn=0, fpr=0.0, fnr=0.0, loss=0.5, pred=pred, truth=truth)


# --- McNemar -----------------------------------------------------------------------------------

def test_binomial_tail_by_hand():
    assert binomial_tail(6, 6) == 1 / 64
    assert binomial_tail(5, 6) == 7 / 64
    assert binomial_tail(3, 6) == 42 / 64
    assert binomial_tail(0, 0) == 1.0


@pytest.mark.parametrize("ref_wrong, new_wrong, p, harmful", [
    (set(), {0, 1, 2, 6, 7, 8}, 1 / 64, True),             # b=6, c=0
    ({11}, {0, 1, 2, 6, 7}, 7 / 64, False),                # b=5, c=1: p = 0.109
    ({9, 10, 11}, {0, 1, 2}, 42 / 64, False),              # b=c=3
    ({3}, {0, 1, 2, 3, 6, 7, 8}, 1 / 64, True),            # unchanged errors do not count
    ({0, 1, 2, 6, 7, 8}, set(), 1.0, False),               # b=0, c=6: better, never harmful
])
def test_mcnemar_by_hand(ref_wrong, new_wrong, p, harmful):
    verdict = mcnemar_verdict(predicted(new_wrong), predicted(ref_wrong), alpha=0.05)
    assert verdict.harmful is harmful
    assert verdict.statistic == pytest.approx(p, rel=1e-12) and verdict.limit == 0.05


def test_mcnemar_needs_the_same_images():
    with pytest.raises(ValueError):
        mcnemar_verdict(predicted(set()), predicted(set(), truth="0011"), 0.05)


# --- validation loss ---------------------------------------------------------------------------

def test_loss_statistic_is_the_rise_per_image_and_reads_the_loss_only():
    rule = Loss(z=3.0)
    ref = Evaluation(0, 0, 0, 0, 0, loss=0.5)
    window = [0.001 * i for i in range(-5, 5)]  # median -0.0005, MAD 0.0025
    limit = robust_limit(window, 3.0)
    over = rule.judge(Evaluation(0, 0, 0, 0.0, 0.0, loss=0.5 + 5 * (limit + 1e-6)), ref, 5,
                      0.0, window)
    assert over.harmful and over.statistic == pytest.approx(limit + 1e-6)
    assert over.limit == pytest.approx(limit)
    # the rates may soar: this criterion reads the loss only
    assert not rule.judge(Evaluation(0, 0, 0, 0.9, 0.9, loss=0.5), ref, 5, 0.0, window).harmful
    assert rule.window_key(5) == "val_rise:batch" and rule.window_key(1) == "val_rise:image"


# --- training loss against the accepted window ------------------------------------------------

WINDOW = [1.0, 1.1, 0.9, 1.2, 0.8, 1.0, 1.05, 0.95, 1.0, 1.3]
# median 1.0; |deviations| sorted 0,0,0,.05,.05,.1,.1,.2,.2,.3: MAD 0.075
LIMIT = 1.0 + 3 * 1.4826 * 0.075  # 1.333585


def test_self_set_limit_by_hand():
    assert robust_limit(WINDOW, 3.0) == pytest.approx(LIMIT, rel=1e-12)
    assert not self_set_verdict(1.33, WINDOW, 3.0).harmful
    verdict = self_set_verdict(1.34, WINDOW, 3.0)
    assert verdict.harmful and verdict.statistic == 1.34
    assert verdict.limit == pytest.approx(LIMIT, rel=1e-12)


def test_self_set_decides_nothing_while_the_window_is_short():
    verdict = self_set_verdict(100.0, WINDOW[:9], 3.0)
    assert not verdict.harmful and math.isnan(verdict.limit)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_statistic_is_harmful_even_before_the_window_fills(value):
    assert self_set_verdict(value, [], 3.0).harmful
    assert self_set_verdict(value, WINDOW, 3.0).harmful


def stream(criterion: TrainLoss, values: list[float], window: list[float]) -> list[bool]:
    """Judge each value against the window of the accepted ones before it, as the policy does
    (a flagged value stays out of the window)."""
    flags = []
    for value in values:
        verdict = criterion.judge(None, None, 5, value, window)
        flags.append(verdict.harmful)
        if not verdict.harmful:
            window[:] = criterion.remember(window, value)
    return flags


def test_self_set_threshold_flags_a_shift_and_follows_a_slow_drift():
    rng = np.random.default_rng(1)
    rule = TrainLoss(z=3.0, window=50)
    window = list(0.3 + 0.02 * rng.standard_normal(20))
    # a slow drift: the training loss falls by half over 300 updates, noise as before
    drift = list(0.3 - 0.15 * np.arange(300) / 300 + 0.02 * rng.standard_normal(300))
    flags = stream(rule, drift, window)
    assert sum(flags) <= 3  # z = 3: ~0.13% nominal false flags; none from the drift itself
    # a shift: a harmful center's batches, 4 standard deviations above the current level
    level = float(np.median(window))
    assert all(stream(rule, [level + 0.08 + 0.005 * i for i in range(5)], window))
    # an upward drift as slow as the noise allows is followed, not flagged
    creep = list(level + 0.0002 * np.arange(200) + 0.02 * rng.standard_normal(200))
    assert sum(stream(rule, creep, window)) <= 2


# --- evaluation --------------------------------------------------------------------------------

def test_evaluation_loss_auroc_and_predictions_by_hand():
    e = evaluate_predictions(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.8]))
    assert e.pred == "0101" and e.truth == "0011"
    bce = -(math.log(0.9) + math.log(0.4) + math.log(0.4) + math.log(0.8)) / 4
    assert e.loss == pytest.approx(bce, rel=1e-12)
    assert e.auroc == pytest.approx(3 / 4)  # of the 4 (PD, HC) pairs, 0.4 < 0.6 is misordered
    tied = evaluate_predictions(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9]))
    assert tied.auroc == pytest.approx(3.5 / 4)  # the tie counts half
    sure_misses = evaluate_predictions(np.array([1, 0]), np.array([0.0, 1.0]))
    assert sure_misses.loss == pytest.approx(-math.log(1e-7), rel=1e-6)  # clipped like Keras


def test_old_style_evaluation_still_builds():
    e = Evaluation(0.5, 1, 2, 0.1, 0.2)
    assert math.isnan(e.loss) and math.isnan(e.auroc) and e.pred == ""


def test_state_round_trip_keeps_the_windows_and_the_calibration():
    state = QCState(reference=Evaluation(0.75, 1, 0, 0.5, 0.0, loss=0.42, auroc=0.875,
                                         pred="0101", truth="0011"),
                    log=[{"Cycle": 0, "STATISTIC": math.nan}],
                    windows={"train_loss:batch": [0.7, 0.6], "check_rise:image": [0.01]},
                    calibration={"steps": 10, "evaluations": 10, "seconds": 1.5,
                                 "windows": {"check_rise:image": {"pre-training": 0,
                                                                  "calibration": 10}}})
    back = QCState.from_json(json.loads(json.dumps(state.to_json())))
    assert back.reference == state.reference and back.windows == state.windows
    assert back.calibration == state.calibration
    assert json.dumps(back.to_json()) == json.dumps(state.to_json())
    old = state.to_json()
    del old["windows"], old["calibration"]
    old["train_losses"] = [0.7, 0.6]  # a checkpoint written before the windows
    assert QCState.from_json(old).windows == {PRETRAINING_WINDOW: [0.7, 0.6]}


# --- each criterion: its parameters, its needs ---------------------------------------------------

@pytest.mark.parametrize("name, given, message", [
    ("rates", {"error": math.nan}, "-error must be a finite number, got nan"),
    ("rates", {"error": math.inf}, "-error must be a finite number, got inf"),
    ("rates", {"error": -0.01}, "-error must be 0 or more, got -0.01"),
    ("mcnemar", {"alpha": 0.0}, "--alpha must be between 0 and 1"),
    ("mcnemar", {"alpha": 1.5}, "--alpha must be between 0 and 1"),
    ("mcnemar", {"alpha": math.nan}, "--alpha must be a finite number"),
    ("combined", {"z": 0.0}, "--z must be greater than 0"),
    ("loss", {"z": math.inf}, "--z must be a finite number"),
    ("trainloss", {"window": 9}, "--window must be a whole number of at least 10"),
    ("heldout", {"window": 12.5}, "--window must be a whole number of at least 10"),
    ("combined", {"error": 0.0003}, "-error means nothing for --criterion combined "
                                    "(its flags: --z, --window)"),
    ("rates", {"z": 3.0}, "--z means nothing for --criterion rates (its flags: -error)"),
    ("mcnemar", {"window": 20}, "--window means nothing for --criterion mcnemar"),
    ("vibes", {}, "--criterion must be one of rates, loss, mcnemar, trainloss, heldout, "
                  "combined, witnessed, confirmed, anchored, balanced, separated, abstaining, "
                  "stratified, pooled, centered, got 'vibes'"),
])
def test_each_criterion_checks_its_own_parameters(name, given, message):
    with pytest.raises(DQCError) as info:
        make_criterion(name, **given)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_each_criterion_says_what_it_needs():
    assert [CRITERIA[n]().evaluation_detail() for n in CRITERIA] == \
        ["counts", "scores", "predictions", "scores", "scores", "scores", "scores", "scores",
         "scores", "scores", "scores", "scores", "scores", "scores", "scores"]
    assert [n for n in CRITERIA if not CRITERIA[n]().retries_alone()] == \
        ["witnessed", "confirmed", "anchored", "balanced", "separated", "abstaining", "stratified",
         "pooled", "centered"]
    assert [n for n in CRITERIA if CRITERIA[n]().anchors_revisit()] == \
        ["anchored", "balanced", "separated", "abstaining", "stratified", "pooled", "centered"]
    assert [n for n in CRITERIA if CRITERIA[n]().mixes_witnesses()] == \
        ["balanced", "separated", "abstaining", "stratified", "pooled", "centered"]
    assert [n for n in CRITERIA if CRITERIA[n]().separates_labels()] == ["separated"]
    assert [n for n in CRITERIA if not CRITERIA[n]().judges_one_label_centers()] == \
        ["abstaining", "stratified", "pooled", "centered"]
    assert [n for n in CRITERIA if CRITERIA[n]().stratifies_batches()] == ["stratified"]
    assert [n for n in CRITERIA if CRITERIA[n]().borrows_witnesses()] == ["pooled", "centered"]
    assert [n for n in CRITERIA if CRITERIA[n]().judges_against_center()] == ["centered"]
    assert [n for n in CRITERIA if CRITERIA[n]().confirmation() is not None] == ["confirmed"]
    assert Confirmed(z=2.5, window=20).confirmation() == HeldOut(z=2.5, window=20)
    assert not Confirmed().needs_evaluation(5)
    assert not Witnessed().needs_evaluation(5) and not Witnessed().needs_evaluation(1)
    assert make_criterion("rates").parameters() == {"name": "rates", "error": 0.02}
    assert make_criterion("combined", z=2.5).parameters() == \
        {"name": "combined", "z": 2.5, "window": 50}
    assert Rates().log_columns() == LOG_COLUMNS
    assert Combined().log_columns() == LOG_COLUMNS + CRITERION_COLUMNS
    assert not TrainLoss().needs_evaluation(5) and not Combined().needs_evaluation(5)
    assert Combined().needs_evaluation(1) and Loss().needs_evaluation(5)
    assert HeldOut().holds_out_momentum(5) and Combined().holds_out_momentum(1)
    assert not Combined().holds_out_momentum(5) and not Loss().holds_out_momentum(1)
    assert Rates().window_key(5) is None and McNemar().window_key(1) is None
    assert [Combined().window_key(n) for n in (5, 1)] == ["train_loss:batch", "check_rise:image"]
    assert [HeldOut().window_key(n) for n in (5, 1)] == ["check_rise:batch", "check_rise:image"]
    assert TrainLoss().window_key(5) == PRETRAINING_WINDOW


# --- the policy with stand-ins -----------------------------------------------------------------

class FakeModel:
    """A 'model' that is its set of misclassified validation images; an update breaks and
    fixes the images `effects[subject]` says and reports that subject's training loss."""

    def __init__(self, effects: dict[str, tuple[set[int], set[int]]],
                 losses: dict[str, float] | None = None):
        self.effects, self.losses, self.wrong = effects, losses or {}, frozenset()

    def train(self, center, ids):
        for s in ids:
            breaks, fixes = self.effects.get(s, (set(), set()))
            self.wrong = (self.wrong | breaks) - fixes
        return float(np.mean([self.losses.get(s, 1.0) for s in ids])), 1.0

    def evaluate(self, ids):
        return predicted(set(self.wrong))

    def snapshot(self):
        return self.wrong

    def restore(self, value):
        self.wrong = value


def policy(model: FakeModel, criterion, subjects: str, **kwargs) -> QualityControl:
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=criterion, revisit=2, studies={s: "A" for s in subjects},
                        **kwargs)
    qc.baseline()
    qc.cycle = 10
    return qc


def test_mcnemar_policy_flags_the_harmful_image_of_a_batch():
    model = FakeModel({"g": (set(), {11}), "h": ({0, 1, 2, 3, 6, 7, 8}, set())})
    model.wrong = frozenset({11})
    qc = policy(model, McNemar(alpha=0.05), "gh")
    qc.verify_batch("A", ["g", "h"])
    rows = [(r["Subject"], r["Ignored"]) for r in qc.state.log]
    assert rows == [("n/a", 0), ("batch", 1), ("g", 0), ("h", 1)]
    stats = [r["STATISTIC"] for r in qc.state.log[1:]]
    # batch: b=7, c=1, p = 9/256; g: b=0, c=1, p = 1; h after g: b=7, c=0, p = 1/128
    assert stats == pytest.approx([9 / 256, 1.0, 1 / 128], rel=1e-12)
    assert qc.state.log[2]["LIMIT"] == 0.05
    assert model.wrong == frozenset()  # g's fix kept, h's damage undone
    assert qc.status("h") == "pending" and qc.status("g") == "kept"
    assert all(list(r) == LOG_COLUMNS + CRITERION_COLUMNS for r in qc.state.log)
    assert math.isnan(qc.state.log[0]["STATISTIC"]) and math.isnan(qc.state.log[0]["TRAIN_LOSS"])


def pairs(names: str) -> list[list[str]]:
    return [list(names[i:i + 2]) for i in range(0, len(names), 2)]


def test_trainloss_windows_hold_accepted_updates_only_batches_and_images_apart():
    good = "abcdefghijklmnopqrstuvwx"  # 12 accepted batches of two, losses 1.00..1.23
    losses = {s: 1.0 + i / 100 for i, s in enumerate(good)} | {"y": 9.0, "z": 1.11}
    model = FakeModel({}, losses)
    qc = policy(model, TrainLoss(z=3.0, window=10), good + "yz")
    for batch in pairs(good):
        qc.verify_batch("A", batch)
    batch_losses = [np.mean([losses[s] for s in b]) for b in pairs(good)]
    assert qc.state.windows["train_loss:batch"] == pytest.approx(batch_losses[-10:])
    # nothing was flagged before ten losses were known, however the losses went
    assert all(r["Ignored"] == 0 for r in qc.state.log)
    qc.state.windows["train_loss:image"] = [1.0 + i / 100 for i in range(10)]
    qc.verify_batch("A", ["y", "z"])  # batch loss 5.055: flagged; y alone flagged, z kept
    assert [(r["Subject"], r["Ignored"]) for r in qc.state.log[-3:]] == \
        [("batch", 1), ("y", 1), ("z", 0)]
    assert qc.state.windows["train_loss:batch"] == pytest.approx(batch_losses[-10:])
    assert qc.state.windows["train_loss:image"][-1] == 1.11  # z's accepted loss: its own window
    assert 9.0 not in qc.state.windows["train_loss:image"]
    assert qc.status("y") == "pending" and qc.status("z") == "kept"


def witnessed_case(seed: int) -> tuple[QualityControl, FakeModel, list[list[str]]]:
    """`witnessed` over a wholly harmful center H (h0..h4, own loss 5), a mixed one M (m0..m8
    good, mx harmful) and a good one G, after cycle 10's regular pass; every update made
    from then on is listed (the ids)."""
    good = {f"m{i}": 0.1 for i in range(9)} | {f"g{i}": 0.1 for i in range(5)}
    losses = good | {"mx": 5.0} | {f"h{i}": 5.0 for i in range(5)}
    # each image's update marks one validation image wrong: the state shows what was kept
    model = FakeModel({s: ({i % 12}, set()) for i, s in enumerate(losses)}, losses)
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Witnessed(), revisit=2,
                        studies={s: s[0].upper() for s in losses})
    qc.baseline()
    qc.calibrate(batch_size=5, seed=seed, pretraining=[0.1 + i / 1000 for i in range(10)])
    qc.start_cycle(10)
    for center, batch in [("H", [f"h{i}" for i in range(5)]),
                          ("M", ["m0", "m1", "m2", "m3", "mx"]),
                          ("M", ["m4", "m5", "m6", "m7", "m8"]),
                          ("G", [f"g{i}" for i in range(5)])]:
        qc.verify_batch(center, batch)
    trained: list[list[str]] = []
    train = model.train
    model.train = lambda center, ids: trained.append(list(ids)) or train(center, ids)
    qc.train = model.train
    return qc, model, trained


def test_witnessed_flags_whole_batches_and_confirms_each_image_among_kept_ones():
    """A flagged batch's images are all suspects at once (no one-image step); at the revisit
    each is judged in a batch of five with kept images of its center (co-suspects where the
    center has none), against the batches' window, and every such step is undone."""
    qc, model, trained = witnessed_case(seed=0)
    assert [(r["Subject"], r["Ignored"]) for r in qc.state.log[1:]] == \
        [("batch", 1), ("batch", 1), ("batch", 0), ("batch", 0)]
    suspects = {f"h{i}" for i in range(5)} | {"m0", "m1", "m2", "m3", "mx"}
    assert {s for s in qc.state.images if qc.status(s) == "pending"} == suspects
    window, kept_state = list(qc.state.windows["train_loss:batch"]), model.wrong
    qc.start_cycle(11)
    qc.revisit_pass()
    assert trained == []  # nothing due in cycle 11
    qc.start_cycle(12)
    qc.revisit_pass()
    assert [ids[0] for ids in trained] == \
        [f"h{i}" for i in range(5)] + ["m0", "m1", "m2", "m3", "mx"]
    assert all(len(ids) == 5 and len(set(ids)) == 5 for ids in trained)
    for ids in trained:
        center = ids[0][0]
        assert all(s[0] == center for s in ids)
        if center == "M":  # witnesses: M's kept images, never another suspect
            assert set(ids[1:]) <= {"m4", "m5", "m6", "m7", "m8"}
    assert sorted(qc.eliminated()) == sorted({f"h{i}" for i in range(5)} | {"mx"})
    assert all(qc.status(s) == "kept" for s in ("m0", "m1", "m2", "m3"))
    assert model.wrong == kept_state  # every confirmation step undone, passed or not
    assert qc.state.windows["train_loss:batch"] == window  # suspects enter no window
    rows = qc.state.log[-10:]
    assert [r["Subject"] for r in rows] == [ids[0] for ids in trained]
    assert [r["Ignored"] for r in rows] == [1] * 5 + [0] * 4 + [1]
    assert rows[-1]["TRAIN_LOSS"] == pytest.approx((5.0 + 4 * 0.1) / 5)


def test_witnesses_are_drawn_with_the_runs_seed():
    draws = []
    for seed in (0, 0, 1):
        qc, _, trained = witnessed_case(seed)
        qc.start_cycle(12)
        qc.revisit_pass()
        draws.append([ids[1:] for ids in trained if ids[0].startswith("m")])
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_at_least_raises_the_limit_to_the_floor_only():
    assert at_least(Verdict(True, 0.5, 0.2), 0.6) == Verdict(False, 0.5, 0.6)
    assert at_least(Verdict(True, 0.7, 0.2), 0.6) == Verdict(True, 0.7, 0.6)
    assert at_least(Verdict(True, 0.5, 0.2), 0.1) == Verdict(True, 0.5, 0.2)  # floor below
    assert at_least(Verdict(True, 0.5, 0.2), None) == Verdict(True, 0.5, 0.2)
    assert at_least(Verdict(False, 0.5), 0.6) == Verdict(False, 0.5)  # a short window
    nan = at_least(Verdict(True, math.nan, 0.2), 0.6)
    assert nan.harmful and nan.limit == 0.2  # a non-finite statistic stays harmful


def anchored_run(criterion) -> tuple[QualityControl, float]:
    """Cycle 10 flags P's slow batch (own loss 1.2, above the pre-training's window of ~1.0)
    and H's harmful one (9.0); then ten kept batches at ~0.1 bring the window down. At the
    revisit in cycle 12 each p image with four kept images of P (own 0.1) has loss 0.32:
    above the window's limit now, below the limit its flag exceeded. Returns the policy and
    that flag-time limit."""
    losses = {f"p{i}": 1.2 for i in range(5)} | {f"q{i}": 0.1 for i in range(5)} | \
        {f"h{i}": 9.0 for i in range(5)} | {f"g{i:02d}": 0.1 + i / 1000 for i in range(50)}
    model = FakeModel({}, losses)
    studies = {s: ("P" if s[0] in "pq" else s[0].upper()) for s in losses}
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=criterion, revisit=2, studies=studies)
    qc.baseline()
    qc.calibrate(batch_size=5, seed=0, pretraining=[1.0 + i / 1000 for i in range(10)])
    qc.start_cycle(10)
    qc.verify_batch("P", [f"p{i}" for i in range(5)])
    flag_limit = qc.state.log[-1]["LIMIT"]
    qc.verify_batch("H", [f"h{i}" for i in range(5)])
    qc.verify_batch("P", [f"q{i}" for i in range(5)])
    for i in range(0, 50, 5):
        qc.verify_batch("G", [f"g{j:02d}" for j in range(i, i + 5)])
    qc.start_cycle(12)
    qc.revisit_pass()
    return qc, flag_limit


def test_anchored_judges_a_revisit_against_at_least_the_limit_its_flag_exceeded():
    """The same run under `witnessed` and `anchored`: both eliminate the harmful center H;
    only `witnessed` eliminates P's slow images, whose revisit is a high outlier only against
    the window that fell while they waited."""
    harmful, slow = {f"h{i}" for i in range(5)}, {f"p{i}" for i in range(5)}
    witnessed, _ = anchored_run(Witnessed(z=3.0, window=10))
    anchored, flag_limit = anchored_run(Anchored(z=3.0, window=10))
    assert flag_limit == pytest.approx(1.0045 + 3 * 1.4826 * 0.0025)
    assert witnessed.eliminated() == harmful | slow
    assert anchored.eliminated() == harmful
    assert all(anchored.status(s) == "kept" for s in slow)
    rows = {r["Subject"]: r for r in anchored.state.log if r["Cycle"] == 12}
    now = {r["Subject"]: r for r in witnessed.state.log if r["Cycle"] == 12}
    for s in slow:
        assert rows[s]["STATISTIC"] == pytest.approx(0.32) == now[s]["STATISTIC"]
        assert now[s]["LIMIT"] < 0.2 and now[s]["Ignored"] == 1
        assert rows[s]["LIMIT"] == flag_limit and rows[s]["Ignored"] == 0
        assert anchored.state.images[s].flagged_limit == flag_limit
    assert all(rows[h]["Ignored"] == 1 and rows[h]["STATISTIC"] == 9.0 for h in harmful)
    state = QCState.from_json(json.loads(json.dumps(anchored.state.to_json())))
    assert state.images["p0"].flagged_limit == flag_limit  # a resumed run floors the same


def test_mixed_draw_evens_the_labels_as_far_as_the_pool_allows():
    labels = {f"h{i}": 0 for i in range(8)} | {f"p{i}": 1 for i in range(3)}
    pool = [*(f"h{i}" for i in range(1, 8)), "p0", "p1", "p2"]
    rng = np.random.default_rng(0)
    drawn = set()
    for _ in range(200):
        picked = mixed_draw(pool, 4, labels, ["h0"], rng)
        assert len(set(picked)) == 4 and sorted(picked, key=pool.index) == picked
        pd_count = sum(labels[s] for s in picked)
        assert pd_count in (2, 3)  # h0 and four: 3 HC + 2 PD or 2 HC + 3 PD
        drawn |= set(picked)
    assert drawn == set(pool)  # at random within each label
    # the PD run out: the rest are HC; a pool of one label gives that label
    assert sorted(labels[s] for s in mixed_draw(pool, 6, labels, ["p0"], rng)) == [0] * 3 + [1] * 3
    assert all(labels[s] == 0 for s in mixed_draw(pool[:7], 4, labels, ["h0"], rng))


class LossOnlyModel:
    """A 'model' judged by its batches' own loss alone: no validation figure moves, and
    there is no state to snapshot or restore."""

    def evaluate(self, ids):
        return predicted(set())

    def snapshot(self):
        return None

    def restore(self, value):
        pass


class LabelMixModel(LossOnlyModel):
    """A batch's own loss as BatchNorm in training mode makes it: 0.9 for a batch of one
    label, 0.1 for a mixed one, 9.0 with a harmful image in it; it keeps the batches."""

    def __init__(self, labels: dict[str, int]):
        self.labels, self.batches = labels, []

    def train(self, center, ids):
        self.batches.append(list(ids))
        if any(s.startswith("h") for s in ids):
            return 9.0, 0.0
        return (0.9 if len({self.labels[s] for s in ids}) == 1 else 0.1), 1.0


def mixed_run(criterion, labels: dict[str, int], studies: dict[str, str],
              steps: list[tuple[int, str, list[str]]]) -> tuple[QualityControl, LabelMixModel]:
    """`LabelMixModel`'s batches (cycle, center, ids) verified in order, after a window of
    ~0.1, then cycle 12's revisit pass (its batches alone kept by the model, the regular
    pass's in `model.regular`)."""
    model = LabelMixModel(labels)
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=criterion, revisit=2, studies=studies,
                        labels=labels if criterion.mixes_witnesses() else None)
    qc.baseline()
    qc.calibrate(batch_size=5, seed=1, pretraining=[0.1 + i / 1000 for i in range(20)])
    for cycle, center, ids in steps:
        qc.start_cycle(cycle)
        qc.verify_batch(center, ids)
    qc.start_cycle(12)
    model.regular = list(model.batches)
    model.batches.clear()
    qc.revisit_pass()
    return qc, model


def label_mix_run(criterion) -> tuple[QualityControl, LabelMixModel]:
    """Center M: 15 HC (m0-m14) and 2 PD (n0, n1); its first batch is all HC and is flagged
    (0.9 against a window of ~0.1), its others are mixed and kept. Center H is harmful and
    mixed; center S is two PD images, all it has. Revisits in cycle 12."""
    labels = {f"m{i}": 0 for i in range(15)} | {"n0": 1, "n1": 1} | \
        {f"h{i}": i % 2 for i in range(5)} | {"s0": 1, "s1": 1}
    steps = [(10, c, ids) for c, ids in (
        ("M", [f"m{i}" for i in range(5)]), ("M", ["m5", "m6", "m7", "m8", "n0"]),
        ("M", ["m9", "m10", "m11", "m12", "n1"]), ("M", ["m13", "m14", "n0"]),
        ("H", [f"h{i}" for i in range(5)]), ("S", ["s0", "s1"]))]
    return mixed_run(criterion, labels, {s: "M" if s[0] in "mn" else s[0].upper() for s in labels},
                     steps)


def test_balanced_revisits_a_majority_label_image_with_witnesses_of_both_labels():
    """`anchored` draws M's witnesses at random from its kept images (10 HC, 2 PD): some
    revisit batches are all HC, whose loss is a harmful center's, and good images are
    eliminated. `balanced` puts both PD images in each: every M image is back in
    training. Both eliminate the harmful center H, and the one-label center S (no witness
    of the other label exists)."""
    one_label = {f"m{i}" for i in range(5)}
    harmful, small = {f"h{i}" for i in range(5)}, {"s0", "s1"}
    anchored, model_a = label_mix_run(Anchored(z=3.0, window=20))
    balanced, model_b = label_mix_run(Balanced(z=3.0, window=20))
    # the random draw left four of the five batches all HC (seed 1)
    assert anchored.eliminated() == harmful | small | {"m1", "m2", "m3", "m4"}
    for batch in model_a.batches:
        if batch[0] in {"m1", "m2", "m3", "m4"}:
            assert not {"n0", "n1"} & set(batch)
    assert balanced.eliminated() == harmful | small
    for batch in model_b.batches:
        if batch[0] in one_label:
            assert len(batch) == 5 and {"n0", "n1"} <= set(batch)
    assert all(balanced.status(s) == "kept" for s in one_label)


def test_separated_judges_a_revisit_of_one_label_against_batches_of_one_label():
    """Center S is two PD images and nothing else: its batch (own loss 0.9) is a high
    outlier among the mixed batches (~0.1) and is flagged under both `balanced` and
    `separated`, and so is M's all-HC batch. At the revisit M's images meet both labels and
    pass; S's batch is still of one label: `balanced` eliminates it, `separated` judges it
    against check steps on kept batches of one label in that cycle (M's, 0.9; never a
    waiting or due image's) and keeps it. The harmful center H is eliminated under both."""
    harmful = {f"h{i}" for i in range(5)}
    separated, model = label_mix_run(Separated(z=3.0, window=20))
    assert separated.eliminated() == harmful
    assert all(separated.status(s) == "kept" for s in ("s0", "s1", "m0", "m4"))
    rows = {r["Subject"]: r for r in separated.state.log if r["Cycle"] == 12}
    assert rows["s0"]["STATISTIC"] == 0.9 and rows["s0"]["LIMIT"] == 0.9
    assert rows["s0"]["Ignored"] == 0 and rows["h0"]["Ignored"] == 1
    assert rows["m0"]["LIMIT"] < 0.2  # a mixed revisit: the batches' window (its floor)
    key = "train_loss:batch:one label"
    assert separated.state.calibration["windows"][key] == {"pre-training": 0,
                                                           "calibration": MIN_WINDOW}
    assert separated.state.windows[key] == [0.9] * MIN_WINDOW
    drawn = [b for b in model.batches if len({s[0] for s in b}) == 1 and b[0][0] in "mn"
             and len(b) > 1]
    assert len(drawn) == MIN_WINDOW and not any(s in b for b in drawn for s in "s0 s1 h0".split())
    assert separated.state.windows["train_loss:batch"] == \
        label_mix_run(Balanced(z=3.0, window=20))[0].state.windows["train_loss:batch"]


def test_abstaining_trains_a_center_of_one_label_unjudged_and_judges_the_others():
    """S is two PD images and nothing else: `balanced` flags its batch (0.9 against ~0.1) and
    eliminates it at the revisit, `abstaining` trains it unjudged (a log row with its loss,
    no limit, not undone, not in the window), names S, and otherwise decides as `balanced`:
    H eliminated, M's all-HC batch flagged and back in training after a mixed revisit."""
    harmful = {f"h{i}" for i in range(5)}
    abstaining, model = label_mix_run(Abstaining(z=3.0, window=20))
    balanced, _ = label_mix_run(Balanced(z=3.0, window=20))
    assert abstaining.unjudged == ["S"] and balanced.unjudged == []
    assert abstaining.eliminated() == harmful
    assert balanced.eliminated() == harmful | {"s0", "s1"}
    assert abstaining.state.images["s0"].times_flagged == 0
    assert abstaining.state.images["m0"].times_flagged == 1
    assert all(abstaining.status(s) == "kept" for s in ("s0", "s1", "m0", "m4"))
    s_rows = [r for r in abstaining.state.log if r["Study"] == "S"]
    assert len(s_rows) == 1 and s_rows[0]["Ignored"] == 0 and s_rows[0]["STATISTIC"] == 0.9
    assert math.isnan(s_rows[0]["LIMIT"])
    assert 0.9 not in abstaining.state.windows["train_loss:batch"]
    assert not any(b[0].startswith("s") for b in model.batches)  # no revisit of S


def waiting_label_run(criterion) -> tuple[QualityControl, LabelMixModel]:
    """Center W: 5 HC (w0-w4) and 2 PD (v0, v1), met as a batch of each label in cycles 10
    and 11 (both flagged, 0.9 against a window of ~0.1), so that the HC are revisited in
    cycle 12 while the PD wait for cycle 13; center H is harmful and mixed, flagged in 10."""
    labels = {f"w{i}": 0 for i in range(5)} | {"v0": 1, "v1": 1} | \
        {f"h{i}": i % 2 for i in range(5)}
    steps = [(10, "W", [f"w{i}" for i in range(5)]), (10, "H", [f"h{i}" for i in range(5)]),
             (11, "W", ["v0", "v1"])]
    return mixed_run(criterion, labels, {s: "H" if s[0] == "h" else "W" for s in labels}, steps)


def test_pooled_borrows_a_label_the_kept_images_lack_from_the_center_waiting_images():
    """In cycle 12 W's five HC are revisited and its two PD wait for cycle 13: W has no kept
    image. `abstaining` judges each HC with the other four (a batch of one label, 0.9) and
    eliminates all five; `pooled` draws both waiting PD as witnesses (a mixed batch, 0.1),
    and the HC are back in training, the PD still waiting. H is eliminated under both."""
    harmful, hc = {f"h{i}" for i in range(5)}, {f"w{i}" for i in range(5)}
    abstaining, model_a = waiting_label_run(Abstaining(z=3.0, window=20))
    pooled, model_p = waiting_label_run(Pooled(z=3.0, window=20))
    assert abstaining.eliminated() == harmful | hc
    assert pooled.eliminated() == harmful
    assert all(pooled.status(s) == "kept" for s in hc)
    assert pooled.waiting() == {"v0", "v1"} and pooled.state.images["v0"].times_flagged == 1
    for batch in model_p.batches:
        if batch[0] in hc or set(batch) & hc:
            assert {"v0", "v1"} <= set(batch) and len(batch) == 5
    assert not any({"v0", "v1"} & set(b) for b in model_a.batches)
    assert not any(s.startswith("w") for b in model_p.batches if b[0].startswith("h") for s in b)


def test_pooled_borrows_no_label_the_suspect_already_holds():
    """Seed 20's case: in cycle 12 W's HC w0-w4 are revisited, its HC x0-x4 wait for cycle
    13 and its kept images are the PD u0 (alone in its batch in cycle 10, judged with
    witnesses and kept) and v0. The batch of an HC suspect holds both labels with them, so
    nothing is borrowed: its witnesses are u0, v0 and HC co-suspects (3 HC + 2 PD), never a
    waiting x (borrowing HC, the suspects' own label, made 4 HC + 1 PD)."""
    labels = {f"w{i}": 0 for i in range(5)} | {f"x{i}": 0 for i in range(5)} | \
        {"u0": 1, "v0": 1}
    steps = [(10, "W", [f"w{i}" for i in range(5)]), (10, "W", ["u0"]),
             (11, "W", [f"x{i}" for i in range(5)])]
    pooled, model = mixed_run(Pooled(z=3.0, window=20), labels, dict.fromkeys(labels, "W"), steps)
    assert pooled.waiting() == {f"x{i}" for i in range(5)}
    hc_revisits = [b for b in model.batches if b[0].startswith("w")]
    assert len(hc_revisits) == 5
    for batch in hc_revisits:
        assert {"u0", "v0"} <= set(batch) and len(batch) == 5
        assert not any(s.startswith("x") for s in batch)
    assert pooled.eliminated() == set()


def test_a_lone_image_is_judged_with_witnesses_of_its_center_before_it_trains():
    """A center's last image, alone in its batch. Under `witnessed` and the criteria built on
    it a run has no window of single images: before 2026-12-08 such a batch was trained
    unjudged. Now it is judged as its revisit would be, with kept images of its center as
    witnesses, a check step undone, and only a harmless one is then trained alone: the
    harmful h0 is flagged and eliminated at its revisit, the good g5 is trained alone and
    never flagged. L's one image has no witness: `witnessed` flags it (a step, undone, for
    its loss) and judges it at its revisit; `pooled` leaves L, a center of one label,
    unjudged."""
    labels = {f"g{i}": i % 2 for i in range(6)} | {"h0": 1, "l0": 0}
    steps = [(10, "G", [f"g{i}" for i in range(5)]), (10, "G", ["h0"]), (10, "G", ["g5"]),
             (10, "L", ["l0"])]
    studies = {s: "L" if s == "l0" else "G" for s in labels}
    for criterion in (Pooled(z=3.0, window=20), Witnessed(z=3.0, window=20)):
        qc, model = mixed_run(criterion, labels, studies, steps)
        assert qc.eliminated() == {"h0"}
        assert qc.state.images["g5"].times_flagged == 0 and qc.status("g5") == "kept"
        lone = [r for r in qc.state.log if r["Cycle"] == 10][1:]
        assert [r["Ignored"] for r in lone[:2]] == [1, 0]
        assert lone[0]["STATISTIC"] == 9.0 and lone[1]["STATISTIC"] == 0.1
        assert all(math.isfinite(r["LIMIT"]) for r in lone[:2]) and math.isnan(lone[2]["LIMIT"])
        checks = model.regular[1:]
        assert len(checks[0]) == 5 and checks[0][0] == "h0"
        assert len(checks[1]) == 5 and checks[1][0] == "g5" and checks[2] == ["g5"]
        assert checks[3] == ["l0"] and len(checks) == 4
        assert qc.state.windows["train_loss:batch"][-1] == 0.1  # the first batch's alone
        pooled = criterion.borrows_witnesses()
        assert qc.unjudged == (["L"] if pooled else [])
        assert lone[2]["Ignored"] == (0 if pooled else 1)
        assert qc.state.images["l0"].times_flagged == (0 if pooled else 1)


class CenterLossModel(LossOnlyModel):
    """A batch's own loss by the cycle and center it is trained in (`loss[(cycle, center)]`),
    else about 0.1 (0.100-0.106 by batch): what a hard center, a harmful one and the
    rest look like to the batch-loss criteria."""

    def __init__(self, loss: dict[tuple[int, str], float]):
        self.loss, self.cycle, self.n = loss, 10, 0

    def train(self, center, ids):
        self.n += 1
        return self.loss.get((self.cycle, center), 0.1 + (self.n % 7) / 1000), 1.0


def hard_center_run(criterion) -> QualityControl:
    """G is good but hard (batch loss 0.3 in every cycle), J turns harmful in cycle 11 (9.0
    after 0.1), H is harmful from the start (9.0). The window starts at 0.25-0.44 (limit
    ~0.57), so G's and J's batches pass in cycle 10; 20 batches of other centers at ~0.1
    then bring the limit down to ~0.11. Revisits (R = 2) in cycles 12 and 13."""
    names = {"G": "g", "J": "j", "H": "h"}
    labels = {f"{p}{i}": i % 2 for p in names.values() for i in range(5)}
    labels |= {f"o{k}_{i}": i % 2 for k in range(20) for i in range(5)}
    studies = {s: s[0].upper() if s[0] in "gjh" else f"O{s[1:].split('_')[0]}" for s in labels}
    model = CenterLossModel({(10, "H"): 9.0, (11, "J"): 9.0, (12, "H"): 9.0, (13, "J"): 9.0}
                            | {(c, "G"): 0.3 for c in range(10, 14)})
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=criterion, revisit=2, studies=studies, labels=labels)
    qc.baseline()
    qc.calibrate(batch_size=5, seed=1, pretraining=[0.25 + i / 100 for i in range(20)])
    batches = {c: [s for s in labels if studies[s] == c] for c in set(studies.values())}
    for cycle in range(10, 14):
        model.cycle = cycle
        qc.start_cycle(cycle)
        qc.revisit_pass()
        order = ["G", "J", "H"] + [f"O{k}" for k in range(20)] if cycle == 10 \
            else [f"O{k}" for k in range(20)] + ["G", "J", "H"]
        for center in order:
            ids = qc.select(center, batches[center])
            if ids:
                qc.verify_batch(center, ids)
    return qc


def test_centered_keeps_a_hard_center_the_pool_eliminates_and_not_a_harmful_one():
    """Under `pooled` G, accepted in cycle 10, is flagged in cycle 11 at the same loss
    against a limit that fell, and eliminated whole at its revisit. Under `centered` its
    batch in cycle 11 is judged against at least its own accepted 0.3 plus the run's spread:
    kept. H (never accepted) and J (accepted at 0.1, then 9.0) are eliminated by both."""
    harmful = {f"h{i}" for i in range(5)} | {f"j{i}" for i in range(5)}
    hard = {f"g{i}" for i in range(5)}
    pooled, centered = hard_center_run(Pooled()), hard_center_run(Centered())
    assert pooled.eliminated() == harmful | hard
    assert centered.eliminated() == harmful
    assert centered.state.levels["G"] == pytest.approx(0.3)
    row = [r for r in centered.state.log if r["Study"] == "G" and r["Cycle"] == 11][0]
    assert row["Ignored"] == 0 and 0.3 < row["LIMIT"] < 0.32  # the center's floor
    assert QCState.from_json(json.loads(json.dumps(centered.state.to_json()))).levels == \
        centered.state.levels


def test_center_floor_is_the_level_plus_the_windows_spread():
    window = [0.1 + i / 100 for i in range(MIN_WINDOW)]  # median 0.145, MAD 0.025
    assert center_floor(0.3, window, 3.0) == pytest.approx(0.3 + 3 * 1.4826 * 0.025)
    assert center_floor(None, window, 3.0) is None
    assert center_floor(0.3, window[:-1], 3.0) is None  # too short to decide
    assert center_floor(math.nan, window, 3.0) is None


def test_one_label_centers():
    studies = {"a": "A", "b": "A", "c": "B", "d": "B", "e": "C"}
    assert one_label_centers(studies, {"a": 0, "b": 1, "c": 1, "d": 1, "e": 0}) == ["B", "C"]
    assert one_label_centers(studies, {"a": 0, "b": 1, "c": 0, "d": 1, "e": 0}) == ["C"]


def test_balanced_needs_the_training_labels():
    model = LabelMixModel({})
    with pytest.raises(ValueError, match="criterion balanced needs the training labels"):
        QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                       criterion=Balanced(), revisit=2, studies={"m0": "M"})


class LossModel:
    """A 'model' that is its validation loss: each image's update adds `effect[s]` to it and
    reports the image's own training loss `own[s]`; `held` counts the check steps taken with
    the momentum held out, `trained` lists every update (the ids)."""

    def __init__(self, effect: dict[str, float], own: dict[str, float]):
        self.effect, self.own, self.val, self.held, self.trained = effect, own, 0.3, 0, []

    def train(self, center, ids):
        self.trained.append(list(ids))
        self.val += sum(self.effect[s] for s in ids)
        return float(np.mean([self.own[s] for s in ids])), 1.0

    def evaluate(self, ids):
        return Evaluation(acc=0.9, fp=0, fn=0, fpr=0.0, fnr=0.0, loss=self.val)

    def snapshot(self):
        return self.val

    def restore(self, value):
        self.val = value

    def hold_out_momentum(self):
        self.held += 1


def test_confirmed_eliminates_a_harmful_center_and_spares_a_hard_good_one():
    """H's images are harmful (a step on them raises the validation loss), S's are good but
    hard (their own loss as high as H's, a step on them lowers the validation loss): the
    batch loss flags both and their revisits find both harmful again; the validation check
    confirms H only. M's one harmful image mx is confirmed in a regular batch with kept
    images of M (never one of its co-suspects). The confirmation's window comes from kept
    images only; each check step (momentum held out) is undone."""
    good = {f"g{i:02d}": (i % 5 - 2) / 1000 for i in range(20)}  # validation rise -0.002..0.002
    mixed = {f"m{i}": 0.0 for i in range(9)} | {"mx": 0.05}
    effect = good | mixed | {f"h{i}": 0.05 for i in range(5)} | {f"s{i}": -0.01 for i in range(5)}
    own = {k: (5.0 if k[0] in "hs" or k == "mx" else 0.1) for k in effect}
    model = LossModel(effect, own)
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Confirmed(), revisit=2, studies={s: s[0].upper() for s in own},
                        hold_out_momentum=model.hold_out_momentum)
    qc.baseline()
    qc.calibrate(batch_size=5, seed=0, pretraining=[0.1 + i / 1000 for i in range(10)])
    qc.start_cycle(10)
    for center, ids in [("H", [f"h{i}" for i in range(5)]), ("S", [f"s{i}" for i in range(5)]),
                        ("M", ["m0", "m1", "m2", "m3", "mx"]), ("M", [f"m{i}" for i in range(4, 9)])] \
            + [("G", list(good)[i:i + 5]) for i in range(0, 20, 5)]:
        qc.verify_batch(center, ids)
    suspects = [f"h{i}" for i in range(5)] + [f"s{i}" for i in range(5)] + \
        ["m0", "m1", "m2", "m3", "mx"]
    assert {s for s in own if qc.status(s) == "pending"} == set(suspects)
    assert model.held == 0 and qc.evaluations == 1  # the regular pass: no validation pass
    val, first = model.val, len(model.trained)
    qc.start_cycle(12)
    qc.revisit_pass()
    assert sorted(qc.eliminated()) == [f"h{i}" for i in range(5)] + ["mx"]
    assert all(qc.status(s) == "kept" for s in suspects if s[0] in "sm" and s != "mx")
    assert model.val == val  # every revisit, calibration and confirmation step undone
    steps = model.trained[first:]
    revisits, calibration, confirmations = steps[:15], steps[15:-3], steps[-3:]
    assert [ids[0] for ids in revisits] == suspects
    kept = set(good) | {f"m{i}" for i in range(4, 9)}
    assert len(calibration) == MIN_WINDOW and all(set(ids) <= kept for ids in calibration)
    assert confirmations[:2] == [[f"h{i}" for i in range(5)], [f"s{i}" for i in range(5)]]
    assert confirmations[2][0] == "mx" and len(confirmations[2]) == 5
    assert set(confirmations[2][1:]) <= {f"m{i}" for i in range(4, 9)}
    assert model.held == MIN_WINDOW + 3  # each confirmation and calibration step held out
    rows = qc.state.log[-11:]
    assert [(r["Subject"], r["Ignored"]) for r in rows] == \
        [(f"h{i}", 1) for i in range(5)] + [(f"s{i}", 0) for i in range(5)] + [("mx", 1)]
    assert [rows[i]["STATISTIC"] for i in (0, 5, 10)] == pytest.approx([0.25, -0.05, 0.05])
    window = qc.state.windows["check_rise:batch"]
    assert len(window) == MIN_WINDOW and max(map(abs, window)) <= 0.0101
    cost = qc.state.calibration["windows"]["check_rise:batch"]
    assert cost == {"pre-training": 0, "calibration": MIN_WINDOW}


# --- cold start: the run calibrates itself before its first decision ---------------------------

def spied_trainloss(model: FakeModel, studies: dict[str, str],
                    revisit: int) -> tuple[QualityControl, list[list[str]]]:
    """A `trainloss` policy (z 3, window 50) over `model`, after its baseline, and the list
    of every update it trains (the ids), in order."""
    trained: list[list[str]] = []
    train = model.train

    def spy(center, ids):
        trained.append(list(ids))
        return train(center, ids)

    model.train = spy
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=TrainLoss(z=3.0, window=50), revisit=revisit,
                        studies=studies)
    qc.baseline()
    return qc, trained


def test_calibration_seeds_the_batch_window_and_undoes_every_step():
    """Batches from the pre-training's saved losses, topped up by calibration batches, each
    undone; nothing else at the cold start; then the very first update is judged against
    them."""
    own = {s: 0.1 + i / 1000 for i, s in enumerate("abcdefghijklmnop")} | {"h1": 5.0}
    model = FakeModel({"h1": ({0, 1}, set())}, own)
    qc, trained = spied_trainloss(model, {s: "A" for s in own}, revisit=2)
    pretraining = [0.2 + i / 100 for i in range(6)] + [math.nan]  # short, one non-finite
    model.wrong = frozenset({5})  # the state calibration must leave as it found it
    cost = qc.calibrate(batch_size=4, seed=3, pretraining=pretraining)
    assert model.wrong == frozenset({5})
    batch = qc.state.windows["train_loss:batch"]
    assert batch[:6] == pytest.approx(pretraining[:6]) and len(batch) == MIN_WINDOW
    assert batch[6:] == [float(np.mean([own[s] for s in ids])) for ids in trained]
    assert [len(ids) for ids in trained] == [4] * 4 and "train_loss:image" not in qc.state.windows
    assert cost == qc.state.calibration and cost["steps"] == 4 and cost["evaluations"] == 0
    assert cost["windows"] == {"train_loss:batch": {"pre-training": 6, "calibration": 4}}
    assert len(qc.state.log) == 1  # calibration decides nothing and logs nothing
    qc.cycle = 10
    qc.verify_batch("A", ["h1", "a", "b"])  # the first update is decided, against that window
    first = qc.state.log[1]
    assert first["Ignored"] == 1 and first["LIMIT"] == pytest.approx(robust_limit(batch, 3.0))


def test_single_images_are_judged_against_images_of_accepted_batches_calibrated_each_cycle():
    """A single image is judged only as a suspect (retried from a flagged batch, revisited):
    its window is calibrated in each cycle that needs one, from one random image of each
    calibration batch the criterion accepts (a harmful center's batches are refused, so its
    images never set the bar), each step undone; a suspect's statistic enters no window."""
    good = {f"g{i:02d}": 0.1 + i / 10000 for i in range(30)}
    harmful = {f"h{i:02d}": 5.0 for i in range(30)}
    studies = {s: f"G{int(s[1:]) % 3}" for s in good} | {s: f"H{int(s[1:]) % 3}" for s in harmful}
    model = FakeModel({}, good | harmful)
    qc, trained = spied_trainloss(model, studies, revisit=1)
    qc.calibrate(batch_size=5, seed=0, pretraining=[0.05 + i / 100 for i in range(10)])
    assert trained == []  # the batch window came whole from the pre-training
    qc.start_cycle(10)
    qc.verify_batch("H0", ["h00", "h03", "h06"])  # flagged; each image then retried alone
    calibration = [ids for ids in trained if len(ids) > 1]
    singles = [ids[0] for ids in trained if len(ids) == 1]
    window = qc.state.windows["train_loss:image"]
    assert len(window) == MIN_WINDOW and all(w < 1 for w in window)  # good images only
    assert singles[:MIN_WINDOW] and all(s.startswith("g") for s in singles[:MIN_WINDOW])
    assert any(ids[0].startswith("h") for ids in calibration[1:])  # harmful batches refused
    assert [r["Ignored"] for r in qc.state.log[1:]] == [1, 1, 1, 1]
    assert qc.state.windows["train_loss:image"] == window  # the suspects stayed out
    steps = qc.state.calibration["steps"]
    assert qc.state.calibration["windows"]["train_loss:image"] == {"pre-training": 0,
                                                                   "calibration": MIN_WINDOW}
    qc.verify_batch("H1", ["h01", "h04"])  # the same cycle: no second calibration
    assert qc.state.calibration["steps"] == steps
    qc.start_cycle(11)
    qc.revisit_pass()  # a new cycle's first suspects: calibrated again, at this cycle
    assert qc.state.calibration["steps"] > steps and qc.state.calibration["image_cycle"] == 11
    assert sorted(qc.eliminated()) == ["h00", "h01", "h03", "h04", "h06"]
    assert model.wrong == frozenset()


def test_calibration_never_draws_a_center_the_run_left_out():
    """A federated run that excludes a faulty center resumes from the state, which keeps its
    images' records (their history stays in the report), without that center: a single
    image's calibration then draws only from the centers that remain (a step sent to the
    excluded center's node, which is gone, stopped the run)."""
    good = {f"g{i:02d}": 0.1 + i / 10000 for i in range(30)}
    gone = {f"x{i:02d}": 0.1 for i in range(30)}
    harmful = {"h00": 5.0, "h01": 5.0, "h02": 5.0}
    studies = {s: f"G{int(s[1:]) % 3}" for s in good} | dict.fromkeys(gone, "X") \
        | dict.fromkeys(harmful, "H")
    model = FakeModel({}, good | gone | harmful)
    first, _ = spied_trainloss(model, studies, revisit=1)
    first.calibrate(batch_size=5, seed=0, pretraining=[0.05 + i / 100 for i in range(10)])
    drawn: list[tuple[str, list[str]]] = []

    def spy(center, ids):
        drawn.append((center, list(ids)))
        return model.train(center, ids)

    resumed = QualityControl(spy, model.evaluate, model.snapshot, model.restore,
                             criterion=TrainLoss(z=3.0, window=50), revisit=1,
                             studies={s: c for s, c in studies.items() if c != "X"},
                             state=QCState.from_json(first.state.to_json()))
    resumed.start_cycle(4)
    resumed.verify_batch("H", list(harmful))  # flagged: each image alone, a window calibrated
    assert len(resumed.state.windows["train_loss:image"]) == MIN_WINDOW
    assert set(resumed.state.images) == set(studies)  # the records stay
    centers = {center for center, _ in drawn}
    assert centers == {"G0", "G1", "G2", "H"}
    assert not any(s in gone for _, ids in drawn for s in ids)


def test_calibration_of_held_out_checks_evaluates_each_step_and_restores_it():
    model = DriftingModel({s: 0.001 * i for i, s in enumerate("abcdefgh")}, drift=0.01)
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Combined(), revisit=2, studies={s: "A" for s in "abcdefgh"},
                        hold_out_momentum=model.hold_out)
    qc.baseline()
    before = model.snapshot()
    cost = qc.calibrate(batch_size=2, seed=0, pretraining=[0.1] * 12)
    assert cost["steps"] == 0 and model.evaluations == 1
    qc.start_cycle(3)
    checks = qc.image_window()
    assert model.snapshot() == before and model.evaluations == 1 + 10
    # each calibration: a batch (judged by its own loss, kept by the window) and one of its
    # images' check step with the momentum held out: the candidate's own effect, no drift
    assert cost["evaluations"] == 10 and cost["steps"] == 20
    assert len(checks) == 10 and all(any(c == pytest.approx(0.001 * i) for i in range(8))
                                     for c in checks)
    assert qc.state.windows["train_loss:batch"] == [0.1] * 12


def test_the_paper_rule_needs_no_calibration():
    model = FakeModel({})
    qc = policy(model, Rates(0.02), "ab")
    assert qc.calibrate(batch_size=5, seed=0, pretraining=[0.1] * 20) == \
        {"steps": 0, "evaluations": 0, "seconds": 0.0, "windows": {}, "batch_size": 5,
         "seed": 0}
    qc.verify_batch("A", ["a", "b"])
    assert qc.state.windows == {} and qc.image_window() == []


def test_the_calibration_line_says_none_was_needed_when_the_pre_training_seeded_it():
    model = FakeModel({})
    qc = policy(model, TrainLoss(window=10), "ab")
    seeded = qc.calibrate(batch_size=5, seed=0, pretraining=[0.1 + 0.01 * i for i in range(12)])
    assert describe_calibration(seeded) == (
        "calibration: none needed (train_loss:batch: 10 from the pre-training, 0 calibration "
        "steps)")
    paid = {"steps": 10, "evaluations": 0, "seconds": 1.25,
            "windows": {"train_loss:batch": {"pre-training": 0, "calibration": 10}}}
    assert describe_calibration(paid) == (
        "calibration: 10 steps (each undone), 0 evaluations, 1.2 s (train_loss:batch: 0 from "
        "the pre-training, 10 calibration steps)")


# --- non-finite is never harmless ----------------------------------------------------------------

@pytest.mark.parametrize("criterion", [Rates(0.5), TrainLoss(), Combined(), McNemar(alpha=0.5)])
def test_a_non_finite_training_loss_flags_the_update_and_stays_out(criterion):
    model = FakeModel({}, {"n": math.nan, "i": math.inf})
    warnings: list[str] = []
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=criterion, revisit=2, studies={s: "C1" for s in "abni"},
                        hold_out_momentum=lambda: None, on_warning=warnings.append)
    qc.baseline()
    qc.state.windows = {"train_loss:batch": [1.0] * 10, "train_loss:image": [1.0] * 10,
                        "check_rise:image": [0.0] * 10}
    reference = qc.state.reference
    qc.cycle = 11
    qc.verify_batch("C1", ["a", "n"])
    assert [(r["Subject"], r["Ignored"]) for r in qc.state.log[1:]] == \
        [("batch", 1), ("a", 0), ("n", 1)]
    assert warnings[0] == "warning: cycle 11, center C1, batch of a, n: training loss nan; " \
                          "flagged and undone"
    assert warnings[1] == "warning: cycle 11, center C1, image n: training loss nan; " \
                          "flagged and undone"
    assert len(warnings) == 2
    assert all(math.isfinite(v) for w in qc.state.windows.values() for v in w)
    assert qc.status("n") == "pending"
    qc.verify_batch("C1", ["i"])
    assert qc.state.log[-1]["Ignored"] == 1 and "training loss inf" in warnings[-1]
    assert qc.state.reference in (None, reference)  # stale or the last accepted one


def test_a_lone_image_with_a_non_finite_loss_is_flagged_with_a_warning():
    """Under `witnessed` a center's last image alone in its batch is judged with witnesses;
    with none (its center's only image) it is flagged after a step on it alone, undone:
    either way a non-finite loss gets its warning line and stays out of the windows."""
    model = FakeModel({}, {"n": math.nan, "i": math.inf})
    warnings: list[str] = []
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Witnessed(), revisit=2,
                        studies={"n": "C1", "a": "C2", "i": "C2"}, on_warning=warnings.append)
    qc.baseline()
    qc.calibrate(batch_size=5, seed=0, pretraining=[1.0] * 10)
    before = model.snapshot()
    qc.cycle = 11
    qc.verify_batch("C1", ["n"])
    qc.verify_batch("C2", ["i"])
    assert warnings == ["warning: cycle 11, center C1, image n: training loss nan; flagged "
                        "and undone",
                        "warning: cycle 11, center C2, batch of i, a: training loss inf; "
                        "flagged and undone"]
    assert qc.waiting() == {"n", "i"} and qc.status("a") == "kept"
    assert [r["Ignored"] for r in qc.state.log[1:]] == [1, 1]
    assert qc.state.windows["train_loss:batch"] == [1.0] * 10
    assert model.snapshot() == before


def test_a_non_finite_validation_loss_is_never_the_reference():
    class Model(DriftingModel):
        def train(self, center, ids):
            super().train(center, ids)
            if ids == ["bad"]:
                self.loss = math.nan
            return 0.1, 1.0

    model = Model({"good": -0.001, "bad": 0.0}, drift=0.0)
    warnings: list[str] = []
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=HeldOut(), revisit=2, studies={"good": "A", "bad": "A"},
                        hold_out_momentum=model.hold_out, on_warning=warnings.append)
    qc.baseline()
    qc.calibrate(batch_size=1, seed=0)  # "good" and "bad" drawn: bad's NaN left out
    assert all(math.isfinite(v) for v in qc.state.windows["check_rise:image"])
    assert any("calibration step left out" in w for w in warnings)
    qc.cycle = 10
    qc.verify_batch("A", ["bad"])
    assert qc.state.log[-1]["Ignored"] == 1 and math.isnan(qc.state.log[-1]["VAL_LOSS"])
    assert qc.state.reference.loss == 0.5 and model.loss == 0.5
    assert warnings[-1] == "warning: cycle 10, center A, image bad: validation loss nan; " \
                           "flagged and undone"


def test_a_loaded_model_with_a_non_finite_validation_loss_is_refused():
    model = DriftingModel({}, drift=0.0)
    model.loss = math.inf
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Loss(), revisit=2, studies={"a": "A"})
    with pytest.raises(DQCError, match="validation loss is inf"):
        qc.baseline()


def test_criteria_need_no_deep_learning_or_scientific_library():
    code = ("import sys, numpy as np; from dqc.criteria import CRITERIA; "
            "from dqc.qc import evaluate_predictions as ev; "
            "a = ev(np.array([0, 1, 1]), np.array([.2, .7, .4])); "
            "[k().judge(a, a, 1, 1.0, [1.0] * 10) for k in CRITERIA.values()]; "
            "print(sorted({'tensorflow', 'keras', 'jax', 'torch', 'scipy', 'sklearn'} & "
            "{m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_no_criterion_name_is_compared_outside_its_module():
    import re

    names = "|".join(CRITERIA)
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = [f"{path.relative_to(ROOT)}:{i}" for path in sorted((ROOT / "dqc").rglob("*.py"))
             if path.name != "criteria.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


# --- flags, run config, and the script's log ---------------------------------------------------

def qc_parse(*extra: str):
    from dqc.cli import Parser, add_qc_flags

    parser = Parser()
    add_qc_flags(parser)
    return parser.parse_args(["-fn_train", "t", "-fn_test", "v", "-cycles", "12", "-en", "e",
                              "-pd", "p", *extra])


def test_flags_reach_the_specs_and_the_federated_config():
    from dqc.cli import qc_specs
    from dqc.federated.server import config_from_args, specs_from_config

    args = qc_parse("--criterion", "trainloss", "--z", "2.5", "--window", "20",
                    "--lr-schedule", "restart")
    spec, qspec = qc_specs(args)
    assert qspec.rule() == TrainLoss(z=2.5, window=20)
    assert spec.lr_schedule == "restart"
    config = config_from_args(args)
    assert config["criterion"] == "trainloss" and config["window"] == 20
    assert "error" not in config and "alpha" not in config  # not given: not sent
    spec2, qspec2 = specs_from_config(config)
    assert qspec2 == qspec and spec2.lr_schedule == "restart"
    assert qc_specs(qc_parse("--criterion", "combined"))[1].rule() == Combined()
    assert qc_specs(qc_parse())[1].rule() == Rates(0.02)


def test_the_flower_app_lists_each_criterion_parameter_at_its_default():
    """Declared unset ("": a set one would be refused under another criterion; Flower takes
    an override only for a declared key), its default in the line's comment."""
    text = (ROOT / "dqc" / "federated" / "app" / "pyproject.toml").read_text()
    config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    names = ("error", "alpha", "z", "window")
    shown = {line.split(" ")[0]: float(line.rstrip().rsplit("(", 1)[1].rstrip(")"))
             for line in text.splitlines() if line.split(" ")[0] in names and " = " in line}
    assert shown == {"error": 0.02, "alpha": 0.05, "z": 3.0, "window": 50}
    assert {k: config[k] for k in names} == dict.fromkeys(names, "")


def test_unknown_criterion_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        qc_parse("--criterion", "vibes")
    assert info.value.code == 2 and "invalid choice: 'vibes'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "0", "--criterion", "mcnemar"], "--alpha must be between 0 and 1"),
    (["--z", "0", "--criterion", "combined"], "--z must be greater than 0"),
    (["--window", "9", "--criterion", "trainloss"], "--window must be a whole number of at "
                                                     "least 10"),
    (["-error", "nan"], "-error must be a finite number, got nan"),
    (["-error=-inf"], "-error must be a finite number, got -inf"),
    (["-error=-0.1"], "-error must be 0 or more"),
    (["--criterion", "combined", "-error", "0.0003"], "-error means nothing for --criterion "
                                                      "combined (its flags: --z, --window)"),
    (["--z", "2"], "--z means nothing for --criterion rates (its flags: -error)"),
])
def test_bad_or_foreign_criterion_flags_are_one_line_exit_2(flags, message, cohort, tmp_path,
                                                            capsys):
    from helpers import QC_SCRIPT, call_script

    argv = ["-fn_train", str(cohort["train"]), "-fn_test", str(cohort["val"]), "-cycles", "12",
            "-en", "none.keras", "-pd", "none.keras", "--out", str(tmp_path / "out"),
            "--quiet", *flags]
    run = call_script(argv, capsys, tmp_path, script_path=QC_SCRIPT)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert run.error_lines()[0].startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_help_says_the_recommended_criterion_and_the_knobs_meaning(capsys):
    from dqc import defaults

    with pytest.raises(SystemExit):
        qc_parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert f"Recommended: {defaults.RECOMMENDED_CRITERION}, because" in text
    assert "z=3 0.13%" in text


def test_script_log_columns_per_criterion(federated_case, capsys):
    from helpers import QC_SCRIPT

    paper = pd.read_csv(federated_case["single"]() / "qc.csv")  # shared with the federated test
    assert list(paper.columns) == LOG_COLUMNS
    out = federated_case["root"] / "criterion_loss"
    capsys.readouterr()
    runpy.run_path(str(QC_SCRIPT))["main"]([*federated_case["common"], "-cycles", "4",
                                            "--criterion", "loss", "--out", str(out)])
    said = [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("calibration: ")]
    # the cold start: 10 batches, each evaluated (single images calibrate in their cycle)
    assert len(said) == 1 and said[0].startswith("calibration: 10 steps (each undone), 10 "
                                                 "evaluations, ")
    log = pd.read_csv(out / "qc.csv")
    assert list(log.columns) == LOG_COLUMNS + CRITERION_COLUMNS
    assert log.VAL_LOSS.notna().all() and log.VAL_AUROC.between(0, 1).all()
    assert log.STATISTIC.iloc[1:].notna().all() and log.TRAIN_LOSS.iloc[1:].notna().all()
    assert log.iloc[0][["TRAIN_LOSS", "STATISTIC", "LIMIT"]].isna().all()
    # every decision is the statistic against its self-set limit
    decided = log.iloc[1:]
    assert decided.LIMIT.notna().all()
    assert (decided.Ignored == (decided.STATISTIC > decided.LIMIT + 1e-9).astype(int)).all()
    summary = json.loads((out / "qc_summary.json").read_text())
    assert summary["criterion"] == {"name": "loss", "z": 3.0, "window": 50}
    cost = summary["calibration"]
    assert cost["windows"]["val_rise:batch"] == {"pre-training": 0, "calibration": 10}
    # single images: calibrated in the cycle that judged one alone (each calibration batch
    # and each image step evaluated), absent where none was
    image = cost["windows"].get("val_rise:image")
    assert (image is not None) == (decided.Subject != "batch").any()
    assert cost["steps"] == cost["evaluations"] >= 10 + (image or {}).get("calibration", 0)
    assert cost["seconds"] > 0


# --- heldout: the check step without the optimizer's momentum ----------------------------------

class DriftingModel:
    """Validation loss as the whole state; every ordinary step adds the optimizer's momentum
    drift on top of the candidate's own effect, a check step with the momentum held out only
    the candidate's own effect."""

    def __init__(self, own: dict[str, float], drift: float):
        self.own, self.drift = own, drift
        self.loss, self.momentum, self.evaluations = 0.5, True, 0

    def train(self, center, ids):
        self.loss += float(np.mean([self.own[s] for s in ids]))
        self.loss += self.drift if self.momentum else 0.0
        self.momentum = True  # the step leaves fresh moments behind
        return 0.1, 1.0

    def hold_out(self):
        self.momentum = False

    def evaluate(self, ids):
        self.evaluations += 1
        return Evaluation(0.9, 1, 1, 0.1, 0.1, loss=self.loss)

    def snapshot(self):
        return self.loss, self.momentum

    def restore(self, value):
        self.loss, self.momentum = value


#: A window of accepted check-step rises: median 0, MAD 0.0001, limit (z = 3) ~0.000445.
CHECKS = [0.0001 * i for i in range(-5, 6)]


def test_heldout_judges_the_candidate_without_the_momentum_drift():
    model = DriftingModel({"good": -0.001, "bad": 0.002}, drift=0.01)
    qc = policy(model, HeldOut(z=3.0), ["good", "bad"], hold_out_momentum=model.hold_out)
    qc.state.windows = {"check_rise:image": list(CHECKS)}
    qc.verify_batch("A", ["good"])
    # accepted on its own effect (-0.001 under the limit), then made as the ordinary step: the
    # kept model carries the drift and is evaluated again to become the reference
    row = qc.state.log[-1]
    assert row["Ignored"] == 0 and row["STATISTIC"] == pytest.approx(-0.001)
    assert row["LIMIT"] == pytest.approx(robust_limit(CHECKS, 3.0))
    assert row["VAL_LOSS"] == pytest.approx(0.5 - 0.001 + 0.01)
    assert model.loss == pytest.approx(0.509) and model.evaluations == 1 + 2
    assert qc.state.windows["check_rise:image"][-1] == pytest.approx(-0.001)  # the check's
    qc.verify_batch("A", ["bad"])  # +0.002 over the limit: flagged, retried alone, again
    assert [(r["Subject"], r["Ignored"]) for r in qc.state.log[-2:]] == [("batch", 1), ("bad", 1)]
    assert model.loss == pytest.approx(0.509) and model.momentum  # undone, momentum back
    assert qc.status("bad") == "pending"


def test_heldout_needs_the_momentum_switch():
    model = DriftingModel({"a": 0.0}, drift=0.0)
    qc = policy(model, HeldOut(), "a")
    with pytest.raises(ValueError, match="hold_out_momentum"):
        qc.verify_batch("A", ["a"])


def test_trainer_holds_out_adams_first_moments_only():
    keras = pytest.importorskip("keras")
    from dqc.model import build_models
    from dqc.trainer import Trainer

    keras.utils.set_random_seed(0)
    trainer = Trainer(*build_models((16, 20, 16)))
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 20, 16, 1)).astype(np.float32)
    trainer.train_step(x, np.array([0.0, 1.0]))
    moments = {v.path: np.asarray(v.numpy()) for v in trainer.optimizer.variables}
    trainer.hold_out_momentum()
    for v in trainer.optimizer.variables:
        after = np.asarray(v.numpy())
        if v.path.endswith("_momentum"):
            assert not after.any()
        else:
            assert np.array_equal(after, moments[v.path]), v.path
    assert any(p.endswith("_momentum") and moments[p].any() for p in moments)


def combined_policy(model, studies: str) -> QualityControl:
    qc = policy(model, Combined(z=3.0), studies, hold_out_momentum=model.hold_out)
    qc.state.windows = {"train_loss:batch": [0.1 + i / 1000 for i in range(20)],
                        "check_rise:image": list(CHECKS)}
    return qc


def test_combined_judges_batches_by_own_loss_and_single_images_by_held_out_check():
    class Model(DriftingModel):
        def train(self, center, ids):
            super().train(center, ids)
            return (2.0 if len(ids) > 1 else 0.69), 1.0  # a batch's loss sees; one image's not

    model = Model({"good": -0.001, "bad": 0.002}, drift=0.01)
    qc = combined_policy(model, ["good", "bad"])
    qc.verify_batch("A", ["good", "bad"])
    rows = [(r["Subject"], r["Ignored"], r["STATISTIC"], r["LIMIT"]) for r in qc.state.log[1:]]
    assert [r[:2] for r in rows] == [("batch", 1), ("good", 0), ("bad", 1)]
    assert rows[0][2] == 2.0 and rows[0][3] < 0.2  # the batch: its own loss against the window
    assert rows[1][2] == pytest.approx(-0.001)  # the held-out check against the checks' window
    assert rows[1][3] == pytest.approx(robust_limit(CHECKS, 3.0))
    assert rows[2][2] == pytest.approx(0.002)
    assert qc.status("bad") == "pending" and qc.status("good") == "kept"


def test_unevaluated_batches_give_the_decisions_of_evaluating_every_update(monkeypatch):
    """combined judges a batch by its own loss alone: it is not evaluated, and the reference
    of a later one-image check is evaluated then. Same decisions, fewer validation passes."""
    own = {"a": -0.001, "b": 0.002, "c": -0.0005, "d": 0.0001, "e": -0.002, "f": 0.003}
    batch_loss = {("a", "b"): 3.0, ("c", "d"): 0.1, ("e", "f"): 2.5}

    def run(eager: bool):
        class Model(DriftingModel):
            def train(self, center, ids):
                super().train(center, ids)
                return batch_loss.get(tuple(ids), 0.69), 1.0

        if eager:
            monkeypatch.setattr(Combined, "needs_evaluation", lambda self, n: True)
        else:
            monkeypatch.undo()
        model = Model(own, drift=0.01)
        qc = combined_policy(model, list(own))
        for ids in batch_loss:
            qc.verify_batch("A", list(ids))
        return [(r["Subject"], r["Ignored"]) for r in qc.state.log], model.evaluations, qc

    eager, eager_evaluations, _ = run(eager=True)
    lazy, lazy_evaluations, qc = run(eager=False)
    assert lazy == eager
    assert ("b", 1) in lazy and ("a", 0) in lazy and ("c", 0) not in lazy  # c, d kept as batch
    assert lazy_evaluations < eager_evaluations
    batch_rows = [r for r in qc.state.log[1:] if r["Subject"] == "batch"]
    assert all(math.isnan(r["FP"]) and math.isnan(r["VAL_LOSS"]) for r in batch_rows)


# --- the cold start on a real model -------------------------------------------------------------

def test_calibration_on_a_real_model_is_undone_exactly(cohort):
    """The tiny cohort, an untrained model: ten batches at the cold start, then ten held-out
    check steps (one image of each calibration batch kept), each trained, judged and undone; the weights, BatchNorm statistics, dropout seed
    and optimizer state afterwards are those before, bit for bit."""
    keras = pytest.importorskip("keras")
    from dqc.data import load_table
    from dqc.model import build_models
    from dqc.runs import validation_evaluator
    from dqc.trainer import Trainer
    from dqc.travel import local_step
    from dqc.volumes import VolumeStore
    from helpers import SHAPE

    keras.utils.set_random_seed(0)
    trainer = Trainer(*build_models(SHAPE))
    train, val = load_table(cohort["train"], "train"), load_table(cohort["val"], "validation")
    store = VolumeStore(train, SHAPE, verbose=False)
    evaluate = validation_evaluator(trainer, VolumeStore(val, SHAPE, verbose=False),
                                    list(val.Subject))
    qc = QualityControl(local_step(trainer, store), evaluate, trainer.snapshot,
                        trainer.restore, criterion=Combined(), revisit=2,
                        studies=dict(zip(train.Subject, train.Study)),
                        hold_out_momentum=trainer.hold_out_momentum)
    qc.baseline()
    before = trainer.state_arrays()
    cost = qc.calibrate(batch_size=5, seed=0)  # no pre-training losses: batches calibrate too
    assert cost["steps"] == 10 and cost["evaluations"] == 0
    qc.start_cycle(1)
    qc.image_window()  # as the cycle's first suspect would: batches, and one image of each
    after = trainer.state_arrays()
    assert len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))
    assert cost["steps"] >= 30 and cost["evaluations"] == 10 and cost["seconds"] > 0
    batch, image = qc.state.windows["train_loss:batch"], qc.state.windows["check_rise:image"]
    assert len(batch) == len(image) == 10 and all(map(math.isfinite, batch + image))
    assert len(set(image)) > 1  # real check steps on different images moved the loss


def test_resume_keeps_the_windows_and_the_calibration(federated_case, capsys):
    """Cycle 3 alone, then --resume to cycle 4: the windows and the calibration come from the
    checkpoint (no second cold start; cycle 4 calibrates its single images as it would
    have), and the outputs are the uninterrupted run's."""
    from helpers import QC_SCRIPT, assert_same_qc_outputs

    flags = ("--criterion", "combined")
    whole = federated_case["single"](5, *flags)
    out = federated_case["root"] / "combined_resumed"
    main = runpy.run_path(str(QC_SCRIPT))["main"]
    capsys.readouterr()
    main([*federated_case["common"], "-cycles", "4", *flags, "--out", str(out)])
    first = json.loads((out / "qc_summary.json").read_text())["calibration"]
    main([*federated_case["common"], "-cycles", "5", *flags, "--out", str(out), "--resume"])
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("calibration:")]
    assert len(said) == 1  # the resumed run did not make the cold start again
    then = json.loads((out / "qc_summary.json").read_text())["calibration"]
    assert first["image_cycle"] == 3 and then["image_cycle"] == 4  # cycle 4's own images
    assert then["windows"]["train_loss:batch"] == first["windows"]["train_loss:batch"]
    assert then["steps"] > first["steps"]
    assert_same_qc_outputs(whole, out, last_cycle=4)  # the summary's calibration too


def test_confirmed_without_a_kept_image_confirms_nothing():
    """Every image of the run is a suspect: there is no kept batch to calibrate the
    confirmation against, so its window stays short and no image is eliminated."""
    effect = {f"h{i}": 0.05 for i in range(5)}
    model = LossModel(effect, {k: 5.0 for k in effect})
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Confirmed(), revisit=2, studies={s: "H" for s in effect},
                        hold_out_momentum=model.hold_out_momentum)
    qc.baseline()
    qc.calibrate(batch_size=5, seed=0, pretraining=[0.1 + i / 1000 for i in range(10)])
    qc.start_cycle(10)
    qc.verify_batch("H", list(effect))
    qc.start_cycle(12)
    qc.revisit_pass()
    assert qc.eliminated() == set() and all(qc.status(s) == "kept" for s in effect)
    assert qc.state.windows["check_rise:batch"] == []
    assert [r["Ignored"] for r in qc.state.log[-5:]] == [0] * 5
