"""The cross-type members kept per case copy row (`member_cross`): a night that takes its members
side from the kept entry (not reading the stored membership) exports every file as a night that
reads it, and the entry is taken only while it still describes the membership and the case copy
(removed and re-processed cases, a compaction, a re-cluster, `since`, another selection)."""

from __future__ import annotations

import shutil
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

import pipeline.insights.export as ex
from pipeline.embed.fake import HashingEmbedder
from pipeline.insights import member_cross as mc
from pipeline.insights import membership as mb
from pipeline.insights.cluster import ALL_SCOPE
from pipeline.insights.codes import sorted_codes
from pipeline.insights.export import export_all
from pipeline.storage import case_cache
from pipeline.storage.store import stored_parts
from tests.test_member_tallies import DAY0, _cases, _files, _store


@pytest.fixture()
def nights(tmp_path, cfg, monkeypatch):
    """Export a night on the store (its kept entry, when it holds, used) and on a copy of it with
    no entry taken (the membership read, as before the entry); check every file is the same and
    return whether the store's night took its members from the entry."""
    # The case copy grown in place by every night's few cases, as by a real night's (a small store's
    # nights are past the share that writes it whole, a new generation: no entry would hold).
    monkeypatch.setattr(case_cache, "REWRITE_SHARE", 1.0)
    out = tmp_path / "out"
    _store(out, _cases({"物流": 30, "发票": 30, "退款": 30, "蓝牙": 30}, 0, seed=1), "20251103T000000-aaaa")
    used: list[bool] = []
    fast = ex.fast_members

    def spy(*a, **k):
        got = fast(*a, **k)
        used.append(got is not None)
        return got

    monkeypatch.setattr(ex, "fast_members", spy)

    def night(day: date, conf=None, **kw) -> bool:
        conf = conf or cfg
        copy = tmp_path / f"copy-{day}"
        shutil.copytree(out, copy)
        with monkeypatch.context() as m:
            m.setattr(mc, "load", lambda *a, **k: None)
            export_all(conf, copy, embedder=HashingEmbedder(), today=day, **kw)
        assert used == []
        export_all(conf, out, embedder=HashingEmbedder(), today=day, **kw)
        a, b = _files(out, day.isoformat()), _files(copy, day.isoformat())
        assert a.keys() == b.keys()
        assert [f for f in a if a[f] != b[f]] == []
        shutil.rmtree(copy)
        took = any(used)
        used.clear()
        return took

    export_all(cfg, out, embedder=HashingEmbedder(), today=DAY0)  # the first: a full re-cluster
    return out, night


def test_nights_from_the_kept_entry_export_what_reading_the_membership_exports(nights):
    out, night = nights
    day = DAY0 + timedelta(days=1)
    _store(out, _cases({"物流": 5, "蓝牙": 4}, 1000, seed=2, regions=("西南",)), "20251104T000000-bbbb")
    assert not night(day)  # after a re-cluster: no entry yet (this night keeps one)
    _store(out, _cases({"发票": 6, "退款": 3}, 2000, seed=3), "20251105T000000-cccc")
    assert night(day + timedelta(days=1))
    assert night(day + timedelta(days=2))  # an empty night
    _store(out, _cases({"物流": 4}, 3000, seed=5), "20251107T000000-eeee")
    assert night(day + timedelta(days=3))  # the entry kept by a night that took one
    # A re-processed case (the case copy written again): the membership read...
    _store(out, _cases({"蓝牙": 1}, 0, seed=4), "20251108T000000-dddd")
    assert not night(day + timedelta(days=4))
    # ...and the next night takes the entry that night kept.
    _store(out, _cases({"退款": 3}, 4000, seed=6), "20251109T000000-ffff")
    assert night(day + timedelta(days=5))


def test_a_removed_case_a_compaction_and_a_recluster_read_the_membership(nights, monkeypatch):
    out, night = nights
    day = DAY0 + timedelta(days=1)
    _store(out, _cases({"物流": 5}, 1000, seed=2), "20251104T000000-bbbb")
    assert not night(day)
    _store(out, _cases({"蓝牙": 4}, 2000, seed=3), "20251105T000000-cccc")
    assert night(day + timedelta(days=1))
    stored_parts(out)[-1].unlink()  # repair drops a part: its cases removed
    assert not night(day + timedelta(days=2))
    _store(out, _cases({"发票": 3}, 3000, seed=4), "20251107T000000-dddd")
    assert night(day + timedelta(days=3))  # the entry kept by the night that compacted
    _store(out, _cases({"退款": 3}, 4000, seed=5), "20251108T000000-eeee")
    assert night(day + timedelta(days=4))
    with monkeypatch.context() as m:
        m.setattr(mb, "COMPACT_PARTS", 1)
        _store(out, _cases({"物流": 2}, 5000, seed=6), "20251109T000000-ffff")
        assert not night(day + timedelta(days=5))
    # A re-cluster with a topic it has not seen: new clusters, and new ids in the next entries.
    _store(out, _cases({"物流": 2}, 6000, seed=7).assign(problem="屏幕碎了想换一块新的屏幕"), "20251110T000000-gggg")
    assert not night(day + timedelta(days=6), recluster=True)
    _store(out, _cases({"蓝牙": 2}, 7000, seed=8), "20251111T000000-hhhh")
    assert not night(day + timedelta(days=7))
    _store(out, _cases({"蓝牙": 2, "退款": 1}, 8000, seed=9), "20251112T000000-iiii")
    assert night(day + timedelta(days=8))


