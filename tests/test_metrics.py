"""dqc.metrics against hand-computed values on a crafted 12-subject prediction set."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dqc.errors import DQCError
from dqc.metrics import (MetricWarning, age_group_labels, age_groups, binary_metrics,
                         cohort_metrics, metrics_table, parse_age_bins)

# Threshold 0.5, prediction = score >= 0.5.
#  id  y  score  Sex  Age    outcome
ROWS = [
    (1, 1, 0.90, "M", 55.0),   # TP
    (2, 1, 0.80, "F", 62.0),   # TP
    (3, 1, 0.50, "M", 70.0),   # TP (score exactly at threshold counts positive)
    (4, 1, 0.42, "F", 65.0),   # FN
    (5, 1, 0.45, "M", 58.0),   # FN
    (6, 0, 0.10, "F", 50.0),   # TN
    (7, 0, 0.20, "M", 69.99),  # TN
    (8, 0, 0.49, "F", 75.0),   # TN
    (9, 0, 0.60, "M", 60.0),   # FP
    (10, 0, 0.40, "F", 71.0),  # TN
    (11, 0, 0.05, "M", 80.0),  # TN
    (12, 1, 0.95, "F", 59.9),  # TP
]


@pytest.fixture
def preds() -> pd.DataFrame:
    return pd.DataFrame(ROWS, columns=["Subject", "Group_bin", "score", "Sex", "Age"])


def _pairwise_auroc(y, s) -> float:
    """AUROC from its definition: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_overall_hand_computed(preds):
    # TP=4 FN=2 TN=5 FP=1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing undefined here: no warning at all
        m = binary_metrics(preds["Group_bin"], preds["score"])
    assert m["n"] == 12
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(8 / 11)  # 2TP / (2TP + FP + FN)
    # pos {.9,.8,.5,.42,.45,.95} vs neg {.1,.2,.49,.6,.4,.05}: 6+6+5+4+4+6 = 31 of 36 pairs
    assert m["auroc"] == pytest.approx(31 / 36)
    assert m["auroc"] == pytest.approx(_pairwise_auroc(preds["Group_bin"], preds["score"]))


def test_auroc_ties_count_half():
    # pairs (pos, neg): (.3,.3) tie=.5, (.3,.2)=1, (.7,.3)=1, (.7,.2)=1 -> 3.5/4
    y, s = [0, 1, 0, 1], [0.3, 0.3, 0.2, 0.7]
    assert binary_metrics(y, s)["auroc"] == pytest.approx(0.875)
    assert _pairwise_auroc(y, s) == pytest.approx(0.875)


def test_threshold_honoured():
    assert binary_metrics([1, 0], [0.5, 0.499])["accuracy"] == 1.0  # 0.5 >= 0.5 -> positive
    m = binary_metrics([1, 1, 0, 0], [0.5, 0.7, 0.6, 0.1], threshold=0.65)
    assert m["sensitivity"] == pytest.approx(0.5)   # 0.5 < 0.65 -> FN
    assert m["specificity"] == pytest.approx(1.0)   # 0.6 < 0.65 -> TN
    assert m["auroc"] == pytest.approx(0.75)        # threshold-free


def test_cohort_overall_and_subgroups(preds):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = cohort_metrics(preds, age_bins=(60, 70))
    assert row["n"] == 12
    assert row["accuracy"] == pytest.approx(0.75)
    assert row["f1"] == pytest.approx(8 / 11)
    expected = {
        # M: 1 TP, 3 TP, 5 FN, 7 TN, 9 FP, 11 TN; pos {.9,.5,.45} vs neg {.2,.6,.05}: 3+2+2
        "sex_M": (6, 4 / 6, 2 / 3, 2 / 3, 7 / 9),
        # F: 2 TP, 4 FN, 12 TP, 6 TN, 8 TN, 10 TN; pos {.8,.42,.95} vs neg {.1,.49,.4}: 3+2+3
        "sex_F": (6, 5 / 6, 2 / 3, 1.0, 8 / 9),
        # <60: 1 TP, 5 FN, 12 TP (59.9), 6 TN; pos {.9,.45,.95} vs neg {.1}: 3 of 3
        "age_<60": (4, 3 / 4, 2 / 3, 1.0, 1.0),
        # 60-70: 2 TP, 4 FN, 9 FP (60), 7 TN (69.99); pos {.8,.42} vs neg {.6,.2}: 2+1
        "age_60-70": (4, 2 / 4, 1 / 2, 1 / 2, 3 / 4),
        # >=70: 3 TP (70, score 0.5), 8 TN, 10 TN, 11 TN
        "age_>=70": (4, 1.0, 1.0, 1.0, 1.0),
    }
    for group, (n, acc, sens, spec, auc) in expected.items():
        assert row[f"{group}_n"] == n, group
        assert row[f"{group}_accuracy"] == pytest.approx(acc), group
        assert row[f"{group}_sensitivity"] == pytest.approx(sens), group
        assert row[f"{group}_specificity"] == pytest.approx(spec), group
        assert row[f"{group}_auroc"] == pytest.approx(auc), group
    assert "sex_F_f1" not in row
    keys = list(row)
    # sexes sorted, ages youngest first, each group's metrics in a fixed order
    assert keys[:6] == ["n", "accuracy", "sensitivity", "specificity", "auroc", "f1"]
    assert [k for k in keys if k.endswith("_n")] == [
        "sex_F_n", "sex_M_n", "age_<60_n", "age_60-70_n", "age_>=70_n"]


