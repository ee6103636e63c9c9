"""Property-based: random corruptions of a valid CSV or NIfTI file give a result or a
one-line `DQCError`, never another exception (hundreds of cases, in process)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dqc.data import array_to_image, load_table, read_image
from dqc.errors import DQCError

SETTINGS = settings(max_examples=250, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def corrupt(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flips a byte, 1 inserts one, 2 cuts the rest."""
    out = bytearray(data)
    for kind, position, value in edits:
        i = position % (len(out) + 1)
        if kind == 0 and i < len(out):
            out[i] ^= value or 1
        elif kind == 1:
            out.insert(i, value)
        elif kind == 2:
            del out[i:]
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)),
                 min_size=1, max_size=6)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("properties")
    import SimpleITK as sitk

    values = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    for name in ("v.nii.gz", "v.nii"):
        sitk.WriteImage(array_to_image(values), str(folder / name))
    image = folder / "v.nii.gz"
    csv = ("Subject,Study,Path,Group_bin,Sex,Age\n"
           f"s1,A,{image},0,M,61.5\ns2,A,{image},1,F,70\ns3,B,v.nii.gz,1.0,F,\n")
    return {"csv": csv.encode(), "nii.gz": (folder / "v.nii.gz").read_bytes(),
            "nii": (folder / "v.nii").read_bytes(), "folder": str(folder).encode()}


@SETTINGS
@given(edits=EDITS, use=st.sampled_from(["train", "validation", "inference", "scenario"]))
def test_corrupted_csv_gives_a_table_or_one_line_error(files, tmp_path, edits, use):
    csv = Path(files["folder"].decode()) / "fuzz.csv"
    csv.write_bytes(corrupt(files["csv"], edits))
    try:
        table = load_table(csv, use)
    except DQCError as exc:
        assert "\n" not in str(exc) and str(csv) in str(exc)
        return
    assert set(table.Group_bin) <= {0, 1} and table.Subject.is_unique


@SETTINGS
@given(edits=EDITS, suffix=st.sampled_from(["nii.gz", "nii"]),
       inner=st.booleans())
def test_corrupted_nifti_gives_an_image_or_one_line_error(files, edits, suffix, inner):
    path = Path(files["folder"].decode()) / f"fuzz.{suffix}"
    data = files[suffix]
    if inner and suffix == "nii.gz":  # corrupt the NIfTI inside a valid gzip stream
        data = gzip.compress(corrupt(gzip.decompress(data), edits))
    else:
        data = corrupt(data, edits)
    path.write_bytes(data)
    try:
        image = read_image(path, "s", shape=(6, 7, 8))
    except DQCError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    assert image.GetSize() == (6, 7, 8) and image.GetNumberOfComponentsPerPixel() == 1
    assert not np.issubdtype(array.dtype, np.floating) or np.isfinite(array).all()
