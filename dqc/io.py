"""Writing files, one way: every file the package writes goes through `atomic_write`.

A file is written under a hidden temporary name in its own folder (`.NAME.XXXXXXXX.SUFFIXES`,
the suffixes kept so that writers that choose the format by the name, SimpleITK and Keras,
see the right one) and renamed into place when complete: a reader, or a process killed
mid-write, never sees a half-written file under the final name. The temporary file is created
the way `open()` creates a file (mode 0o666 less the umask, applied by the system), so the
result has the usual permissions, not `tempfile.mkstemp`'s 0600.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dqc.errors import DQCError, error_reason

if TYPE_CHECKING:
    import pandas as pd
    import SimpleITK as sitk


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside `path` that ends in `path`'s suffixes (`.tmp` if none)."""
    suffix = "".join(path.suffixes) or ".tmp"
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create an empty temporary file for `path`, as `open(name, "w")` would; its mode."""
    for _ in range(100):
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, os.fstat(fd).st_mode & 0o7777
        finally:
            os.close(fd)
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place.

    A failed write (a full disk, a folder that is a file) leaves the old `path` as it was and
    no temporary file behind, and is raised as a one-line `DQCError` naming `path`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, mode = _create_temp(path)
        write(tmp)
        os.chmod(tmp, mode)  # in case the writer replaced the file rather than filling it
        os.replace(tmp, path)
    except OSError as exc:
        raise DQCError(f"{path}: cannot write ({exc.strerror or exc}); the previous version, "
                       "if any, is kept") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, data: Any, **dumps: Any) -> None:
    """`data` as JSON (indent 2 unless `dumps` says otherwise), ending in a newline."""
    write_text(path, json.dumps(data, **{"indent": 2, **dumps}) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """The table without its index, as `frame.to_csv(path, index=False)` writes it."""
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_npz(path: str | Path, arrays: dict[str, Any]) -> None:
    """Arrays in one uncompressed `.npz` (`np.savez` on the open file)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def write_model(path: str | Path, model: Any) -> None:
    """A Keras model in the format its name says (`.keras`; `.h5` is Keras 2's)."""
    atomic_write(path, model.save)


def write_image(path: str | Path, image: sitk.Image, compress: bool = False) -> Path:
    """A SimpleITK image in the format its name says (.nii, .nii.gz, ...).

    SimpleITK's own errors become one line: `PATH: cannot write image (REASON)`.
    """
    import SimpleITK as sitk

    path = Path(path)

    def write(tmp: Path) -> None:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            reason = error_reason(exc, "write failed")
            raise DQCError(f"{path}: cannot write image ({reason})") from None
    atomic_write(path, write)
    return path
