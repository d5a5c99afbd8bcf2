"""What the KPI table counts of the stored cases, kept between nights beside the case copy.

Why: `kpis.compute_kpis` read every stored case's channel, issue type, outcome and two timings
each night (70 ms at 1M cases) while a night adds a thousand. Its rows are counts per group
(overall, per channel, per issue type): cases, outcomes, each timing's histogram (the medians and
p90 are order statistics of it) and the durations' count and sum. Counts add: the case copy
(`pipeline.storage.case_cache`) only grows at its end between its whole writes, so the counts of
a generation's first rows are kept and a night counts its new rows alone.

The mean duration is shown rounded to 0.1 s, and numpy's pairwise sum of a group's durations is
not the kept one: both are within 2^-53 * n * sum(|d|) of the true sum, so the kept mean is
shown when every mean within that bound rounds to the same value (rounding is monotone), which
numpy's then does too. Otherwise, or where a timing holds -0.0 (which zero a quantile picks is
the rows' to decide) or a group key is not text, the KPIs are computed from the rows as before.

Layout: `state/cache/case-kpis/{groups,hist}.arrow`, their metadata naming the copy generation
and the rows counted. A cache: an entry of another generation (but the one whose rows lead
this one, `case_cache.accepts`) or counting more rows than the copy holds is ignored and counted
again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.insights.case_kept import (
    Held,
    counted_generation,
    linear_quantile,
    rate,
    read_tables,
    round_q,
    rounded_mean,
    write_tables,
)
from pipeline.storage.case_cache import CopyRows

_META = b"casemine_case_kpis"
_RULE = 1
GROUPINGS = (("all", "全部"), ("channel", "未知"), ("issue_type", "未分类"))
OUTCOMES = ("resolved", "escalated", "unresolved", "unknown")
TIMINGS = ("first_response_s", "duration_s")
_GROUP_COLUMNS = ["grouping", "key", "n", *OUTCOMES, "nd", "dsum", "dabs"]
_HIST_COLUMNS = ["grouping", "key", "timing", "value", "count"]


Group = tuple[str, str]  # (grouping, key)


@dataclass
class KpiCounts:
    """Per (grouping, key): cases, the four outcomes' counts, known durations, their sum and sum
    of magnitudes (`groups`, in `_GROUP_COLUMNS[2:]` order); per (grouping, key, timing): each
    value's rows (`hist`); whether a timing holds -0.0; the rows counted. Plain dicts: a night
    adds a few hundred entries, and pandas' frames for them cost more than the counting."""

    groups: dict[Group, list[float]]
    hist: dict[tuple[str, str, str], dict[float, int]]
    negative_zero: bool
    rows: int


