"""The data contract: CSV tables of images and the NIfTI volumes they point to.

One row per image with `Subject`, `Study`, `Path`, `Group_bin` (1 = PD, 0 = HC), `Sex`, `Age`
and optionally `Harmful`. Every problem is raised as a `DQCError` whose message is one line
naming the file, the row/subject and what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from dqc.errors import DQCError

#: Columns each use needs (ALGORITHM.md, "Data contract").
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "train": ("Subject", "Study", "Path", "Group_bin"),
    "validation": ("Subject", "Path", "Group_bin"),
    "inference": ("Subject", "Path", "Group_bin", "Sex", "Age"),
    "scenario": ("Subject", "Study", "Path", "Group_bin"),
}


def _where(csv: Path, row: int, subject: object = None) -> str:
    """`file: row N (subject S)` with N the line number in the file (header is line 1)."""
    who = f" (subject {subject})" if subject is not None else ""
    return f"{csv}: row {row + 2}{who}"


def load_table(csv_path: str | Path, use: str = "train", check_files: bool = True) -> pd.DataFrame:
    """Read and validate a data CSV for `use` (a key of `REQUIRED_COLUMNS`).

    Returns the table with `Subject` as string, `Group_bin` as int and `Path` resolved to an
    absolute path (relative paths resolve against the CSV's folder).
    """
    csv = Path(csv_path)
    if not csv.is_file():
        raise DQCError(f"{csv}: CSV file not found")
    try:
        table = pd.read_csv(csv, dtype={"Subject": str, "Study": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DQCError(f"{csv}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in REQUIRED_COLUMNS[use] if c not in table.columns]
    if missing:
        raise DQCError(f"{csv}: missing column(s) {', '.join(missing)} "
                       f"(needed: {', '.join(REQUIRED_COLUMNS[use])})")
    if table.empty:
        raise DQCError(f"{csv}: no rows")
    for column in REQUIRED_COLUMNS[use]:
        empty = table[column].isna()
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise DQCError(f"{_where(csv, row, table.Subject.iloc[row])}: empty {column}")
    table["Subject"] = table["Subject"].astype(str).str.strip()
    duplicated = table["Subject"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DQCError(f"{_where(csv, row, table.Subject.iloc[row])}: duplicate Subject")
    table["Group_bin"] = _binary_column(table, "Group_bin", csv)
    if "Harmful" in table.columns:
        table["Harmful"] = _binary_column(table.fillna({"Harmful": 0}), "Harmful", csv)
    if "Study" in table.columns:
        table["Study"] = table["Study"].astype(str)
    table["Path"] = [str(_resolve(csv, p)) for p in table["Path"]]
    if check_files:
        for row, (subject, path) in enumerate(zip(table.Subject, table.Path)):
            if not Path(path).is_file():
                raise DQCError(f"{_where(csv, row, subject)}: image file not found: {path}")
    return table.reset_index(drop=True)


def _binary_column(table: pd.DataFrame, column: str, csv: Path) -> pd.Series:
    values = pd.to_numeric(table[column], errors="coerce")
    bad = ~values.isin([0, 1])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        value = table[column].iloc[row]
        value = value.item() if isinstance(value, np.generic) else value  # 2, not np.int64(2)
        raise DQCError(f"{_where(csv, row, table.Subject.iloc[row])}: {column} must be 0 or 1, "
                       f"got {value!r}")
    return values.astype(int)


def _resolve(csv: Path, path: str) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else (csv.parent / p).resolve()


def require_both_classes(table: pd.DataFrame, csv_path: str | Path) -> None:
    """Raise when the labels are all one class (rates and AUROC are then undefined)."""
    classes = sorted(set(table["Group_bin"]))
    if len(classes) < 2:
        raise DQCError(f"{csv_path}: all {len(table)} images have Group_bin={classes[0]}; "
                       "both classes (0 = HC, 1 = PD) are needed")


# --- NIfTI volumes ---------------------------------------------------------------------------

def read_image(path: str | Path, subject: object = None) -> sitk.Image:
    """Read an image with SimpleITK, turning a read failure into a one-line `DQCError`."""
    who = f" (subject {subject})" if subject is not None else ""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unreadable"
        raise DQCError(f"{path}{who}: cannot read image ({reason})") from None


def image_to_array(image: sitk.Image) -> np.ndarray:
    """Voxels in (x, y, z) order, the order of `image.GetSize()`, without a channel axis."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def array_to_image(array: np.ndarray, like: sitk.Image | None = None) -> sitk.Image:
    """Inverse of `image_to_array`; copies spacing, origin and direction from `like`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    if like is not None:
        image.CopyInformation(like)
    return image


def read_volume(path: str | Path, subject: object = None,
                shape: tuple[int, ...] | None = None, dtype=np.float32) -> np.ndarray:
    """Read a NIfTI volume as an (x, y, z, 1) array; check it against `shape` (x, y, z) if given."""
    image = read_image(path, subject)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        who = f" (subject {subject})" if subject is not None else ""
        raise DQCError(f"{path}{who}: expected a 3D single-channel image, got "
                       f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} "
                       "component(s)")
    array = image_to_array(image)
    check_shape(array.shape, shape, path, subject)
    return array.astype(dtype, copy=False)[..., None]


def check_shape(actual: tuple[int, ...], expected: tuple[int, ...] | None,
                path: str | Path, subject: object = None) -> None:
    """Raise a one-line error when a volume's (x, y, z) shape differs from the model's input."""
    if expected is not None and tuple(actual[:3]) != tuple(expected[:3]):
        who = f" (subject {subject})" if subject is not None else ""
        raise DQCError(f"{path}{who}: image shape {format_shape(actual[:3])} does not match the "
                       f"model input {format_shape(expected[:3])}")


def image_shape(path: str | Path, subject: object = None) -> tuple[int, int, int]:
    """The (x, y, z) size from the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        read_image(path, subject)  # raises the one-line error
    return tuple(int(s) for s in reader.GetSize())  # type: ignore[return-value]


def format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def parse_shape(text: str) -> tuple[int, int, int]:
    """'40x48x40' -> (40, 48, 40)."""
    try:
        dims = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise DQCError(f"--image-shape: expected three integers like 40x48x40, got {text!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise DQCError(f"--image-shape: expected three positive integers like 40x48x40, got {text!r}")
    return dims  # type: ignore[return-value]
