"""What a QC run writes and prints: the log, the per-image table, the summary and its table."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from dqc.criteria import Criterion, Rates
from dqc.io import write_csv, write_json
from dqc.qc import QualityControl

IMAGE_COLUMNS = ["Subject", "Study", "times_flagged", "first_flagged_cycle", "revisit_cycle",
                 "eliminated", "eliminated_cycle", "status"]


def log_frame(policy: QualityControl) -> pd.DataFrame:
    """The log rows in the criterion's columns (`Criterion.log_columns`)."""
    return pd.DataFrame(policy.state.log, columns=policy.criterion.log_columns())


def write_log(policy: QualityControl, path: str | Path) -> None:
    """NAME.csv: one row per evaluation, baseline first (Cycle,Subject,Study,ACC,...); an
    undefined value (the baseline's statistic, say) is an empty cell."""
    write_csv(path, log_frame(policy))


def image_table(policy: QualityControl, train: pd.DataFrame) -> pd.DataFrame:
    """One row per training image: how often flagged, when, and its final status."""
    rows = []
    for subject, study in zip(train.Subject, train.Study):
        r = policy.state.images[subject]
        rows.append({"Subject": subject, "Study": study, "times_flagged": r.times_flagged,
                     "first_flagged_cycle": r.first_flagged_cycle,
                     "revisit_cycle": r.revisit_cycle,
                     "eliminated": int(r.eliminated_cycle is not None),
                     "eliminated_cycle": r.eliminated_cycle, "status": policy.status(subject)})
    table = pd.DataFrame(rows, columns=IMAGE_COLUMNS)
    for column in ("first_flagged_cycle", "revisit_cycle", "eliminated_cycle"):
        table[column] = table[column].astype("Int64")
    if "Harmful" in train.columns:
        table["Harmful"] = train["Harmful"].to_numpy()
    return table


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def summarize(images: pd.DataFrame, log: pd.DataFrame, cycles: range,
              criterion: Criterion = Rates(), calibration: dict | None = None,
              unjudged: Sequence[str] = ()) -> dict:
    """Counts, and detection figures when the ground truth `Harmful` column is present;
    `unjudged`: the centers whose batches the criterion did not judge."""
    summary = {
        "cycles": [cycles.start, cycles.stop - 1],
        "criterion": criterion.parameters(),
        "calibration": calibration or {"steps": 0, "evaluations": 0, "seconds": 0.0,
                                       "windows": {}},
        "images": int(len(images)),
        "kept": int((images.status == "kept").sum()),
        "pending": int((images.status == "pending").sum()),
        "eliminated": int((images.status == "eliminated").sum()),
        "flagged_at_least_once": int((images.times_flagged > 0).sum()),
        "evaluations": int(len(log)),
        "updates_undone": int(log.Ignored.sum()),
        "unjudged_centers": list(unjudged),
    }
    if "Harmful" not in images.columns:
        return summary
    bad, good = images[images.Harmful == 1], images[images.Harmful == 0]
    flagged = images.times_flagged > 0
    per_center = {}
    for study, group in bad.groupby("Study", sort=True):
        per_center[study] = {"harmful": int(len(group)),
                             "eliminated": int(group.eliminated.sum()),
                             "pending": int((group.status == "pending").sum()),
                             "identified": bool(group.eliminated.all())}
    delays = (bad.eliminated_cycle - bad.first_flagged_cycle).dropna().astype(int).tolist()
    summary["detection"] = {
        "harmful": int(len(bad)), "good": int(len(good)),
        "harmful_eliminated": int(bad.eliminated.sum()),
        "good_eliminated": int(good.eliminated.sum()),
        "harmful_pending": int((bad.status == "pending").sum()),
        "good_pending": int((good.status == "pending").sum()),
        "elimination_tpr": _rate(int(bad.eliminated.sum()), len(bad)),
        "elimination_fpr": _rate(int(good.eliminated.sum()), len(good)),
        "flagged_tpr": _rate(int(flagged[bad.index].sum()), len(bad)),
        "flagged_fpr": _rate(int(flagged[good.index].sum()), len(good)),
        "centers_with_harmful": len(per_center),
        "centers_identified": sum(c["identified"] for c in per_center.values()),
        "per_center": per_center,
        "cycles_first_flag_to_elimination": delays,
        "mean_cycles_to_elimination": float(np.mean(delays)) if delays else None,
    }
    return summary


def write_outputs(policy: QualityControl, train: pd.DataFrame, out: Path, name: str,
                  cycles: range) -> dict:
    """NAME.csv, NAME_images.csv and NAME_summary.json in `out`, each written atomically."""
    log = log_frame(policy)
    images = image_table(policy, train)
    write_csv(out / f"{name}.csv", log)
    write_csv(out / f"{name}_images.csv", images)
    summary = summarize(images, log, cycles, policy.criterion, policy.state.calibration,
                        policy.unjudged)
    write_json(out / f"{name}_summary.json", summary)
    return summary


def cycle_line(policy: QualityControl, cycle: int, stats, seconds: float) -> str:
    rows = [r for r in policy.state.log if r["Cycle"] == cycle]
    undone = sum(r["Ignored"] for r in rows)
    ref = policy.state.reference
    val = (f"val acc {ref.acc:.3f} FPR {ref.fpr:.3f} FNR {ref.fnr:.3f}" if ref is not None
           else "val not evaluated")
    return (f"cycle {cycle:3d}  loss {stats.loss:.4f}  train acc {stats.accuracy:.3f}  "
            f"{val}  "
            f"{len(rows)} evaluations, {undone} undone  "
            f"waiting {len(policy.waiting())}  eliminated {len(policy.eliminated())}  "
            f"{seconds:.1f} s")


def summary_table(policy: QualityControl, train: pd.DataFrame) -> str:
    """A per-center console table: images, flagged, pending, eliminated (and harmful)."""
    images = image_table(policy, train)
    images["flagged"] = images.times_flagged > 0
    images["pending"] = images.status == "pending"
    columns = {"Subject": "images", "flagged": "flagged", "pending": "pending",
               "eliminated": "eliminated"}
    if "Harmful" in images.columns:
        columns["Harmful"] = "harmful"
    agg = {c: ("count" if c == "Subject" else "sum") for c in columns}
    table = images.groupby("Study", sort=True).agg(agg).rename(columns=columns).astype(int)
    table.loc["total"] = table.sum()
    return "quality control per center:\n" + table.to_string()
