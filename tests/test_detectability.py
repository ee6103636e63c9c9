"""The detectability instrument: the model left exactly as it came, numbers as computed by hand,
the candidate plan, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import ROOT, SHAPE, call_script

from dqc import checkpoint
from dqc.data import load_table
from dqc.detectability import (OUTPUT_FILES, Candidate, calibrated_threshold, candidate_arrays,
                               measure, plan_candidates, run_instrument, separability, summarize,
                               validation_scorer)
from dqc.errors import DQCError
from dqc.model import build_models
from dqc.trainer import Trainer

MODULE = ROOT / "dqc" / "detectability.py"


def pair_auc(positive, negative) -> float:
    """ROC AUC by counting pairs (ties half): an implementation independent of sklearn's."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def bce(y, p) -> float:
    y, p = np.asarray(y, float), np.clip(np.asarray(p, float), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# --- a real tiny model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(cohort, tmp_path_factory) -> dict:
    """A fresh model on the tiny cohort's shape, saved as cycle 9 (with its optimizer state)."""
    trainer = Trainer(*build_models(SHAPE))
    folder = tmp_path_factory.mktemp("detectability_model")
    paths = checkpoint.save_cycle(trainer, folder, "tm", 9)
    return {"trainer": trainer, "paths": paths, "train": load_table(cohort["train"], "train"),
            "val": load_table(cohort["val"], "validation")}


def test_model_state_bit_identical_and_candidates_independent(tiny, tmp_path):
    trainer, train, val = tiny["trainer"], tiny["train"], tiny["val"]
    before = trainer.state_arrays()
    settings = dict(types=["inverted", "label"], n=2, batch_size=3, seed=1)
    summary = run_instrument(trainer, train, val, error=0.02, cycle=10, out=tmp_path,
                             verbose=False, **settings)
    after = trainer.state_arrays()
    assert len(after) == len(before)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))

    raw = pd.read_csv(tmp_path / OUTPUT_FILES["raw"], dtype={"center": str})
    assert list(dict.fromkeys(raw.group)) == ["good", "inverted", "label", "good single",
                                              "inverted single", "label single"]
    assert (raw.groupby("group").size() == 2).all() and (raw.d_val_loss != 0).all()
    for kind in ("batch", "single"):  # paired: harmful candidates reuse the good images
        part = raw[raw.kind == kind]
        assert part.groupby("type").subjects.apply(tuple).nunique() == 1
    assert set(summary["groups"]) == set(raw.group)
    for name in OUTPUT_FILES.values():
        assert (tmp_path / name).stat().st_size > 0

    # each candidate starts from the same state: in reverse order, the same numbers
    candidates = plan_candidates(train, **settings)
    again, _ = measure(trainer, candidates[::-1],
                       lambda c: candidate_arrays(c, train, SHAPE, settings["seed"]),
                       validation_scorer(trainer, val, verbose=False),
                       val.Group_bin.to_numpy(), error=0.02, learning_rate=summary["learning_rate"],
                       verbose=False)
    columns = ["subjects", "dFP", "dFN", "d_val_loss", "d_val_auroc", "own_loss"]
    pd.testing.assert_frame_equal(again[::-1].reset_index(drop=True)[columns], raw[columns])
    assert all(np.array_equal(a, b) for a, b in zip(before, trainer.state_arrays()))


def test_paired_candidates_are_corrupted_in_memory(tiny):
    train = tiny["train"]
    good, inverted, label = (c for c in plan_candidates(train, ["inverted", "label"], n=1,
                                                        batch_size=3)
                             if c.kind == "batch")
    assert good.subjects == inverted.subjects == label.subjects and inverted.n_harmful == 3
    x, y = candidate_arrays(good, train, SHAPE)
    xi, yi = candidate_arrays(inverted, train, SHAPE)
    xl, yl = candidate_arrays(label, train, SHAPE)
    np.testing.assert_array_equal(xi, 255 - x)  # the cohort is 8-bit
    np.testing.assert_array_equal(yi, y)
    np.testing.assert_array_equal(xl, x)
    np.testing.assert_array_equal(yl, 1 - y)


# --- a stand-in model and evaluator -----------------------------------------------------------

