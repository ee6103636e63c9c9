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

from dqc.qc import (CRITERION_COLUMNS, LOG_COLUMNS, Criterion, Evaluation, QCState,
                    QualityControl, binomial_tail, evaluate_predictions, loss_verdict,
                    mcnemar_verdict, robust_limit, trainloss_verdict)

ROOT = Path(__file__).resolve().parents[1]
TRUTH = "000000111111"


def predicted(wrong: set[int], truth: str = TRUTH) -> Evaluation:
    """An evaluation whose predictions are wrong exactly at the `wrong` positions."""
    pred = "".join(("1" if t == "0" else "0") if i in wrong else t for i, t in enumerate(truth))
    return Evaluation(acc=0.0, fp=0, fn=0, fpr=0.0, fnr=0.0, pred=pred, truth=truth)


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

def test_loss_rise_just_under_and_just_over_n_times_tolerance():
    # 5 images, 0.01 nats each: limit 0.05
    assert not loss_verdict(0.5 + 0.05 - 1e-6, 0.5, 5, 0.01).harmful
    assert not loss_verdict(0.55, 0.5, 5, 0.01).harmful  # equal is not harmful
    over = loss_verdict(0.5 + 0.05 + 1e-6, 0.5, 5, 0.01)
    assert over.harmful and over.statistic == pytest.approx(0.05 + 1e-6)
    assert over.limit == pytest.approx(0.05)
    rule = Criterion("loss", error=0.01)
    ref = Evaluation(0, 0, 0, 0, 0, loss=0.5)
    assert rule.judge(Evaluation(0, 0, 0, 0.9, 0.9, loss=0.51 + 1e-6), ref, 1, 0.0, []).harmful
    # the rates may soar: this criterion reads the loss only
    assert not rule.judge(Evaluation(0, 0, 0, 0.9, 0.9, loss=0.5), ref, 1, 0.0, []).harmful


# --- training loss against the accepted window ------------------------------------------------

WINDOW = [1.0, 1.1, 0.9, 1.2, 0.8, 1.0, 1.05, 0.95, 1.0, 1.3]
# median 1.0; |deviations| sorted 0,0,0,.05,.05,.1,.1,.2,.2,.3: MAD 0.075
LIMIT = 1.0 + 3 * 1.4826 * 0.075  # 1.333585


def test_trainloss_limit_by_hand():
    assert robust_limit(WINDOW, 3.0) == pytest.approx(LIMIT, rel=1e-12)
    assert not trainloss_verdict(1.33, WINDOW, 3.0).harmful
    verdict = trainloss_verdict(1.34, WINDOW, 3.0)
    assert verdict.harmful and verdict.statistic == 1.34
    assert verdict.limit == pytest.approx(LIMIT, rel=1e-12)


def test_trainloss_flags_nothing_while_the_window_is_short():
    verdict = trainloss_verdict(100.0, WINDOW[:9], 3.0)
    assert not verdict.harmful and math.isnan(verdict.limit)


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


def test_state_round_trip_keeps_the_new_fields():
    state = QCState(reference=Evaluation(0.75, 1, 0, 0.5, 0.0, loss=0.42, auroc=0.875,
                                         pred="0101", truth="0011"),
                    log=[{"Cycle": 0, "STATISTIC": math.nan}], train_losses=[0.7, 0.6])
    back = QCState.from_json(json.loads(json.dumps(state.to_json())))
    assert back.reference == state.reference and back.train_losses == [0.7, 0.6]
    assert json.dumps(back.to_json()) == json.dumps(state.to_json())
    old = state.to_json()
    del old["train_losses"]  # a checkpoint written before this field existed
    assert QCState.from_json(old).train_losses == []


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


def policy(model: FakeModel, criterion: Criterion, subjects: str) -> QualityControl:
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=criterion, revisit=2, studies={s: "A" for s in subjects})
    qc.baseline()
    qc.cycle = 10
    return qc


def test_mcnemar_policy_flags_the_harmful_image_of_a_batch():
    model = FakeModel({"g": (set(), {11}), "h": ({0, 1, 2, 3, 6, 7, 8}, set())})
    model.wrong = frozenset({11})
    qc = policy(model, Criterion("mcnemar", alpha=0.05), "gh")
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


def test_trainloss_policy_window_holds_accepted_updates_only():
    good = "abcdefghijkl"  # 12 accepted updates, losses 1.00..1.11
    losses = {s: 1.0 + i / 100 for i, s in enumerate(good)} | {"x": 5.0, "y": 1.02}
    model = FakeModel({}, losses)
    qc = policy(model, Criterion("trainloss", z=3.0, window=10), good + "xy")
    for s in good:
        qc.verify_batch("A", [s])
    assert qc.state.train_losses == [losses[s] for s in good[-10:]]  # the last 10 only
    qc.verify_batch("A", ["x"])
    qc.verify_batch("A", ["y"])
    assert [(r["Subject"], r["Ignored"]) for r in qc.state.log[-3:]] == \
        [("batch", 1), ("x", 1), ("batch", 0)]
    assert 5.0 not in qc.state.train_losses and qc.state.train_losses[-1] == 1.02
    assert qc.state.log[-1]["TRAIN_LOSS"] == 1.02 and qc.state.log[-1]["LIMIT"] > 1.02
    assert qc.status("x") == "pending"
    # nothing was flagged before ten losses were known, however high
    assert all(r["Ignored"] == 0 for r in qc.state.log[:11])


