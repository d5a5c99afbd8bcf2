"""Service KPIs per channel and per issue type: response time, handling time, resolution, escalation.

Why the counts next to every timing: some sources (JDDC, chats exported without timestamps) have
no times, so a median over 12 of 500 cases must say so; a KPI without its base is misleading.
Rates are over all cases of the group; `n_outcome_unknown` shows how many could not be judged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.insights.cluster import group_rows
from pipeline.insights.codes import arrow_backed, filled_codes

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


def _timing(values: np.ndarray | None, idx: np.ndarray) -> pd.Series:
    """One group's known values of a timing, in row order (a Series: its mean is pandas')."""
    if values is None:
        return pd.Series(dtype=float)
    v = values[idx]
    return pd.Series(v[~np.isnan(v)])


def compute_kpis(cases: pd.DataFrame) -> pd.DataFrame:
    """KPI rows overall, per channel and per issue type (missing issue type = 未分类).

    Every group from arrays converted once, its rows taken by position: a groupby's groups are
    copies, each converted and compared on its own (50 ms a night at 100k cases). The same
    values in the same order reach the same numpy and pandas calls as in the per-group form it
    replaced (kept in tests/test_export_fastpaths.py), so medians, means and rates are the same
    floats."""
    n_all = len(cases)
    fr, du = _floats(cases, "first_response_s"), _floats(cases, "duration_s")
    # An Arrow column's shared codes (`codes.filled_codes`, sorted: outcomes are looked up by
    # name); another factorized unsorted, as before.
    outcomes = cases["outcome"] if "outcome" in cases else pd.Series(["unknown"] * n_all)
    if arrow_backed(outcomes):
        oc_codes, oc_names = filled_codes(outcomes, "unknown")
    else:
        oc_codes, found = pd.factorize(outcomes.fillna("unknown"))
        oc_names = np.asarray(found, dtype=object)
    oc_of = {str(k): i for i, k in enumerate(oc_names)}

    def kpis(idx: np.ndarray) -> dict[str, Any]:
        n = len(idx)
        f, d = _timing(fr, idx), _timing(du, idx)
        counts = np.bincount(oc_codes[idx], minlength=len(oc_names))

        def count(k: str) -> int:
            return int(counts[oc_of[k]]) if k in oc_of else 0

        rate = lambda k: round(count(k) / n, 4) if n else None  # noqa: E731
        return {
            "n_cases": n,
            "n_with_first_response": int(len(f)),
            "first_response_median_s": _q(f, 0.5),
            "first_response_p90_s": _q(f, 0.9),
            "n_with_duration": int(len(d)),
            "duration_median_s": _q(d, 0.5),
            "duration_mean_s": round(float(d.mean()), 1) if len(d) else None,
            "resolution_rate": rate("resolved"),
            "escalation_rate": rate("escalated"),
            "unresolved_rate": rate("unresolved"),
            "n_outcome_unknown": count("unknown"),
        }

    rows = [{"group_by": "all", "group": "全部", **kpis(np.arange(n_all))}]
    for col in ("channel", "issue_type"):
        if col not in cases:
            continue
        codes, keys = filled_codes(cases[col], "未分类" if col == "issue_type" else "未知")
        # Each group's rows in row order, as a groupby's (a key fillna leaves missing: in no group).
        for k, idx in zip(keys, group_rows(codes, len(keys))):
            rows.append({"group_by": col, "group": str(k), **kpis(idx)})
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