class StandIn:
    """Counts steps since the last restore; losses come from a list."""

    def __init__(self, losses):
        self.state, self.losses, self.rates = 0, iter(losses), []

    def snapshot(self):
        return self.state

    def restore(self, snapshot):
        self.state = snapshot

    def set_learning_rate(self, value):
        self.rates.append(value)

    def train_step(self, x, y):
        self.state += 1
        return next(self.losses), 0.0


Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
BASE = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]  # FP 1, FN 1
CASES = [  # group, k, scores after the step, own loss, dFP, dFN
    ("good single", 1, BASE, 0.3, 0, 0),
    ("good single", 1, [0.1, 0.2, 0.55, 0.6, 0.4, 0.7, 0.8, 0.9], 0.5, 1, 0),
    ("noise single", 1, [0.1, 0.2, 0.3, 0.6, 0.4, 0.45, 0.8, 0.9], 0.9, 0, 1),
    ("noise single", 1, [0.1, 0.2, 0.3, 0.4, 0.4, 0.45, 0.3, 0.9], 1.2, -1, 2),
    ("good", 2, [0.1, 0.2, 0.3, 0.4, 0.4, 0.7, 0.8, 0.9], 0.4, -1, 0),
    ("noise", 2, [0.1, 0.2, 0.3, 0.6, 0.2, 0.3, 0.45, 0.9], 0.8, 0, 2),
]


def test_stand_in_numbers_match_hand_computation():
    model = StandIn([case[3] for case in CASES])
    candidates = [Candidate(g, "single" if k == 1 else "batch", g.split()[0], "C1",
                            tuple(f"s{i}{j}" for j in range(k)), 0)
                  for i, (g, k, *_) in enumerate(CASES)]
    outputs = iter([BASE] + [case[2] for case in CASES])

    def evaluate():
        assert model.state in (0, 1)  # baseline, or one step from the restored state
        return np.array(next(outputs))

    raw, base = measure(model, candidates, lambda c: (np.zeros((1,)), np.zeros(1)), evaluate,
                        Y, error=0.2, learning_rate=1e-3, verbose=False)
    assert model.state == 0 and model.rates == [1e-3] * len(CASES)
    assert (base.fp, base.fn) == (1, 1)

    d_fpr = np.array([c[4] for c in CASES]) / 4
    d_fnr = np.array([c[5] for c in CASES]) / 4
    rise = np.maximum(d_fpr, d_fnr)
    base_auc = pair_auc(np.array(BASE)[Y == 1], np.array(BASE)[Y == 0])
    d_loss = [bce(Y, c[2]) - bce(Y, BASE) for c in CASES]
    d_auc = [pair_auc(np.array(c[2])[Y == 1], np.array(c[2])[Y == 0]) - base_auc for c in CASES]
    assert raw.dFP.tolist() == [c[4] for c in CASES] and raw.dFN.tolist() == [c[5] for c in CASES]
    np.testing.assert_allclose(raw.dFPR, d_fpr)
    np.testing.assert_allclose(raw.dFNR, d_fnr)
    np.testing.assert_allclose(raw.rate_rise, rise)
    np.testing.assert_allclose(raw.d_val_loss, d_loss, rtol=1e-9)
    np.testing.assert_allclose(raw.d_val_auroc, d_auc, atol=1e-12)
    np.testing.assert_allclose(raw.own_loss, [c[3] for c in CASES])
    # the rule at e = 0.2: rise > k * 0.2
    assert raw.flagged_by_rule.tolist() == [0, 1, 1, 1, 0, 1]

    table, summary = summarize(raw, error=0.2)
    rows = table.set_index("group")
    assert rows.loc["good single", "flagged"] == 0.5 and rows.loc["noise", "flagged"] == 1
    # separability: noise singles (rows 2, 3) against good singles (0, 1), batches 5 vs 4
    assert rows.loc["noise single", "auc_rate_rise"] == pair_auc(rise[2:4], rise[0:2]) == 0.875
    assert rows.loc["noise single", "auc_own_loss"] == 1.0
    assert rows.loc["noise single", "auc_d_val_loss"] == pair_auc(d_loss[2:4], d_loss[0:2])
    assert rows.loc["noise single", "auc_auroc_drop"] == pair_auc(
        -np.array(d_auc[2:4]), -np.array(d_auc[0:2]))
    assert rows.loc["noise", "auc_rate_rise"] == 1.0
    assert np.isnan(rows.loc["good", "auc_rate_rise"])
    # good singles' rises 0 and 0.25; n=2 allows floor(0.1) = 0 flags: e = 0.25
    assert summary["calibrated_error"] == 0.25
    assert summary["calibrated_loss_tolerance"] == pytest.approx(d_loss[1], rel=1e-12)
    assert summary["groups"]["noise single"]["flagged_calibrated"] == 0.5  # 0.5 > 0.25 only
    _, half = summarize(raw, error=0.2, fraction=0.5)  # one false flag of two allowed
    assert half["calibrated_error"] == 0 and half["calibrated_loss_tolerance"] == 0
    looser, _ = summarize(raw, error=0.3)  # the share flagged follows the error asked for
    assert looser.set_index("group").flagged.tolist() == [0, 0.5, 0, 0]  # k=2: 0.5 < 0.6


