"""Harmful-image generators, the scenario builder and the generate_data.py CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from dqc.data import array_to_image, image_to_array, load_table
from dqc.errors import DQCError
from dqc.harmful import HARMFUL_TYPES, LABEL_TYPES, build_scenario, make_harmful

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "generate_harmful_samples" / "generate_data.py"
SHAPE = (20, 24, 20)  # (x, y, z); x and z equal so `orientation` can permute


def _image(array: np.ndarray) -> sitk.Image:
    """An image with non-trivial geometry, so a generator that drops it is caught."""
    image = array_to_image(array)
    image.SetSpacing((1.2, 0.9, 1.5))
    image.SetOrigin((3.0, -4.0, 5.5))
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    return image


def _brain(seed: int = 0, dtype=np.uint8) -> sitk.Image:
    """A bright textured ellipsoid, off-centre, on a zero background."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    inside = ((x - 8) / 6) ** 2 + ((y - 11) / 8) ** 2 + ((z - 10) / 6) ** 2 <= 1
    array = np.where(inside, 120 + 50 * np.sin(x / 2.0) * np.cos(y / 3.0), 0)
    array = array + inside * rng.normal(0, 5, SHAPE)
    return _image(np.clip(array, 0, 255).astype(dtype))


def _arr(image: sitk.Image) -> np.ndarray:
    return image_to_array(image).astype(np.float64)


def _gradient_energy(array: np.ndarray) -> float:
    return float(sum((g ** 2).sum() for g in np.gradient(array)))


