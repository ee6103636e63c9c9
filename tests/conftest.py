"""Shared fixtures: one tiny synthetic cohort, bad inputs, and script runs started early.

The standard script is slow to start (TensorFlow import, ~7 s of CPU), so every subprocess run
the tests need is submitted at once, the first time any test asks for `script_runs`, and runs
in the background while the in-process tests work. Tests that use `script_runs` are moved to
the end of the session so that the other tests overlap with the subprocesses.

`make test` runs the suite on every core (pytest-xdist, `-n auto --dist loadgroup`): the
tests that share an expensive session fixture form one group (one worker builds it once),
every other test file is a group of its own, and the groups that take longest go first.
"""

from __future__ import annotations

import functools
import os
import re
import runpy
import struct
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from dqc.runtime import quiet_tensorflow_import

quiet_tensorflow_import()  # its start-up lines would reach the terminal under xdist

from dqc.cohort import build_cohort  # noqa: E402  (TensorFlow, quiet in a worker)
from dqc.data import array_to_image  # noqa: E402
from helpers import (QC_SCRIPT, ROOT, SCRIPT, SCRIPT_DIR, SUBPROCESS_BAD_CASES,  # noqa: E402
                     TINY, BadCase, ScriptRuns, pretrained)


# --- the cohort ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny cohort: 4 centers, 24/12/8 images of 20x24x20 voxels (relative Paths)."""
    out = tmp_path_factory.mktemp("tiny_cohort")
    return build_cohort(out, verbose=False, **TINY)


