"""The travelling loop: batching rules, cycle seeding, training, saving, resuming, snapshots."""

from __future__ import annotations

import math
import shutil
from collections import Counter

import keras
import numpy as np
import pytest

from helpers import SHAPE
from dqc import checkpoint
from dqc.data import load_table
from dqc.runs import RunSpec, train_cycles
from dqc.trainer import BASE_LEARNING_RATE, learning_rate
from dqc.travel import (center_order, centers_of, cycle_batches, cycle_rng, split_batches)
from dqc.volumes import VolumeStore

SEED = 40


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# --- loop rules (pure) -------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch, sizes", [(7, 5, [5]), (3, 5, [3]), (10, 5, [5, 5]),
                                             (5, 5, [5]), (11, 3, [3, 3, 3]), (1, 5, [1])])
def test_split_batches_sizes_and_dropped_remainder(n, batch, sizes):
    ids = _ids("s", n)
    batches = split_batches(ids, batch, np.random.RandomState(0))
    assert [len(b) for b in batches] == sizes
    flat = [s for b in batches for s in b]
    assert len(set(flat)) == len(flat)  # no image twice in an epoch
    assert set(flat) <= set(ids)


def test_split_batches_shuffles_reproducibly_and_handles_no_images():
    ids = _ids("s", 10)
    a = split_batches(ids, 5, np.random.RandomState(3))
    assert a == split_batches(ids, 5, np.random.RandomState(3))
    assert [s for b in a for s in b] != ids  # shuffled (this seed does move images)
    assert sorted(s for b in a for s in b) == sorted(ids)
    assert split_batches([], 5, np.random.RandomState(0)) == []


