"""Index format 2: a nightly update writes only its segment and links the rest; BM25 from segment
statistics scores like bm25s; old versions still load; compaction changes nothing a query sees."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.embed.fake import HashingEmbedder
from pipeline.retrieval import segments as sg
from pipeline.retrieval.bm25 import Bm25, SegmentedBm25, TermStats
from pipeline.retrieval.index import CaseIndex, IndexStore, meta_from_cases
from pipeline.retrieval.search import Searcher, StoredIndex
from pipeline.retrieval.update import update_from_cases
from test_index import CASES, make_cases, small_index, vecs_for  # noqa: E402  (same folder, on sys.path under pytest)

MORE = [
    ("c6", "快递送错地址了", "联系快递员改派", "物流配送", "一般", "chat", "2025-09-07", "手机", "华东"),
    ("c7", "耳机左边没有声音", "换新", "质量问题", "一般", "call", "2025-09-07", "耳机", "华北"),
    ("c8", "优惠券用不了", "补发优惠券", "支付/价格/优惠", "低", "chat", "2025-09-08", "会员", "华南"),
]


def _append(store: IndexStore, rows, model="hashing-test"):
    meta = meta_from_cases(make_cases(rows), False, cut=list)
    with store.writer():
        return store.append(meta, vecs_for(meta), model=model, backend="torch", dim=384)


def _hits(cfg, index, queries=("快递没到", "退款金额不对", "耳机没声音", "发票抬头"), filters=None):
    s = Searcher(cfg, index, HashingEmbedder(), cut=list)
    return [[h.to_dict() for h in s.query([q], 5, filters, mode)[0].hits] for q in queries
            for mode in ("dense", "bm25", "hybrid")]


def test_update_writes_only_its_segment_and_links_the_rest(tmp_path):
    cfg = Config()
    store = IndexStore(tmp_path / "index", cfg.index)
    v1, s1 = _append(store, CASES)
    v2, s2 = _append(store, MORE)
    d1, d2 = tmp_path / "index" / f"v{v1}", tmp_path / "index" / f"v{v2}"
    m1 = json.loads((d1 / "manifest.json").read_text())
    m2 = json.loads((d2 / "manifest.json").read_text())
    assert m2["format"] == 2 and [s["name"] for s in m2["segments"]] == ["s000000", "s000001"]
    assert s2["written"] == ["s000001", "tombstones.npy"] and (s2["added"], s2["total"]) == (3, 8)
    for f in sg.segment_files("s000000"):  # the old segment: the same inode, the same digest
        assert os.stat(d1 / f).st_ino == os.stat(d2 / f).st_ino, f
        assert m2["files"][f] == m1["files"][f]
    for f in sg.segment_files("s000001"):
        assert os.stat(d2 / f).st_nlink == 1
    # the linked files were verified once: the new version's record covers them without hashing
    verified = json.loads((d2 / sg.VERIFIED).read_text())
    assert set(verified) == set(m2["files"])
    idx = store.load(expect_model="hashing-test")
    assert sorted(idx.meta["case_id"]) == sorted([r[0] for r in CASES + MORE])


def test_replaced_case_is_found_once(tmp_path):
    cfg = Config()
    store = IndexStore(tmp_path / "index", cfg.index)
    _append(store, CASES)
    _, got = _append(store, [("c2", "退款到账了但金额不对", "核对金额", "退换货/退款", "一般", "call", "2025-09-06", "耳机",
                               "华南")])
    assert (got["added"], got["replaced"], got["total"]) == (0, 1, 5)
    light = StoredIndex.load(tmp_path / "index", cfg.index, None)
    heavy = store.load()
    assert len(light) == len(heavy) == 5 and sorted(light._list("case_id")) == sorted(heavy.meta["case_id"])
    for index in (light, heavy):
        for mode in ("dense", "bm25", "hybrid"):
            hits = Searcher(cfg, index, HashingEmbedder(), cut=list).query(["退款金额不对"], 5, None, mode)[0].hits
            ids = [h.fields["case_id"] for h in hits]
            assert ids.count("c2") == 1, (mode, ids)
            assert next(h for h in hits if h.fields["case_id"] == "c2").fields["problem"] == "退款到账了但金额不对"
    assert _hits(cfg, light) == _hits(cfg, heavy)


def test_segmented_bm25_scores_like_bm25s():
    """Per-segment term counts with live statistics give bm25s's scores, also after rows die."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    docs = [list(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(60)] + [[]]
    queries = [["w1", "w2"], ["w3", "w3", "w39"], ["w5", "nope"], ["w0", "w7", "w11", "w13"]]
    a, b = TermStats.build(docs[:25]), TermStats.build(docs[25:])
    seg = SegmentedBm25([(a, np.arange(25)), (b, np.arange(25, len(docs)))], len(docs))
    ref = Bm25(docs)
    for q in queries:
        np.testing.assert_allclose(seg.scores(q), ref.scores(q), rtol=1e-6, atol=1e-7)
    # rows 3 and 30 are dead (replaced): statistics over the live rows equal bm25s over them
    live = [i for i in range(len(docs)) if i not in (3, 30)]
    rows_a = np.array([live.index(i) if i in live else -1 for i in range(25)])
    rows_b = np.array([live.index(i) if i in live else -1 for i in range(25, len(docs))])
    seg = SegmentedBm25([(a, rows_a), (b, rows_b)], len(live))
    ref = Bm25([docs[i] for i in live])
    for q in queries:
        np.testing.assert_allclose(seg.scores(q), ref.scores(q), rtol=1e-6, atol=1e-7)
    # merged statistics (compaction) score the same
    merged = TermStats.concat([(a, np.flatnonzero(rows_a >= 0)), (b, np.flatnonzero(rows_b >= 0))])
    one = SegmentedBm25([(merged, np.arange(len(live)))], len(live))
    for q in queries:
        np.testing.assert_allclose(one.scores(q), ref.scores(q), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("exact_max", [200_000, 2])
def test_old_format_version_loads_and_is_converted_by_the_next_update(tmp_path, exact_max):
    cfg = Config().with_overrides(index={"exact_max": exact_max})
    store = IndexStore(tmp_path / "index", cfg.index)
    idx = small_index(cfg)
    d = tmp_path / "index" / "v1"
    man = idx.write_dir_v1(d)
    (d / "manifest.json").write_text(json.dumps({**man, "version": 1}))
    (tmp_path / "index" / "CURRENT").write_text("v1\n")
    assert man["format"] == 1 and (d / "meta.parquet").is_file() and (d / "bm25").is_dir()
    heavy = store.load(expect_model="hashing-test")
    light = StoredIndex.load(tmp_path / "index", cfg.index, "hashing-test")
    assert len(heavy) == len(light) == 5 and heavy._bm25_dir is not None
    before = _hits(cfg, light)
    assert before == _hits(cfg, heavy) == _hits(cfg, idx)
    v, got = _append(store, MORE)
    new = json.loads((tmp_path / "index" / f"v{v}" / "manifest.json").read_text())
    assert new["format"] == 2 and got["total"] == 8
    assert len(StoredIndex.load(tmp_path / "index", cfg.index, "hashing-test")) == 8


@pytest.mark.parametrize("exact_max", [200_000, 2])  # flat, and an HNSW graph that keeps growing
def test_compaction_keeps_results_equal(tmp_path, monkeypatch, exact_max):
    """Many small nights past the segment limit merge; what queries see does not change."""
    monkeypatch.setattr(sg, "MAX_SEGMENTS", 4)
    cfg = Config().with_overrides(index={"max_tombstone_fraction": 0.9, "exact_max": exact_max})
    store = IndexStore(tmp_path / "index", cfg.index)
    ref = CaseIndex(384, "hashing-test", Config().index)  # exact search: the reference
    nights = [CASES[:2], CASES[2:4], CASES[4:], MORE[:1], MORE[1:2],
              [("c1", "快递三天没到，催了三次", "再次催促", "物流配送", "紧急", "chat", "2025-09-09", "手机", "华东")],
              MORE[2:], [("c7", "耳机右边也没声音了", "退货", "质量问题", "一般", "call", "2025-09-10", "耳机", "华北")]]
    counts = []
    for rows in nights:
        _append(store, rows)
        meta = meta_from_cases(make_cases(rows), False, cut=list)
        ref.update(meta, vecs_for(meta))
        man = json.loads((tmp_path / "index" / f"v{store.current_version()}" / "manifest.json").read_text())
        counts.append(len(man["segments"]))
        light = StoredIndex.load(tmp_path / "index", cfg.index, None)
        assert sorted(light._list("case_id")) == sorted(ref.meta["case_id"])
        for f in (None, {"channel": ["call"]}):
            assert _hits(cfg, light, filters=f) == _hits(cfg, ref, filters=f)
    assert max(counts) <= 4 + 1 and counts[-1] < len(nights)  # merged, bounded
    assert store.load().manifest["count"] == len(ref)


def _merge_by_concatenation(parts, tombstones, dst, seg):
    """The merge as it was before it streamed: every part read, concatenated, written once."""
    import pyarrow as pa

    read = [sg.read_segment(d, s, tombstones) for d, s in parts]
    table = pa.concat_tables([t for t, _, _ in read], promote_options="default")
    return sg.write_segment(dst, seg, table, np.concatenate([v for _, v, _ in read]),
                            TermStats.concat([st for _, _, st in read])), table.num_rows


@pytest.mark.parametrize("row_group", [2048, 2])
def test_streamed_merge_writes_what_the_concatenation_wrote(tmp_path, monkeypatch, row_group):
    """Rows, column types (a part whose column was all null), vectors and term statistics of the
    streamed merge equal those of the concatenated one, dead rows dropped in both. With groups of
    2 rows the merge reads many groups per part, some thinned by dead rows, and still writes full
    groups, and lets its mapped pages go after every group and every block of postings (those
    it wrote too): nothing written is lost."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(sg, "ROW_GROUP", row_group)
    if row_group == 2:
        monkeypatch.setattr(sg, "DROP_ROWS", 1)
        merge_into = TermStats.merge_into.__func__
        by_one = classmethod(lambda cls, *a, **k: merge_into(cls, *a, block=1, **k))
        monkeypatch.setattr(TermStats, "merge_into", by_one)
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    parts, vid = [], 0
    for i, n in enumerate((5, 3, 4)):
        rows = pa.table({
            "case_id": [f"c{i}-{j}" for j in range(n)],
            "vid": np.arange(vid, vid + n, dtype=np.int64),
            "problem": [f"问题{i}{j}" for j in range(n)],
            # the middle part's region is all null: Parquet types it null
            "region": pa.nulls(n) if i == 1 else pa.array([f"区{j}" for j in range(n)]),
        })
        vecs = rng.normal(size=(n, 8)).astype(np.float32)
        stats = TermStats.build([[f"t{j % 3}", f"u{i}"] for j in range(n)])
        sg.write_segment(src, sg.segment_name(i), rows, vecs, stats)
        parts.append((src, sg.segment_name(i)))
        vid += n
    tomb = np.array([1, 5, 6, 7, 11], dtype=np.int64)  # the whole middle part and two others
    got_files, got_rows = sg.merge_segments(parts, tomb, tmp_path / "new", "s000009")
    ref_files, ref_rows = _merge_by_concatenation(parts, tomb, tmp_path / "ref", "s000009")
    assert got_files == ref_files and got_rows == ref_rows == 12 - len(tomb)
    new, ref = tmp_path / "new" / "s000009", tmp_path / "ref" / "s000009"
    for name in (sg.IDS_FILE, sg.SEG_META_FILE):
        a, b = pq.read_table(new / name), pq.read_table(ref / name)
        assert a.schema.equals(b.schema) and a.equals(b), name
    va, vb = (faiss.read_index(str(d / sg.VECTORS_FILE)) for d in (new, ref))
    assert np.array_equal(va.reconstruct_n(0, va.ntotal), vb.reconstruct_n(0, vb.ntotal))
    sa, sb = TermStats.load(new), TermStats.load(ref)
    assert sa.vocab == sb.vocab
    for x, y in zip((sa.indptr, sa.docs, sa.counts, sa.doclen), (sb.indptr, sb.docs, sb.counts, sb.doclen)):
        assert np.array_equal(x, y)
    # the vectors and statistics are the very files the held merge wrote
    for name in (sg.VECTORS_FILE, *TermStats.FILES):
        assert (new / name).read_bytes() == (ref / name).read_bytes(), name
    # groups of ROW_GROUP rows but the last of each part: thinned groups are joined again
    sizes = [pq.ParquetFile(new / sg.SEG_META_FILE).metadata.row_group(i).num_rows
             for i in range(pq.ParquetFile(new / sg.SEG_META_FILE).num_row_groups)]
    assert all(n <= row_group for n in sizes) and sum(sizes) == got_rows
    if row_group == 2:
        assert sizes == [2, 2, 2, 1]  # part 0 keeps 4 rows (its groups 1, 2, 1 before), part 2 keeps 3


@pytest.mark.parametrize("block", [1, 2, 5, 1 << 18])
def test_term_stats_merged_into_files_equal_the_concatenation(tmp_path, block):
    """`merge_into` writes, block by block, the files `concat(...).save` writes: across parts with
    dead documents, a part with no live document, an empty document and terms in several parts."""
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(30)]
    parts = []
    for n in (17, 4, 0, 23):
        docs = [list(rng.choice(words, size=int(rng.integers(0, 9)))) for _ in range(n)]
        st = TermStats.build(docs)
        keep = np.flatnonzero(rng.random(n) < 0.7) if n != 4 else np.zeros(0, dtype=np.int64)
        parts.append((st, keep))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert TermStats.merge_into(parts, tmp_path / "a", block=block) == TermStats.concat(parts).save(tmp_path / "b")
    for name in TermStats.FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_merge_holds_about_a_window_of_the_mapped_input_resident(tmp_path, monkeypatch):
    """A back-fill's last tiers merge half the history through one mapped input: the merge lets
    each window's read pages go, so at most about a window of the input's vectors is resident
    at any drop, and the pages of the postings it writes through a shared map go too (the
    written bytes stay: `test_streamed_merge_writes_what_the_concatenation_wrote`)."""
    import pyarrow as pa
    from test_heap import _linux_maps, _mapped_rss_kib

    from pipeline import heap

    if not _linux_maps():
        pytest.skip("needs /proc/self/smaps, madvise and glibc (Linux)")
    n, dim = 20_000, 256
    src, new = tmp_path / "src", tmp_path / "new"
    rows = pa.table({"case_id": [f"c{i}" for i in range(n)], "vid": np.arange(n, dtype=np.int64)})
    vecs = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    stats = TermStats.build([[f"t{(i * 7 + j) % 3000}" for j in range(10)] for i in range(n)])
    sg.write_segment(src, "s000000", rows, vecs, stats)
    vectors, postings = src / "s000000" / sg.VECTORS_FILE, new / "s000001" / TermStats.FILES[1]
    size_kib = vectors.stat().st_size // 1024
    read: list[int] = []  # the input's resident KiB at each drop, before it
    written: list[tuple[int, int]] = []  # the output postings' resident KiB before and after each shared drop
    drop = heap.drop_mapped_pages

    def measured(folders, shared_writes=False):
        read.append(_mapped_rss_kib(vectors))
        before = _mapped_rss_kib(postings) if postings.exists() else 0
        got = drop(folders, shared_writes)
        if shared_writes and postings.exists():
            written.append((before, _mapped_rss_kib(postings)))
        return got

    merge_into = TermStats.merge_into.__func__
    monkeypatch.setattr(TermStats, "merge_into", classmethod(lambda cls, *a, **k: merge_into(cls, *a, block=8192, **k)))
    monkeypatch.setattr(sg, "DROP_ROWS", 2048)
    monkeypatch.setattr(heap, "drop_mapped_pages", measured)
    sg.merge_segments([(src, "s000000")], np.zeros(0, dtype=np.int64), new, "s000001")
    # A fault maps a whole folio of the page cache (up to 2 MiB): hence the margin.
    assert len(read) >= n // 2048 and max(read) < size_kib * 0.4
    assert max(b for b, _ in written) > 0 and max(a for _, a in written) == 0
    # The merge's own map of its input, read through as it reads it, without the drops:
    held = sg.mapped_vectors(src / "s000000")
    assert np.array_equal(held.reconstruct_batch(np.arange(n)), vecs)
    assert _mapped_rss_kib(vectors) > size_kib * 0.8
    del held


def test_dead_rows_past_the_limit_compact_everything(tmp_path):
    cfg = Config().with_overrides(index={"max_tombstone_fraction": 0.2})
    store = IndexStore(tmp_path / "index", cfg.index)
    _append(store, CASES + MORE)
    _, got = _append(store, [(r[0], r[1] + "。", *r[2:]) for r in CASES[:3]])  # 3 of 11 stored rows dead
    man = store.load().manifest
    assert len(man["segments"]) == 1 and man["segments"][0]["rows"] == 8 and got["total"] == 8
    assert len(sg.read_tombstones(tmp_path / "index" / f"v{man['version']}")) == 0


C2_AGAIN = ("c2", "退款到账了但金额不对", "核对金额", "退换货/退款", "一般", "call", "2025-09-06", "耳机", "华南")


def _reference(rows):
    """An exact in-memory index of the live rows: what a graph index with every vector must answer."""
    ref = small_index(Config())
    meta = meta_from_cases(make_cases(rows), False, cut=list)
    ref.update(meta, vecs_for(meta))
    return ref


def _graph_inode(store: IndexStore, version: int) -> int:
    return os.stat(store.root / f"v{version}" / sg.GRAPH_FILE).st_ino


@pytest.mark.parametrize("pending_max", [0, 20_000])
def test_hnsw_grows_without_rebuilding_the_graph(tmp_path, monkeypatch, pending_max):
    cfg = Config().with_overrides(index={"exact_max": 2, "max_tombstone_fraction": 0.9, "graph_pending_max": pending_max})
    store = IndexStore(tmp_path / "index", cfg.index)
    v1, _ = _append(store, CASES)  # past exact_max: the graph is built once
    built = []
    real = CaseIndex._new_faiss
    monkeypatch.setattr(CaseIndex, "_new_faiss", lambda self, *a: built.append(a[0]) or real(self, *a))
    v2, _ = _append(store, MORE + [C2_AGAIN])
    assert built == []
    man = store.load().manifest
    if pending_max == 0:  # the graph takes the night's vectors in at once
        assert man["kind"] == "hnsw" and man["count"] == 8 and man["ntotal"] == 9  # c2's old vector is tombstoned
        assert man["graph_upto"] == 9 and _graph_inode(store, v2) != _graph_inode(store, v1)
    else:  # they wait beside it, searched exactly; the graph file is the last version's, linked
        assert man["kind"] == "hnsw" and man["count"] == 8 and man["ntotal"] == 5
        assert man["graph_upto"] == 5 and _graph_inode(store, v2) == _graph_inode(store, v1)
    ref = _reference(MORE + [C2_AGAIN])
    light = StoredIndex.load(tmp_path / "index", cfg.index, None)
    assert light.kind == "hnsw"
    # 9 vectors: HNSW's walk finds them all, so results equal exact search over the live rows,
    # whether read by a query process or loaded whole by a writer.
    assert _hits(cfg, light) == _hits(cfg, ref)
    assert _hits(cfg, store.load()) == _hits(cfg, ref)


def test_waiting_vectors_join_the_graph_past_the_limit(tmp_path):
    cfg = Config().with_overrides(index={"exact_max": 2, "max_tombstone_fraction": 0.9, "graph_pending_max": 3})
    store = IndexStore(tmp_path / "index", cfg.index)
    v1, _ = _append(store, CASES)
    v2, _ = _append(store, MORE[:2])  # 2 waiting: under the limit
    man = store.load().manifest
    assert (man["ntotal"], man["graph_upto"]) == (5, 5) and _graph_inode(store, v2) == _graph_inode(store, v1)
    v3, _ = _append(store, [MORE[2], C2_AGAIN])  # 4 live waiting (c2's first vector is in the graph, dead)
    man = store.load().manifest
    assert (man["ntotal"], man["graph_upto"], man["count"]) == (9, 9, 8)
    assert _graph_inode(store, v3) != _graph_inode(store, v2)
    ref = _reference(MORE + [C2_AGAIN])
    assert _hits(cfg, StoredIndex.load(tmp_path / "index", cfg.index, None)) == _hits(cfg, ref)
    # Only live vectors were added: a fresh walk over the file finds no vid twice.
    import faiss

    graph = faiss.read_index(str(store.root / f"v{v3}" / sg.GRAPH_FILE))
    vids = faiss.vector_to_array(graph.id_map)
    assert len(vids) == len(set(vids.tolist())) == 9


def test_a_wide_filter_searches_the_graph_and_the_waiting_rows(tmp_path, monkeypatch):
    from pipeline.retrieval import search

    cfg = Config().with_overrides(index={"exact_max": 2, "max_tombstone_fraction": 0.9})
    store = IndexStore(tmp_path / "index", cfg.index)
    _append(store, CASES)
    _append(store, MORE + [C2_AGAIN])
    ref = _reference(MORE + [C2_AGAIN])
    light = StoredIndex.load(tmp_path / "index", cfg.index, None)
    assert light._waiting  # the night's rows wait beside the graph
    # A filter wider than EXACT_FILTER_MAX goes through the graph walk, plus the waiting rows.
    monkeypatch.setattr(search, "EXACT_FILTER_MAX", 0)
    for filters in ({"channel": ["call"]}, {"region": ["华南", "华北"]}):
        assert _hits(cfg, light, filters=filters) == _hits(cfg, ref, filters=filters)


def test_merging_segments_keeps_waiting_rows_searchable(tmp_path):
    cfg = Config().with_overrides(index={"exact_max": 2, "max_tombstone_fraction": 0.9})
    store = IndexStore(tmp_path / "index", cfg.index)
    _append(store, CASES)
    rows = list(MORE)
    for i in range(sg.MAX_SEGMENTS + 2):  # enough nights of one case for the newest tier to merge
        row = (f"n{i}", f"第{i}次投诉快递没到", "催件", "物流配送", "一般", "chat", "2025-09-09", "手机", "华东")
        rows.append(row)
        _append(store, [row])
    _append(store, MORE + [C2_AGAIN])
    man = store.load().manifest
    assert len(man["segments"]) <= sg.MAX_SEGMENTS and man["ntotal"] == 5
    ref = _reference(rows + [C2_AGAIN])

    def scored(hits):  # rows that tie at 0 (nothing in common with the query) come in any order
        return [[h for h in q if h["score"] > 0] for q in hits]

    assert scored(_hits(cfg, StoredIndex.load(tmp_path / "index", cfg.index, None))) == scored(_hits(cfg, ref))


def test_plan_merge_tiers():
    assert sg.plan_merge([100] + [1] * 15, 16) is None
    assert sg.plan_merge([100] + [1] * 16, 16) == 1  # all the small ones, never the big one
    assert sg.plan_merge([100, 17, 16] + [1] * 15, 16) == 3  # the 15 small ones, not 16 + 17 too
    assert sg.plan_merge([1] * 17, 16) == 0  # no bigger predecessor: all


def test_reader_during_append_and_prune_reads_whole_versions(tmp_path):
    """Readers loading while nightly appends add segments and prune versions see whole versions."""
    cfg = Config().with_overrides(index={"keep_versions": 1})
    store = IndexStore(tmp_path / "index", cfg.index)
    _append(store, CASES)
    errors: list[BaseException] = []
    seen: set[int] = set()
    done = threading.Event()

    def reader(light: bool) -> None:
        while not done.is_set():
            try:
                if light:
                    r = StoredIndex.load(tmp_path / "index", cfg.index, None)
                    n, v = len(r), r.version
                    assert len(r.column("problem", range(n))) == n
                else:
                    h = store.load()
                    n, v = len(h), h.version
                    assert n == h.ntotal == h.manifest["count"]
                assert n == 5 + (v - 1)  # each version added exactly one case
                seen.add(v)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=reader, args=(light,)) for light in (True, False)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            _append(store, [(f"n{i}", f"新问题{i}", "", None, None, "chat", "2025-10-01", None, None)])
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert len(seen) > 1
    _append(store, [("last", "最后一个问题", "", None, None, "chat", "2025-10-02", None, None)])
    assert store.versions() == [22]  # unlocked now: pruned down to keep_versions, links and all
    assert len(StoredIndex.load(tmp_path / "index", cfg.index, None)) == 26


def test_update_from_cases_appends(tmp_path, fake_embedder):
    cfg = Config()
    update_from_cases(cfg, tmp_path, make_cases())
    s2 = update_from_cases(cfg, tmp_path, make_cases(MORE))
    assert (s2["added"], s2["replaced"], s2["total"], s2["version"]) == (3, 0, 8, 2)
    man = json.loads((tmp_path / "index" / "v2" / "manifest.json").read_text())
    assert len(man["segments"]) == 2
