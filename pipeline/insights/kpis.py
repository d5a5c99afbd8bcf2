"""Service KPIs per channel and per issue type: response time, handling time, resolution, escalation.

Why the counts next to every timing: some sources (JDDC, chats exported without timestamps) have
no times, so a median over 12 of 500 cases must say so; a KPI without its base is misleading.
Rates are over all cases of the group; `n_outcome_unknown` shows how many could not be judged.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from pipeline.insights import case_kpis
from pipeline.insights.case_kept import linear_quantile
from pipeline.insights.case_kept import rate as _rate
from pipeline.insights.case_kept import round_q as _round_q
from pipeline.insights.case_numbers import ValueCodes, known_codes
from pipeline.insights.codes import arrow_backed, filled_codes, marginal_counts

KPI_COLUMNS = [
    "group_by",
    "group",
    "n_cases",
    "n_with_first_response",
    "first_response_median_s",
    "first_response_p90_s",
    "n_with_duration",
    "duration_median_s",
    "duration_mean_s",
    "resolution_rate",
    "escalation_rate",
    "unresolved_rate",
    "n_outcome_unknown",
]


def _num(s: pd.Series | None) -> pd.Series:
    return pd.to_numeric(s, errors="coerce") if s is not None else pd.Series(dtype=float)


def _q(s: pd.Series, q: float) -> float | None:
    s = s.dropna()
    return round(float(np.quantile(s, q)), 1) if len(s) else None


def _floats(cases: pd.DataFrame, col: str) -> np.ndarray | None:
    """A timing column as floats (NaN: missing or not a number), None when the cases lack it."""
    return _num(cases[col]).to_numpy(dtype=np.float64) if col in cases else None


def _kth(cum: np.ndarray, distinct: np.ndarray, k: int) -> float:
    """The k-th smallest value (0-based) of a histogram: `cum` its cumulative counts over the
    sorted `distinct` values."""
    return float(distinct[int(np.searchsorted(cum, k, side="right"))])


# Per group: known count, median, p90 (rounded as the table shows them), the known values in row order.
GroupTiming = tuple[int, float | None, float | None, np.ndarray]


class _Timing:
    """One timing column's known values, for the median, p90, mean and count of any group.

    Why: the per-group form copied each group's values and partitioned them per quantile, for
    every grouping (0.15 s a night at 1M cases). Stored timings hold a few hundred distinct
    values, so each group's order statistics come from a histogram of the values' ranks (one
    bincount for all groupings, `codes.marginal_counts`); only the mean reads the values, in
    row order per group as before (a float sum depends on its order)."""

    def __init__(self, values: np.ndarray | None, n_rows: int, coded: ValueCodes | None = None):
        """`coded`: the values' kept codes (`case_numbers`), when known: then not factorized."""
        self.values = values
        self.known = ~np.isnan(values) if values is not None else np.zeros(n_rows, dtype=bool)
        self.distinct: np.ndarray | None = None  # sorted distinct known values, when counted
        self.rank = np.zeros(0, dtype=np.int64)  # each row's value's index in `distinct` (-1: unknown)
        # With kept codes, `rank` indexes the values in another order: `distinct` is them at `order`.
        self.order: np.ndarray | None = None
        if values is None:
            return
        if coded is not None and len(coded.codes) == n_rows:
            if not coded.signed_zeros:  # else as below: both zeros, no histogram
                self.distinct, self.rank, self.order = coded.values[coded.order], coded.codes, coded.order
            return
        kv = values[self.known]
        zeros = kv == 0
        # -0.0 and 0.0 are one value to a histogram but print differently: which one a partition
        # puts at a quantile is the per-group form's to decide.
        if zeros.any() and len(set(np.signbit(kv[zeros]).tolist())) > 1:
            return
        codes, found = pd.factorize(kv)
        order = np.argsort(found, kind="stable")
        where = np.empty(len(found), dtype=np.int64)
        where[order] = np.arange(len(found))
        self.distinct = found[order]
        self.rank = np.full(n_rows, -1, dtype=np.int64)
        self.rank[self.known] = where[codes]

    def histograms(self, groupings: list[tuple[np.ndarray, int]]) -> list[np.ndarray | None]:
        """Per grouping (codes, number of groups), its groups' counts of each distinct value
        (groups x values), or None where the values are not counted (`distinct` is None)."""
        if self.distinct is None:
            return [None] * len(groupings)
        if sum(n + 1 for _, n in groupings) * (len(self.distinct) + 1) > max(4 * len(self.rank), 1 << 16):
            return [None] * len(groupings)  # past the rows: per-group quantiles, as before
        hists = marginal_counts(groupings, self.rank, len(self.distinct))
        return list(hists) if self.order is None else [h[:, self.order] for h in hists]

    def stats(self, codes: np.ndarray, n_groups: int, with_values: bool, hist: np.ndarray | None) -> list[GroupTiming]:
        """Per group of `codes` (-1: in none): known count, median, p90 and, `with_values`, the
        known values in row order (for the caller's mean; else empty). `hist`: the groups'
        `histograms`, or None (then each group's values are read)."""
        if self.values is None:
            return [(0, None, None, np.zeros(0)) for _ in range(n_groups)]
        if hist is not None:
            sizes = hist.sum(axis=1)
        by_group, starts = np.zeros(0), np.zeros(n_groups + 1, dtype=np.int64)
        if with_values or hist is None:
            in_group = self.known & (codes >= 0)
            gk = codes[in_group]
            sizes = np.bincount(gk, minlength=n_groups)
            # The known values of each group in row order: a stable sort of their group numbers
            # (one group: they are in row order already).
            by_group = self.values[in_group]
            if n_groups > 1:
                small = gk.astype(np.int16) if n_groups < 2**15 else gk  # int16 sorts by radix
                by_group = by_group[np.argsort(small, kind="stable")]
            starts = np.r_[0, np.cumsum(sizes)]
        out: list[GroupTiming] = []
        for g in range(n_groups):
            n = int(sizes[g])
            part = by_group[starts[g] : starts[g + 1]]
            if not n:
                out.append((0, None, None, part))
                continue
            if hist is not None and self.distinct is not None:
                kth = functools.partial(_kth, np.cumsum(hist[g]), self.distinct)
                med, p90 = linear_quantile(kth, n, 0.5), linear_quantile(kth, n, 0.9)
            else:
                med, p90 = (float(x) for x in np.quantile(part, [0.5, 0.9]))
            out.append((n, _round_q(med), _round_q(p90), part))
        return out


