"""A run reads its input in chunks (`flow.chunk_mb`): big JSONL files are cut between lines, each
chunk is processed and committed on its own, and the result equals reading everything at once."""

import json

import pytest

from pipeline.config import load_config
from pipeline.ingest import read_file
from pipeline.ingest.spans import Span, spans
from pipeline.orchestrate import nightly as steps
from tests.conftest import REPO


def _chat(i: int) -> str:
    return json.dumps(
        {
            "conversation_id": f"c{i:05d}",
            "channel": "chat",
            "turns": [
                {"speaker": "customer", "text": f"第{i}单的快递三天没到，什么时候能送到？"},
                {"speaker": "agent", "text": "亲，我帮您催一下物流，今天会有回复。"},
            ],
        },
        ensure_ascii=False,
    )


@pytest.fixture()
def big_jsonl(tmp_path):
    lines = [_chat(i) for i in range(300)]
    lines[217] = '{"conversation_id": "broken", "turns": ['  # line 218 of the file
    p = tmp_path / "in" / "chats.jsonl"
    p.parent.mkdir()
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_spans_cut_between_lines_and_cover_the_file(big_jsonl):
    size = big_jsonl.stat().st_size
    cuts = spans(big_jsonl, size, 4_000)
    assert len(cuts) > 5
    data = big_jsonl.read_bytes()
    assert cuts[0].start == 0 and cuts[-1].end == size
    for a, b in zip(cuts, cuts[1:]):
        assert a.end == b.start and data[a.end - 1 : a.end] == b"\n"
        assert b.first_line == a.first_line + data[a.start : a.end].count(b"\n")
    # Files that cannot be cut between records are one span whatever their size: a JSON
    # document, and a CSV whose first line is no header naming conversation_id and text.
    for suffix in (".json", ".csv"):
        other = big_jsonl.with_suffix(suffix)
        other.write_bytes(data)
        assert spans(other, size, 4_000) == [Span(0, size)]


def test_a_span_reads_like_the_whole_file(big_jsonl):
    cfg = load_config(REPO / "configs" / "casemine.yaml").ingest
    whole = read_file(big_jsonl, cfg, root=big_jsonl.parent)
    parts = [
        read_file(big_jsonl, cfg, root=big_jsonl.parent, span=s)
        for s in spans(big_jsonl, big_jsonl.stat().st_size, 4_000)
    ]
    assert [c.conversation_id for p in parts for c in p.conversations] == [
        c.conversation_id for c in whole.conversations
    ]
    assert [c.source_line for p in parts for c in p.conversations] == [c.source_line for c in whole.conversations]
    bad = [q for p in parts for q in p.quarantined]
    assert [(q.line, q.byte_offset, q.reason) for q in bad] == [
        (q.line, q.byte_offset, q.reason) for q in whole.quarantined
    ]
    assert bad[0].line == 218


_ASR_HEADER = "conversation_id,channel_id,begin_ms,end_ms,text,started_at"
_STARTED = "2025-10-29T12:26:53+08:00"


def _call_rows(i: int, n: int = 4) -> list[str]:
    return [
        f"CALL-{i:04d},{r % 2},{r * 3000},{r * 3000 + 2500},第{i}通电话第{r}句快递三天没到请帮我查一下,{_STARTED}"
        for r in range(n)
    ]


@pytest.fixture(params=["utf-8-sig", "gb18030"])
def big_csv(tmp_path, request):
    """ASR rows of 120 calls, with what csvrows must read alike whole or in spans: a quoted cell
    over three lines (with commas), a quote never closed,
    a header pasted again mid-file, a blank line, and CRLF line ends in one stretch."""
    lines = [_ASR_HEADER]
    for i in range(120):
        rows = _call_rows(i)
        if i == 30:
            rows[1] = 'CALL-0030,0,3000,5500,"我要投诉\n你们的快递,三天没到\n到底怎么回事",2025-10-29T12:26:53+08:00'
        if i == 55:
            rows[2] = 'CALL-0055,1,6000,8500,"这一句的引号没有关上,2025-10-29T12:26:53+08:00'
        if i == 70:
            lines.append(_ASR_HEADER)
        if i == 80:
            lines.append("")
        if 90 <= i < 95:
            rows = [r + "\r" for r in rows]
        lines.extend(rows)
    p = tmp_path / "in" / "calls.csv"
    p.parent.mkdir()
    p.write_bytes(("\n".join(lines) + "\n").encode(request.param))
    return p


def _read_in_spans(path, max_bytes):
    cfg = load_config(REPO / "configs" / "casemine.yaml").ingest
    cuts = spans(path, path.stat().st_size, max_bytes)
    return cuts, read_file(path, cfg, root=path.parent), [read_file(path, cfg, root=path.parent, span=s) for s in cuts]


def _conversations(results):
    return [
        (c.conversation_id, c.source_line, [(t.speaker, t.text) for t in c.turns])
        for r in results
        for c in r.conversations
    ]


