"""Inference metrics: overall, per sex and per age group (one row of `NAME_metrics.csv`).

Pure numpy/pandas/scikit-learn. Class 1 (PD) is the positive class and a subject is predicted
positive when `score >= threshold` (a score exactly at the threshold counts as positive).
A metric that is undefined for a group (AUROC with one class, sensitivity with no positives,
specificity with no negatives, anything on an empty group) is NaN with a `MetricWarning`
naming the group and the metric; it never raises.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from dqc.errors import DQCError

#: Metrics of the whole cohort, in column order.
OVERALL_METRICS: tuple[str, ...] = ("n", "accuracy", "sensitivity", "specificity", "auroc", "f1")
#: Metrics of each sex / age subgroup, in column order.
GROUP_METRICS: tuple[str, ...] = ("n", "accuracy", "sensitivity", "specificity", "auroc")
#: Columns `cohort_metrics` needs.
PREDICTION_COLUMNS: tuple[str, ...] = ("Group_bin", "score", "Sex", "Age")


class MetricWarning(UserWarning):
    """A metric is undefined for a group (e.g. AUROC with one class) and is reported as NaN."""


def _undefined(group: str, metric: str, why: str) -> None:
    warnings.warn(f"{group}: {metric} undefined ({why}); reported as NaN",
                  MetricWarning, stacklevel=3)


def binary_metrics(y_true: Sequence[int] | np.ndarray | pd.Series,
                   score: Sequence[float] | np.ndarray | pd.Series,
                   threshold: float = 0.5, *, group: str = "all") -> dict[str, float]:
    """`n`, `accuracy`, `sensitivity`, `specificity`, `auroc`, `f1` of scores against 0/1 labels.

    Prediction is `score >= threshold` (a score equal to the threshold is positive). `group`
    only names the group in warnings. Undefined metrics are NaN with a `MetricWarning`; an
    empty input gives n=0 and all NaN. Labels other than 0/1, non-finite scores or a length
    mismatch raise `DQCError`.
    """
    y = np.asarray(y_true).ravel()
    s = np.asarray(score, dtype=float).ravel()
    if y.shape != s.shape:
        raise DQCError(f"{group}: {y.size} labels but {s.size} scores")
    thr = float(threshold)
    if not math.isfinite(thr):
        raise DQCError(f"{group}: threshold must be a finite number, got {threshold!r}")
    n = int(y.size)
    out: dict[str, float] = {"n": n}
    if n == 0:
        warnings.warn(f"{group}: no subjects; every metric reported as NaN",
                      MetricWarning, stacklevel=2)
        out.update(dict.fromkeys(OVERALL_METRICS[1:], math.nan))
        return out
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise DQCError(f"{group}: labels must be 0 or 1, got {y[bad][0]!r}")
    if not np.isfinite(s).all():
        raise DQCError(f"{group}: {int((~np.isfinite(s)).sum())} of {n} scores are not finite")
    y = y.astype(int)
    pred = (s >= thr).astype(int)
    n_pos = int(y.sum())
    n_neg = n - n_pos

    out["accuracy"] = float(accuracy_score(y, pred))
    if n_pos:
        out["sensitivity"] = float(recall_score(y, pred, pos_label=1, labels=[0, 1]))
    else:
        out["sensitivity"] = math.nan
        _undefined(group, "sensitivity", f"no positives among {n}")
    if n_neg:
        out["specificity"] = float(recall_score(y, pred, pos_label=0, labels=[0, 1]))
    else:
        out["specificity"] = math.nan
        _undefined(group, "specificity", f"no negatives among {n}")
    if n_pos and n_neg:
        out["auroc"] = float(roc_auc_score(y, s))
    else:
        out["auroc"] = math.nan
        _undefined(group, "auroc", f"only class {int(y[0])} among {n}")
    out["f1"] = float(f1_score(y, pred, pos_label=1, labels=[0, 1], zero_division=0))
    return out


def _fmt(x: float) -> str:
    """60.0 -> '60', 62.5 -> '62.5'."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _check_bins(bins: Iterable[float]) -> tuple[float, ...]:
    cuts = tuple(float(b) for b in bins)
    if not cuts:
        raise DQCError("age bins: need at least one cut point, e.g. 60,70")
    if not all(math.isfinite(b) for b in cuts):
        raise DQCError("age bins: cut points must be finite numbers, got "
                       + ",".join(map(str, cuts)))
    if any(b >= c for b, c in zip(cuts, cuts[1:])):
        raise DQCError("age bins: cut points must be strictly increasing, got "
                       + ",".join(_fmt(b) for b in cuts))
    return cuts


def age_group_labels(bins: Iterable[float] = (60, 70)) -> list[str]:
    """Labels of the groups the cut points define, youngest first: `<60`, `60-70`, `>=70`."""
    cuts = _check_bins(bins)
    return ([f"<{_fmt(cuts[0])}"]
            + [f"{_fmt(a)}-{_fmt(b)}" for a, b in zip(cuts, cuts[1:])]
            + [f">={_fmt(cuts[-1])}"])