@pytest.fixture(scope="session")
def pretrained_one(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny cohort of 6 centers (16 validation images) pre-trained one cycle, shared by
    the runs that continue it (dirty baseline, learning-rate schedule, fast paths): they
    read it and write elsewhere."""
    return pretrained(tmp_path_factory.mktemp("pretrained_one"), cycles=1, n_val=16)


# --- bad inputs --------------------------------------------------------------------------------

def _write(table: pd.DataFrame, path: Path) -> Path:
    table.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def bad_cases(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BadCase]:
    """One CSV per kind of broken input, built from the first 6 training rows (absolute Paths)."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    (folder / "images").mkdir()
    good = pd.read_csv(cohort["train"], dtype={"Subject": str, "Study": str}).head(6)
    good["Path"] = [str((Path(cohort["train"]).parent / p).resolve()) for p in good.Path]
    subj = list(good.Subject)
    cases: dict[str, BadCase] = {}

    def case(name: str, table: pd.DataFrame | None, message: str, table_error: bool = True,
             csv: Path | None = None) -> None:
        path = csv if csv is not None else _write(table, folder / f"bad_{name}.csv")
        cases[name] = BadCase(path, message, table_error)

    case("missing_column", good.drop(columns="Group_bin"),
         r"bad_missing_column\.csv: missing column\(s\) Group_bin ")
    case("missing_csv", None, r"no_such_table\.csv: CSV file not found",
         csv=folder / "no_such_table.csv")
    dup = good.copy()
    dup.loc[4, "Subject"] = subj[1]
    case("duplicate_subject", dup,
         rf"bad_duplicate_subject\.csv: row 6 \(subject {subj[1]}\): duplicate Subject")
    two = good.copy()
    two.loc[2, "Group_bin"] = 2
    case("group_bin_2", two,
         rf"bad_group_bin_2\.csv: row 4 \(subject {subj[2]}\): Group_bin must be 0 or 1, got 2$")
    letter = good.copy()
    letter["Group_bin"] = letter.Group_bin.astype(str)
    letter.loc[3, "Group_bin"] = "x"
    case("group_bin_x", letter,
         rf"bad_group_bin_x\.csv: row 5 \(subject {subj[3]}\): Group_bin must be 0 or 1, "
         r"got 'x'$")
    missing = good.copy()
    missing.loc[2, "Path"] = str(folder / "images" / "not_there.nii.gz")
    case("missing_image", missing,
         rf"bad_missing_image\.csv: row 4 \(subject {subj[2]}\): image file not found: "
         r".*not_there\.nii\.gz")
    header_only = good.head(0)
    case("empty_csv", header_only, r"bad_empty_csv\.csv: no rows")
    zero = folder / "bad_zero_bytes.csv"
    zero.write_bytes(b"")
    case("zero_byte_csv", None, r"bad_zero_bytes\.csv: not a readable CSV", csv=zero)

    corrupt_image = folder / "images" / "corrupt.nii.gz"
    corrupt_image.write_bytes(np.random.default_rng(1).bytes(3000))
    corrupt = good.copy()
    corrupt.loc[0, "Path"] = str(corrupt_image)  # the first row: the script reads it first
    case("corrupt_image", corrupt,
         rf"corrupt\.nii\.gz \(subject {subj[0]}\): cannot read image", table_error=False)
    small_image = folder / "images" / "small.nii.gz"
    sitk.WriteImage(array_to_image(np.zeros((10, 12, 10), np.uint8)), str(small_image))
    small = good.copy()
    small.loc[3, "Path"] = str(small_image)
    case("wrong_shape", small,
         rf"small\.nii\.gz \(subject {subj[3]}\): image shape 10x12x10 does not match the "
         r"model input 20x24x20", table_error=False)
    return cases


# --- the malformed-input corpus ------------------------------------------------------------------

#: Where the corpus puts its defect: the third data row, line 4 of the CSV (after the header),
#: so the first row (the fresh model's shape) is good and the whole-table check is needed.
CORPUS_ROW = 2


def _nifti_defects(folder: Path, good: np.ndarray) -> dict[str, Path]:
    """One NIfTI file per defect, derived from a good (x, y, z) float32 volume."""
    def write(name: str, image: sitk.Image) -> Path:
        sitk.WriteImage(image, str(folder / name))
        return folder / name

    zyx = np.ascontiguousarray(good.transpose(2, 1, 0))
    files = {
        "4d_real": write("4d_real.nii.gz", sitk.GetImageFromArray(np.stack([zyx, zyx]),
                                                                  isVector=False)),
        "4d_singleton": write("4d_singleton.nii.gz", sitk.GetImageFromArray(zyx[None],
                                                                            isVector=False)),
        "vector": write("vector.nii.gz", sitk.GetImageFromArray(np.stack([zyx] * 3, -1),
                                                                isVector=True)),
        "complex": write("complex.nii.gz", sitk.RealAndImaginaryToComplex(
            array_to_image(good), array_to_image(good))),
        "2d": write("2d.nii.gz", sitk.GetImageFromArray(zyx[0])),
        "wild_range": write("wild_range.nii.gz", array_to_image(good * 1e4 - 3e3)),
    }
    for name, value in (("nan", np.nan), ("inf", -np.inf)):
        bad = good.copy()
        bad[3, 4, 5] = value
        files[name] = write(f"{name}.nii.gz", array_to_image(bad))
    raw = write("plain.nii", array_to_image(good)).read_bytes()
    short = folder / "short_data.nii"  # the header claims more voxels than the file holds
    short.write_bytes(raw[: len(raw) - 400])
    files["short_data"] = short
    for name, offset, fmt, value in (("zero_axis", 46, "<h", 0), ("negative_spacing", 80, "<f", -1.0)):
        patched = bytearray(raw)  # NIfTI-1: dim[3] at byte 46, pixdim[1] at byte 80
        struct.pack_into(fmt, patched, offset, value)
        files[name] = folder / f"{name}.nii"
        files[name].write_bytes(bytes(patched))
    gz = write("whole.nii.gz", array_to_image(good)).read_bytes()
    files["truncated_gzip"] = folder / "truncated.nii.gz"
    files["truncated_gzip"].write_bytes(gz[: len(gz) // 2])
    files["empty_file"] = folder / "empty.nii.gz"
    files["empty_file"].write_bytes(b"")
    files["directory"] = folder / "a_folder.nii.gz"
    files["directory"].mkdir()
    odd = folder / "with spaces" / "sübjekt é 01.nii.gz"
    odd.parent.mkdir()
    files["odd_path"] = write(str(odd.relative_to(folder)), array_to_image(good))
    return files


def image_defects() -> dict[str, tuple[bool, str]]:
    """Each image defect of the corpus: (merely unusual?, regex of its warning or refusal),
    from tests/image_defects.toml (a table, kept as data)."""
    table = tomllib.loads((Path(__file__).parent / "image_defects.toml").read_text())
    return {name: (row["fine"], row["message"]) for name, row in table.items()}


@pytest.fixture(scope="session")
def malformed_cases(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BadCase]:
    """The malformed-input corpus: one CSV per defective NIfTI file and per unusual CSV form.

    Every CSV holds the same 6 training images of one center (a federated node's CSV too)
    with both labels, and Sex and Age (an inference CSV too); the defect is in row
    `CORPUS_ROW`.
    """
    folder = tmp_path_factory.mktemp("malformed")
    base = pd.read_csv(cohort["train"], dtype={"Subject": str, "Study": str}).head(6)
    base["Path"] = [str((Path(cohort["train"]).parent / p).resolve()) for p in base.Path]
    base["Study"] = "C01"
    base["Group_bin"] = [0, 1, 0, 1, 0, 1]
    subject = base.Subject[CORPUS_ROW]
    good = sitk.GetArrayFromImage(sitk.ReadImage(base.Path[CORPUS_ROW])).transpose(2, 1, 0)
    files = _nifti_defects(folder, good.astype(np.float32))
    cases: dict[str, BadCase] = {}
    for name, (fine, reason) in image_defects().items():
        table = base.copy()
        table.loc[CORPUS_ROW, "Path"] = str(files[name])
        csv = _write(table, folder / f"{name}.csv")
        if fine:
            message = reason
        elif name == "directory":  # the table check catches it: `row N (subject S): PATH ...`
            message = rf"{re.escape(str(csv))}: row 4 \(subject {subject}\): .*{reason}$"
        else:
            message = (rf"{re.escape(str(csv))}: row 4: {re.escape(str(files[name]))} "
                       rf"\(subject {subject}\): {reason}")
        cases[name] = BadCase(csv, message, name == "directory", fine)

    def text_case(name: str, text: str, message: str = "", fine: bool = True,
                  encoding: str = "utf-8") -> None:
        csv = folder / f"{name}.csv"
        csv.write_text(text, encoding=encoding)
        cases[name] = BadCase(csv, message.replace("CSV", re.escape(str(csv))), True, fine)

    plain = base.to_csv(index=False)
    text_case("bom", plain, encoding="utf-8-sig")
    text_case("semicolons", base.to_csv(index=False, sep=";"))
    padded = base.astype(str).map(lambda cell: f"{cell}  ")
    text_case("trailing_spaces", padded.to_csv(index=False))
    text_case("float_labels", base.assign(Group_bin=base.Group_bin.astype(float)).to_csv(index=False))
    empty = base.astype(object)
    empty.loc[CORPUS_ROW, "Group_bin"] = ""
    text_case("empty_cell", empty.to_csv(index=False),
              rf"CSV: row 4 \(subject {subject}\): empty Group_bin$", fine=False)
    twice = base.to_csv(index=False).splitlines()
    twice = [f"{line},{line.split(',')[3]}" for line in twice]  # Group_bin again at the end
    text_case("duplicate_columns", "\n".join(twice) + "\n",
              r"CSV: column\(s\) named more than once: Group_bin$", fine=False)
    return cases


# --- script runs -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def script_runs(cohort: dict, bad_cases: dict[str, BadCase],
                tmp_path_factory: pytest.TempPathFactory):
    """Every standard-script subprocess the tests check, submitted at once (module docstring)."""
    runs = ScriptRuns()
    outs = tmp_path_factory.mktemp("script_runs")
    train = Path(cohort["train"])
    # the successful runs first: they take longest
    runs.submit("from_root", ["-fn_train", str(train), "-cycles", "2", "--out",
                              str(outs / "from_root"), "--quiet"], ROOT, outs / "from_root")
    # inside the script's folder, with a relative CSV path whose rows hold relative Paths
    runs.submit("from_script_dir", ["-fn_train", os.path.relpath(train, SCRIPT_DIR),
                                    "-cycles", "1", "--out", str(outs / "from_script_dir"),
                                    "--quiet"],
                SCRIPT_DIR, outs / "from_script_dir", script=SCRIPT.name)
    for name in SUBPROCESS_BAD_CASES:
        out = outs / f"bad_{name}"
        runs.submit(f"bad:{name}", ["-fn_train", str(bad_cases[name].csv), "-cycles", "1",
                                    "--out", str(out), "--quiet"], ROOT, out)
    yield runs
    runs.close()


#: Session fixtures that take long to build: the tests using one run in one xdist worker.
SHARED_FIXTURES = ("federated_case", "pretrained_one", "script_runs")
#: Files that use a shared fixture but are a group of their own, so that two long groups run
#: at once: the worker that takes one builds its own copy of the fixture (federated_case: ~5 s;
#: test_federated_faults shares none of its cached single-machine runs with the others).
OWN_GROUP = ("test_federated_faults", "test_federated_confirmed")
#: The longest groups (pytest --durations, summed per group), started first; then the rest
#: in collection order.
LONGEST_FIRST = ("federated_case", "test_federated_faults", "test_demo", "pretrained_one",
                 "test_federated_confirmed",
                 "test_authors_models", "test_qc_criteria", "test_inference", "script_runs",
                 "test_bad_input")


def xdist_group(item: pytest.Item) -> str:
    """The group an item runs in under `--dist loadgroup` (module docstring)."""
    if item.path.stem in OWN_GROUP:
        return item.path.stem
    names = getattr(item, "fixturenames", ())
    return next((f for f in SHARED_FIXTURES if f in names), item.path.stem)


def pytest_itemcollected(item: pytest.Item) -> None:
    item.add_marker(pytest.mark.xdist_group(xdist_group(item)))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "jax: also run under KERAS_BACKEND=jax (make test's "
                            "second command: pytest -m jax)")
    config.addinivalue_line("markers", "decisions: asserts QC decisions of real models (make "
                            "test's third command runs these with TF_ENABLE_ONEDNN_OPTS=0: "
                            "other convolution rounding, to shake out float-fragile asserts)")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests that wait on script subprocesses last, and start those early; in an
    xdist worker, order the groups longest first instead (a worker starts the script runs
    when it comes to their group)."""
    if hasattr(config, "workerinput"):
        rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(xdist_group(item), len(rank)))
        return
    waits = [item for item in items if "script_runs" in getattr(item, "fixturenames", ())]
    if waits:
        rest = [item for item in items if item not in waits]
        items[:] = rest + waits
    config.stash[_WANTS_SCRIPTS] = bool(waits)


_WANTS_SCRIPTS = pytest.StashKey[bool]()


@pytest.fixture(scope="session", autouse=True)
def _start_script_runs_early(request: pytest.FixtureRequest) -> None:
    if request.config.stash.get(_WANTS_SCRIPTS, False):
        request.getfixturevalue("script_runs")


# --- federated runs ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def federated_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny pre-trained cohort whose center C04 turns harmful for QC (its labels flipped after
    pre-training, so its updates' training loss is far above the others'), the training CSV
    listed by center name (a federation's order), and the single-machine run (cached per
    cycles and extra flags)."""
    root = tmp_path_factory.mktemp("federated")
    pre = pretrained(root, cycles=3, epochs=2, centers=4, n_train=24, n_val=12, n_test=6,
                     downsample=8, seed=0, effect=0.9)
    train = pd.read_csv(pre["train"], dtype={"Subject": str}).sort_values("Study", kind="stable")
    train["Path"] = [str((Path(pre["train"]).parent / p).resolve()) for p in train.Path]
    train["Harmful"] = (train.Study == "C04").astype(int)  # ground truth only for scoring
    harmful = train.Harmful == 1  # the model learnt the true labels; QC gets them flipped
    train.loc[harmful, "Group_bin"] = 1 - train.loc[harmful, "Group_bin"]
    train_csv = root / "train_by_center.csv"
    train.to_csv(train_csv, index=False)
    common = ["-fn_train", str(train_csv), "-fn_test", str(pre["val"]), "-en",
              str(pre["encoder"]), "-pd", str(pre["classifier"]), "--start-cycle", "3",
              "-revisit", "1", "-fn_save", "qc", "--quiet"]

    @functools.lru_cache(maxsize=None)
    def single(cycles: int = 5, *flags: str) -> Path:
        """The single-machine script's own code path, with the same flags (and `flags`)."""
        out = root / "_".join([f"single_{cycles}", *(f.lstrip("-") for f in flags)])
        runpy.run_path(str(QC_SCRIPT))["main"]([*common, "-cycles", str(cycles), *flags,
                                                "--out", str(out)])
        return out

    return {"root": root, "common": common, "train": train, "single": single,
            "val": pd.read_csv(pre["val"], dtype={"Subject": str}),
            "val_dir": Path(pre["val"]).parent}

