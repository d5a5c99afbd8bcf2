"""The typical-case library: candidate selection, the review state machine (also across two
processes), rebuilds that keep decisions, coverage on a known set, masked exports, CLI JSON."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import PII_PATTERNS, all_output_text
from pipeline.cli import _register, app
from pipeline.embed.fake import HashingEmbedder
from pipeline.library.typical_cases import (Candidate, CandidateScorer, LibraryError, LibraryStore, compute_coverage,
                              published_case_ids, publish, record_usage, select_candidates)

_register()
runner = CliRunner()

TURNS = [{"speaker": "customer", "text": "你好，快递怎么还没到"}, {"speaker": "agent", "text": "已为您催促站点"},
         {"speaker": "customer", "text": "好的谢谢"}]


def _case(cid, problem, *, outcome="resolved", handling="已为您催促站点加急派送", delta=0.5, itype="物流配送", n_chars=200):
    return {"case_id": cid, "channel": "chat", "issue_type": itype, "problem": problem, "handling": handling,
            "outcome": outcome, "outcome_evidence": "customer: 谢谢", "customer_text": "x" * (n_chars // 2),
            "agent_text": "y" * (n_chars // 2), "n_turns": 3, "turns": TURNS, "emotion_start": -0.2,
            "emotion_end": -0.2 + delta, "emotion_min": -0.4, "emotion_delta": delta, "emotion_trajectory": "改善",
            "turning_points": "{}"}


@pytest.fixture()
def scorer(cfg):
    return CandidateScorer(cfg.library.model_copy(update={"per_group": 2}), ["催促", "加急", "补发"])


def test_candidates_are_eligible_diverse_and_explained(scorer):
    cases = pd.DataFrame([
        _case("a", "快递三天还没到", delta=0.9), _case("b", "快递三天还没到了", delta=0.8),
        _case("c", "发票开错了抬头", delta=0.5), _case("d", "快递丢了", outcome="unknown"),
        _case("e", "快递慢", handling="您好亲"), _case("f", "快递慢死了", delta=0.0), _case("g", "太长", n_chars=5000)])
    vec = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [1, 0], [1, 0], [1, 0]], dtype=np.float32)
    cands, counts = select_candidates(cases, vec, scorer, {"a": "C1", "b": "C1", "c": "C2"})
    ids = [c.case_id for c in cands]
    assert counts["eligible"] == 3 and set(ids) == {"a", "c"}  # b is a near-copy of a
    a = next(c for c in cands if c.case_id == "a")
    assert a.cluster_id == "C1" and set(a.groups) == {"type:物流配送", "cluster:C1"}
    assert any("已解决" in r for r in a.reasons) and any("情绪改善" in r for r in a.reasons)
    assert a.score > next(c for c in cands if c.case_id == "c").score
    assert set(a.parts) >= {"context", "problem", "handling", "outcome"}
    ok, _, why = scorer.assess(cases.iloc[3].to_dict())
    assert not ok and any("outcome" in w for w in why)
    assert not scorer.assess(cases.iloc[4].to_dict())[0] and not scorer.assess(cases.iloc[5].to_dict())[0]


def _cand(cid, itype="物流配送", problem="快递没到", parts=None):
    return Candidate(cid, itype, None, 0.8, ["已解决"], parts or {"context": "渠道:chat", "problem": problem,
                                                               "handling": "已催促", "outcome": "resolved"}, [f"type:{itype}"])


def test_review_state_machine(tmp_path):
    st = LibraryStore(tmp_path)
    st.sync_candidates([_cand("a"), _cand("b"), _cand("c")])
    with pytest.raises(LibraryError, match="nothing to publish"):
        st.publish()
    with pytest.raises(LibraryError, match="unknown case id"):
        st.approve("zzz", by="li")
    d = st.approve("a", by="li", note="好例子")
    assert d.changed and (d.from_status, d.status) == ("candidate", "approved")
    again = st.approve("a", by="wang")
    assert not again.changed and "already approved by li" in again.message
    with pytest.raises(LibraryError, match="needs a reason"):
        st.reject("b", by="li", note="")
    st.reject("b", by="li", note="处理不规范")
    with pytest.raises(LibraryError, match="--force"):
        st.approve("b", by="wang")
    assert st.approve("b", by="wang", note="复核通过", force=True).status == "approved"
    with pytest.raises(LibraryError, match="--by"):
        st.approve("c", by=" ")
    new, rows = st.publish()
    assert sorted(new) == ["a", "b"] and {r["case_id"] for r in rows} == {"a", "b"}
    assert st.status("a") == "published" and st.approve("a", by="x").changed is False
    st.reject("a", by="li", note="过时")
    assert published_case_ids(tmp_path) == {"b"}
    ev = [(e["case_id"], e["from_status"], e["to_status"], e["by"]) for e in st.events("b")]
    assert ev == [("b", None, "candidate", "build"), ("b", "candidate", "rejected", "li"),
                  ("b", "rejected", "approved", "wang"), ("b", "approved", "published", "publish")]


def test_rebuild_keeps_decisions(tmp_path):
    st = LibraryStore(tmp_path)
    st.sync_candidates([_cand("a"), _cand("b"), _cand("c")])
    st.approve("a", by="li")
    st.reject("b", by="li", note="no")
    counts = st.sync_candidates([_cand("d"), _cand("b", problem="新的问题文本")])  # a and c not picked again
    assert counts == {"new": 1, "refreshed": 0, "decisions_kept": 2, "retired": 1}
    status = {e["case_id"]: e["status"] for e in st.entries(include_retired=True)}
    assert status == {"a": "approved", "b": "rejected", "c": "candidate", "d": "candidate"}
    assert {e["case_id"] for e in st.entries()} == {"a", "b", "d"}  # c is retired from the list
    assert next(e for e in st.entries() if e["case_id"] == "b")["parts"]["problem"] == "新的问题文本"


def _approve_in_process(out: str, case_id: str, by: str, barrier, results) -> None:
    st = LibraryStore(Path(out))
    barrier.wait()
    try:
        d = st.approve(case_id, by=by)
        results.put((by, d.changed, None))
    except Exception as e:  # pragma: no cover - the test fails on it
        results.put((by, None, repr(e)))


def test_two_processes_approving_at_once(tmp_path):
    st = LibraryStore(tmp_path)
    st.sync_candidates([_cand("same")] + [_cand(f"c{i}") for i in range(20)])
    ctx = mp.get_context("spawn")
    for case_ids in (["same", "same"], [f"c{i}" for i in range(4)]):
        barrier, results = ctx.Barrier(len(case_ids)), ctx.Queue()
        procs = [ctx.Process(target=_approve_in_process, args=(str(tmp_path), cid, f"p{i}", barrier, results))
                 for i, cid in enumerate(case_ids)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        assert all(err is None for _, _, err in got), got
        if case_ids[0] == "same":
            assert sorted(changed for _, changed, _ in got) == [False, True]  # exactly one approval
    approvals = [e for e in st.events() if e["to_status"] == "approved"]
    assert len([e for e in approvals if e["case_id"] == "same"]) == 1
    assert {e["case_id"] for e in approvals} == {"same", "c0", "c1", "c2", "c3"}


def test_coverage_on_known_set():
    v = np.array([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0], [0, 0, 1], [0, 0.1, 0.995]], dtype=np.float32)
    res = compute_coverage(["p1", "x1", "x2", "x3", "x4"], ["物流", "物流", "发票", "售后", "售后"],
                           ["C1", "C1", "C2", "C3", None], v, ["p1"], v[:1], ["物流"], ["C1"], threshold=0.9)
    assert res.n_covered == 2 and res.coverage == 0.4
    assert res.by_type["物流"] == {"cases": 2, "covered": 2, "coverage": 1.0, "published": 1}
    assert res.by_type["售后"]["coverage"] == 0.0
    assert [(g["kind"], g["id"], g["cases"]) for g in res.gaps] == [
        ("issue_type", "售后", 2), ("cluster", "C2", 1), ("cluster", "C3", 1), ("issue_type", "发票", 1)]
    none = compute_coverage(["a"], ["t"], [None], v[:1], [], np.zeros((0, 3)), [], [], 0.9)
    assert none.coverage == 0.0 and none.gaps[0]["id"] == "t"


def test_published_exports_carry_no_personal_data(cfg, tmp_path):
    st = LibraryStore(tmp_path)
    leaky = {"context": "渠道:chat 客户 13812345678", "problem": "发票寄到 test.user@example.com",
             "handling": "已登记身份证 110101199003074514", "outcome": "resolved"}
    st.sync_candidates([_cand("a", itype="发票/开票", parts=leaky), _cand("b")])
    st.approve("a", by="li", note="电话13912345678")
    st.approve("b", by="li")
    res = publish(cfg, tmp_path)
    assert res["published"] == 2 and Path(res["parquet"]).is_file()
    assert set(res["pages"]) == {"发票/开票", "物流配送"} and all(Path(p).is_file() for p in res["pages"].values())
    text = all_output_text(tmp_path / "library" / "published")
    for name, pat in PII_PATTERNS.items():
        assert not pat.search(text), name
    page = Path(res["pages"]["发票/开票"]).read_text(encoding="utf-8")
    assert "客户背景" in page and "处理" in page and "<script" not in page and "http" not in page
    df = pd.read_parquet(res["parquet"])
    assert set(df["case_id"]) == {"a", "b"} and {"context", "problem", "handling", "outcome"} <= set(df.columns)


def test_usage_counts(tmp_path):
    LibraryStore(tmp_path).sync_candidates([_cand("a")])
    record_usage(tmp_path, ["a", "a", "b"])
    record_usage(tmp_path, ["a"])
    assert next(e for e in LibraryStore(tmp_path).entries() if e["case_id"] == "a")["used"] == 2


# -- end to end through the CLI -------------------------------------------------------------------

@pytest.fixture()
def stored(cfg, sample, tmp_path, monkeypatch):
    from pipeline.ingest import discover, read_file
    from pipeline.orchestrate.steps import process_batch
    from pipeline.storage.store import write_cases

    import pipeline.embed

    monkeypatch.setattr(pipeline.embed, "Embedder", lambda *a, **k: HashingEmbedder())
    convs = [c for f in discover(sample[0]) for c in read_file(f, cfg.ingest).conversations]
    write_cases(tmp_path, process_batch(convs, cfg).cases, "run1", 0)
    return tmp_path


def test_library_cli_json(stored):
    out = ["--out", str(stored)]
    res = runner.invoke(app, ["library", "build", *out, "--json"])
    assert res.exit_code == 0, res.output
    built = json.loads(res.stdout)
    assert built["candidates"] > 0 and built["new"] == built["candidates"]
    res = runner.invoke(app, ["library", "list", *out, "--json"])
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert res.exit_code == 0 and len(rows) == built["candidates"] and all(r["status"] == "candidate" for r in rows)
    cid = rows[0]["case_id"]
    res = runner.invoke(app, ["library", "publish", *out])
    assert res.exit_code == 1 and "nothing to publish" in res.output
    res = runner.invoke(app, ["library", "approve", "nope-0", "--by", "li", *out])
    assert res.exit_code == 1 and "unknown case id" in res.output
    res = runner.invoke(app, ["library", "reject", cid, "--by", "li", "--note", "重复", *out, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["status"] == "rejected"
    res = runner.invoke(app, ["library", "approve", cid, "--by", "wang", *out])
    assert res.exit_code == 1 and "--force" in res.output
    res = runner.invoke(app, ["library", "approve", cid, "--by", "wang", "--force", *out, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["status"] == "approved"
    res = runner.invoke(app, ["library", "build", *out, "--json"])  # rebuild keeps the decision
    assert res.exit_code == 0 and json.loads(res.stdout)["decisions_kept"] >= 1
    assert runner.invoke(app, ["library", "publish", *out, "--json"]).exit_code == 0
    res = runner.invoke(app, ["library", "list", "--status", "published", *out, "--json"])
    assert [json.loads(x)["case_id"] for x in res.stdout.splitlines()] == [cid]
    res = runner.invoke(app, ["library", "coverage", *out, "--json"])
    assert res.exit_code == 0, res.output
    cov = json.loads(res.stdout)
    assert 0 < cov["coverage"] <= 1 and {"coverage", "by_type", "gaps"} <= set(cov)
    assert cov["gaps"] == sorted(cov["gaps"], key=lambda g: -g["cases"])
    res = runner.invoke(app, ["library", "coverage", "--since", "yesterday", *out])
    assert res.exit_code == 2
    res = runner.invoke(app, ["library", "list", "--status", "bogus", *out])
    assert res.exit_code == 1 and "unknown status" in res.output


def test_build_reads_in_blocks_keeps_newest_rows_and_embeds_only_eligible(stored, cfg):
    """The nightly build reads the stored cases block by block: the same cases as reading them at
    once (a case re-processed by a later run counts once, with its newer row), and only cases that
    can become candidates reach the encoder."""
    from pipeline.library.sources import iter_library_cases, load_library_cases
    from pipeline.library.typical_cases import build
    from pipeline.storage.store import read_cases, write_cases

    first = read_cases(stored)
    again = first.head(5).copy()
    again["problem"] = "重新处理后的问题：快递三天没到"
    write_cases(stored, again, "run2", 0)  # run ids order runs: run2 is newer than run1

    whole = load_library_cases(cfg, stored).sort_values("case_id").reset_index(drop=True)
    blocks = list(iter_library_cases(cfg, stored, block_rows=1))
    assert len(blocks) > 1
    streamed = pd.concat(blocks, ignore_index=True).sort_values("case_id").reset_index(drop=True)
    assert streamed["case_id"].tolist() == whole["case_id"].tolist()
    assert streamed["case_id"].is_unique and len(streamed) == len(first)
    redone = streamed.set_index("case_id").loc[again["case_id"], "problem"]
    assert (redone == "重新处理后的问题：快递三天没到").all()

    enc = HashingEmbedder()
    built = build(cfg, stored, embedder=enc)
    scorer = CandidateScorer.from_config(cfg)
    eligible = sum(scorer.assess(r)[0] for r in whole.to_dict("records"))
    assert built["cases"] == len(whole) and built["eligible"] == eligible > 0
    # Only the cases a group's pick may reach are encoded (each group's best, see
    # select_candidates_in_blocks), never more than the eligible ones.
    assert 0 < sum(enc.calls) <= eligible < len(whole)


def _legacy_selection(cfg, out):
    """The build's selection before the per-group pools: every eligible row kept, all embedded at
    once, `select_candidates` over the whole frame with the members' cluster map."""
    from pipeline.library.candidates import case_texts, cluster_map
    from pipeline.library.sources import iter_library_cases, load_members

    scorer = CandidateScorer.from_config(cfg)
    rows = pd.concat([b[[scorer.assess(r)[0] for r in b.to_dict("records")]] for b in iter_library_cases(cfg, out)],
                     ignore_index=True)
    vec = HashingEmbedder().encode_passages(case_texts(rows))
    return select_candidates(rows, vec, scorer, cluster_map(load_members(out)))


