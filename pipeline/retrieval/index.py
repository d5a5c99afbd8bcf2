"""The case index: FAISS vectors + the metadata table (`meta`) + BM25 (`bm25`), versioned on disk
and swapped atomically; `update` holds the entry points the flow and the CLI call.

Why this shape:
- FAISS holds only vectors and int64 ids; everything a query shows or filters on lives in a
  metadata Parquet next to it, so a query never scans the processed partitions.
- Exact search (`IndexFlatIP`) is fast enough up to a few hundred thousand vectors on two cores and
  has no recall loss; above `index.exact_max` an HNSW (or IVF) graph takes over.
- HNSW and IVF (with a direct map) cannot delete, so removed or replaced cases are tombstoned
  (their ids are excluded at search time) and the structure is rebuilt once the tombstones pass
  `index.max_tombstone_fraction`. In memory the flat index deletes for real.
- On disk a version is a manifest of segments (`segments`, format 2): a nightly update
  (`IndexStore.append`) writes only its cases' segment and hard-links the others, so its cost
  follows the new cases, not the history; a rebuild (`IndexStore.commit`) writes one segment.
  The new `v<N>/` is named in `CURRENT` by atomic rename. A reader opens whatever `CURRENT`
  names, so it sees the old or the new index, never a mixture; old versions are kept
  (`index.keep_versions`) so a reader that loaded a moment earlier still finds its files.
  Format 1 (one meta.parquet/index.faiss/bm25 per version) still loads until the next update.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import IndexConfig
from pipeline.io import atomic_write_json, atomic_write_text, sha256_file
from pipeline.retrieval import segments as sg
from pipeline.retrieval.bm25 import Bm25, SegmentedBm25, TermStats
from pipeline.retrieval.meta import (
    FILTER_FIELDS,
    META_COLUMNS,
    Filters,
    case_text,
    filter_mask,
    meta_from_cases,
    text_hash,
)

# Re-exported: callers that predate the split import these from here.
__all__ = [
    "BM25_DIR",
    "CURRENT",
    "FILTER_FIELDS",
    "INDEX_FILE",
    "META_COLUMNS",
    "META_FILE",
    "MANIFEST",
    "TOMB_FILE",
    "Bm25",
    "CaseIndex",
    "Filters",
    "IndexLoadError",
    "IndexStore",
    "case_text",
    "filter_mask",
    "meta_from_cases",
    "text_hash",
]

FORMAT = sg.FORMAT  # 2: segments (see `segments`); 1: one meta.parquet/index.faiss/bm25 per version
# Format 1's files, still read (an output root keeps its old version until the next update).
INDEX_FILE = "index.faiss"
META_FILE = "meta.parquet"
TOMB_FILE = sg.TOMB_FILE
BM25_DIR = "bm25"
MANIFEST = sg.MANIFEST
CURRENT = "CURRENT"
REBUILD_HINT = "rebuild it with `casemine index --rebuild`"


class IndexLoadError(RuntimeError):
    """The stored index is missing, corrupt or built for another model; the message says what to do."""


def read_manifest(d: Path, model: str | None) -> dict[str, Any]:
    """A version directory's manifest, refused when unreadable or built with another model."""
    try:
        man = json.loads((d / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise IndexLoadError(f"index manifest {d / MANIFEST} is unreadable ({e}); {REBUILD_HINT}") from None
    if model is not None and man.get("model") != model:
        raise IndexLoadError(
            f"the index at {d} was built with model {man.get('model')!r} but the config "
            f"uses {model!r}; vectors from different models cannot be compared: {REBUILD_HINT}"
        )
    return man


# -- the in-memory index ---------------------------------------------------------------------


class CaseIndex:
    """Vectors (FAISS, inner product over normalised vectors) plus metadata rows, one per case."""

    def __init__(self, dim: int, model: str, icfg: IndexConfig, *, backend: str = "torch"):
        self.dim = dim
        self.model = model
        self.backend = backend
        self.icfg = icfg
        self.kind = "flat"
        self.index = self._new_faiss("flat", None)
        self.meta = pd.DataFrame({c: pd.Series(dtype=object) for c in META_COLUMNS})
        self.meta["vid"] = self.meta["vid"].astype(np.int64)
        self.next_id = 0
        self.tombstones: set[int] = set()
        self.version: int | None = None
        self._bm25: Bm25 | SegmentedBm25 | None = None
        self._bm25_dir: Path | None = None  # format 1: the stored bm25s index
        self._bm25_parts: list[tuple[TermStats, np.ndarray]] | None = None  # format 2: per segment
        self._row_of: dict[str, int] | None = None

    # construction -------------------------------------------------------------------------
    def _new_faiss(self, kind: str, train: np.ndarray | None):
        import faiss

        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.icfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.icfg.hnsw_ef_construction
            inner.hnsw.efSearch = self.icfg.hnsw_ef_search
        elif kind in ("ivf", "ivfpq"):
            quant = faiss.IndexFlatIP(self.dim)
            nlist = max(1, min(self.icfg.ivf_nlist, (len(train) if train is not None else 1) // 39))
            if kind == "ivf":
                inner = faiss.IndexIVFFlat(quant, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                # Product quantisation: pq_m bytes per vector instead of 4 x dim, for collections
                # past memory; recall is lower, and vectors read back for rebuilds are approximate.
                inner = faiss.IndexIVFPQ(quant, self.dim, nlist, self.icfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            inner.train(np.ascontiguousarray(train, dtype=np.float32))
            inner.nprobe = self.icfg.nprobe
            inner.make_direct_map()  # so vectors can be read back for rebuilds and exact filtering
        else:
            raise ValueError(f"unknown index kind {kind}")
        self.kind = kind
        return faiss.IndexIDMap2(inner)

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _invalidate(self) -> None:
        self._bm25 = None
        self._bm25_dir = None
        self._bm25_parts = None
        self._row_of = None

    def bm25(self) -> Bm25 | SegmentedBm25:
        """BM25 over the metadata rows' tokens: from the version's stored statistics when loaded,
        else counted from the rows' tokens (the same scorer the query path uses)."""
        if self._bm25 is None:
            if self._bm25_parts is not None:
                self._bm25 = SegmentedBm25(self._bm25_parts, len(self))
            elif self._bm25_dir is not None:
                self._bm25 = Bm25.load(self._bm25_dir, len(self))
            else:
                stats = TermStats.build(self.meta["tokens"].tolist())
                self._bm25 = SegmentedBm25([(stats, np.arange(len(self), dtype=np.int64))], len(self))
        return self._bm25

    def row_of(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {cid: i for i, cid in enumerate(self.meta["case_id"])}
        return self._row_of

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(vids, vectors) of the live cases, read back from FAISS."""
        vids = self.meta["vid"].to_numpy(dtype=np.int64)
        if len(vids) == 0:
            return vids, np.zeros((0, self.dim), dtype=np.float32)
        return vids, self.index.reconstruct_batch(vids)

    # updates ------------------------------------------------------------------------------
    def update(self, meta_rows: pd.DataFrame, vectors: np.ndarray) -> dict[str, int]:
        """Add new cases and replace ones whose case_id is already indexed.

        Rows must have the `META_COLUMNS` (see `meta_from_cases`); vectors are L2-normalised.
        A case_id repeated within the batch keeps its last row.
        """
        if len(meta_rows) != len(vectors):
            raise ValueError(f"{len(meta_rows)} rows but {len(vectors)} vectors")
        if len(meta_rows) and vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have {vectors.shape[1]} dims, index has {self.dim}")
        meta_rows = meta_rows.reset_index(drop=True)
        last = ~meta_rows["case_id"].duplicated(keep="last").to_numpy()
        meta_rows, vectors = meta_rows[last].reset_index(drop=True), vectors[last]
        existing = self.row_of()
        replaced_ids = [cid for cid in meta_rows["case_id"] if cid in existing]
        if replaced_ids:
            self._drop(replaced_ids)
        n = len(meta_rows)
        vids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        meta_rows = meta_rows.copy()
        meta_rows["vid"] = vids
        if n:
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), vids)
            self.meta = pd.concat([self.meta, meta_rows], ignore_index=True) if len(self.meta) else meta_rows
        self._invalidate()
        self._maybe_restructure()
        return {"added": n - len(replaced_ids), "replaced": len(replaced_ids)}

    def remove(self, case_ids: Sequence[str]) -> int:
        """Remove cases by case_id; unknown ids are ignored. Returns how many were removed."""
        present = [c for c in case_ids if c in self.row_of()]
        if present:
            self._drop(present)
            self._invalidate()
            self._maybe_restructure()
        return len(present)

    def _drop(self, case_ids: Sequence[str]) -> None:
        mask = self.meta["case_id"].isin(set(case_ids)).to_numpy()
        vids = self.meta.loc[mask, "vid"].to_numpy(dtype=np.int64)
        if self.kind == "flat":
            self.index.remove_ids(vids)
        else:
            self.tombstones.update(int(v) for v in vids)
        self.meta = self.meta[~mask].reset_index(drop=True)
        self._row_of = None

    def _maybe_restructure(self) -> None:
        """Switch flat <-> approximate at `exact_max`, and compact tombstones past their limit."""
        want = "flat" if len(self) <= self.icfg.exact_max else self.icfg.approximate
        too_many_dead = self.ntotal and len(self.tombstones) > self.icfg.max_tombstone_fraction * self.ntotal
        if want != self.kind or too_many_dead:
            self.rebuild_structure(want)

    def rebuild_structure(self, kind: str | None = None) -> None:
        """Re-create the FAISS structure from the live vectors (no re-embedding)."""
        vids, vecs = self.all_vectors()
        self.index = self._new_faiss(kind or self.kind, vecs)
        if len(vids):
            self.index.add_with_ids(np.ascontiguousarray(vecs), vids)
        self.tombstones = set()

    # search -------------------------------------------------------------------------------
    def search_vectors(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, metadata row numbers) per query; -1 rows pad short results.

        `rows`: restrict to these metadata rows (a filter). For the exact index FAISS applies
        the restriction itself; for a graph index a narrow filter would starve the graph walk,
        so up to 50k allowed rows are scored exactly instead.
        """
        import faiss

        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        nq = len(q)
        if len(self) == 0 or k <= 0:
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        all_vids = self.meta["vid"].to_numpy(dtype=np.int64)
        if rows is not None:
            if len(rows) == 0:
                return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
            if self.kind != "flat" and len(rows) <= 50_000:
                vecs = self.index.reconstruct_batch(all_vids[rows])
                scores = q @ vecs.T
                kk = min(k, len(rows))
                top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
                s = np.take_along_axis(scores, top, axis=1)
                order = np.argsort(-s, axis=1)
                return np.take_along_axis(s, order, 1), rows[np.take_along_axis(top, order, 1)]
            sel = faiss.IDSelectorBatch(all_vids[rows])
        elif self.tombstones:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self.tombstones, dtype=np.int64)))
        else:
            sel = None
        kk = min(k, len(self) if rows is None else len(rows))
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.icfg.hnsw_ef_search, kk))
        elif self.kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self.icfg.nprobe)
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        D, I = self.index.search(q, kk, params=params)
        # vid -> metadata row
        order = np.argsort(all_vids)
        sorted_vids = all_vids[order]
        pos = np.searchsorted(sorted_vids, I.clip(min=0))
        pos = pos.clip(max=len(sorted_vids) - 1)
        ok = (I >= 0) & (sorted_vids[pos] == I)
        out_rows = np.where(ok, order[pos], -1)
        return sg.order_hits(np.where(ok, D, -np.inf).astype(np.float32), out_rows.astype(np.int64))

    # persistence --------------------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "dim": self.dim,
            "count": len(self),
            "ntotal": self.ntotal,
            "kind": self.kind,
            "next_id": self.next_id,
            "params": {"hnsw_m": self.icfg.hnsw_m, "ivf_nlist": self.icfg.ivf_nlist},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def meta_table(self) -> pa.Table:
        return _table(self.meta)

    def write_dir(self, d: Path) -> dict[str, Any]:
        """Write the whole index into `d` (a fresh directory) as one segment (format 2); return
        the manifest. The writer of a rebuild; nightly updates add a segment instead (`IndexStore.append`)."""
        import faiss

        d.mkdir(parents=True, exist_ok=True)
        seg = sg.segment_name(0)
        vids, vecs = self.all_vectors()
        files = sg.write_segment(d, seg, self.meta_table(), vecs, TermStats.build(self.meta["tokens"].tolist()))
        if self.kind != "flat":
            faiss.write_index(self.index, str(d / sg.GRAPH_FILE))
            files.append(sg.GRAPH_FILE)
        np.save(d / TOMB_FILE, np.array(sorted(self.tombstones), dtype=np.int64))
        files.append(TOMB_FILE)
        digests = {f: sha256_file(d / f) for f in files}
        sg.carry_verified(None, d, digests, digests)
        return {
            "format": FORMAT,
            **self._header(),
            "next_segment": 1,
            "segments": [{"name": seg, "rows": len(self)}],
            "files": digests,
        }

    def write_dir_v1(self, d: Path) -> dict[str, Any]:
        """Write format 1 (one FAISS file, one metadata table, a bm25s index): what every update
        wrote before segments. Kept for the compatibility test and as the benchmark's baseline."""
        import faiss

        d.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(d / INDEX_FILE))
        pq.write_table(self.meta_table(), d / META_FILE, compression="zstd")
        np.save(d / TOMB_FILE, np.array(sorted(self.tombstones), dtype=np.int64))
        (d / BM25_DIR).mkdir()
        Bm25(self.meta["tokens"].tolist()).save(d / BM25_DIR)
        files = [INDEX_FILE, META_FILE, TOMB_FILE] + sorted(f"{BM25_DIR}/{p.name}" for p in (d / BM25_DIR).iterdir())
        return {"format": 1, **self._header(), "files": {f: sha256_file(d / f) for f in files}}

    @classmethod
    def read_dir(cls, d: Path, icfg: IndexConfig, expect_model: str | None = None, verify: bool = True) -> CaseIndex:
        """Load a version directory, checking checksums and the model it was built with."""

        man = read_manifest(d, expect_model)
        if verify:
            for f, digest in man.get("files", {}).items():
                p = d / f
                try:
                    ok = sha256_file(p) == digest
                except OSError:  # missing, or pruned by a writer while we read (the caller retries)
                    raise IndexLoadError(f"index file {p} is missing; {REBUILD_HINT}") from None
                if not ok:
                    raise IndexLoadError(f"index file {p} is corrupt (checksum mismatch); {REBUILD_HINT}")
        try:
            idx = cls(int(man["dim"]), man["model"], icfg, backend=man.get("backend", "torch"))
            idx.kind = man["kind"]
            idx.next_id = int(man["next_id"])
            if int(man.get("format", 1)) >= 2:
                idx._read_segments(d, man)
            else:
                idx._read_v1(d)
        except IndexLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure means the same thing to a user
            raise IndexLoadError(f"index at {d} cannot be read ({type(e).__name__}: {e}); {REBUILD_HINT}") from None
        idx.version = man.get("version")
        idx.manifest = man  # type: ignore[attr-defined]
        return idx

    def _read_v1(self, d: Path) -> None:
        import faiss

        self.index = faiss.read_index(str(d / INDEX_FILE))
        self.meta = self._frame(pq.read_table(d / META_FILE))
        self.tombstones = set(int(x) for x in np.load(d / TOMB_FILE))
        if (d / BM25_DIR).is_dir():
            self._bm25_dir = d / BM25_DIR  # loaded on first BM25 query

    def _read_segments(self, d: Path, man: dict[str, Any]) -> None:
        import faiss

        tomb = sg.read_tombstones(d)
        tables, vecs, parts = [], [], []
        start = 0
        for s in man["segments"]:
            t, v, (stats, keep) = sg.read_segment(d, s["name"], tomb)
            tables.append(t)
            vecs.append(v)
            rows = np.full(len(stats.doclen), -1, dtype=np.int64)
            rows[keep] = np.arange(start, start + len(keep))
            start += len(keep)
            parts.append((stats, rows))
        self.meta = self._frame(pa.concat_tables(tables, promote_options="default")) if tables else self.meta
        vids = self.meta["vid"].to_numpy(dtype=np.int64)
        if self.kind == "flat":
            self.index = self._new_faiss("flat", None)
            if len(vids):
                self.index.add_with_ids(np.ascontiguousarray(np.concatenate(vecs)), vids)
        else:
            self.index = faiss.read_index(str(d / sg.GRAPH_FILE))
            self.tombstones = set(int(x) for x in tomb)
            # The vectors still waiting beside the graph (`IndexConfig.graph_pending_max`): in
            # memory this index is one structure, so they join it here.
            waiting = vids >= int(man.get("graph_upto", man["next_id"]))
            if waiting.any():
                self.index.add_with_ids(np.ascontiguousarray(np.concatenate(vecs)[waiting]), vids[waiting])
        self._bm25_parts = parts

    @staticmethod
    def _frame(t: pa.Table) -> pd.DataFrame:
        meta = t.to_pandas()
        for c in META_COLUMNS:  # versions written before a column was kept (outcome_evidence)
            if c not in meta.columns:
                meta[c] = None
        meta["tokens"] = meta["tokens"].map(lambda t: list(t) if t is not None else [])
        for c in META_COLUMNS:
            if c not in ("vid", "tokens"):  # plain objects with None, as `meta_from_cases` makes them
                meta[c] = pd.Series([_none_if_na(v) for v in meta[c]], index=meta.index, dtype=object)
        return meta[list(META_COLUMNS)]


