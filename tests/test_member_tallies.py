"""The members' tally kept between nights (pipeline.insights.member_tallies): a night that adds
cases counts its new rows onto last night's tally, and every table must come out as counting all
members again would make it. Checked two ways: the tally of a head and a tail of rows merged
against the tally of all of them (each table built from both), and whole exports night after
night with the kept tally against the same nights with it removed (every file compared)."""

from __future__ import annotations

import json
import random
import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline.insights.export as ex
from pipeline.embed.fake import HashingEmbedder
from pipeline.insights import member_tallies as mt
from pipeline.insights import membership as mb
from pipeline.insights.cluster import ALL_SCOPE, ClusterState
from pipeline.insights.export import export_all
from pipeline.insights.incremental import clusters_from_tally, recount_clusters
from pipeline.insights.trends import (
    count_table,
    counts_from_days,
    matrix_from_groups,
    root_cause_matrix,
    week_over_week,
    wow_from_days,
)
from pipeline.storage.store import stored_parts, write_cases

# -- merged tallies against a tally of all rows ----------------------------------------------------


def _rows(rng: np.random.Generator, n: int, clusters: int, start_day: int) -> pd.DataFrame:
    """Member rows in view order (the cross-type scope, then the per-type scopes by name) with
    few values per column, so that shares tie; missing and empty values; scores with NaN."""
    types = ["售后", "物流", "账户"]
    rows = []
    for scope in [ALL_SCOPE, *types]:
        for _ in range(n):
            it = scope if scope != ALL_SCOPE else str(rng.choice(types))
            cid = None if rng.random() < 0.2 else f"{scope}:{int(rng.integers(clusters))}"
            rows.append(
                {
                    "scope": scope,
                    "cluster_id": cid,
                    "is_noise": cid is None,
                    "case_id": f"c{len(rows)}",
                    "date": (date(2025, 11, 1) + timedelta(days=start_day + int(rng.integers(20)))).isoformat(),
                    "issue_type": it,
                    "outcome": rng.choice(["resolved", "unresolved", None]),
                    "emotion": rng.choice(["平静", "愤怒", "", "未知"]),
                    "channel": rng.choice(["chat", "phone"]),
                    "region": rng.choice(["华东", "华北", "西南", None]),
                    "product": rng.choice(["耳机", "手表"]),
                    "emotion_score": float("nan") if rng.random() < 0.1 else float(rng.normal()) / 3,
                }
            )
    return pd.DataFrame(rows)


def _described(members: pd.DataFrame) -> pd.DataFrame:
    keys = members.dropna(subset=["cluster_id"]).drop_duplicates(["scope", "cluster_id"])
    return pd.DataFrame(
        {
            "scope": keys["scope"].tolist(),
            "cluster_id": keys["cluster_id"].tolist(),
            "label": [f"簇{c}" for c in keys["cluster_id"]],
            "label_history": ["[]"] * len(keys),
            "cause_phrases": [["原因"]] * len(keys),
            "cause_category": ["other"] * len(keys),
            "cause_category_zh": ["其他"] * len(keys),
        }
    )


def _tables_from(tally: mt.Tally, members: pd.DataFrame) -> dict[str, pd.DataFrame]:
    described = _described(members)
    clusters, _ = clusters_from_tally(described, tally, ClusterState.empty(), "2025-12-01", 3)
    issue_counts = members.loc[members["scope"] == ALL_SCOPE, "issue_type"].value_counts()
    assert tally.days is not None
    return {
        "clusters": clusters,
        "counts": counts_from_days("cluster", tally.days, tally.breakdowns),
        "alerts": wow_from_days(tally.days, tally.cluster_ids(), "cluster", date(2025, 11, 18), 0.5, 1),
        "matrix": matrix_from_groups(*mt.typed_shares(tally), clusters, issue_counts, 3),
    }


def _tables_of(members: pd.DataFrame) -> dict[str, pd.DataFrame]:
    described = _described(members)
    clusters, _ = recount_clusters(described, members, ClusterState.empty(), "2025-12-01", 3)
    issue_counts = members.loc[members["scope"] == ALL_SCOPE, "issue_type"].value_counts()
    counted = members[["cluster_id", "date", "channel", "region", "product"]]
    return {
        "clusters": clusters,
        "counts": count_table(counted, "cluster", "cluster_id"),
        "alerts": week_over_week(counted, "cluster", "cluster_id", date(2025, 11, 18), 0.5, 1),
        "matrix": root_cause_matrix(members, clusters, issue_counts, 3),
    }


