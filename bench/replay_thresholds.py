"""Replay the batch-loss decisions of a `witnessed` (or `trainloss`) QC log under other
self-set thresholds, offline: which regular batches and which revisits each rule would flag.

    python bench/replay_thresholds.py study_out/seed_1/qc_A_witnessed study_out/seed_1/qc_C_witnessed

An analysis aid, not a test and not a run: the log's trajectory is taken as it was (a batch the
replayed rule would have kept but the run undid still counts as kept, and the other way round),
and the window starts from the log's first 10 kept batch losses (the pre-training's are not in
the log). With the run's own rule (z = 3, linear) it gives back the run's decisions. Harmful:
the images the run's `qc_images.csv` marks; a batch is harmful when its center holds more than
10 harmful images (a whole harmful center). Use it only on tuning seeds.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from dqc.criteria import MIN_WINDOW, robust_limit
from dqc.defaults import WINDOW

#: The rules replayed: (z, whether the robust z-score is taken of the log of the loss).
RULES = ((3.0, False), (4.0, False), (3.0, True), (4.0, True))


def replay(log: pd.DataFrame, z: float, log_scale: bool, window: int = WINDOW) -> pd.DataFrame:
    """Each regular batch and revisit of `log` (in order) with whether the rule flags it;
    kept batches enter the window."""
    f = math.log if log_scale else float
    rows = log[(log.Cycle > 0) & log.VAL_LOSS.isna()]
    kept = [f(x) for x in rows[(rows.Subject == "batch") & (rows.Ignored == 0)].TRAIN_LOSS]
    values, out = kept[:MIN_WINDOW], []
    for row in rows.itertuples():
        flagged = f(row.TRAIN_LOSS) > robust_limit(values[-window:], z)
        out.append({"cycle": row.Cycle, "revisit": row.Subject != "batch", "study": row.Study,
                    "subject": row.Subject, "flagged": flagged})
        if row.Subject == "batch" and not flagged:
            values.append(f(row.TRAIN_LOSS))
    return pd.DataFrame(out)


def summary(folder: Path) -> list[dict]:
    """One row per rule: flagged good and harmful batches, and revisits found harmful again."""
    log = pd.read_csv(folder / "qc.csv")
    images = pd.read_csv(folder / "qc_images.csv")
    harmful = set(images.Subject[images.Harmful == 1])
    counts = images[images.Harmful == 1].Study.value_counts()
    whole = set(counts[counts > 10].index)
    rows = []
    for z, log_scale in RULES:
        d = replay(log, z, log_scale)
        batches, revisits = d[~d.revisit], d[d.revisit]
        bad_batch, bad_image = batches.study.isin(whole), revisits.subject.isin(harmful)
        rows.append({"run": f"{folder.parent.name}/{folder.name}", "z": z, "log scale": log_scale,
                     "good batches flagged": f"{batches.flagged[~bad_batch].sum()}/"
                                             f"{(~bad_batch).sum()}",
                     "harmful batches flagged": f"{batches.flagged[bad_batch].sum()}/"
                                                f"{bad_batch.sum()}",
                     "good revisits flagged": f"{revisits.flagged[~bad_image].sum()}/"
                                              f"{(~bad_image).sum()}",
                     "harmful revisits flagged": f"{revisits.flagged[bad_image].sum()}/"
                                                 f"{bad_image.sum()}"})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="QC run folders (qc.csv, qc_images.csv)")
    args = p.parse_args()
    rows = [row for folder in args.runs for row in summary(folder)]
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
