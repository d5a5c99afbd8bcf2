"""Where the library build keeps its pools' bulk while it runs: an unnamed temporary file.

Why: a group whose near-copies make its pick run short is deepened until its pool holds every
distinct text it has, so the pools grow with the history. Of a pooled case, most of what is kept
is its packed Candidate (930 bytes on average) and, once a pick reads it, its vector (1.5 KiB
at 384 dimensions): 27 and 37 MiB for a 129k-case history's 28,885 entries, held through the
build. Written here and read back by where they were written, they cost the process a handle
each; the texts, keys and order that selection compares stay in memory.

The file is made with `tempfile.TemporaryFile` (unlinked at once, so a killed build leaves
nothing behind) in the store's own folder: not in /tmp, which may be memory (tmpfs).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import numpy as np

_LENGTH_BITS = 32  # a handle is (offset << 32) | length: one int per record


class Spill:
    """Records appended to an unnamed temporary file and read back by their handle."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory, buffering=0)
        self._fd = self._file.fileno()
        self._end = 0

    def put(self, data: bytes) -> int:
        """Appends `data`; returns its handle for `get`."""
        n = len(data)
        if n >> _LENGTH_BITS:
            raise ValueError(f"a spilled record of {n} bytes is too long")
        at, view = self._end, memoryview(data)
        while view:  # pwrite may write less than asked (a signal, a full disk reports by raising)
            done = os.pwrite(self._fd, view, at)
            view, at = view[done:], at + done
        handle = self._end << _LENGTH_BITS | n
        self._end += n
        return handle

    def get(self, handle: int) -> bytes:
        at, n = handle >> _LENGTH_BITS, handle & ((1 << _LENGTH_BITS) - 1)
        data = os.pread(self._fd, n, at)
        if len(data) != n:
            raise OSError(f"the library's spill file ends before byte {at + n}")
        return data

    @property
    def size(self) -> int:
        """Bytes written so far (the file is never rewritten in place)."""
        return self._end

    def close(self) -> None:
        self._file.close()


class SpilledVectors(MutableMapping[str, np.ndarray]):
    """case id -> float32 vector, the vectors kept in a `Spill`: a dict's behaviour (what
    selection reads and updates), with an int a case in memory. A vector read back is a new
    read-only array, equal bit for bit to the one stored."""

    def __init__(self, spill: Spill):
        self._spill = spill
        self._at: dict[str, int] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        return np.frombuffer(self._spill.get(self._at[key]), dtype="<f4")

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self._at[key] = self._spill.put(np.ascontiguousarray(value, dtype="<f4").tobytes())

    def __delitem__(self, key: str) -> None:
        del self._at[key]  # its bytes stay in the file, which ends with the build

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, key: object) -> bool:
        return key in self._at
