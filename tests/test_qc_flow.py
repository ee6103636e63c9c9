"""QC control flow on the real script path, with a deterministic stand-in evaluator.

Everything is real (CSV, NIfTI, Keras training steps, snapshots, files) except the validation
evaluation, which reports a rise in the false-negative rate whenever chosen subjects were in
the update. An independent oracle, written from docs/method.md, "Quality control", predicts
every log row.
"""

import json
from collections import Counter

import pandas as pd
import pytest

from helpers import pretrained

from dqc.qc import LOG_COLUMNS, Evaluation
from dqc.runs import QCSpec, RunSpec, run_quality_control
from dqc.travel import centers_of, cycle_batches, cycle_rng

START, STOP, REVISIT, SEED = 1, 5, 2, 42
pytestmark = pytest.mark.jax  # the same flow and oracle under JAX (make test)


class StandIn:
    """Harmful updates: `always` every time, `once` on its first two checks (batch and alone),
    `late` from its fourth check on (so it is flagged only late in the run)."""

    def __init__(self, always: str, once: str, late: str):
        self.always, self.once, self.late = always, once, late
        self.seen: Counter = Counter()
        self.calls: list[list[str]] = []

    def harmful(self, ids) -> bool:
        for s in ids:
            self.seen[s] += 1
        return (self.always in ids or (self.once in ids and self.seen[self.once] <= 2)
                or (self.late in ids and self.seen[self.late] >= 4))

    def __call__(self, ids) -> Evaluation:
        self.calls.append(list(ids))
        bad = bool(ids) and self.harmful(ids)
        return Evaluation(acc=0.5 if bad else 1.0, fp=0, fn=3 if bad else 0, fpr=0.0,
                          fnr=0.5 if bad else 0.0)


def oracle(centers: dict[str, list[str]], stand_in: StandIn) -> list[tuple]:
    """Expected (Cycle, Subject, Study, Ignored) rows, straight from docs/method.md."""
    study = {s: c for c, ids in centers.items() for s in ids}
    rows = [(0, "n/a", "n/a", 0)]
    schedule: dict[int, list[str]] = {}
    banned: set[str] = set()
    for cycle in range(START, STOP):
        def select(center, ids):
            waiting = {s for v in schedule.values() for s in v}
            return [s for s in ids if s not in banned and s not in waiting]
        for center, batch in cycle_batches(centers, cycle_rng(SEED, cycle), 5, 1, select):
            bad = stand_in.harmful(batch)
            rows.append((cycle, "batch", center, int(bad)))
            if bad:
                for s in batch:
                    alone = stand_in.harmful([s])
                    rows.append((cycle, s, center, int(alone)))
                    if alone:
                        schedule.setdefault(cycle + REVISIT, []).append(s)
        for s in schedule.pop(cycle, []):
            again = stand_in.harmful([s])
            rows.append((cycle, s, study[s], int(again)))
            if again:
                banned.add(s)
    return rows


@pytest.fixture(scope="module")
def qc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcflow")
    cohort = pretrained(root, cycles=START)
    table = pd.read_csv(cohort["train"], dtype={"Subject": str})
    centers = centers_of(table)
    small = [c for c, ids in centers.items() if len(ids) <= 5]  # every image in every cycle
    always, once, late = (centers[c][0] for c in small[:3])
    events: list[str] = []
    spec = RunSpec(train_csv=str(cohort["train"]), out=str(root / "qc"), prefix="flow",
                   cycles=range(START, STOP), seed=SEED,
                   encoder=str(cohort["encoder"]), classifier=str(cohort["classifier"]),
                   verbose=False, echo=events.append)
    stand_in = StandIn(always, once, late)
    run_quality_control(spec, QCSpec(val_csv=str(cohort["val"]), error=0.02, revisit=REVISIT,
                                     name="flow"), evaluate=stand_in)
    expected = oracle(centers, StandIn(always, once, late))
    return dict(out=root / "qc", always=always, once=once, late=late, expected=expected,
                stand_in=stand_in, events=events, centers=centers)


def test_log_rows_match_the_specification_exactly(qc_run):
    log = pd.read_csv(qc_run["out"] / "flow.csv", dtype={"Subject": str, "Study": str},
                      keep_default_na=False)
    assert list(log.columns) == LOG_COLUMNS
    got = list(log[["Cycle", "Subject", "Study", "Ignored"]].itertuples(index=False, name=None))
    assert got == qc_run["expected"]
    assert len(qc_run["stand_in"].calls) == len(log)  # one evaluation per row, baseline first


def test_revisit_schedule_elimination_readmission_and_pending(qc_run):
    log = pd.read_csv(qc_run["out"] / "flow.csv", dtype={"Subject": str, "Study": str},
                      keep_default_na=False)
    calls = qc_run["stand_in"].calls
    always, once, late = qc_run["always"], qc_run["once"], qc_run["late"]

    def trained_in(cycle, subject, batches_only=True):
        return any(subject in ids for (c, s), ids in zip(zip(log.Cycle, log.Subject), calls)
                   if c == cycle and (s == "batch" or not batches_only))

    # flagged in cycle 1, left out of regular training in cycles 2 and 3,
    # revisited alone at the end of cycle 3
    for s in (always, once):
        assert trained_in(1, s)
        assert not trained_in(2, s) and not trained_in(3, s)
        last_of_3 = log[log.Cycle == 3].tail(2)
        assert s in set(last_of_3.Subject)
    # the image that passed its revisit is back in regular training in cycle 4
    assert trained_in(4, once) and not trained_in(4, always, batches_only=False)
    images = pd.read_csv(qc_run["out"] / "flow_images.csv", dtype={"Subject": str})
    row = images.set_index("Subject")
    assert row.loc[always, "status"] == "eliminated" and row.loc[always, "eliminated_cycle"] == 3
    assert row.loc[always, "times_flagged"] == 2 and row.loc[always, "first_flagged_cycle"] == 1
    assert row.loc[once, "status"] == "kept" and row.loc[once, "eliminated"] == 0
    assert row.loc[late, "status"] == "pending" and row.loc[late, "revisit_cycle"] == 6
    assert set(images.loc[images.status != "kept", "Subject"]) == {always, late}
    assert any("eliminated" in e and always in e for e in qc_run["events"])


def test_outputs_per_cycle(qc_run):
    out = qc_run["out"]
    for cycle in range(START, STOP):
        for part in ("encoder", "classifier"):
            assert (out / f"flow_{part}_{cycle:03d}.keras").is_file()
        assert (out / f"flow_state_{cycle:03d}.npz").is_file()
    summary = json.loads((out / "flow_summary.json").read_text())
    assert summary["eliminated"] == 1 and summary["pending"] == 1
    assert summary["evaluations"] == len(qc_run["expected"])