def _codes(cases: pd.DataFrame, col: str, fill: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's group code and the groups' keys of a grouping column, filled as `compute_kpis`
    fills it (the column's shared codes); None when the column is not text (its keys' order is
    then pandas' to decide)."""
    from pipeline.insights.codes import arrow_backed, filled_codes

    if col == "all":
        return np.zeros(len(cases), dtype=np.int64), np.array([fill], dtype=object)
    if col not in cases or not arrow_backed(cases[col]):
        return None
    codes, names = filled_codes(cases[col], fill)
    return codes, np.asarray(names, dtype=object)


def count_rows(cases: pd.DataFrame, start: int = 0) -> KpiCounts | None:
    """The counts of `cases`' rows from `start` on; None when a column is not as counted here.
    By integer codes and bincounts: the first night of a copy counts every stored case."""
    part = cases.iloc[start:]
    if "outcome" not in part or not all(t in part and part[t].dtype == np.float64 for t in TIMINGS):
        return None
    oc = _codes(part, "outcome", "unknown")
    if oc is None:
        return None
    of_outcome = np.array([OUTCOMES.index(v) if v in OUTCOMES else len(OUTCOMES) for v in oc[1].tolist()])
    outcome = of_outcome[oc[0]] if len(oc[1]) else np.zeros(len(part), dtype=np.int64)
    times = {t: part[t].to_numpy() for t in TIMINGS}
    coded = {t: pd.factorize(v + 0.0) for t, v in times.items()}  # NaN: -1; -0.0 counted as 0.0
    du = times["duration_s"]
    known_du = ~np.isnan(du)
    groups: dict[Group, list[float]] = {}
    hist: dict[tuple[str, str, str], dict[float, int]] = {}
    for grouping, fill in GROUPINGS:
        if grouping != "all" and grouping not in part:
            continue
        got = _codes(part, grouping, fill)
        if got is None:
            return None
        codes, keys = got
        k = len(keys)
        by_outcome = np.bincount(codes * (len(OUTCOMES) + 1) + outcome, minlength=k * (len(OUTCOMES) + 1))
        by_outcome = by_outcome.reshape(k, len(OUTCOMES) + 1)
        dc = codes[known_du]
        columns = [
            by_outcome.sum(axis=1),
            *(by_outcome[:, i] for i in range(len(OUTCOMES))),
            np.bincount(dc, minlength=k),
            np.bincount(dc, weights=du[known_du], minlength=k),
            np.bincount(dc, weights=np.abs(du[known_du]), minlength=k),
        ]
        for key, *row in zip(keys.tolist(), *(c.tolist() for c in columns)):
            if row[0]:
                groups[(grouping, key)] = row
        for t, (vcodes, values) in coded.items():
            known = vcodes >= 0
            width = max(len(values), 1)
            cells = np.bincount(codes[known] * width + vcodes[known], minlength=k * width)
            found = np.flatnonzero(cells)
            of_value = np.asarray(values, dtype=np.float64)
            for key, value, n in zip(
                keys[found // width].tolist(), of_value[found % width].tolist(), cells[found].tolist()
            ):
                hist.setdefault((grouping, key, t), {})[value] = n
    negative_zero = any(bool((np.signbit(v) & (v == 0)).any()) for v in times.values())
    return KpiCounts(groups, hist, negative_zero, len(cases))


def merge(kept: KpiCounts, new: KpiCounts) -> KpiCounts:
    """Two rows' counts as one (the sums in float: the bound above covers their order)."""
    groups = dict(kept.groups)  # rows are replaced, never written into
    for g, row in new.groups.items():
        had = groups.get(g)
        groups[g] = row if had is None else [a + b for a, b in zip(had, row)]
    hist = {cell: dict(values) for cell, values in kept.hist.items()}
    for cell, values in new.hist.items():
        into = hist.setdefault(cell, {})
        for value, n in values.items():
            into[value] = into.get(value, 0) + n
    return KpiCounts(groups, hist, kept.negative_zero or new.negative_zero, new.rows)


def kpi_rows(counts: KpiCounts, groupings: list[str]) -> list[dict[str, Any]] | None:
    """`compute_kpis`' rows from the counts, for the groupings the cases have; None where a
    row must be made from the cases."""
    if counts.negative_zero:
        return None
    rows = []
    for grouping in groupings:
        for key in sorted(k for g, k in counts.groups if g == grouping):
            n_cases, resolved, escalated, unresolved, unknown, nd, dsum, dabs = counts.groups[(grouping, key)]
            stats = {}
            for t in TIMINGS:
                seen = counts.hist.get((grouping, key, t), {})
                values = np.array(sorted(seen), dtype=np.float64)
                cum = np.cumsum([seen[v] for v in values.tolist()], dtype=np.int64)
                n = int(cum[-1]) if len(cum) else 0

                def kth(i: int, values: np.ndarray = values, cum: np.ndarray = cum) -> float:
                    return float(values[int(np.searchsorted(cum, i, side="right"))])

                med = round_q(linear_quantile(kth, n, 0.5)) if n else None
                p90 = round_q(linear_quantile(kth, n, 0.9)) if n else None
                stats[t] = (n, med, p90)
            nd, n_cases = int(nd), int(n_cases)
            mean = rounded_mean(float(dsum), float(dabs), nd, 1) if nd else None
            if nd and mean is None:
                return None
            rows.append(
                {
                    "group_by": grouping,
                    "group": str(key),
                    "n_cases": n_cases,
                    "n_with_first_response": stats["first_response_s"][0],
                    "first_response_median_s": stats["first_response_s"][1],
                    "first_response_p90_s": stats["first_response_s"][2],
                    "n_with_duration": stats["duration_s"][0],
                    "duration_median_s": stats["duration_s"][1],
                    "duration_mean_s": mean,
                    "resolution_rate": rate(int(resolved), n_cases),
                    "escalation_rate": rate(int(escalated), n_cases),
                    "unresolved_rate": rate(int(unresolved), n_cases),
                    "n_outcome_unknown": int(unknown),
                }
            )
    return rows


# -- kept between nights ----------------------------------------------------------------------


def cache_dir(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "case-kpis"


def load(out: Path, gen: str, n_rows: int, prefix: CopyRows | None = None) -> KpiCounts | None:
    got = read_tables(
        cache_dir(out), {"groups": _GROUP_COLUMNS, "hist": _HIST_COLUMNS}, _META, gen, _RULE, n_rows, prefix
    )
    if got is None:
        return None
    gm, (gt, ht) = got[0], (got[1]["groups"], got[1]["hist"])
    g = [gt[c].to_pylist() for c in _GROUP_COLUMNS]
    groups = {(grouping, key): [*row] for grouping, key, *row in zip(*g)}
    hist: dict[tuple[str, str, str], dict[float, int]] = {}
    for grouping, key, timing, value, n in zip(*(ht[c].to_pylist() for c in _HIST_COLUMNS)):
        hist.setdefault((grouping, key, timing), {})[value] = n
    return KpiCounts(groups, hist, bool(gm["negative_zero"]), int(gm["n"]))


def save(out: Path, gen: str, counts: KpiCounts) -> None:
    import pyarrow as pa

    meta = {"gen": gen, "rule": _RULE, "n": counts.rows, "negative_zero": counts.negative_zero}
    rows = [(*g, *row) for g, row in counts.groups.items()]
    cells = [(*g, value, n) for g, values in counts.hist.items() for value, n in values.items()]
    kinds = {"grouping": pa.string(), "key": pa.string(), "timing": pa.string(), "value": pa.float64()}
    kinds.update({c: pa.int64() for c in ("n", *OUTCOMES, "nd", "count")})
    kinds.update({"dsum": pa.float64(), "dabs": pa.float64()})
    tables = {
        name: pa.table({c: pa.array([r[i] for r in data], kinds[c]) for i, c in enumerate(cols)})
        for name, cols, data in (("groups", _GROUP_COLUMNS, rows), ("hist", _HIST_COLUMNS, cells))
    }
    write_tables(cache_dir(out), tables, _META, meta, "the case KPI counts")


_READ = ("channel", "issue_type", "outcome", *TIMINGS)
_HELD: Held[KpiCounts] = Held(_READ)  # this export's counts (`remember`), for `known`


def remember(
    out: Path,
    cases: pd.DataFrame,
    copy_rows: CopyRows | None,
    min_rows: int | None = None,
    prefix: CopyRows | None = None,
) -> None:
    """The counts of `cases` (the case copy's rows: `load_cases_copy`) from the kept ones and
    the rows after them, kept again and made known to `known` for these columns (`prefix`: the
    copy's `case_cache.copy_prefix`)."""
    forget()
    gen = counted_generation(cases, copy_rows, min_rows)
    if gen is None:
        return
    # Counts kept through the prefix cover fewer rows than the copy (it was rewritten for new
    # rows), so they are saved again below, under this generation.
    kept = load(out, gen, len(cases), prefix)
    new = count_rows(cases, kept.rows if kept is not None else 0)
    if new is None:
        return
    counts = new if kept is None else merge(kept, new) if kept.rows < new.rows else kept
    if kept is None or kept.rows != counts.rows:
        save(out, gen, counts)
    _HELD.hold(cases, counts, counts.rows)


def known(cases: pd.DataFrame) -> KpiCounts | None:
    """The counts of `cases` when its columns are the ones `remember` counted."""
    return _HELD.find(cases)


def forget() -> None:
    _HELD.clear()