def test_trainloss_window_takes_batches_of_the_regular_pass_only():
    good = "abcdefghijkl"
    losses = {s: 1.0 + i / 100 for i, s in enumerate(good)} | {"p": 5.0, "q": 1.03}
    model = FakeModel({}, losses)
    qc = policy(model, Criterion("trainloss", z=3.0, window=50), good + "pq")
    for s in good:
        qc.verify_batch("A", [s])
    window = list(qc.state.train_losses)
    qc.verify_batch("A", ["p", "q"])  # batch loss 3.015: flagged; p alone flagged, q kept
    assert [(r["Subject"], r["Ignored"]) for r in qc.state.log[-3:]] == \
        [("batch", 1), ("p", 1), ("q", 0)]
    assert qc.state.train_losses == window  # q's accepted single-image loss stays out


def test_trainloss_window_can_start_from_the_pretraining():
    losses = {"h": 5.0}
    model = FakeModel({}, losses)
    seed = [1.0 + i / 100 for i in range(60)]
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Criterion("trainloss", z=3.0, window=50), revisit=2,
                        studies={"h": "A"}, train_losses=seed)
    assert qc.state.train_losses == seed[-50:]
    qc.baseline()
    qc.cycle = 10
    qc.verify_batch("A", ["h"])  # the very first update of the run is judged
    assert qc.state.log[1]["Ignored"] == 1 and qc.status("h") == "pending"


def test_rates_keeps_the_paper_log_and_default():
    model = FakeModel({})
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        error=0.02, revisit=2, studies={"a": "A"})
    assert qc.criterion == Criterion("rates", error=0.02)
    qc.baseline()
    assert list(qc.state.log[0]) == LOG_COLUMNS
    assert Criterion("rates").params() == {"name": "rates", "error": 0.02}
    assert Criterion("trainloss").params() == {"name": "trainloss", "z": 3.0, "window": 50}


def test_criteria_need_no_deep_learning_or_scientific_library():
    code = ("import sys, numpy as np; from dqc.qc import Criterion, evaluate_predictions as ev; "
            "a = ev(np.array([0, 1, 1]), np.array([.2, .7, .4])); "
            "[Criterion(n).judge(a, a, 1, 1.0, [1.0] * 10) for n in "
            "('rates', 'loss', 'mcnemar', 'trainloss', 'heldout')]; "
            "print(sorted({'tensorflow', 'keras', 'jax', 'torch', 'scipy', 'sklearn'} & "
            "{m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


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
    assert qspec.rule() == Criterion("trainloss", error=0.02, z=2.5, window=20)
    assert spec.lr_schedule == "restart"
    config = config_from_args(args)
    assert config["criterion"] == "trainloss" and config["window"] == 20
    spec2, qspec2 = specs_from_config(config)
    assert qspec2 == qspec and spec2.lr_schedule == "restart"
    # the Flower app's run config lists every QC flag that reaches the server
    pyproject = tomllib.loads((ROOT / "dqc" / "federated" / "app" / "pyproject.toml").read_text())
    assert set(config) <= set(pyproject["tool"]["flwr"]["app"]["config"])


def test_unknown_criterion_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        qc_parse("--criterion", "vibes")
    assert info.value.code == 2 and "invalid choice: 'vibes'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "0"], "--alpha must be between 0 and 1"),
    (["--alpha", "1.5"], "--alpha must be between 0 and 1"),
    (["--z", "0"], "--z must be greater than 0"),
    (["--window", "9"], "--window must be at least 10"),
])
def test_bad_criterion_parameters(flags, message, cohort, tmp_path, capsys):
    from helpers import QC_SCRIPT, call_script

    argv = ["-fn_train", str(cohort["train"]), "-fn_test", str(cohort["val"]), "-cycles", "12",
            "-en", "none.keras", "-pd", "none.keras", "--out", str(tmp_path / "out"),
            "--quiet", *flags]
    run = call_script(argv, capsys, tmp_path, script_path=QC_SCRIPT)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert run.error_lines()[0].startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_script_log_columns_per_criterion(federated_case):
    from helpers import QC_SCRIPT

    paper = pd.read_csv(federated_case["single"]() / "qc.csv")  # shared with the federated test
    assert list(paper.columns) == LOG_COLUMNS
    out = federated_case["root"] / "criterion_loss"
    runpy.run_path(str(QC_SCRIPT))["main"]([*federated_case["common"], "-cycles", "4",
                                            "--criterion", "loss", "--out", str(out)])
    log = pd.read_csv(out / "qc.csv")
    assert list(log.columns) == LOG_COLUMNS + CRITERION_COLUMNS
    assert log.VAL_LOSS.notna().all() and log.VAL_AUROC.between(0, 1).all()
    assert log.STATISTIC.iloc[1:].notna().all() and log.TRAIN_LOSS.iloc[1:].notna().all()
    assert log.iloc[0][["TRAIN_LOSS", "STATISTIC", "LIMIT"]].isna().all()
    # -error 0: any rise of the validation loss is harmful, and only a rise
    assert (log.Ignored.iloc[1:] == (log.STATISTIC.iloc[1:] > 1e-9).astype(int)).all()
    assert (np.diff(log.VAL_LOSS[log.Ignored == 0]) <= 1e-9).all()
    summary = json.loads((out / "qc_summary.json").read_text())
    assert summary["criterion"] == {"name": "loss", "error": 0.0}


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


