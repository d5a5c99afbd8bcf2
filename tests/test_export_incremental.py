"""The incremental export (pipeline.insights.incremental/membership/export): new cases go to the
stored clusters, membership is kept per case, a full re-cluster runs on schedule, on drift or on
request, and re-runs, re-processed and repaired cases leave exactly one membership per case.

Cases are written straight into the store (no pipeline run) with texts of a few distinct
problems, and embedded with the hashing fake the other export tests use."""

from __future__ import annotations

import json
import random
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline.embed.fake import HashingEmbedder
from pipeline.insights.cluster import ALL_SCOPE, ClusterParams, fit_clusters
from pipeline.insights.export import export_all, latest_export
from pipeline.insights.member_parts import read_members
from pipeline.insights.membership import load_members, load_meta
from pipeline.storage.store import stored_parts, write_cases

TOPICS = {
    "物流": ("快递三天了还没收到包裹物流信息一直不更新", ["配送站", "快递员", "派送", "物流单号", "签收"]),
    "发票": ("发票抬头开错了需要重新开具增值税发票", ["公司抬头", "税号", "电子发票", "开票", "纸质发票"]),
    "退款": ("申请退款好几天了钱一直没有退回到账", ["退款进度", "原路退回", "银行卡", "余额", "审核"]),
    "蓝牙": ("蓝牙耳机和手机配对连接不上声音断断续续", ["配对", "固件", "重启", "左耳", "充电仓"]),
}
NEW_TOPIC = ("会员积分兑换优惠券失败积分被清零了", ["积分商城", "兑换码", "会员等级", "过期", "优惠券"])
DAY0 = date(2025, 11, 3)


def _text(rng: random.Random, topic: tuple[str, list[str]]) -> str:
    base, extra = topic
    return base + "，" + "、".join(rng.sample(extra, 2))


def _cases(n_per: dict[str, int], start: int, run_id: str, seed: int, topics=None) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    i = start
    topics = topics or TOPICS
    for name, n in n_per.items():
        for _ in range(n):
            rows.append(
                {
                    "case_id": f"c{i:05d}",
                    "conversation_id": f"v{i:05d}",
                    "channel": "chat",
                    "date": (DAY0 - timedelta(days=i % 14)).isoformat(),
                    "date_source": "started_at",
                    "problem": _text(rng, topics[name]),
                    "outcome": rng.choice(["resolved", "unresolved"]),
                    "issue_type": "售后" if name in ("退款", "蓝牙") else "物流与票据",
                    "region": rng.choice(["华东", "华北"]),
                    "emotion": "平静",
                    "emotion_score": 0.0,
                    "run_id": run_id,
                }
            )
            i += 1
    return pd.DataFrame(rows)


def _store(out: Path, df: pd.DataFrame, run_id: str) -> None:
    write_cases(out, df.drop(columns=["run_id"]).assign(run_id=run_id), run_id, 0)


def _cfg(cfg, **cluster):
    return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update=cluster)})


def _export(cfg, out: Path, day: date, **kw):
    return export_all(cfg, out, embedder=HashingEmbedder(), today=day, **kw)


def _members(summary) -> pd.DataFrame:
    return read_members(Path(summary["export_dir"]))


def _all_scope_ids(m: pd.DataFrame) -> dict[str, str | None]:
    a = m[m["scope"] == ALL_SCOPE]
    return dict(zip(a["case_id"], a["cluster_id"]))


@pytest.fixture()
def history(tmp_path, cfg):
    """120 cases of four problems, exported once (a full re-cluster: no state yet)."""
    out = tmp_path / "out"
    _store(out, _cases({k: 30 for k in TOPICS}, 0, "20251103T000000-aaaa", seed=1), "20251103T000000-aaaa")
    first = _export(cfg, out, DAY0)
    return out, first


def test_first_export_is_full_and_stores_membership(history):
    out, first = history
    assert first["mode"] == "full" and first["mode_reason"] == "no_state" and first["drift"] is None
    members, _ = load_members(out, load_meta(out))
    assert len(members[members["scope"] == ALL_SCOPE]) == 120
    assert load_meta(out)["last_full"] == DAY0.isoformat()