def test_a_big_csv_is_cut_between_conversations_and_reads_like_the_whole_file(big_csv):
    """Each later span is read behind the header line; its conversations, their turns, and the
    quarantined rows with their line numbers and byte offsets are those of the whole file.
    Spans of many sizes, so that cuts fall next to each of the fixture's traps."""
    data = big_csv.read_bytes()
    for max_bytes in range(400, 4_000, 90):
        cuts, whole, parts = _read_in_spans(big_csv, max_bytes)
        assert len(cuts) > 4 and cuts[0].start == 0 and cuts[-1].end == len(data)
        for a, b in zip(cuts, cuts[1:]):
            assert a.end == b.start and data[a.end - 1 : a.end] == b"\n"
            assert b.first_line == a.first_line + data[a.start : a.end].count(b"\n")
            before, after = data[: b.start].splitlines()[-1], data[b.start :].split(b"\n", 1)[0]
            assert before.split(b",")[0] != after.split(b",")[0]  # never inside a conversation
        assert _conversations(parts) == _conversations([whole])
        bad = [q for p in parts for q in p.quarantined]
        assert [(q.line, q.byte_offset, q.reason, q.conversation_id) for q in bad] == [
            (q.line, q.byte_offset, q.reason, q.conversation_id) for q in whole.quarantined
        ]
    assert len(whole.conversations) == 119
    call_30 = next(c for c in whole.conversations if c.conversation_id == "CALL-0030")
    assert call_30.turns[1].text.count("\n") == 2  # the quoted cell kept its line breaks
    assert [q.conversation_id for q in whole.quarantined] == ["CALL-0055"]


def test_rows_of_one_conversation_far_apart_keep_their_spans_together(tmp_path):
    """csvrows gathers a conversation's rows wherever they lie in the file; a cut between them
    would split it across chunks (each part then a different version of one conversation), so
    the spans it would cross are joined."""
    lines = [_ASR_HEADER, *_call_rows(0, 2)]
    for i in range(1, 100):
        lines += _call_rows(i)
        if i == 40:
            lines += _call_rows(0, 4)[2:]  # the rest of call 0, 40 calls further on
    p = tmp_path / "calls.csv"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cuts, whole, parts = _read_in_spans(p, 1_500)
    data = p.read_bytes()
    last_of_call_0 = data.rindex(b"CALL-0000")
    assert cuts[1].start > last_of_call_0 and len(cuts) > 3
    assert _conversations(parts) == _conversations([whole])
    assert [len(c.turns) for c in whole.conversations if c.conversation_id == "CALL-0000"] == [4]


def test_a_run_reads_a_big_csv_in_chunks(big_csv, tmp_path):
    """The planner cuts the CSV like JSONL: several chunks, the file stamped by its last piece."""
    cfg = load_config(REPO / "configs" / "casemine.yaml")
    ctx = steps.start_run(cfg, big_csv.parent, tmp_path / "out")
    try:
        pieces = [p for plan in steps.plan_chunks(ctx, chunk_bytes=3_000) for p in plan.pieces]
    finally:
        ctx.close()
    assert len(pieces) > 3 and [p.stamp is not None for p in pieces][-1] and pieces[0].span.header is None
    assert all(p.span.header is not None for p in pieces[1:])


def test_plan_stamps_a_file_only_with_its_last_piece(big_jsonl, tmp_path):
    cfg = load_config(REPO / "configs" / "casemine.yaml")
    (big_jsonl.parent / "small.jsonl").write_text(_chat(999) + "\n", encoding="utf-8")
    ctx = steps.start_run(cfg, big_jsonl.parent, tmp_path / "out")
    try:
        plans = list(steps.plan_chunks(ctx, chunk_bytes=10_000))
        pieces = [p for plan in plans for p in plan.pieces]
        assert len(plans) > 3 and [plan.number for plan in plans] == list(range(len(plans)))
        big = [p for p in pieces if p.path == big_jsonl]
        assert [p.stamp is not None for p in big] == [False] * (len(big) - 1) + [True]
        assert [p.first for p in big] == [True] + [False] * (len(big) - 1)
        assert {p.path.name for p in pieces} == {"chats.jsonl", "small.jsonl"}
        assert steps.whole_input(ctx).pieces == tuple(
            steps.InputPiece(p.path, Span(0, p.path.stat().st_size), p.stamp, True) for p in pieces if p.stamp
        )
    finally:
        ctx.close()