def test_hold_out_momentum_zeroes_before_every_step_only_when_asked():
    calls = []

    class Held(StandIn):
        def hold_out_momentum(self):
            calls.append(("hold", self.state))

        def train_step(self, x, y):
            calls.append(("step", self.state))
            return super().train_step(x, y)

    candidates = [Candidate("good", "batch", "good", "C1", ("a", "b"), 0)] * 3
    for held_out, expected in ((True, [("hold", 0), ("step", 0)] * 3),
                               (False, [("step", 0)] * 3)):
        calls.clear()
        measure(Held([0.1] * 3), candidates, lambda c: (np.zeros((1,)), np.zeros(1)),
                lambda: np.array(BASE), Y, error=0.2, learning_rate=1e-3,
                hold_out_momentum=held_out, verbose=False)
        assert calls == expected


# --- the two summary functions ------------------------------------------------------------------

@pytest.mark.parametrize("values, fraction, expected", [
    ([0.0] * 19 + [0.3], 0.05, 0.0),           # one false flag of 20 is allowed
    ([0.0] * 18 + [0.3, 0.3], 0.05, 0.3),      # tied: both or neither
    ([0.1] * 5, 0.05, 0.1),                    # all equal
    ([-0.2, -0.1], 0.05, 0.0),                 # never negative
    ([0.4], 0.05, 0.4),                        # n = 1
    (np.arange(60) / 100, 0.05, 0.56),         # 3 of 60 above
    (np.arange(100), 0.29, 70.0),              # floor(0.29 * 100) = 29, not 28
])
def test_calibrated_threshold(values, fraction, expected):
    assert calibrated_threshold(values, fraction) == pytest.approx(expected)


def test_calibrated_threshold_edges():
    assert np.isnan(calibrated_threshold([]))
    with pytest.raises(ValueError):
        calibrated_threshold([0.1], fraction=1.0)


@pytest.mark.parametrize("harmful, good, expected", [
    ([1, 2, 3], [1, 2, 3], 0.5),
    ([5, 5], [5, 5, 5], 0.5),                  # all equal
    ([3, 4], [1, 2], 1.0),
    ([1, 2], [3, 4], 0.0),
    ([1, 2], [1], 0.75),                       # a tie counts half
    ([0.2], [0.1], 1.0),                       # n = 1 each
])
def test_separability(harmful, good, expected):
    assert separability(harmful, good) == expected == pair_auc(harmful, good)


def test_separability_empty_side_is_nan():
    assert np.isnan(separability([], [1.0])) and np.isnan(separability([1.0], []))


# --- the plan from a training table --------------------------------------------------------------

def scenario_table() -> pd.DataFrame:
    """C1: 6 good; C2: 3 good + 2 inverted; C3: 4 noise (no images: the plan needs none)."""
    rows = [("C1", 0, "")] * 6 + [("C2", 0, "")] * 3 + [("C2", 1, "inverted")] * 2 \
        + [("C3", 1, "noise")] * 4
    return pd.DataFrame([{"Subject": f"s{i:02d}", "Study": c, "Path": f"s{i}.nii.gz",
                          "Group_bin": i % 2, "Harmful": h, "HarmfulType": t}
                         for i, (c, h, t) in enumerate(rows)])


