"""The export's all-history tables on codes and float arrays give what the pandas forms they
replaced gave (issue 15: a night's export should cost in proportion to its new cases).

Each test runs the replaced form, kept here, beside the new one on data with the awkward values
(missing, signed zeros, infinities, ties, Arrow-backed strings, object columns) and wants the
same result, order and floats included."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.insights.emotion_stats import _varies, average_ranks, bootstrap_corr, relations
from tests.test_export_fastpaths import _compute_kpis_before  # the groupby form both files check against


def test_average_ranks_are_pandas_ranks():
    rng = random.Random(5)
    pool = [0.0, -0.0, 1.0, -1.5, np.inf, -np.inf, 1e-300, 2.5, 3.0]
    for n in range(0, 40):
        for _ in range(20):
            v = np.array([rng.choice(pool) for _ in range(n)], dtype=float)
            np.testing.assert_array_equal(average_ranks(v), pd.Series(v).rank().to_numpy())
    big = np.round(np.random.default_rng(1).normal(size=50_000), 2)  # long tie runs
    np.testing.assert_array_equal(average_ranks(big), pd.Series(big).rank().to_numpy())
    with_nan = np.array([1.0, np.nan, 1.0, 0.5])
    np.testing.assert_array_equal(average_ranks(with_nan), pd.Series(with_nan).rank().to_numpy())
    ints = np.array([3, 1, 3, 2])
    np.testing.assert_array_equal(average_ranks(ints), pd.Series(ints).rank().to_numpy())


def _bootstrap_corr_before(
    x: np.ndarray, y: np.ndarray, method: str = "pearson", n_boot: int = 1000, seed: int = 0, max_n: int = 5_000
) -> tuple[float, float, float]:
    """bootstrap_corr as it was: Spearman on pandas' ranks (the resampling after them is unchanged)."""
    if method == "spearman":
        x, y = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return bootstrap_corr(x, y, method, n_boot, seed, max_n, ranked=True)


@pytest.mark.parametrize("n", [30, 400, 6000])
def test_spearman_bootstrap_keeps_its_values_and_random_stream(n):
    rng = np.random.default_rng(n)
    x = np.round(rng.normal(size=n), 1)
    y = rng.integers(1, 6, size=n).astype(float)
    assert bootstrap_corr(x, y, "spearman") == _bootstrap_corr_before(x, y, "spearman")
    assert bootstrap_corr(x, y, "spearman", max_n=10) == _bootstrap_corr_before(x, y, "spearman", max_n=10)


def _relations_before(cases: pd.DataFrame, min_n: int = 20) -> pd.DataFrame:
    """relations as it was: the frame filtered per target, each column converted per target."""
    cols = ["measure", "outcome_measure", "method", "n", "r", "ci_low", "ci_high", "note"]
    if not len(cases) or "emotion_start" not in cases:
        return pd.DataFrame(columns=cols)
    rows: list[dict[str, Any]] = []
    used = ("outcome", "csat", "emotion_start", "emotion_end", "emotion_delta")
    cases = cases[[c for c in used if c in cases]]
    known = cases[cases["outcome"].isin(["resolved", "unresolved", "escalated"])]
    targets = [("resolved", "pearson", known, (known["outcome"] == "resolved").astype(float))]
    if "csat" in cases:
        rated = cases[pd.to_numeric(cases["csat"], errors="coerce").notna()]
        targets.append(("csat", "spearman", rated, pd.to_numeric(rated["csat"], errors="coerce")))
    for measure in ("emotion_start", "emotion_end", "emotion_delta"):
        for name, method, frame, target in targets:
            x = pd.to_numeric(frame[measure], errors="coerce")
            ok = x.notna() & target.notna()
            n = int(ok.sum())
            row = {"measure": measure, "outcome_measure": name, "method": method, "n": n}
            if n < min_n or not _varies(x[ok].to_numpy(float)) or not _varies(target[ok].to_numpy(float)):
                rows.append(
                    {
                        **row,
                        "r": None,
                        "ci_low": None,
                        "ci_high": None,
                        "note": f"too few cases with both values (need {min_n})",
                    }
                )
                continue
            r, lo, hi = _bootstrap_corr_before(x[ok].to_numpy(float), target[ok].to_numpy(float), method)
            strength = (
                "no clear relation"
                if lo <= 0 <= hi
                else ("weak" if abs(r) < 0.3 else "moderate" if abs(r) < 0.5 else "strong")
            )
            rows.append({**row, "r": round(r, 3), "ci_low": round(lo, 3), "ci_high": round(hi, 3), "note": strength})
    return pd.DataFrame(rows, columns=cols)


