"""The library build continues from yesterday's pools: a night that only adds cases reads only its
new parts and picks exactly what a build over every case picks; anything else that changed makes
it read everything (and say why)."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from datetime import date

import numpy as np
import pandas as pd
import pytest

from pipeline.embed.fake import HashingEmbedder
from pipeline.library.candidates import CandidateScorer, Fallback, case_texts, extend_selection, pool_selection
from test_library import _case

SAME = ("cases", "eligible", "groups", "candidates")


def _tiny_cases(n=60, prefix="c"):
    rows = []
    for i in range(n):
        problem = f"快递三天还没到，今天能不能送到，着急用，麻烦加急处理{'啊呀哦'[i // 12 % 3]}"
        delta = 0.9 - (i // 12) / 10 if i % 4 else 0.2 + (i % 7) / 10
        problem = problem if i % 4 else f"发票抬头第{i}次开错了要重开"
        rows.append(_case(f"{prefix}{i:03d}", problem, delta=delta, itype=("物流配送", "发票")[i % 2]))
    return pd.DataFrame(rows)


def _blocks(cases, size=7):
    return [cases.iloc[i : i + size].reset_index(drop=True) for i in range(0, len(cases), size)]


@pytest.mark.parametrize("spilled", [False, True])
@pytest.mark.parametrize("reserve", [1, 4])
@pytest.mark.parametrize("pool", [1, 3, 100])
def test_extending_equals_selecting_over_everything(cfg, pool, reserve, spilled, monkeypatch, tmp_path):
    """Old cases pooled first and new ones added later give the pick of one selection over all of
    them (candidates, order, groups, counts), in whatever order the new cases come, and only the
    new pooled cases (and reserve cases a deepened pick reaches) are encoded. A group short of
    picks takes its next texts from its pool's reserve; where only a whole read can be exact (the
    reserve used up, or none: `reserve` 1), the extension says so instead of guessing. The old
    pools kept in a spill file (`spilled`, as a build keeps them) give the same picks as the
    selection over everything kept in memory."""
    import pipeline.library.candidates as candidates
    from pipeline.library.spill import Spill

    monkeypatch.setattr(candidates, "RESERVE", reserve)
    scorer = CandidateScorer(cfg.library.model_copy(update={"per_group": 2}), ["催促", "加急", "补发"])
    cases = _tiny_cases()
    clusters = {f"c{i:03d}": f"C{i % 3}" for i in range(0, 60, 2)}
    lookup = lambda ids: [clusters.get(i) for i in ids]  # noqa: E731
    encoded: list[str] = []

    def encode(texts):
        encoded.extend(texts)
        return HashingEmbedder().encode(texts)

    spill = (lambda: Spill(tmp_path)) if spilled else (lambda: None)
    rng = np.random.default_rng(pool)
    outcomes = set()
    for _ in range(6):
        order = rng.permutation(len(cases))
        cut = int(rng.integers(5, 55))
        old, new = cases.iloc[order[:cut]], cases.iloc[order[cut:]]
        whole = pool_selection(lambda: _blocks(cases), encode, scorer, lookup, pool=pool)
        first = pool_selection(lambda: _blocks(old), encode, scorer, lookup, pool=pool, spill=spill())
        caps_before = dict(first.caps)
        reserved = {e.text for g, p in first.pools.pools.items() for e in p[first.caps.get(g, pool) :]}
        encoded.clear()
        more = extend_selection(first, _blocks(new.sample(frac=1, random_state=1)), encode, scorer, lookup)
        if isinstance(more, Fallback):
            assert more.reason == "short group" and pool < 100
            outcomes.add("whole read")
            # The read of everything starts from deeper pools for the short groups: same pick.
            assert any(more.caps.get(g, pool) > caps_before.get(g, pool) for g in more.caps)
            again = pool_selection(lambda: _blocks(cases), encode, scorer, lookup, pool=pool, caps=more.caps)
            assert [asdict(c) for c in again.candidates] == [asdict(c) for c in whole.candidates]
            # Given every case to read again, only the short groups' rows are judged again.
            first = pool_selection(lambda: _blocks(old), encode, scorer, lookup, pool=pool, spill=spill())
            more = extend_selection(first, _blocks(new), encode, scorer, lookup,
                                    reread=lambda groups: (_blocks(cases), lookup))
            assert not isinstance(more, Fallback) and more.counts["groups_read_again"] > 0
        else:
            outcomes.add("from the reserve" if more.counts["groups_deepened"] else "extended")
            assert more.counts["groups_read_again"] == 0
            # Old cases are encoded only from a reserve a deepened pick reached.
            assert set(encoded) <= set(case_texts(new)) | reserved
        assert [asdict(c) for c in more.candidates] == [asdict(c) for c in whole.candidates]
        assert {k: more.counts[k] for k in whole.counts} == whole.counts
    if pool == 1:
        assert ("whole read" if reserve == 1 else "from the reserve") in outcomes, outcomes


def test_a_group_with_every_text_pooled_is_never_read_again(cfg):
    """A group whose pool holds every distinct text it has (nothing was cut), and whose pick runs
    short because it has fewer different texts than the pick needs, stays short without any
    read of the old cases: copies of its texts and texts that fit its reserve are added from
    the night's cases alone, and the pick equals one over everything."""
    scorer = CandidateScorer(cfg.library.model_copy(update={"per_group": 3}), ["催促", "加急", "补发"])
    base = "快递三天还没到，今天能不能送到，着急用，麻烦加急处理，已经联系过两次了，页面显示异常"
    # Two texts, many copies each: the pick of three can never fill.
    old = pd.DataFrame([_case(f"o{i:03d}", base + "啊呀"[i % 2], delta=0.9 - i / 1000) for i in range(40)])
    # The night: more copies, and near-copies beyond the cap of 2 (but inside its reserve).
    new = pd.DataFrame(
        [_case(f"n{i:03d}", base + "啊呀"[i % 2], delta=0.95 - i / 1000) for i in range(20)]
        + [_case(f"m{i:03d}", base + chr(0x4E00 + 7 * i), delta=0.99 - i / 1000) for i in range(5)]
    )
    encode = HashingEmbedder().encode
    whole = pool_selection(lambda: _blocks(pd.concat([old, new])), encode, scorer, pool=2)
    first = pool_selection(lambda: _blocks(old), encode, scorer, pool=2)
    assert len(first.candidates) < 3 and not first.pools.cut  # short, but nothing left to find

    def no_read(groups):
        raise AssertionError(f"read again: {groups}")

    more = extend_selection(first, _blocks(new), encode, scorer, reread=no_read)
    assert not isinstance(more, Fallback) and more.counts["groups_deepened"] > 0
    assert [asdict(c) for c in more.candidates] == [asdict(c) for c in whole.candidates]
    assert {k: more.counts[k] for k in whole.counts} == whole.counts