def test_heldout_judges_the_candidate_without_the_momentum_drift():
    model = DriftingModel({"good": -0.001, "bad": 0.002}, drift=0.01)
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Criterion("heldout", error=0.0003), revisit=2,
                        studies={"good": "A", "bad": "A"}, hold_out_momentum=model.hold_out)
    qc.baseline()
    qc.cycle = 10
    qc.verify_batch("A", ["good"])
    # accepted on its own effect (-0.001 <= 0.0003), then made as the ordinary step: the kept
    # model carries the drift and is evaluated again to become the reference
    row = qc.state.log[-1]
    assert row["Ignored"] == 0 and row["STATISTIC"] == pytest.approx(-0.001)
    assert row["VAL_LOSS"] == pytest.approx(0.5 - 0.001 + 0.01)
    assert model.loss == pytest.approx(0.509) and model.evaluations == 1 + 2
    qc.verify_batch("A", ["bad"])  # +0.002 > 0.0003: flagged, retried alone, flagged again
    assert [(r["Subject"], r["Ignored"]) for r in qc.state.log[-2:]] == [("batch", 1), ("bad", 1)]
    assert model.loss == pytest.approx(0.509) and model.momentum  # undone, momentum back
    assert qc.status("bad") == "pending" and qc.state.log[-1]["LIMIT"] == 0.0003
    # the same updates under the plain loss rule: the drift alone flags the good image too
    plain = DriftingModel({"good": -0.001}, drift=0.01)
    qc2 = QualityControl(plain.train, plain.evaluate, plain.snapshot, plain.restore,
                         criterion=Criterion("loss", error=0.0003), revisit=2,
                         studies={"good": "A"})
    qc2.baseline()
    qc2.verify_batch("A", ["good"])
    assert qc2.state.log[-1]["Ignored"] == 1


def test_heldout_needs_the_momentum_switch():
    model = DriftingModel({"a": 0.0}, drift=0.0)
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Criterion("heldout", error=0.001), revisit=2,
                        studies={"a": "A"})
    qc.baseline()
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


def test_combined_judges_batches_by_own_loss_and_single_images_by_held_out_check():
    class Model(DriftingModel):
        def train(self, center, ids):
            super().train(center, ids)
            return (2.0 if len(ids) > 1 else 0.69), 1.0  # a batch's loss sees; one image's not

    model = Model({"good": -0.001, "bad": 0.002}, drift=0.01)
    qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                        criterion=Criterion("combined", error=0.0005, z=3.0, window=50),
                        revisit=2, studies={"good": "A", "bad": "A"},
                        hold_out_momentum=model.hold_out, train_losses=[0.1 + i / 1000
                                                                         for i in range(20)])
    qc.baseline()
    qc.cycle = 10
    qc.verify_batch("A", ["good", "bad"])
    rows = [(r["Subject"], r["Ignored"], r["STATISTIC"], r["LIMIT"]) for r in qc.state.log[1:]]
    assert [r[:2] for r in rows] == [("batch", 1), ("good", 0), ("bad", 1)]
    assert rows[0][2] == 2.0 and rows[0][3] < 0.2  # the batch: its own loss against the window
    assert rows[1][2] == pytest.approx(-0.001) and rows[1][3] == 0.0005  # held-out check
    assert rows[2][2] == pytest.approx(0.002)
    assert qc.status("bad") == "pending" and qc.status("good") == "kept"
    assert not Criterion("combined").holds_out_momentum(5)
    assert Criterion("combined").holds_out_momentum(1) and Criterion("heldout").holds_out_momentum(5)


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
            monkeypatch.setattr(Criterion, "needs_evaluation", lambda self, n: True)
        else:
            monkeypatch.undo()
        model = Model(own, drift=0.01)
        qc = QualityControl(model.train, model.evaluate, model.snapshot, model.restore,
                            criterion=Criterion("combined", error=0.0005), revisit=2,
                            studies={s: "A" for s in own}, hold_out_momentum=model.hold_out,
                            train_losses=[0.1 + i / 1000 for i in range(20)])
        qc.baseline()
        qc.cycle = 10
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