def test_build_selection_equals_the_whole_table_selection(stored, cfg):
    """The bounded build picks exactly what selecting over every eligible row at once picks: the
    same candidates (ids, scores, reasons, parts, groups) in the same order, with clusters read
    from the members' four columns as cluster_map reads them."""
    from dataclasses import asdict

    from pipeline.insights.export import export_all
    from pipeline.library.candidates import cluster_map
    from pipeline.library.sources import load_cluster_lookup, load_members
    from pipeline.library.typical_cases import select_from_store

    export_all(cfg, stored, embedder=HashingEmbedder())
    members = load_members(stored)
    assert members is not None and members["cluster_id"].notna().any()
    cmap = cluster_map(members)
    ids = sorted(set(members["case_id"].astype(str))) + ["no-such-case"]
    assert load_cluster_lookup(stored)(ids) == [cmap.get(i) for i in ids]

    small = cfg.model_copy(update={"library": cfg.library.model_copy(update={"per_group": 2})})
    for c in (cfg, small):
        want, want_counts = _legacy_selection(c, stored)
        got, got_counts = select_from_store(c, stored, HashingEmbedder())
        assert [asdict(x) for x in got] == [asdict(x) for x in want] and len(got) > 0
        assert {k: got_counts[k] for k in ("eligible", "groups", "candidates")} == {
            k: want_counts[k] for k in ("eligible", "groups", "candidates")}
        assert any(g.startswith("cluster:") for x in got for g in x.groups)



