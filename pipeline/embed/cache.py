"""A content-addressed store of embeddings, so a nightly run embeds only new or changed texts.

Why content hashes and not case ids: a re-processed case whose problem text did not change needs
no new vector, and two cases with the same text share one. The key covers the model identity and
the prompt, so switching models never serves stale vectors.

Layout: `<dir>/shard-*.npz`, each with sorted `keys` (32-byte sha256 digests) and `vecs`
(float32), stored uncompressed. New vectors go to a new shard written atomically. Neither the
keys nor the vectors are read whole: both members sit at fixed offsets, so the keys are mapped
from the file and the vectors read by row, and memory follows the texts asked for, not the size
of the cache (at a million cached texts the keys are 32 MB and the vectors 1.5 GB).

Shards are merged by size tier, as log-structured stores do: once `_TIER_FANIN` shards hold a
similar number of rows they become one, and a big shard is left alone until enough others of
its size exist. A back-fill's chunks then rewrite each vector a few times (once a tier), where
merging every shard into one rewrote the whole cache every `_TIER_FANIN` chunks.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_TIER_FANIN = 8  # shards of one tier merged at once; a tier spans this factor in rows
_BLOCK_ROWS = 4_096  # rows merged and written at a time: 6 MiB of 384-d vectors
_READ_ROWS = 1_024  # rows read at a time by a lookup: 1.5 MiB of 384-d vectors


def text_key(namespace: str, text: str) -> bytes:
    return hashlib.sha256(f"{namespace}\x00{text}".encode()).digest()


def _member(f, shard: Path, name: str) -> tuple[int, tuple[int, ...], np.dtype] | None:
    """(offset of the first data byte, shape, dtype) of member `name` of the open .npz `f`, or
    None when the member is compressed (not written by this class) and has no fixed offsets."""
    with zipfile.ZipFile(f) as zf:
        info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    f.seek(info.header_offset)
    local = f.read(30)  # the local file header; its name and extra field lengths end it
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    shape, fortran, dtype = npy_header(f)
    if fortran and len(shape) > 1:
        raise ValueError(f"{shard.name}: {name} is stored in Fortran order")
    return f.tell(), shape, dtype


def _read_keys(shard: Path) -> np.ndarray | None:
    """A shard's sorted keys, mapped from the file: the pages a lookup's binary search touches
    are the page cache's to keep or drop, so a long history of cached texts costs no heap."""
    try:
        with open(shard, "rb") as f:
            at = _member(f, shard, "keys.npy")
        if at is None:
            with np.load(shard) as z:
                return np.asarray(z["keys"])
        offset, shape, dtype = at
        if not shape[0]:
            return np.zeros(0, dtype="S32")
        return np.memmap(shard, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # a damaged shard only costs re-embedding, never a failed run


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy array `f` is positioned at, leaving `f` at its
    first data byte: an uncompressed member's rows can then be read at fixed offsets."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def vector_dim(shard: Path) -> int:
    """The width of a shard's vectors, from its `vecs` member's header alone."""
    with zipfile.ZipFile(shard) as zf, zf.open("vecs.npy") as f:
        return int(npy_header(f)[0][1])


def read_rows(shard: Path, rows: np.ndarray, into: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Vectors at `rows` (ascending) of a shard, read a window at a time from its `vecs` member,
    never the whole array: the member is stored uncompressed, so its rows sit at fixed offsets.

    `into=(out, at)` writes row `rows[i]` to `out[at[i]]` and returns `out`: a lookup of every
    stored case (a re-cluster at 1M: 1.5 GB of vectors) then holds them once, not also as a
    per-shard copy."""
    with open(shard, "rb") as f:
        at_ = _member(f, shard, "vecs.npy")
        if at_ is None:  # not written by this class: read it whole
            with np.load(shard) as z:
                got = np.asarray(z["vecs"][rows], dtype=np.float32)
            if into is None:
                return got
            into[0][into[1]] = got
            return into[0]
        start, shape, dtype = at_
        dim = int(shape[1])
        width = dim * dtype.itemsize
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
                    self.dim = vector_dim(shard)
                    vecs = np.empty((len(keys), self.dim), dtype=np.float32)
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
        self.compact(full=False)

    def compact(self, full: bool = True) -> None:
        """Merge shards: all of them (`full`), or, after an add, each tier that has filled up,
        the lowest first (a merge can fill the tier above). The old shards are removed only
        after the merged one exists."""
        while True:
            self._loaded = False
            self._load()
            group = list(self._shards) if full else _full_tier({p: len(k) for p, k in self._shards.items()})
            if len(group) < 2:
                return
            try:
                self._merge(group)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                # Another process merged (and removed) a shard of the group first, or one is
                # damaged: every shard is still readable, so the night goes on unmerged.
                return
            full = False

    def _merge(self, group: list[Path]) -> None:
        """One shard of `group`'s keys and vectors (a key in several keeps the first shard's
        vector), streamed a range of keys at a time: memory follows `_BLOCK_ROWS`, not the
        shards' size, even when a merge covers the whole cache."""
        keys = [self._shards[p] for p in group]
        dim = vector_dim(group[0])
        # Three passes over the mapped keys (count, keys, vectors): a zip member's header holds
        # its shape before its data, and the keys cost 32 bytes a row against 1.5 KiB of vector.
        total = sum(len(m) for m, _, _ in _merged_blocks(keys))
        name = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}-merged.npz"
        tmp = self.dir / f".{name}.tmp"
        try:
            self._write_merged(tmp, group, keys, dim, total)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.dir / name)
        for p in group:
            p.unlink(missing_ok=True)
        self._loaded = False  # another process may have added a shard meanwhile

    @staticmethod
    def _write_merged(tmp: Path, group: list[Path], keys: list[np.ndarray], dim: int, total: int) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("keys.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {"descr": "|S32", "fortran_order": False, "shape": (total,)})
                for merged, _, _ in _merged_blocks(keys):
                    f.write(merged.tobytes())
            with zf.open("vecs.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
                np.lib.format.write_array_header_2_0(f, {**header, "shape": (total, dim)})
                for merged, src, row in _merged_blocks(keys):
                    block = np.empty((len(merged), dim), dtype=np.float32)
                    for i in np.unique(src):  # a shard's rows ascend here: its keys are sorted
                        mine = np.flatnonzero(src == i)
                        read_rows(group[int(i)], row[mine], into=(block, mine))
                    f.write(block.tobytes())

    def __len__(self) -> int:
        """Distinct texts cached, counted a range of keys at a time."""
        self._load()
        return sum(len(m) for m, _, _ in _merged_blocks(list(self._shards.values())))


def _tier(rows: int) -> int:
    tier = 0
    while rows >= _TIER_FANIN:
        rows //= _TIER_FANIN
        tier += 1
    return tier


def _full_tier(sizes: dict[Path, int]) -> list[Path]:
    """The shards of the lowest tier holding `_TIER_FANIN` of them, with every smaller shard
    (so no small shard is stranded below a merge), in name order; [] when none is full."""
    tiers = {p: _tier(n) for p, n in sizes.items()}
    counts = np.bincount(list(tiers.values())) if tiers else np.zeros(0, np.int64)
    full = np.flatnonzero(counts >= _TIER_FANIN)
    if not len(full):
        return []
    return [p for p in sizes if tiers[p] <= full[0]]


def _merged_blocks(keys: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(sorted distinct keys, source shard, row in it) over the sorted key arrays `keys`, a
    range of keys at a time. The ranges are cut at every b-th key of each array, so no range
    holds more than b keys of one array: a block stays near `_BLOCK_ROWS` rows however large
    the arrays, and each array is read (mapped) one slice at a time."""
    if not keys:
        return
    b = max(1, _BLOCK_ROWS // len(keys))
    cuts = np.unique(np.concatenate([np.asarray(k[b::b]) for k in keys] + [np.zeros(0, "S32")]))
    edges = [np.r_[0, np.searchsorted(k, cuts), len(k)] for k in keys]  # per array: where each range starts
    for j in range(len(cuts) + 1):
        parts = [np.asarray(k[e[j] : e[j + 1]]) for k, e in zip(keys, edges)]
        allk = np.concatenate(parts)
        if not len(allk):
            continue
        src = np.concatenate([np.full(len(p), i, dtype=np.int32) for i, p in enumerate(parts)])
        row = np.concatenate([np.arange(e[j], e[j + 1], dtype=np.int64) for e in edges])
        merged, first = np.unique(allk, return_index=True)  # stable: a duplicate key keeps its first shard
        yield merged, src[first], row[first]