def _same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tally_with_rows_added_makes_the_tables_of_all_rows(seed):
    rng = np.random.default_rng(seed)
    head = _rows(rng, 300, 4, 0)
    # The night's rows: some in new clusters, on new days, with a value the head never had.
    tail = _rows(rng, 20, 6, 10).assign(product=lambda d: np.where(np.arange(len(d)) % 3, d["product"], "音箱"))
    tail["case_id"] = [f"n{i}" for i in range(len(tail))]
    whole = pd.concat([head, tail], ignore_index=True)
    kept = mt.count_members(head)
    merged = mt.merge(kept, mt.count_members(tail, start=kept.rows))
    assert merged.rows == len(whole) and merged.typed_in_scope
    _same(_tables_from(merged, whole), _tables_of(whole))
    # And a second night on top of the first's merged tally.
    more = _rows(rng, 5, 6, 15).assign(case_id=lambda d: [f"m{i}" for i in range(len(d))])
    again = mt.merge(merged, mt.count_members(more, start=merged.rows))
    _same(_tables_from(again, pd.concat([whole, more], ignore_index=True)), _tables_of(pd.concat([whole, more])))


def test_a_tally_read_back_is_the_tally_kept(tmp_path):
    rng = np.random.default_rng(5)
    members = _rows(rng, 200, 5, 0)
    tally = mt.count_members(members)
    key = {"v": 1, "folder": "2025-12-01", "rows": len(members)}
    mt.save(tmp_path, tally, key)
    back = mt.load(tmp_path, key)
    assert back is not None
    _same(_tables_from(back, members), _tables_from(tally, members))
    assert back.scores is not None and tally.scores is not None
    assert all(np.array_equal(a, b) for a, b in zip(back.scores, tally.scores))
    # Another members table's key (rows, folder) finds nothing: the caller counts again.
    assert mt.load(tmp_path, {**key, "rows": len(members) + 1}) is None
    assert mt.load(tmp_path, {**key, "folder": "2025-12-02"}) is None


# -- whole nights with and without the kept tally ---------------------------------------------------

TOPICS = {
    "物流": ("快递三天了还没收到包裹物流信息一直不更新", ["配送站", "快递员", "派送", "物流单号", "签收"]),
    "发票": ("发票抬头开错了需要重新开具增值税发票", ["公司抬头", "税号", "电子发票", "开票", "纸质发票"]),
    "退款": ("申请退款好几天了钱一直没有退回到账", ["退款进度", "原路退回", "银行卡", "余额", "审核"]),
    "蓝牙": ("蓝牙耳机和手机配对连接不上声音断断续续", ["配对", "固件", "重启", "左耳", "充电仓"]),
}
DAY0 = date(2025, 11, 3)


def _cases(n_per: dict[str, int], start: int, seed: int, regions=("华东", "华北")) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    i = start
    for name, n in n_per.items():
        base, extra = TOPICS[name]
        for _ in range(n):
            rows.append(
                {
                    "case_id": f"c{i:05d}",
                    "conversation_id": f"v{i:05d}",
                    "channel": rng.choice(["chat", "phone"]),
                    "date": (DAY0 - timedelta(days=i % 14)).isoformat(),
                    "date_source": "started_at",
                    "problem": base + "，" + "、".join(rng.sample(extra, 2)),
                    "outcome": rng.choice(["resolved", "unresolved"]),
                    "issue_type": "售后" if name in ("退款", "蓝牙") else "物流与票据",
                    "region": rng.choice(list(regions)),
                    "product": rng.choice(["耳机", "手表", None]),
                    "emotion": rng.choice(["平静", "焦虑"]),
                    "emotion_score": round(rng.uniform(-1, 1), 3),
                }
            )
            i += 1
    return pd.DataFrame(rows)


def _store(out: Path, df: pd.DataFrame, run_id: str) -> None:
    write_cases(out, df.assign(run_id=run_id), run_id, 0)