@pytest.fixture(scope="module")
def processed(cfg, sample):
    """The sample's cases through every nightly step (curves and issue types stored)."""
    from pipeline.ingest import discover, read_file
    from pipeline.orchestrate.steps import process_conversations

    convs = [c for f in discover(sample[0]) for c in read_file(f, cfg.ingest).conversations]
    return process_conversations(convs, cfg).cases


@pytest.fixture(params=["fresh", "aged"])
def history(request, processed, tmp_path):
    """A store of real-shaped cases. fresh: as the nightly steps store them (every block is read
    narrowed). aged: partitions written before the emotion step ran (no curves at all: computed
    in memory from the narrowed read), half of them, in their own part files, also before the
    classify step (no issue types: classified in memory, those blocks read whole)."""
    from pipeline.schema import CASE_EMOTION_COLUMNS, CLASSIFY_COLUMNS, EMOTION_COLUMNS
    from pipeline.storage.store import write_cases

    if request.param == "fresh":
        # Deltas as an older emotion model left them: stored curves are read, never recomputed.
        write_cases(tmp_path, processed.assign(emotion_delta=processed["emotion_delta"] - 0.05), "run0", 0)
        return request.param, tmp_path
    old = processed.drop(columns=[*CASE_EMOTION_COLUMNS, *EMOTION_COLUMNS])
    write_cases(tmp_path, old.iloc[::2], "run0", 0)
    write_cases(tmp_path, old.iloc[1::2].drop(columns=list(CLASSIFY_COLUMNS)), "run0", 1)
    return request.param, tmp_path


