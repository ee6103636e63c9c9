"""A node that sends a faulty reply: every fault is caught by the server's one reply check
(`dqc.federated.replies`), stops the run with one line naming the center and the fault, and
`--resume`, once the node is mended, gives the uninterrupted run's outputs; with
`--on-faulty-node exclude` the run goes on without that center.

Each fault is one function that spoils an honest reply (`FAULTS`). All of them are checked
against an honest reply built here (pure, no Flower run: fast); a few are also injected into
a simulated node in Flower's Simulation Engine (Ray), through a Flower mod wrapped around
the node's ClientApp, end to end: one of each kind of reply (hello, step, verify) and the
exclusion. The mod spoils center C02's replies once cycle 3 is complete (its checkpoint
exists), so the faulty run stops in cycle 4 with cycle 3's files intact.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, RecordDict

from dqc.errors import DQCError
from dqc.federated.messages import (Identity, digest, identity_reply, pack, step_reply,
                                    verify_reply)
from dqc.federated.replies import (ReplyFault, adam_step_bound, read_hello, read_step,
                                   read_tally)
from dqc.qc import tally
from helpers import assert_same_qc_outputs, file_bytes

CYCLES = 5  # cycles 3..4 after the pre-trained 0..2; the fault comes in cycle 4
FLAGS = ("--criterion", "loss")  # scores travel; its threshold sets itself
FAULTY = 1  # partition of center C02 (centers in name order), which holds validation rows


# --- the faults: each spoils an honest reply's content in place ------------------------------

def _float_bytes(content: RecordDict, change: Callable[[np.ndarray], None]) -> None:
    """Change the state's first float32 (the first weight) in place."""
    buffer = content["state"].to_numpy_ndarrays()[0].copy()
    change(buffer[:4].view(np.float32))
    content["state"] = ArrayRecord([buffer])


def _scores(content: RecordDict, change: Callable[[list[np.ndarray]], None]) -> None:
    arrays = [a.copy() for a in content["scores"].to_numpy_ndarrays()]
    change(arrays)
    content["scores"] = ArrayRecord(arrays)


def negative_counts(c: RecordDict) -> None:
    c["tally"]["fp"] = -1


def counts_off_declared(c: RecordDict) -> None:
    c["tally"]["n_hc"] = c["tally"]["n_hc"] + 1


def nan_scores(c: RecordDict) -> None:
    _scores(c, lambda a: a[0].__setitem__(0, np.nan))


def too_few_scores(c: RecordDict) -> None:
    """One score fewer for a class that has any (a center may hold no PD validation image)."""
    _scores(c, lambda a: a.__setitem__(int(not len(a[0])), a[int(not len(a[0]))][:-1]))


def nan_state(c: RecordDict) -> None:
    _float_bytes(c, lambda w: w.__setitem__(0, np.nan))


def wrong_layout(c: RecordDict) -> None:
    c["state"] = ArrayRecord([c["state"].to_numpy_ndarrays()[0][:-4].copy()])


def far_step(c: RecordDict) -> None:
    _float_bytes(c, lambda w: w.__iadd__(0.5))


def nan_loss(c: RecordDict) -> None:
    c["metrics"]["loss"] = float("nan")


def malformed_hello(c: RecordDict) -> None:
    c["identity"]["n_pd"] = "three"


#: fault -> (message type it spoils, the function, what the error line says of it)
FAULTS = {
    "negative counts": ("query.verify", negative_counts, "fp -1 is not a non-negative integer"),
    "counts off the declared size": ("query.verify", counts_off_declared, "it declared"),
    "NaN scores": ("query.verify", nan_scores, "HC scores outside [0, 1] or not finite"),
    "too few scores": ("query.verify", too_few_scores, "scores of shape"),
    "a state with a NaN": ("train.step", nan_state, "non-finite value"),
    "a state of the wrong layout": ("train.step", wrong_layout, "not the sent layout"),
    "a state moved far beyond one step": ("train.step", far_step, "one Adam step moves at most"),
    "a NaN loss": ("train.step", nan_loss, "loss nan is not a finite number"),
    "a malformed hello": ("query.whoami", malformed_hello, "n_pd 'three' is not a non-negative"),
}


# --- every fault against an honest reply (pure) ------------------------------------------------

def _state() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(3, 3, 3, 1, 4)).astype(np.float32), np.array(7, np.int64),
            rng.normal(size=5).astype(np.float32)]


LR = 1e-4
SPEC = [(a.shape, str(a.dtype)) for a in _state()]
BOUNDED = [True, False, True]  # the int counter is not a weight