def _files(out: Path, day: str) -> dict[str, bytes]:
    """Every file of the day's export (report.html without plotly's random ids) and of the state
    but its cache; summary.json without its timings."""
    import re

    got = {}
    for p in sorted((out / "exports" / day).rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "report.html":
                data = re.sub(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", b"UUID", data)
            if p.name == "summary.json":
                s = json.loads(data)
                for k in ("seconds", "export_dir", "report"):
                    s.pop(k, None)
                data = json.dumps(s, sort_keys=True).encode()
            got[str(p.relative_to(out / "exports"))] = data
    for p in sorted((out / "state").rglob("*")):
        if p.is_file() and "cache" not in p.relative_to(out / "state").parts:
            got[str(p.relative_to(out))] = p.read_bytes()
    return got


@pytest.fixture()
def nights(tmp_path, cfg, monkeypatch):
    """Export a night twice: on the store (its kept tally, when it holds, used) and on a copy of
    it without the kept tally and with the per-type tables counted from every member row as
    before the tally; check every file is the same and return whether the first counted from
    the kept tally."""
    out = tmp_path / "out"
    _store(out, _cases({k: 30 for k in TOPICS}, 0, seed=1), "20251103T000000-aaaa")
    seen: list[bool] = []
    finish = ex.finish_export

    def spy(cases, frame, clustering, *a, **k):
        seen.append(clustering.partial)
        return finish(cases, frame, clustering, *a, **k)

    monkeypatch.setattr(ex, "finish_export", spy)

    def night(day: date, **kw) -> bool:
        copy = tmp_path / f"copy-{day}"
        shutil.copytree(out, copy)
        shutil.rmtree(mt.cache_dir(copy), ignore_errors=True)
        with monkeypatch.context() as m:  # the copy's tables counted from every member row
            m.setattr(mt, "makes_tables", lambda tally: False)
            export_all(cfg, copy, embedder=HashingEmbedder(), today=day, **kw)
        export_all(cfg, out, embedder=HashingEmbedder(), today=day, **kw)
        assert seen[-2] is False
        a, b = _files(out, day.isoformat()), _files(copy, day.isoformat())
        assert a.keys() == b.keys()
        assert [f for f in a if a[f] != b[f]] == []
        shutil.rmtree(copy)
        return seen[-1]

    export_all(cfg, out, embedder=HashingEmbedder(), today=DAY0)  # the first: a full re-cluster
    return out, night


def test_nights_from_the_kept_tally_export_what_counting_every_member_exports(nights, cfg, monkeypatch):
    out, night = nights
    day = DAY0 + timedelta(days=1)
    # New cases, a region never seen before (a new value), its own new rows' ties.
    _store(out, _cases({"物流": 5, "蓝牙": 4}, 1000, seed=2, regions=("西南",)), "20251104T000000-bbbb")
    assert night(day)
    # An empty night: the tally as kept.
    assert night(day + timedelta(days=1))
    # More cases: the tally kept by a night that used one.
    _store(out, _cases({"发票": 6, "退款": 3}, 2000, seed=3), "20251106T000000-cccc")
    assert night(day + timedelta(days=2))
    # A re-processed case: the members table is written whole and counted whole...
    moved = _cases({"蓝牙": 1}, 0, seed=4)
    _store(out, moved, "20251107T000000-dddd")
    assert not night(day + timedelta(days=3))
    # ...and that count is what the next night adds to.
    _store(out, _cases({"物流": 4}, 3000, seed=5), "20251108T000000-eeee")
    assert night(day + timedelta(days=4))
    # A removed case (repair drops a part): counted whole (the next night too, as its folder
    # is not linked either), then added to again.
    stored_parts(out)[-1].unlink()
    assert not night(day + timedelta(days=5))
    # A scheduled re-cluster: its tables from the tally of its members counted a block at a time
    # (`recluster_rows`), the copy's from every member row.
    _store(out, _cases({"退款": 3}, 4000, seed=6), "20251110T000000-ffff")
    assert night(day + timedelta(days=6))
    _store(out, _cases({"蓝牙": 2, "发票": 2}, 5000, seed=7), "20251111T000000-gggg")
    assert night(day + timedelta(days=7))
    # A full re-cluster (its clusters, ids and members anew): its count is kept, then added to.
    _store(out, _cases({"退款": 4, "物流": 2}, 6000, seed=8), "20251112T000000-hhhh")
    assert night(day + timedelta(days=8), recluster=True)
    _store(out, _cases({"蓝牙": 3}, 7000, seed=9, regions=("华南",)), "20251113T000000-iiii")
    assert night(day + timedelta(days=9))


def test_since_and_a_compacted_membership_count_every_member(nights, cfg, monkeypatch):
    out, night = nights
    day = DAY0 + timedelta(days=1)
    _store(out, _cases({"物流": 5}, 1000, seed=2), "20251104T000000-bbbb")
    assert not night(day, since=DAY0 - timedelta(days=3))  # a `since` view: its folder is never linked
    _store(out, _cases({"蓝牙": 3}, 2000, seed=3), "20251105T000000-cccc")
    assert not night(day + timedelta(days=1))  # the previous folder was a `since` view
    assert night(day + timedelta(days=2))
    monkeypatch.setattr(mb, "COMPACT_PARTS", 1)
    _store(out, _cases({"发票": 3}, 3000, seed=4), "20251107T000000-dddd")
    assert not night(day + timedelta(days=3))


def test_a_kept_tally_answers_only_for_the_members_table_it_counted(nights, cfg):
    out, night = nights
    _store(out, _cases({"物流": 5}, 1000, seed=2), "20251104T000000-bbbb")
    day = DAY0 + timedelta(days=1)
    assert night(day)
    folder = out / "exports" / day.isoformat()
    rows = json.loads((folder / "summary.json").read_text(encoding="utf-8"))["rows"]["members"]
    part = mb.last_part(out)
    assert mt.load(out, mt.folder_key(folder, rows, part)) is not None
    assert mt.load(out, mt.folder_key(folder, rows - 1, part)) is None
    assert mt.load(out, mt.folder_key(folder, rows, part + 1)) is None
    # The folder's last part written again (another file, same rows): not the table counted.
    last = sorted((folder / "members.parquet").glob("part-*.parquet"))[-1]
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data)
    assert mt.load(out, mt.folder_key(folder, rows, part)) is None
