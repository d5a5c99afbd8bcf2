"""What a stored index reads per query: each row group once for all the fields a query shows (and
kept while the cache allows), problem texts and case ids only for near-duplicate pairs, no sort of
every vid when the vids are already in order, BM25 scores of the matching rows only (the same
numbers and the same selection as an array of every row); and the answers equal the in-memory
index's."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import Config
from pipeline.embed.fake import HashingEmbedder
from pipeline.retrieval import search
from pipeline.retrieval import segments as sg
from pipeline.retrieval.bm25 import SegmentedBm25, TermStats, _union, best_rows
from pipeline.retrieval.index import IndexStore, meta_from_cases
from pipeline.retrieval.search import DISPLAY_FIELDS, Hit, Searcher, StoredIndex
from test_index import CASES, make_cases, vecs_for  # noqa: E402  (same folder, on sys.path under pytest)
from test_index_segments import MORE, _append, _hits  # noqa: E402


@pytest.fixture
def two_segments(tmp_path, monkeypatch):
    """A stored index of two segments whose metadata is cut into row groups of 2 rows."""
    monkeypatch.setattr(sg, "ROW_GROUP", 2)
    cfg = Config()
    store = IndexStore(tmp_path / "index", cfg.index)
    _append(store, CASES)
    _append(store, MORE)
    return cfg, store, tmp_path / "index"


@pytest.fixture
def reads(monkeypatch):
    """Every Parquet row-group read as (file, group, columns)."""
    got: list[tuple[str, int, tuple[str, ...]]] = []
    real = pq.ParquetFile.read_row_group

    def counting(self, i, columns=None, **kw):
        got.append((str(self.metadata), i, tuple(columns or ())))
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    return got


def test_columns_read_each_row_group_once_for_all_fields(two_segments, reads):
    cfg, store, root = two_segments
    light = StoredIndex.load(root, cfg.index, None)
    heavy = store.load()
    rows = list(range(len(light)))[::-1]  # every row, out of order: 3 + 2 groups of 2 rows or fewer
    names = (*DISPLAY_FIELDS, "outcome_evidence", "text_hash")
    got = light.columns(names, rows)
    assert len(reads) == sum(f.num_row_groups for f in light._files) == 5
    assert all(set(cols) == set(names) - {"outcome_evidence"} or set(cols) == set(names) for _, _, cols in reads)
    by_id = {rec["case_id"]: rec for rec in heavy.meta.to_dict("records")}
    for i, r in enumerate(rows):
        cid = got["case_id"][i]
        for n in names:
            want = by_id[cid].get(n)
            assert got[n][i] == (None if want is None or want != want else want), (cid, n)
        assert light.column("problem", [r]) == [got["problem"][i]]
    reads.clear()
    assert light.columns(("problem", "case_id"), rows) == {n: got[n] for n in ("problem", "case_id")}
    assert reads == []  # kept from the first read


def test_group_cache_stays_under_its_byte_budget(two_segments, reads, monkeypatch):
    cfg, _, root = two_segments
    light = StoredIndex.load(root, cfg.index, None)
    monkeypatch.setattr(type(light), "GROUP_CACHE_BYTES", 1)
    rows = list(range(len(light)))
    first = light.columns(("problem", "case_id"), rows)
    assert len(light._groups) == 1  # only the newest group is kept
    assert light.columns(("problem", "case_id"), rows) == first
    assert len(reads) == 10  # 5 groups, read again each time: answers stay right, memory bounded


def test_collapse_reads_texts_and_ids_only_for_near_pairs():
    asked: list[str] = []

    class View:
        def column(self, name, rows):
            asked.append(name)
            return [f"{name}-{r}" for r in rows]

    hits = [Hit(r, 1.0 / (r + 1)) for r in range(4)]
    vecs = np.eye(4, dtype=np.float32)
    vecs[1] = vecs[0]  # hits 0 and 1: the same vector; their texts decide
    lazy = [search._LazyColumn(View(), n, range(4)) for n in ("problem", "case_id")]
    kept = search.collapse_duplicates(hits, vecs, lazy[0], [None] * 4, lazy[1])
    assert [h.row for h in kept] == [0, 2, 3]  # "problem-0" vs "problem-1": 8 of 9 characters alike
    assert kept[0].duplicates == ["case_id-1"]
    assert asked == ["problem", "problem", "case_id"]  # rows 1 and 0 only, then the collapsed id


def test_vid_order_skips_the_sort_for_ordered_vids():
    ordered = np.array([3, 5, 9, 12], dtype=np.int64)
    order, sorted_vids = search._vid_order(ordered)
    assert order.tolist() == [0, 1, 2, 3] and sorted_vids.tolist() == ordered.tolist()
    mixed = np.array([9, 3, 12, 5], dtype=np.int64)
    order, sorted_vids = search._vid_order(mixed)
    assert sorted_vids.tolist() == [3, 5, 9, 12] and mixed[order].tolist() == [3, 5, 9, 12]


def test_answers_equal_the_in_memory_index(two_segments):
    cfg, store, root = two_segments
    light = StoredIndex.load(root, cfg.index, None)
    assert _hits(cfg, light) == _hits(cfg, store.load())
    # near-duplicates (same text twice) collapse the same way through the lazy columns
    twin = [("c9", CASES[0][1], *CASES[0][2:])]
    meta = meta_from_cases(make_cases(twin), False, cut=list)
    with store.writer():
        store.append(meta, vecs_for(meta), model="hashing-test", backend="torch", dim=384)
    light = StoredIndex.load(root, cfg.index, None)
    got = Searcher(cfg, light, HashingEmbedder(), cut=list).query([CASES[0][1]], 3, None, "dense")[0].hits
    assert got[0].duplicates in (["c9"], ["c1"]) and _hits(cfg, light) == _hits(cfg, store.load())


def _dense_reference(seg: SegmentedBm25, tokens: list[str]) -> np.ndarray:
    """The scores as they were summed before sparse scoring: an array of every row, token by token."""
    out = np.zeros(seg.n, dtype=np.float32)
    for tok in tokens:
        got = seg._cached(tok)
        if got is not None:
            out[got[0]] += got[1]
    return out


# (61, 40): postings cover much of the rows, their union is marked; (5000, 4000): it is sorted
@pytest.mark.parametrize(("n_docs", "n_words"), [(61, 40), (5000, 4000)])
def test_sparse_bm25_equals_the_dense_scores_and_selection(n_docs, n_words):
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(n_words)]
    docs = [list(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(n_docs)]
    docs[7].append("rare")
    rows_a = np.arange(30)
    rows_b = np.arange(30, n_docs)
    rows_b[3] = -1  # a dead row: rows after it shift down
    rows_b[4:] -= 1
    seg = SegmentedBm25([(TermStats.build(docs[:30]), rows_a), (TermStats.build(docs[30:]), rows_b)], n_docs - 1)
    allowed = rng.random(n_docs - 1) < 0.5
    for q in (["w1", "w2"], ["w3", "w3", "w39"], ["w5", "nope"], ["rare", "w0", "w7"], ["nope"], []):
        sp = seg.sparse(q)
        want = _dense_reference(seg, q)
        assert np.array_equal(sp.dense(), want), q  # bit for bit, not approximately
        assert np.array_equal(sp.rows, np.flatnonzero(want > 0))
        assert all(sp[r] == want[r] for r in range(seg.n))
        for mask in (None, allowed):
            assert np.array_equal(search._top(sp, 10, mask, True), search._top(want, 10, mask, True)), q
    assert not seg._scratch.buf.any()  # the scratch array is left zeroed for the next query


def test_best_rows_breaks_ties_by_row():
    vals = np.array([1.0, 3.0, 3.0, 2.0, 3.0], dtype=np.float32)
    rows = np.array([10, 11, 12, 13, 14])
    assert best_rows(rows, vals, 2).tolist() == [11, 12]
    assert best_rows(rows, vals, 4).tolist() == [11, 12, 14, 13]
    assert best_rows(rows, vals, 0).tolist() == []


def test_union_marks_or_sorts_to_the_same_rows():
    parts = [np.array([1, 5, 9]), np.array([0, 5, 6, 9, 10]), np.array([2])]
    want = [0, 1, 2, 5, 6, 9, 10]
    assert _union(parts, 11).tolist() == want  # 9 rows of 11: marked
    assert _union(parts, 10_000).tolist() == want  # sorted
    assert _union(parts[:1], 11).tolist() == [1, 5, 9]


def test_mapped_graph_gives_the_hits_of_a_fully_read_one(tmp_path):
    """The graph read zero-copy as an IndexIDMap (no id hash map) answers exactly like FAISS's own
    full read of the stored IndexIDMap2, with and without a selector, and the file is unchanged."""
    import faiss

    # The graph takes every vector in at once (no rows waiting beside it): 8 in the file.
    cfg = Config().with_overrides(index={"exact_max": 2, "max_tombstone_fraction": 0.9, "graph_pending_max": 0})
    store = IndexStore(tmp_path / "index", cfg.index)
    _append(store, CASES)
    _append(store, MORE)
    light = StoredIndex.load(tmp_path / "index", cfg.index, None)
    assert light.kind == "hnsw"
    path = light.dir / sg.GRAPH_FILE
    before = path.read_bytes()
    assert before[:4] == b"IxM2"
    full = faiss.read_index(str(path))  # read into memory, with IndexIDMap2's reverse map
    mapped = search.read_graph(path)
    assert type(mapped).__name__ == "IndexIDMap" and mapped.ntotal == full.ntotal == 8
    q = HashingEmbedder().encode(["快递没到", "退款金额不对", "耳机没声音"])
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.array([0, 3], dtype=np.int64)))
    for params in (faiss.SearchParametersHNSW(efSearch=16), faiss.SearchParametersHNSW(efSearch=16, sel=sel)):
        d1, i1 = full.search(q, 5, params=params)
        d2, i2 = mapped.search(q, 5, params=params)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    assert path.read_bytes() == before  # the tag was changed in a private copy only
    assert any(isinstance(o, np.memmap) for o in light.index.referenced_objects)  # the index keeps its map
    assert _hits(cfg, light) == _hits(cfg, store.load())