def test_since_and_another_selection_read_the_membership(nights, cfg):
    out, night = nights
    day = DAY0 + timedelta(days=1)
    _store(out, _cases({"物流": 5}, 1000, seed=2), "20251104T000000-bbbb")
    assert not night(day)
    _store(out, _cases({"蓝牙": 3}, 2000, seed=3), "20251105T000000-cccc")
    assert not night(day + timedelta(days=1), since=DAY0 - timedelta(days=3))
    assert not night(day + timedelta(days=2))  # the previous folder was a `since` view
    assert night(day + timedelta(days=3))
    # Another selection of the same rows: not the entry's.
    other = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"min_problem_chars": 27})})
    assert not night(day + timedelta(days=4), other)


def _membership(
    rng: np.random.Generator, n_cases: int, held_share: float = 0.7, select_share: float = 0.8
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    selected = np.flatnonzero(rng.random(n_cases) < select_share)
    held = np.flatnonzero(rng.random(len(selected)) < held_share)
    rows = []
    for pos in held:
        for scope in (ALL_SCOPE, "售后"):
            cid = None if rng.random() < 0.2 else f"k{int(rng.integers(5))}"
            rows.append((pos, scope, cid, bool(cid is None), float(rng.random()), float(rng.random())))
    positions = np.asarray([r[0] for r in rows], dtype=np.int64)
    m = pd.DataFrame(
        {
            "case_id": [f"c{p}" for p in positions],
            "run_id": "r",
            "scope": [r[1] for r in rows],
            "cluster_id": pd.Series([r[2] for r in rows], dtype="str"),
            "is_noise": [r[3] for r in rows],
            "similarity": np.asarray([r[4] for r in rows], dtype=np.float64),
            "x": [r[5] for r in rows],
            "y": [r[5] / 2 for r in rows],
        }
    )
    return m, positions, selected


@pytest.mark.parametrize("seed", range(5))
def test_an_entry_grown_by_new_rows_is_the_entry_of_the_grown_membership(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    m, positions, selected = _membership(rng, n)
    split = int(rng.integers(0, len(m) + 1)) // 2 * 2  # both rows of a case on one side
    kept = mc.of_membership(m.iloc[:split], positions[:split], selected, n)
    assert kept is not None
    grown = n + int(rng.integers(0, 10))
    new = m.iloc[split:].reset_index(drop=True)
    got = mc.with_new_rows(kept, new, selected[positions[split:]], selected, grown)
    want = mc.of_membership(m, positions, selected, grown)
    assert got is not None and want is not None
    assert got.n_members == want.n_members == len(m)
    assert got.ids.tolist() == want.ids.tolist()
    for name in ("selected", "member", "cross", "code", "is_noise", "similarity", "x", "y"):
        assert np.array_equal(getattr(got, name), getattr(want, name), equal_nan=True), name
    # From the night's codes of every member's id (per-type rows' ids among them): the same ids.
    coded = mc.of_membership(m, positions, selected, grown, sorted_codes(m["cluster_id"]))
    assert coded is not None
    decoded = [coded.ids[c] if c >= 0 else None for c in coded.code]
    assert decoded == [want.ids[c] if c >= 0 else None for c in want.code]
    # The view's rows: each selected case's cross-type row, in frame order, with its values.
    ids = pd.Series([f"c{p}" for p in range(len(selected))], dtype="str")
    view, at = _cross_membership(got, ids, selected)
    cross = m[m["scope"] == ALL_SCOPE]
    order = np.argsort(positions[(m["scope"] == ALL_SCOPE).to_numpy()], kind="stable")
    assert at.tolist() == sorted(positions[(m["scope"] == ALL_SCOPE).to_numpy()].tolist())
    assert view["cluster_id"].tolist() == [None if pd.isna(c) else c for c in cross["cluster_id"].iloc[order]]
    assert view["x"].tolist() == cross["x"].iloc[order].tolist()
    assert view["is_noise"].tolist() == cross["is_noise"].iloc[order].tolist()


def test_an_entry_answers_only_for_its_membership_and_copy(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    m, positions, selected = _membership(rng, 40)
    assert mb.append_members(out, m.assign(case_id=m["case_id"])) == 1
    meta = mb.load_meta(out)
    kept = mc.of_membership(m, positions, selected, 40)
    assert kept is not None
    key = mc.parts_key(out, meta)
    mc.save(out, kept, "g1", key)
    assert mc.load(out, "g1", 40, key) is not None
    assert mc.load(out, "g1", 45, key) is not None  # the copy grown since
    assert mc.load(out, "g1", 39, key) is None  # shorter: not these rows
    assert mc.load(out, "g2", 40, key) is None  # another generation of the copy
    mb.append_members(out, m.iloc[:2])
    assert mc.load(out, "g1", 40, mc.parts_key(out, meta)) is None  # another membership
    assert mc.load(out, "g1", 40, mc.parts_key(out, {"members_from": 2})) is None


def test_a_row_without_a_case_or_a_case_twice_keeps_no_entry():
    rng = np.random.default_rng(1)
    m, positions, selected = _membership(rng, 30)
    assert mc.of_membership(m, np.where(np.arange(len(m)) == 0, -1, positions), selected, 30) is None
    twice = pd.concat([m, m.iloc[:1]], ignore_index=True)
    assert mc.of_membership(twice, np.append(positions, positions[0]), selected, 30) is None


def test_a_copy_written_whole_after_its_rows_keeps_the_entry(nights, monkeypatch):
    """A night's rows past the share the case copy appends in place: it is written whole (a new
    generation) with the former copy's rows first, so the entry still holds; re-processed cases
    (rows of the copy replaced) write it anew, and the entry does not."""
    out, night = nights
    day = DAY0 + timedelta(days=1)
    _store(out, _cases({"物流": 5}, 1000, seed=2), "20251104T000000-bbbb")
    assert not night(day)
    monkeypatch.setattr(case_cache, "REWRITE_SHARE", 0.0)
    _store(out, _cases({"蓝牙": 4}, 2000, seed=3), "20251105T000000-cccc")
    assert night(day + timedelta(days=1))
    assert case_cache.copy_prefix(ex.case_cache_path(out), _copy_gen(out)) is not None
    _store(out, _cases({"发票": 3}, 3000, seed=4), "20251106T000000-dddd")
    assert night(day + timedelta(days=2))
    _store(out, _cases({"蓝牙": 2}, 0, seed=5), "20251107T000000-eeee")  # re-processed
    assert not night(day + timedelta(days=3))
    assert case_cache.copy_prefix(ex.case_cache_path(out), _copy_gen(out)) is None


def _copy_gen(out) -> str:
    import json

    return json.loads((ex.case_cache_path(out) / "meta.json").read_text(encoding="utf-8"))["gen"]


@pytest.mark.parametrize("seed", range(4))
def test_the_cross_view_is_the_members_view_of_the_kept_rows(seed):
    """`cross_view` builds what `members_view_rows` makes of the entry's cross-type rows: the same
    frame (columns, types, values), frame rows and cluster codes; every case with a cross-type
    row (the usual night) or some without."""
    from pipeline.insights.cluster import select_cases_at

    rng = np.random.default_rng(seed)
    cases = _cases({"物流": 20, "发票": 20, "退款": 10}, 0, seed=seed)
    cases = cases.assign(request_kind="咨询", urgency="低", problem=cases["problem"].astype("str"))
    cases = cases.assign(**{c: cases[c].astype("str") for c in ("case_id", "conversation_id", "channel", "date")})
    frame, selected = select_cases_at(cases, 4)
    every = seed % 2 == 1  # every frame row held (the cross-type rows are the frame's, in order)
    m, positions, _ = _membership(rng, len(frame), 1.0 if every else 0.7, 1.0 if every else 0.8)
    keep = rng.random(len(m)) < (1.0 if every else 0.7)
    keep[1::2] = keep[0::2]  # both rows of a case, or neither
    m, positions = m[keep].reset_index(drop=True), positions[keep]
    m["case_id"] = frame["case_id"].to_numpy(dtype=object)[positions]
    kept = mc.of_membership(m, positions, selected, len(cases))
    assert kept is not None
    viewed, at = _cross_membership(kept, frame["case_id"], selected)
    want = ex.members_view_rows(frame, viewed, at, texts=False, cluster_codes=(kept.code[selected[at]], kept.ids))
    got = ex.cross_view(frame, kept, selected)
    pd.testing.assert_frame_equal(got[0], want[0])
    assert got[1].tolist() == want[1].tolist()
    assert want[2] is not None
    assert got[2][0].tolist() == want[2][0].tolist() and got[2][1].tolist() == want[2][1].tolist()


def _cross_membership(
    kept: mc.Kept, frame_case_ids: pd.Series, selected: np.ndarray
) -> tuple[pd.DataFrame, np.ndarray]:
    """The membership's cross-type rows of the frame's cases the entry holds, in frame order, as
    the read membership hands them to `members_view_rows`, and each one's frame row."""
    at = np.flatnonzero(kept.cross[selected])
    rows = np.asarray(selected, dtype=np.int64)[at]
    code = kept.code[rows]
    ids = np.append(kept.ids, np.array([None], dtype=object))  # -1 (none) reads the last
    frame = pd.DataFrame(
        {
            "scope": mc.repeated(ALL_SCOPE, len(rows)),
            "cluster_id": pd.Series(ids[code], dtype=object),
            "is_noise": kept.is_noise[rows],
            "similarity": kept.similarity[rows],
            "case_id": frame_case_ids.iloc[at].reset_index(drop=True),
            "x": kept.x[rows],
            "y": kept.y[rows],
        }
    )
    return frame, at