def test_narrowed_build_equals_selection_over_every_column(history, cfg):
    """The build reads only the columns selection reads (sources.SELECTION_COLUMNS), yet picks
    what `select_candidates` picks over `load_library_cases` (every column), on stored curves and
    types as on blocks whose curves are computed or types classified in memory: a column missing
    from the list (a part, a reason, a score, a curve or a type computed without it) differs."""
    from dataclasses import asdict

    from pipeline.library.candidates import case_texts, select_candidates_in_blocks
    from pipeline.library.sources import SELECTION_COLUMNS, iter_library_blocks, load_library_cases
    from pipeline.schema import CASE_COLUMNS

    kind, out = history
    assert set(SELECTION_COLUMNS) < set(CASE_COLUMNS)
    small = cfg.model_copy(update={"library": cfg.library.model_copy(update={"per_group": 2})})
    for c in (cfg, small):
        # Completed under the same config as the build: the cold-start classifier's encoder is
        # cached per config, and an earlier test of the session may have cached a fake one for
        # one of them (a monkeypatched Embedder), which types the aged cases differently.
        whole = load_library_cases(c, out)
        assert whole["emotion_delta"].notna().any() and whole["issue_type"].notna().all()
        scorer = CandidateScorer.from_config(c)
        want, want_counts = select_candidates(whole, HashingEmbedder().encode_passages(case_texts(whole)), scorer)
        # What the stored columns feed: turning points, the recovery from the lowest point, context.
        assert len(want) > 2 and any("turning_point" in x.parts for x in want)
        assert any("从低点" in r for x in want for r in x.reasons)
        assert any("地区:" in x.parts["context"] and "商品:" in x.parts["context"] for x in want)
        for block_rows in (1, 100_000):  # blocks of one part file, one block
            read: list[set[str]] = []

            def blocks(c=c, n=block_rows, s=scorer, read=read):
                for block, n_read in iter_library_blocks(c, out, n, s.may_pass):
                    read.append(set(block.columns))
                    yield block, n_read

            got, counts = select_candidates_in_blocks(blocks, lambda t: HashingEmbedder().encode_passages(t), scorer)
            assert [asdict(x) for x in got] == [asdict(x) for x in want]
            assert counts == want_counts
            # Which blocks were read narrowed (a whole read brings the classifier's evidence).
            narrowed = sum("evidence" not in cols for cols in read)
            if kind == "fresh":
                assert narrowed == len(read) > 0
            else:
                assert (0 < narrowed < len(read)) if block_rows == 1 else narrowed == 0