# -- the on-disk store -----------------------------------------------------------------------

_VDIR = re.compile(r"^v(\d+)$")


class IndexStore:
    """Versioned index directories under `<out>/index/` with an atomically swapped `CURRENT`."""

    def __init__(self, root: Path, icfg: IndexConfig):
        self.root = Path(root)
        self.icfg = icfg

    def current_version(self) -> int | None:
        try:
            name = (self.root / CURRENT).read_text("utf-8").strip()
        except FileNotFoundError:
            return None
        m = _VDIR.match(name)
        return int(m.group(1)) if m else None

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _VDIR.match(p.name)) and p.is_dir())

    def exists(self) -> bool:
        return self.current_version() is not None

    def check_intact(self) -> None:
        """Refuse to go on when versions exist but `CURRENT` does not name one: an update would
        otherwise publish an index holding only the new cases and shrink history silently."""
        versions = self.versions()
        if versions and self.current_version() not in versions:
            raise IndexLoadError(
                f"{self.root / CURRENT} is missing or names no stored version, while "
                f"v{versions[0]}..v{versions[-1]} exist; nothing was changed. Rebuild it from the stored cases "
                "with `casemine index --rebuild`, then run again"
            )

    def load(self, expect_model: str | None = None, verify: bool = True) -> CaseIndex:
        """The live index.

        While loading, the reader holds a shared lock on the version's manifest; pruning skips
        locked versions, so files never vanish mid-load. If an update swapped and pruned the
        version between reading CURRENT and taking the lock, read CURRENT again.
        """
        for attempt in range(20):
            v = self.current_version()
            if v is None:
                raise IndexLoadError(f"no index under {self.root}; build it with `casemine index`")
            d = self.root / f"v{v}"
            try:
                fh = open(d / MANIFEST, "rb")
            except FileNotFoundError:
                if self.current_version() == v and attempt >= 3:
                    raise IndexLoadError(
                        f"{self.root / CURRENT} names v{v}, which is missing or has no manifest; {REBUILD_HINT}"
                    ) from None
                time.sleep(0.01)
                continue
            with fh:
                fcntl.flock(fh, fcntl.LOCK_SH)
                if not d.is_dir():  # pruned between open and lock
                    continue
                return CaseIndex.read_dir(d, self.icfg, expect_model, verify)
        raise IndexLoadError(f"index under {self.root} kept changing while loading; retry")

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Serialise writers (nightly flow, `casemine index`) across processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".write.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _next_version(self) -> int:
        return max(self.versions() + [self.current_version() or 0]) + 1

    def _tmp(self, v: int) -> Path:
        tmp = self.root / f".v{v}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        return tmp

    def _publish(self, tmp: Path, v: int, man: dict[str, Any]) -> None:
        """Name the finished directory `v<N>`, point CURRENT at it, prune old versions."""
        man["version"] = v
        atomic_write_json(tmp / MANIFEST, man)
        os.replace(tmp, self.root / f"v{v}")
        atomic_write_text(self.root / CURRENT, f"v{v}\n")
        self._prune(v)

    def commit(self, idx: CaseIndex) -> int:
        """Write all of `idx` as the next version (one segment), point CURRENT at it, prune old
        versions. Hold `writer()`. For a night's new cases `append` costs less."""
        v = self._next_version()
        tmp = self._tmp(v)
        man = idx.write_dir(tmp)
        self._publish(tmp, v, man)
        idx.version = v
        idx.manifest = man  # type: ignore[attr-defined]
        return v

    def append(
        self, rows: pd.DataFrame, vectors: np.ndarray, *, model: str, backend: str, dim: int
    ) -> tuple[int, dict[str, Any]]:
        """Add/replace cases as a new version that writes only their segment and links the rest.

        Hold `writer()`. Reads of the live version: its manifest, tombstones and the case_id/vid
        table of each segment (to tombstone replaced cases), and the approximate graph if there is
        one (it grows by `add_with_ids`). A live version in format 1 is loaded whole and
        rewritten once in format 2. Returns (version, summary with added/replaced/total/kind).
        """
        if len(rows) != len(vectors):
            raise ValueError(f"{len(rows)} rows but {len(vectors)} vectors")
        v_prev = self.current_version()
        prev = self.root / f"v{v_prev}" if v_prev is not None else None
        man = self._manifest(prev, model) if prev is not None else None
        if man is not None and int(man.get("format", 1)) < 2:
            idx = self.load(expect_model=model)
            counts = idx.update(rows, vectors) if len(rows) else {"added": 0, "replaced": 0}
            v = self.commit(idx)
            return v, {**counts, "total": len(idx), "kind": idx.kind, "written": ["all (format 1 converted)"]}
        rows = rows.reset_index(drop=True)
        last = ~rows["case_id"].duplicated(keep="last").to_numpy()
        rows, vectors = rows[last].reset_index(drop=True), np.asarray(vectors, dtype=np.float32)[last]
        if len(rows) and vectors.shape[1] != dim:
            raise ValueError(f"vectors have {vectors.shape[1]} dims, index has {dim}")
        v = self._next_version()
        tmp = self._tmp(v)
        tmp.mkdir(parents=True)
        try:
            man_new, counts = _grow(prev, man, tmp, rows, vectors, self.icfg, model=model, backend=backend, dim=dim)
            self._publish(tmp, v, man_new)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return v, counts

    def _manifest(self, d: Path, model: str | None) -> dict[str, Any]:
        return read_manifest(d, model)

    def _prune(self, current: int) -> None:
        keep = set(self.versions()[-self.icfg.keep_versions :]) | {current}
        for v in self.versions():
            if v in keep:
                continue
            d = self.root / f"v{v}"
            try:
                fh = open(d / MANIFEST, "rb")
            except FileNotFoundError:
                fh = None  # a broken leftover: nobody can be reading it
            try:
                if fh is not None:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a reader is loading it; a later commit prunes it
                trash = self.root / f".trash-v{v}-{os.getpid()}"
                os.replace(d, trash)
            finally:
                if fh is not None:
                    fh.close()
            shutil.rmtree(trash, ignore_errors=True)