def test_copies_kept_or_short_vectors_need_a_whole_read(cfg):
    """Vectors too short for a copy to count as similar to itself: copies were kept in the pools,
    and which pooled case stood for left-out copies depends on the read order, so no extension."""
    scorer = CandidateScorer(cfg.library.model_copy(update={"per_group": 2}), ["催促", "加急", "补发"])
    cases = _tiny_cases()

    def short(texts):
        return 0.5 * HashingEmbedder().encode(texts)

    first = pool_selection(lambda: _blocks(cases.iloc[:30]), short, scorer, pool=100)
    assert not first.copies_dropped
    assert extend_selection(first, _blocks(cases.iloc[30:]), short, scorer).reason == "copies kept"
    unit = pool_selection(lambda: _blocks(cases.iloc[:30]), HashingEmbedder().encode, scorer, pool=100)
    assert extend_selection(unit, _blocks(cases.iloc[30:]), short, scorer).reason == "copy margin"


# -- through the store and the export -------------------------------------------------------------


def _typed(cfg, prefix, day, **kw):
    """`_variants` as a night stores them: every case has an issue type (an untyped one is
    classified in memory at export, and the export then writes its members whole)."""
    from test_library import _variants

    cases = _variants(cfg, prefix, day, **kw)
    return cases.assign(issue_type=cases["issue_type"].fillna("其他"))


