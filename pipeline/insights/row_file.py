"""A matrix of float32 rows kept in an unnamed temporary file and read back a few rows at a time.

Why: a full re-cluster held every stored case's vector (1.5 KiB a case) through the whole
clustering, although after the map's PCA (which needs the matrix whole) each stage reads only
some rows at a time: a scope's PCA sample, a block to project, one cluster's rows, a block of
members. Spilled, the vectors sit in the page cache (which the kernel can drop and reread), and
the process holds only the rows a stage asked for. Gathered rows are a fresh C-ordered array of
the same values as `X[rows]` of the matrix in memory, so every product made of them is the same.
"""

from __future__ import annotations

import mmap
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

_WRITE_ROWS = 16_384  # rows written at a time (24 MiB of 384-d vectors)
_WINDOW_BYTES = 16 * 1024 * 1024  # file bytes a gather maps in before dropping them again


class RowFile:
    """`X[key]` of a spilled 2-D float matrix for an int, a slice or an array of row positions
    (any order, repeats allowed), as a new array; `len`, `shape`, `dtype` as the matrix had.
    Reading maps the file and drops each window of pages from this process once its rows are
    copied (`MADV_DONTNEED`; the page cache keeps them): mapped pages count in its RSS."""

    def __init__(self, X: np.ndarray, folder: Path | None = None):
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError("RowFile holds a 2-D matrix")
        self._fill((X[a : a + _WRITE_ROWS] for a in range(0, len(X), _WRITE_ROWS)), folder, X.shape[1], X.dtype)

    @classmethod
    def from_blocks(
        cls, blocks: Iterable[np.ndarray], folder: Path | None = None, width: int = 384, dtype: Any = np.float32
    ) -> RowFile:
        """The blocks' rows one after another, each written as it comes: the matrix is never
        whole in memory (a re-cluster embeds its cases a block at a time into one). `width` and
        `dtype` are the empty file's; a block of another width or type is refused."""
        self = cls.__new__(cls)
        self._fill(blocks, folder, width, np.dtype(dtype), strict=False)
        return self

    def _fill(
        self, blocks: Iterable[np.ndarray], folder: Path | None, width: int, dtype: Any, strict: bool = True
    ) -> None:
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder)  # unnamed: gone when closed or on a crash
        self._map: mmap.mmap | None = None
        n, seen = 0, strict
        try:
            for block in blocks:
                block = np.ascontiguousarray(block)
                if block.ndim == 2 and not seen and len(block):
                    width, dtype, seen = int(block.shape[1]), block.dtype, True
                if block.ndim != 2 or block.shape[1] != width or block.dtype != dtype:
                    raise ValueError(f"a {block.shape} block of {block.dtype} among {width}-wide {dtype} rows")
                self._file.write(block.data)
                n += len(block)
                # Let the block go before the next is made: the loop's name would otherwise hold
                # it through the next block's making (a re-cluster's cache lookup: two blocks of
                # 96 MiB at once, measured in a 120k run's export).
                del block
            self._file.flush()
        except BaseException:
            self._file.close()
            raise
        self.shape: tuple[int, int] = (n, int(width))
        self.dtype = np.dtype(dtype)
        self._width = self.shape[1] * self.dtype.itemsize
        if n and self._width:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> RowFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getitem__(self, key: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if int(key) < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(key)
            return self._gather(np.array([i], dtype=np.int64))[0]
        if isinstance(key, slice):
            return self._gather(np.arange(n, dtype=np.int64)[key])
        rows = np.asarray(key)
        if rows.dtype == bool:
            raise TypeError("RowFile takes row positions, not a mask")
        rows = rows.astype(np.int64, copy=False).reshape(-1)
        if len(rows) and (rows.min() < -n or rows.max() >= n):
            raise IndexError("row position out of range")
        return self._gather(np.where(rows < 0, rows + n, rows))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """The rows in the order asked, read in ascending order a window of the file at a time."""
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        if not len(rows) or self._map is None:
            return out
        order = np.argsort(rows, kind="stable")
        at = rows[order]
        per_window = max(1, _WINDOW_BYTES // self._width)
        window = at // per_window
        cuts = np.flatnonzero(np.diff(window)) + 1
        mat = np.frombuffer(self._map, dtype=self.dtype).reshape(self.shape)
        try:
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(at)]):
                out[order[lo:hi]] = mat[at[lo:hi]]
                self._drop(int(at[lo]), int(at[hi - 1]) + 1)
        finally:
            del mat  # the map cannot close while an array views it
        return out

    def _drop(self, first: int, end: int) -> None:
        """The mapped pages of rows first..end-1 out of this process (still in the page cache).
        Where the platform has no `madvise` (Windows) they stay mapped until the file is closed:
        no more than the matrix the file replaced."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = first * self._width // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, end * self._width - start)
