"""The index's on-disk layout, format 2: a version is a manifest naming segments.

Why segments: a nightly update adds a few thousand cases to a history of hundreds of thousands.
Each segment holds one batch of cases for good (their ids, metadata, vectors and BM25 term
statistics); a new version writes only the new segment plus small files (tombstones, manifest,
and the approximate graph when there is one) and HARD-LINKS the previous version's segment files,
so every version directory stays self-contained (readers lock one version; pruning removes a
directory, never a file another version still names) and nothing is rewritten or re-hashed.

Layout of `v<N>/`:
- `manifest.json`: format, model, kind, counts, `segments` (name, rows), `files` (sha256 each);
- `tombstones.npy`: vids no longer live (replaced or removed cases; for a graph index also the
  vectors the graph still holds for them);
- `graph.faiss`: the HNSW/IVF structure over all vectors (absent for exact search);
- `s<NNNNNN>/`: per segment `ids.parquet` (case_id, vid: all a writer needs to tombstone a
  replaced case), `meta.parquet` (the metadata columns incl. tokens, in small row groups so a
  query reads the shown text of its top hits only), `vectors.faiss` (an exact index over the
  segment's vectors, mapped by readers), and the BM25 `TermStats` files.

This module reads and writes that layout with pyarrow, numpy and FAISS only: the query path
(`pipeline.retrieval.search`) imports it and must not import pandas.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.retrieval.bm25 import TermStats

FORMAT = 2
MANIFEST = "manifest.json"
TOMB_FILE = "tombstones.npy"
GRAPH_FILE = "graph.faiss"
IDS_FILE = "ids.parquet"
SEG_META_FILE = "meta.parquet"
VECTORS_FILE = "vectors.faiss"
# Per version: the files found intact, with the size, mtime and inode they had then.
VERIFIED = ".verified.json"
# Rows per Parquet row group in a segment's metadata: a top hit's text costs one group's read.
ROW_GROUP = 2048
# Compaction: more segments than this and the newest are merged (see `plan_merge`).
MAX_SEGMENTS = 16
# A merge lets go of the mapped pages it has read (and written) after this many rows.
DROP_ROWS = 16_384


def segment_name(i: int) -> str:
    return f"s{i:06d}"


def segment_files(seg: str) -> list[str]:
    return [f"{seg}/{f}" for f in (IDS_FILE, SEG_META_FILE, VECTORS_FILE, *TermStats.FILES)]


# -- writing ---------------------------------------------------------------------------------


def write_segment(d: Path, seg: str, table: Any, vectors: np.ndarray, stats: TermStats) -> list[str]:
    """Write one segment under `d/seg/`: `table` is a pyarrow Table of the metadata columns with
    `vid` (tokens included), `vectors` its rows' unit vectors, `stats` its rows' BM25 term counts.
    Returns the files, relative to `d`."""
    import pyarrow.parquet as pq

    from pipeline.retrieval.flatfile import FlatFileWriter

    sd = d / seg
    sd.mkdir(parents=True)
    pq.write_table(table.select(["case_id", "vid"]), sd / IDS_FILE, compression="zstd")
    pq.write_table(table, sd / SEG_META_FILE, compression="zstd", row_group_size=ROW_GROUP)
    with FlatFileWriter(sd / VECTORS_FILE, int(vectors.shape[1])) as w:
        w.add(vectors)
    stats.save(sd)
    return segment_files(seg)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (same inode: no bytes written); copy across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_verified(prev: Path | None, new: Path, files: Mapping[str, str], fresh: Mapping[str, str]) -> None:
    """Record in `new/.verified.json` the files whose checksum is known good without reading them:
    ones the writer just hashed (`fresh`) and linked ones the previous version had verified
    (same inode, size and mtime), so the first cold query after an update does not re-hash history."""
    try:
        old = json.loads((prev / VERIFIED).read_text("utf-8")) if prev is not None else {}
    except (OSError, ValueError):
        old = {}
    old = old if isinstance(old, dict) else {}
    out: dict[str, list[Any]] = {}
    for name, digest in files.items():
        st = os.stat(new / name)
        rec = [digest, st.st_size, st.st_mtime_ns, st.st_ino]
        if name in fresh or old.get(name) == rec:
            out[name] = rec
    (new / VERIFIED).write_text(json.dumps(out), "utf-8")


# -- reading ---------------------------------------------------------------------------------


def verify_files(d: Path, files: Mapping[str, str], fail: Callable[[str], Exception]) -> None:
    """Check the manifest's checksums. A file verified before and unchanged since (same size, mtime
    and inode, recorded in `<version>/.verified.json`) is not hashed again: at 1M cases the vectors
    alone are 1.5 GB, seconds of sha256 on every cold query. Call under the version's lock;
    `fail(message)` makes the exception to raise."""
    try:
        known = json.loads((d / VERIFIED).read_text("utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    seen: dict[str, list[Any]] = {}
    for name, digest in files.items():
        try:
            st = os.stat(d / name)
        except OSError:
            raise fail(f"index file {d / name} is missing") from None
        seen[name] = [digest, st.st_size, st.st_mtime_ns, st.st_ino]
        if known.get(name) == seen[name]:
            continue
        try:
            ok = sha256_path(d / name) == digest
        except OSError:
            raise fail(f"index file {d / name} is missing") from None
        if not ok:
            raise fail(f"index file {d / name} is corrupt (checksum mismatch)")
    seen = {**known, **seen}  # a check of some files keeps the record of the others
    if seen != known:
        tmp = d / f".{VERIFIED}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(seen), "utf-8")
            os.replace(tmp, d / VERIFIED)
        except OSError:  # a read-only index: verify again next time
            tmp.unlink(missing_ok=True)


def sha256_path(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_tombstones(d: Path) -> np.ndarray:
    return np.load(d / TOMB_FILE).astype(np.int64)


def find_ids(d: Path, seg: str, case_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """(all vids of a segment, vids of its rows whose case_id is in `case_ids`, a pyarrow array).
    Vectorised in Arrow: a writer at 1M cases never builds a Python map of every case_id."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.ParquetFile(d / seg / IDS_FILE).read()
    vids = np.asarray(t.column("vid").to_numpy(), dtype=np.int64)
    mask = np.asarray(pc.is_in(t.column("case_id"), value_set=case_ids).to_numpy(zero_copy_only=False), dtype=bool)
    return vids, vids[mask]


