"""Service KPIs per channel and per issue type: response time, handling time, resolution, escalation.

Why the counts next to every timing: some sources (JDDC, chats exported without timestamps) have
no times, so a median over 12 of 500 cases must say so; a KPI without its base is misleading.
Rates are over all cases of the group; `n_outcome_unknown` shows how many could not be judged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

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


def group_kpis(g: pd.DataFrame) -> dict[str, Any]:
    """The KPI row of one group of cases."""
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


def compute_kpis(cases: pd.DataFrame) -> pd.DataFrame:
    """KPI rows overall, per channel and per issue type (missing issue type = 未分类)."""
    rows = [{"group_by": "all", "group": "全部", **group_kpis(cases)}]
    # Only the columns a KPI reads: a group is a copy of its rows, and the cases' text columns
    # made the groups of 100k stored cases cost most of a second.
    used = cases[[c for c in ("first_response_s", "duration_s", "outcome") if c in cases]]
    for col in ("channel", "issue_type"):
        if col not in cases:
            continue
        keys = cases[col].fillna("未分类" if col == "issue_type" else "未知")
        for k, g in used.groupby(keys, sort=True):
            rows.append({"group_by": col, "group": str(k), **group_kpis(g)})
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
