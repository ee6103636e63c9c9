"""`stratified` on the real QC path: the regular pass deals each center's batches by label.

A tiny cohort, re-cut into two centers: A holds 10 HC and 5 PD, B 6 of each. The run's steps
are real (Keras, NIfTI through SimpleITK); they only pass through a recorder on their way, as
a federation's round trip would (`dqc.runs.Federation.make_step`). A z so high that nothing
is ever flagged keeps every image in every regular pass, so the loop's batches are known in
advance: `cycle_batches` with the labels under `stratified`, without them under `abstaining`.
"""

from __future__ import annotations

import pandas as pd
import pytest

from helpers import pretrained

from dqc.data import load_table
from dqc.model import input_shape
from dqc.runs import Federation, QCSpec, RunSpec, run_quality_control
from dqc.travel import centers_of, cycle_batches, cycle_rng, local_step
from dqc.volumes import VolumeStore

START, STOP, SEED = 1, 4, 42


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("stratified")
    built = pretrained(root, cycles=START, n_train=27)
    table = load_table(built["train"], "train")
    assert len(table) == 27
    table["Study"] = ["A"] * 15 + ["B"] * 12
    table["Group_bin"] = [0] * 10 + [1] * 5 + [0, 1] * 6
    return built, table, root


def run(cohort, criterion: str) -> list[tuple[str, list[str]]]:
    built, table, root = cohort
    calls: list[tuple[str, list[str]]] = []

    def make_step(trainer):
        step = local_step(trainer, VolumeStore(table, input_shape(trainer.encoder),
                                               verbose=False))

        def recorded(center, ids):
            calls.append((center, list(ids)))
            return step(center, ids)
        return recorded

    spec = RunSpec(train_csv=str(built["train"]), out=str(root / criterion), prefix="s",
                   cycles=range(START, STOP), seed=SEED, encoder=str(built["encoder"]),
                   classifier=str(built["classifier"]), verbose=False, echo=lambda line: None)
    policy = run_quality_control(
        spec, QCSpec(val_csv=str(built["val"]), criterion=criterion, report=False,
                     params={"z": 1e6, "window": 10}),
        federation=Federation(train=table, make_step=make_step))
    assert not policy.waiting() and not policy.eliminated()
    return calls


def expected(table: pd.DataFrame, labels: dict | None) -> list[tuple[str, list[str]]]:
    centers = centers_of(table)
    return [(c, b) for cycle in range(START, STOP)
            for c, b in cycle_batches(centers, cycle_rng(SEED, cycle), 5, labels=labels)]


def test_stratified_deals_the_regular_batches_by_label_and_abstaining_cuts_them(cohort):
    _, table, _ = cohort
    labels = dict(zip(table.Subject, table.Group_bin))
    dealt, cut = expected(table, labels), expected(table, None)
    stratified, abstaining = run(cohort, "stratified"), run(cohort, "abstaining")
    # calibration steps come first; the cycles' steps are the loop's batches, in order
    assert stratified[-len(dealt):] == dealt
    assert abstaining[-len(cut):] == cut
    pd_counts = [sum(labels[s] for s in b) for c, b in dealt if c == "A"]
    assert len(pd_counts) == 3 * (STOP - START) and set(pd_counts) == {1, 2}
    assert 0 in [sum(labels[s] for s in b) for c, b in cut if c == "A"]
    # the same images in each cycle and center, only grouped otherwise
    assert sorted(s for _, b in dealt for s in b) == sorted(s for _, b in cut for s in b)