def segment_vids(d: Path, seg: str) -> np.ndarray:
    """A segment's vids in row order."""
    import pyarrow.parquet as pq

    return int64s(pq.ParquetFile(d / seg / IDS_FILE).read(columns=["vid"]).column("vid"))


def int64s(col: Any) -> np.ndarray:
    """An Arrow int64 column as numpy without copying per value. Not `to_numpy`: pyarrow imports
    pandas for it (~0.3 s of a cold query), and not `to_pylist`: a million Python ints."""
    parts = []
    for c in col.chunks:
        if c.null_count:
            raise ValueError("an index id column holds nulls")
        parts.append(np.frombuffer(c.buffers()[1], dtype=np.int64)[c.offset : c.offset + len(c)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def live_rows(seg_vids: Sequence[np.ndarray], tombstones: np.ndarray) -> list[np.ndarray]:
    """Per segment, local position -> row among all live rows (segments in order), -1 if dead."""
    out = []
    start = 0
    for vids in seg_vids:
        live = alive(vids, tombstones)
        rows = np.full(len(vids), -1, dtype=np.int64)
        rows[live] = np.arange(start, start + int(live.sum()))
        start += int(live.sum())
        out.append(rows)
    return out


def alive(vids: np.ndarray, tombstones: np.ndarray) -> np.ndarray:
    """Which of these vids are live (not tombstoned), as a mask."""
    return ~np.isin(vids, tombstones) if len(tombstones) else np.ones(len(vids), dtype=bool)


def plan_merge(rows: Sequence[int], max_segments: int | None = None) -> int | None:
    """Where to start merging so the segment count stays bounded, or None (no merge needed).

    Merges the SHORTEST newest run of at least two segments that together hold no more rows than
    the segment before them (all of them when there is none): segments grow in tiers like a binary
    counter, a merge never costs more than its predecessor's size, and the big old segment is
    rewritten only once the new ones outgrow it."""
    if len(rows) <= (MAX_SEGMENTS if max_segments is None else max_segments):
        return None
    for i in range(len(rows) - 2, 0, -1):
        if sum(rows[i:]) <= rows[i - 1]:
            return i
    return 0


def read_segment(d: Path, seg: str, tombstones: np.ndarray) -> tuple[Any, np.ndarray, tuple[TermStats, np.ndarray]]:
    """One segment's live rows: (metadata Table, vectors, (term stats, live local positions))."""
    import faiss
    import pyarrow.parquet as pq

    t = pq.ParquetFile(d / seg / SEG_META_FILE).read()
    vids = np.asarray(t.column("vid").to_numpy(), dtype=np.int64)
    keep = np.flatnonzero(alive(vids, tombstones))
    flat = faiss.read_index(str(d / seg / VECTORS_FILE))
    vecs = flat.reconstruct_n(0, flat.ntotal) if flat.ntotal else np.zeros((0, flat.d), np.float32)
    if len(keep) < len(vids):
        t, vecs = t.take(keep), vecs[keep]
    return t, vecs, (TermStats.load(d / seg), keep)


def read_vectors(d: Path, seg: str, local: np.ndarray) -> np.ndarray:
    """Some rows' vectors (local positions) of one segment, read from its mapped exact index."""
    flat = mapped_vectors(d / seg)
    if not len(local):
        return np.zeros((0, flat.d), np.float32)
    return flat.reconstruct_batch(np.asarray(local, dtype=np.int64))


def merge_segments(
    parts: Sequence[tuple[Path | None, str]], tombstones: np.ndarray, dst: Path, seg: str
) -> tuple[list[str], int]:
    """Write the live rows of several segments (each `(version dir, name)`, in order) as one new
    segment `dst/seg`; returns its files and row count. Dead rows are dropped here for good.

    Streamed a block of rows at a time: metadata from the inputs' row groups into the Parquet
    writers, vectors from the inputs' mapped exact indexes into the new index's file
    (`FlatFileWriter`). The tier that merges a back-fill's whole history was the index step's
    peak and grew with it: 526 MiB over a 129,000-case history when the new exact index and each
    input segment were held whole.

    The pages of the inputs' mapped files it has read go every `DROP_ROWS` rows: kept, they
    were the merge's growth, since a back-fill's last tiers read half the history's vectors
    through one map (a merge of 196,000 rows held 183 MiB of mapped pages at its peak)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.heap import drop_mapped_pages
    from pipeline.retrieval.flatfile import FlatFileWriter

    for d, _ in parts:
        assert d is not None
    # The folders whose maps this merge reads or writes (real paths, as /proc/self/maps names them).
    mapped = sorted({os.path.realpath(d / s) for d, s in parts} | {os.path.realpath(dst / seg)})  # type: ignore[operator]
    # One schema for every part, as a concatenation would promote them: a part written when a
    # column was all null types it null.
    schema = pa.unify_schemas(
        [pq.read_schema(d / s / SEG_META_FILE) for d, s in parts],  # type: ignore[operator]
        promote_options="default",
    )
    dim = int(mapped_vectors(parts[0][0] / parts[0][1]).d)  # type: ignore[operator]
    sd = dst / seg
    sd.mkdir(parents=True)
    stats = []
    with (
        pq.ParquetWriter(sd / IDS_FILE, _ids_schema(schema), compression="zstd") as ids_w,
        pq.ParquetWriter(sd / SEG_META_FILE, schema, compression="zstd") as meta_w,
        FlatFileWriter(sd / VECTORS_FILE, dim) as vec_w,
    ):
        for d, s in parts:
            src = d / s  # type: ignore[operator]
            vids = segment_vids(d, s)  # type: ignore[arg-type]
            live = alive(vids, tombstones)
            flat = mapped_vectors(src)
            if int(flat.d) != dim:
                raise ValueError(f"segment {s} holds {flat.d}-dimensional vectors, the merge {dim}")
            at = dropped = 0
            pending: list[Any] = []
            # A row group at a time (`iter_batches` reads ahead: 40 MiB more), written out in
            # groups of ROW_GROUP rows so that groups thinned by dead rows do not stay thin.
            pf = pq.ParquetFile(src / SEG_META_FILE)
            for g in range(pf.num_row_groups):
                last = g == pf.num_row_groups - 1
                t = pf.read_row_group(g)
                n = t.num_rows
                keep = np.flatnonzero(live[at : at + n])
                if len(keep):
                    pending.append(_conform(t if len(keep) == n else t.take(keep), schema))
                    vec_w.add(flat.reconstruct_batch(keep + at))
                at += n
                del t
                if at - dropped >= DROP_ROWS:
                    drop_mapped_pages(mapped)
                    dropped = at
                if pending and (last or sum(p.num_rows for p in pending) >= ROW_GROUP):
                    pending = _write_groups(pending, ids_w, meta_w, last)
            if at != len(vids) or flat.ntotal != len(vids):
                raise ValueError(f"segment {s}: {at} metadata rows, {len(vids)} ids, {flat.ntotal} vectors")
            stats.append((TermStats.load(src), np.flatnonzero(live)))
            del flat
    TermStats.merge_into(stats, sd, drop=functools.partial(drop_mapped_pages, mapped, shared_writes=True))
    return segment_files(seg), vec_w.ntotal


def _write_groups(tables: list[Any], ids_w: Any, meta_w: Any, last: bool) -> list[Any]:
    """Write whole groups of ROW_GROUP rows from `tables` (all of them when `last`); returns
    what is left over, to go ahead of the next tables."""
    import pyarrow as pa

    t = pa.concat_tables(tables)
    cut = t.num_rows if last else t.num_rows - t.num_rows % ROW_GROUP
    head = t.slice(0, cut)
    ids_w.write_table(head.select(["case_id", "vid"]))
    meta_w.write_table(head, row_group_size=ROW_GROUP)
    return [t.slice(cut)] if cut < t.num_rows else []


def mapped_vectors(seg_dir: Path) -> Any:
    """A segment's exact index, mapped read-only: rows are read from the file as they are asked for."""
    import faiss

    return faiss.read_index(str(seg_dir / VECTORS_FILE), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)


def _ids_schema(schema: Any) -> Any:
    import pyarrow as pa

    return pa.schema([schema.field("case_id"), schema.field("vid")])


def _conform(t: Any, schema: Any) -> Any:
    """`t` with `schema`'s columns, in its order and types (nulls for a column it lacks)."""
    import pyarrow as pa

    cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def order_hits(D: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each query's hits by score, ties by row (padding last). FAISS orders equal scores by
    its heap, which differs between one index and several segments; rows do not."""
    if D.size == 0:
        return D, R
    key = np.where(R < 0, np.iinfo(np.int64).max, R)
    order = np.lexsort((key, -D), axis=1)
    return np.take_along_axis(D, order, 1), np.take_along_axis(R, order, 1)
