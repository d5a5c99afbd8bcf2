"""Search: fusion, modes and filters, the query CLI's JSON, the warm server, real-data metrics."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.config import Config
from pipeline.embed.fake import HashingEmbedder
from pipeline.evaluate.retrieval import evaluate_labels, evaluate_pairs, label_precision, pair_metrics
from pipeline.retrieval.index import Filters, IndexStore
from pipeline.retrieval.update import update_from_cases
from pipeline.retrieval.index import Bm25
from pipeline.retrieval.search import Searcher, rrf_fuse
from pipeline.text.segment import tokenize

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

from test_index import make_cases, small_index  # noqa: E402  (same folder, on sys.path under pytest)


def test_rrf_fuse_rewards_agreement():
    fused = rrf_fuse([[1, 2, 3], [3, 4, 1]], [1.0, 1.0], k=60)
    ids = [i for i, _ in fused]
    assert ids[:2] == [1, 3]  # in both lists beats top of one
    assert set(ids) == {1, 2, 3, 4}
    assert rrf_fuse([[1, 2], [2]], [1.0, 0.0])[0][0] == 1  # zero weight ignores a ranking
    assert rrf_fuse([], []) == []


def test_bm25_scores_and_unknown_terms():
    b = Bm25([["快递", "没到"], ["退款", "到账"], []])
    s = b.scores(["快递", "不存在的词"])
    assert s[0] > 0 and s[1] == 0 and s[2] == 0
    assert not b.scores(["完全陌生"]).any()


def test_modes_and_hybrid():
    cfg = Config()
    idx = small_index(cfg, cut=lambda t: tokenize(cfg, t))
    s = Searcher(cfg, idx, HashingEmbedder())
    for mode in ("dense", "bm25", "hybrid"):
        hits = s.search("快递三天没到，要投诉", k=3, mode=mode)
        assert hits and hits[0].fields["case_id"] == "c1", mode
    hybrid = s.search("快递三天没到", k=5, mode="hybrid")
    assert hybrid[0].dense is not None and hybrid[0].bm25 is not None
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    only = s.search("快递没到", k=5, mode="hybrid", filters=Filters(channel=["call"]))
    assert {h.fields["case_id"] for h in only} <= {"c2", "c5"}
    assert s.search("快递", k=5, filters=Filters(since="2030-01-01")) == []


def test_hybrid_uses_both_signals():
    """A case only BM25 finds (exact rare term) and one only dense finds both reach the fused top."""
    cfg = Config()
    idx = small_index(cfg, cut=lambda t: tokenize(cfg, t))
    s = Searcher(cfg, idx, HashingEmbedder())
    q = "发票"
    dense_ids = [h.fields["case_id"] for h in s.search(q, 5, mode="dense")]
    bm_ids = [h.fields["case_id"] for h in s.search(q, 5, mode="bm25")]
    fused = [h.fields["case_id"] for h in s.search(q, 5, mode="hybrid")]
    assert bm_ids[0] == "c4" and fused[0] == "c4"
    assert set(fused) == set(dense_ids) | set(bm_ids)


def test_tokenize_uses_project_segmenter():
    toks = tokenize(Config(), "客户说快递三天没到，要投诉")
    assert "快递" in toks and "，" not in toks


def test_metrics_pure():
    m = pair_metrics([[5, 1, 2], [0, 9]], [{1}, {7}])
    assert m["recall@1"] == 0 and m["recall@5"] == 0.5 and m["mrr"] == pytest.approx(0.25)
    p = label_precision([[1, 2], [0, 2], [0, 1]], ["a", "a", "b"])
    # label a: queries 0,1 have precision@1 = 1; label b: 0 -> macro 0.5
    assert p["precision@1"] == pytest.approx(0.5)


def _index_for_cli(tmp_path: Path) -> Path:
    update_from_cases(Config(), tmp_path, make_cases())
    return tmp_path


def test_query_cli_json(tmp_path, fake_embedder):
    from pipeline.cli import _register, app

    _register()
    out = _index_for_cli(tmp_path)
    r = CliRunner().invoke(app, ["query", "客户说快递三天没到，要投诉", "-k", "2", "--out", str(out), "--local", "--json"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 1
    obj = lines[0]
    assert obj["query"] == "客户说快递三天没到，要投诉" and obj["index_version"] == 1 and len(obj["results"]) == 2
    top = obj["results"][0]
    assert top["case_id"] == "c1" and top["rank"] == 1
    assert {"score", "issue_type", "urgency", "problem", "handling", "outcome", "date"} <= set(top)
    # stdin: one query per line -> one JSON object per line; filters apply
    r = CliRunner().invoke(app, ["query", "--out", str(out), "--local", "--json", "--type", "物流配送", "-k", "5"],
                           input="快递没到\n发票开错\n")
    assert r.exit_code == 0, r.output
    objs = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    assert len(objs) == 2
    assert all(h["issue_type"] == "物流配送" for o in objs for h in o["results"])


def test_query_cli_errors(tmp_path, fake_embedder):
    from pipeline.cli import _register, app

    _register()
    r = CliRunner().invoke(app, ["query", "x", "--out", str(tmp_path), "--local"])
    assert r.exit_code == 1 and "casemine index" in r.output
    r = CliRunner().invoke(app, ["query", "x", "--out", str(tmp_path), "--mode", "bogus"])
    assert r.exit_code == 2


def test_eval_cli_json_keys(tmp_path, fake_embedder):
    from pipeline.cli import _register, app

    _register()
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"query": "快递怎么还没到", "positive": "快递三天没到", "label": 1},
            {"query": "退款何时到账", "positive": "退款一直没到账", "label": 1},
            {"query": "发票", "positive": "屏幕碎了", "label": 0}]
    pairs.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    r = CliRunner().invoke(app, ["eval", "retrieval", "--pairs", str(pairs), "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert list(res) == ["hybrid", "dense", "bm25"]  # the configured default mode first
    assert set(res["hybrid"]) == {"recall@1", "recall@5", "recall@10", "mrr"}
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"text": ["快递没到", "物流太慢", "退款没到", "退钱慢"], "label": ["物流", "物流", "退款", "退款"]}).to_csv(labels)
    r = CliRunner().invoke(app, ["eval", "retrieval", "--labels", str(labels), "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["dense"]) == {"precision@1", "precision@5", "precision@10"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_round_trip_and_follows_swaps(tmp_path, fake_embedder):
    from pipeline.query.server import query_remote, run_server

    cfg = Config()
    out = _index_for_cli(tmp_path)
    port = _free_port()
    box: dict = {}
    up = threading.Event()

    def ready(httpd, service):
        box["httpd"] = httpd
        up.set()

    t = threading.Thread(target=run_server, args=(cfg, out, port), kwargs={"ready": ready}, daemon=True)
    t.start()
    assert up.wait(30)
    try:
        res = query_remote(cfg, out, ["快递三天没到"], 2, Filters(), "hybrid", port=port)
        assert res and res["index_version"] == 1 and res["results"][0]["hits"][0]["case_id"] == "c1"
        # another root: the server declines, the client falls back to local
        assert query_remote(cfg, tmp_path / "elsewhere", ["x"], 1, None, None, port=port) is None
        # after an update the server reloads and answers from the new version
        update_from_cases(cfg, out, make_cases([("c7", "快递丢件了", "", "物流配送", "紧急", "chat", "2025-09-09", None, None)]))
        res = query_remote(cfg, out, ["快递丢件了"], 1, Filters(), "hybrid", port=port)
        assert res["index_version"] == 2 and res["results"][0]["hits"][0]["case_id"] == "c7"
    finally:
        box["httpd"].shutdown()
    assert query_remote(cfg, out, ["x"], 1, None, None, port=port) is None  # nobody listening


@pytest.mark.shared
def test_bm25_label_precision_on_real_complaints(tmp_path, fake_embedder):
    path = SHARED / "complaints" / "dev.csv"
    if not path.is_file():
        pytest.skip(f"real data not present at {SHARED} (../shared/data beside the repo); skipping")
    rep = evaluate_labels(Config(), path, ["bm25"], cache_root=tmp_path)
    assert rep["texts"] == 413
    p = rep["modes"]["bm25"]
    assert 0 < p["precision@10"] <= p["precision@1"] + 0.2 and all(0 <= v <= 1 for v in p.values())


@pytest.mark.shared
def test_pairs_reader_skips_negatives(tmp_path, fake_embedder):
    path = SHARED / "pairs" / "bq_dev.jsonl"
    if not path.is_file():
        pytest.skip(f"real data not present at {SHARED} (../shared/data beside the repo); skipping")
    small = tmp_path / "bq.jsonl"
    small.write_text("".join(path.open(encoding="utf-8").readlines()[:200]), encoding="utf-8")
    n_pos = sum(json.loads(l)["label"] == 1 for l in small.read_text(encoding="utf-8").splitlines())
    rep = evaluate_pairs(Config(), small, None, ["bm25"], cache_root=tmp_path)
    assert rep["queries"] <= n_pos and rep["collection"] <= n_pos
    assert 0 <= rep["modes"]["bm25"]["recall@10"] <= 1


class _HandshakeEmbedder(HashingEmbedder):
    """Encodes only once the BM25 side has started: run one after the other, the query would
    wait out the timeout and fail; run side by side, it answers at once."""

    def __init__(self, started: threading.Event):
        super().__init__()
        self.started = started
        self.threads: list[str] = []

    def encode_queries(self, texts):
        self.threads.append(threading.current_thread().name)
        assert self.started.wait(10), "the BM25 side never started while the query was encoding"
        return super().encode_queries(texts)


def test_hybrid_encodes_beside_the_bm25_side_with_the_same_answer():
    cfg = Config()
    idx = small_index(cfg, cut=lambda t: tokenize(cfg, t))
    started = threading.Event()

    def cut(text):
        started.set()
        return tokenize(cfg, text)

    emb = _HandshakeEmbedder(started)
    side_by_side = Searcher(cfg, idx, emb, cut=cut).search("快递三天没到，要投诉", k=5, mode="hybrid")
    in_turn = Searcher(cfg, idx, HashingEmbedder()).search("快递三天没到，要投诉", k=5, mode="hybrid")
    assert emb.threads and all(t != threading.current_thread().name for t in emb.threads)
    assert [(h.row, h.score, h.dense, h.bm25) for h in side_by_side] == [
        (h.row, h.score, h.dense, h.bm25) for h in in_turn
    ]


def test_a_failing_bm25_side_still_waits_for_the_encode():
    cfg = Config()
    idx = small_index(cfg, cut=lambda t: tokenize(cfg, t))
    done = threading.Event()

    class Slow(HashingEmbedder):
        def encode_queries(self, texts):
            out = super().encode_queries(texts)
            done.set()
            return out

    def broken(text):
        raise RuntimeError("cut failed")

    with pytest.raises(RuntimeError, match="cut failed"):
        Searcher(cfg, idx, Slow(), cut=broken).search("快递", k=3, mode="hybrid")
    assert done.is_set()  # no encode left running behind the error
