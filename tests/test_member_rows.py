"""Each membership row's case row, kept between nights (`member_rows`): the look-up it replaces
(`locate_members`, hashing every id each night) gives the same answers, and a kept entry is used
only while it still describes its part and the case copy generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import pipeline.insights.member_rows as mr
from pipeline.insights import membership as mb
from pipeline.insights.export import _key, locate_members
from pipeline.insights.member_rows import arrow_strings, case_rows, index_in


def _ids(rng, n: int, k: int, missing: float, prefix: str) -> list[str | None]:
    return [None if rng.random() < missing else f"{prefix}{rng.integers(k)}" for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_probing_the_cases_finds_what_hashing_them_finds(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    cases = pa.array([None if rng.random() < 0.02 else f"c{i}" for i in rng.permutation(400)[:n]], pa.large_string())
    ids = pa.array(_ids(rng, int(rng.integers(0, 40)), 450, 0.1, "c"), pa.large_string())
    for start in (0, 1, n // 2, n):
        want = index_in(ids, cases.slice(start))
        want = np.where(want >= 0, want + start, -1)
        for share in (0.0, 1e9):  # always probe, always hash
            monkeypatch.setattr(mr, "_PROBE_SHARE", share)
            assert case_rows(ids, cases, start).tolist() == want.tolist(), (start, share)


@pytest.mark.parametrize("seed", range(6))
def test_locate_answers_what_locate_members_answers(seed):
    """Cases each id once (one missing id at most, as the newest-row rule keeps), a selection of
    them, members with their run, another run, no run, no case, or a case no longer stored."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 150))
    ids = [f"c{i}" for i in rng.permutation(200)[:n]]
    if n and rng.random() < 0.5:
        ids[int(rng.integers(n))] = None
    cases = pd.DataFrame({"case_id": ids, "run_id": _ids(rng, n, 3, 0.05, "r")}, dtype="str")
    selected = np.flatnonzero(rng.random(n) < 0.8)
    frame = cases.iloc[selected].reset_index(drop=True)
    m = int(rng.integers(0, 300))
    member_run = [r if rng.random() < 0.7 else None for r in _ids(rng, m, 3, 0.0, "r")]
    membership = pd.DataFrame({"case_id": _ids(rng, m, 220, 0.03, "c"), "run_id": member_run}, dtype="str")
    rows = case_rows(_key(membership["case_id"]), _key(cases["case_id"]))
    same = mr._same_runs(arrow_strings(membership["run_id"]), arrow_strings(cases["run_id"]), rows)
    got = mr.locate(rows, same, selected, n)
    want = locate_members(membership, frame)
    assert want[3] is not None
    for name, g, w in zip(("alive", "todo", "redone", "where"), got, want):
        assert g.tolist() == w.tolist(), name


def _members(out: Path, seq: int, ids: list[str], run: str) -> None:
    rows = pd.DataFrame(
        {
            "case_id": ids,
            "run_id": run,
            "scope": "all",
            "cluster_id": "k1",
            "is_noise": False,
            "similarity": 0.5,
            "x": 0.0,
            "y": 0.0,
        }
    )
    assert mb.append_members(out, rows) == seq


def _answer(out: Path, cases: pd.DataFrame, gen: str):
    read = mb.read_members(out, mb.load_meta(out))
    rows, same = mr.part_rows(out, read, _key(cases["case_id"]), arrow_strings(cases["run_id"]), gen)
    return rows[read.kept].tolist(), same[read.kept].tolist()