def test_cluster_lookup_answers_as_cluster_map(tmp_path):
    """The sorted-id lookup answers every id as `cluster_map` does: the own-scope row first, ids
    before, between and after the stored ones, prefixes of them, non-ASCII ids, null ids and
    clusters left out, and no members at all."""
    from pipeline.library.candidates import cluster_map
    from pipeline.library.sources import load_cluster_lookup

    assert load_cluster_lookup(tmp_path)(["a"]) == [None]
    folder = tmp_path / "exports" / "d1"
    folder.mkdir(parents=True)
    (tmp_path / "exports" / "LATEST").write_text("d1", encoding="utf-8")
    members = pd.DataFrame(
        [("b2", "all", "物流", "A1"), ("b2", "物流", "物流", "T1"), ("案例7", "all", "发票", "A2"),
         ("b", "all", None, "A3"), ("c", "all", "物流", None), ("c", "物流", "物流", "T2"),
         (None, "all", "物流", "A9"), ("d", "all", "物流", None), ("b10", "发票", "发票", "T3"),
         ("b10", "all", "发票", "A4")],
        columns=["case_id", "scope", "issue_type", "cluster_id"])
    members.to_parquet(folder / "members.parquet")
    want = cluster_map(members)
    asked = ["b2", "案例7", "b", "c", "d", "b10", "a", "b1", "b20", "zz", "案例", "案例70", "", "b2"]
    assert load_cluster_lookup(tmp_path)(asked) == [want.get(i) for i in asked]
    assert [want.get(i) for i in ("b2", "c", "d", "b10")] == ["T1", "T2", None, "T3"]
    assert load_cluster_lookup(tmp_path)([]) == []
    members[members["case_id"] == "nobody"].to_parquet(folder / "members.parquet")
    assert load_cluster_lookup(tmp_path)(["b2"]) == [None]


