"""Trends, week-over-week alerts and the root-cause matrix, from cases and their clusters.

Why a significance test and not a percentage: "+100%" is 2 -> 4 calls as easily as 40 -> 80,
and only the second deserves a manager's morning. Given this week's count a and last week's b,
under "nothing changed" a is Binomial(a + b, 1/2) (the conditional test for two Poisson rates);
the one-sided p-value says how surprising a rise that large is. Pure functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.stats import binomtest

from pipeline.insights.cluster import ALL_SCOPE, coded_shares, format_shares, list_str_dtype
from pipeline.insights.codes import Codes, column_codes, fill_codes, filled_codes, sorted_codes, taken_codes

BREAKDOWNS = ("channel", "region", "product")


def _distinct_dates(dates: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """Each row's code among the distinct dates (-1: missing) and those dates parsed (NaT where
    they cannot be): all-history frames hold ~100k cases on a few hundred dates, so each is
    parsed once. Unsorted: stored dates may mix strings and date objects."""
    codes, seen = column_codes(dates)  # any order of the dates serves
    return codes, pd.Series(pd.to_datetime(pd.Series(seen, dtype=object), errors="coerce"))


def _dates(df: pd.DataFrame) -> pd.Series:
    """The `date` column parsed (NaT where it cannot be), as pd.to_datetime parses it."""
    codes, parsed = _distinct_dates(df["date"])
    if not len(parsed):
        return pd.to_datetime(df["date"], errors="coerce")  # nothing to parse
    return parsed.iloc[np.maximum(codes, 0)].set_axis(df.index).where(codes >= 0)


def week_start(d: pd.Series) -> pd.Series:
    """Monday of each date's ISO week, as YYYY-MM-DD."""
    dt = pd.to_datetime(d, errors="coerce")
    return (dt - pd.to_timedelta(dt.dt.day_of_week, unit="D")).dt.strftime("%Y-%m-%d")


_COUNT_COLUMNS = ["dimension", "key", "granularity", "period", "breakdown", "breakdown_value", "count"]


def _periods(dates: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's day code (-1: no date), the day labels and the week labels (YYYY-MM-DD, week
    of its Monday), formatted once per distinct stored date, and each day's week: a day's rows
    are all in its week, so weekly counts are the daily ones summed (no second pass over the
    rows)."""
    raw, parsed = _distinct_dates(dates)
    day_of_seen, days = sorted_codes(parsed.dt.strftime("%Y-%m-%d"))
    week_of_seen, weeks = sorted_codes(week_start(parsed))
    day_rows = np.where(raw >= 0, day_of_seen[np.maximum(raw, 0)] if len(day_of_seen) else -1, -1)
    day_week = np.full(len(days), -1, dtype=np.int64)
    dated = day_of_seen >= 0
    day_week[day_of_seen[dated]] = week_of_seen[dated]
    return day_rows, days, weeks, day_week


def _spare(codes: np.ndarray, span: int) -> np.ndarray:
    """Codes below `span` with missing ones (-1) as `span`, a spare value counted nowhere. Masked
    only when some are missing: stored breakdowns are filled, cluster ids mostly there."""
    return np.where(codes < 0, span, codes) if len(codes) and codes.min() < 0 else codes


def _combine(first: np.ndarray, span: int, width: int, then: np.ndarray) -> np.ndarray:
    """Each row's combination `first * width + then` of two columns' codes (`first` below `span`
    or spare, `then` below `width` or -1); a row missing either gets a value at or past the
    combination's span `span * width`, counted nowhere."""
    out = first * width + then
    if len(then) and then.min() < 0:
        out[then < 0] = span * width
    return out


