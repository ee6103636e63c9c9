"""The synthetic cohort: contract, geometry, determinism, disease signal, allocation and CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from dqc import cohort
from dqc.data import image_to_array, load_table
from helpers import TINY

SPLITS = ("train", "val", "test")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cohort")
    return out, cohort.build_cohort(out, verbose=False, **TINY)


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_csv(out / f"{s}.csv", dtype={"Subject": str, "Study": str})
            for s in SPLITS}


def _arrays(out: Path) -> dict[str, np.ndarray]:
    all_rows = pd.concat(_tables(out).values())
    return {s: image_to_array(sitk.ReadImage(str(out / p)))
            for s, p in zip(all_rows.Subject, all_rows.Path)}


def test_csvs_follow_the_contract(tiny):
    out, result = tiny
    tables = _tables(out)
    for split, n in zip(SPLITS, (24, 12, 8)):
        table = tables[split]
        assert list(table.columns) == ["Subject", "Study", "Path", "Group_bin", "Sex", "Age"]
        assert len(table) == n
        assert set(table.Group_bin) == {0, 1}
        assert set(table.Sex) <= {"M", "F"}
        assert table.Age.between(50, 85).all()
        assert result[split] == out / f"{split}.csv"
        load_table(out / f"{split}.csv", "inference")  # the project's own validator accepts it
    assert (out / "cohort.json").is_file()
    assert result["params"]["downsample"] == 8


def test_images_are_uint8_with_the_expected_geometry(tiny):
    out, _ = tiny
    template = sitk.ReadImage(str(cohort.template_dir()
                                  / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    spacing = tuple(s * 8 for s in template.GetSpacing())
    for table in _tables(out).values():
        for path in table.Path:
            assert path.startswith("images/")
            image = sitk.ReadImage(str(out / path))
            assert image.GetPixelID() == sitk.sitkUInt8
            assert image.GetSize() == (20, 24, 20)
            assert np.allclose(image.GetSpacing(), spacing)
            assert np.allclose(image.GetDirection(), template.GetDirection())


def test_splits_are_disjoint_and_share_centers(tiny):
    out, _ = tiny
    tables = _tables(out)
    subjects = [set(t.Subject) for t in tables.values()]
    assert sum(map(len, subjects)) == len(set.union(*subjects))
    train_counts = tables["train"].Study.value_counts()
    assert len(train_counts) == 4 and train_counts.min() >= 2
    assert set(tables["val"].Study) | set(tables["test"].Study) <= set(train_counts.index)
    sizes = pd.concat(tables.values()).Study.value_counts()
    assert sizes.nunique() > 1  # centers differ in size


def test_same_seed_is_identical_and_another_seed_differs(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    args = [sys.executable, "-m", "dqc.cohort", "--out", str(again), "--centers", "4",
            "--train", "24", "--val", "12", "--test", "8", "--downsample", "8", "--seed", "0"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().count("\n") == 0 and "24" in done.stdout
    for name in ("train.csv", "val.csv", "test.csv", "cohort.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    first, second = _arrays(out), _arrays(again)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[s], second[s]) for s in first)

    other = tmp_path / "other"
    cohort.build_cohort(other, verbose=False, **{**TINY, "seed": 1})
    assert (out / "train.csv").read_bytes() != (other / "train.csv").read_bytes()
    third = _arrays(other)
    shared = first.keys() & third.keys()
    assert shared and not any(np.array_equal(first[s], third[s]) for s in shared)


def test_pd_is_darker_in_deep_grey_matter_only(tiny):
    out, _ = tiny
    table = pd.concat(_tables(out).values())
    images = [sitk.ReadImage(str(out / p)) for p in table.Path]
    arrays = np.stack([image_to_array(i).astype(float) for i in images])
    roi = cohort.deep_gm_weight(images[0])
    mean = arrays.mean(axis=0)
    outside = (mean > 0.3 * mean.max()) & (roi < 0.01)
    reference = np.array([np.median(a[outside]) for a in arrays])  # removes scanner scale
    in_roi = np.array([a[roi > 0.5].mean() for a in arrays]) / reference
    out_roi = np.array([a[outside].mean() for a in arrays]) / reference
    pd_group = table.Group_bin.to_numpy() == 1
    roi_drop = in_roi[~pd_group].mean() - in_roi[pd_group].mean()
    other_drop = out_roi[~pd_group].mean() - out_roi[pd_group].mean()
    assert roi_drop > 0.05
    assert abs(other_drop) < roi_drop / 4


def test_allocation_is_exact_stratified_and_skewed():
    sites = cohort.make_centers(20, 0.5, seed=0)
    sizes = {"train": 200, "val": 120, "test": 100}
    counts = cohort.allocate(sites, sizes, 0.5)  # [split, center, label]
    for s, split in enumerate(SPLITS):
        assert counts[s].sum() == sizes[split]
        assert counts[s, :, 1].sum() == sizes[split] // 2
    assert counts[0].sum(axis=1).min() >= 2
    assert counts[1, :, 0].sum() >= 50 and counts[1, :, 1].sum() >= 50
    totals = counts.sum(axis=(0, 2))
    assert totals.min() <= 4 and totals.max() >= 30
    assert list(cohort.apportion(7, np.array([1.0, 1.0, 2.0]), caps=np.array([1, 9, 9]))) \
        == [1, 2, 4]


@pytest.mark.parametrize("flags", [
    ["--centers", "0"],
    ["--centers", "10", "--train", "5"],
    ["--downsample", "0"],
    ["--pd-fraction", "1.5"],
    ["--effect", "-0.1"],
])
def test_bad_flags_exit_2_with_one_line(flags, tmp_path):
    args = [sys.executable, "-m", "dqc.cohort", "--out", str(tmp_path / "c"), *flags]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "c").exists()