def test_center_order_changes_across_cycles_and_repeats_for_the_same_seed_and_cycle():
    centers = ["C01", "C02", "C03", "C04", "C05"]
    orders = [center_order(centers, cycle_rng(SEED, c)) for c in range(10)]
    assert all(sorted(o) == centers for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert orders == [center_order(centers, cycle_rng(SEED, c)) for c in range(10)]
    # the authors' np.random.seed(seed + c): cycle c of seed s is cycle c + 1 of seed s - 1
    assert center_order(centers, cycle_rng(SEED, 3)) == center_order(centers,
                                                                     cycle_rng(SEED - 1, 4))
    expected = list(np.array(centers)[np.random.RandomState(SEED + 2).permutation(5)])
    assert orders[2] == expected


CENTERS = {"A": _ids("a", 7), "B": _ids("b", 3), "C": _ids("c", 10), "D": _ids("d", 1)}


def _runs(sequence):
    """[(center, n consecutive batches)] of a cycle's (center, batch) sequence."""
    out = []
    for center, _ in sequence:
        if out and out[-1][0] == center:
            out[-1][1] += 1
        else:
            out.append([center, 1])
    return [tuple(r) for r in out]


def test_cycle_batches_visits_each_center_once_in_the_cycle_order():
    seq = list(cycle_batches(CENTERS, cycle_rng(SEED, 0), 5))
    order = center_order(list(CENTERS), cycle_rng(SEED, 0))
    counts = {"A": 1, "B": 1, "C": 2, "D": 1}
    assert _runs(seq) == [(c, counts[c]) for c in order]
    assert seq == list(cycle_batches(CENTERS, cycle_rng(SEED, 0), 5))
    for center, batch in seq:
        assert set(batch) <= set(CENTERS[center])
        assert len(batch) == min(5, len(CENTERS[center]))


def test_cycle_batches_epochs_double_the_batches_at_each_center():
    one = list(cycle_batches(CENTERS, cycle_rng(SEED, 1), 5, epochs=1))
    two = list(cycle_batches(CENTERS, cycle_rng(SEED, 1), 5, epochs=2))
    assert len(two) == 2 * len(one) == 10
    # the model stays at a center for all its local epochs before travelling on
    assert _runs(two) == [(c, 2 * n) for c, n in _runs(one)]
    per_center = Counter(c for c, _ in two)
    assert per_center == {"A": 2, "B": 2, "C": 4, "D": 2}
    c_batches = [set(b) for c, b in two if c == "C"]
    assert c_batches[0] | c_batches[1] == set(CENTERS["C"])  # each epoch sees all 10
    assert c_batches[2] | c_batches[3] == set(CENTERS["C"])


def test_cycle_batches_select_can_skip_a_center_and_filter_images():
    asked = []

    def select(center, ids):
        asked.append(center)
        if center == "B":
            return []
        if center == "C":
            return [s for s in ids if s not in {"c0", "c1", "c2"}]  # 7 left -> one batch of 5
        return ids

    seq = list(cycle_batches(CENTERS, cycle_rng(SEED, 2), 5, select=select))
    assert sorted(asked) == ["A", "B", "C", "D"]  # asked once per center, on arrival
    assert asked == center_order(list(CENTERS), cycle_rng(SEED, 2))
    assert "B" not in {c for c, _ in seq}
    c_batches = [b for c, b in seq if c == "C"]
    assert len(c_batches) == 1 and len(c_batches[0]) == 5
    assert not set(c_batches[0]) & {"c0", "c1", "c2"}


def test_centers_of_keeps_csv_order(cohort):
    table = load_table(cohort["train"], "train")
    centers = centers_of(table)
    assert list(centers) == list(dict.fromkeys(table.Study))
    assert {c: len(v) for c, v in centers.items()} == table.Study.value_counts().to_dict()
    assert centers[table.Study[0]][0] == table.Subject[0]


def test_learning_rate_schedule():
    assert BASE_LEARNING_RATE == 1e-4
    for c in range(0, 40):
        assert learning_rate(c) == pytest.approx(1e-4 * math.exp(-0.1 * c), rel=1e-12)
    assert learning_rate(10) == pytest.approx(1e-4 / math.e, rel=1e-12)


# --- training on the tiny cohort ---------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(cohort, tmp_path_factory):
    """Cycles 0..5 in one go; the in-memory trainer is caught when each cycle is saved."""
    out = tmp_path_factory.mktemp("full_run")
    lines: list[str] = []
    seen: dict = {"lr": []}
    real_save = checkpoint.save_cycle

    def spy(trainer, *args, **kwargs):
        seen["trainer"] = trainer
        seen["lr"].append(float(keras.ops.convert_to_numpy(trainer.optimizer.learning_rate)))
        return real_save(trainer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save_cycle", spy)
        history = train_cycles(RunSpec(train_csv=str(cohort["train"]), out=str(out), prefix="tm",
                                       cycles=range(6), seed=SEED, verbose=False,
                                       echo=lines.append))
    trainer = seen["trainer"]
    val = load_table(cohort["val"], "validation")
    x = VolumeStore(val, SHAPE, verbose=False).batch(list(val.Subject))
    return dict(out=out, history=history, lines=lines, lr=seen["lr"], trainer=trainer, x=x,
                scores=trainer.predict(x),
                weights=[np.array(w) for w in trainer.model.get_weights()],
                state=trainer.training_state())


def test_training_lowers_the_loss_over_cycles(full_run):
    history = full_run["history"]
    assert [h.cycle for h in history] == list(range(6))
    # centers of 10, 5, 5 and 4 images, batch 5: 2 + 1 + 1 + 1 batches, all 24 images
    assert all(h.batches == 5 and h.images == 24 for h in history)
    first, last = history[0], history[-1]
    assert last.loss < 0.8 * first.loss, [h.loss for h in history]
    assert np.mean([h.loss for h in history[-2:]]) < np.mean([h.loss for h in history[:2]])
    assert last.accuracy >= first.accuracy, [h.accuracy for h in history]
    assert len(full_run["lines"]) == 6
    assert full_run["lines"][0].startswith("cycle   0  loss ")


def test_each_cycle_trains_at_its_decayed_learning_rate(full_run):
    for c, (stats, after) in enumerate(zip(full_run["history"], full_run["lr"])):
        assert stats.learning_rate == learning_rate(c)
        assert after == np.float32(learning_rate(c))  # the optimizer's value after cycle c
        meta, _ = checkpoint.read_state(checkpoint.cycle_paths(full_run["out"], "tm", c)["state"])
        assert meta["cycle"] == c and meta["seed"] == SEED
        assert meta["learning_rate"] == learning_rate(c)
        # each step's own loss, kept for a later QC run's trainloss window
        assert meta["batch_losses"] == list(stats.batch_losses)
        assert len(stats.batch_losses) == stats.batches


def test_every_cycle_writes_three_files_and_nothing_else(full_run):
    names = sorted(p.name for p in full_run["out"].iterdir())
    expected = sorted(f"tm_{part}_{c:03d}.{ext}" for c in range(6)
                      for part, ext in (("encoder", "keras"), ("classifier", "keras"),
                                        ("state", "npz")))
    assert names == expected  # zero-padded cycle numbers, no temporary files left behind
    assert checkpoint.last_complete_cycle(full_run["out"], "tm") == 5


@pytest.mark.jax
def test_saved_models_reload_and_predict_identically(full_run):
    paths = checkpoint.cycle_paths(full_run["out"], "tm", 5)
    loaded, meta = checkpoint.load_trainer(paths["encoder"], paths["classifier"])
    assert meta["cycle"] == 5
    scores = loaded.predict(full_run["x"])
    assert scores.shape == (12,)
    assert np.array_equal(scores, full_run["scores"])
    for a, b in zip(loaded.model.get_weights(), full_run["weights"], strict=True):
        assert np.array_equal(a, b)
    state = loaded.training_state()
    assert state.keys() == full_run["state"].keys()
    for key in state:  # optimizer moments, step count, learning rate, dropout seed
        assert np.array_equal(state[key], full_run["state"][key]), key


def _weights(out, cycle):
    paths = checkpoint.cycle_paths(out, "tm", cycle)
    return [w for part in ("encoder", "classifier")
            for w in checkpoint.load_model_file(paths[part], part).get_weights()]


def test_resuming_after_cycle_3_is_bit_identical_to_one_uninterrupted_run(full_run, cohort,
                                                                         tmp_path):
    # what a run of cycles 0..3 leaves behind (the same files the uninterrupted run wrote)
    for c in range(4):
        for path in checkpoint.cycle_paths(full_run["out"], "tm", c).values():
            shutil.copy2(path, tmp_path / path.name)
    lines: list[str] = []
    resumed = train_cycles(RunSpec(train_csv=str(cohort["train"]), out=str(tmp_path),
                                   prefix="tm", cycles=range(6), seed=SEED, resume=True,
                                   verbose=False, echo=lines.append))
    assert [h.cycle for h in resumed] == [4, 5]
    assert lines[0].startswith("resuming after cycle 3")
    for a, b in zip(resumed, full_run["history"][4:]):
        assert (a.loss, a.accuracy) == (b.loss, b.accuracy)
    ours, theirs = _weights(tmp_path, 5), _weights(full_run["out"], 5)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert np.array_equal(a, b)
    _, state_a = checkpoint.read_state(checkpoint.cycle_paths(tmp_path, "tm", 5)["state"])
    _, state_b = checkpoint.read_state(checkpoint.cycle_paths(full_run["out"], "tm", 5)["state"])
    assert state_a.keys() == state_b.keys()
    assert all(np.array_equal(state_a[k], state_b[k]) for k in state_a)


def _host(trainer) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in trainer.state_variables]


@pytest.mark.jax
def test_snapshot_restore_is_bit_identical_for_weights_and_optimizer(full_run):
    trainer = full_run["trainer"]
    x = full_run["x"][:5]
    y = np.array([0, 1, 0, 1, 1], np.float32)
    snap = trainer.snapshot()
    before = _host(trainer)
    trainer.train_step(x, y)
    after = _host(trainer)
    changed = [not np.array_equal(a, b) for a, b in zip(before, after)]
    n_model = len(trainer.model.variables)
    assert any(changed[:n_model]), "a train step must change the weights"
    assert any(changed[n_model:]), "a train step must change the optimizer state"
    trainer.restore(snap)
    for a, b in zip(_host(trainer), before, strict=True):
        assert np.array_equal(a, b)
    trainer.train_step(x, y)  # the same step from the restored state: the same result
    for a, b in zip(_host(trainer), after, strict=True):
        assert np.array_equal(a, b)
    trainer.restore(snap)
    assert np.array_equal(trainer.predict(full_run["x"]), full_run["scores"])


def _tracing_counts(trainer) -> tuple[int, int]:
    """How many times TensorFlow traced the training step and the prediction so far."""
    from dqc.trainer import keras_train_step

    return (keras_train_step(trainer.model).experimental_get_tracing_count(),
            trainer.predictor.predict_function.experimental_get_tracing_count())


def test_the_training_step_is_traced_once_and_steps_as_the_warm_up_by_calls_does(monkeypatch):
    """Under TensorFlow the Trainer traces its step once, for any batch size, before its
    first call; every step and prediction after it, whatever the batch sizes, gives the
    bits that the warm-up by calls (batches of 1 and 2, three traces) gives."""
    import dqc.trainer
    from dqc.model import Architecture, build_models
    from dqc.trainer import Trainer

    def steps(trace_once: bool):
        keras.utils.set_random_seed(3)
        with monkeypatch.context() as m:
            if not trace_once:
                m.setattr(dqc.trainer, "trace_for_any_batch", lambda *args: False)
            trainer = Trainer(*build_models(SHAPE, Architecture(width=0.25)))
        traced = _tracing_counts(trainer)
        rng, outputs = np.random.default_rng(0), []
        for n in (5, 1, 2, 5, 3):
            x = rng.random((n, *SHAPE, 1), np.float32)
            outputs += [trainer.train_step(x, (rng.random(n) > 0.5).astype(np.float32)),
                        trainer.predict((x * 255).astype(np.uint8))]
        return traced, _tracing_counts(trainer), outputs, trainer.state_arrays()

    before, after, outputs, state = steps(trace_once=True)
    assert before == after == (1, 2)  # training once; prediction once for float32, uint8
    by_calls_before, by_calls_after, by_calls, by_calls_state = steps(trace_once=False)
    assert by_calls_before == by_calls_after and by_calls_before[0] > 1
    for ours, theirs in zip(outputs + state, by_calls + by_calls_state):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_split_batches_with_labels_deals_the_same_images_so_that_each_batch_is_mixed():
    """`stratified`: the images kept, the batch size and the random stream are the paper's;
    only the grouping changes, label by label, so that a center of 13 HC and 4 PD gives three
    batches of five with one or two PD each, where a cut in order can leave one all HC."""
    ids = _ids("h", 13) + _ids("p", 4)
    labels = {s: int(s[0] == "p") for s in ids}
    for seed in range(20):
        plain_rng, dealt_rng = np.random.RandomState(seed), np.random.RandomState(seed)
        plain = split_batches(ids, 5, plain_rng)
        dealt = split_batches(ids, 5, dealt_rng, labels)
        assert sorted(s for b in dealt for s in b) == sorted(s for b in plain for s in b)
        assert [len(b) for b in dealt] == [5, 5, 5]
        kept_pd = sum(labels[s] for b in plain for s in b)
        counts = sorted(sum(labels[s] for s in b) for b in dealt)
        assert counts[-1] - counts[0] <= 1 and sum(counts) == kept_pd
        assert plain_rng.randint(1 << 30) == dealt_rng.randint(1 << 30)  # same stream used
    # cut in order, some seed leaves a batch all HC; dealt, none does while three PD are kept
    assert any(min(sum(labels[s] for s in b) for b in split_batches(ids, 5,
                                                                   np.random.RandomState(k)))
               == 0 for k in range(20))
    # a center of one label, or one batch, is cut as the paper cuts it
    hc = _ids("h", 11)
    assert split_batches(hc, 5, np.random.RandomState(1), labels) == \
        split_batches(hc, 5, np.random.RandomState(1))
    mixed = ids[:4] + ids[-2:]
    assert split_batches(mixed, 5, np.random.RandomState(2), labels) == \
        split_batches(mixed, 5, np.random.RandomState(2))


def test_cycle_batches_passes_the_labels_to_every_center():
    centers = {"A": _ids("a", 8) + _ids("b", 2), "B": _ids("c", 10)}
    labels = {s: int(s[0] == "b") for s in centers["A"]} | {s: 0 for s in centers["B"]}
    seq = list(cycle_batches(centers, cycle_rng(SEED, 0), 5, labels=labels))
    assert [sum(labels[s] for s in b) for c, b in seq if c == "A"] == [1, 1]
    plain = list(cycle_batches(centers, cycle_rng(SEED, 0), 5))
    assert [c for c, _ in seq] == [c for c, _ in plain]
    assert [b for c, b in seq if c == "B"] == [b for c, b in plain if c == "B"]