@pytest.mark.parametrize("dtype", [object, "str"])
@pytest.mark.parametrize("drop", [(), ("csat",), ("other",)])
def test_relations_give_what_the_filtered_frames_gave(dtype, drop):
    rng = random.Random(17)
    for n in (0, 1, 25, 60, 300, 6000):
        outcomes = ["resolved", "unresolved", "escalated", "unknown", "", None]
        cases = pd.DataFrame(
            {
                "outcome": pd.Series([rng.choice(outcomes) for _ in range(n)], dtype=dtype),
                "csat": [rng.choice([None, np.nan, 1.0, 2.0, 3.0, 4.0, 5.0]) for _ in range(n)],
                "emotion_start": [rng.choice([np.nan, -0.0, 0.0, round(rng.uniform(-1, 1), 2)]) for _ in range(n)],
                "emotion_end": [round(rng.uniform(-1, 1), 1) for _ in range(n)],
                # Text in an object column: coerced to NaN, as to_numeric did.
                "emotion_delta": pd.Series([rng.choice(["x", 0.5, -0.25, 1, None]) for _ in range(n)], dtype=object),
                "other": ["z"] * n,
            },
            index=np.arange(n) * 2 + 1,
        ).drop(columns=list(drop))
        for min_n in (20, 2):
            got, want = relations(cases, min_n), _relations_before(cases, min_n)
            pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_linear_quantile_is_numpys():
    from pipeline.insights.kpis import linear_quantile

    rng = random.Random(9)
    pool = [0.0, 1.0, 2.5, 3.0, 1e-300, 7.1, 1e6 + 0.1, -4.0, np.inf]
    for n in range(1, 60):
        for _ in range(15):
            v = np.array(
                [rng.choice(pool) if rng.random() < 0.5 else rng.random() * 10 ** rng.randint(0, 6) for _ in range(n)]
            )
            s = np.sort(v)
            for q in (0.5, 0.9, 0.0, 1.0, 0.25, 0.1):
                want = float(np.quantile(v, q))
                got = linear_quantile(s.item, n, q)
                assert got == want or (np.isnan(got) and np.isnan(want)), (v, q)


@pytest.mark.parametrize("dtype", [object, "str"])
@pytest.mark.parametrize("values", ["few", "many", "signed_zeros", "zeros"])
def test_compute_kpis_from_histograms_give_what_each_group_gave(dtype, values):
    """Stored timings hold few distinct values (the histogram path); many distinct ones, and -0.0
    beside 0.0, take the per-group quantiles. Both must give the groupby form's floats."""
    from pipeline.insights.kpis import compute_kpis

    rng = random.Random(23)
    pools = {
        "few": [np.nan, 0.0, 3.0, 12.5, 60.0, 61.0, 3600.0, np.inf, 1e-9],
        "signed_zeros": [np.nan, 0.0, -0.0, 5.0, -0.0],
        "zeros": [np.nan, -0.0, 1.0, 2.0],
    }

    def value() -> float:
        if values == "many":
            return rng.choice([np.nan, rng.random() * 10 ** rng.randint(0, 6)])
        return rng.choice(pools[values])

    for n in (0, 1, 2, 9, 3000):
        cases = pd.DataFrame(
            {
                "channel": pd.Series([rng.choice(["chat", "call", "", None]) for _ in range(n)], dtype=dtype),
                "issue_type": pd.Series(
                    [rng.choice(["物流", "发票", "未分类", "退款", None]) for _ in range(n)], dtype=dtype
                ),
                "outcome": pd.Series(
                    [rng.choice(["resolved", "escalated", "unresolved", "unknown", None]) for _ in range(n)],
                    dtype=dtype,
                ),
                "first_response_s": [value() for _ in range(n)],
                "duration_s": [value() for _ in range(n)],
            },
            index=np.arange(n) * 3,
        )
        got, want = compute_kpis(cases), _compute_kpis_before(cases)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        assert str(got.to_dict()) == str(want.to_dict())  # -0.0 prints as it did