def test_chunks_commit_under_their_own_run_ids(big_jsonl, tmp_path, monkeypatch):
    """Each chunk is a commit of its own (a crash loses at most the chunk in flight); the summary
    adds them up and reconciles. With CASEMINE_MEMLOG the runner logs each step's peak memory
    once per chunk for the chunk steps, once per run for the others."""
    cfg = load_config(REPO / "configs" / "casemine.yaml").with_overrides(flow={"chunk_mb": 0.01})
    memlog = tmp_path / "mem.jsonl"
    monkeypatch.setenv("CASEMINE_MEMLOG", str(memlog))
    # Each step hands what it freed back to the OS (glibc's heap and Arrow's pool) before its
    # memory is logged, so a chunk's RSS is what it holds, not what allocators keep.
    events: list[str] = []
    release, ended = steps.release_unused_memory, steps.step_ended
    monkeypatch.setattr(steps, "release_unused_memory", lambda: (events.append("release"), release()))
    monkeypatch.setattr(steps, "step_ended", lambda step, chunk: (events.append(step), ended(step, chunk)))
    s = steps.run_pipeline(cfg, big_jsonl.parent, tmp_path / "out")
    monkeypatch.delenv("CASEMINE_MEMLOG")
    assert len(events) > 8 and all(events[i - 1] == "release" for i, e in enumerate(events) if e != "release")
    logged = [json.loads(x) for x in memlog.read_text(encoding="utf-8").splitlines()]
    done = [(r["step"], r["chunk"]) for r in logged if r["step"] not in ("start", "between", "no-reset")]
    assert logged[0]["step"] == "start" and all(r["peak_mib"] > 0 for r in logged)
    # The RSS each step leaves, split into what the run holds and the pages of files it maps.
    assert all(0 < r["anon_mib"] <= r["rss_mib"] and 0 <= r["file_mib"] <= r["rss_mib"] for r in logged)
    assert done == [(st, c) for c in s["chunks"] for st in ("ingest", "process", "index", "commit")] + [
        (st, None) for st in ("export", "library", "summary")
    ]
    assert len(s["chunks"]) >= 4 and s["chunks"][0] == s["run_id"]
    assert all(c == f"{s['run_id']}-c{i:04d}" for i, c in enumerate(s["chunks"]) if i)
    assert s["records"] == {"read": 300, "accepted": 299, "duplicates": 0, "quarantined": 1, "reconciles": True}
    assert s["cases"]["written"] == 299 and s["index"]["total"] == 299 and s["index"]["added"] == 299
    assert s["files"]["read"] == 1 and s["files"]["encodings"] == {"utf-8": 1}
    again = steps.run_pipeline(cfg, big_jsonl.parent, tmp_path / "out")
    assert again["files"] == {"read": 0, "skipped_unchanged": 1, "encodings": {}}
    assert again["cases"]["written"] == 0


def test_the_encoder_is_let_go_before_the_export(big_jsonl, tmp_path, monkeypatch):
    """The chunk steps embed (classify, index); the export and the library read the cache. The
    model the chunks loaded is gone, with no reference left anywhere, when the export starts, so
    it does not sit under the export's re-cluster, the step that grows with the history."""
    import gc
    import weakref

    from pipeline.embed import embedder as E

    cfg = load_config(REPO / "configs" / "casemine.yaml").with_overrides(flow={"chunk_mb": 0.01})
    held: list[weakref.ref] = []
    alive_at_export: list[int] = []
    started = steps.step_started

    def watch(step: str, chunk: str | None) -> None:
        if step == "commit" and not held:  # the first chunk's classify and index loaded it
            held.extend(weakref.ref(m) for m, _ in E._MODELS.values())
            held.extend(weakref.ref(o) for o in E._ONNX.values())
        if step == "export":
            gc.collect()
            alive_at_export.append(sum(r() is not None for r in held))
        started(step, chunk)

    monkeypatch.setattr(steps, "step_started", watch)
    s = steps.run_pipeline(cfg, big_jsonl.parent, tmp_path / "out")
    assert len(s["chunks"]) >= 4 and held, "the chunk steps loaded no model to let go"
    assert alive_at_export == [0]
    assert s["exports"]["n_clusters"] > 0 and s["cases"]["written"] == 299


def test_a_chunk_leaves_nothing_behind_for_the_next(big_jsonl, tmp_path, monkeypatch):
    """Memory must follow the chunk, not the run: at each chunk's commit the process holds that
    chunk's conversations and batch results at most, never those of the chunks before it (a list
    of per-chunk results kept for the summary, or a cache of conversations, would show here)."""
    import gc

    from pipeline.orchestrate.batch import BatchResult
    from pipeline.schema import Conversation

    cfg = load_config(REPO / "configs" / "casemine.yaml").with_overrides(flow={"chunk_mb": 0.01})
    live: list[tuple[int, int]] = []
    ended = steps.step_ended

    def count_at_commit(step: str, chunk: str | None) -> None:
        ended(step, chunk)
        if step == "commit":
            gc.collect()
            objs = gc.get_objects()
            live.append((sum(isinstance(o, Conversation) for o in objs), sum(isinstance(o, BatchResult) for o in objs)))

    monkeypatch.setattr(steps, "step_ended", count_at_commit)
    s = steps.run_pipeline(cfg, big_jsonl.parent, tmp_path / "out")
    n_chunks, accepted = len(s["chunks"]), s["records"]["accepted"]
    assert n_chunks >= 4 and len(live) == n_chunks
    # One chunk's worth (its conversations as received and as processed, its batches), whatever
    # the chunk's number: the last commit holds no more than the second.
    per_chunk = 2 * accepted / n_chunks + 30
    assert all(convs <= per_chunk for convs, _ in live), (live, per_chunk)
    assert all(results <= 2 for _, results in live), live
