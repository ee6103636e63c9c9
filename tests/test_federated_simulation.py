"""Federated QC in Flower's Simulation Engine: the same decisions as one machine, and the
server never opens a training image (one node per center, in Ray worker processes).

The decisions are non-trivial by construction, not by floating-point luck: center C04's labels
are flipped after pre-training (`federated_case`) and the `trainloss` criterion judges each
update by its own training loss against the last accepted batches' (a window that starts with
the pre-training's last cycle). A C04 batch's loss is far above a clean batch's (the model fits
the true labels), and so is any one image's alone (ln 2: the output BatchNormalization of a
batch of one), so in cycle 3 C04's batch and then each of its images are undone, and in cycle
4 each is undone again and eliminated. Clean batches near the limit may add decisions, so
counts are lower bounds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import assert_same_qc_outputs

CYCLES = 5  # cycles 3..4 after the pre-trained 0..2
FLAGS = ("--criterion", "trainloss", "--window", "10")


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
    assert (fed.Ignored == 0).sum() >= 5 and fed.Ignored.sum() >= 9
    images = pd.read_csv(simulated["out"] / "qc_images.csv")
    assert "Harmful" in images.columns  # the nodes' ground truth reached the report
    harmful = images.Subject[images.Harmful == 1]
    assert len(harmful) == 4 and images.eliminated[images.Harmful == 1].all()
    alone = fed[fed.Subject.isin(harmful)]  # checked alone in cycle 3, revisited in cycle 4
    assert list(alone.Cycle) == [3] * 4 + [4] * 4 and alone.Ignored.all()
    assert ((fed.Subject == "batch") & (fed.Study == "C04") & (fed.Ignored == 1)).any()


def test_server_never_opens_a_training_image(federated_case: dict, simulated: dict):
    opened = set(simulated["opened"])
    training = {str(Path(p).resolve()) for p in federated_case["train"].Path}
    validation = {str((federated_case["val_dir"] / p).resolve()) for p in federated_case["val"].Path}
    assert validation <= opened  # the spy works: the server read its own validation images
    assert not opened & training
    assert not any(p.endswith((".nii", ".nii.gz")) for p in opened - validation)


def test_network_figures_are_written(simulated: dict):
    figures = json.loads((simulated["out"] / "qc_network.json").read_text())
    assert figures == simulated["figures"]
    log = pd.read_csv(simulated["out"] / "qc.csv", keep_default_na=False)
    assert figures["updates"] == len(log) - 1  # one remote step per evaluation after baseline
    assert 0 < figures["median_update_s"] <= figures["max_update_s"]
    # the next batch at the same center, or a retry after an undo, sends a digest only
    assert 0 < figures["states_sent"] < figures["updates"]
