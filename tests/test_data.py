"""The data contract: CSV validation, one-line errors (also through the script), NIfTI I/O."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from helpers import SHAPE, SUBPROCESS_BAD_CASES, call_script
from dqc.data import (array_to_image, check_shape, image_shape, image_to_array, load_table,
                      read_image, read_volume)
from dqc.errors import DQCError
from dqc.volumes import VolumeStore

TABLE_CASES = ["missing_column", "missing_csv", "duplicate_subject", "group_bin_2",
               "group_bin_x", "missing_image", "empty_csv", "zero_byte_csv"]
IMAGE_CASES = ["corrupt_image", "wrong_shape"]


def _message(case) -> str:
    """The DQCError text for a bad case, from the layer that is meant to catch it."""
    with pytest.raises(DQCError) as info:
        table = load_table(case.csv, "train")
        VolumeStore(table, SHAPE, verbose=False)
    return str(info.value)


# --- load_table --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TABLE_CASES)
def test_load_table_rejects_each_bad_csv_with_its_own_message(name, bad_cases):
    case = bad_cases[name]
    assert case.table_error
    with pytest.raises(DQCError, match=case.message) as info:
        load_table(case.csv, "train")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(case.csv)), "the message must name the CSV file"


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image_problems_pass_the_table_check_and_fail_when_read(name, bad_cases):
    case = bad_cases[name]
    table = load_table(case.csv, "train")  # the CSV itself is fine
    assert len(table) == 6
    with pytest.raises(DQCError, match=case.message) as info:
        VolumeStore(table, SHAPE, verbose=False)
    assert "\n" not in str(info.value)
    with pytest.raises(DQCError, match=case.message):  # the streaming path checks too
        VolumeStore(table, SHAPE, cache=False, verbose=False)


def test_every_bad_input_has_a_distinct_message(bad_cases):
    messages = {name: _message(case) for name, case in bad_cases.items()}
    assert len(set(messages.values())) == len(messages)
    # and not just distinct paths: the part after the file name differs between kinds
    reasons = {name: re.sub(r"^.*?\.(csv|nii\.gz)", "", m) for name, m in messages.items()}
    reasons = {n: re.sub(r"sub-\d+", "S", r) for n, r in reasons.items()}
    assert len(set(reasons.values())) == len(reasons), reasons


def test_load_table_normalises_types_and_resolves_relative_paths(cohort, tmp_path, monkeypatch):
    csv = Path(cohort["train"])
    raw = pd.read_csv(csv)
    assert not Path(raw.Path[0]).is_absolute()  # the cohort writes relative Paths
    monkeypatch.chdir(tmp_path)  # a cwd unrelated to the CSV's folder
    table = load_table(os.path.relpath(csv, tmp_path), "train")
    assert len(table) == 24
    assert table.Group_bin.dtype.kind == "i" and set(table.Group_bin) == {0, 1}
    assert all(isinstance(s, str) for s in table.Subject)
    for rel, resolved in zip(raw.Path, table.Path):
        assert Path(resolved).is_absolute()
        assert Path(resolved) == (csv.parent / rel).resolve()
        assert Path(resolved).is_file()


def test_subject_ids_stay_strings_and_harmful_defaults_to_zero(tmp_path, cohort):
    image = (Path(cohort["train"]).parent / pd.read_csv(cohort["train"]).Path[0]).resolve()
    csv = tmp_path / "t.csv"
    csv.write_text("Subject,Study,Path,Group_bin,Harmful\n"
                   f"007,1,{image},1,\n"
                   f"7,1,{image},0,1\n")
    table = load_table(csv, "train")
    assert list(table.Subject) == ["007", "7"]  # not both 7: that would be a false duplicate
    assert list(table.Study) == ["1", "1"]
    assert list(table.Harmful) == [0, 1]


def test_required_columns_depend_on_use(tmp_path, cohort):
    image = (Path(cohort["train"]).parent / pd.read_csv(cohort["train"]).Path[0]).resolve()
    csv = tmp_path / "v.csv"
    csv.write_text(f"Subject,Path,Group_bin\na,{image},1\nb,{image},0\n")
    assert len(load_table(csv, "validation")) == 2  # no Study needed on the server
    with pytest.raises(DQCError, match=r"missing column\(s\) Study"):
        load_table(csv, "train")
    with pytest.raises(DQCError, match=r"missing column\(s\) Sex, Age"):
        load_table(csv, "inference")


def test_empty_required_cell_names_row_and_column(tmp_path, cohort):
    image = (Path(cohort["train"]).parent / pd.read_csv(cohort["train"]).Path[0]).resolve()
    csv = tmp_path / "e.csv"
    csv.write_text(f"Subject,Study,Path,Group_bin\na,C1,{image},1\nb,,{image},0\n")
    with pytest.raises(DQCError, match=r"e\.csv: row 3 \(subject b\): empty Study"):
        load_table(csv, "train")


# --- the standard script turns each problem into one error line --------------------------------

def _check_rejected(run, case) -> None:
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    lines = run.error_lines()
    assert len(lines) == 1, run.stderr[-2000:]
    assert re.search(case.message, lines[0]), lines[0]
    assert lines[0] == run.stderr.strip().splitlines()[-1]  # the last thing it says
    if case.table_error:
        assert str(case.csv) in lines[0]
    assert run.model_files() == []
    assert "cycle" not in run.stdout


@pytest.mark.parametrize("name", TABLE_CASES + IMAGE_CASES)
def test_script_main_reports_bad_input_in_one_line_and_writes_nothing(name, bad_cases, capsys,
                                                                       tmp_path):
    case = bad_cases[name]
    out = tmp_path / "out"
    run = call_script(["-fn_train", str(case.csv), "-cycles", "1", "--out", str(out),
                       "--quiet"], capsys, out)
    _check_rejected(run, case)


@pytest.mark.parametrize("name", SUBPROCESS_BAD_CASES)
def test_script_process_exits_2_with_one_error_line(name, bad_cases, script_runs):
    _check_rejected(script_runs.get(f"bad:{name}"), bad_cases[name])


# --- NIfTI volumes -----------------------------------------------------------------------------

def _geometry_image() -> sitk.Image:
    like = sitk.Image(5, 6, 7, sitk.sitkFloat32)
    like.SetSpacing((1.5, 2.0, 2.5))
    like.SetOrigin((-10.0, 20.5, 3.25))
    like.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return like


def test_array_image_round_trip_keeps_xyz_order_values_and_geometry():
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    like = _geometry_image()
    image = array_to_image(array, like)
    assert image.GetSize() == (5, 6, 7)  # (x, y, z) == array shape
    assert image.GetPixel(1, 2, 3) == array[1, 2, 3]  # index (x, y, z) == array[x, y, z]
    assert image.GetPixel(4, 0, 6) == array[4, 0, 6]
    assert image.GetSpacing() == like.GetSpacing()
    assert image.GetOrigin() == like.GetOrigin()
    assert image.GetDirection() == like.GetDirection()
    back = image_to_array(image)
    assert back.shape == (5, 6, 7)
    assert back.dtype == np.float32
    assert np.array_equal(back, array)
    plain = array_to_image(array)  # without `like`: default geometry, same voxels
    assert plain.GetSpacing() == (1.0, 1.0, 1.0)
    assert np.array_equal(image_to_array(plain), array)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_file_round_trip_and_read_volume(tmp_path, dtype):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 200, size=(5, 6, 7)).astype(dtype)
    like = _geometry_image()
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(array_to_image(array, like), str(path))

    image = read_image(path)
    assert image.GetSize() == (5, 6, 7)
    assert np.allclose(image.GetSpacing(), like.GetSpacing())
    assert np.allclose(image.GetOrigin(), like.GetOrigin())
    assert np.allclose(image.GetDirection(), like.GetDirection())
    assert np.array_equal(image_to_array(image), array)
    assert image_shape(path) == (5, 6, 7)

    volume = read_volume(path, "s1", shape=(5, 6, 7))
    assert volume.dtype == np.float32
    assert volume.shape == (5, 6, 7, 1)
    assert np.array_equal(volume[..., 0], array.astype(np.float32))


def test_read_volume_rejects_a_shape_other_than_the_model_input(tmp_path):
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(array_to_image(np.zeros((5, 6, 7), np.uint8)), str(path))
    with pytest.raises(DQCError, match=r"v\.nii\.gz \(subject s9\): image shape 5x6x7 does not "
                                       r"match the model input 7x6x5$"):
        read_volume(path, "s9", shape=(7, 6, 5))


def test_check_shape_message_and_silence():
    check_shape((20, 24, 20), (20, 24, 20), "a.nii.gz")  # equal: no error
    check_shape((20, 24, 20), None, "a.nii.gz")  # nothing to compare with
    check_shape((20, 24, 20, 1), (20, 24, 20), "a.nii.gz")  # a channel axis is ignored
    with pytest.raises(DQCError) as info:
        check_shape((20, 24, 21), (20, 24, 20), "dir/a.nii.gz", "sub-1")
    assert str(info.value) == ("dir/a.nii.gz (subject sub-1): image shape 20x24x21 does not "
                               "match the model input 20x24x20")


def test_unreadable_and_missing_images_give_one_line_errors(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image at all" * 10)
    for path in (junk, tmp_path / "absent.nii"):
        with pytest.raises(DQCError, match=rf"{path.name} \(subject s\): cannot read image") as e:
            read_volume(path, "s")
        assert "\n" not in str(e.value)
