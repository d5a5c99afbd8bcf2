"""Write a FAISS exact inner-product index file a block of vectors at a time.

Why: merging segments into one exact index through `IndexFlatIP.add` holds every merged vector
in memory, in a buffer that grows by doubling (each growth briefly holds the old and the new
buffer): merging a 129,000-case history rose 526 MiB of anonymous memory, the index step's peak, growing with the
history. Written straight to the file, a merge holds one block.

The file is FAISS's own serialisation of an `IndexFlatIP` (read back with `faiss.read_index`,
mapped or not): a header, then the vectors. The header is taken from FAISS itself (an empty
index's serialisation) with its two counts filled in at the end, and its layout is checked
against the one this module knows, so a FAISS that changed it fails loudly here.
"""

from __future__ import annotations

import struct
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

# IndexFlatIP's serialisation (faiss/impl/index_write.cpp): fourcc "IxFI", d (int32), ntotal
# (int64), two unused int64, is_trained (bool), metric (int32), then the code vector as its
# length in 4-byte words (uint64) followed by the floats.
_FOURCC = b"IxFI"
_NTOTAL = slice(8, 16)
_WORDS = slice(37, 45)
_HEADER_LEN = 45


def _empty_header(dim: int) -> bytearray:
    import faiss

    head = bytearray(faiss.serialize_index(faiss.IndexFlatIP(dim)).tobytes())
    if (
        len(head) != _HEADER_LEN
        or head[:4] != _FOURCC
        or struct.unpack("<i", head[4:8])[0] != dim
        or struct.unpack("<q", head[_NTOTAL])[0] != 0
        or struct.unpack("<Q", head[_WORDS])[0] != 0
    ):
        raise RuntimeError(
            f"faiss {getattr(faiss, '__version__', '?')} serialises IndexFlatIP differently from the layout "
            "pipeline/retrieval/flatfile.py writes; install the faiss-cpu version pinned in constraints.txt"
        )
    return head


class FlatFileWriter:
    """`with FlatFileWriter(path, dim) as w: w.add(block)...`: the file `faiss.write_index` would
    write for an `IndexFlatIP` holding the added rows in order. Nothing of a block is kept."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim = Path(path), int(dim)
        self.ntotal = 0
        self._head = _empty_header(self.dim)
        self._f: Any = None

    def __enter__(self) -> FlatFileWriter:
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
        self._f.write(self._head)
        return self

    def add(self, vectors: np.ndarray) -> None:
        v = np.ascontiguousarray(vectors, dtype="<f4")
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {v.shape}")
        if len(v):
            self._f.write(v.data)
            self.ntotal += len(v)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self._head[_NTOTAL] = struct.pack("<q", self.ntotal)
                self._head[_WORDS] = struct.pack("<Q", self.ntotal * self.dim)
                self._f.seek(0)
                self._f.write(self._head)
        finally:
            self._f.close()