@pytest.fixture()
def night(cfg, tmp_path, monkeypatch):
    """A store with an export, as after a first night; `add(run, day, cases)` is a later night:
    its cases stored, then an incremental export."""
    import pipeline.embed
    from pipeline.insights.export import export_all
    from pipeline.storage.store import write_cases

    monkeypatch.setattr(pipeline.embed, "Embedder", lambda *a, **k: HashingEmbedder())
    write_cases(tmp_path, _typed(cfg, "a", "2025-01-01", n=240), "run1", 0)
    write_cases(tmp_path, _typed(cfg, "b", "2025-01-02", emotion=False, n=120), "run1", 1)
    export_all(cfg, tmp_path, embedder=HashingEmbedder(), today=date(2025, 1, 2))

    def add(run, day, cases, recluster=False):
        write_cases(tmp_path, cases, run, 0)
        return export_all(cfg, tmp_path, embedder=HashingEmbedder(), today=date.fromisoformat(day), recluster=recluster)

    return tmp_path, add


def _same(cfg, out, got):
    """`got` (a build's candidates and counts) equals a build that reads every case."""
    from pipeline.library.typical_cases import select_from_store

    cands, counts = got
    want, want_counts = select_from_store(cfg, out, HashingEmbedder(), full=True)
    assert want_counts["build"] == "full" and want_counts["full_because"] == "asked"
    assert [asdict(c) for c in cands] == [asdict(c) for c in want] and len(want) > 0
    assert {k: counts[k] for k in SAME} == {k: want_counts[k] for k in SAME}


def _count_part_reads(monkeypatch) -> list[int]:
    """How many stored parts each `read_parts` call reads, from now on (the list fills)."""
    import pipeline.storage.store as store

    read: list[int] = []
    real = store.read_parts

    def counting(files, *a, **k):
        read.append(len(files))
        return real(files, *a, **k)

    monkeypatch.setattr(store, "read_parts", counting)
    return read


def test_a_night_that_adds_cases_reads_only_its_parts(cfg, night, monkeypatch):
    import pipeline.storage.store as store
    from pipeline.library.typical_cases import build, select_from_store

    out, add = night
    first = build(cfg, out, embedder=HashingEmbedder())
    assert (first["build"], first["full_because"]) == ("full", "no saved pools")
    summary = add("run2", "2025-01-03", _typed(cfg, "n", "2025-01-03", run="run2", n=200))
    assert summary["mode"] == "incremental"

    real = store.read_parts
    read = _count_part_reads(monkeypatch)
    got = select_from_store(cfg, out, HashingEmbedder())
    assert got[1]["build"] == "incremental" and got[1]["new_parts"] == 1, got[1]
    assert read and max(read) == 1  # the new part only, not the three stored before
    monkeypatch.setattr(store, "read_parts", real)
    _same(cfg, out, got)

    # Another night on top of the saved extension, and one with no new case at all.
    add("run3", "2025-01-04", _typed(cfg, "m", "2025-01-04", run="run3", n=200))
    got = select_from_store(cfg, out, HashingEmbedder())
    assert got[1]["build"] == "incremental"
    _same(cfg, out, got)
    again = select_from_store(cfg, out, HashingEmbedder())
    assert again[1]["build"] == "incremental" and again[1]["new_parts"] == 0
    _same(cfg, out, again)


def _change_config(cfg, out):
    return cfg.model_copy(update={"library": cfg.library.model_copy(update={"max_turns": cfg.library.max_turns + 1})})


def _reprocess(cfg, out):
    from pipeline.storage.store import read_cases, write_cases

    again = read_cases(out).head(20).copy()
    again["outcome"] = "resolved"
    write_cases(out, again.assign(run_id="run9"), "run9", 0)
    return cfg