def _centre_of_mass(array: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij")
    return np.array([(g * array).sum() / array.sum() for g in grids])


@pytest.mark.parametrize("kind", sorted(HARMFUL_TYPES))
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_generators_keep_geometry_and_pixel_type(kind: str, dtype) -> None:
    image = _brain(dtype=dtype)
    before = _arr(image).copy()
    out = HARMFUL_TYPES[kind](image, np.random.default_rng(3))
    assert out.GetSize() == image.GetSize()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(_arr(image), before)  # input untouched (pure)
    if kind in LABEL_TYPES:
        np.testing.assert_array_equal(_arr(out), before)
    else:
        assert np.abs(_arr(out) - before).mean() > 1.0


@pytest.mark.parametrize("kind", sorted(HARMFUL_TYPES))
def test_generators_are_deterministic_per_seed(kind: str) -> None:
    image = _brain()
    a = _arr(HARMFUL_TYPES[kind](image, np.random.default_rng(7)))
    b = _arr(HARMFUL_TYPES[kind](image, np.random.default_rng(7)))
    np.testing.assert_array_equal(a, b)


def test_inverted_sums_to_255() -> None:
    image = _brain()
    out = HARMFUL_TYPES["inverted"](image, np.random.default_rng(0))
    assert np.all(_arr(image) + _arr(out) == 255)


def test_noise_has_sd_25() -> None:
    image = _image(np.full(SHAPE, 128, np.uint8))
    out = HARMFUL_TYPES["noise"](image, np.random.default_rng(0))
    residual = _arr(out) - 128
    assert abs(residual.std() - 25) < 2
    assert abs(residual.mean()) < 2


def test_orientation_is_exact_flip_or_permutation() -> None:
    image = _brain()
    array = image_to_array(image)
    flips = [np.flip(array, axis=axes) for axes in
             [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]]
    perms = [np.transpose(array, (2, 1, 0))]  # only x and z have equal length
    seen = set()
    for seed in range(12):
        out = image_to_array(HARMFUL_TYPES["orientation"](image, np.random.default_rng(seed)))
        flip = any(np.array_equal(out, f) for f in flips)
        perm = any(np.array_equal(out, p) for p in perms)
        assert flip or perm
        seen.add("flip" if flip else "perm")
    assert seen == {"flip", "perm"}


def test_orientation_unequal_axes_only_flips() -> None:
    image = _image(np.random.default_rng(0).integers(0, 255, (8, 10, 12), dtype=np.uint8))
    array = image_to_array(image)
    flips = [np.flip(array, axis=a) for a in
             [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]]
    for seed in range(6):
        out = image_to_array(HARMFUL_TYPES["orientation"](image, np.random.default_rng(seed)))
        assert any(np.array_equal(out, f) for f in flips)


def test_blur_lowers_gradient_energy() -> None:
    image = _brain()
    out = HARMFUL_TYPES["blur"](image, np.random.default_rng(0))
    assert _gradient_energy(_arr(out)) < 0.3 * _gradient_energy(_arr(image))


def test_intensity_scales_the_mean() -> None:
    image = _image(np.random.default_rng(0).integers(20, 61, SHAPE).astype(np.uint8))
    for seed in range(6):
        out = HARMFUL_TYPES["intensity"](image, np.random.default_rng(seed))
        ratio = _arr(out).mean() / _arr(image).mean()
        assert 0.19 <= ratio <= 0.41 or 2.49 <= ratio <= 4.01, ratio


def test_bias_is_strong_and_smooth() -> None:
    image = _image(np.full(SHAPE, 80, np.uint8))
    for seed in range(4):
        gain = _arr(HARMFUL_TYPES["bias"](image, np.random.default_rng(seed))) / 80
        assert gain.max() / gain.min() > 2.0  # strong
        smooth = ndimage.gaussian_filter(gain, 1.0, mode="nearest")
        assert np.abs(gain - smooth).mean() < 0.03  # smooth: no fine structure


def test_motion_puts_ghosts_in_the_background() -> None:
    image = _brain()
    background = _arr(image) == 0
    for seed in range(4):
        out = _arr(HARMFUL_TYPES["motion"](image, np.random.default_rng(seed)))
        assert out[background].mean() > 8.0  # ghosts where there was nothing


def test_spike_adds_a_kspace_peak() -> None:
    image = _brain()
    background = _arr(image) == 0
    for seed in range(4):
        out = _arr(HARMFUL_TYPES["spike"](image, np.random.default_rng(seed)))
        k = np.abs(np.fft.fftn(out - _arr(image)))
        k.flat[0] = 0
        # the change is concentrated on a few frequencies (noise would spread over ~5000)
        assert k.max() / np.sqrt((k ** 2).sum()) > 0.2
        assert out[background].std() > 3.0  # stripes across the empty background


def test_misregistration_moves_the_brain() -> None:
    image = _brain()
    for seed in range(4):
        out = _arr(HARMFUL_TYPES["misregistration"](image, np.random.default_rng(seed)))
        moved = np.linalg.norm(_centre_of_mass(out) - _centre_of_mass(_arr(image)))
        assert moved > 2.0


def test_make_harmful_writes_file(tmp_path: Path) -> None:
    src = tmp_path / "in.nii.gz"
    sitk.WriteImage(_brain(), str(src))
    out = make_harmful(src, tmp_path / "sub" / "out.nii.gz", "inverted", seed=1)
    assert out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["out.nii.gz"]  # no temp file left
    written = sitk.ReadImage(str(out))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(written.GetDirection(), _brain().GetDirection())
    assert np.all(_arr(written) + _arr(_brain()) == 255)
    with pytest.raises(DQCError, match="unknown harmful type"):
        make_harmful(src, tmp_path / "x.nii.gz", "nope")


# --- scenarios -------------------------------------------------------------------------------

CENTERS = ["A", "B", "C", "D"]


def _cohort(tmp_path: Path) -> Path:
    """4 centers x 3 images, relative paths, with Sex and Age columns."""
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    rows = []
    for c, center in enumerate(CENTERS):
        for j in range(3):
            subject = f"{center}{j}"
            sitk.WriteImage(_brain(seed=10 * c + j), str(folder / "img" / f"{subject}.nii.gz"))
            rows.append(dict(Subject=subject, Study=center, Path=f"img/{subject}.nii.gz",
                             Group_bin=j % 2, Sex="M" if j else "F", Age=50 + c + j))
    pd.DataFrame(rows).to_csv(folder / "train.csv", index=False)
    return folder / "train.csv"


def _pixels(path: str) -> np.ndarray:
    return _arr(sitk.ReadImage(path))


def test_scenario_whole_centers_and_single_images(tmp_path: Path) -> None:
    csv = _cohort(tmp_path)
    original = load_table(csv, "scenario")
    out = build_scenario(csv, tmp_path / "scen", whole_centers=1, single_images=2,
                         types=["inverted", "noise"], seed=0, verbose=False)
    assert out == (tmp_path / "scen" / "train.csv").resolve()
    raw = pd.read_csv(out, dtype={"Subject": str, "Study": str})
    assert list(raw.columns) == list(original.columns) + ["Harmful", "HarmfulType"]
    result = load_table(out, "scenario")

    old = result[result.Subject.isin(original.Subject)].reset_index(drop=True)
    new = result[~result.Subject.isin(original.Subject)].reset_index(drop=True)
    whole = sorted(set(old.Study[old.Harmful == 1]))
    assert len(whole) == 1
    # the whole center: every row harmful, same subjects, files inverted
    rows = old[old.Study == whole[0]]
    assert (rows.Harmful == 1).all() and (rows.HarmfulType == "inverted").all()
    for _, row in rows.iterrows():
        assert Path(row.Path).parent == (tmp_path / "scen" / "images").resolve()
        source = original.Path[original.Subject == row.Subject].item()
        assert np.all(_pixels(row.Path) + _pixels(source) == 255)
    assert not raw.Path[raw.Harmful == 1].str.startswith("/").any()  # relative to out_dir
    # single images: M new rows, each in a different clean center, copies of that center's image
    assert len(new) == 2 and (new.Harmful == 1).all()
    assert new.Study.nunique() == 2 and not set(new.Study) & set(whole)
    assert sorted(new.HarmfulType) == ["inverted", "noise"]
    for _, row in new.iterrows():
        donor = row.Subject.split("_harm_")[0]
        assert original.Study[original.Subject == donor].item() == row.Study
        assert row.Subject == f"{donor}_harm_{row.HarmfulType}"
        assert not np.array_equal(_pixels(row.Path),
                                  _pixels(original.Path[original.Subject == donor].item()))
    # all other rows identical
    keep = old[old.Study != whole[0]].reset_index(drop=True)
    ref = original[original.Study != whole[0]].reset_index(drop=True)
    assert (keep.Harmful == 0).all() and keep.HarmfulType.isna().all()
    pd.testing.assert_frame_equal(keep[list(original.columns)], ref)


def test_scenario_named_centers_cycle_types(tmp_path: Path) -> None:
    csv = _cohort(tmp_path)
    out = build_scenario(csv, tmp_path / "s", centers=["C", "A"], types=["noise", "intensity"],
                         verbose=False)
    result = load_table(out, "scenario")
    kinds = result.groupby("Study").HarmfulType.agg(lambda s: set(s.fillna("")))
    assert kinds.to_dict() == {"A": {"intensity"}, "B": {""}, "C": {"noise"}, "D": {""}}
    assert result.Harmful.tolist() == [int(s in "AC") for s in result.Study]


def test_scenario_label_flips_group_bin_on_harmful_rows_only(tmp_path: Path) -> None:
    csv = _cohort(tmp_path)
    original = load_table(csv, "scenario").set_index("Subject")
    out = build_scenario(csv, tmp_path / "s", centers=["B"], single_images=1,
                         types=["label"], seed=4, verbose=False)
    result = load_table(out, "scenario")
    for _, row in result.iterrows():
        donor = row.Subject.split("_harm_")[0]
        flipped = row.Group_bin != original.Group_bin[donor]
        assert flipped == bool(row.Harmful)
        if row.Harmful:  # the image itself is untouched
            np.testing.assert_array_equal(_pixels(row.Path), _pixels(original.Path[donor]))
    assert result.Harmful.sum() == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(whole_centers=5), "only 4 centers"),
    (dict(centers=["Z"]), "unknown center"),
    (dict(whole_centers=3, single_images=2), "not whole-harmful"),
    (dict(whole_centers=1, types=["bogus"]), "unknown harmful type"),
    (dict(), "nothing to do"),
])
def test_scenario_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    csv = _cohort(tmp_path)
    with pytest.raises(DQCError, match=message) as info:
        build_scenario(csv, tmp_path / "s", verbose=False, **kwargs)
    assert "\n" not in str(info.value)


