"""The data contract: CSV tables of images and the NIfTI volumes they point to.

One row per image with `Subject`, `Study`, `Path`, `Group_bin` (1 = PD, 0 = HC), `Sex`, `Age`
and optionally `Harmful`. Every problem is raised as a `DQCError` whose message is one line
naming the file, the row/subject and what is wrong.
"""

from __future__ import annotations

import csv as csv_module
import gzip
import os
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import SimpleITK as sitk

from dqc.errors import DQCError, error_reason
from dqc.progress import progress

#: Columns each use needs (docs/method.md, "Data contract").
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
    table = _read_csv(csv)
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
    duplicated = table["Subject"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DQCError(f"{_where(csv, row, table.Subject.iloc[row])}: duplicate Subject")
    table["Group_bin"] = _binary_column(table, "Group_bin", csv)
    if "Harmful" in table.columns:
        table["Harmful"] = _binary_column(table.fillna({"Harmful": 0}), "Harmful", csv)
    if "Study" in table.columns:
        table["Study"] = table["Study"].astype(str)
    table["Path"] = [str(_resolve(csv, p, _where(csv, row, s)))
                     for row, (s, p) in enumerate(zip(table.Subject, table.Path))]
    if check_files:
        for row, (subject, path) in enumerate(zip(table.Subject, table.Path)):
            if Path(path).is_dir():
                raise DQCError(f"{_where(csv, row, subject)}: {path} is a folder, not an image "
                               "file")
            if not Path(path).is_file():
                raise DQCError(f"{_where(csv, row, subject)}: image file not found: {path}")
    table = table.reset_index(drop=True)
    table.attrs["csv"] = str(csv)  # image errors name the CSV row (see `row_source`)
    return table


def _read_csv(csv: Path) -> pd.DataFrame:
    """The table as the user meant it: a byte-order mark, `;` as the separator (a spreadsheet
    in a decimal-comma locale) and spaces around cells are accepted; a column named twice is
    refused (pandas would silently rename the second copy and use the first)."""
    try:
        with open(csv, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
        sep = ";" if first.count(";") > first.count(",") else ","
        header = next(csv_module.reader([first], delimiter=sep), [])
        names = [name.strip() for name in header]
        twice = sorted({n for n in names if names.count(n) > 1 and n})
        if twice:
            raise DQCError(f"{csv}: column(s) named more than once: {', '.join(twice)}")
        table = pd.read_csv(csv, sep=sep, encoding="utf-8-sig", dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError,
            csv_module.Error) as exc:
        raise DQCError(f"{csv}: not a readable CSV ({error_reason(exc, first_line=True)})"
                       ) from None
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty:
        return table
    table = table.apply(lambda column: column.str.strip())
    table = table.replace("", np.nan)  # an empty (or all-space) cell is a missing value
    return table.apply(_numeric_where_possible)


def _numeric_where_possible(column: pd.Series) -> pd.Series:
    """Columns other than the id and path ones as numbers when every filled cell is one
    (as pandas would have read them), so `Age` stays numeric for the metrics."""
    if column.name in ("Subject", "Study", "Path", "HarmfulType"):
        return column
    numbers = pd.to_numeric(column, errors="coerce")
    return numbers if numbers.notna().sum() == column.notna().sum() else column


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


def _resolve(csv: Path, path: str, where: str) -> Path:
    try:
        p = Path(str(path)).expanduser()
        resolved = p if p.is_absolute() else (csv.parent / p).resolve()
        resolved.is_file()  # a name the system refuses (too long, NUL byte) fails here
    except (OSError, ValueError, RuntimeError) as exc:
        raise DQCError(f"{where}: not a usable file path {str(path)[:80]!r} "
                       f"({type(exc).__name__})") from None
    return resolved


def require_both_classes(table: pd.DataFrame, csv_path: str | Path) -> None:
    """Raise when the labels are all one class (rates and AUROC are then undefined)."""
    classes = sorted(set(table["Group_bin"]))
    if len(classes) < 2:
        raise DQCError(f"{csv_path}: all {len(table)} images have Group_bin={classes[0]}; "
                       "both classes (0 = HC, 1 = PD) are needed")


# --- NIfTI volumes ---------------------------------------------------------------------------

#: Pixel types a model can take: real scalars (no complex, vector or label-map pixels).
REAL_PIXEL_TYPES = frozenset({sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
                              sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
                              sitk.sitkFloat32, sitk.sitkFloat64})


def image_label(path: str | Path, subject: object = None, source: str | None = None) -> str:
    """What an image message names: `CSV: row N: PATH (subject S)` (no CSV part when the
    image does not come from a table)."""
    who = f" (subject {subject})" if subject is not None else ""
    return f"{source}: {path}{who}" if source else f"{path}{who}"


def row_source(table: pd.DataFrame, index: object) -> str | None:
    """`CSV: row N` for a row of a `load_table` result (None for a table built otherwise)."""
    csv = table.attrs.get("csv")
    return f"{csv}: row {int(index) + 2}" if csv is not None else None  # type: ignore[arg-type]


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK prints multi-line warnings (e.g. for a negative spacing) on stderr; the check
    reports what matters in one line instead."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _header(path: str | Path, who: str) -> sitk.ImageFileReader:
    """A reader with the header read (no voxels yet); one-line errors for what is no image."""
    p = Path(path)
    if p.is_dir():
        raise DQCError(f"{who}: is a folder, not an image file")
    if p.is_file() and p.stat().st_size == 0:
        raise DQCError(f"{who}: empty file (0 bytes)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DQCError(f"{who}: cannot read image ({error_reason(exc, 'unreadable')})") from None
    return reader


def _meta(reader: sitk.ImageFileReader, key: str) -> str | None:
    return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None


def _check_header(reader: sitk.ImageFileReader, path: str | Path, who: str,
                  shape: tuple[int, ...] | None) -> tuple[int, int, int]:
    """The header half of the image check; the (x, y, z) size. A singleton 4th axis is
    squeezed with a warning (some tools write one); everything else a model cannot take is
    refused here, before any voxel is read."""
    size = tuple(int(n) for n in reader.GetSize())
    header_dims = int(float(_meta(reader, "dim[0]") or len(size)))
    if len(size) == 4 and size[3] == 1 or len(size) == 3 and header_dims == 4:
        warnings.warn(f"{who}: 4D image with a singleton 4th axis, read as 3D")
        size = size[:3]
    if len(size) == 4:
        raise DQCError(f"{who}: 4D image with {size[3]} volumes along its 4th axis (size "
                       f"{format_shape(size)}); expected one 3D volume")
    if len(size) != 3:
        raise DQCError(f"{who}: {len(size)}D image (size {format_shape(size)}); expected a "
                       "3D volume")
    pixel = reader.GetPixelID()
    kind = sitk.GetPixelIDValueAsString(pixel)
    if "complex" in kind:
        raise DQCError(f"{who}: complex pixels ({kind}); expected real scalar voxels")
    if reader.GetNumberOfComponents() != 1:
        raise DQCError(f"{who}: {reader.GetNumberOfComponents()} components per pixel "
                       f"({kind}); expected one scalar per voxel")
    if pixel not in REAL_PIXEL_TYPES:
        raise DQCError(f"{who}: pixel type {kind} is not a real number type")
    if min(size) < 2:
        raise DQCError(f"{who}: image size {format_shape(size)} has an axis of fewer than 2 "
                       "voxels (0 in the header is read as 1); expected a 3D volume")
    _check_shape(size, shape, who)
    _check_data_size(reader, path, who)
    if min(reader.GetSpacing()) <= 0:
        warnings.warn(f"{who}: non-positive voxel spacing {reader.GetSpacing()} in the header "
                      "(the voxels are used as they are)")
    return size  # type: ignore[return-value]


def _check_data_size(reader: sitk.ImageFileReader, path: str | Path, who: str) -> None:
    """A NIfTI file must hold the voxels its header describes: ITK reads a short file or a
    truncated gzip stream without complaint, padding the missing voxels."""
    offset, bits, dims = (_meta(reader, k) for k in ("vox_offset", "bitpix", "dim[0]"))
    name = str(path).lower()
    if offset is None or bits is None or dims is None or not name.endswith((".nii", ".nii.gz")):
        return
    try:
        voxels = int(np.prod([int(float(_meta(reader, f"dim[{i}]") or 1))
                              for i in range(1, int(float(dims)) + 1)]))
        need = int(float(offset)) + voxels * int(float(bits)) // 8
    except (ValueError, OverflowError):
        raise DQCError(f"{who}: corrupt header (its sizes are not numbers)") from None
    if name.endswith(".nii"):
        held = os.path.getsize(path)
    else:
        with open(path, "rb") as f:  # the gzip trailer holds the size mod 2**32: cheap
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == need % 2**32:
                return
        held = _gunzipped_size(path)  # unusual (several gzip members) or broken: decompress
        if held is None:
            raise DQCError(f"{who}: truncated or corrupt gzip stream")
    if held < need:
        raise DQCError(f"{who}: holds {held} bytes of header and voxels, its header describes "
                       f"{need} (truncated file?)")


def _gunzipped_size(path: str | Path) -> int | None:
    """Bytes a gzip file decompresses to, or None when its stream is broken."""
    size = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                size += len(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return size


def _check_finite(values: np.ndarray, size: tuple[int, ...], who: str) -> None:
    """Refuse NaN and infinite voxels: one reaching a training step poisons every later model.
    `values` in file order (x fastest), `size` the (x, y, z) size."""
    if not np.issubdtype(values.dtype, np.floating):
        return
    finite = np.isfinite(values)
    if not finite.all():
        first = int(np.flatnonzero(~finite.ravel())[0])
        x, y, z = (int(i) for i in np.unravel_index(first, size[:3], order="F"))
        raise DQCError(f"{who}: {int(finite.size - finite.sum())} voxel(s) are NaN or infinite "
                       f"(first at x={x}, y={y}, z={z})")


#: NIfTI float datatypes (header `datatype`) and their numpy types.
_NIFTI_FLOATS = {"16": "f4", "64": "f8"}


def _check_nifti_finite(reader: sitk.ImageFileReader, path: str | Path, who: str,
                        shape: tuple[int, ...]) -> None:
    """ITK's NIfTI reader turns NaN and infinite voxels into 0 without a word: look at the
    stored values of a float NIfTI file (8-bit and integer files cannot hold them)."""
    kind, offset = _meta(reader, "datatype"), _meta(reader, "vox_offset")
    if kind not in _NIFTI_FLOATS or offset is None:
        return
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error):
        raise DQCError(f"{who}: truncated or corrupt gzip stream") from None
    order = "<" if int.from_bytes(raw[:4], "little") in (348, 540) else ">"
    try:
        start = int(float(offset))
    except (ValueError, OverflowError):
        raise DQCError(f"{who}: corrupt header (vox_offset {offset!r})") from None
    if not 0 <= start <= len(raw):
        raise DQCError(f"{who}: its header puts the voxels at byte {start}, outside the "
                       f"{len(raw)} bytes of the image")
    size = (len(raw) - start) // int(_NIFTI_FLOATS[kind][1])
    voxels = min(int(np.prod(shape)), size)
    _check_finite(np.frombuffer(raw, order + _NIFTI_FLOATS[kind], count=voxels, offset=start),
                  shape, who)


def read_image(path: str | Path, subject: object = None,
               shape: tuple[int, ...] | None = None, source: str | None = None) -> sitk.Image:
    """The one image check: read an image that a model can take, or raise a one-line
    `DQCError` naming the file (and `source`, the CSV row) and what is wrong.

    The image has 3 spatial dimensions (a singleton 4th axis is dropped with a warning), one
    real scalar per voxel, the (x, y, z) `shape` when given, the voxels its header describes
    and only finite values. Every path that reads an image comes through here.
    """
    who = image_label(path, subject, source)
    reader = _header(path, who)
    size = _check_header(reader, path, who, shape)
    try:
        with _itk_warnings_off():
            image = reader.Execute()
    except RuntimeError as exc:
        raise DQCError(f"{who}: cannot read image ({error_reason(exc, 'unreadable')})") from None
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    _check_finite(sitk.GetArrayViewFromImage(image).ravel(), size, who)
    _check_nifti_finite(reader, path, who, size)
    return image


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
                shape: tuple[int, ...] | None = None, dtype=np.float32,
                source: str | None = None) -> np.ndarray:
    """Read a NIfTI volume as an (x, y, z, 1) array; check it against `shape` (x, y, z) if given."""
    array = image_to_array(read_image(path, subject, shape, source))
    return array.astype(dtype, copy=False)[..., None]


def native_array(image: sitk.Image) -> np.ndarray:
    """(x, y, z) voxels to keep in memory: 8-bit stays uint8 (4x smaller), else float32."""
    array = image_to_array(image)
    return array if image.GetPixelID() == sitk.sitkUInt8 else array.astype(np.float32, copy=False)


def checked_images(table: pd.DataFrame, shape: tuple[int, ...] | None, desc: str = "images",
                   verbose: bool = True) -> Iterator[tuple[str, sitk.Image]]:
    """(subject, image) for every row of a `load_table` result, each through `read_image`,
    with a progress bar: the whole table is checked before any training starts."""
    rows = list(zip(table.index, table.Subject, table.Path))
    for index, subject, path in progress(rows, desc=f"reading {desc}", disable=not verbose):
        yield subject, read_image(path, subject, shape, row_source(table, index))


def check_images(table: pd.DataFrame, shape: tuple[int, ...] | None = None,
                 desc: str = "images", verbose: bool = True) -> None:
    """Check every image of a table, for a path that reads only some of them (the harmful
    generator): a bad file in the CSV is refused before anything is written."""
    for _subject, _image in checked_images(table, shape, desc, verbose):
        pass


def check_shape(actual: tuple[int, ...], expected: tuple[int, ...] | None,
                path: str | Path, subject: object = None) -> None:
    """Raise a one-line error when a volume's (x, y, z) shape differs from the model's input."""
    _check_shape(actual, expected, image_label(path, subject))


def _check_shape(actual: tuple[int, ...], expected: tuple[int, ...] | None, who: str) -> None:
    if expected is not None and tuple(actual[:3]) != tuple(expected[:3]):
        raise DQCError(f"{who}: image shape {format_shape(actual[:3])} does not match the "
                       f"model input {format_shape(expected[:3])}")


def image_shape(path: str | Path, subject: object = None,
                source: str | None = None) -> tuple[int, int, int]:
    """The (x, y, z) size from the header only (the header half of `read_image`'s check)."""
    who = image_label(path, subject, source)
    return _check_header(_header(path, who), path, who, None)


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
