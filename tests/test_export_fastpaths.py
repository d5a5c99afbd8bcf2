"""The export's counting shortcuts give what the plain pandas code they replaced gave.

The nightly export counts every stored case; at 100k cases the plain forms (a groupby iterated
group by group, a Counter per group, a merge on string keys, a sample of a fully built frame)
cost seconds, so pipeline.insights does the same counts by position. Each test here runs the
replaced form beside the new one on data with the awkward values (missing, empty, "未知",
Arrow-backed strings, a case no longer selected) and wants the same result, order included."""

from __future__ import annotations

import json
import random
import sys
import warnings
from collections import Counter
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.insights import membership as mb
from pipeline.insights.cluster import (
    ALL_SCOPE,
    _counted_chars,
    _plain_problems,
    fill_classification,
    group_codes,
    group_shares,
    select_cases,
    share_dict,
)
from pipeline.insights.codes import sorted_codes
from pipeline.insights.emotion_stats import _TEAM_KEYS, _r, case_teams, trajectory_table, wilson, worsened_by_team
from pipeline.insights.export import map_points, members_view
from pipeline.insights.trends import BREAKDOWNS, _dates, count_table, week_over_week, week_start
from pipeline.text.mask import PLACEHOLDER_RE


@pytest.mark.parametrize("dtype", [object, "str"])
@pytest.mark.parametrize("top", [None, 1, 3])
def test_group_shares_are_each_groups_share_dict(dtype, top):
    rng = random.Random(7)
    pool = ["华东", "华北", "未知", "", None, "华南", np.nan]
    for _ in range(60):
        n = rng.randint(0, 120)
        values = pd.Series([rng.choice(pool) for _ in range(n)], dtype=dtype)
        codes = np.array([rng.randrange(4) for _ in range(n)], dtype=np.int64)
        got = group_shares(codes, values, top)
        listed = values.tolist()
        want = {
            g: share_dict([v for v, c in zip(listed, codes.tolist()) if c == g], top)
            for g in sorted(set(codes.tolist()))
        }
        # Order matters: the first share is a cluster's top emotion, the first few its regions.
        assert {g: list(s.items()) for g, s in got.items()} == {g: list(s.items()) for g, s in want.items()}


def test_rows_in_no_group_are_left_out_of_every_groups_shares():
    """A groupby leaves rows with a missing key out of `.indices`: `group_codes` gives them -1 and
    `group_shares` counts them nowhere."""
    values = pd.Series(["x", "y", "y", "z", "x"], index=[10, 11, 12, 13, 14])
    codes = group_codes([np.array([0, 2]), np.array([4])], len(values))
    assert codes.tolist() == [0, -1, 0, -1, 1]
    assert group_shares(codes, values) == {0: share_dict(["x", "y"]), 1: share_dict(["x"])}


def test_group_shares_break_ties_by_first_appearance_like_counter():
    values = pd.Series(["b", "a", "a", "b", "c"], dtype="str")
    got = group_shares(np.zeros(5, dtype=np.int64), values)
    assert list(got[0]) == [k for k, _ in Counter(values.tolist()).most_common()] == ["b", "a", "c"]


def _members(n: int, seed: int = 3) -> pd.DataFrame:
    rng = random.Random(seed)
    return pd.DataFrame(
        {
            "scope": [ALL_SCOPE if i % 3 else "售后" for i in range(n)],
            "cluster_id": [rng.choice(["C1", "C2", None]) for _ in range(n)],
            "x": [rng.random() if i % 7 else np.nan for i in range(n)],
            "y": [rng.random() for _ in range(n)],
            "problem": [f"问题{i}" for i in range(n)],
        }
    )


