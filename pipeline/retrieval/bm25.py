"""BM25 over the cases' tokens (bm25s), stored with each index version."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np


def _bm25s():
    import logging

    import bm25s

    # bm25s sets its own logger to DEBUG at import, so its "Building index" lines reach any
    # handler the process has (a piped run printed them); warnings still pass.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class Bm25:
    """BM25 (Lucene variant, bm25s) over pre-tokenised documents, one per metadata row.

    Stored with each index version, so a cold query process loads it in milliseconds instead
    of re-indexing every case (about 4 s per 100k cases on two cores).
    """

    def __init__(self, docs: Sequence[Sequence[str]], k1: float = 1.2, b: float = 0.75):
        bm25s = _bm25s()
        self.n = len(docs)
        self._r = bm25s.BM25(k1=k1, b=b)
        # bm25s rejects an empty corpus and empty docs score 0 anyway.
        self._r.index([list(d) if len(d) else [""] for d in docs] or [[""]], show_progress=False)

    def save(self, d: Path) -> None:
        self._r.save(str(d))

    @classmethod
    def load(cls, d: Path, n: int) -> Bm25:
        bm25s = _bm25s()
        self = cls.__new__(cls)
        self.n = n
        self._r = bm25s.BM25.load(str(d))
        return self

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        toks = [t for t in query_tokens if t in self._r.vocab_dict]
        if not toks or self.n == 0:
            return np.zeros(self.n, dtype=np.float32)
        return np.asarray(self._r.get_scores(toks), dtype=np.float32)[: self.n]


# -- incremental BM25: term statistics per segment, scored with the whole index's statistics ------

# bm25s's defaults (Lucene variant); the segmented scorer must give the same numbers.
K1 = 1.2
B = 0.75


class TermStats:
    """One segment's term frequencies: a term x document matrix in CSC-like parts (per term: the
    documents holding it and how often), each document's length, and the segment's vocabulary.

    Stored per segment and never rewritten, so adding cases costs only their own statistics; the
    corpus-wide numbers BM25 needs (N, document frequency, average length) are summed at query time
    over the live documents, which is what makes the scores equal to a bm25s index rebuilt over them.
    """

    FILES = ("tf_indptr.npy", "tf_docs.npy", "tf_counts.npy", "doclen.npy", "vocab.json")

    def __init__(self, vocab: list[str], indptr: np.ndarray, docs: np.ndarray, counts: np.ndarray, doclen: np.ndarray):
        self.vocab = vocab
        self.indptr, self.docs, self.counts, self.doclen = indptr, docs, counts, doclen
        self._term_of: dict[str, int] | None = None

    @classmethod
    def build(cls, token_lists: Sequence[Sequence[str]]) -> TermStats:
        """Count terms per document (pure). An empty document has length 1, as in bm25s, which
        indexes it as the single token "" (that keeps the average length, hence every score, equal)."""
        term_of: dict[str, int] = {}
        doc_ids: list[int] = []
        term_ids: list[int] = []
        tfs: list[int] = []
        doclen = np.empty(len(token_lists), dtype=np.int32)
        for d, toks in enumerate(token_lists):
            counts: dict[int, int] = {}
            for t in toks:
                i = term_of.setdefault(str(t), len(term_of))
                counts[i] = counts.get(i, 0) + 1
            doclen[d] = max(len(toks), 1)
            doc_ids.extend([d] * len(counts))
            term_ids.extend(counts)
            tfs.extend(counts.values())
        terms = np.asarray(term_ids, dtype=np.int64)
        order = np.argsort(terms, kind="stable")  # by term, documents ascending within a term
        indptr = np.zeros(len(term_of) + 1, dtype=np.int64)
        np.cumsum(np.bincount(terms, minlength=len(term_of)), out=indptr[1:])
        docs = np.asarray(doc_ids, dtype=np.int32)[order]
        tf = np.asarray(tfs, dtype=np.float32)[order]
        return cls(list(term_of), indptr, docs, tf, doclen)

    @classmethod
    def concat(cls, parts: Sequence[tuple[TermStats, np.ndarray]]) -> TermStats:
        """Merge segments' statistics, keeping only the documents (local positions) each part names."""
        term_of: dict[str, int] = {}
        all_terms, all_docs, all_tf, lens = [], [], [], []
        offset = 0
        for st, keep in parts:
            new_pos = np.full(len(st.doclen), -1, dtype=np.int64)
            new_pos[keep] = np.arange(offset, offset + len(keep))
            remap = np.array([term_of.setdefault(t, len(term_of)) for t in st.vocab], dtype=np.int64)
            per_term = np.diff(np.asarray(st.indptr))
            terms = np.repeat(remap, per_term)
            docs = new_pos[np.asarray(st.docs)]
            ok = docs >= 0
            all_terms.append(terms[ok])
            all_docs.append(docs[ok])
            all_tf.append(np.asarray(st.counts)[ok])
            lens.append(np.asarray(st.doclen)[keep])
            offset += len(keep)
        terms = np.concatenate(all_terms) if all_terms else np.zeros(0, np.int64)
        docs = np.concatenate(all_docs) if all_docs else np.zeros(0, np.int64)
        order = np.lexsort((docs, terms))
        indptr = np.zeros(len(term_of) + 1, dtype=np.int64)
        np.cumsum(np.bincount(terms, minlength=len(term_of)), out=indptr[1:])
        tf = np.concatenate(all_tf)[order] if all_tf else np.zeros(0, np.float32)
        doclen = np.concatenate(lens).astype(np.int32) if lens else np.zeros(0, np.int32)
        return cls(list(term_of), indptr, docs[order].astype(np.int32), tf.astype(np.float32), doclen)

    @classmethod
    def merge_into(
        cls,
        parts: Sequence[tuple[TermStats, np.ndarray]],
        d: Path,
        block: int = 1 << 18,
        drop: Callable[[], object] = lambda: None,
    ) -> list[str]:
        """Write what `concat(parts).save(d)` writes, a block of postings at a time; returns the
        file names.

        Why: `concat` holds every posting of the merged segments several times over (terms,
        documents, the sort order): merging a 129,000-case history rose 141 MiB there, growing
        with it. Here a first pass counts each term's live postings, which fixes where each one
        goes; the second places them straight into the mapped output files. Within a part the
        postings of one term are consecutive and ascending by document, and parts come in order,
        so this keeps `concat`'s order (by term, then document). `drop`, called before each
        block: lets go of the mapped pages read and written so far (`heap.drop_mapped_pages`),
        which would otherwise stay resident to the end, as many as the merged postings."""
        import json

        term_of: dict[str, int] = {}
        remaps = [np.array([term_of.setdefault(t, len(term_of)) for t in st.vocab], dtype=np.int64) for st, _ in parts]
        # Each part's documents' rows in the merge (-1: dead), which also says which are live.
        new_rows, offset = [], 0
        for st, keep in parts:
            rows = np.full(len(st.doclen), -1, dtype=np.int64)
            rows[keep] = np.arange(offset, offset + len(keep))
            new_rows.append(rows)
            offset += len(keep)
        df = np.zeros(len(term_of), dtype=np.int64)
        for (st, _), remap, new_pos in zip(parts, remaps, new_rows):
            for terms, docs, _ in cls._posting_blocks(st, block):
                drop()
                ok = new_pos[docs] >= 0
                df += np.bincount(remap[terms[ok]], minlength=len(df))
        indptr = np.zeros(len(df) + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])
        nnz = int(indptr[-1])
        out_docs = np.lib.format.open_memmap(d / cls.FILES[1], mode="w+", dtype=np.int32, shape=(nnz,))
        out_tf = np.lib.format.open_memmap(d / cls.FILES[2], mode="w+", dtype=np.float32, shape=(nnz,))
        fill = indptr[:-1].copy()  # each term's next free slot
        for (st, _), remap, new_pos in zip(parts, remaps, new_rows):
            for terms, docs, tf in cls._posting_blocks(st, block):
                drop()
                ok = new_pos[docs] >= 0
                g = remap[terms[ok]]
                if not len(g):
                    continue
                starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
                runs = np.diff(np.r_[starts, len(g)])
                pos = fill[g] + (np.arange(len(g)) - np.repeat(starts, runs))
                out_docs[pos] = new_pos[docs[ok]]
                out_tf[pos] = tf[ok]
                fill[g[starts]] += runs  # a part's terms are distinct, so each appears once here
        out_docs.flush()
        out_tf.flush()
        del out_docs, out_tf
        doclen = [np.asarray(st.doclen)[keep] for st, keep in parts]
        np.save(d / cls.FILES[0], indptr)
        np.save(d / cls.FILES[3], np.concatenate(doclen).astype(np.int32) if doclen else np.zeros(0, np.int32))
        (d / "vocab.json").write_text(json.dumps(list(term_of), ensure_ascii=False), "utf-8")
        return list(cls.FILES)

    @staticmethod
    def _posting_blocks(st: TermStats, block: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(local term, document, count) of `block` postings at a time, in stored order."""
        indptr = np.asarray(st.indptr)
        for a in range(0, int(indptr[-1]) if len(indptr) else 0, block):
            b = min(a + block, int(indptr[-1]))
            terms = np.searchsorted(indptr, np.arange(a, b), side="right") - 1
            yield terms, np.asarray(st.docs[a:b], dtype=np.int64), np.asarray(st.counts[a:b], dtype=np.float32)

    def term(self, token: str) -> int | None:
        if self._term_of is None:
            self._term_of = {t: i for i, t in enumerate(self.vocab)}
        return self._term_of.get(token)

    def save(self, d: Path) -> list[str]:
        """Write into `d`; returns the file names."""
        import json

        for name, arr in zip(self.FILES, (self.indptr, self.docs, self.counts, self.doclen)):
            np.save(d / name, np.asarray(arr))
        (d / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), "utf-8")
        return list(self.FILES)

    @classmethod
    def load(cls, d: Path) -> TermStats:
        """Read one segment's statistics; the arrays are mapped, so a query touches only the
        postings of its own tokens."""
        import json

        # Plain ndarray views of the maps (the map stays open through `.base`): slicing a
        # np.memmap runs Python-level bookkeeping per slice (2.5 us against 0.13 us here).
        arrs = [np.load(d / name, mmap_mode="r").view(np.ndarray) for name in cls.FILES[:4]]
        return cls(json.loads((d / "vocab.json").read_text("utf-8")), *arrs)


_MISSING = object()


class SegmentedBm25:
    """BM25 over several segments' `TermStats`, skipping dead documents.

    Statistics are over the LIVE documents (N, df and the average length leave out replaced and
    removed cases): then a query scores exactly as a bm25s index built over today's cases would,
    and a case replaced nightly does not inflate its terms' document frequency. The cost is a
    liveness lookup on the postings of the query's own tokens, which is small.

    `parts`: per segment its statistics and, per local document, its row in the scores (-1 = dead).
    """

    def __init__(self, parts: Sequence[tuple[TermStats, np.ndarray]], n: int, k1: float = K1, b: float = B):
        self.parts = list(parts)
        self.n, self.k1, self.b = n, k1, b
        total = sum(float(np.asarray(st.doclen)[rows >= 0].sum()) for st, rows in self.parts)
        self.avgdl = total / n if n else 1.0
        # Per segment, once per version: each document's length norm k1 * (1 - b + b * dl / avgdl)
        # (float64, as bm25s computes it), and whether its rows are one dead-free run (then a
        # posting's row is its local position plus an offset: no lookup, no mask).
        self._norm = [k1 * ((1 - b) + b * np.asarray(st.doclen, dtype=np.float64) / self.avgdl) for st, _ in self.parts]
        self._cache: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        self._used = 0
        self._lock = threading.Lock()
        self._scratch = threading.local()  # per thread: a zeroed float32 array of n (`sparse`)
        self._offset: list[int | None] = []
        for _, rows in self.parts:
            run = len(rows) > 0 and rows[0] >= 0 and bool(np.all(np.diff(rows) == 1))
            self._offset.append(int(rows[0]) if run else None)

    # Per-token results kept between queries, up to this many postings in all (~8 bytes each):
    # the costly tokens are the frequent ones, and those recur in agents' questions.
    CACHE_POSTINGS = 4_000_000

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        return self.sparse(query_tokens).dense()

    def sparse(self, query_tokens: Sequence[str]) -> SparseScores:
        """The scores of the rows sharing a token with the query (all others score 0), without a
        pass over every row: at 1M cases zeroing, scanning and selecting over the whole score
        array cost more than a light query's own postings. Summed token by token in float32 in a
        zeroed per-thread scratch array, exactly as the dense scores are, then put back to zero."""
        got = [g for g in (self._cached(t) for t in query_tokens) if g is not None]  # repeats count again
        if not got or self.n == 0:
            return SparseScores(self.n, np.zeros(0, np.int64), np.zeros(0, np.float32))
        buf = getattr(self._scratch, "buf", None)
        if buf is None or len(buf) != self.n:
            buf = self._scratch.buf = np.zeros(self.n, dtype=np.float32)
        self._scratch.buf = None  # taken: an exception below must not leave a dirty array behind
        for rows, s in got:
            buf[rows] += s  # a row holds a term once: no repeated indices within a token
        cand = _union([rows for rows, _ in got], self.n)
        vals = buf[cand]
        buf[cand] = 0
        self._scratch.buf = buf
        return SparseScores(self.n, cand, vals)

    def _cached(self, tok: str) -> tuple[np.ndarray, np.ndarray] | None:
        hit = self._cache.get(tok, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        got = self._term_scores(tok)
        size = 0 if got is None else len(got[0])
        with self._lock:  # `serve` scores from several threads
            while self._cache and self._used + size > self.CACHE_POSTINGS:
                old = self._cache.pop(next(iter(self._cache)))
                self._used -= 0 if old is None else len(old[0])
            if size <= self.CACHE_POSTINGS:
                self._cache[tok] = got
                self._used += size
        return got

    def _term_scores(self, tok: str) -> tuple[np.ndarray, np.ndarray] | None:
        rows_l, tf_l, norm_l = [], [], []
        for (st, row_of), norm, offset in zip(self.parts, self._norm, self._offset):
            t = st.term(tok)
            if t is None:
                continue
            s, e = int(st.indptr[t]), int(st.indptr[t + 1])
            docs = np.asarray(st.docs[s:e])
            tf = np.asarray(st.counts[s:e])
            if offset is not None:
                rows = docs + offset
            else:
                rows = row_of[docs]
                ok = rows >= 0
                rows, docs, tf = rows[ok], docs[ok], tf[ok]
            rows_l.append(rows.astype(np.int32))
            tf_l.append(tf)
            norm_l.append(norm[docs])
        if not rows_l:
            return None
        rows = rows_l[0] if len(rows_l) == 1 else np.concatenate(rows_l)
        df = len(rows)
        if df == 0:
            return None
        # Lucene BM25 as bm25s computes it: idf in float32, the term-frequency part in float64.
        idf = np.float32(np.log(1 + (self.n - df + 0.5) / (df + 0.5)))
        tf = tf_l[0] if len(tf_l) == 1 else np.concatenate(tf_l)
        norm = norm_l[0] if len(norm_l) == 1 else np.concatenate(norm_l)
        return rows, (idf * (tf / (norm + tf))).astype(np.float32)


def _union(parts: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Sorted distinct rows of several ascending row arrays: sorted when they are short, marked
    in a bitmap of n when they cover a good part of it (then the sort costs more than the scan)."""
    if len(parts) == 1:
        return np.asarray(parts[0], dtype=np.int64)
    total = sum(len(p) for p in parts)
    if total * 16 > n:
        mark = np.zeros(n, dtype=np.bool_)
        for p in parts:
            mark[p] = True
        return np.flatnonzero(mark)
    c = np.concatenate(parts).astype(np.int64)
    c.sort()
    return c[np.concatenate(([True], c[1:] != c[:-1]))] if len(c) else c


class SparseScores:
    """BM25 scores as the rows that score (ascending) and their scores; every other row of the n
    scores 0. Indexes by row like the dense array (`dense()` gives that array)."""

    def __init__(self, n: int, rows: np.ndarray, scores: np.ndarray):
        self.n, self.rows, self.scores = n, rows, scores

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int) -> np.float32:
        i = int(np.searchsorted(self.rows, row))
        return self.scores[i] if i < len(self.rows) and self.rows[i] == row else np.float32(0)

    def dense(self) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        out[self.rows] = self.scores
        return out


def best_rows(rows: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
    """The k rows with the highest values, best first; equal values by ascending row, so every
    path that scores the same rows returns the same list (argpartition alone leaves ties in any
    order)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if len(vals) > k:
        kth = np.partition(vals, len(vals) - k)[len(vals) - k]
        above = np.flatnonzero(vals > kth)
        tied = np.flatnonzero(vals == kth)[: k - len(above)]  # rows ascending: the lowest first
        idx = np.concatenate([above, tied])
    else:
        idx = np.arange(len(vals))
    order = np.lexsort((rows[idx], -vals[idx].astype(np.float64)))
    return np.asarray(rows[idx[order]], dtype=np.int64)