def test_scenario_is_reproducible(tmp_path: Path) -> None:
    csv = _cohort(tmp_path)
    a = build_scenario(csv, tmp_path / "a", whole_centers=2, single_images=1,
                       types=["spike", "motion"], seed=5, verbose=False)
    b = build_scenario(csv, tmp_path / "b", whole_centers=2, single_images=1,
                       types=["spike", "motion"], seed=5, verbose=False)
    ta, tb = pd.read_csv(a), pd.read_csv(b)
    pd.testing.assert_frame_equal(ta, tb)
    for pa, pb in zip(ta.Path, tb.Path):
        if not Path(pa).is_absolute():
            np.testing.assert_array_equal(_pixels(str(a.parent / pa)), _pixels(str(b.parent / pb)))


# --- CLI -------------------------------------------------------------------------------------

def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_single_image_and_scenario(tmp_path: Path) -> None:
    src = tmp_path / "in.nii.gz"
    sitk.WriteImage(_brain(), str(src))
    single = _cli("-i", str(src), "-o", str(tmp_path / "out.nii.gz"), "-type", "blur",
                  "--seed", "2", cwd=SCRIPT.parent)
    assert single.returncode == 0, single.stderr
    assert len(single.stdout.strip().splitlines()) == 1
    assert (tmp_path / "out.nii.gz").is_file()

    csv = _cohort(tmp_path)
    scen = _cli("--csv", str(csv), "--out", str(tmp_path / "scen"), "--whole-centers", "1",
                "--single-images", "1", "--types", "inverted,noise", "--quiet")
    assert scen.returncode == 0, scen.stderr
    assert len(scen.stdout.strip().splitlines()) == 1 and "harmful" in scen.stdout
    assert load_table(tmp_path / "scen" / "train.csv", "scenario").Harmful.sum() == 4


@pytest.mark.parametrize("args", [
    ["--types", "inverted,bogus", "--whole-centers", "1"],
    ["--no-such-flag"],
])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str]) -> None:
    csv = _cohort(tmp_path)
    result = _cli("--csv", str(csv), "--out", str(tmp_path / "s"), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_cli_help_lists_types() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    for kind in HARMFUL_TYPES:
        assert kind in result.stdout