def _rewrite_part(cfg, out):
    from pipeline.storage.store import stored_parts

    p = stored_parts(out)[0]
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    return cfg


def _recluster(cfg, out):
    from pipeline.insights.export import export_all

    export_all(cfg, out, embedder=HashingEmbedder(), today=date(2025, 1, 9), recluster=True)
    return cfg


def _new_model(cfg, out):
    models = cfg.resolve(cfg.paths.models)
    (models / "issue_type.joblib").write_bytes(b"a model trained since")
    return cfg


def _broken(cfg, out):
    from pipeline.library.pool_state import state_file

    state_file(out).write_bytes(b"not a numpy archive")
    return cfg


@pytest.mark.parametrize(
    "change, because",
    [
        (_change_config, "configuration or models changed"),
        (_new_model, "configuration or models changed"),
        (_reprocess, "cases re-processed"),
        (_rewrite_part, "stored parts changed"),
        (_recluster, "clusters changed"),
        (_broken, "saved pools unreadable"),
    ],
)
def test_anything_else_changed_reads_every_case(cfg, night, tmp_path_factory, change, because):
    from pipeline.library.typical_cases import select_from_store

    out, _ = night
    models = tmp_path_factory.mktemp("models")
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"models": models})})
    select_from_store(cfg, out, HashingEmbedder())
    cfg = change(cfg, out)
    got = select_from_store(cfg, out, HashingEmbedder())
    assert (got[1]["build"], got[1]["full_because"]) == ("full", because)
    _same(cfg, out, got)
    # The full build saved its pools again: the next night continues from them.
    assert select_from_store(cfg, out, HashingEmbedder())[1]["build"] == "incremental"