_OUTCOMES = ("resolved", "escalated", "unresolved", "unknown")
_TIMINGS = ("first_response_s", "duration_s")


def compute_kpis(cases: pd.DataFrame) -> pd.DataFrame:
    """KPI rows overall, per channel and per issue type (missing issue type = 未分类).

    Every group from arrays converted once and counted per grouping (`_Timing`): the per-group
    form it replaced (kept in tests/test_export_fastpaths.py) gave the same numbers, medians and
    means included, at 0.25 s a night at 1M cases."""
    counts = case_kpis.known(cases)
    kept = (
        case_kpis.kpi_rows(counts, ["all", *[c for c in ("channel", "issue_type") if c in cases]]) if counts else None
    )
    if kept is not None:
        return pd.DataFrame(kept, columns=KPI_COLUMNS)
    n_all = len(cases)
    fr, du = (_Timing(_floats(cases, c), n_all, known_codes(cases[c]) if c in cases else None) for c in _TIMINGS)
    # An Arrow column's shared codes (`codes.filled_codes`, sorted: outcomes are looked up by
    # name); another factorized unsorted, as before.
    outcomes = cases["outcome"] if "outcome" in cases else pd.Series(["unknown"] * n_all)
    if arrow_backed(outcomes):
        oc_codes, oc_names = filled_codes(outcomes, "unknown")
    else:
        oc_codes, found = pd.factorize(outcomes.fillna("unknown"))
        oc_names = np.asarray(found, dtype=object)
    oc_of = {str(k): i for i, k in enumerate(oc_names)}
    n_oc = max(len(oc_names), 1)

    groupings: list[tuple[str, list[str], np.ndarray]] = [("all", ["全部"], np.zeros(n_all, dtype=np.int64))]
    for col in ("channel", "issue_type"):
        if col in cases:
            col_codes, col_keys = filled_codes(cases[col], "未分类" if col == "issue_type" else "未知")
            groupings.append((col, [str(k) for k in col_keys], col_codes))
    # Every grouping's counts of outcomes and timings from one pass over the rows each; a key
    # fillna leaves missing (-1) is in no group, as in a groupby.
    coded = [(codes, len(keys)) for _, keys, codes in groupings]
    by_outcomes = marginal_counts(coded, oc_codes, n_oc)
    fr_hists, du_hists = fr.histograms(coded), du.histograms(coded)
    rows = []
    for (group_by, keys, codes), by_outcome, f_hist, d_hist in zip(groupings, by_outcomes, fr_hists, du_hists):
        sizes = by_outcome.sum(axis=1)
        f_stats = fr.stats(codes, len(keys), False, f_hist)
        d_stats = du.stats(codes, len(keys), True, d_hist)
        for g, key in enumerate(keys):
            n = int(sizes[g])
            count = {k: int(by_outcome[g, oc_of[k]]) if k in oc_of else 0 for k in _OUTCOMES}
            nf, f_med, f_p90, _ = f_stats[g]
            nd, d_med, _, d_values = d_stats[g]
            rows.append(
                {
                    "group_by": group_by,
                    "group": key,
                    "n_cases": n,
                    "n_with_first_response": nf,
                    "first_response_median_s": f_med,
                    "first_response_p90_s": f_p90,
                    "n_with_duration": nd,
                    "duration_median_s": d_med,
                    # The group's values in row order, in a Series: pandas' mean, the same float.
                    "duration_mean_s": round(float(pd.Series(np.array(d_values)).mean()), 1) if nd else None,
                    "resolution_rate": _rate(count["resolved"], n),
                    "escalation_rate": _rate(count["escalated"], n),
                    "unresolved_rate": _rate(count["unresolved"], n),
                    "n_outcome_unknown": count["unknown"],
                }
            )
    return pd.DataFrame(rows, columns=KPI_COLUMNS)


def timing_coverage(kpis: pd.DataFrame) -> str:
    """One sentence for the report: how many cases had timings at all."""
    if kpis.empty:
        return "no cases"
    a = kpis.iloc[0]
    return (
        f"首次响应时间可计算 {a['n_with_first_response']}/{a['n_cases']} 个案例，"
        f"处理时长可计算 {a['n_with_duration']}/{a['n_cases']} 个案例（其余来源无时间戳）。"
    )