def test_plan_from_harmful_rows():
    table = scenario_table()
    study = dict(zip(table.Subject, table.Study))
    harmful = set(table.Subject[table.Harmful == 1])
    plan = plan_candidates(table, n=4, batch_size=3, seed=0)
    groups = {g: [c for c in plan if c.group == g] for g in dict.fromkeys(c.group for c in plan)}
    assert list(groups) == ["good", "inverted", "noise", "good single", "inverted single",
                            "noise single"]
    assert [len(v) for v in groups.values()] == [4, 4, 4, 4, 2, 4]  # 2 inverted rows only
    for c in plan:
        assert {study[s] for s in c.subjects} == {c.center} and c.corrupt is None
        assert c.n_harmful == sum(s in harmful for s in c.subjects)
    assert all(c.n_harmful == 0 and len(c.subjects) == 3 for c in groups["good"])
    assert all(c.center == "C2" and c.n_harmful == 2 for c in groups["inverted"])  # + 1 good
    assert all(c.center == "C3" and c.n_harmful == 3 for c in groups["noise"])
    assert {c.subjects[0] for c in groups["inverted single"]} <= harmful
    assert plan == plan_candidates(table, n=4, batch_size=3, seed=0)  # reproducible


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=7), "group 'good' has no candidates: no center has 7 good images"),
    (dict(table=scenario_table().assign(Harmful=0)), "no Harmful rows: give --types"),
    (dict(n=0), "-n must be at least 1"),
    (dict(types=["nosuch"]), "unknown harmful type(s) nosuch"),
])
def test_plan_refuses(change, message):
    args = dict(table=scenario_table(), types=None, n=2, batch_size=3)
    args.update(change)
    with pytest.raises(DQCError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_candidates(**args)


# --- the command line ---------------------------------------------------------------------------

def cli_args(tiny, cohort, out, **change) -> list[str]:
    flags = {"-en": str(tiny["paths"]["encoder"]), "-pd": str(tiny["paths"]["classifier"]),
             "-fn_train": str(cohort["train"]), "-fn_test": str(cohort["val"]),
             "--types": "noise", "-n": "2", "--batch-size": "2", "--out": str(out)}
    flags.update(change)
    return [x for k, v in flags.items() for x in (k, v)] + ["--quiet"]


def test_command_line_end_to_end(tiny, cohort, tmp_path):
    out = tmp_path / "det"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "dqc.detectability",
                           *cli_args(tiny, cohort, out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "calibrated -error" in done.stdout and "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES.values())
    summary = json.loads((out / OUTPUT_FILES["json"]).read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert list(summary["groups"]) == ["good", "noise", "good single", "noise single"]
    assert summary["baseline"]["n_hc"] + summary["baseline"]["n_pd"] == 12
    assert len(pd.read_csv(out / OUTPUT_FILES["raw"])) == 8
    assert "| good single | 2 |" in (out / OUTPUT_FILES["markdown"]).read_text()
    assert (out / OUTPUT_FILES["plot"]).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("change, message", [
    ({"-fn_test": "no_such_val.csv"}, "no_such_val.csv: CSV file not found"),
    ({"-n": "0"}, "-n must be at least 1"),
    ({"--types": "inverted,nosuch"}, "unknown harmful type(s) nosuch"),
    ({"-pd": "missing_classifier.keras"}, "classifier model file not found"),
    ({"--batch-size": "30"}, "no center has 30 good images"),
])
def test_command_line_bad_input(tiny, cohort, tmp_path, capsys, change, message):
    out = tmp_path / "det"
    run = call_script(cli_args(tiny, cohort, out, **change), capsys, out, script_path=MODULE)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")
    assert message in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_single_class_validation_set_is_refused(tiny, cohort, tmp_path, capsys):
    val = pd.read_csv(cohort["val"])
    one = tmp_path / "val_pd.csv"
    val[val.Group_bin == 1].assign(Path=[str(Path(cohort["val"]).parent / p)
                                         for p in val.Path[val.Group_bin == 1]]
                                   ).to_csv(one, index=False)
    out = tmp_path / "det"
    run = call_script(cli_args(tiny, cohort, out, **{"-fn_test": str(one)}), capsys, out,
                      script_path=MODULE)
    assert run.returncode == 2 and "both classes" in run.stderr and not out.exists()