def test_cluster_lookup_reads_row_groups_and_files_in_their_order(tmp_path):
    """Members spread over files of small row groups are read a row group at a time, and still
    answer as `cluster_map` of them all in order: a case's own-scope row wins wherever it lies,
    else its first row across files; a cluster named again in a later file keeps one code."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.library.candidates import cluster_map
    from pipeline.library.sources import load_cluster_lookup

    folder = tmp_path / "exports" / "d1" / "members.parquet"
    folder.mkdir(parents=True)
    (tmp_path / "exports" / "LATEST").write_text("d1", encoding="utf-8")
    rng = np.random.default_rng(3)
    rows = [
        (f"c{rng.integers(40)}", ("all", "物流", "发票")[rng.integers(3)], ("物流", "发票", None)[rng.integers(3)],
         None if rng.random() < 0.1 else f"K{rng.integers(6)}")
        for _ in range(300)
    ]
    members = pd.DataFrame(rows, columns=["case_id", "scope", "issue_type", "cluster_id"])
    for i, (a, b) in enumerate(((0, 120), (120, 121), (121, 300))):
        kind = (pa.string(), pa.large_string())[i % 2]
        part = pa.table({c: pa.array(members[c].iloc[a:b], kind, from_pandas=True) for c in members.columns})
        pq.write_table(part, folder / f"part-{i:06d}.parquet", row_group_size=7)
    want = cluster_map(members)
    asked = [f"c{i}" for i in range(45)]
    assert len(want) > 20
    assert load_cluster_lookup(tmp_path)(asked) == [want.get(i) for i in asked]


def test_cluster_lookup_answers_the_same_when_ids_share_a_hash(tmp_path, monkeypatch):
    """Two stored ids with one hash would make the hash search miss one: the lookup then searches
    the ids themselves, and answers as with distinct hashes. A hash hit on an id not stored (a
    collision with an asked id) is checked against the id and answers None."""
    import pipeline.library.sources as src

    folder = tmp_path / "exports" / "d1"
    folder.mkdir(parents=True)
    (tmp_path / "exports" / "LATEST").write_text("d1", encoding="utf-8")
    ids = [f"case-{i}" for i in range(50)] + ["案例", "x"]
    pd.DataFrame(
        {"case_id": ids, "scope": "all", "issue_type": "物流", "cluster_id": [f"C{i % 7}" for i in range(52)]}
    ).to_parquet(folder / "members.parquet")
    asked = ["case-3", "x", "nobody", "案例", "case-49", "case-5"]
    want = src.load_cluster_lookup(tmp_path)(asked)
    assert want == ["C3", "C2", None, "C1", "C0", "C5"]
    assert isinstance(src.load_cluster_lookup(tmp_path), src._HashedLookup)
    real = src._id_hash
    # Every id hashed to its length: many stored ids share a hash.
    monkeypatch.setattr(src, "_id_hash", lambda v: np.array([len(x) for x in v], dtype=np.uint64))
    lookup = src.load_cluster_lookup(tmp_path)
    assert not isinstance(lookup, src._HashedLookup)
    assert lookup(asked) == want
    # Distinct stored hashes, but "nobody" hashed as "case-3" is: found by its hash, refused by its id.
    monkeypatch.setattr(src, "_id_hash", lambda v: real(["case-3" if x == "nobody" else x for x in v]))
    lookup = src.load_cluster_lookup(tmp_path)
    assert isinstance(lookup, src._HashedLookup)
    assert lookup(asked) == want


@pytest.mark.parametrize("reserve", [1, 4])
def test_blocked_selection_with_tiny_pools_reads_again_until_exact(scorer, reserve, monkeypatch):
    """Copies and near-copies make the greedy pick skip cases; a group whose pool runs out before
    its pick fills takes more from its reserve, or is read again with a bigger pool once that is
    used up (at once with `reserve` 1), so even a pool of one case per group gives exactly the
    whole-table pick. Copies of a text are pooled once only while a text's vector is
    similar enough to itself to be skipped (not with short vectors, whose copies can all be picked)."""
    from dataclasses import asdict

    import pipeline.library.candidates as candidates
    from pipeline.library.candidates import case_texts, select_candidates_in_blocks

    monkeypatch.setattr(candidates, "RESERVE", reserve)
    rows = []
    for i in range(60):
        # Copies and near-copies (similarity about 0.97) with high scores, distinct texts lower down.
        problem = f"快递三天还没到，今天能不能送到，着急用，麻烦加急处理{'啊呀哦'[i // 12 % 3]}"
        delta = 0.9 - (i // 12) / 10 if i % 4 else 0.2 + (i % 7) / 10
        problem = problem if i % 4 else f"发票抬头第{i}次开错了要重开"
        rows.append(_case(f"c{i:03d}", problem, delta=delta, itype=("物流配送", "发票")[i % 2]))
    rows.append(_case("x", "太长", n_chars=5000))
    cases = pd.DataFrame(rows)
    clusters = {f"c{i:03d}": f"C{i % 3}" for i in range(0, 60, 2)}
    ok = [scorer.assess(r)[0] for r in cases.to_dict("records")]
    reads = []

    def blocks():
        reads.append(1)
        return (cases.iloc[i : i + 7].reset_index(drop=True) for i in range(0, len(cases), 7))

    def unit(texts):
        return HashingEmbedder().encode(texts)

    def short(texts):  # v.v = 0.25 < max_similarity: even copies are not skipped
        return 0.5 * HashingEmbedder().encode(texts)

    for encode in (unit, short):
        want, want_counts = select_candidates(
            cases[ok].reset_index(drop=True), encode(case_texts(cases[ok])), scorer, clusters)
        by_group: dict[str, list[str]] = {}
        for c in want:
            for g in c.groups:
                by_group.setdefault(g, []).append(c.parts["problem"])
        copies = any(len(set(t)) < len(t) for t in by_group.values())
        assert len(want) > 2 and copies == (encode is short)
        for pool in (1, 3, 100):
            reads.clear()
            got, counts = select_candidates_in_blocks(blocks, encode, scorer,
                                                      lambda ids: [clusters.get(i) for i in ids], pool=pool)
            assert [asdict(c) for c in got] == [asdict(c) for c in want]
            assert counts == {**want_counts, "cases": len(cases)}
            if pool == 1 and reserve == 1:
                assert len(reads) > 1
            if pool == 100 and encode is unit:
                assert len(reads) == 1  # whole groups fit: one read


def test_newest_row_mask_keeps_the_rows_newest_rows_keeps():
    """The build picks each id's current row from Arrow columns; it must be the row the case
    store's reader keeps (newest run, the last within a run, a missing run id sorting last)."""
    import pyarrow as pa

    from pipeline.library.sources import newest_row_mask
    from pipeline.storage.store import newest_rows

    rng = np.random.default_rng(3)
    n = 400
    ids = [None if rng.random() < 0.03 else f"c{rng.integers(0, 90)}" for _ in range(n)]
    runs = [None if rng.random() < 0.05 else f"2025{rng.integers(1, 4):02d}-r" for _ in range(n)]
    keys = pd.DataFrame({"case_id": ids, "run_id": runs, "_row": np.arange(n)})
    want = np.zeros(n, dtype=bool)
    want[newest_rows(keys)["_row"].to_numpy()] = True
    got = newest_row_mask(pa.table({"case_id": pa.array(ids, pa.string()), "run_id": pa.array(runs, pa.string())}))
    assert want.sum() < n and (got == want).all()
    empty = pa.table({"case_id": pa.array([], pa.string()), "run_id": pa.array([], pa.string())})
    assert not newest_row_mask(empty).any()