def test_cross_counts_count_each_pair_and_leave_out_the_missing():
    from pipeline.insights.codes import cross_counts

    rng = np.random.default_rng(4)
    for n in (0, 1, 50, 2000):
        for n_a, n_b in ((1, 1), (3, 7), (12, 2)):
            a, b = rng.integers(-1, n_a, size=n), rng.integers(-1, n_b, size=n)
            want = np.zeros((n_a, n_b), dtype=np.int64)
            for x, y in zip(a.tolist(), b.tolist()):
                if x >= 0 and y >= 0:
                    want[x, y] += 1
            np.testing.assert_array_equal(cross_counts(a, n_a, b, n_b), want)


@pytest.mark.parametrize("dtype", ["str", object])
@pytest.mark.parametrize("meta", ["none", "some", "absent"])
def test_case_team_codes_are_the_factorized_teams(dtype, meta):
    """Without metadata every team is the agent: its shared codes stand for the teams' list."""
    from pipeline.insights.emotion_stats import _team, case_team_codes, case_teams, worsened_by_team

    rng = np.random.default_rng(8)
    pool_m = [None, '{"team": "T1"}', "{}", '{"group": "a2"}']
    pool_a = [None, "a1", "a2", "", "坐席7", "b"]
    for n in (0, 1, 300):
        df = pd.DataFrame(
            {
                "metadata_json": pd.Series(
                    [pool_m[i] if meta == "some" else None for i in rng.integers(0, len(pool_m), n)], dtype=dtype
                ),
                "agent_id": pd.Series([pool_a[i] for i in rng.integers(0, len(pool_a), n)], dtype=dtype),
                "emotion_trajectory": pd.Series(
                    [rng.choice(["改善", "平稳", "恶化", None]) for _ in range(n)], dtype=dtype
                ),
            },
            index=np.arange(n) + 5,
        )
        if meta == "absent":
            df = df.drop(columns="metadata_json")
        # The row-by-row rule: metadata's team keys, else the agent.
        metas = df["metadata_json"].tolist() if "metadata_json" in df else [None] * n
        rule = [_team(m, a) for m, a in zip(metas, df["agent_id"].tolist())]
        assert case_teams(df) == rule
        codes, names = pd.factorize(pd.Series(rule, index=df.index), sort=True)
        got_codes, got_names = case_team_codes(df)
        np.testing.assert_array_equal(got_codes, codes)
        assert got_names.tolist() == list(names)
        teams = case_teams(df)
        for got in (worsened_by_team(df), worsened_by_team(df, teams)):
            pd.testing.assert_frame_equal(got, _worsened_by_team_before(df, teams), check_exact=True)


def _worsened_by_team_before(cases: pd.DataFrame, teams: list) -> pd.DataFrame:
    """worsened_by_team as it was before codes: the teams' list factorized, the trajectory compared
    (the table laid out from the counts as before)."""
    from pipeline.insights.emotion_stats import team_table

    if not len(cases):
        return pd.DataFrame(columns=["team", "n", "worsened", "share_worsened", "ci_low", "ci_high"])
    codes, names = pd.factorize(pd.Series(teams, index=cases.index), sort=True)
    kept = codes >= 0
    worse = np.asarray((cases["emotion_trajectory"] == "恶化").fillna(False), dtype=bool)
    sizes = np.bincount(codes[kept], minlength=len(names))
    worsened = np.bincount(codes[kept & worse], minlength=len(names))
    return team_table(names, sizes, worsened)