def test_one_class_subgroup_is_nan_with_warning(preds):
    preds = preds.copy()
    preds.loc[preds["Sex"] == "F", "Group_bin"] = 1  # every F is PD
    with pytest.warns(MetricWarning) as record:
        row = cohort_metrics(preds)
    messages = [str(w.message) for w in record]
    assert any("sex_F" in m and "specificity" in m for m in messages)
    assert any("sex_F" in m and "auroc" in m for m in messages)
    assert math.isnan(row["sex_F_specificity"]) and math.isnan(row["sex_F_auroc"])
    assert row["sex_F_n"] == 6
    # F scores .8 .42 .1 .49 .4 .95, all PD now: only .8 and .95 are >= 0.5
    assert row["sex_F_sensitivity"] == pytest.approx(2 / 6)
    assert row["sex_F_accuracy"] == pytest.approx(2 / 6)
    assert not math.isnan(row["sex_M_auroc"])


def test_no_positives_sensitivity_nan():
    with pytest.warns(MetricWarning) as record:
        m = binary_metrics([0, 0, 0], [0.1, 0.6, 0.2], group="grp")
    assert sorted(str(w.message).split(" undefined")[0] for w in record) == [
        "grp: auroc", "grp: sensitivity"]
    assert math.isnan(m["sensitivity"]) and math.isnan(m["auroc"])
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == 0.0  # zero_division=0


def test_empty_input_all_nan():
    with pytest.warns(MetricWarning, match="no subjects"):
        m = binary_metrics([], [])
    assert m["n"] == 0
    assert all(math.isnan(m[k]) for k in ("accuracy", "sensitivity", "specificity", "auroc", "f1"))


def test_empty_age_group_kept_as_nan(preds):
    young = preds.assign(Age=40.0)
    with pytest.warns(MetricWarning) as record:
        row = cohort_metrics(young)
    assert {str(w.message).split(":")[0] for w in record} == {"age_60-70", "age_>=70"}
    assert row["age_<60_n"] == 12
    assert row["age_60-70_n"] == 0 and math.isnan(row["age_60-70_accuracy"])
    assert row["age_>=70_n"] == 0 and math.isnan(row["age_>=70_auroc"])


def test_age_group_edges():
    labels = age_groups([59.9, 60, 69.99, 70, 85, np.nan])
    assert list(labels.iloc[:5]) == ["<60", "60-70", "60-70", ">=70", ">=70"]
    assert pd.isna(labels.iloc[5])
    assert list(labels.cat.categories) == ["<60", "60-70", ">=70"]


def test_age_groups_general_bins_and_index():
    ages = pd.Series([49, 50, 62.5, 64, 80], index=[10, 11, 12, 13, 14])
    labels = age_groups(ages, bins=(50, 62.5, 75))
    assert list(labels.index) == [10, 11, 12, 13, 14]
    assert list(labels) == ["<50", "50-62.5", "62.5-75", "62.5-75", ">=75"]
    assert age_group_labels((65,)) == ["<65", ">=65"]


def test_age_groups_bad_input():
    with pytest.raises(DQCError):
        age_groups([60, "old"])
    with pytest.raises(DQCError):
        age_groups([60], bins=(70, 60))


def test_parse_age_bins():
    assert parse_age_bins("60,70") == (60.0, 70.0)
    assert parse_age_bins(" 55 , 62.5,75 ") == (55.0, 62.5, 75.0)
    assert parse_age_bins("65") == (65.0,)


@pytest.mark.parametrize("text", ["", " ", "60,", "60,,70", "sixty,70", "70,60", "60,60",
                                  "60,inf", "nan"])
def test_parse_age_bins_errors(text):
    with pytest.raises(DQCError, match="--age-bins"):
        parse_age_bins(text)


def test_bad_labels_and_lengths_raise_dqcerror(preds):
    with pytest.raises(DQCError):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(DQCError):
        binary_metrics([0, 1], [0.1])
    with pytest.raises(DQCError):
        binary_metrics([0, 1], [0.1, np.nan])
    with pytest.raises(DQCError, match="Age"):
        cohort_metrics(preds.drop(columns="Age"))


def test_metrics_table_column_order(preds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        rows = [{**cohort_metrics(preds), "cycle": 1},
                {**cohort_metrics(preds, threshold=0.9), "cycle": 2}]
    table = metrics_table(rows)
    cols = list(table.columns)
    assert cols[:7] == ["cycle", "n", "accuracy", "sensitivity", "specificity", "auroc", "f1"]
    first_sex = cols.index("sex_F_n")
    first_age = cols.index("age_<60_n")
    assert all(c.startswith("sex_") for c in cols[first_sex:first_age])
    assert all(c.startswith("age_") for c in cols[first_age:])
    assert cols[first_age:first_age + 10:5] == ["age_<60_n", "age_60-70_n"]
    assert list(table["cycle"]) == [1, 2]
    assert table.loc[1, "sensitivity"] == pytest.approx(2 / 6)  # .95 and .90 only
    # a column missing from one row becomes NaN
    partial = metrics_table([{"accuracy": 0.5, "extra": 1}, {"n": 3, "cycle": 0}])
    assert list(partial.columns) == ["cycle", "n", "accuracy", "extra"]
    assert math.isnan(partial.loc[0, "cycle"])


def test_no_tensorflow_import():
    code = ("import sys, dqc.metrics; "
            "assert not {'tensorflow', 'keras'} & set(sys.modules), 'TF imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
