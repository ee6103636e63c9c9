"""Replay the batch-loss decisions of a `witnessed`, `anchored` (or later) QC run under other
values of z and other floors for its revisits, offline: which images each would have
eliminated.

    python bench/replay_thresholds.py --z 3,4,5 study_out/seed_1/qc_A_anchored study_out/seed_1/qc_C_anchored
    python bench/replay_thresholds.py --z 3 --floors run,none study_out/seed_25/qc_A_pooled

An analysis aid for tuning seeds, not a test and not a run. The run's trajectory is taken as
it was: the same batches in the same order with the same losses (a batch the replayed z would
have kept but the run undid still counts as kept, so that the model it trains is not
replayed). A batch the run trained unjudged (no limit) stays so; a lone image's check with
witnesses (since 940dc20) is replayed as a batch, which enters the window when kept (the run
keeps it out: a small difference). The window starts from the pre-training's saved batch
losses (`<seed>/clean/tm_state_*.npz`, as the run does) or, without them, from the log's first
10 kept batch losses. A revisit counts only when a batch of its image's center was flagged
under the replayed z in the cycle that first flagged the image. Its floor (`--floors`,
`FLOORS`): `run`, the run's own rule (under `anchored` and the criteria built on it, the
replayed limit of that batch; else none); `none`, the window's limit now; `scaled`, the flag's
limit times the window's median now over its median then; `shifted`, the flag's limit less the
fall of the median. With the run's own z and floor it gives back the run's eliminations (runs
before 940dc20); under another floor the verdicts are exact for the first revisit cycle only
(an image eliminated there instead of back in training changes the batches after it).
Harmful: what `qc_images.csv` marks.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


#: A revisit's floor from its flag's limit and window median and the window's median now.
FLOORS = {
    "run": lambda limit, then, now: limit,
    "none": lambda limit, then, now: None,
    "scaled": lambda limit, then, now: limit * now / then,
    "shifted": lambda limit, then, now: limit - (then - now),
}


def replay(run: Path, z: float, floor: str = "run") -> dict:
    """The images of `run` the replayed z eliminates, harmful and good, and how many each:
    each batch and revisit judged by the run's own rule (`self_set_verdict`, and `at_least`
    the `floor`, `FLOORS`, where the criterion anchors its revisits)."""
    log = pd.read_csv(run / "qc.csv")
    images = pd.read_csv(run / "qc_images.csv").set_index("Subject")
    anchored = make_criterion(json.loads((run / "qc_summary.json").read_text())
                              ["criterion"]["name"]).anchors_revisit()
    log = log[(log.Cycle > 0) & log.VAL_LOSS.isna()]
    batches = log[log.Subject == "batch"]
    window = pretraining_window(run, int(log.Cycle.min())) \
        or batches[batches.Ignored == 0].STATISTIC.tolist()[:MIN_WINDOW]
    window = window[-WINDOW:]
    flags: dict[tuple[int, str], tuple[float, float]] = {}  # (cycle, center) -> highest limit
    # exceeded, with the window's median then
    eliminated = {0: 0, 1: 0}
    for cycle, rows in log.groupby("Cycle", sort=True):
        for row in rows[rows.Subject == "batch"].itertuples():
            if pd.isna(row.LIMIT) and not row.Ignored:
                continue  # trained unjudged (`abstaining`'s centers, a lone image before 940dc20)
            verdict = self_set_verdict(row.STATISTIC, window, z)
            if verdict.harmful:
                key = (cycle, row.Study)
                flags[key] = max(flags.get(key, (verdict.limit, 0.0)),
                                 (verdict.limit, statistics.median(window)))
            else:
                window = (window + [row.STATISTIC])[-WINDOW:]
        for row in rows[rows.Subject != "batch"].itertuples():
            flag = flags.get((images.loc[row.Subject, "first_flagged_cycle"], row.Study))
            if flag is None:
                continue  # its batch was not flagged under this z
            least = FLOORS[floor](*flag, statistics.median(window)) if anchored else None
            verdict = at_least(self_set_verdict(row.STATISTIC, window, z), least)
            eliminated[int(images.loc[row.Subject, "Harmful"])] += verdict.harmful
    n_harmful = int(images.Harmful.sum())
    return {"run": f"{run.parent.name}/{run.name}", "z": z, "floor": floor,
            "harmful eliminated": f"{eliminated[1]}/{n_harmful}",
            "good eliminated": f"{eliminated[0]}/{len(images) - n_harmful}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path,
                   help="QC run folders (qc.csv, qc_images.csv, qc_summary.json)")
    p.add_argument("--z", default="3,4,4.5,5,6", help="the values of z to replay, "
                   "comma-separated (default: 3,4,4.5,5,6)")
    p.add_argument("--floors", default="run", help="a revisit's floors to replay, "
                   f"comma-separated, of {', '.join(FLOORS)} (default: run; see above)")
    args = p.parse_args()
    floors = args.floors.split(",")
    if unknown := sorted(set(floors) - set(FLOORS)):
        p.error(f"--floors: unknown {', '.join(unknown)}; choose from {', '.join(FLOORS)}")
    rows = [replay(run, float(z), floor) for run in args.runs for z in args.z.split(",")
            for floor in floors]
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