# -- the nightly build's prefilter (CandidateScorer.may_pass) -------------------------------------

def _variants(cfg, prefix, day, run="run1", emotion=True, n=160):
    """Cases around every hard rule's bound, each attribute drawn on its own: outcome, part
    lengths (2 characters is enough), actions, length in characters and turns, emotion improved
    or not (null, NaN). Without `emotion`: an old partition, whose curves are computed in memory."""
    lib = cfg.library
    rng = np.random.default_rng(len(prefix) * 7 + ord(prefix[0]))
    chars = (lib.min_chars - 1, lib.min_chars, 300, lib.max_chars, lib.max_chars + 1)
    pick = {
        "outcome": ("resolved", "resolved", "unresolved", None),
        "problem": ("快递三天还没到", "发票抬头开错了要重开", "退款", "快", None),
        "handling": ("已为您催促站点加急派送", "申请补发", "催促", "您好亲", "催", None),
        "n_turns": (3, lib.max_turns, lib.max_turns + 1),
        "emotion_delta": (0.5, 0.3, 0.8, 0.0, None, float("nan")),
        "issue_type": ("物流配送", "发票", None),
    }
    rows = []
    for i in range(n):
        r = _case(f"{prefix}{i:03d}", "")
        r.update({k: v[rng.integers(len(v))] for k, v in pick.items()})
        m = chars[rng.integers(len(chars))]
        r.update(customer_text="客" * (m // 3), agent_text="服" * (m - m // 3), date=day, run_id=run)
        r["turns"] = [dict(t) for t in TURNS]
        del r["turning_points"]
        if not emotion:
            for c in ("emotion_start", "emotion_end", "emotion_min", "emotion_delta", "emotion_trajectory"):
                del r[c]
        rows.append(r)
    return pd.DataFrame(rows)


@pytest.fixture()
def varied(cfg, tmp_path):
    """A store of `_variants`: new partitions, an old one without emotion curves, a part whose only
    rows without an emotion_delta are the resolved ones (a filter that kept only those and let the
    in-memory completion decide would compute curves the unfiltered block never had), and a later
    run re-writing some cases with their outcome flipped."""
    from pipeline.storage.store import write_cases

    write_cases(tmp_path, _variants(cfg, "a", "2025-01-01"), "run1", 0)
    write_cases(tmp_path, _variants(cfg, "b", "2025-01-02", emotion=False), "run1", 1)
    mixed = _variants(cfg, "c", "2025-01-03")
    resolved = mixed["outcome"] == "resolved"
    mixed.loc[resolved, "emotion_delta"] = None
    mixed.loc[~resolved, "emotion_delta"] = 0.5
    write_cases(tmp_path, mixed, "run1", 2)
    again = _variants(cfg, "a", "2025-01-01", run="run2").iloc[::4].copy()
    again["outcome"] = again["outcome"].map({"resolved": "unresolved"}).fillna("resolved")
    write_cases(tmp_path, again, "run2", 0)
    return tmp_path


def test_may_pass_keeps_every_row_assess_accepts(cfg, varied):
    """The prefilter is a superset of the eligible rows (each of its rules a necessary condition
    of `assess`), on rows exactly at each bound, and it does drop rows."""
    from pipeline.storage.store import read_parts, stored_parts

    table = read_parts(stored_parts(varied))
    scorer = CandidateScorer.from_config(cfg)
    keep = scorer.may_pass(table)
    ok = np.array([scorer.assess(r)[0] for r in table.to_pandas().to_dict("records")])
    assert ok.sum() > 0 and not (ok & ~keep).any()
    assert keep.sum() < len(table) / 2  # most rows never reach assess
    # Each bound is met by some eligible row: a filter off by one on any of them drops it.
    rows = table.to_pandas()[ok]
    n_chars = rows["customer_text"].str.len() + rows["agent_text"].str.len()
    assert {cfg.library.min_chars, cfg.library.max_chars} <= set(n_chars)
    assert cfg.library.max_turns in set(rows["n_turns"])
    assert {2} <= set(rows["problem"].str.len()) & set(rows["handling"].str.len())
    assert not scorer.may_pass(table, emotion_known=True)[np.isnan(table["emotion_delta"].to_numpy(
        zero_copy_only=False).astype(float))].any()
    assert scorer.may_pass(table.slice(0, 0)).shape == (0,)


@pytest.mark.parametrize("block_rows", [1, 100_000])
def test_prefiltered_build_equals_the_unfiltered_one(cfg, varied, monkeypatch, block_rows):
    """The nightly build with rows dropped in Arrow picks the same candidates with the same counts
    as without (old partitions completed in memory, newest rows, per-block emotion decision), and
    only the rows that pass the prefilter become Python rows and are assessed."""
    from dataclasses import asdict

    from pipeline.library.candidates import select_candidates_in_blocks
    from pipeline.library.sources import iter_library_blocks

    small = cfg.model_copy(update={"library": cfg.library.model_copy(update={"per_group": 2})})
    # Without the emotion rule rows with no emotion_delta pass the filter: a block whose kept rows
    # all lack one must still not have curves computed unless the whole block lacked them.
    loose = cfg.model_copy(update={"library": cfg.library.model_copy(update={"require_emotion_improved": False})})
    for c in (cfg, small, loose):
        scorer = CandidateScorer.from_config(c)
        clusters = lambda ids: [None if int(i[1:]) % 3 == 0 else f"C{int(i[1:]) % 2}" for i in ids]  # noqa: E731

        def run(keep):
            calls = []
            real = CandidateScorer.judge  # assess, as the block build calls it
            monkeypatch.setattr(CandidateScorer, "judge", lambda self, r: calls.append(1) or real(self, r))
            try:
                got = select_candidates_in_blocks(lambda: iter_library_blocks(c, varied, block_rows, keep),
                                                  lambda t: HashingEmbedder().encode_passages(t), scorer, clusters)
            finally:
                monkeypatch.setattr(CandidateScorer, "judge", real)
            return got, len(calls)

        (want, want_counts), all_calls = run(None)
        (got, counts), few_calls = run(scorer.may_pass)
        assert [asdict(x) for x in got] == [asdict(x) for x in want] and len(got) > 2
        assert counts == want_counts and counts["cases"] == 160 * 3 and counts["eligible"] > 0
        assert any(g.startswith("cluster:") for x in got for g in x.groups)
        assert counts["eligible"] <= few_calls < all_calls / 2
    # Read alone, the old partition's cases are eligible through the curves computed in memory.
    assert any(x.case_id.startswith("b") for x in want) == (block_rows == 1)