def test_entries_are_kept_per_part_and_used_only_while_they_hold(tmp_path, monkeypatch):
    cases = pd.DataFrame({"case_id": [f"c{i}" for i in range(10)], "run_id": "r1"}, dtype="str")
    _members(tmp_path, 1, ["c1", "c3", "gone"], "r1")
    assert _answer(tmp_path, cases, "g1") == ([1, 3, -1], [True, True, False])
    looked: list[int] = []
    real = mr.case_rows

    def spy(ids, case_ids, start=0):
        looked.append(len(ids))
        return real(ids, case_ids, start)

    monkeypatch.setattr(mr, "case_rows", spy)
    assert _answer(tmp_path, cases, "g1") == ([1, 3, -1], [True, True, False])
    assert looked == []  # kept: nothing looked up
    # The copy grew at its end (same generation): only the member without a case is looked up,
    # among the cases added since; one of them is the case that was gone.
    grown = pd.concat([cases, pd.DataFrame({"case_id": ["c10", "gone"], "run_id": "r2"}, dtype="str")])
    grown = grown.reset_index(drop=True)
    _members(tmp_path, 2, ["c10"], "r2")  # tonight's part: looked up whole
    assert _answer(tmp_path, grown, "g1") == ([1, 3, 11, 10], [True, True, False, True])
    assert looked == [1, 1]
    assert _answer(tmp_path, grown, "g1") == ([1, 3, 11, 10], [True, True, False, True])
    assert looked == [1, 1]
    # Another generation (the copy written whole: rows may have moved): every part looked up.
    moved = grown.iloc[::-1].reset_index(drop=True)
    assert _answer(tmp_path, moved, "g2") == ([10, 8, 0, 1], [True, True, False, True])
    assert looked == [1, 1, 3, 1]
    # A part rewritten under the same number (an export killed before its meta, run again).
    part = mb.members_dir(tmp_path) / "part-000002.parquet"
    part.unlink()
    _members(tmp_path, 2, ["c2", "c4"], "r1")
    assert _answer(tmp_path, moved, "g2") == ([10, 8, 0, 9, 7], [True, True, False, True, True])
    assert looked == [1, 1, 3, 1, 2]
    # A part gone (a re-cluster's compaction): its entry goes too.
    part.unlink()
    _answer(tmp_path, moved, "g2")
    assert sorted(p.name for p in mr.cache_dir(tmp_path).iterdir()) == ["part-000001.arrow"]


def test_a_broken_entry_is_looked_up_again(tmp_path):
    cases = pd.DataFrame({"case_id": ["a", "b"], "run_id": "r1"}, dtype="str")
    _members(tmp_path, 1, ["b", "a"], "r1")
    want = _answer(tmp_path, cases, "g1")
    entry = mr.cache_dir(tmp_path) / "part-000001.arrow"
    entry.write_bytes(entry.read_bytes()[:40])  # cut short
    assert _answer(tmp_path, cases, "g1") == want == ([1, 0], [True, True])
    assert entry.stat().st_size > 40  # written again


def test_membership_parts_are_read_from_their_copies_as_from_the_parts(tmp_path, monkeypatch):
    """`read_members` reads each part through an uncompressed copy (`membership._read_part`):
    the same frame as decoding the parts; a copy of another part (the number written again),
    a broken one or one of a part gone is not used."""
    _members(tmp_path, 1, ["a", "b", None], "r1")
    _members(tmp_path, 2, ["b", "c"], "r2")

    def plain():
        frames = [pd.read_parquet(p).assign(seq=s) for s, p in mb._parts(tmp_path)]
        return pd.concat(frames, ignore_index=True)

    decoded: list[Path] = []
    real = mb.pq.read_table
    meta = mb.load_meta(tmp_path)

    def read():
        with monkeypatch.context() as m:
            m.setattr(mb.pq, "read_table", lambda p, *a, **k: decoded.append(p) or real(p, *a, **k))
            return mb.read_members(tmp_path, meta)

    first = read()
    pd.testing.assert_frame_equal(first.rows, plain(), check_exact=True)
    assert len(decoded) == 2
    again = read()
    pd.testing.assert_frame_equal(again.rows, plain(), check_exact=True)
    pd.testing.assert_frame_equal(again.frame, first.frame, check_exact=True)
    assert len(decoded) == 2  # both from their copies
    part = mb.members_dir(tmp_path) / "part-000002.parquet"
    part.unlink()
    _members(tmp_path, 2, ["d"], "r3")  # the same number, other rows
    copy = mb.copies_dir(tmp_path) / "part-000001.arrow"
    copy.write_bytes(copy.read_bytes()[:-30])  # broken
    got = read()
    pd.testing.assert_frame_equal(got.rows, plain(), check_exact=True)
    assert len(decoded) == 4 and got.rows["case_id"].tolist()[-1] == "d"
    part.unlink()
    read()
    assert [p.name for p in mb.copies_dir(tmp_path).iterdir()] == ["part-000001.arrow"]
