"""Federated QC in Flower's Simulation Engine: the same decisions as one machine, the
server opens no image at all (every update is verified at the centers, on their own
validation rows), and a silent node stops the run cleanly (one node per center, in Ray
worker processes).

The decisions are non-trivial by construction, not by floating-point luck: center C04's labels
are flipped after pre-training (`federated_case`) and the `trainloss` criterion judges each
batch by its own training loss against the last accepted batches' (a window that starts with
the pre-training's last cycle, topped up by calibration batches). A C04 batch's loss is far
above a clean batch's (the model fits the true labels), so in cycles 3 and 4 C04's batch is
undone and each of its images retried alone. One image alone is judged against the single
images' own window (calibrated before the first decision), where every loss is near ln 2
(BatchNormalization over one image), so which of them are flagged, revisited and eliminated
is not by construction: only that those come from C04. Counts are lower bounds. The silent
node's run uses `combined` (each single image's held-out check is
verified at the centers), continued in Ray after an in-process cycle 3.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk

from helpers import assert_same_qc_outputs, file_bytes

CYCLES = 5  # cycles 3..4 after the pre-trained 0..2
FLAGS = ("--criterion", "trainloss", "--window", "10")
COMBINED = ("--criterion", "combined")  # single images verified at the centers


class OpenedFiles:
    """Every file this process opens while recording: Python's `open` (an audit hook) and
    SimpleITK's readers (C++, so their entry points are wrapped)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.paths: list[str] = []
        self.recording = False
        sys.addaudithook(self._audit)
        read_image, set_file_name = sitk.ReadImage, sitk.ImageFileReader.SetFileName

        def spy_read(path, *args, **kwargs):
            self._note(path)
            return read_image(path, *args, **kwargs)

        def spy_name(reader, path):
            self._note(path)
            return set_file_name(reader, path)
        monkeypatch.setattr(sitk, "ReadImage", spy_read)
        monkeypatch.setattr(sitk.ImageFileReader, "SetFileName", spy_name)

    def _note(self, path) -> None:
        if self.recording:
            self.paths.append(str(Path(os.fsdecode(path)).resolve()))

    def _audit(self, event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            self._note(args[0])


@pytest.fixture(scope="module")
def single(federated_case: dict) -> Path:
    """The single-machine script's own code path, with the same flags."""
    return federated_case["single"](CYCLES, *FLAGS)


@pytest.fixture(scope="module")
def simulated(federated_case: dict) -> dict:
    from dqc.federated.__main__ import parse_args
    from dqc.federated.simulate import simulate

    out = federated_case["root"] / "simulated"
    with pytest.MonkeyPatch.context() as mp:
        spy = OpenedFiles(mp)
        spy.recording = True
        figures = simulate(parse_args(["simulate", *federated_case["common"],
                                       "-cycles", str(CYCLES), *FLAGS, "--out", str(out)]))
        spy.recording = False
    return {"out": out, "figures": figures, "opened": spy.paths}


def test_same_log_decisions_and_models_as_one_machine(single: Path, simulated: dict):
    fed = assert_same_qc_outputs(single, simulated["out"], last_cycle=CYCLES - 1)
    assert list(fed.columns) == ["Cycle", "Subject", "Study", "ACC", "FP", "FN", "PFP", "PFN",
                                 "Ignored", "VAL_LOSS", "VAL_AUROC", "TRAIN_LOSS", "STATISTIC",
                                 "LIMIT"]
    # the decisions are not trivial (module docstring): updates kept, undone, retried image by
    # image, revisited and eliminated
    assert (fed.Ignored == 0).sum() >= 5 and fed.Ignored.sum() >= 2
    images = pd.read_csv(simulated["out"] / "qc_images.csv")
    assert "Harmful" in images.columns  # the nodes' ground truth reached the report
    harmful = images.Subject[images.Harmful == 1]
    assert len(harmful) == 4 and set(images.Study[images.times_flagged > 0]) <= {"C04"}
    alone = fed[fed.Subject.isin(harmful)]  # each checked alone in cycle 3
    assert sorted(alone.Subject[alone.Cycle == 3]) == sorted(harmful)
    c04 = fed[(fed.Subject == "batch") & (fed.Study == "C04")]
    assert list(c04.Cycle) == [3, 4] and c04.Ignored.all()


def _images(case: dict) -> tuple[set[str], set[str]]:
    training = {str(Path(p).resolve()) for p in case["train"].Path}
    validation = {str((case["val_dir"] / p).resolve()) for p in case["val"].Path}
    return training, validation


def test_server_opens_no_image_at_all(federated_case: dict, simulated: dict):
    assert not any(p.endswith((".nii", ".nii.gz")) for p in simulated["opened"])
    # the baseline and the references were verified: by the centers, on their own images
    log = pd.read_csv(simulated["out"] / "qc.csv")
    assert log.VAL_LOSS.notna().sum() >= 1 and log.ACC[0] > 0


def test_the_spy_sees_a_node_read_its_images_in_process(federated_case: dict, simulated: dict,
                                                        monkeypatch: pytest.MonkeyPatch):
    """The same spy is not blind: a center's node built in this process is seen reading
    its training and validation images, and verifying an update reads nothing more."""
    from dqc.federated.messages import digest, pack
    from dqc.federated.node import CenterNode, shared_trainer

    nodes = simulated["out"] / "nodes"
    spy = OpenedFiles(monkeypatch)
    spy.recording = True
    node = CenterNode(nodes / "node_1.csv", nodes / "node_1_val.csv")
    node.ready()
    spy.recording = False
    training, validation = _images(federated_case)
    own_train = {str(Path(p).resolve()) for p in pd.read_csv(nodes / "node_1.csv").Path}
    own_val = {str(Path(p).resolve()) for p in pd.read_csv(nodes / "node_1_val.csv").Path}
    assert own_train <= training and own_val <= validation and own_val
    assert own_train | own_val <= set(spy.paths)
    model = pack(shared_trainer(node.shape).model_arrays())
    t = node.verify(model, digest(model), "counts")
    assert (t.n_hc, t.n_pd) == (node.identity().val_hc, node.identity().val_pd)
    assert t.hc_scores is None and t.pred == ""  # the paper's rule: counts only travel


def test_network_figures_are_written(simulated: dict):
    figures = json.loads((simulated["out"] / "qc_network.json").read_text())
    assert figures == simulated["figures"] and figures["verify_at"] == "centers"
    log = pd.read_csv(simulated["out"] / "qc.csv", keep_default_na=False)
    calibration = json.loads((simulated["out"] / "qc_summary.json").read_text())["calibration"]
    # one remote step per evaluation after baseline, and per calibration step
    assert calibration["steps"] > 0
    assert figures["updates"] == len(log) - 1 + calibration["steps"]
    assert 0 < figures["median_update_s"] <= figures["max_update_s"]
    # the next batch at the same center, or a retry after an undo, sends a digest only
    assert 0 < figures["states_sent"] < figures["updates"]
    # trainloss: the baseline, then the reference when needed, verified at the 4 centers;
    # each verification returns counts and scores (a few bytes), never images
    assert figures["verifications"] >= 1
    assert all(v["bytes_received"] < 1000 for v in figures["verifications_detail"])


# --- a node that stops answering, and --resume ----------------------------------------------

SILENT = 1          # partition of center C02, which holds validation rows


@pytest.fixture(scope="module")
def after_cycle_3(federated_case: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's files through cycle 3, in process (`dqc.federated.inprocess`: the same
    server and node code, no Ray start): the silent node's run continues a copy of them."""
    from dqc.federated.__main__ import parse_args
    from dqc.federated.simulate import simulate

    out = tmp_path_factory.mktemp("silent") / "out"
    simulate(parse_args(["simulate", *federated_case["common"], "-cycles", str(CYCLES - 1),
                         *COMBINED, "--out", str(out)]), engine="inprocess")
    return out


def stall_mod(msg, context, call_next):
    """A Flower mod: center C02's node falls silent (sleeps past the server's timeout) at
    its first message after its hello."""
    if int(context.node_config["partition-id"]) == SILENT and \
            msg.metadata.message_type != "query.whoami":
        time.sleep(20)
    return call_next(msg, context)


def test_a_silent_node_stops_the_run_and_resume_finishes_it(federated_case: dict,
                                                            after_cycle_3: Path, capsys,
                                                            tmp_path: Path):
    """In Ray, continuing the run after cycle 3: one line naming the silent center, exit
    status 2, cycle 3's files exactly as they were; --resume then gives what an
    uninterrupted run gives: the single-machine script's outputs, every column of the log,
    with each single image verified at the centers."""
    import cloudpickle

    from dqc.cli import run_main
    from dqc.federated.__main__ import parse_args
    from dqc.federated.simulate import simulate

    out = tmp_path / "out"
    shutil.copytree(after_cycle_3, out)
    argv = ["simulate", *federated_case["common"], "-cycles", str(CYCLES), *COMBINED,
            "--out", str(out), "--node-timeout-s", "15", "--resume"]
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the stall reaches Ray
    try:
        with pytest.raises(SystemExit) as stopped:
            run_main(lambda: simulate(parse_args(argv), mods=[stall_mod]))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert stopped.value.code == 2 and len(errors) == 1
    assert "center C02" in errors[0] and "did not answer within 15 s" in errors[0]
    assert file_bytes(out) == file_bytes(after_cycle_3)  # nothing of cycle 4

    # the resume in process, from the files the Ray run left
    simulate(parse_args(argv), engine="inprocess")
    single = federated_case["single"](CYCLES, *COMBINED)  # shared with test_qc_criteria
    log = assert_same_qc_outputs(single, out, last_cycle=CYCLES - 1)
    assert log.VAL_LOSS.replace("", float("nan")).astype(float).notna().sum() >= 9


def test_the_servers_report_has_no_pixels_and_each_node_shows_its_own(federated_case: dict,
                                                                      simulated: dict):
    """NAME_report.html at the server: every section, the figure, each eliminated image's
    card, but not one mosaic; each center's node page (OUT/nodes, simulation) shows exactly
    its own eliminated and pending images, with their mosaics."""
    import base64
    import re

    from dqc.plots import mosaic_png

    out = simulated["out"]
    images = pd.read_csv(out / "qc_images.csv", dtype={"Subject": str})
    paths = dict(zip(federated_case["train"].Subject.astype(str), federated_case["train"].Path))
    server = (out / "qc_report.html").read_text()
    shown = images[images.status.isin(["eliminated", "pending"])]
    # C04's images are retried alone; which are flagged is not by construction (module
    # docstring), so at least one
    assert len(shown) >= 1 and 'class="mosaic"' not in server
    assert server.count("data:image/png") == 1  # the check figure, no image
    assert set(re.findall(r'data-subject="([^"]+)"', server)) == set(shown.Subject)
    for center, mine in shown.groupby("Study"):
        page = (out / "nodes" / f"qc_report_{center}.html").read_text()
        assert set(re.findall(r'data-subject="([^"]+)"', page)) == set(mine.Subject)
        for subject in mine.Subject:
            pixels = base64.b64encode(mosaic_png(paths[subject])).decode()
            assert pixels in page and pixels not in server