def _honest(kind: str) -> tuple[RecordDict, Callable[[RecordDict], object]]:
    """An honest reply of `kind` and the server's checked reader of it."""
    if kind == "query.whoami":
        ident = Identity("C02", ["a", "b", "c"], 1, 2, (20, 24, 20), None, 2, 2, [])
        return identity_reply(ident), read_hello
    if kind == "query.verify":
        y, s = np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.4, 0.7], np.float32)
        return verify_reply(tally(y, s, "scores")), \
            lambda c: read_tally(c, declared=(2, 2), detail="scores")
    sent = _state()
    new = [a.copy() for a in sent]
    new[0] += np.float32(3 * LR)  # a step within the bound
    new[1] += 1
    buffer = pack(new)
    reply = step_reply(buffer, digest(buffer), 0.3, 0.8, digest(pack(new[:2])))
    return reply, lambda c: read_step(c, sent, SPEC, BOUNDED, adam_step_bound(LR, 0.9, 0.999),
                                      n_model=2)


@pytest.mark.parametrize("fault", FAULTS)
def test_the_reply_check_catches_each_fault(fault: str):
    kind, spoil, says = FAULTS[fault]
    content, read = _honest(kind)
    read(content)  # the honest reply passes
    spoil(content)
    with pytest.raises(ReplyFault, match=says.replace("[", r"\[").replace("]", r"\]")):
        read(content)


def test_the_adam_bound_is_what_keras_adam_can_reach_and_no_more():
    """The worst case of the bound's derivation, run through Keras' Adam: a long history
    (bias correction near 1) and gradients growing by beta_2 / beta_1 per step (where
    Cauchy-Schwarz is tight); the step reaches the bound, within the check's slack."""
    import keras

    from dqc.federated.replies import BOUND_SLACK

    w = keras.Variable(np.zeros(3, np.float32))
    adam = keras.optimizers.Adam(learning_rate=LR)
    adam.build([w])
    adam.iterations.assign(100_000)
    bound, largest = adam_step_bound(LR, adam.beta_1, adam.beta_2), 0.0
    for t in range(80):
        before = w.numpy().copy()
        g = np.full(3, 1e-3 * (adam.beta_2 / adam.beta_1) ** t, np.float32)
        adam.apply_gradients([(keras.ops.convert_to_tensor(g), w)])
        largest = max(largest, float(np.abs(w.numpy() - before).max()))
    assert 0.999 * bound < largest <= bound * (1 + BOUND_SLACK)
    assert bound == pytest.approx(7.27 * LR, rel=1e-3)


def test_the_step_check_names_bound_digest_and_honest_float_rounding():
    content, read = _honest("train.step")
    content["key"]["state"] = "0" * 32  # a digest that is not the state's
    with pytest.raises(ReplyFault, match="digests"):
        read(content)


def test_verify_predictions_must_give_the_counts():
    y, s = np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.4, 0.7], np.float32)
    content = verify_reply(tally(y, s, "predictions"))
    assert read_tally(content, (2, 2), "predictions").pred == "0101"
    content["tally"]["pred"] = "0001"  # one error fewer than the counts say
    with pytest.raises(ReplyFault, match="do not give its counts"):
        read_tally(content, (2, 2), "predictions")


def test_a_hello_may_carry_ground_truth_only_as_one_flag_per_subject():
    ident = Identity("C02", ["a", "b"], 1, 1, (20, 24, 20), [0, 2], 0, 0, [])
    with pytest.raises(ReplyFault, match="harmful is not one 0/1 per subject"):
        read_hello(identity_reply(ident))


# --- end to end, in Flower's Simulation Engine ---------------------------------------------------

def fault_mod(fault: str, armed: Path):
    """A Flower mod: center C02's node spoils its replies of the fault's kind once `armed`
    exists (cycle 3's checkpoint; a hello is spoiled at once)."""
    kind, spoil, _ = FAULTS[fault]

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) == FAULTY and \
                msg.metadata.message_type == kind and not reply.has_error() and \
                (kind == "query.whoami" or armed.exists()):
            spoil(reply.content)
        return reply
    return mod


