"""Volumes in memory: each image is read from disk once, then served as float32 batches.

8-bit sources are kept as uint8 (4x smaller than float32) and converted per batch. When the
images do not fit the memory budget, they are read from disk per batch instead, the next
batch being read in a background thread while the current one trains.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import numpy as np
import pandas as pd

from dqc.data import checked_images, native_array, read_volume, row_source


class VolumeStore:
    """Subject id -> volume, for one table of images with a common (x, y, z) shape.

    cache: keep every volume in memory after one read (unless it exceeds `budget_mb`).
    With cache off, each `batch` call reads its images from disk (the authors' way).
    """

    def __init__(self, table: pd.DataFrame, shape: tuple[int, int, int], cache: bool = True,
                 budget_mb: float | None = None, desc: str = "images", verbose: bool = True):
        self.shape = tuple(shape)
        self.paths = dict(zip(table.Subject, table.Path))
        self.sources = {s: row_source(table, i) for i, s in zip(table.index, table.Subject)}
        self.labels = dict(zip(table.Subject, table.Group_bin.astype(np.float32)))
        self._arrays: dict[str, np.ndarray] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[tuple[str, ...], Future] = {}
        voxels = int(np.prod(self.shape))
        need_mb = len(self.paths) * voxels * 4 / 2**20  # worst case: float32 sources
        self.cached = cache and (budget_mb is None or need_mb <= budget_mb)
        # every image is read and checked now, cached or not: a bad file (or a NaN voxel)
        # fails before training starts, in one line naming its CSV row
        for subject, image in checked_images(table, self.shape, desc, verbose):
            if self.cached:
                self._arrays[subject] = native_array(image)

    def batch(self, subjects: Sequence[str]) -> np.ndarray:
        """A float32 (n, x, y, z, 1) batch of the given subjects."""
        key = tuple(subjects)
        if key in self._pending:
            return self._pending.pop(key).result()
        return self._load(key)

    def _load(self, subjects: Sequence[str]) -> np.ndarray:
        out = np.empty((len(subjects), *self.shape, 1), np.float32)
        for i, subject in enumerate(subjects):
            if self.cached:
                out[i, ..., 0] = self._arrays[subject]
            else:
                out[i] = read_volume(self.paths[subject], subject, self.shape,
                                     source=self.sources[subject])
        return out

    def stacked(self, subjects: Sequence[str]) -> np.ndarray:
        """All given cached volumes as one (n, x, y, z, 1) array in their stored type.

        8-bit sources stay uint8: a quarter of the float32 bytes to hold and to move to an
        accelerator, converted to float32 inside the compiled model.
        """
        arrays = [self._arrays[s] for s in subjects]
        dtype = np.uint8 if all(a.dtype == np.uint8 for a in arrays) else np.float32
        out = np.empty((len(arrays), *self.shape, 1), dtype)
        for i, a in enumerate(arrays):
            out[i, ..., 0] = a
        return out

    def prefetch(self, subjects: Sequence[str]) -> None:
        """Start reading a batch in the background (only useful when not cached)."""
        if self.cached:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1)
        key = tuple(subjects)
        self._pending.setdefault(key, self._pool.submit(self._load, key))

    def y(self, subjects: Sequence[str]) -> np.ndarray:
        return np.array([self.labels[s] for s in subjects], np.float32)