def _count_spare(combined: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """`_count_combined` of the rows whose combination is below `span` (the others are spare:
    `_combine`'s, below span + span / keys, so their bins cost little)."""
    if span <= 4 * len(combined):
        binned = np.bincount(combined, minlength=span)[:span]
        found = np.flatnonzero(binned)
        return found, binned[found]
    return np.unique(combined[combined < span], return_counts=True)


def _regroup(found: np.ndarray, counts: np.ndarray, into: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counted combinations mapped `into` coarser ones (sorted), their counts summed."""
    if not len(found):
        return found, counts
    order = np.argsort(into, kind="stable")
    merged, start = np.unique(into[order], return_index=True)
    return merged, np.add.reduceat(counts[order], start)


def _count_combined(combined: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of `combined` (codes of several columns, each below `span`) in sorted
    order, and their counts: rows counted per combination, in a groupby's order (rows with a
    missing value are left out by the caller, as a groupby drops missing keys)."""
    if span <= 4 * len(combined):
        # Few combinations for the rows: counted into one bin each, found in sorted order, as
        # np.unique would give them without its sort of every row.
        binned = np.bincount(combined, minlength=span)
        found = np.flatnonzero(binned)
        return found, binned[found]
    return np.unique(combined, return_counts=True)


def _decode(found: np.ndarray, counts: np.ndarray, uniques: list[np.ndarray], dtype: Any) -> list[Any]:
    """Combined codes back to each column's values (`uniques`, first column most significant),
    then the counts."""
    cols = []
    for u in reversed(uniques):
        width = max(len(u), 1)
        cols.append(_take(u, found % width, dtype) if len(u) else np.array([], dtype=object))
        found = found // width
    return [*reversed(cols), counts.astype(np.int64)]


def _take(values: np.ndarray, idx: np.ndarray, dtype: Any) -> Any:
    """`values[idx]` as the table column pandas makes of it. When every value is a str and
    pandas keeps text in Arrow (the `str` dtype: `dtype`, `list_str_dtype()` asked once per
    table, as asking builds a Series, 0.2 ms, ~80 times a night), taken in Arrow: converting
    the object array of a trends part (40k cells at 100k stored cases) cost more than counting
    it."""
    if dtype is None or not all(isinstance(v, str) for v in values):  # few: the distinct values
        return values[idx]
    return pd.array(pa.array(values.tolist(), pa.large_string()).take(pa.array(idx)), dtype=dtype)


def _constant(value: str, n: int, dtype: Any) -> Any:
    """A column of `n` times `value`, as `_take` makes it."""
    return _take(np.array([value], dtype=object), np.zeros(n, dtype=np.int64), dtype)


def _counts_part(k: Any, p: Any, n: np.ndarray, gran: str, breakdown: str, v: Any, dtype: Any) -> pd.DataFrame:
    """One (granularity, breakdown) part of the counts table."""
    return pd.DataFrame(
        {
            "key": k,
            "granularity": _constant(gran, len(n), dtype),
            "period": p,
            "breakdown": _constant(breakdown, len(n), dtype),
            "breakdown_value": _constant("全部", len(n), dtype) if v is None else v,
            "count": n,
        }
    )


def _add_parts(
    parts: dict[str, list[pd.DataFrame]],
    breakdown: str,
    by_period: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    key_values: np.ndarray,
    bvalues: np.ndarray,
    nb: int,
    dtype: Any,
) -> None:
    """One breakdown's counted (key, period, value) combinations, per granularity its found
    combinations, counts and periods, decoded into rows of the count table's parts."""
    for gran, (f, n, periods) in by_period.items():
        if breakdown == "all":
            kk, pp, nn = _decode(f // nb, n, [key_values, periods], dtype)
            parts[gran].append(_counts_part(kk, pp, nn, gran, breakdown, None, dtype))
        else:
            kk, pp, vv, nn = _decode(f, n, [key_values, periods, bvalues], dtype)
            parts[gran].append(_counts_part(kk, pp, nn, gran, breakdown, vv, dtype))


def _count_frame(parts: dict[str, list[pd.DataFrame]], dimension: str, dtype: Any) -> pd.DataFrame:
    """The count table from its parts: every day part, then every week part."""
    out = pd.concat([*parts["day"], *parts["week"]], ignore_index=True)
    out.insert(0, "dimension", _constant(dimension, len(out), dtype))
    return out[_COUNT_COLUMNS]


def count_table(df: pd.DataFrame, dimension: str, key_col: str, key_codes: Codes | None = None) -> pd.DataFrame:
    """Daily and weekly counts of `key_col`, overall and by channel, region and product, in one
    long table: dimension, key, granularity, period, breakdown, breakdown_value, count.

    Counted by integer codes that sort as the values do, so the rows come out in a groupby's
    order: a groupby per (granularity, breakdown) on the string columns cost 0.4 s of a
    night's export at 100k stored cases. Each row is read once per breakdown, by day; the weeks
    are the days' counts summed (a second pass over 1M rows per breakdown cost half the table).
    `key_codes`: the key column's `sorted_codes`, when the caller has them (the members' cluster
    ids, an object column, are hashed once a night)."""
    if df.empty or key_col not in df:
        return pd.DataFrame(columns=_COUNT_COLUMNS)
    keys, key_values = key_codes if key_codes is not None else sorted_codes(df[key_col])
    day_rows, days, weeks, day_week = _periods(df["date"])
    breakdowns = {b: filled_codes(df[b], "未知") for b in BREAKDOWNS if b in df}
    dtype = list_str_dtype()
    nk, nd, nw = max(len(key_values), 1), max(len(days), 1), max(len(weeks), 1)
    # (key, day) combined once, each breakdown's code appended to it; -1 in any: a spare value.
    key_day = _combine(_spare(keys, nk), nk, nd, day_rows)
    parts: dict[str, list[pd.DataFrame]] = {"day": [], "week": []}
    for b, (bcodes, bvalues) in [("all", (np.zeros(len(keys), dtype=np.int64), np.array([None]))), *breakdowns.items()]:
        nb = max(len(bvalues), 1)
        combined = key_day if b == "all" else _combine(key_day, nk * nd, nb, bcodes)
        found, counts = _count_spare(combined, nk * nd * nb)
        # The weeks of the counted (key, day, value) combinations, as (key, week, value) ones.
        k, d, v = found // (nd * nb), found // nb % nd, found % nb
        wfound, wcounts = _regroup(found, counts, (k * nw + day_week[d]) * nb + v)
        by_period = {"day": (found, counts, days), "week": (wfound, wcounts, weeks)}
        _add_parts(parts, b, by_period, key_values, bvalues, nb, dtype)
    return _count_frame(parts, dimension, dtype)


def rise_p_value(this_week: int, last_week: int) -> float:
    """One-sided conditional binomial p-value for "this week is higher than last week"."""
    n = int(this_week) + int(last_week)
    if n == 0 or this_week <= last_week:
        return 1.0
    return float(binomtest(int(this_week), n, 0.5, alternative="greater").pvalue)


def week_windows(as_of: date) -> tuple[tuple[date, date], tuple[date, date]]:
    """(this week, last week) as inclusive date ranges of 7 days ending at `as_of`."""
    this = (as_of - timedelta(days=6), as_of)
    last = (as_of - timedelta(days=13), as_of - timedelta(days=7))
    return this, last


def _rows_in(of_distinct: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each row's flag from its distinct value's (`codes`: -1, no value, is never flagged)."""
    if not len(of_distinct):
        return np.zeros(len(codes), dtype=bool)
    return np.append(of_distinct, False)[np.where(codes < 0, len(of_distinct), codes)]


_WOW_COLUMNS = [
    "dimension",
    "key",
    "label",
    "this_week",
    "last_week",
    "change",
    "pct_change",
    "p_value",
    "alert",
    "is_new",
    "emerging",
]


def week_over_week(
    df: pd.DataFrame,
    dimension: str,
    key_col: str,
    as_of: date,
    alpha: float,
    min_count: int,
    labels: dict[str, str] | None = None,
    new_keys: Sequence[str] = (),
    key_codes: Codes | None = None,
) -> pd.DataFrame:
    """This week vs last week per key, with the test, an alert flag and an emerging flag (new
    clusters, or a significant rise). Emerging rows come first, then by p-value. `key_codes`:
    the key column's `sorted_codes`, when the caller has them."""
    if df.empty or key_col not in df:
        return pd.DataFrame(columns=_WOW_COLUMNS)
    # Whole days compared as timestamps (not Python dates, one object per case), once per distinct
    # stored date: each row is in a week where its date is (a Series of 1M parsed dates, its
    # normalize and four comparisons cost 30 ms a night at 1M cases).
    date_codes, parsed = _distinct_dates(df["date"])
    d = (parsed.dt.tz_localize(None) if parsed.dt.tz is not None else parsed).dt.normalize()  # local day
    (a0, a1), (b0, b1) = week_windows(as_of)
    t0, t1, l0, l1 = pd.Timestamp(a0), pd.Timestamp(a1), pd.Timestamp(b0), pd.Timestamp(b1)
    # Keys as codes, each week's cases counted by bincount: two filtered value_counts and a set
    # of every row's key cost half of this at 100k cases.
    # -1: missing, counted nowhere. The caller's or a text column's shared codes (sorted: the rows
    # are sorted by key below anyway); another column's factorized here, unsorted, as mixed keys
    # do not sort.
    codes, uniques = key_codes if key_codes is not None else column_codes(df[key_col])
    keyed = codes >= 0
    this_week = _rows_in(np.asarray((d >= t0) & (d <= t1), dtype=bool), date_codes) & keyed
    last_week = _rows_in(np.asarray((d >= l0) & (d <= l1), dtype=bool), date_codes) & keyed
    this = np.bincount(codes[this_week], minlength=len(uniques)).tolist()
    last = np.bincount(codes[last_week], minlength=len(uniques)).tolist()
    return _wow_table(dimension, uniques.tolist(), this, last, alpha, min_count, labels, new_keys)


def _wow_table(
    dimension: str,
    keys: list[Any],
    this: list[int],
    last: list[int],
    alpha: float,
    min_count: int,
    labels: dict[str, str] | None,
    new_keys: Sequence[str],
) -> pd.DataFrame:
    """`week_over_week`'s table from each key's count this week and last week."""
    cols = _WOW_COLUMNS
    rows = []
    new = set(new_keys)
    # No case at all last week means the data does not reach back that far (first load, one
    # backfilled day): every key would "rise from zero", so nothing can alert or be "new". A key
    # absent last week has no previous week to rise from either: it has no p-value and cannot
    # alert (a new cluster shows as emerging instead).
    has_baseline = sum(last) > 0
    for k, a, b in sorted(zip(keys, this, last)):  # keys are distinct: sorted by key
        p = rise_p_value(a, b) if has_baseline and b > 0 else None
        alert = bool(p is not None and a >= min_count and p < alpha)
        rows.append(
            {
                "dimension": dimension,
                "key": k,
                "label": (labels or {}).get(k, k),
                "this_week": a,
                "last_week": b,
                "change": a - b,
                "pct_change": round((a - b) / b, 3) if b else None,
                "p_value": None if p is None else round(p, 6),
                "alert": alert,
                "is_new": has_baseline and k in new,
                "emerging": alert or (has_baseline and k in new and a > 0),
            }
        )
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(
        ["emerging", "alert", "p_value", "this_week"], ascending=[False, False, True, False], kind="stable"
    ).reset_index(drop=True)


def _type_cluster_groups(
    members: pd.DataFrame, cluster_codes: Codes | None = None
) -> tuple[np.ndarray, list[tuple[Any, Any]], list[int], np.ndarray]:
    """The per-type scopes' rows (positions), their (issue type, cluster id or "") groups in
    sorted order, as a sorted groupby's keys (rows without an issue type in none), the groups'
    sizes, and each per-type row's group (len(keys) for none). By integer codes: a copy of the
    per-type rows and a groupby on two text columns cost 30 ms a night at 100k cases. Combined
    in the columns' own numbering (sorted, so the groups come out in the same order as in the
    per-type rows' own): renumbering both at the per-type rows first cost half of this at 1M."""
    per_type = np.flatnonzero(np.asarray(members["scope"] != ALL_SCOPE, dtype=bool))
    all_it, types = sorted_codes(members["issue_type"])
    it_c = all_it[per_type]
    if cluster_codes is not None and all(isinstance(c, str) for c in cluster_codes[1]):
        # The caller's codes of every member's cluster id, taken at the per-type rows and filled.
        cid_c, cids = fill_codes(cluster_codes[0][per_type], cluster_codes[1], "")
    else:
        cid_c, cids = sorted_codes(members["cluster_id"].take(per_type).fillna(""))
    typed = it_c >= 0
    width = max(len(cids), 1)
    combined = it_c[typed] * width + cid_c[typed]
    found, counts = _count_combined(combined, max(len(types), 1) * width)
    group_of = np.full(max(len(types), 1) * width, -1, dtype=np.int64)
    group_of[found] = np.arange(len(found))
    codes = np.full(len(per_type), len(found), dtype=np.int64)
    codes[typed] = group_of[combined]
    keys = [(types[f // width], cids[f % width]) for f in found.tolist()]
    return per_type, keys, counts.astype(np.int64).tolist(), codes


def _rows_of(coded: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Some rows of a coded column: their codes, and all the column's values."""
    return coded[0][rows], coded[1]


_MATRIX_COLUMNS = [
    "issue_type",
    "cluster_id",
    "label",
    "cause_phrases",
    "cause_category",
    "cause_category_zh",
    "cause_suggested",
    "count",
    "share_of_issue_type",
    "issue_type_total",
    "top_regions",
    "top_products",
    "impact",
]


def root_cause_matrix(
    members: pd.DataFrame,
    clusters: pd.DataFrame,
    issue_counts: pd.Series,
    top: int,
    cluster_codes: Codes | None = None,
) -> pd.DataFrame:
    """Issue type -> cluster (direct cause) -> cause category -> impact. One row per per-type
    cluster plus one "未归类" row per type for its noise, so each type's shares add up.
    `cluster_codes`: the members' cluster ids' `sorted_codes`, when the caller has them."""
    if members.empty:
        return pd.DataFrame(columns=_MATRIX_COLUMNS)
    per_type, keys, sizes, codes = _type_cluster_groups(members, cluster_codes)
    # Region and product shares of the per-type rows counted for all groups at once
    # (`group_shares`); rows without an issue type counted as one more group, never read.
    shares = {
        col: coded_shares(codes, *_rows_of(sorted_codes(members[col]), per_type))
        for col in ("region", "product")
        if col in members
    }
    return matrix_from_groups(keys, sizes, shares, clusters, issue_counts, top)


def matrix_from_groups(
    keys: list[tuple[Any, Any]],
    sizes: list[int],
    shares: dict[str, dict[int, dict[str, float]]],
    clusters: pd.DataFrame,
    issue_counts: pd.Series,
    top: int,
) -> pd.DataFrame:
    """`root_cause_matrix` from its (issue type, cluster id or "") groups in sorted order, their
    sizes and their region and product shares (by group number): what it counts of the
    per-type members, counted tonight or kept and added to (`member_tallies`)."""
    cols = _MATRIX_COLUMNS
    # Clusters as dicts by id, of the columns read: a .loc per matrix row cost 0.07 s a night
    # (~350 rows), and the dicts of every column 10 ms.
    read = ["cluster_id", "label", "cause_phrases", "cause_category", "cause_category_zh"]
    info = (
        {c["cluster_id"]: c for c in clusters[[r for r in read if r in clusters]].to_dict("records")}
        if len(clusters)
        else {}
    )
    rows = []
    type_sizes: dict[Any, int] = {}
    for (it, _), size in zip(keys, sizes):
        type_sizes[it] = type_sizes.get(it, 0) + size
    for code, ((it, cid), size) in enumerate(zip(keys, sizes)):
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
                "count": size,
                "share_of_issue_type": round(size / max(total, 1), 4),
                "issue_type_total": total,
                "top_regions": regions,
                "top_products": products,
                "impact": f"{(phrases[0] if phrases else label)}: {regions.split(', ')[0] if regions else ''}".strip(
                    ": "
                ),
            }
        )
    out = pd.DataFrame(rows, columns=cols)
    out["_noise"] = out["cluster_id"].isna()
    out = out.sort_values(
        ["issue_type_total", "issue_type", "_noise", "count"], ascending=[False, True, True, False], kind="stable"
    ).drop(columns="_noise")
    return out.reset_index(drop=True)


def default_as_of(cases: pd.DataFrame) -> date | None:
    """The latest case date: trends end where the data ends (a backfill is not "no calls")."""
    # The latest of the distinct stored dates (each is some case's): no Series of every case's.
    d = _distinct_dates(cases["date"])[1].dropna() if "date" in cases else pd.Series(dtype="datetime64[ns]")
    return d.max().date() if len(d) else None


def trend_summary(alerts: pd.DataFrame) -> dict[str, Any]:
    """Counts for the run summary: alerts and emerging clusters."""
    if alerts.empty:
        return {"alerts": 0, "emerging_clusters": 0}
    return {
        "alerts": int(alerts["alert"].sum()),
        "emerging_clusters": int((alerts["emerging"] & (alerts["dimension"] == "cluster")).sum()),
    }


def weekly_series(counts: pd.DataFrame, dimension: str, top: int) -> pd.DataFrame:
    """Weekly totals of the `top` largest keys of one dimension (for the trend chart)."""
    w = counts[(counts["dimension"] == dimension) & (counts["granularity"] == "week") & (counts["breakdown"] == "all")]
    if w.empty:
        return w
    # Counts concatenated from empty frames come back as object dtype: make them numbers.
    w = w.assign(count=pd.to_numeric(w["count"]))
    keep = w.groupby("key")["count"].sum().nlargest(top).index
    w = w[w["key"].isin(keep)]
    # Weeks without cases are zeros, not gaps a line would bridge.
    weeks = pd.date_range(w["period"].min(), w["period"].max(), freq="7D").strftime("%Y-%m-%d")
    grid = pd.MultiIndex.from_product([list(keep), weeks], names=["key", "period"])
    full = w.groupby(["key", "period"])["count"].sum().reindex(grid, fill_value=0).reset_index()
    return full.assign(dimension=dimension).sort_values(["period", "key"]).reset_index(drop=True)


# -- the counts from kept daily counts (`member_tallies`) ---------------------------------------

DAY_COLUMNS = ["breakdown", "key", "period", "value", "count"]


def day_counts(table: pd.DataFrame) -> pd.DataFrame:
    """The daily rows of a `count_table` (DAY_COLUMNS): its weekly rows are their sums, so they
    are all a later night needs to add its rows' counts to."""
    if not len(table):
        return pd.DataFrame({c: pd.Series([], dtype=object if c != "count" else np.int64) for c in DAY_COLUMNS})
    d = table[(table["granularity"] == "day").to_numpy()]
    # The table's own text columns (Arrow-backed where pandas keeps text so): the kept rows
    # they join are, and a join of both kinds is object text, hashed in Python.
    return pd.DataFrame(
        {
            "breakdown": d["breakdown"].reset_index(drop=True),
            "key": d["key"].reset_index(drop=True),
            "period": d["period"].reset_index(drop=True),
            "value": d["breakdown_value"].reset_index(drop=True),
            "count": d["count"].to_numpy(dtype=np.int64),
        }
    )


def day_counts_of(df: pd.DataFrame, key_col: str, key_codes: Codes | None = None) -> pd.DataFrame:
    """`day_counts(count_table(df, ..., key_col, key_codes))` without the weeks and the table:
    each (breakdown, key, day, value) combination's count, counted as `count_table` counts
    (missing keys and days nowhere, missing breakdown values as "未知"). A night's new rows'
    counts cost 50 ms as a whole table."""
    keys, key_values = key_codes if key_codes is not None else sorted_codes(df[key_col])
    day_rows, days, _, _ = _periods(df["date"])
    breakdowns = {b: filled_codes(df[b], "未知") for b in BREAKDOWNS if b in df}
    nk, nd = max(len(key_values), 1), max(len(days), 1)
    key_day = _combine(_spare(keys, nk), nk, nd, day_rows)
    cols: dict[str, list[Any]] = {c: [] for c in DAY_COLUMNS}
    every = ("all", (np.zeros(len(keys), dtype=np.int64), np.array(["全部"], dtype=object)))
    for b, (bcodes, bvalues) in [every, *breakdowns.items()]:
        nb = max(len(bvalues), 1)
        combined = key_day if b == "all" else _combine(key_day, nk * nd, nb, bcodes)
        found, counts = _count_spare(combined, nk * nd * nb)
        cols["breakdown"].append(np.full(len(found), b, dtype=object))
        cols["key"].append(np.asarray(key_values, dtype=object)[found // (nd * nb)])
        cols["period"].append(np.asarray(days, dtype=object)[found // nb % nd])
        cols["value"].append(np.asarray(bvalues, dtype=object)[found % nb])
        cols["count"].append(counts.astype(np.int64))
    dtype = list_str_dtype()  # the kept counts' text type, so that they join without a cast
    out = {c: pd.Series(np.concatenate(v), dtype=dtype) for c, v in cols.items() if c != "count"}
    return pd.DataFrame({**out, "count": np.concatenate(cols["count"])})


def add_day_counts(kept: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Two `day_counts` as one: each (breakdown, key, day, value)'s counts summed."""
    if not len(new):
        return kept
    both = pd.concat([kept, new], ignore_index=True)
    combined = np.zeros(len(both), dtype=np.int64)
    for col in DAY_COLUMNS[:-1]:
        codes, uniques = sorted_codes(both[col])
        combined = combined * max(len(uniques), 1) + codes
    _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), weights=both["count"].to_numpy(dtype=np.float64))
    out = both.iloc[first].reset_index(drop=True)
    return out.assign(count=np.rint(counts).astype(np.int64))


def counts_from_days(dimension: str, days: pd.DataFrame, breakdowns: Sequence[str]) -> pd.DataFrame:
    """`count_table` of rows whose daily counts are `days` (`day_counts`) and which had the
    `breakdowns` columns: the same parts in the same order, the weeks summed from the days.
    Empty `days`: the caller counts the rows (an empty table's columns are its own)."""
    dtype = list_str_dtype()
    parts: dict[str, list[pd.DataFrame]] = {"day": [], "week": []}
    # Each column coded once, each breakdown's rows' codes taken from them (renumbered among
    # the values they hold, as coding the rows alone would): a breakdown's rows filtered and
    # hashed again cost as much as the old count of every member.
    of, kinds = sorted_codes(days["breakdown"])
    coded = {col: sorted_codes(days[col]) for col in ("key", "period", "value")}
    every = days["count"].to_numpy(dtype=np.int64)
    # Every breakdown's days and weeks as the codes of all of them, the weeks parsed once: the
    # rows are ordered and decoded by them as by codes renumbered per breakdown (both sort as
    # the values do), and a parse per breakdown cost 7 ms each (a night's issue types' 35 ms).
    all_days, pvalues = coded["period"]
    weeks_of, weeks = sorted_codes(week_start(pd.Series(pvalues, dtype=object)))
    nd, nw = max(len(pvalues), 1), max(len(weeks), 1)
    for b in ("all", *breakdowns):
        rows = np.flatnonzero(of == (kinds.tolist().index(b) if b in kinds else -2))
        keys, key_values = taken_codes(*coded["key"], rows)
        day_rows = all_days[rows]
        if b == "all":
            vcodes, bvalues = np.zeros(len(rows), dtype=np.int64), np.array([None])
        else:
            vcodes, bvalues = taken_codes(*coded["value"], rows)
        nb = max(len(bvalues), 1)
        combined = (keys * nd + day_rows) * nb + vcodes
        order = np.argsort(combined, kind="stable")
        found, counts = combined[order], every[rows][order]
        k, d, v = found // (nd * nb), found // nb % nd, found % nb
        wfound, wcounts = _regroup(found, counts, (k * nw + weeks_of[d]) * nb + v)
        by_period = {"day": (found, counts, pvalues), "week": (wfound, wcounts, weeks)}
        _add_parts(parts, b, by_period, key_values, bvalues, nb, dtype)
    return _count_frame(parts, dimension, dtype)


def wow_from_days(
    days: pd.DataFrame,
    keys: list[Any],
    dimension: str,
    as_of: date,
    alpha: float,
    min_count: int,
    labels: dict[str, str] | None = None,
    new_keys: Sequence[str] = (),
) -> pd.DataFrame:
    """`week_over_week` of rows whose daily counts are `days` (`day_counts`) and whose distinct
    keys are `keys` (a key without a dated row still has its row, at 0 and 0)."""
    of, kinds = sorted_codes(days["breakdown"])
    every = days[of == (kinds.tolist().index("all") if "all" in kinds else -2)]
    index = {k: i for i, k in enumerate(keys)}
    at = np.array([index[k] for k in every["key"].tolist()], dtype=np.int64)
    d = pd.Series(pd.to_datetime(every["period"].astype(object)))
    (a0, a1), (b0, b1) = week_windows(as_of)
    n = every["count"].to_numpy(dtype=np.int64)
    this_week = np.asarray((d >= pd.Timestamp(a0)) & (d <= pd.Timestamp(a1)), dtype=bool)
    last_week = np.asarray((d >= pd.Timestamp(b0)) & (d <= pd.Timestamp(b1)), dtype=bool)
    this = np.bincount(at[this_week], weights=n[this_week], minlength=len(keys)).astype(np.int64).tolist()
    last = np.bincount(at[last_week], weights=n[last_week], minlength=len(keys)).astype(np.int64).tolist()
    return _wow_table(dimension, keys, this, last, alpha, min_count, labels, new_keys)