@pytest.mark.parametrize("n", [300, 5000])
def test_count_table_sums_weeks_from_days_as_a_groupby_counts(n):
    """Weekly counts are the daily ones summed: over two months of dates (weeks of several
    days, a week across a year's end), keys and breakdowns with missing values, Arrow text."""
    import warnings

    from test_export_fastpaths import _count_table_by_groupby

    from pipeline.insights.codes import sorted_codes
    from pipeline.insights.trends import count_table

    rng = np.random.default_rng(n)
    days = [f"2025-12-{d:02d}" for d in range(1, 32)] + [f"2026-01-{d:02d}" for d in range(1, 20)] + [None, "bad"]
    keys = [f"C{i}" for i in range(30)] + [None]
    df = pd.DataFrame(
        {
            "k": pd.Series([keys[i] for i in rng.integers(0, len(keys), n)], dtype="str"),
            "date": pd.Series([days[i] for i in rng.integers(0, len(days), n)], dtype="str"),
            "channel": pd.Series([["chat", "call", None][i] for i in rng.integers(0, 3, n)], dtype="str"),
            "product": pd.Series([f"P{i}" for i in rng.integers(0, 40, n)], dtype="str"),
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = _count_table_by_groupby(df, "d", "k")
        for got in (count_table(df, "d", "k"), count_table(df, "d", "k", key_codes=sorted_codes(df["k"]))):
            pd.testing.assert_frame_equal(got, want, check_dtype=False)


@pytest.mark.parametrize("dtype", [object, "str"])
def test_default_as_of_is_the_latest_parsed_date(dtype):
    import warnings

    from pipeline.insights.trends import _dates, default_as_of

    rng = random.Random(2)
    naive = ["2025-11-30", "2025-12-01 00:10", "2024-02-29", None, "x", ""]
    zoned = ["2025-11-30 23:30+08:00", "2025-12-01 00:10+08:00", None]
    compared = 0
    for n in (0, 1, 3, 40):
        for pool in [naive, zoned] * 10:
            df = pd.DataFrame({"date": pd.Series([rng.choice(pool) for _ in range(n)], dtype=dtype)})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                try:
                    d = _dates(df).dropna()
                except (ValueError, TypeError):  # mixed zones: neither form parses them
                    continue
                assert default_as_of(df) == (d.max().date() if len(d) else None)
                compared += bool(len(d))
    assert compared > 40
    assert default_as_of(pd.DataFrame({"x": [1]})) is None


@pytest.mark.parametrize("dtype", [object, "str"])
def test_outcome_table_is_the_cross_type_crosstab(dtype):
    from pipeline.insights.cluster import ALL_SCOPE
    from pipeline.insights.report import _outcome_table

    rng = random.Random(6)
    for n in (1, 5, 400):
        m = pd.DataFrame(
            {
                "scope": pd.Series([rng.choice([ALL_SCOPE, "物流"]) for _ in range(n)], dtype=dtype),
                "issue_type": pd.Series([rng.choice(["物流", "发票", "仅单类", None]) for _ in range(n)], dtype=dtype),
                "outcome": pd.Series(
                    [rng.choice(["resolved", "escalated", "unknown", None]) for _ in range(n)], dtype=dtype
                ),
            }
        )
        kept = m[m["scope"] == ALL_SCOPE]
        want = pd.crosstab(kept["issue_type"], kept["outcome"].fillna("unknown"))
        got = _outcome_table(m)
        assert got.index.tolist() == want.index.tolist() and got.columns.tolist() == want.columns.tolist()
        np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


def test_marginal_counts_are_each_groupings_cross_counts():
    from pipeline.insights.codes import cross_counts, marginal_counts

    rng = np.random.default_rng(12)
    for n in (0, 1, 70, 3000):
        for sizes in ((1,), (1, 4), (1, 5, 12), (3, 200, 150)):  # the last past the rows: per grouping
            groupings = [(rng.integers(-1, k, size=n), k) for k in sizes]
            b = rng.integers(-1, 9, size=n)
            got = marginal_counts(groupings, b, 9)
            for (a, n_a), g in zip(groupings, got):
                np.testing.assert_array_equal(g, cross_counts(a, n_a, b, 9))


@pytest.mark.parametrize("dtype", [object, "str"])
def test_counted_members_are_the_filter_by_notna(dtype):
    from pipeline.insights.codes import sorted_codes
    from pipeline.insights.export import counted_members

    counted = ["cluster_id", "date"]
    for ids in ([None, None], ["C1", None], [np.nan, None], ["C2", "C1"], []):
        m = pd.DataFrame(
            {"cluster_id": pd.Series(ids, dtype=dtype), "date": ["2025-11-30"] * len(ids), "x": [1] * len(ids)}
        )
        want = m if not len(m) else (m[counted] if m["cluster_id"].notna().any() else m.iloc[0:0][counted])
        for codes in (sorted_codes(m["cluster_id"]), None):
            pd.testing.assert_frame_equal(counted_members(m, counted, codes), want)