def _simulate_faulty(argv: list[str], fault: str, out: Path, engine: str) -> None:
    import cloudpickle

    from dqc.federated.__main__ import parse_args
    from dqc.federated.simulate import simulate

    mod = fault_mod(fault, out / "qc_encoder_003.keras")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the mod reaches Ray
    try:
        simulate(parse_args(argv), mods=[mod], engine=engine)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _argv(case: dict, out: Path, *extra: str, cycles: int = CYCLES) -> list[str]:
    return ["simulate", *case["common"], "-cycles", str(cycles), *FLAGS, "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def after_cycle_3(federated_case: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An honest run's files through cycle 3, in process: every faulty run resumes from a
    copy of them (so each test pays for cycle 4 only)."""
    from dqc.federated.__main__ import parse_args
    from dqc.federated.simulate import simulate

    out = tmp_path_factory.mktemp("faults") / "out"
    simulate(parse_args(_argv(federated_case, out, cycles=CYCLES - 1)), engine="inprocess")
    return out


@pytest.fixture(scope="module")
def resumed_after_cycle_3(federated_case: dict, after_cycle_3: Path,
                          tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`--resume` from cycle 3's files with every node honest: what a faulty run resumes to
    once its node is mended, since the faulty run leaves exactly these files (each fault's
    test asserts that, byte for byte)."""
    from dqc.federated.__main__ import parse_args
    from dqc.federated.simulate import simulate

    out = tmp_path_factory.mktemp("resumed") / "out"
    shutil.copytree(after_cycle_3, out)
    simulate(parse_args(_argv(federated_case, out, "--resume")), engine="inprocess")
    return out


def test_resume_after_cycle_3_gives_the_uninterrupted_runs_outputs(
        federated_case: dict, resumed_after_cycle_3: Path):
    assert_same_qc_outputs(federated_case["single"](CYCLES, *FLAGS), resumed_after_cycle_3,
                           last_cycle=CYCLES - 1)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_faulty_node_stops_the_run_in_one_line_and_resume_finishes_it(
        federated_case: dict, after_cycle_3: Path, resumed_after_cycle_3: Path, fault: str,
        capsys, tmp_path: Path):
    """In process (`dqc.federated.inprocess`: the same server and node code, no Ray start),
    continuing an honest run after cycle 3 to cycle 4, where the fault comes. The faulty run
    leaves cycle 3's files exactly as they were, so `--resume` with the node mended is the
    resume of `resumed_after_cycle_3` (the uninterrupted run's outputs); the first fault's
    test makes that resume here too."""
    from dqc.cli import run_main
    from dqc.federated.__main__ import parse_args
    from dqc.federated.simulate import simulate

    out = tmp_path / "out"
    shutil.copytree(after_cycle_3, out)
    argv = _argv(federated_case, out, "--resume")
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: _simulate_faulty(argv, fault, out, "inprocess"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stopped.value.code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "center C02" in errors[0] and FAULTS[fault][2] in errors[0], errors[0]
    # the last complete cycle's files intact, byte for byte, and nothing of cycle 4
    assert (out / "qc_encoder_003.keras").is_file()
    assert not (out / "qc_encoder_004.keras").exists()
    assert set(pd.read_csv(out / "qc.csv").Cycle) == {0, 3}
    assert file_bytes(out) == file_bytes(after_cycle_3)

    if fault == next(iter(FAULTS)):  # the node mended: one resume shows it for every fault
        simulate(parse_args(argv), engine="inprocess")
        assert_same_qc_outputs(resumed_after_cycle_3, out, last_cycle=CYCLES - 1)


def test_exclude_leaves_the_faulty_center_out_and_the_run_finishes(
        federated_case: dict, after_cycle_3: Path, capsys, tmp_path: Path):
    """In Flower's Simulation Engine (Ray): the mod and the check across processes."""
    out = tmp_path / "out"
    shutil.copytree(after_cycle_3, out)
    _simulate_faulty(_argv(federated_case, out, "--resume", "--on-faulty-node", "exclude"),
                     "NaN scores", out, "ray")
    printed = capsys.readouterr()
    warned = [line for line in (printed.out + printed.err).splitlines()
              if "excluded" in line]
    assert warned and "center C02" in warned[0] and "from cycle 4 on" in warned[0]
    summary = json.loads((out / "qc_summary.json").read_text())
    assert list(summary["excluded_centers"]) == ["C02"]
    assert summary["excluded_centers"]["C02"]["from_cycle"] == 4
    assert "NaN scores" not in summary["excluded_centers"]["C02"]["fault"]  # the check's words
    assert "HC scores outside [0, 1]" in summary["excluded_centers"]["C02"]["fault"]
    log = pd.read_csv(out / "qc.csv")
    assert (log[log.Cycle == 4].Study != "C02").all() and (log.Cycle == 4).any()
    assert ((log.Cycle == 3) & (log.Study == "C02")).any()  # it took part until its fault
    images = pd.read_csv(out / "qc_images.csv")
    assert "C02" not in set(images.Study) and len(set(images.Study)) == 3
    assert (out / "qc_encoder_004.keras").is_file()
    network = json.loads((out / "qc_network.json").read_text())
    assert list(network["excluded_centers"]) == ["C02"]


def test_unknown_faulty_node_mode_is_one_line():
    from dqc.federated.runconfig import read_config

    with pytest.raises(DQCError, match="on-faulty-node must be one of stop, exclude"):
        read_config({"en": "e", "pd": "p", "cycles": 5, "min-nodes": 4,
                     "on-faulty-node": "ignore"})
