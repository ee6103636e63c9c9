"""Writing files, one way (`dqc.io`): the usual permissions, and nothing half-written.

Every file the harmful generator, the scenario builder, the cohort builder and the QC script
write has the mode a file made with `open()` gets under the same umask; a cohort builder
killed at a random moment leaves only complete files under their final names.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from dqc import io
from dqc.cohort import build_cohort
from dqc.data import array_to_image, read_image
from dqc.errors import DQCError, error_reason
from dqc.harmful import build_scenario, make_harmful, plan_scenario

ROOT = Path(__file__).resolve().parents[1]
HARMFUL_SCRIPT = ROOT / "generate_harmful_samples" / "generate_data.py"
#: A temporary name of `dqc.io`: hidden, the final name, 8 hex digits, the suffixes.
TEMP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}(\.[^.]+)+")
UMASKS = (0o022, 0o027)


@pytest.fixture(params=UMASKS, ids=[f"umask{m:03o}" for m in UMASKS])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def open_mode(folder: Path) -> int:
    """The permission bits `open()` gives a new file in `folder` under the current umask."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / "probe-made-by-open"
    with open(probe, "w"):
        pass
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    return mode


def assert_open_modes(root: Path, at_least: int = 1) -> list[Path]:
    """Every file under `root` has `open()`'s permissions; no temporary file is left."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) >= at_least, files
    assert [p for p in files if p.name.startswith(".")] == []
    expected = open_mode(root)
    wrong = {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != expected}
    assert wrong == {}, f"expected {oct(expected)}"
    return files


# --- the writers -----------------------------------------------------------------------------

def _image() -> sitk.Image:
    return array_to_image(np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 6, 7))


def test_each_writer_gives_open_permissions(umask, tmp_path):
    io.write_text(tmp_path / "a.txt", "text\n")
    io.write_bytes(tmp_path / "b.bin", b"\0\1")
    io.write_json(tmp_path / "c.json", {"x": [1, 2]})
    io.write_csv(tmp_path / "d.csv", pd.DataFrame({"a": [1, 2]}))
    io.write_npz(tmp_path / "e.npz", {"meta": np.array("{}"), "v": np.zeros(3)})
    io.write_image(tmp_path / "f.nii.gz", _image(), compress=True)
    io.write_image(tmp_path / "sub" / "g.nii", _image())

    def recreate(tmp: Path) -> None:  # a writer that replaces the file instead of filling it
        tmp.unlink()
        tmp.write_text("new")
    io.atomic_write(tmp_path / "h", recreate)
    assert len(assert_open_modes(tmp_path, at_least=8)) == 8
    assert (tmp_path / "c.json").read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}\n'
    assert (tmp_path / "d.csv").read_text() == "a\n1\n2\n"
    with np.load(tmp_path / "e.npz") as data:
        assert data.files == ["meta", "v"]


def test_written_image_is_what_simpleitk_writes(tmp_path):
    """The temporary name keeps the suffixes: the same format, byte for byte."""
    for name, compress in (("x.nii.gz", True), ("y.nii.gz", False), ("z.nii", False)):
        sitk.WriteImage(_image(), str(tmp_path / f"direct_{name}"), compress)
        io.write_image(tmp_path / name, _image(), compress=compress)
        assert (tmp_path / name).read_bytes() == (tmp_path / f"direct_{name}").read_bytes()


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "t.csv"
    io.write_text(target, "old\n")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(DQCError, match=r"t\.csv: cannot write \(No space left on device\); "
                                       "the previous version, if any, is kept"):
        io.atomic_write(target, failing)
    with pytest.raises(DQCError, match=r"u\.xyz: cannot write image \("):
        io.write_image(tmp_path / "u.xyz", _image())  # no writer for that suffix
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]
    assert target.read_text() == "old\n"


def test_error_reason_is_one_short_line():
    assert error_reason(RuntimeError("a\nb\nthe reason  \n")) == "the reason"
    assert error_reason(RuntimeError("summary\ndetail"), first_line=True) == "summary"
    assert error_reason(ValueError("")) == "ValueError"
    assert error_reason(ValueError(" "), "unreadable") == "unreadable"
    assert error_reason(ValueError("x" * 300)) == "x" * 160
    assert error_reason(ValueError("x" * 300), limit=120) == "x" * 120


# --- what the programs write -------------------------------------------------------------------

def test_harmful_generator_and_scenario_files(umask, cohort, tmp_path):
    train = Path(cohort["train"])
    first = pd.read_csv(train).Path[0]
    make_harmful(train.parent / first, tmp_path / "single" / "one.nii.gz", "noise", seed=1)
    build_scenario(train, tmp_path / "scenario", whole_centers=1, single_images=1,
                   types=["inverted", "label"], seed=3, verbose=False)
    done = subprocess.run([sys.executable, str(HARMFUL_SCRIPT), "--csv", str(train), "--out",
                           str(tmp_path / "script"), "--centers", "C02", "--types", "blur",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    files = assert_open_modes(tmp_path, at_least=10)
    assert {p.name for p in files} >= {"one.nii.gz", "train.csv"}


def test_scenario_plan_is_what_build_scenario_writes(cohort, tmp_path):
    train = Path(cohort["train"])
    options = dict(whole_centers=1, single_images=2, types=["noise", "label"], seed=5,
                   verbose=False)
    plan = plan_scenario(train, tmp_path / "s", **options)
    assert not (tmp_path / "s").exists()  # planning writes nothing
    written = build_scenario(train, tmp_path / "s", **options)
    assert written == plan.out_csv
    assert written.read_text() == plan.table.to_csv(index=False)
    targets = sorted(p.relative_to(tmp_path / "s").as_posix()
                     for p in (tmp_path / "s" / "images").iterdir())
    assert targets == sorted(p.target.relative_to(tmp_path / "s").as_posix()
                             for p in plan.images)
    assert len(plan.images) == int(plan.table.Harmful.sum())


def test_cohort_builder_files(umask, tmp_path):
    build_cohort(tmp_path / "cohort", centers=2, n_train=4, n_val=2, n_test=2, downsample=8,
                 seed=0, verbose=False)
    files = assert_open_modes(tmp_path / "cohort", at_least=12)
    assert {p.name for p in files} >= {"train.csv", "val.csv", "test.csv", "cohort.json"}


def test_qc_script_files(federated_case, tmp_path, capsys):
    from helpers import QC_SCRIPT, call_script

    out = tmp_path / "qc"
    old = os.umask(0o027)
    try:
        run = call_script([*federated_case["common"], "-cycles", "4", "--out", str(out)],
                          capsys, out, script_path=QC_SCRIPT)
        assert run.returncode == 0, run.stderr
        files = assert_open_modes(out, at_least=6)
    finally:
        os.umask(old)
    assert {p.suffix for p in files} >= {".csv", ".json", ".keras", ".npz"}


# --- killed at a random moment -----------------------------------------------------------------

def _check_complete(out: Path) -> tuple[int, int]:
    """Every file under its final name is whole; only temporary names may be partial.

    Returns (complete files, temporary leftovers)."""
    complete, leftovers = 0, 0
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            match = TEMP.fullmatch(path.name)
            assert match, f"{path}: a hidden file that is not a temporary name of dqc.io"
            leftovers += 1
            continue
        if path.name.endswith(".nii.gz"):
            read_image(path)  # the data layer's full check: header, voxel count, values
        elif path.suffix == ".csv":
            table = pd.read_csv(path)
            assert list(table.columns) == ["Subject", "Study", "Path", "Group_bin", "Sex", "Age"]
            assert all((out / p).is_file() for p in table.Path), f"{path}: an image is missing"
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            raise AssertionError(f"{path}: unexpected file")
        complete += 1
    return complete, leftovers


def _started(images: Path) -> bool:
    """The first image is being written."""
    return images.is_dir() and any(True for _ in images.iterdir())


def test_killed_cohort_builder_leaves_no_half_written_file(tmp_path):
    rng = random.Random(13)  # the same moments every run
    command = [sys.executable, "-m", "dqc.cohort", "--centers", "4", "--train", "80",
               "--val", "12", "--test", "8", "--downsample", "4"]  # ~3 s of writing images
    killed = 0
    for trial in range(3):
        out = tmp_path / f"c{trial}"
        proc = subprocess.Popen([*command, "--out", str(out)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and not _started(out / "images"):
                assert time.monotonic() < deadline, "the cohort builder never started writing"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.2))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        killed += proc.returncode == -signal.SIGKILL
        complete, _ = _check_complete(out)
        assert complete or proc.returncode  # a finished run wrote its files
    assert killed  # stopped part way (all three here; a much faster machine may finish)