def _map_points_before(members: pd.DataFrame, clusters: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """map_points as it was: every point built, then a sample of them kept."""
    m = members[(members["scope"] == ALL_SCOPE) & members["x"].notna()].reset_index(drop=True)
    labels = dict(zip(clusters["cluster_id"], clusters["label"]))
    pts = pd.DataFrame(
        {
            "x": np.round(m["x"].astype(np.float64), 4),
            "y": np.round(m["y"].astype(np.float64), 4),
            "cluster_id": m["cluster_id"].where(m["cluster_id"].notna(), None),
            "label": [labels.get(c, "噪声") if isinstance(c, str) else "噪声" for c in m["cluster_id"]],
            "text": m["problem"].tolist(),
        }
    )
    if len(pts) > max_points:
        pts = pts.sample(n=max_points, random_state=0).sort_index()
    return pts


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("max_points", [10, 5000])
def test_map_points_keep_the_points_a_sample_of_all_would(max_points, window, monkeypatch):
    """The same points whether the rows are taken at once or a window of 16 at a time (as the
    export's re-cluster takes them from its mapped copy, dropping each window's pages)."""
    import functools

    import pipeline.insights.export as ex
    from pipeline.insights import recluster_rows as rr

    if window is not None:
        monkeypatch.setattr(ex, "take_by_windows", functools.partial(rr.take_by_windows, window=window))
    members = _members(400)
    clusters = pd.DataFrame({"cluster_id": ["C1", "C2"], "label": ["物流慢", "退款"]})
    got = map_points(members, clusters, max_points)
    pd.testing.assert_frame_equal(got, _map_points_before(members, clusters, max_points))
    assert len(got) == min(max_points, len(_map_points_before(members, clusters, 10**9)))


def _members_view_before(frame: pd.DataFrame, membership: pd.DataFrame) -> pd.DataFrame:
    """members_view as it was: positions by a map through a Series, fields by a merge."""
    from pipeline.insights.cluster import MEMBER_FIELDS

    keep = [c for c in MEMBER_FIELDS if c in frame]
    fields = frame[keep].assign(case_id=frame["case_id"].astype(str)).rename(columns={"cluster_text": "problem"})
    m = membership[["scope", "cluster_id", "is_noise", "similarity", "case_id", "x", "y"]].copy()
    m["case_id"] = m["case_id"].astype(str)
    m["_all"] = m["scope"] != ALL_SCOPE
    m["_pos"] = m["case_id"].map(pd.Series(np.arange(len(fields)), index=fields["case_id"]))
    m = m.sort_values(["_all", "scope", "_pos"], kind="stable").drop(columns=["_all", "_pos"])
    out = m.merge(fields, on="case_id", how="inner", sort=False)
    out["cluster_id"] = out["cluster_id"].where(out["cluster_id"].notna(), None)
    out["is_noise"] = out["is_noise"].astype(bool)
    out["similarity"] = out["similarity"].astype(object).where(out["similarity"].notna(), None)
    order = ["scope", "cluster_id", "is_noise", "similarity", *[c if c != "cluster_text" else "problem" for c in keep]]
    return out[[*order, "x", "y"]].reset_index(drop=True)


@pytest.mark.parametrize("ids", ["str", object])
def test_members_view_is_the_membership_joined_to_the_cases_in_order(ids):
    frame = pd.DataFrame(
        {
            "case_id": pd.Series([f"k{i}" for i in (3, 1, 4, 0, 2)], dtype=ids),
            "date": ["2025-11-01"] * 5,
            "region": ["华东", None, "华北", "华东", ""],
            "cluster_text": [f"文本{i}" for i in range(5)],
        }
    )
    rows = []
    for scope in ("售后", ALL_SCOPE, "物流"):
        for cid in ("k2", "k9", "k0", "k3", "k4", "k1"):  # k9: a case no longer selected
            rows.append(
                {
                    "case_id": cid,
                    "run_id": "r1",
                    "scope": scope,
                    "cluster_id": None if cid == "k4" else "C1",
                    "is_noise": cid == "k4",
                    "similarity": None if cid == "k4" else 0.81,
                    "x": 0.5 if scope == ALL_SCOPE else np.nan,
                    "y": 0.25 if scope == ALL_SCOPE else np.nan,
                }
            )
    membership = pd.DataFrame(rows).astype({"case_id": ids})
    got = members_view(frame, membership)
    pd.testing.assert_frame_equal(got, _members_view_before(frame, membership))
    assert "k9" not in set(got["case_id"]) and got["scope"].iloc[0] == ALL_SCOPE


def test_week_over_week_counts_whole_days_whatever_the_times():
    # Times and a zone in the dates: a case late on the window's last day still counts.
    stamps = ["2025-11-30 23:30", "2025-11-24 00:10", "2025-11-23 12:00", "2025-11-17 08:00", "2025-11-16 23:59"]
    keys = ["A", "A", "A", "B", "A"]
    for dates in (stamps, [s + "+08:00" for s in stamps]):
        df = pd.DataFrame({"date": dates, "k": keys})
        out = week_over_week(df, "d", "k", date(2025, 11, 30), 0.5, 1).set_index("key")
        assert out.loc["A", "this_week"] == 2 and out.loc["A", "last_week"] == 1
        assert out.loc["B", "this_week"] == 0 and out.loc["B", "last_week"] == 1


def test_case_teams_read_the_team_keys_else_the_agent():
    metas = [json.dumps({k: f"T-{k}"}) for k in _TEAM_KEYS] + ['{"teamwork": ""}', "not json team", None, "{}"]
    agents = ["a1"] * len(_TEAM_KEYS) + ["a2", "a3", None, "a4"]
    got = case_teams(pd.DataFrame({"metadata_json": pd.Series(metas, dtype="str"), "agent_id": agents}))
    assert got == [f"T-{k}" for k in _TEAM_KEYS] + ["a2", "a3", None, "a4"]


@pytest.mark.parametrize("dtype", ["str", object])
def test_case_teams_from_arrow_columns_equal_the_row_by_row_rule(dtype):
    """The Arrow path (text columns of stored cases) calls `_team` only where there is metadata;
    the result is the row-by-row rule's, on Arrow and object columns alike."""
    from pipeline.insights.emotion_stats import _team

    rng = np.random.default_rng(3)
    pool_m = [None, "{}", '{"team": "T1"}', '{"group": ""}', '{"skill_group": "S"}', "team but not json", '{"x": 1}']
    pool_a = [None, "a1", "a2", "", "坐席7"]
    metas = [pool_m[i] for i in rng.integers(0, len(pool_m), 500)]
    agents = [pool_a[i] for i in rng.integers(0, len(pool_a), 500)]
    df = pd.DataFrame({"metadata_json": pd.Series(metas, dtype=dtype), "agent_id": pd.Series(agents, dtype=dtype)})
    want = [_team(m, a) for m, a in zip(metas, agents)]
    assert case_teams(df) == want
    assert case_teams(df.iloc[::-1].reset_index(drop=True)) == want[::-1]
    only_agents = case_teams(df[["agent_id"]])
    assert only_agents == [a if a is not None else None for a in agents]
    assert case_teams(df.iloc[0:0]) == []


def _count_table_by_groupby(df: pd.DataFrame, dimension: str, key_col: str) -> pd.DataFrame:
    """The groupby form `count_table` replaced."""
    base = df[df[key_col].notna()].copy()
    dates = pd.to_datetime(base["date"], errors="coerce")
    base["day"], base["week"] = dates.dt.strftime("%Y-%m-%d"), week_start(base["date"])
    parts = []
    for gran in ("day", "week"):
        g = base.groupby([key_col, gran]).size().reset_index(name="count")
        g.columns = ["key", "period", "count"]
        parts.append(g.assign(breakdown="all", breakdown_value="全部", granularity=gran))
        for b in (b for b in BREAKDOWNS if b in base):
            gb = base.assign(**{b: base[b].fillna("未知")}).groupby([key_col, gran, b]).size().reset_index(name="count")
            gb.columns = ["key", "period", "breakdown_value", "count"]
            parts.append(gb.assign(breakdown=b, granularity=gran))
    out = pd.concat(parts, ignore_index=True)
    out.insert(0, "dimension", dimension)
    return out[["dimension", "key", "granularity", "period", "breakdown", "breakdown_value", "count"]]


@pytest.mark.parametrize("dtype", [object, "str"])
def test_count_table_counts_what_a_groupby_counts(dtype):
    rng = random.Random(5)
    keys = ["C1", "C2", "C10", "物流配送", "", None, "未知", np.nan]
    days = ["2025-11-01", "2025-11-03", "2025-11-09", "2025-12-31", "2024-01-01", None, "", "not a date"]
    values = ["华东", "华北", "未知", "", None, np.nan]
    for _ in range(120):
        n = rng.randint(0, 80)
        df = pd.DataFrame(
            {
                "k": pd.Series([rng.choice(keys) for _ in range(n)], dtype=dtype),
                "date": pd.Series([rng.choice(days) for _ in range(n)], dtype=dtype),
                "channel": pd.Series([rng.choice(values) for _ in range(n)], dtype=dtype),
                "region": pd.Series([rng.choice(values) for _ in range(n)], dtype=object),
            }
        )
        if rng.random() < 0.3:
            df = df.drop(columns=["region"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not a date" is parsed one by one
            got, want = count_table(df, "d", "k"), _count_table_by_groupby(df, "d", "k")
            coded = count_table(df, "d", "k", key_codes=sorted_codes(df["k"]))  # the caller's codes
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
        pd.testing.assert_frame_equal(coded, got)
        # Text columns typed as pandas types their values (`str` where all are text): as the
        # frame built from object arrays was, so the written tables keep their column types.
        for col in ("dimension", "key", "granularity", "period", "breakdown", "breakdown_value"):
            assert got[col].dtype == pd.Series(got[col].tolist(), dtype=object).infer_objects().dtype or not len(got)


def _trajectory_by_groups(df: pd.DataFrame) -> pd.DataFrame:
    """The group-by-group form `trajectory_table` replaced (teams and clusters already columns)."""
    rows = []
    df = df[df["emotion_trajectory"].notna()]
    for dim in ("issue_type", "cluster_id", "channel", "outcome", "team"):
        for key, g in df.groupby(dim):
            shares = g["emotion_trajectory"].value_counts(normalize=True)
            rows.append(
                {
                    "dimension": dim,
                    "key": str(key),
                    "n": int(len(g)),
                    **{f"share_{t}": round(float(shares.get(t, 0.0)), 4) for t in ("改善", "平稳", "恶化")},
                    **{f"mean_{c}": _r(g[f"emotion_{c}"].mean()) for c in ("start", "end", "delta")},
                }
            )
    out = pd.DataFrame(rows)
    return out.sort_values(["dimension", "n"], ascending=[True, False], kind="stable").reset_index(drop=True)


def _trajectory_by_groupbys(df: pd.DataFrame) -> pd.DataFrame:
    """The groupby-per-dimension form `trajectory_table` replaced next (teams and clusters
    already columns): its means are the ones to match bit for bit."""
    df = df[df["emotion_trajectory"].notna()]
    means = ["emotion_start", "emotion_end", "emotion_delta"]
    parts = []
    for dim in ("issue_type", "cluster_id", "channel", "outcome", "team"):
        keyed = df[df[dim].notna()]
        if not len(keyed):
            continue
        by = keyed.groupby(dim, sort=True)
        n = by.size()
        counts = keyed.groupby([dim, "emotion_trajectory"]).size().unstack(fill_value=0).reindex(n.index, fill_value=0)
        avg = by[means].mean()
        shares = {
            f"share_{t}": [
                round(float(c / m), 4) for c, m in zip(counts[t] if t in counts else np.zeros(len(n)), n.to_numpy())
            ]
            for t in ("改善", "平稳", "恶化")
        }
        parts.append(
            pd.DataFrame(
                {
                    "dimension": dim,
                    "key": [str(k) for k in n.index],
                    "n": n.to_numpy(dtype=np.int64),
                    **shares,
                    **{
                        f"mean_{c.split('_')[1]}": np.array([_r(v) for v in avg[c].tolist()], dtype=float)
                        for c in means
                    },
                }
            )
        )
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return out.sort_values(["dimension", "n"], ascending=[True, False], kind="stable").reset_index(drop=True)


def test_trajectory_table_counts_what_each_group_counted():
    rng = random.Random(11)
    for _ in range(40):
        n = rng.randint(1, 120)
        cases = pd.DataFrame(
            {
                "case_id": [f"c{i}" for i in range(n)],
                "issue_type": [rng.choice(["物流配送", "发票", "其他", None]) for _ in range(n)],
                "channel": pd.Series([rng.choice(["chat", "phone", None]) for _ in range(n)], dtype="str"),
                "outcome": [rng.choice(["resolved", "unknown"]) for _ in range(n)],
                "emotion_trajectory": [rng.choice(["改善", "平稳", "恶化", None]) for _ in range(n)],
                "emotion_start": [rng.choice([rng.uniform(-1, 1), np.nan]) for _ in range(n)],
                "emotion_end": [rng.uniform(-1, 1) for _ in range(n)],
                "emotion_delta": [rng.choice([rng.uniform(-2, 2), np.nan]) for _ in range(n)],
                "agent_id": [rng.choice(["a1", "a2", None]) for _ in range(n)],
            }
        )
        members = pd.DataFrame(
            {
                "scope": ALL_SCOPE,
                "case_id": cases["case_id"],
                "cluster_id": [rng.choice(["C1", "C2", None]) for _ in range(n)],
            }
        )
        got = trajectory_table(cases, members)
        want_in = cases.assign(team=case_teams(cases)).merge(
            members.loc[members["cluster_id"].notna(), ["case_id", "cluster_id"]], on="case_id", how="left"
        )
        want = _trajectory_by_groups(want_in)
        if not len(want):
            assert not len(got)
            continue
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
        # Bit for bit (means included) what the groupby per dimension gave.
        pd.testing.assert_frame_equal(got, _trajectory_by_groupbys(want_in), check_exact=True)


@pytest.mark.parametrize("dtype", [object, "str"])
@pytest.mark.parametrize(
    "values",
    [
        ["2025-01-01", None, "2025-01-03", "2025-01-01"],
        [None, None],
        [],
        ["2025-01-01T10:00:00+08:00", "2025-01-02T01:00:00+08:00", None],
        [date(2025, 1, 1), "2025-01-02", None],
        ["2025-01-01", "not a date", ""],
    ],
)
def test_dates_are_parsed_once_per_value_as_to_datetime_parses_them(values, dtype):
    df = pd.DataFrame({"date": pd.Series(values, dtype=dtype, index=np.arange(len(values)) + 5)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = pd.to_datetime(df["date"], errors="coerce")
        got = _dates(df)
    pd.testing.assert_series_equal(got, want, check_names=False)


def _select_cases_before(cases: pd.DataFrame, min_chars: int, request_kinds: tuple[str, ...]) -> pd.DataFrame:
    """select_cases as it was: the Python rule run over every case (fill_classification's too)."""
    df = cases.copy(deep=False)
    if "issue_type" not in df:
        df["issue_type"] = "未分类"
    df["issue_type"] = pd.Series(
        [v if isinstance(v, str) and v else "未分类" for v in df["issue_type"].tolist()], index=df.index
    )
    for col in ("request_kind", "urgency", "issue_type_confidence", "needs_review"):
        if col not in df:
            df[col] = None
    n = len(df)
    problem = df["problem"].tolist() if "problem" in df else [""] * n
    customer = df["customer_text"].tolist() if "customer_text" in df else [""] * n
    texts = [
        (p if isinstance(p, str) else "").strip() or (c if isinstance(c, str) else "").strip()[:200]
        for p, c in zip(problem, customer)
    ]
    df["cluster_text"] = texts
    keep = pd.Series(
        [len(PLACEHOLDER_RE.sub("", t) if "<" in t else t) >= min_chars for t in texts], index=df.index, dtype=bool
    )
    if request_kinds:
        keep &= df["request_kind"].isin(list(request_kinds))
    return df[keep].reset_index(drop=True)


_LONG_CUSTOMER = "  " + "我的快递三天没到，" * 30 + " \u3000"
# Missing, blank, spaces str.strip() removes (or not: U+200B), placeholders, a non-string.
_PROBLEMS = [None, np.nan, "", "   ", "\u3000问题", "问题\u3000", "a\x85", "\x85abcd", "问\n", "\t退款十五天没到账\r"]
_PROBLEMS += ["<PHONE>", "<PHONE>12", "<PHONE>1234", "<<A>>好的好的", "<a>好", "电话<PHONE>地址<ADDRESS>", "ÄÖÜ<ÄB>"]
_PROBLEMS += ["快递三天没到", "怎么办", "怎么办呀", 5, " 快递三天没到 ", "发票\u2028", "\u200b发票"]
_CUSTOMERS = [None, np.nan, "", "  ", _LONG_CUSTOMER, "我的发票一直没有开出来", " <NAME> 你好 ", 7, "好"]


def _text_column(values: list, dtype: object, index: pd.Index, chunks: int) -> pd.Series:
    """`values` as a column of `dtype`; Arrow-backed text columns can only hold strings and
    missing values, and a column made by concatenating parts has one Arrow chunk per part."""
    if dtype is not object:
        values = [v if v is None or isinstance(v, (str, float)) else str(v) for v in values]
    cut = len(values) // 2 if chunks == 2 else len(values)
    parts = [values[:cut], values[cut:]] if chunks == 2 else [values]
    col = pd.concat([pd.Series(p, dtype=object).astype(dtype) for p in parts], ignore_index=True)
    return col.set_axis(index)


@pytest.mark.parametrize("dtype", [object, "str", pd.ArrowDtype(pa.string())])
@pytest.mark.parametrize("request_kinds", [(), ("投诉",)])
@pytest.mark.parametrize("chunks", [1, 2])
def test_select_cases_gives_what_the_python_rule_gave(dtype, request_kinds, chunks):
    """Arrow-backed problems are decided in Arrow where str.strip() leaves them as they are; the
    frame must be the one the Python rule made, rows, order, values and dtypes included."""
    rng = random.Random(5)
    for it in range(80):
        n = len(_PROBLEMS) if it == 0 else rng.randint(0, 40)
        problems = list(_PROBLEMS) if it == 0 else [rng.choice(_PROBLEMS) for _ in range(n)]
        index = pd.RangeIndex(n) + 3 if it % 2 else pd.RangeIndex(n)
        cases = pd.DataFrame(
            {
                "case_id": [f"c{i}" for i in range(n)],
                "problem": _text_column(problems, dtype, index, chunks),
                "customer_text": _text_column([rng.choice(_CUSTOMERS) for _ in range(n)], dtype, index, chunks),
                "issue_type": _text_column([rng.choice(["物流", "", None, "发票"]) for _ in range(n)], dtype, index, 1),
                "request_kind": [rng.choice(["投诉", "咨询", None]) for _ in range(n)],
            },
            index=index,
        )
        if it % 7 == 3:
            cases = cases.drop(columns=["customer_text", "issue_type"])
        for min_chars in (1, 4):
            got = select_cases(cases, min_chars, request_kinds)
            pd.testing.assert_frame_equal(got, _select_cases_before(cases, min_chars, request_kinds))


def test_select_cases_strips_unmasks_and_falls_back_to_the_customer_text():
    problems = ["\u3000问题", "问题呀\u3000", "<PHONE>12", "<PHONE>1234", " 快递三天没到 ", "a\x85", None]
    problems.append("快递三天没到")
    frame = pd.DataFrame({"case_id": range(len(problems)), "problem": pd.Series(problems, dtype="str")})
    frame["customer_text"] = "  好的好的 "
    got = dict(zip(*select_cases(frame, 3)[["case_id", "cluster_text"]].T.values.tolist()))
    assert got == {1: "问题呀", 3: "<PHONE>1234", 4: "快递三天没到", 6: "好的好的", 7: "快递三天没到"}


def test_the_strip_class_is_what_str_strip_removes_at_every_code_point():
    """`_plain_problems` vouches for a text whose two ends str.strip() keeps; its RE2 class must
    name exactly the characters Python strips, in this Python's Unicode and Arrow's."""
    chars = [chr(i) for i in range(sys.maxunicode + 1) if not 0xD800 <= i <= 0xDFFF]
    plain = _plain_problems(pa.chunked_array([pa.array(chars)]))
    assert [c for c, p in zip(chars, plain.tolist()) if p != (c.strip() == c)] == []
    assert _plain_problems(pa.chunked_array([pa.array(["a b", "a ", " b", "", None, "\u3000a\u3000"])])).tolist() == [
        True,
        False,
        False,
        False,
        False,
        False,
    ]


def test_placeholders_are_counted_out_as_python_counts_them():
    """`_counted_chars` removes PLACEHOLDER_RE's matches with RE2: next to each code point, and on
    random mixes of what placeholders are made of, it must count what `len(PLACEHOLDER_RE.sub())` counts."""
    cps = [chr(i) for i in range(sys.maxunicode + 1) if not 0xD800 <= i <= 0xDFFF]
    texts = [f"<A{c}>" for c in cps] + [f"<{c}B>" for c in cps]
    rng = random.Random(3)
    pieces = ["<", ">", "A", "Z", "_", "a", "中", " ", "\u3000", "<PHONE>", "Ä", "1", "<ORDER_ID>", "\n"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(20_000)]
    got = _counted_chars(pa.chunked_array([pa.array(texts[:1000]), pa.array(texts[1000:])]))
    want = [len(PLACEHOLDER_RE.sub("", t)) for t in texts]
    assert [t for t, g, w in zip(texts, got.tolist(), want) if g != w] == []


@pytest.mark.parametrize("dtype", [object, "str"])
def test_fill_classification_names_missing_issue_types_as_before(dtype):
    values = ["物流", "", None, np.nan, "未分类", " ", 3] if dtype is object else ["物流", "", None, np.nan, " "]
    cases = pd.DataFrame({"issue_type": pd.Series(values, dtype=dtype, index=np.arange(len(values)) + 2)})
    want = pd.Series(
        [v if isinstance(v, str) and v else "未分类" for v in cases["issue_type"].tolist()], index=cases.index
    )
    pd.testing.assert_series_equal(fill_classification(cases)["issue_type"], want, check_names=False)


def _load_members_before(out, meta) -> pd.DataFrame:
    """load_members as it was: each case's rows from its newest part, by a groupby."""
    parts = [(s, p) for s, p in mb._parts(out) if s >= int(meta.get("members_from", 0))]
    df = pd.concat([pd.read_parquet(p).assign(seq=s) for s, p in parts], ignore_index=True)
    newest = df.groupby("case_id")["seq"].transform("max")
    return df[df["seq"] == newest].reset_index(drop=True)


@pytest.mark.parametrize("seed", range(4))
def test_membership_keeps_each_cases_rows_from_its_newest_part(tmp_path, seed):
    rng = random.Random(seed)
    for n in (40, 0, 7, 12, 3, 9):  # an empty part too; parts re-assign earlier parts' cases
        rows = []
        for cid in rng.sample([f"c{i}" for i in range(50)], n):
            for scope in (ALL_SCOPE, "售后"):
                c = rng.choice(["C1", "C2", None])
                rows.append(
                    {
                        "case_id": cid,
                        "run_id": f"r{rng.randrange(3)}",
                        "scope": scope,
                        "cluster_id": c,
                        "is_noise": c is None,
                        "similarity": None if c is None else 0.5,
                        "x": 0.1,
                        "y": 0.2,
                    }
                )
        mb.append_members(tmp_path, pd.DataFrame(rows, columns=mb.MEMBER_COLUMNS))
    # The first part in row groups of 7: read back, its columns are Arrow arrays in chunks.
    first = mb._parts(tmp_path)[0][1]
    pq.write_table(pq.read_table(first), first, row_group_size=7)
    for meta in ({}, {"members_from": 3}):
        got, n_parts = mb.load_members(tmp_path, meta)
        pd.testing.assert_frame_equal(got, _load_members_before(tmp_path, meta))
        assert n_parts == (6 if not meta else 4) and not got.duplicated(["case_id", "scope"]).any()


def _worsened_by_team_before(cases: pd.DataFrame, teams: list) -> pd.DataFrame:
    """worsened_by_team as it was: a groupby iterated team by team."""
    by = pd.Series(teams, index=cases.index)
    rows = []
    for team, g in cases[["emotion_trajectory"]][by.notna()].groupby(by[by.notna()]):
        k = int((g["emotion_trajectory"] == "恶化").sum())
        lo, hi = wilson(k, len(g))
        rows.append(
            {
                "team": team,
                "n": int(len(g)),
                "worsened": k,
                "share_worsened": round(k / len(g), 4),
                "ci_low": round(lo, 4),
                "ci_high": round(hi, 4),
            }
        )
    out = pd.DataFrame(rows, columns=["team", "n", "worsened", "share_worsened", "ci_low", "ci_high"])
    return out.sort_values(["ci_low", "n"], ascending=[False, False]).reset_index(drop=True)


@pytest.mark.parametrize("dtype", [object, "str"])
def test_worsened_by_team_counts_what_each_team_group_counted(dtype):
    rng = random.Random(13)
    for _ in range(60):
        n = rng.randint(1, 150)
        cases = pd.DataFrame(
            {
                "emotion_trajectory": pd.Series(
                    [rng.choice(["改善", "平稳", "恶化", None]) for _ in range(n)], dtype=dtype
                )
            },
            index=np.arange(n) + 3,
        )
        teams = [rng.choice(["售后一组", "售后二组", "a7", "b", None]) for _ in range(n)]
        got = worsened_by_team(cases, teams)
        pd.testing.assert_frame_equal(got, _worsened_by_team_before(cases, teams), check_exact=True)


@pytest.mark.parametrize("dtype", [object, "str"])
def test_cluster_groups_are_a_groupbys_groups_with_noise_in_none(dtype):
    """recount_clusters numbers (scope, cluster) groups by codes: the same groups, the same rows
    (in row order) as groupby(sort=False).indices, noise and missing scopes in none."""
    from pipeline.insights.incremental import cluster_groups

    rng = random.Random(5)
    for n in (0, 1, 50, 300):
        members = pd.DataFrame(
            {
                "scope": pd.Series([rng.choice([ALL_SCOPE, "售后", "物流", None]) for _ in range(n)], dtype=dtype),
                "cluster_id": [rng.choice(["C1", "C2", "C10", None, np.nan]) for _ in range(n)],
            }
        )
        scope_codes, scope_names = pd.factorize(members["scope"])
        codes, keys = cluster_groups(scope_codes, scope_names, members["cluster_id"])
        want = members.groupby(["scope", "cluster_id"], sort=False).indices if n else {}
        got = {key: np.flatnonzero(codes == code) for code, key in enumerate(keys)}
        assert list(got) == [(str(s), str(c)) for s, c in want]
        assert all(np.array_equal(got[(str(s), str(c))], idx) for (s, c), idx in want.items())
        assert ((codes < 0) == (members["cluster_id"].isna() | members["scope"].isna()).to_numpy()).all()
        # The caller's sorted codes of the ids (shared with the tables): the same groups.
        given = cluster_groups(scope_codes, scope_names, members["cluster_id"], sorted_codes(members["cluster_id"]))
        assert given[0].tolist() == codes.tolist() and given[1] == keys


def test_recount_counts_each_cluster_apart_from_the_noise():
    """Noise rows are counted as one more group by recount_clusters; no cluster's size, mix or
    mean may take any of them."""
    from pipeline.insights.cluster import ClusterState
    from pipeline.insights.incremental import recount_clusters

    members = pd.DataFrame(
        {
            "scope": [ALL_SCOPE] * 5 + ["售后"] * 3,
            "cluster_id": ["C1", None, "C1", "C2", None, "C3", None, "C3"],
            "outcome": ["resolved", "escalated", "unresolved", None, "escalated", "resolved", "escalated", ""],
            "emotion_score": [0.5, -9.0, np.nan, 0.25, -9.0, 1.0, -9.0, 0.0],
            "region": ["华东", "华北", "华东", "华南", "华北", None, "华北", "华东"],
            "issue_type": ["售后"] * 8,
        }
    )
    described = pd.DataFrame(
        {
            "cluster_id": ["C1", "C2", "C3", "C9"],
            "scope": [ALL_SCOPE, ALL_SCOPE, "售后", ALL_SCOPE],
            "label": ["a", "b", "c", "gone"],
            "label_history": ["[]"] * 4,
            **{c: [None] * 4 for c in ("size", "scope_size", "share_escalated", "share_resolved")},
            **{c: [None] * 4 for c in ("mean_emotion", "top_regions")},
        }
    )
    clusters, _ = recount_clusters(described, members, ClusterState.empty(), "2025-12-01", 3)
    got = clusters.set_index("cluster_id")
    assert list(got.index) == ["C1", "C2", "C3"]
    assert got["size"].tolist() == [2, 1, 2] and got["scope_size"].tolist() == [5, 5, 3]
    assert got["share_escalated"].tolist() == [0.0, 0.0, 0.0]
    assert got["share_resolved"].tolist() == [0.5, 0.0, 0.5]
    assert got["mean_emotion"].tolist() == [0.5, 0.25, 0.5]
    assert got["top_regions"].tolist() == ["华东 100%", "华南 100%", "华东 50%"]


def _group_kpis_before(g: pd.DataFrame) -> dict:
    """One group's KPI row as compute_kpis made it from each groupby group."""
    from pipeline.insights.kpis import _num, _q

    n = len(g)
    fr = _num(g["first_response_s"] if "first_response_s" in g else None).dropna()
    du = _num(g["duration_s"] if "duration_s" in g else None).dropna()
    oc = g["outcome"].fillna("unknown") if "outcome" in g else pd.Series(["unknown"] * n)
    rate = lambda k: round(float((oc == k).mean()), 4) if n else None  # noqa: E731
    return {
        "n_cases": n,
        "n_with_first_response": int(len(fr)),
        "first_response_median_s": _q(fr, 0.5),
        "first_response_p90_s": _q(fr, 0.9),
        "n_with_duration": int(len(du)),
        "duration_median_s": _q(du, 0.5),
        "duration_mean_s": round(float(du.mean()), 1) if len(du) else None,
        "resolution_rate": rate("resolved"),
        "escalation_rate": rate("escalated"),
        "unresolved_rate": rate("unresolved"),
        "n_outcome_unknown": int((oc == "unknown").sum()),
    }


def _compute_kpis_before(cases: pd.DataFrame) -> pd.DataFrame:
    from pipeline.insights.kpis import KPI_COLUMNS

    rows = [{"group_by": "all", "group": "全部", **_group_kpis_before(cases)}]
    used = cases[[c for c in ("first_response_s", "duration_s", "outcome") if c in cases]]
    for col in ("channel", "issue_type"):
        if col not in cases:
            continue
        keys = cases[col].fillna("未分类" if col == "issue_type" else "未知")
        for k, g in used.groupby(keys, sort=True):
            rows.append({"group_by": col, "group": str(k), **_group_kpis_before(g)})
    return pd.DataFrame(rows, columns=KPI_COLUMNS)


@pytest.mark.parametrize("dtype", [object, "str"])
@pytest.mark.parametrize("drop", [(), ("outcome",), ("first_response_s", "duration_s"), ("channel",)])
def test_compute_kpis_give_what_each_groupby_group_gave(dtype, drop):
    from pipeline.insights.kpis import compute_kpis

    rng = random.Random(11)
    for n in (0, 1, 7, 400):
        rows = range(n)
        cases = pd.DataFrame(
            {
                "channel": pd.Series([rng.choice(["chat", "call", "", None]) for _ in range(n)], dtype=dtype),
                "issue_type": pd.Series([rng.choice(["物流", "发票", "未分类", None]) for _ in range(n)], dtype=dtype),
                "outcome": pd.Series(
                    [rng.choice(["resolved", "escalated", "unresolved", "unknown", "", None]) for _ in range(n)],
                    dtype=dtype,
                ),
                # Long decimals over a wide range, missing as None and NaN.
                "first_response_s": [rng.choice([None, np.nan, rng.random() * 10 ** rng.randint(0, 6)]) for _ in rows],
                "duration_s": [rng.choice([np.nan, rng.random() * 10 ** rng.randint(0, 6), 0.1]) for _ in rows],
            }
        ).drop(columns=list(drop))
        got, want = compute_kpis(cases), _compute_kpis_before(cases)
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def _save_state_before(out, state) -> None:
    """save_state as it was: each vector a list of Python floats."""
    from pipeline.insights.cluster import _as_list
    from pipeline.insights.export import state_path
    from pipeline.io import atomic_write_parquet

    t = state.table.copy()
    for col in ("centroid", "center"):
        if col in t:
            t[col] = t[col].map(lambda v: [float(x) for x in v] if len(_as_list(v)) else None)
    t["radius_full"] = pd.to_numeric(t["radius_full"], errors="coerce").astype(np.float64)
    t["model_day"] = t["model_day"].astype(object).where(t["model_day"].notna(), None)
    atomic_write_parquet(state_path(out), pa.Table.from_pandas(t.reset_index(drop=True), preserve_index=False))


def test_save_state_writes_the_bytes_the_float_lists_wrote(tmp_path):
    """Vectors held as lists, float32 or float64 arrays, empty or missing: the same file."""
    from pipeline.insights.cluster import ClusterState
    from pipeline.insights.export import save_state, state_path

    rng = np.random.default_rng(2)
    vectors = [
        rng.standard_normal(6).astype(np.float32),
        rng.standard_normal(6),
        [float(x) for x in rng.standard_normal(6)],
        (0.1, 0.2, 1 / 3, 2, 0, -0.5),
        np.zeros(0),
        [],
        None,
    ]
    t = pd.DataFrame(
        {
            "cluster_id": [f"C{i}" for i in range(len(vectors))],
            "centroid": pd.Series(vectors, dtype=object),
            "center": pd.Series(vectors[::-1], dtype=object),
            "radius_full": [0.5, None, "0.25", np.nan, 1, 0.0, 0.75],
            "model_day": ["2025-12-01", None, np.nan, "2025-11-30", None, "x", None],
        },
        index=[7, 3, 5, 1, 0, 2, 4],
    )
    for i, table in enumerate((t, t.iloc[0:0])):
        a, b = tmp_path / f"a{i}", tmp_path / f"b{i}"
        for d in (a, b):
            state_path(d).parent.mkdir(parents=True)
        save_state(a, ClusterState(table))
        _save_state_before(b, ClusterState(table))
        assert state_path(a).read_bytes() == state_path(b).read_bytes()


@pytest.mark.parametrize("dtype", ["str", object])
@pytest.mark.parametrize("missing", [(), ("k0",), ("k3",), ("k2", "k4")])
def test_members_view_slices_the_leading_cases_and_takes_the_rest(dtype, missing):
    """The cross-type scope's rows are the frame's own columns when they lead in frame order; a
    case without such a row (here `missing`) ends the slice there, and the rest are taken."""
    ids = ["k3", "k1", "k4", "k0", "k2"]
    frame = pd.DataFrame(
        {
            "case_id": pd.Series(ids, dtype=dtype),
            "date": pd.Series(["2025-11-01", None, "2025-11-02", "", "2025-11-03"], dtype=dtype),
            "region": pd.Series(["华东", None, "华北", "华东", ""], dtype=dtype),
            "emotion_score": [0.5, np.nan, -1.0, 0.0, 0.25],
            "cluster_text": pd.Series([f"文本{i}" for i in range(5)], dtype=dtype),
        },
        index=[4, 0, 3, 1, 2],
    )
    rows = [
        {"case_id": cid, "run_id": "r", "scope": scope, "cluster_id": "C1", "is_noise": False,
         "similarity": 0.5, "x": np.nan, "y": np.nan}
        for scope in ("物流", ALL_SCOPE)
        for cid in ("k0", "k1", "k2", "k3", "k4", "k5")
        if not (scope == ALL_SCOPE and cid in missing)
    ]
    membership = pd.DataFrame(rows).astype({"case_id": dtype})
    got = members_view(frame, membership)
    want = _members_view_before(frame, membership)
    pd.testing.assert_frame_equal(got, want)
    assert list(got["problem"]) == list(want["problem"])
    # Without texts (the tables' view on a night that writes only its new rows): every column
    # but the per-type rows' problem the same, those null; the cross-type rows' texts kept.
    only = ["conversation_id", "request_kind", "urgency", "problem"]
    wide = frame.assign(conversation_id=frame["case_id"], request_kind=frame["region"], urgency=frame["date"])
    lean, full = members_view(wide, membership, texts=False), members_view(wide, membership)
    cross = (full["scope"] == ALL_SCOPE).to_numpy()
    for col in only:
        assert lean[col].iloc[np.flatnonzero(cross)].tolist() == full[col].iloc[np.flatnonzero(cross)].tolist()
        assert lean[col].iloc[np.flatnonzero(~cross)].isna().all() or dtype is object  # (object: taken)
    pd.testing.assert_frame_equal(lean.drop(columns=only), full.drop(columns=only))


@pytest.mark.parametrize("dtype", ["str", object])
def test_members_view_of_the_new_rows_is_the_whole_views_new_rows(dtype):
    """A night that links yesterday's member parts writes the view of its new membership rows
    alone: the rows (and dtypes) a filter of the whole view by those cases kept."""
    ids = [f"k{i}" for i in (3, 1, 4, 0, 2, 7, 5, 6)]
    frame = pd.DataFrame(
        {
            "case_id": pd.Series(ids, dtype=dtype),
            "date": pd.Series(["2025-11-01"] * 8, dtype=dtype),
            "region": pd.Series(["华东", None, "华北", "华东", "", "华南", "华北", None], dtype=dtype),
            "cluster_text": pd.Series([f"文本{i}" for i in range(8)], dtype=dtype),
        }
    )

    def rows(cases, run):
        return pd.DataFrame(
            [
                {"case_id": cid, "run_id": run, "scope": scope, "cluster_id": None if cid == "k6" else "C1",
                 "is_noise": cid == "k6", "similarity": None if cid == "k6" else 0.5, "x": np.nan, "y": np.nan}
                for scope in (ALL_SCOPE, "物流", "售后")
                for cid in cases
            ]
        )

    # Yesterday's rows as read from the store (Arrow text, float similarities), tonight's as
    # assigned (Python objects): the concatenated membership's dtypes are neither's alone.
    old = rows(["k0", "k1", "k2", "k3", "k4"], "r1").astype(
        {"case_id": dtype, "scope": "str", "cluster_id": "str", "similarity": float}
    )
    new = rows(["k7", "k5", "k6"], "r2")
    membership = pd.concat([old, new], ignore_index=True)
    pos = np.asarray([ids.index(c) for c in membership["case_id"]], dtype=np.int64)
    whole = members_view(frame, membership, pos)
    want = whole[whole["case_id"].isin(["k5", "k6", "k7"]).to_numpy()].reset_index(drop=True)
    got = members_view(frame, membership.iloc[len(old):], pos[len(old):]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)


def _trajectory_cases(rng: random.Random, n: int, ids, agent_ids) -> pd.DataFrame:
    """n cases c0.. with the emotion table's columns drawn from `rng`, on a shuffled index."""
    return pd.DataFrame(
        {
            "case_id": pd.Series([f"c{i}" for i in range(n)], dtype=ids),
            "issue_type": [rng.choice(["物流配送", "发票", None]) for _ in range(n)],
            "channel": [rng.choice(["chat", "phone"]) for _ in range(n)],
            "outcome": [rng.choice(["resolved", "unknown"]) for _ in range(n)],
            "emotion_trajectory": [rng.choice(["改善", "平稳", "恶化", None]) for _ in range(n)],
            "emotion_start": [rng.uniform(-1, 1) for _ in range(n)],
            "emotion_end": [rng.uniform(-1, 1) for _ in range(n)],
            "emotion_delta": [rng.choice([rng.uniform(-2, 2), np.nan]) for _ in range(n)],
            "agent_id": agent_ids,
        }
    ).set_axis(rng.sample(range(1000), n))


@pytest.mark.parametrize("ids", [object, "str"])
@pytest.mark.parametrize("repeat", [False, True])
def test_trajectory_table_finds_each_cases_cluster_as_the_merge_did(ids, repeat):
    """Clusters found by position (the cross-type scope's clustered rows, other scopes and noise
    left out, cases without a member kept); an id repeated among them goes to the merge, which
    repeats its case."""
    rng = random.Random(4)
    n = 300
    cases = _trajectory_cases(rng, n, ids, [rng.choice(["a1", "a2", None]) for _ in range(n)])
    picked = [f"c{i}" for i in rng.sample(range(2, n + 20), n)]  # some cases no member, some no case
    picked[:2] = ["c0", "c0" if repeat else "c1"]
    cases.loc[cases["case_id"] == "c0", "emotion_trajectory"] = "恶化"  # counted, not left out
    members = pd.DataFrame(
        {
            "scope": [rng.choice([ALL_SCOPE, ALL_SCOPE, "发票"]) for _ in picked],
            "case_id": pd.Series(picked, dtype=ids),
            "cluster_id": [rng.choice(["C1", "C2", "C3", None]) for _ in picked],
        }
    )
    members.loc[0:1, ["scope", "cluster_id"]] = [ALL_SCOPE, "C2"]
    want_in = cases.assign(team=case_teams(cases)).merge(
        members.loc[(members["scope"] == ALL_SCOPE) & members["cluster_id"].notna(), ["case_id", "cluster_id"]],
        on="case_id",
        how="left",
    )
    got = trajectory_table(cases, members)
    pd.testing.assert_frame_equal(got, _trajectory_by_groupbys(want_in), check_exact=True)
    coded = trajectory_table(cases, members, cluster_codes=sorted_codes(members["cluster_id"]))  # the caller's
    pd.testing.assert_frame_equal(coded, got, check_exact=True)


def _week_counts_before(df: pd.DataFrame, key_col: str, as_of: date) -> list[tuple]:
    """(key, this week, last week, baseline) as week_over_week counted them: filtered
    value_counts, keys as the sorted set of every row's."""
    from pipeline.insights.trends import week_windows

    d = _dates(df)
    d = (d.dt.tz_localize(None) if d.dt.tz is not None else d).dt.normalize()
    (a0, a1), (b0, b1) = week_windows(as_of)
    keys = df[key_col]
    this = keys[(d >= pd.Timestamp(a0)) & (d <= pd.Timestamp(a1))].value_counts()
    last = keys[(d >= pd.Timestamp(b0)) & (d <= pd.Timestamp(b1))].value_counts()
    base = int(last.sum()) > 0
    return [(k, int(this.get(k, 0)), int(last.get(k, 0)), base) for k in sorted(set(keys.dropna().tolist()))]


@pytest.mark.parametrize("dtype", [object, "str"])
def test_week_over_week_counts_each_key_as_the_value_counts_did(dtype):
    rng = random.Random(9)
    days = ["2025-11-30", "2025-11-26", "2025-11-24", "2025-11-23", "2025-11-17", "2025-11-10", None, "x"]
    for _ in range(60):
        n = rng.randint(0, 200)
        df = pd.DataFrame(
            {
                "date": pd.Series([rng.choice(days) for _ in range(n)], dtype=dtype),
                "k": pd.Series([rng.choice(["C1", "C2", "C10", "", None, "未知"]) for _ in range(n)], dtype=dtype),
            }
        )
        if rng.random() < 0.2:  # no case last week: nothing has a baseline
            df = df[~df["date"].isin(["2025-11-23", "2025-11-17"])].reset_index(drop=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "x" is parsed one by one
            got = week_over_week(df, "d", "k", date(2025, 11, 30), 0.5, 1, new_keys=["C2"])
            want = _week_counts_before(df, "k", date(2025, 11, 30))
            coded = week_over_week(
                df, "d", "k", date(2025, 11, 30), 0.5, 1, new_keys=["C2"], key_codes=sorted_codes(df["k"])
            )
        pd.testing.assert_frame_equal(coded, got)  # the caller's codes
        got_rows = sorted(zip(got["key"], got["this_week"], got["last_week"], got["is_new"]))
        assert got_rows == [(k, a, b, base and k == "C2") for k, a, b, base in want]
        pvals = dict(zip(got["key"], got["p_value"].isna()))
        assert pvals == {k: not (base and b > 0) for k, _, b, base in want}


def _root_cause_matrix_before(members: pd.DataFrame, clusters: pd.DataFrame, issue_counts: pd.Series, top: int):
    """root_cause_matrix as it was: the per-type rows copied, groups from a sorted groupby."""
    from pipeline.insights.cluster import format_shares

    used = ["scope", "issue_type", "cluster_id", "region", "product"]
    per_type = members.loc[members["scope"] != ALL_SCOPE, [c for c in used if c in members]]
    info = {c["cluster_id"]: c for c in clusters.to_dict("records")} if len(clusters) else {}
    positions = per_type.groupby(["issue_type", per_type["cluster_id"].fillna("")], sort=True).indices
    keys = sorted(positions)
    codes = group_codes([positions[key] for key in keys], len(per_type))
    shares = {col: group_shares(codes, per_type[col]) for col in ("region", "product") if col in per_type}
    type_sizes = per_type["issue_type"].value_counts()
    rows = []
    for code, (it, cid) in enumerate(keys):
        idx = positions[(it, cid)]
        total = int(issue_counts.get(it, type_sizes.get(it, 0)))
        regions = format_shares(shares["region"].get(code, {}) if "region" in shares else {}, top)
        products = format_shares(shares["product"].get(code, {}) if "product" in shares else {}, top)
        c = info.get(cid) if cid else None
        label = c["label"] if c is not None else "未归类（零散个案）"
        phrases = list(c["cause_phrases"]) if c is not None and c["cause_phrases"] is not None else []
        rows.append(
            {
                "issue_type": it,
                "cluster_id": cid or None,
                "label": label,
                "cause_phrases": "、".join(phrases),
                "cause_category": c["cause_category"] if c is not None else None,
                "cause_category_zh": c["cause_category_zh"] if c is not None else None,
                "cause_suggested": True,
                "count": int(len(idx)),
                "share_of_issue_type": round(len(idx) / max(total, 1), 4),
                "issue_type_total": total,
                "top_regions": regions,
                "top_products": products,
                "impact": f"{(phrases[0] if phrases else label)}: {regions.split(', ')[0] if regions else ''}".strip(
                    ": "
                ),
            }
        )
    out = pd.DataFrame(rows)
    out["_noise"] = out["cluster_id"].isna()
    out = out.sort_values(
        ["issue_type_total", "issue_type", "_noise", "count"], ascending=[False, True, True, False], kind="stable"
    ).drop(columns="_noise")
    return out.reset_index(drop=True)


@pytest.mark.parametrize("dtype", [object, "str"])
def test_root_cause_matrix_groups_as_the_sorted_groupby_did(dtype):
    from pipeline.insights.trends import root_cause_matrix

    rng = random.Random(13)
    clusters = pd.DataFrame(
        {
            "cluster_id": ["C1", "C2", "C10"],
            "label": ["物流慢", "退款慢", "发票错"],
            "cause_phrases": [["没发货", "慢"], None, []],
            "cause_category": ["logistics_partner", None, "process"],
            "cause_category_zh": ["物流", None, "流程"],
            "size": [1, 2, 3],  # a column the matrix does not read
        }
    )
    for _ in range(30):
        n = rng.randint(1, 300)
        members = pd.DataFrame(
            {
                "scope": pd.Series([rng.choice([ALL_SCOPE, "物流", "发票"]) for _ in range(n)], dtype=dtype),
                "issue_type": pd.Series([rng.choice(["物流", "发票", "", None]) for _ in range(n)], dtype=dtype),
                "cluster_id": [rng.choice(["C1", "C2", "C10", "C9", None]) for _ in range(n)],
                "region": pd.Series([rng.choice(["华东", "华北", "", "未知", None]) for _ in range(n)], dtype=dtype),
                "product": pd.Series([rng.choice(["手表", "耳机", None]) for _ in range(n)], dtype=dtype),
            }
        )
        counts = pd.Series({"物流": 500, "其他": 3})
        got = root_cause_matrix(members, clusters, counts, 2)
        want = _root_cause_matrix_before(members, clusters, counts, 2)
        coded = root_cause_matrix(members, clusters, counts, 2, sorted_codes(members["cluster_id"]))
        pd.testing.assert_frame_equal(coded, got)  # the caller's codes
        if not len(want):
            assert not len(got)
            continue
        pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_varies_is_nunique_of_two_or_more():
    """relations skips a measure or target without two distinct known values: `_varies` tells it
    as nunique() did, signed zeros and infinities included."""
    from pipeline.insights.emotion_stats import _varies, relations

    rng = random.Random(3)
    pool = [0.0, -0.0, 1.0, np.inf, -np.inf, 1e-300, 2.5]
    for n in range(0, 6):
        for _ in range(40):
            v = np.array([rng.choice(pool) for _ in range(n)], dtype=float)
            assert _varies(v) == (pd.Series(v).nunique() >= 2)
    cases = pd.DataFrame(
        {
            "outcome": ["resolved", "unresolved"] * 20,
            "csat": [4.0] * 40,  # one rating: no relation can be measured
            "emotion_start": [0.0, -0.0] * 20,  # one value, two signs
            "emotion_end": [rng.uniform(-1, 1) for _ in range(40)],
            "emotion_delta": [rng.uniform(-1, 1) for _ in range(40)],
        }
    )
    rel = relations(cases).set_index(["measure", "outcome_measure"])
    assert rel["r"].isna().tolist() == [True, True, False, True, False, True]


@pytest.mark.parametrize("dtype", [object, "str"])
def test_cluster_counts_leave_out_the_noise_as_the_filter_did(dtype):
    """finish_export hands the members with their noise rows to count_table and week_over_week:
    both must count exactly what they counted from the clustered rows alone, noise-only dates
    and breakdown values included."""
    rng = random.Random(21)
    days = ["2025-11-30", "2025-11-25", "2025-11-20", "2025-11-12", None]
    for _ in range(30):
        n = rng.randint(1, 150)
        members = pd.DataFrame(
            {
                "cluster_id": [rng.choice(["C1", "C2", "C10", None]) for _ in range(n)],
                "date": pd.Series([rng.choice(days) for _ in range(n)], dtype=dtype),
                "channel": pd.Series([rng.choice(["chat", "call", None]) for _ in range(n)], dtype=dtype),
                "region": pd.Series([rng.choice(["华东", "", None]) for _ in range(n)], dtype=dtype),
            }
        )
        noise = members["cluster_id"].isna() & (np.arange(n) % 2 == 0)  # half the noise rows
        members.loc[noise, "date"] = "2025-10-01"  # dates and values no clustered row has
        members.loc[noise, "region"] = "西北"
        clustered = members[members["cluster_id"].notna()]
        if not len(clustered):
            continue
        counts = count_table(members, "c", "cluster_id")
        pd.testing.assert_frame_equal(counts, count_table(clustered, "c", "cluster_id"))
        args = ("c", "cluster_id", date(2025, 11, 30), 0.5, 1)
        pd.testing.assert_frame_equal(week_over_week(members, *args), week_over_week(clustered, *args))


def _bundle(day: str, n: int):
    from pipeline.insights.cluster import ClusterState
    from pipeline.insights.export import TABLES, ExportBundle

    tables = {
        name: pd.DataFrame({"k": [f"{name}{i}" for i in range(n)], "v": np.arange(n, dtype=np.int64)})
        for name in TABLES
    }
    return ExportBundle(day, tables, "<html></html>", {"date": day}, ClusterState.empty())


def test_write_export_writes_on_threads_what_one_by_one_wrote(tmp_path, monkeypatch):
    """The tables written on threads: the same files, bytes included, as written one after
    another; a table that fails to write fails the export, and the previous folder stays."""
    from pipeline.insights import export as ex

    ex.write_export(tmp_path / "a", _bundle("2025-12-01", 50))
    one_by_one = tmp_path / "b" / "exports" / "2025-12-01"
    one_by_one.mkdir(parents=True)
    bundle = _bundle("2025-12-01", 50)
    def pair(parquet, csv, df):
        ex.write_pair(parquet, csv, df, "utf-8-sig")

    for name in ex.TABLES:
        if name == "members":
            ex.mp.write_members(one_by_one, bundle.tables[name], [], pair)
        else:
            ex.write_table(one_by_one, name, bundle.tables[name], "utf-8-sig")
    threaded = tmp_path / "a" / "exports" / "2025-12-01"
    files = sorted(p.relative_to(one_by_one) for p in one_by_one.rglob("*") if p.is_file())
    written = [p for p in threaded.rglob("*") if p.is_file() and p.name not in ("report.html", "summary.json")]
    assert files and files == sorted(p.relative_to(threaded) for p in written)
    assert all((one_by_one / f).read_bytes() == (threaded / f).read_bytes() for f in files)

    real = ex.write_table

    def failing(folder, name, df, enc):
        if name == "trends":
            raise OSError("disk full")
        real(folder, name, df, enc)

    monkeypatch.setattr(ex, "write_table", failing)
    with pytest.raises(OSError, match="disk full"):
        ex.write_export(tmp_path / "a", _bundle("2025-12-01", 7))
    assert pd.read_parquet(threaded / "kpis.parquet")["k"].tolist()[-1] == "kpis49"  # yesterday's folder
    assert sorted(p.name for p in (tmp_path / "a" / "exports").iterdir()) == ["2025-12-01", "LATEST"]


@pytest.mark.parametrize("ids", [object, "str"])
@pytest.mark.parametrize("repeat", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("agents", [object, "str"])
def test_trajectory_table_from_the_members_case_rows_is_the_merges(ids, repeat, seed, agents, monkeypatch):
    """Each members row's case row (as the export knows it) gives the merge's table: cases
    without a member, members in other scopes or without a cluster, and an id repeated in the
    cross-type scope (the merge repeats its case) or not text (the merge decides) alike. Teams
    from Arrow agents (no metadata) are their shared codes at the counted rows."""
    import pipeline.insights.emotion_stats as es

    rng = random.Random(seed)
    n = 200
    agent_ids = pd.Series([rng.choice(["a1", "a2", "b3", "", None]) for _ in range(n)], dtype=agents)
    cases = _trajectory_cases(rng, n, ids, agent_ids)
    # Every case a cross-type row (some left out) and some a per-type row, in shuffled order.
    rows = [r for r in range(n) if rng.random() < 0.8]
    scopes = [ALL_SCOPE] * len(rows)
    extra = rng.sample(range(n), 60)
    rows, scopes = rows + extra, scopes + [rng.choice(["发票", "物流配送"]) for _ in extra]
    if repeat:
        rows, scopes = rows + [rows[3]], scopes + [ALL_SCOPE]
    order = rng.sample(range(len(rows)), len(rows))
    case_rows = np.array([rows[i] for i in order], dtype=np.int64)
    members = pd.DataFrame(
        {
            "scope": [scopes[i] for i in order],
            "case_id": pd.Series([f"c{r}" for r in case_rows], dtype=ids),
            "cluster_id": [rng.choice(["C1", "C2", "C3", None]) for _ in order],
        }
    )
    if repeat:  # the repeated case counted twice, once in each of two clusters
        twice = np.flatnonzero((case_rows == rows[3]) & (members["scope"] == ALL_SCOPE).to_numpy())
        members.loc[twice, ["scope", "cluster_id"]] = [[ALL_SCOPE, "C1"], [ALL_SCOPE, "C2"]]
        cases.iloc[rows[3], cases.columns.get_loc("emotion_trajectory")] = "恶化"
    want_in = cases.assign(team=case_teams(cases)).merge(
        members.loc[(members["scope"] == ALL_SCOPE) & members["cluster_id"].notna(), ["case_id", "cluster_id"]],
        on="case_id",
        how="left",
    )
    want = _trajectory_by_groupbys(want_in)
    if ids == "str" and not repeat:  # found by position alone
        monkeypatch.setattr(es, "_unique_positions", lambda *a: pytest.fail("ids hashed"))
    got = trajectory_table(cases, members, case_rows=case_rows)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    coded = trajectory_table(cases, members, cluster_codes=sorted_codes(members["cluster_id"]), case_rows=case_rows)
    pd.testing.assert_frame_equal(coded, want, check_exact=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_frames_counted_columns_are_coded_from_the_cases(seed):
    """The selected frame's counted columns are declared the cases' values at its rows (their
    codes taken, not the copies hashed) and code as factorizing the frame's own values; cases
    already filled keep their issue type column itself, so it is coded once."""
    from pipeline.insights import codes as cd
    from pipeline.insights.cluster import CODED_COLUMNS, fill_classification, select_cases_at

    rng = random.Random(seed)
    n = 400
    texts = ["短", "这个问题已经很久了", "", None, "物流一直没有更新"]
    text = pd.Series([rng.choice(texts) for _ in range(n)], dtype="str")
    cases = pd.DataFrame(
        {
            "case_id": pd.Series([f"c{i}" for i in range(n)], dtype="str"),
            "problem": text,
            "customer_text": pd.Series([None] * n, dtype="str"),
            **{
                col: pd.Series([rng.choice(["x", "y", "", None, "华东"]) for _ in range(n)], dtype="str")
                for col in CODED_COLUMNS
            },
        }
    )
    filled = fill_classification(cases)
    again = fill_classification(filled)
    assert again["issue_type"].array._pa_array is filled["issue_type"].array._pa_array
    assert fill_classification(cases)["issue_type"].tolist() == filled["issue_type"].tolist()
    frame, rows = select_cases_at(filled, 4)
    assert 0 < len(frame) < n
    for col in CODED_COLUMNS:
        assert id(cd._arrow_of(frame[col])) in cd._DERIVED
        want = pd.factorize(frame[col].astype(object), sort=True)
        got = cd.sorted_codes(frame[col])
        assert got[0].tolist() == want[0].tolist() and list(got[1]) == list(want[1])
    # Every case selected: the frame's columns are the cases' own arrays, not derived from themselves.
    fresh = pd.DataFrame({col: pd.Series(cases[col].tolist(), dtype="str") for col in cases})
    everything, _ = select_cases_at(fresh.assign(problem="这个问题已经很久了"), 4)
    assert cd._arrow_of(everything["channel"]) is cd._arrow_of(fresh["channel"])
    want = pd.factorize(fresh["channel"], sort=True)[0].tolist()
    assert cd.sorted_codes(everything["channel"])[0].tolist() == want


@pytest.mark.parametrize("n, span", [(0, 10), (1, 1), (500, 40), (3000, 7000), (50, 100_000)])
def test_first_seen_numbers_keys_as_factorize_does(n, span):
    """recount's (scope, cluster) pairs numbered in order of first appearance, by first rows
    over a small span or by factorize over a large one: pd.factorize's numbers and keys."""
    from pipeline.insights.incremental import _first_seen

    keys = np.random.default_rng(n + span).integers(0, span, n).astype(np.int64)
    got, pairs = _first_seen(keys, span)
    want, uniques = pd.factorize(keys)
    assert got.tolist() == want.tolist() and np.asarray(pairs).tolist() == np.asarray(uniques).tolist()
