"""Replay the batch-loss decisions of a `witnessed` or `anchored` QC run under other values of
z, offline: which images each z would have eliminated.

    python bench/replay_thresholds.py --z 3,4,5 study_out/seed_1/qc_A_anchored study_out/seed_1/qc_C_anchored

An analysis aid for tuning seeds, not a test and not a run. The run's trajectory is taken as
it was: the same batches in the same order with the same losses (a batch the replayed z would
have kept but the run undid still counts as kept, so that the model it trains is not replayed).
The window starts from the pre-training's saved batch losses (`<seed>/clean/tm_state_*.npz`,
as the run does) or, without them, from the log's first 10 kept batch losses. A revisit counts
only when a batch of its image's center was flagged under the replayed z in the cycle that
first flagged the image; under `anchored` its floor is the replayed limit of that batch. With
the run's own z it gives back the run's eliminations. Harmful: what `qc_images.csv` marks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from dqc.runtime import quiet_tensorflow_import

quiet_tensorflow_import()

from dqc.checkpoint import cycle_paths, read_state  # noqa: E402  (TensorFlow, quiet)
from dqc.criteria import MIN_WINDOW, at_least, make_criterion, self_set_verdict  # noqa: E402
from dqc.defaults import WINDOW  # noqa: E402


def pretraining_window(run: Path, first_cycle: int) -> list[float]:
    """The batch losses the pre-training's last state kept (the run's cold start), or []."""
    state = cycle_paths(run.parent / "clean", "tm", first_cycle - 1)["state"]
    return list(read_state(state)[0].get("batch_losses", ())) if state.is_file() else []


def replay(run: Path, z: float) -> dict:
    """The images of `run` the replayed z eliminates, harmful and good, and how many each:
    each batch and revisit judged by the run's own rule (`self_set_verdict`, and `at_least`
    the flag's limit under `anchored`)."""
    log = pd.read_csv(run / "qc.csv")
    images = pd.read_csv(run / "qc_images.csv").set_index("Subject")
    anchored = make_criterion(json.loads((run / "qc_summary.json").read_text())
                              ["criterion"]["name"]).anchors_revisit()
    log = log[(log.Cycle > 0) & log.VAL_LOSS.isna()]
    batches = log[log.Subject == "batch"]
    window = pretraining_window(run, int(log.Cycle.min())) \
        or batches[batches.Ignored == 0].STATISTIC.tolist()[:MIN_WINDOW]
    window = window[-WINDOW:]
    flag_limits: dict[tuple[int, str], float] = {}  # (cycle, center) -> highest limit exceeded
    eliminated = {0: 0, 1: 0}
    for cycle, rows in log.groupby("Cycle", sort=True):
        for row in rows[rows.Subject == "batch"].itertuples():
            verdict = self_set_verdict(row.STATISTIC, window, z)
            if verdict.harmful:
                key = (cycle, row.Study)
                flag_limits[key] = max(flag_limits.get(key, verdict.limit), verdict.limit)
            else:
                window = (window + [row.STATISTIC])[-WINDOW:]
        for row in rows[rows.Subject != "batch"].itertuples():
            floor = flag_limits.get((images.loc[row.Subject, "first_flagged_cycle"], row.Study))
            if floor is None:
                continue  # its batch was not flagged under this z
            verdict = at_least(self_set_verdict(row.STATISTIC, window, z),
                               floor if anchored else None)
            eliminated[int(images.loc[row.Subject, "Harmful"])] += verdict.harmful
    n_harmful = int(images.Harmful.sum())
    return {"run": f"{run.parent.name}/{run.name}", "z": z,
            "harmful eliminated": f"{eliminated[1]}/{n_harmful}",
            "good eliminated": f"{eliminated[0]}/{len(images) - n_harmful}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path,
                   help="QC run folders (qc.csv, qc_images.csv, qc_summary.json)")
    p.add_argument("--z", default="3,4,4.5,5,6", help="the values of z to replay, "
                   "comma-separated (default: 3,4,4.5,5,6)")
    args = p.parse_args()
    rows = [replay(run, float(z)) for run in args.runs for z in args.z.split(",")]
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