def test_the_nightly_build_and_the_cli_report_the_mode(cfg, night):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import _register, app
    from pipeline.library.pool_state import state_file

    _register()
    out, _ = night
    runner = CliRunner()
    res = runner.invoke(app, ["library", "build", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["build"] == "full" and state_file(out).is_file()
    res = runner.invoke(app, ["library", "build", "--out", str(out)])
    assert res.exit_code == 0 and "(incremental build)" in res.output
    res = runner.invoke(app, ["library", "build", "--out", str(out), "--full", "--json"])
    assert json.loads(res.stdout)["full_because"] == "asked"
    shutil.rmtree(state_file(out).parent)
    res = runner.invoke(app, ["library", "build", "--out", str(out), "--json"])
    assert json.loads(res.stdout)["full_because"] == "no saved pools"


def test_cluster_lookup_reads_parts_typed_differently(tmp_path):
    """Members parts written on different nights may type a text column `string` or
    `large_string` (a full night's frame against an incremental one's): the lookup reads both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.library.sources import load_cluster_lookup

    d = tmp_path / "exports" / "2025-01-02" / "members.parquet"
    d.mkdir(parents=True)
    for i, kind in enumerate((pa.large_string(), pa.string()), start=1):
        cols = {"case_id": [f"c{i}"], "cluster_id": [f"C{i}"], "scope": ["物流配送"], "issue_type": ["物流配送"]}
        pq.write_table(pa.table({k: pa.array(v, kind) for k, v in cols.items()}), d / f"part-{i:06d}.parquet")
    (tmp_path / "exports" / "LATEST").write_text("2025-01-02")
    assert load_cluster_lookup(tmp_path)(["c1", "c2", "c3"]) == ["C1", "C2", None]


def _crowded(prefix, day, run, n_copies, diverse):
    """One issue type whose best cases are near-copies of one text (high scores) and whose
    diverse cases score lower: its pool fills with the copies, its pick runs short."""
    base = "快递三天还没到，今天能不能送到，着急用，麻烦加急处理，已经联系过两次了，页面显示异常，客服一直没回复"
    rows = [_case(f"{prefix}{i:03d}", base + chr(0x4E00 + 7 * i + ord(prefix[0])), delta=0.9) for i in range(n_copies)]
    rows += [_case(f"{prefix}d{i}", text, delta=0.3 + i / 100) for i, text in enumerate(diverse)]
    return pd.DataFrame(rows).drop(columns="turning_points").assign(date=day, run_id=run)


@pytest.mark.parametrize("reserve", [1, 4])
def test_a_short_group_deepens_from_its_reserve_or_is_read_again_alone(cfg, tmp_path, monkeypatch, reserve):
    """Near-copies make a group run short of diverse picks while texts lie beyond its cap. With
    a reserve (the pools kept 4x deeper than the pick reads) the night takes the next texts from
    it and reads no old part; without one (`reserve` 1) it reads every stored part again for that
    group only (rows of other groups dropped while still Arrow). Either way it picks what a build
    over everything picks, and the next night continues from the deepened pools."""
    import pipeline.library.candidates as candidates
    import pipeline.storage.store as store
    from pipeline.library.typical_cases import select_from_store
    from pipeline.storage.store import write_cases

    monkeypatch.setattr(candidates, "RESERVE", reserve)
    small = cfg.model_copy(update={"library": cfg.library.model_copy(update={"per_group": 3})})
    write_cases(tmp_path, _crowded("a", "2025-01-01", "run1", 60, ["发票抬头开错了", "退款一直没到账"]), "run1", 0)
    first = select_from_store(small, tmp_path, HashingEmbedder())[1]
    assert first["build"] == "full"
    write_cases(tmp_path, _crowded("b", "2025-01-02", "run2", 60, ["商品有划痕想换货"]), "run2", 0)
    real = store.read_parts
    read = _count_part_reads(monkeypatch)
    got = select_from_store(small, tmp_path, HashingEmbedder())
    monkeypatch.setattr(store, "read_parts", real)
    assert got[1]["build"] == "incremental" and got[1]["groups_deepened"] > 0, got[1]
    if reserve == 1:
        assert got[1]["groups_read_again"] > 0 and max(read) == 2  # both parts, for the short group
    else:
        assert got[1]["groups_read_again"] == 0 and max(read) == 1  # the new part only
    _same(small, tmp_path, got)
    write_cases(tmp_path, _crowded("c", "2025-01-03", "run3", 60, ["地址填错了要改"]), "run3", 0)
    got = select_from_store(small, tmp_path, HashingEmbedder())
    assert got[1]["build"] == "incremental", got[1]
    _same(small, tmp_path, got)


def test_saved_pools_keep_their_meta_as_utf8_and_read_the_older_forms(cfg, night, tmp_path):
    """The pools' meta is stored as UTF-8 bytes (a NumPy string took 4 bytes a character, 80 MB
    at a 120k history), the entries as UTF-8 JSON lines beside it; files saved before, the
    entries inside the meta, as UTF-8 or as a NumPy string, still load the same."""
    import json

    from pipeline.library import pool_state
    from pipeline.library.typical_cases import build

    out, _ = night
    build(cfg, out, embedder=HashingEmbedder())
    path = pool_state.state_file(out)
    scorer = CandidateScorer.from_config(cfg)
    key = pool_state.build_key(cfg, scorer.actions)
    with np.load(path) as z:
        assert z["meta"].dtype == np.uint8 and z["entries"].dtype == np.uint8
        meta, vectors, seen = json.loads(z["meta"].tobytes()), z["vectors"], z["seen"]
        lines = z["entries"].tobytes().decode("utf-8").splitlines()
    assert "entries" not in meta and meta["n_entries"] == len(lines) > 0
    new = pool_state.load(path, key)
    assert not isinstance(new, str) and len(new.selection.pools.pools) > 0
    del meta["n_entries"]
    text = json.dumps({**meta, "entries": [json.loads(x) for x in lines]}, ensure_ascii=False)
    for name, form in (("older.npz", np.array(text)), ("utf8.npz", np.frombuffer(text.encode(), np.uint8))):
        np.savez(tmp_path / name, meta=form, vectors=vectors, seen=seen)
        old = pool_state.load(tmp_path / name, key)
        assert not isinstance(old, str)
        assert old.parts == new.parts and np.array_equal(old.seen, new.seen)
        assert {g: [e.cand for e in p] for g, p in old.selection.pools.pools.items()} == {
            g: [e.cand for e in p] for g, p in new.selection.pools.pools.items()
        }
        assert {i: v.tolist() for i, v in old.selection.vectors.items()} == {
            i: v.tolist() for i, v in new.selection.vectors.items()
        }
    # Lines that do not add up to the count recorded: unreadable, so a build over everything.
    np.savez(tmp_path / "short.npz", meta=np.frombuffer(json.dumps({**meta, "n_entries": len(lines) + 1}).encode(), np.uint8),
             entries=np.frombuffer(("\n".join(lines) + "\n").encode(), np.uint8), vectors=vectors, seen=seen)
    assert pool_state.load(tmp_path / "short.npz", key) == "saved pools unreadable"
    # The lines are read one at a time from the file: a last line cut short is unreadable too.
    np.savez(tmp_path / "cut.npz", meta=np.frombuffer(json.dumps({**meta, "n_entries": len(lines)}).encode(), np.uint8),
             entries=np.frombuffer(("\n".join(lines) + "\n")[:-5].encode(), np.uint8), vectors=vectors, seen=seen)
    assert pool_state.load(tmp_path / "cut.npz", key) == "saved pools unreadable"


def test_saved_pools_are_written_a_piece_at_a_time_as_np_savez_would(cfg, night, tmp_path):
    """The state file is written a piece at a time (`pool_state._write_npz`), and is what
    `np.savez` of the whole meta text, entry lines, vectors and hashes would hold: the meta and
    each entry line are exactly `json.dumps` of themselves, every vector and hash read back
    equal; an empty selection too."""
    import json

    from pipeline.library import pool_state
    from pipeline.library.candidates import Selection, _Pools
    from pipeline.library.typical_cases import build

    out, _ = night
    build(cfg, out, embedder=HashingEmbedder())
    path = pool_state.state_file(out)
    key = pool_state.build_key(cfg, CandidateScorer.from_config(cfg).actions)
    state = pool_state.load(path, key)
    assert not isinstance(state, str) and state.selection.vectors
    for block in (1, 3, pool_state._VECTOR_BLOCK):
        again = tmp_path / f"again{block}.npz"
        pool_state._VECTOR_BLOCK, old = block, pool_state._VECTOR_BLOCK
        try:
            pool_state.save(again, state)
        finally:
            pool_state._VECTOR_BLOCK = old
        with np.load(path) as a, np.load(again) as b:
            raw = b["meta"].tobytes()
            assert json.dumps(json.loads(raw), ensure_ascii=False).encode() == raw == a["meta"].tobytes()
            lines = b["entries"].tobytes()
            assert lines == a["entries"].tobytes() and lines.endswith(b"\n")
            assert all(json.dumps(json.loads(x), ensure_ascii=False).encode() == x for x in lines.split(b"\n")[:-1])
            assert b["vectors"].dtype == np.float32 and np.array_equal(a["vectors"], b["vectors"])
            assert np.array_equal(a["seen"], b["seen"])
    empty = pool_state.PoolState(key, {}, [], np.zeros(0, np.uint64), Selection([], {}, _Pools(), {}, 40, {}, True))
    pool_state.save(tmp_path / "empty.npz", empty)
    got = pool_state.load(tmp_path / "empty.npz", key)
    assert not isinstance(got, str) and got.selection.pools.pools == {} and len(got.seen) == 0


def test_spilled_pools_keep_handles_and_give_back_what_was_saved(cfg, night, tmp_path):
    """Saved pools loaded into a spill file hold an int a Candidate and a vector, and give back
    the same entries, order, Candidates and vectors (bit for bit) as pools loaded into memory;
    saved again from the spill they make the same file, and the spill's own records read back."""
    from pipeline.library import pool_state
    from pipeline.library.spill import Spill, SpilledVectors
    from pipeline.library.typical_cases import build

    out, _ = night
    build(cfg, out, embedder=HashingEmbedder())
    path = pool_state.state_file(out)
    key = pool_state.build_key(cfg, CandidateScorer.from_config(cfg).actions)
    memory, spilled = pool_state.load(path, key), pool_state.load(path, key, Spill(tmp_path))
    assert not isinstance(memory, str) and not isinstance(spilled, str)
    a, b = memory.selection, spilled.selection
    assert isinstance(b.vectors, SpilledVectors) and b.pools.spill is not None
    assert all(isinstance(e._packed, int) for p in b.pools.pools.values() for e in p)
    assert {g: [(e.key, e.text, e.stands_for_copies, e.cand) for e in p] for g, p in a.pools.pools.items()} == {
        g: [(e.key, e.text, e.stands_for_copies, e.cand) for e in p] for g, p in b.pools.pools.items()
    }
    assert list(a.vectors) == list(b.vectors) and len(b.vectors) > 0
    assert all(a.vectors[i].tobytes() == b.vectors[i].tobytes() for i in a.vectors)
    pool_state.save(tmp_path / "again.npz", spilled)
    with np.load(path) as x, np.load(tmp_path / "again.npz") as y:
        assert all(x[n].tobytes() == y[n].tobytes() for n in ("meta", "entries", "vectors", "seen"))
    s = Spill(tmp_path)
    records = [b"", "快递\ud800".encode("utf-8", "surrogatepass"), bytes(range(256)) * 9]
    handles = [s.put(r) for r in records]
    assert [s.get(h) for h in reversed(handles)] == records[::-1] and s.size == sum(map(len, records))
    del b.vectors[next(iter(b.vectors))]
    assert len(b.vectors) == len(a.vectors) - 1


def test_a_pooled_case_keeps_its_candidate_packed_and_gives_it_back_equal():
    """A pool entry keeps its Candidate as packed bytes, not as Python objects (the pools of a
    crowded history grow with it): read back, it is the Candidate pooled, any text included."""
    from pipeline.library.candidates import Candidate, _Pooled

    parts = {
        "context": "渠道:chat 商品:手机",
        "problem": "快递三天没到\ud800",
        "handling": "",
        "outcome": "resolved（好的）",
    }
    for cand in (
        Candidate("c1", "物流配送", "C0007", 0.8123, ["已解决（结果词）", "四部分齐全"], parts),
        Candidate("案例2", "未分类", None, 0.4, [], {}),
    ):
        e = _Pooled((-cand.score, cand.case_id), cand, "快递三天没到")
        assert e.cand == cand and e.case_id == cand.case_id and e.cand is not e.cand
        assert not hasattr(e, "__dict__")
        # Nothing of it is kept as the Candidate's objects: they are made when read.
        assert not any(isinstance(getattr(e, n), (Candidate, dict, list)) for n in _Pooled.__slots__)


def test_saved_id_hashes_are_hashed_a_part_at_a_time_as_all_ids_at_once():
    """The saved ids' hashes are made a part's keys at a time: the same sorted hashes as of every
    id at once, a missing id hashed as the text "None" as before, and none of no parts."""
    import pyarrow as pa

    from pipeline.library import pool_state
    from pipeline.library.typical_cases import _id_hashes

    keys = [
        pa.table({"case_id": ["b", "案例1", None], "run_id": ["r1"] * 3}),
        pa.table({"case_id": pa.array([], pa.string()), "run_id": pa.array([], pa.string())}),
        pa.table({"case_id": ["a", "b"], "run_id": ["r2", "r2"]}),
    ]
    every = ["b", "案例1", None, "a", "b"]
    assert np.array_equal(_id_hashes(keys), pool_state.id_hashes(every))
    assert _id_hashes(keys).dtype == np.uint64 and len(_id_hashes([])) == 0