def age_groups(age: Sequence[float] | np.ndarray | pd.Series,
               bins: Iterable[float] = (60, 70)) -> pd.Series:
    """Age group label of each age; `bins` are cut points, intervals left-closed.

    With bins (60, 70): 59.9 -> `<60`, 60 -> `60-70`, 69.99 -> `60-70`, 70 -> `>=70`.
    Returns an ordered categorical Series (categories youngest first, index kept from a
    Series input); a missing age gives NaN. Non-numeric ages raise `DQCError`.
    """
    cuts = _check_bins(bins)
    labels = age_group_labels(cuts)
    index = age.index if isinstance(age, pd.Series) else None
    raw = pd.Series(np.asarray(age, dtype=object).ravel(), index=index)
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & raw.notna()
    if bad.any():
        raise DQCError(f"Age: not a number: {raw[bad].iloc[0]!r}")
    arr = values.to_numpy(dtype=float)
    codes = np.searchsorted(np.asarray(cuts), arr, side="right")  # left-closed intervals
    codes = np.where(np.isnan(arr), -1, codes)
    cat = pd.Categorical.from_codes(codes, categories=labels, ordered=True)
    return pd.Series(cat, index=raw.index, name="age_group")


def parse_age_bins(text: str) -> tuple[float, ...]:
    """`"60,70"` -> `(60.0, 70.0)`; raises `DQCError` on empty, non-numeric or unsorted text."""
    parts = [p.strip() for p in str(text).split(",")]
    if not text or not str(text).strip() or any(not p for p in parts):
        raise DQCError(f"--age-bins: expected comma-separated numbers such as 60,70, got {text!r}")
    cuts = []
    for p in parts:
        try:
            cuts.append(float(p))
        except ValueError:
            raise DQCError(f"--age-bins: {p!r} is not a number (in {text!r})") from None
    try:
        return _check_bins(cuts)
    except DQCError as err:
        raise DQCError(f"--age-bins: {err} (in {text!r})") from None


def cohort_metrics(predictions: pd.DataFrame, age_bins: Iterable[float] = (60, 70),
                   threshold: float = 0.5) -> dict[str, float]:
    """Overall metrics plus per-sex and per-age-group metrics, flattened into one row.

    `predictions` needs `Group_bin` (0/1), `score`, `Sex`, `Age`. Keys: `n`, `accuracy`,
    `sensitivity`, `specificity`, `auroc`, `f1`; then `sex_<S>_<metric>` for each sex in the
    data (sorted, as strings; 1.0 -> `1`) and `age_<label>_<metric>` for every age group the
    bins define (youngest first, including empty ones: n=0, NaN), metrics `n`, `accuracy`,
    `sensitivity`, `specificity`, `auroc`. Subjects with missing Sex/Age count overall only.
    Prediction is `score >= threshold`.
    """
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise DQCError(f"predictions: missing column(s) {', '.join(missing)}")
    y = predictions["Group_bin"].to_numpy()
    s = predictions["score"].to_numpy(dtype=float)
    row: dict[str, float] = dict(binary_metrics(y, s, threshold, group="all"))

    sex = predictions["Sex"]
    present = sex.notna().to_numpy()
    sex_str = np.array([_fmt(v) if isinstance(v, (float, np.floating)) and math.isfinite(v)
                        else str(v) for v in sex], dtype=object)
    for value in sorted(set(sex_str[present])):
        mask = present & (sex_str == value)
        m = binary_metrics(y[mask], s[mask], threshold, group=f"sex_{value}")
        row.update({f"sex_{value}_{k}": m[k] for k in GROUP_METRICS})

    groups = age_groups(predictions["Age"], age_bins)
    group_arr = groups.astype(object).to_numpy()
    for label in groups.cat.categories:
        mask = group_arr == label
        m = binary_metrics(y[mask], s[mask], threshold, group=f"age_{label}")
        row.update({f"age_{label}_{k}": m[k] for k in GROUP_METRICS})
    return row


def metrics_table(rows: list[dict]) -> pd.DataFrame:
    """Rows of `cohort_metrics` (plus e.g. `cycle`) as a table with a stable column order.

    `cycle` first if present, then the overall metrics, then `sex_*` and `age_*` columns
    (groups in order of first appearance, which `cohort_metrics` already sorts), then any
    other columns. A column missing from a row is NaN.
    """
    seen: list[str] = []
    for r in rows:
        seen.extend(k for k in r if k not in seen)
    head = [c for c in ("cycle", *OVERALL_METRICS) if c in seen]
    sex = [c for c in seen if c.startswith("sex_")]
    age = [c for c in seen if c.startswith("age_")]
    rest = [c for c in seen if c not in head and c not in sex and c not in age]
    return pd.DataFrame(list(rows), columns=head + sex + age + rest)
