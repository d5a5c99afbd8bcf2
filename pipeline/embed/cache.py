"""A content-addressed store of embeddings, so a nightly run embeds only new or changed texts.

Why content hashes and not case ids: a re-processed case whose problem text did not change needs
no new vector, and two cases with the same text share one. The key covers the model identity and
the prompt, so switching models never serves stale vectors.

Layout: `<dir>/shard-*.npz`, each with sorted `keys` (32-byte sha256 digests) and `vecs`
(float32), stored uncompressed. New vectors go to a new shard written atomically; many small
shards are merged. Only the keys are held in memory (32 bytes a text); vectors are read from the
shards by row and merged block by block, so memory follows the texts asked for, not the size of
the cache (at a million cached texts the vectors alone are 1.5 GB).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

_MAX_SHARDS = 16
_BLOCK_ROWS = 16_384  # rows merged and written at a time: 24 MiB of 384-d vectors
_READ_ROWS = 1_024  # rows read at a time by a lookup: 1.5 MiB of 384-d vectors


def text_key(namespace: str, text: str) -> bytes:
    return hashlib.sha256(f"{namespace}\x00{text}".encode()).digest()


def _read_keys(shard: Path) -> np.ndarray | None:
    try:
        with np.load(shard) as z:
            return np.asarray(z["keys"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # a damaged shard only costs re-embedding, never a failed run


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy array `f` is positioned at, leaving `f` at its
    first data byte: an uncompressed member's rows can then be read at fixed offsets."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def read_rows(shard: Path, rows: np.ndarray, into: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Vectors at `rows` (ascending) of a shard, read a window at a time from its `vecs` member,
    never the whole array: the member is stored uncompressed, so its rows sit at fixed offsets.

    `into=(out, at)` writes row `rows[i]` to `out[at[i]]` and returns `out`: a lookup of every
    stored case (a re-cluster at 1M: 1.5 GB of vectors) then holds them once, not also as a
    per-shard copy."""
    with zipfile.ZipFile(shard) as zf:
        info = zf.getinfo("vecs.npy")
    if info.compress_type != zipfile.ZIP_STORED:  # not written by this class: read it whole
        with np.load(shard) as z:
            got = np.asarray(z["vecs"][rows], dtype=np.float32)
        if into is None:
            return got
        into[0][into[1]] = got
        return into[0]
    with open(shard, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header; its name and extra field lengths end it
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        shape, _, dtype = npy_header(f)
        dim = int(shape[1])
        width = dim * dtype.itemsize
        start = f.tell()
        out, at = into if into is not None else (np.empty((len(rows), dim), dtype=np.float32), np.arange(len(rows)))
        # One window's span of rows at a time, into one buffer: a lookup of a few rows spread
        # over a shard read whole 16,384-row spans (24 MiB, held twice while read: +48 MiB for
        # 200 rows of a 108k-row shard), which was the library build's peak over its pools.
        buf = np.empty((_READ_ROWS, dim), dtype=dtype)
        windows = rows // _READ_ROWS
        firsts = np.flatnonzero(np.r_[True, windows[1:] != windows[:-1]]) if len(rows) else np.zeros(0, np.int64)
        for s, e in zip(firsts.tolist(), np.r_[firsts[1:], len(rows)].tolist()):
            lo = int(windows[s]) * _READ_ROWS
            n = int(rows[e - 1]) + 1 - lo
            f.seek(start + lo * width)
            if f.readinto(buf[:n].data.cast("B")) != n * width:
                raise ValueError(f"{shard.name}: vectors end before row {lo + n}")
            # In slices: a window's rows can be asked for many times over (a repeated problem
            # text), and one fancy-indexed copy of them all was as big as the result.
            for p in range(s, e, _READ_ROWS):
                q = min(p + _READ_ROWS, e)
                out[at[p:q]] = buf[rows[p:q] - lo]
        return out


class EmbeddingCache:
    """Look up and store vectors by (namespace, text)."""

    def __init__(self, directory: Path, namespace: str, dim: int | None = None):
        self.dir = Path(directory)
        self.namespace = namespace
        self.dim = dim
        self._shards: dict[Path, np.ndarray] = {}  # readable shard -> its sorted keys
        self._loaded = False

    def _load(self) -> None:
        """The shards' keys (not their vectors); a shard already read keeps its keys."""
        if self._loaded:
            return
        shards: dict[Path, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.npz")):
            keys = self._shards.get(shard)
            if keys is None:
                keys = _read_keys(shard)
            if keys is not None and len(keys):
                shards[shard] = keys
        self._shards = shards
        self._loaded = True

    def lookup(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None, list[bytes]]:
        """(found mask, vectors for found rows in order, keys) for the given texts. A key in
        several shards (two runs embedded the same text) is served from the first that has it."""
        found, vecs, keys = self.lookup_rows(texts)
        if vecs is None or found.all():
            return found, vecs, keys
        return found, vecs[found], keys

    def lookup_rows(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None, list[bytes]]:
        """`lookup`, with the vectors as one array of a row per text (the found ones filled, the
        others uninitialised): the caller fills the rest in place instead of copying the found."""
        self._load()
        keys = [text_key(self.namespace, t) for t in texts]
        found = np.zeros(len(keys), dtype=bool)
        if not self._shards or not keys:
            return found, None, keys
        arr = np.array(keys, dtype="S32")
        vecs: np.ndarray | None = None
        for shard, skeys in self._shards.items():
            todo = np.flatnonzero(~found)
            if not len(todo):
                break
            pos = np.minimum(np.searchsorted(skeys, arr[todo]), len(skeys) - 1)
            hit = skeys[pos] == arr[todo]
            if not hit.any():
                continue
            rows, at = pos[hit], todo[hit]
            order = np.argsort(rows, kind="stable")
            try:
                if vecs is None:
                    with zipfile.ZipFile(shard) as zf, zf.open("vecs.npy") as f:
                        shape, _, _ = npy_header(f)
                    vecs = np.empty((len(keys), int(shape[1])), dtype=np.float32)
                    self.dim = int(shape[1])
                read_rows(shard, rows[order], into=(vecs, at[order]))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                continue
            found[at[order]] = True
        return found, vecs, keys

    def add(self, keys: list[bytes], vecs: np.ndarray) -> None:
        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        k = np.array(keys, dtype="S32")
        order = np.argsort(k)
        name = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, keys=k[order], vecs=np.asarray(vecs, dtype=np.float32)[order])
        os.replace(tmp, self.dir / name)
        self._loaded = False  # re-read lazily (only the new shard's keys) so lookups see it
        if len(list(self.dir.glob("shard-*.npz"))) > _MAX_SHARDS:
            self.compact()

    def compact(self) -> None:
        """Merge all shards into one, written block by block (the vectors never all in memory);
        the old ones are removed only after the merged one exists."""
        self._loaded = False
        self._load()
        shards = list(self._shards)
        if not shards:
            return
        src = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, k in enumerate(self._shards.values())])
        row = np.concatenate([np.arange(len(k), dtype=np.int64) for k in self._shards.values()])
        allk = np.concatenate(list(self._shards.values()))
        merged, first = np.unique(allk, return_index=True)  # sorted; a duplicate key keeps its first shard
        src, row = src[first], row[first]
        dim = read_rows(shards[0], np.zeros(1, dtype=np.int64)).shape[1]
        name = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}-merged.npz"
        tmp = self.dir / f".{name}.tmp"
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("keys.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, merged)
            with zf.open("vecs.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
                np.lib.format.write_array_header_2_0(f, {**header, "shape": (len(merged), dim)})
                for lo in range(0, len(merged), _BLOCK_ROWS):
                    s, r = src[lo : lo + _BLOCK_ROWS], row[lo : lo + _BLOCK_ROWS]
                    block = np.empty((len(s), dim), dtype=np.float32)
                    for i in np.unique(s):
                        mine = np.flatnonzero(s == i)
                        block[mine] = read_rows(shards[int(i)], r[mine])  # rows ascend: keys are sorted in a shard
                    f.write(block.tobytes())
        os.replace(tmp, self.dir / name)
        for s_ in sorted(self.dir.glob("shard-*.npz")):
            if s_ in self._shards:
                s_.unlink(missing_ok=True)
        self._shards = {self.dir / name: merged}
        self._loaded = False  # another process may have added a shard meanwhile

    def __len__(self) -> int:
        self._load()
        if not self._shards:
            return 0
        return len(np.unique(np.concatenate(list(self._shards.values()))))