def test_full_export_members_file_carries_every_rows_case_texts(history):
    """A re-cluster's tables read its per-type rows without their texts; the members file still
    shows each row's case's problem and labels, as its cross-type row does, in every scope."""
    _, first = history
    m = _members(first)
    cross = m[m["scope"] == ALL_SCOPE].set_index("case_id")
    per_type = m[m["scope"] != ALL_SCOPE]
    assert len(per_type) == len(cross) == 120
    assert per_type["problem"].notna().all() and per_type["conversation_id"].notna().all()
    for col in ("conversation_id", "request_kind", "urgency", "problem"):
        want = cross.loc[per_type["case_id"], col].reset_index(drop=True)
        pd.testing.assert_series_equal(per_type[col].reset_index(drop=True), want, check_names=False)


def test_incremental_after_full_on_same_cases_gives_same_members(history, cfg):
    out, first = history
    again = _export(cfg, out, DAY0 + timedelta(days=1))
    assert again["mode"] == "incremental" and again["n_new_cases"] == 0
    cols = ["scope", "case_id", "cluster_id", "is_noise"]
    a = _members(first)[cols].sort_values(cols[:2]).reset_index(drop=True)
    b = _members(again)[cols].sort_values(cols[:2]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    c1 = pd.read_parquet(Path(first["export_dir"]) / "clusters.parquet")
    c2 = pd.read_parquet(Path(again["export_dir"]) / "clusters.parquet")
    assert list(c1["cluster_id"]) == list(c2["cluster_id"]) and list(c1["size"]) == list(c2["size"])
    assert list(c1["label"]) == list(c2["label"]) and not c2["is_new"].any()


def test_new_cases_join_their_problems_cluster_and_only_they_are_embedded(history, cfg):
    out, first = history
    before = _all_scope_ids(_members(first))
    topic_of = {f"c{i:05d}": list(TOPICS)[i // 30] for i in range(120)}
    usual = {t: pd.Series([before[c] for c in before if topic_of[c] == t]).mode()[0] for t in TOPICS}
    _store(out, _cases({k: 5 for k in TOPICS}, 1000, "20251104T000000-bbbb", seed=2), "20251104T000000-bbbb")
    emb = HashingEmbedder()
    night = export_all(cfg, out, embedder=emb, today=DAY0 + timedelta(days=1))
    assert night["mode"] == "incremental" and night["n_new_cases"] == 20
    assert sum(emb.calls) == 20  # history is not embedded again
    assert night["drift"] is not None and night["drift"] <= cfg.cluster.recluster_drift
    after = _all_scope_ids(_members(night))
    new = {c: after[c] for c in after if c.startswith("c01")}
    expected = {f"c{1000 + i:05d}": usual[list(TOPICS)[i // 5]] for i in range(20)}
    agree = np.mean([new[c] == expected[c] for c in expected])
    assert agree >= 0.9, (new, expected)
    assert all(after[c] == before[c] for c in before)  # yesterday's members keep their cluster
    clusters = pd.read_parquet(Path(night["export_dir"]) / "clusters.parquet")
    sizes = _members(night).dropna(subset=["cluster_id"]).groupby("cluster_id").size()
    assert (sizes.reindex(clusters["cluster_id"]).to_numpy() == clusters["size"].to_numpy()).all()


def test_rerun_of_the_same_night_adds_nothing(history, cfg):
    out, _ = history
    _store(out, _cases({"物流": 6}, 2000, "20251104T000000-cccc", seed=3), "20251104T000000-cccc")
    day = DAY0 + timedelta(days=1)
    one = _export(cfg, out, day)
    parts = sorted((out / "state" / "clusters" / "members").glob("part-*.parquet"))
    two = _export(cfg, out, day)
    assert one["n_new_cases"] == 6 and two["n_new_cases"] == 0 and two["mode"] == "incremental"
    assert sorted((out / "state" / "clusters" / "members").glob("part-*.parquet")) == parts
    m = _members(two)
    assert not m.duplicated(["case_id", "scope"]).any() and len(m[m["scope"] == ALL_SCOPE]) == 126
    pd.testing.assert_frame_equal(_members(one), m)


def test_reprocessed_case_is_reassigned_not_duplicated(history, cfg):
    out, first = history
    moved = _cases({"蓝牙": 1}, 0, "20251105T000000-dddd", seed=4)  # c00000 was a 物流 case
    _store(out, moved, "20251105T000000-dddd")
    night = _export(cfg, out, DAY0 + timedelta(days=1))
    assert night["n_new_cases"] == 1
    m = _members(night)
    rows = m[m["case_id"] == "c00000"]
    assert sorted(rows["scope"]) == sorted([ALL_SCOPE, "售后"])  # its new issue type's scope, once each
    blue = _all_scope_ids(_members(first))["c00100"]  # a 蓝牙 case of the history
    assert rows.loc[rows["scope"] == ALL_SCOPE, "cluster_id"].item() == blue
    assert not m.duplicated(["case_id", "scope"]).any()
    assert night["members_parts"] == 1  # a re-processed case's old rows are in the parts: all written again


def test_cases_removed_by_repair_leave_the_membership(history, cfg):
    out, _ = history
    part = stored_parts(out)[0]
    gone = set(pd.read_parquet(part, columns=["case_id"])["case_id"])
    part.unlink()  # what `casemine repair` does to a part it cannot trust
    night = _export(cfg, out, DAY0 + timedelta(days=1))
    assert night["n_members_dropped"] > 0
    assert not gone & set(_members(night)["case_id"])
    members, _ = load_members(out, load_meta(out))
    assert not gone & set(members["case_id"])


def test_drift_triggers_a_full_recluster(history, cfg):
    out, _ = history
    newcomers = _cases({"积分": 30}, 3000, "20251104T000000-eeee", seed=5, topics={"积分": NEW_TOPIC})
    _store(out, newcomers, "20251104T000000-eeee")
    night = _export(cfg, out, DAY0 + timedelta(days=1))
    assert night["mode"] == "full" and night["mode_reason"] == "drift" and night["drift"] > 0.3
    assert night["n_new_clusters"] >= 1  # the new problem is a cluster of its own now
    assert load_meta(out)["last_full"] == (DAY0 + timedelta(days=1)).isoformat()


def test_schedule_and_request_trigger_a_full_recluster(history, cfg):
    out, first = history
    assert _export(cfg, out, DAY0 + timedelta(days=6))["mode"] == "incremental"
    weekly = _export(cfg, out, DAY0 + timedelta(days=7))
    assert weekly["mode"] == "full" and weekly["mode_reason"] == "schedule"
    # The re-cluster starts from the stored centroids: same cases, same ids.
    assert _all_scope_ids(_members(weekly)) == _all_scope_ids(_members(first))
    asked = _export(cfg, out, DAY0 + timedelta(days=8), recluster=True)
    assert asked["mode"] == "full" and asked["mode_reason"] == "requested"
    daily = _export(_cfg(cfg, recluster_every_days=0), out, DAY0 + timedelta(days=9))
    assert daily["mode"] == "full" and daily["mode_reason"] == "schedule"


def test_clusters_export_cli_recluster_flag(history, cfg, monkeypatch):
    from typer.testing import CliRunner

    import pipeline.embed
    from pipeline.cli import _register, app

    monkeypatch.setattr(pipeline.embed, "Embedder", lambda cfg, **kw: HashingEmbedder())
    _register()
    out, _ = history
    res = CliRunner().invoke(app, ["clusters", "export", "--out", str(out), "--recluster"])
    assert res.exit_code == 0, res.output
    assert "mode: full (requested)" in res.output
    assert latest_export(out) is not None


def test_seeded_kmeans_keeps_the_stored_partition():
    rng = np.random.default_rng(0)
    centers = np.eye(16)[:4]
    X = np.concatenate([c + rng.normal(0, 0.25, (40, 16)) for c in centers]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    params = ClusterParams(pca_components=5, min_cluster_size=5)
    first = fit_clusters(X, params)
    seeds = np.stack([X[first.labels == k].mean(axis=0) for k in sorted(first.centers)])
    more = np.concatenate([X, X[:20] + rng.normal(0, 0.01, (20, 16)).astype(np.float32)])
    again = fit_clusters(more, params, seeds=seeds)
    assert len(again.centers) == len(first.centers)
    # Labels are renumbered by size (ids come from centroid matching): compare the partitions.
    assert adjusted_rand_score(first.labels, again.labels[: len(X)]) == 1.0


def test_full_recluster_past_the_fit_cap_still_assigns_every_case(history, cfg):
    """History over `fit_max_cases`: the fit sees a sample, yet every stored case is a member and
    each problem still forms its own cluster."""
    out, first = history
    capped = _export(_cfg(cfg, fit_max_cases=100), out, DAY0 + timedelta(days=1), recluster=True)
    assert capped["mode"] == "full" and capped["n_clustered_cases"] == 120
    m = _members(capped)
    ids = _all_scope_ids(m)
    assert len(ids) == 120 and all(v is not None for v in ids.values())
    topic = {f"c{i:05d}": i // 30 for i in range(120)}
    by_cluster: dict[str, set[int]] = {}
    for cid, cl in ids.items():
        by_cluster.setdefault(cl, set()).add(topic[cid])
    assert all(len(t) == 1 for t in by_cluster.values()) and len(by_cluster) == len(TOPICS)


def test_csv_frame_writes_list_cells_as_json_and_leaves_other_columns():
    import numpy as np

    from pipeline.insights.export import to_csv_frame

    df = pd.DataFrame(
        {
            "label": pd.Series(["物流", None], dtype="string"),
            "terms": [["快递", "三天"], None],
            "mix": [{"a": 0.5}, np.array([1, 2])],
            "size": [3, 4],
            "plain": ["x", None],
        }
    )
    out = to_csv_frame(df)
    assert out["terms"].tolist() == ['["快递", "三天"]', None]
    assert out["mix"].tolist() == ['{"a": 0.5}', "[1, 2]"]
    assert out["label"].dtype == df["label"].dtype and out["size"].tolist() == [3, 4]
    pd.testing.assert_series_equal(out["plain"], df["plain"])
    assert df["terms"].iloc[0] == ["快递", "三天"]  # the input frame is not changed


def _parts(summary) -> list[Path]:
    return sorted((Path(summary["export_dir"]) / "members.parquet").glob("part-*.parquet"))


def test_a_night_links_yesterdays_member_parts_and_writes_only_its_new_cases(history, cfg, monkeypatch):
    import os

    import pipeline.insights.member_parts as mp

    out, first = history
    _store(out, _cases({k: 5 for k in TOPICS}, 1000, "20251104T000000-bbbb", seed=2), "20251104T000000-bbbb")
    night = _export(cfg, out, DAY0 + timedelta(days=1))
    old, parts = _parts(first), _parts(night)
    assert night["members_parts"] == len(parts) == 2 and len(old) == 1
    for a, b in ((parts[0], old[0]), (mp.csv_part(parts[0]), mp.csv_part(old[0]))):
        assert os.stat(a).st_ino == os.stat(b).st_ino  # yesterday's rows: the same file, not a copy
    new_part = pd.read_parquet(parts[1])
    assert set(new_part["case_id"]) == {f"c{1000 + i:05d}" for i in range(20)}
    assert len(pd.read_csv(mp.csv_part(parts[1]), encoding="utf-8-sig")) == len(new_part)
    linked = _members(night)
    # The same rows as the table written whole (no part reused).
    monkeypatch.setattr(mp, "reusable_parts", lambda *a, **k: [])
    whole = _export(cfg, out, DAY0 + timedelta(days=2))
    assert whole["members_parts"] == 1
    key = ["scope", "case_id"]
    pd.testing.assert_frame_equal(
        linked.sort_values(key).reset_index(drop=True), _members(whole).sort_values(key).reset_index(drop=True)
    )
    monkeypatch.undo()
    # A night without new cases links every part and writes none.
    quiet = _export(cfg, out, DAY0 + timedelta(days=3))
    assert quiet["members_parts"] == 1 and len(_members(quiet)) == len(linked)


def test_member_parts_are_written_whole_when_the_previous_folder_does_not_match(history, cfg):
    out, first = history
    summary = Path(first["export_dir"]) / "summary.json"
    s = json.loads(summary.read_text(encoding="utf-8"))
    s["rows"]["members"] -= 1  # a folder that does not hold what the state says
    summary.write_text(json.dumps(s), encoding="utf-8")
    _store(out, _cases({"物流": 3}, 3000, "20251104T000000-eeee", seed=5), "20251104T000000-eeee")
    night = _export(cfg, out, DAY0 + timedelta(days=1))
    assert night["mode"] == "incremental" and night["members_parts"] == 1
    m = _members(night)
    assert not m.duplicated(["case_id", "scope"]).any() and len(m[m["scope"] == ALL_SCOPE]) == 123


def test_member_parts_are_written_whole_when_cases_are_classified_at_export(history, cfg):
    """Cases stored without an issue type are classified in memory by today's model: rows of
    them linked from yesterday could hold another type, so nothing is linked that night."""
    out, first = history
    plain = _cases({"物流": 3}, 4000, "20251104T000000-ffff", seed=6).assign(issue_type=None)
    _store(out, plain, "20251104T000000-ffff")
    night = _export(cfg, out, DAY0 + timedelta(days=1))
    assert night["mode"] == "incremental" and any("补充分类" in n for n in night["notes"])
    assert night["members_parts"] == 1
    m = _members(night)
    assert not m.duplicated(["case_id", "scope"]).any() and len(m[m["scope"] == ALL_SCOPE]) == 123


def test_nights_with_kept_member_rows_export_what_looking_every_member_up_exports(history, cfg, monkeypatch):
    """The membership's case rows kept between nights (`member_rows`, with the case copy growing
    in place) give the tables that looking every member up (`locate_members`) gives: new cases,
    a re-processed case (the copy written whole), a night of nothing new."""
    import shutil

    import pipeline.insights.export as ex
    import pipeline.insights.member_cross as mc
    import pipeline.insights.member_rows as mr
    import pipeline.storage.case_cache as cc

    real_load = ex.load_cases_copy

    monkeypatch.setattr(cc, "REWRITE_SHARE", 1.0)  # the copy grows in place, as on a big history
    # The membership read and looked up each night: not taken from the kept cross-type entry
    # (`member_cross`, whose nights read no member: tests/test_member_cross.py).
    monkeypatch.setattr(mc, "load", lambda *a, **k: None)
    out, _ = history
    looked: list[int] = []
    real = mr.case_rows
    monkeypatch.setattr(mr, "case_rows", lambda ids, *a: looked.append(len(ids)) or real(ids, *a))
    nights = [
        _cases({"物流": 4, "退款": 3}, 3000, "20251104T000000-n1", seed=5),
        _cases({"发票": 5}, 3100, "20251105T000000-n2", seed=6),
        _cases({"蓝牙": 1}, 5, "20251106T000000-n3", seed=7),  # re-processes c00005
        None,
    ]
    for k, rows in enumerate(nights):
        if rows is not None:
            _store(out, rows, str(rows["run_id"].iloc[0]))
        plain = out.parent / f"plain{k}"
        shutil.copytree(out, plain)
        shutil.rmtree(plain / "state" / "cache" / "member-rows", ignore_errors=True)
        day = DAY0 + timedelta(days=k + 1)
        looked.clear()
        got = _export(cfg, out, day)
        if k == 1:  # the re-cluster's 240 rows kept: only last night's new part is looked up
            assert looked == [14]
        with monkeypatch.context() as m:  # no copy generation: every member looked up (`locate_members`)
            m.setattr(ex, "load_cases_copy", lambda o: (real_load(o)[0], None))
            want = _export(cfg, plain, day)
        for name in ("members.parquet", "clusters.parquet", "trends.parquet"):
            a, b = (Path(s["export_dir"]) / name for s in (got, want))
            if a.exists():
                pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
        assert (got["mode"], got["n_new_cases"]) == (want["mode"], want["n_new_cases"])


def _with_emotions(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = random.Random(seed)
    return df.assign(
        emotion_trajectory=[rng.choice(["改善", "平稳", "恶化", None]) for _ in range(len(df))],
        emotion_start=[rng.uniform(-1, 1) for _ in range(len(df))],
        emotion_end=[rng.uniform(-1, 1) for _ in range(len(df))],
        emotion_delta=[rng.uniform(-2, 2) for _ in range(len(df))],
    )


def test_the_emotion_table_finds_members_cases_by_row_as_by_id(tmp_path, cfg, monkeypatch):
    """An incremental night hands the emotion table each member's case row (known from the
    membership's positions): on new cases, a re-processed case and a night of nothing new, each
    is the case of that id, and the table is the one found by hashing the ids."""
    import pipeline.insights.export as ex

    out = tmp_path / "out"
    _store(
        out,
        _with_emotions(_cases({k: 30 for k in TOPICS}, 0, "20251103T000000-aaaa", seed=1), 1),
        "20251103T000000-aaaa",
    )
    assert _export(cfg, out, DAY0)["mode"] == "full"
    real = ex.trajectory_table
    given: list[bool] = []

    def both(cases, members, teams, cluster_codes, case_rows=None):
        got = real(cases, members, teams, cluster_codes, case_rows)
        given.append(case_rows is not None)
        if case_rows is not None:
            assert cases["case_id"].to_numpy()[case_rows].tolist() == members["case_id"].tolist()
            pd.testing.assert_frame_equal(got, real(cases, members, teams, cluster_codes), check_exact=True)
        return got

    monkeypatch.setattr(ex, "trajectory_table", both)
    nights = [
        _cases({"物流": 4, "退款": 3}, 3000, "20251104T000000-n1", seed=5),
        _cases({"蓝牙": 1}, 5, "20251105T000000-n2", seed=7),  # re-processes c00005
        None,
    ]
    for k, rows in enumerate(nights):
        if rows is not None:
            _store(out, _with_emotions(rows, k), str(rows["run_id"].iloc[0]))
        night = _export(cfg, out, DAY0 + timedelta(days=k + 1))
        assert night["mode"] == "incremental"
        emotion = pd.read_parquet(Path(night["export_dir"]) / "emotion.parquet")
        assert (emotion["dimension"] == "cluster_id").sum() > 1
    assert given == [True, True, True]


def test_an_export_that_raises_lets_the_kept_counts_go(history, cfg, monkeypatch):
    """The kept-count modules hold this export's columns until the tables are counted; an export
    that raises in between must not leave them held (their memory) until the next export."""
    from pipeline.insights import case_kept, case_kpis, case_relations, case_trajectories
    from pipeline.insights import export as ex

    out, _ = history
    monkeypatch.setattr(case_kept, "KEEP_FROM_ROWS", 0)  # counts kept at any size

    def fail(*a, **k):
        raise RuntimeError("a table failed")

    monkeypatch.setattr(ex, "finish_export", fail)
    with pytest.raises(RuntimeError, match="a table failed"):
        _export(cfg, out, DAY0 + timedelta(days=1))
    for module in (case_kpis, case_relations, case_trajectories):
        assert not module._HELD._entries, module.__name__
    monkeypatch.undo()
    monkeypatch.setattr(case_kept, "KEEP_FROM_ROWS", 0)
    seen: list[bool] = []
    finish = ex.finish_export

    def held_then_finish(*a, **k):  # the counts are held while the tables are counted
        seen.append(bool(case_kpis._HELD._entries))
        return finish(*a, **k)

    monkeypatch.setattr(ex, "finish_export", held_then_finish)
    _export(cfg, out, DAY0 + timedelta(days=1))
    assert seen == [True] and not case_kpis._HELD._entries