def _none_if_na(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and v != v) else v


# -- growing a segmented version ----------------------------------------------------------------

_SCHEMA = pa.schema(
    [(c, pa.int64() if c == "vid" else pa.list_(pa.string()) if c == "tokens" else pa.string()) for c in META_COLUMNS]
)


def _table(meta: pd.DataFrame) -> pa.Table:
    """Metadata rows as Arrow with one fixed schema, so segments written apart always concatenate."""
    meta = meta[list(META_COLUMNS)].copy()
    meta["vid"] = meta["vid"].astype(np.int64)
    return pa.Table.from_pandas(meta, schema=_SCHEMA, preserve_index=False)


def _grow(
    prev: Path | None,
    man: dict[str, Any] | None,
    out: Path,
    rows: pd.DataFrame,
    vectors: np.ndarray,
    icfg: IndexConfig,
    *,
    model: str,
    backend: str,
    dim: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write into `out` the version after `prev` (None: the first) with `rows` added: the new
    segment, links to the unchanged ones, tombstones, and the graph if the index is approximate.
    Merges segments past `segments.MAX_SEGMENTS` or when dead rows pass `max_tombstone_fraction`;
    rebuilds the graph only when the kind changes or the graph's dead share passes that limit."""
    import faiss

    man = man or {"kind": "flat", "next_id": 0, "next_segment": 0, "segments": [], "files": {}, "count": 0}
    segs: list[dict[str, Any]] = [dict(s) for s in man["segments"]]
    kind = str(man["kind"])
    old_files: dict[str, str] = man.get("files", {})
    fail = lambda msg: IndexLoadError(f"{msg}; {REBUILD_HINT}")  # noqa: E731
    tomb = np.zeros(0, dtype=np.int64)
    seg_vids: list[np.ndarray] = []
    replaced = np.zeros(0, dtype=np.int64)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if prev is not None:
        small = [TOMB_FILE] + [f"{s['name']}/{sg.IDS_FILE}" for s in segs]
        sg.verify_files(prev, {f: old_files[f] for f in small}, fail)
        tomb = sg.read_tombstones(prev)
        new_ids = pa.array(rows["case_id"].tolist(), type=pa.string())
        for s in segs:
            vids, hit = sg.find_ids(prev, s["name"], new_ids)
            seg_vids.append(vids)
            replaced = np.concatenate([replaced, hit])
        # Replaced cases: their old live rows die; the new rows go into the new segment.
        replaced = np.setdiff1d(replaced, tomb)
    tomb = np.union1d(tomb, replaced)
    timings["read"] = time.perf_counter() - t0
    next_id = int(man["next_id"])
    n = len(rows)
    new_vids = np.arange(next_id, next_id + n, dtype=np.int64)
    count = int(man["count"]) - len(replaced) + n
    stored = sum(int(s["rows"]) for s in segs) + n
    want = "flat" if count <= icfg.exact_max else icfg.approximate
    # Vectors from vid `graph_upto` on are not in the graph yet (searched exactly beside it);
    # a manifest without it had every vector in the graph.
    graph_upto = int(man.get("graph_upto", next_id))
    waiting = n + sum(int((v >= graph_upto).sum()) for v in seg_vids)
    graph_n = int(man.get("ntotal", 0)) + waiting if kind != "flat" else stored
    too_dead = graph_n > 0 and len(tomb) > icfg.max_tombstone_fraction * graph_n

    src: dict[str, Path | None] = {s["name"]: prev for s in segs}
    next_seg = int(man["next_segment"])
    seg_new = sg.segment_name(next_seg)
    fresh: list[str] = []
    t0 = time.perf_counter()
    if n:
        table = _table(rows.assign(vid=new_vids))
        fresh = sg.write_segment(out, seg_new, table, vectors, TermStats.build(rows["tokens"].tolist()))
        segs.append({"name": seg_new, "rows": n})
        seg_vids.append(new_vids)
        src[seg_new] = out
        next_seg += 1

    timings["segment"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Compaction: all segments when too much is dead or the kind changes; else the newest tier.
    start = 0 if (too_dead or want != kind) and stored > n else sg.plan_merge([int(s["rows"]) for s in segs])
    if start is not None and len(segs) > start and (len(segs) - start >= 2 or too_dead):
        merged = sg.segment_name(next_seg)
        next_seg += 1
        m_files, m_rows = sg.merge_segments([(src[s["name"]], s["name"]) for s in segs[start:]], tomb, out, merged)
        if any(s["name"] == seg_new for s in segs[start:]):
            shutil.rmtree(out / seg_new)
            fresh = []
        fresh += m_files
        gone = np.concatenate(seg_vids[start:])
        segs = segs[:start] + [{"name": merged, "rows": m_rows}]
        seg_vids = seg_vids[:start] + [sg.segment_vids(out, merged)]  # in row order: the graph may need positions
        if kind == "flat" and want == "flat":
            tomb = np.setdiff1d(tomb, gone)  # those rows exist nowhere any more
        elif kind != "flat":
            tomb = np.setdiff1d(tomb, gone[gone >= graph_upto])  # nor do dead ones the graph never took in
    timings["merge"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    linked = [s["name"] for s in segs if src.get(s["name"]) is prev and prev is not None]
    for name in linked:
        for f in sg.segment_files(name):
            sg.link_or_copy(prev / f, out / f)  # type: ignore[operator]

    timings["link"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The vector search structure.
    if want == "flat":
        tomb = np.intersect1d(tomb, np.concatenate(seg_vids)) if seg_vids else tomb
        graph_n = sum(int(s["rows"]) for s in segs)
    elif kind == want and not too_dead:
        # The vectors not in the graph yet, live ones only (a dead one would only be filtered).
        pending = [(s["name"], np.flatnonzero((v >= graph_upto) & ~np.isin(v, tomb))) for s, v in zip(segs, seg_vids)]
        n_pending = sum(len(local) for _, local in pending)
        if n_pending <= icfg.graph_pending_max:
            # They wait, searched exactly: the graph is linked like an unchanged segment, not
            # read, rewritten and hashed (1.5-1.7 GB at 1M) for a night's few thousand vectors.
            sg.link_or_copy(prev / sg.GRAPH_FILE, out / sg.GRAPH_FILE)  # type: ignore[operator]
            graph_n = int(man.get("ntotal", 0))
        else:
            sg.verify_files(prev, {sg.GRAPH_FILE: old_files[sg.GRAPH_FILE]}, fail)  # type: ignore[arg-type]
            graph = faiss.read_index(str(prev / sg.GRAPH_FILE))  # type: ignore[operator]
            for (name, local), vids in zip(pending, seg_vids):
                if len(local):
                    vecs = sg.read_vectors(src.get(name) or out, name, local)
                    graph.add_with_ids(np.ascontiguousarray(vecs), vids[local])
            faiss.write_index(graph, str(out / sg.GRAPH_FILE))
            fresh.append(sg.GRAPH_FILE)
            graph_n = int(graph.ntotal)
            graph_upto = next_id + n
    else:  # first crossing of exact_max, or too many dead vectors in the graph: build it anew
        live_vecs = [sg.read_segment(out, s["name"], tomb)[1] for s in segs]
        live_vids = np.concatenate([np.setdiff1d(v, tomb) for v in seg_vids])
        x = np.ascontiguousarray(np.concatenate(live_vecs))
        builder = CaseIndex(dim, model, icfg, backend=backend)
        graph = builder._new_faiss(want, x)
        graph.add_with_ids(x, live_vids)
        faiss.write_index(graph, str(out / sg.GRAPH_FILE))
        fresh.append(sg.GRAPH_FILE)
        graph_n = int(graph.ntotal)
        graph_upto = next_id + n
        tomb = np.zeros(0, dtype=np.int64)
    np.save(out / TOMB_FILE, tomb.astype(np.int64))
    fresh.append(TOMB_FILE)

    timings["graph"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Checksums: hash what was written now; linked files keep the digests they had.
    digests = {f: sha256_file(out / f) for f in fresh}
    files = {f: digests.get(f) or old_files[f] for s in segs for f in sg.segment_files(s["name"])}
    files.update({f: digests[f] for f in fresh if "/" not in f})
    if want != "flat" and sg.GRAPH_FILE not in files:  # linked: it keeps the digest it had
        files[sg.GRAPH_FILE] = old_files[sg.GRAPH_FILE]
    sg.carry_verified(prev, out, files, digests)
    timings["hash"] = time.perf_counter() - t0
    new_man = {
        "format": FORMAT,
        "model": model,
        "backend": man.get("backend", backend),
        "dim": dim,
        "count": count,
        "ntotal": graph_n,
        "kind": want,
        "next_id": next_id + n,
        **({"graph_upto": graph_upto} if want != "flat" else {}),
        "next_segment": next_seg,
        "params": {"hnsw_m": icfg.hnsw_m, "ivf_nlist": icfg.ivf_nlist},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "segments": segs,
        "files": files,
    }
    added = n - len(replaced)
    return new_man, {
        "added": added,
        "replaced": len(replaced),
        "total": count,
        "kind": want,
        "segments": len(segs),
        "written": sorted({f.split("/")[0] for f in fresh}),
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
