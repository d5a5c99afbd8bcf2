"""What the emotion relations count of the stored cases, kept between nights beside the case copy.

Why: past `emotion_stats.BOOTSTRAP_MAX_N` cases a relation is a correlation and Fisher's interval
around it, and `relations` read every stored case's emotions, outcome and rating each night to
make them (0.1 s at 1M cases) while a night adds a thousand. The correlations of values that
hold a few hundred distinct numbers are sums over the (measure value, outcome, rating) triples'
counts, and counts add: the case copy (`pipeline.storage.case_cache`) only grows at its end
between its whole writes, so the counts of a generation's first rows are kept and a night counts
its new rows alone.

The table shows each correlation rounded to 3 places, and numpy's float sum over 1M cases is not
the one over the counts: the two agree within ~1e-9 (both are sums of well-scaled terms), so each
relation is made from the counts at r - MARGIN and r + MARGIN; when both ends give the same
rounded r, interval and note (each is monotone in r past 5,000 cases), numpy's r gives them too.
Otherwise, or at fewer cases (the bootstrap resamples cases), the relations are computed from
the rows as before.

Layout: `state/cache/case-relations.arrow` (measure, value, outcome class, rating, count), its
metadata naming the copy generation and the rows counted. A cache: an entry of another
generation (but the one whose rows lead this one, `case_cache.accepts`) or counting more rows
than the copy holds is ignored and counted again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.insights.case_kept import Held, counted_generation, fisher_ci, same_float
from pipeline.io import read_cache_table, write_cache_table
from pipeline.storage.case_cache import CopyRows, accepts

_META = b"casemine_case_relations"
_RULE = 1
MEASURES = ("emotion_start", "emotion_end", "emotion_delta")
KNOWN_OUTCOMES = ("resolved", "unresolved", "escalated")
MARGIN = 1e-6  # how far numpy's r may be from the counts' (it is ~1e-9 at 1M cases)
MAX_CELLS = 1 << 16  # more (value, outcome, rating) triples than this: not kept
_COLUMNS = ["measure", "value", "outcome", "rating", "count"]


Triples = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # value, outcome class, rating, count


@dataclass
class Counts:
    """Per measure, its distinct (value, outcome class, rating) triples and their counts. The
    outcome class is 0 (unknown or another), 1 resolved, 2 unresolved or escalated; a missing
    value or rating is NaN; -0.0 is counted as 0.0 (one value to a rank and a sum)."""

    triples: dict[str, Triples]
    rows: int


def outcome_classes(outcome: pd.Series) -> np.ndarray:
    """Each row's outcome class (see `Counts`), from the column's codes (one test a value)."""
    from pipeline.insights.codes import column_codes

    codes, names = column_codes(outcome)
    of = np.array([1 if v == "resolved" else 2 if v in KNOWN_OUTCOMES else 0 for v in names.tolist()] + [0], np.int8)
    return of[np.where(codes < 0, len(names), codes)]


def _numbers(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def count_rows(cases: pd.DataFrame, start: int = 0) -> Counts:
    """The triples of `cases`' rows from `start` on (the table's own columns)."""
    rows = slice(start, len(cases))
    oc = outcome_classes(cases["outcome"].iloc[rows])
    rating = _numbers(cases["csat"].iloc[rows]) + 0.0
    return Counts({m: _triples(_numbers(cases[m].iloc[rows]) + 0.0, oc, rating) for m in MEASURES}, len(cases))


def _triples(value: np.ndarray, oc: np.ndarray, rating: np.ndarray) -> Triples:
    """The distinct (value, class, rating) triples (NaN as one value) and their counts."""
    frame = pd.DataFrame({"v": value, "o": oc, "r": rating})
    got = frame.groupby(["v", "o", "r"], dropna=False, sort=True).size()
    idx = got.index
    return (
        np.asarray(idx.get_level_values(0), dtype=np.float64),
        np.asarray(idx.get_level_values(1), dtype=np.int8),
        np.asarray(idx.get_level_values(2), dtype=np.float64),
        got.to_numpy(dtype=np.int64),
    )


def merge(kept: Counts, new: Counts) -> Counts:
    """Two rows' counts as one."""
    out = {}
    for m in MEASURES:
        a, b = kept.triples[m], new.triples[m]
        frame = pd.DataFrame({k: np.concatenate([x, y]) for k, x, y in zip("vorc", a, b)})
        got = frame.groupby(["v", "o", "r"], dropna=False, sort=True)["c"].sum()
        idx = got.index
        out[m] = (
            np.asarray(idx.get_level_values(0), dtype=np.float64),
            np.asarray(idx.get_level_values(1), dtype=np.int8),
            np.asarray(idx.get_level_values(2), dtype=np.float64),
            got.to_numpy(dtype=np.int64),
        )
    return Counts(out, new.rows)


# -- a relation from the counts ---------------------------------------------------------------


def _mean_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each distinct value's average rank (1-based, ties their mean) among rows counted by
    `weights`: `average_ranks` of the rows, per value."""
    order = np.argsort(values, kind="stable")
    counts = weights[order]
    end = np.cumsum(counts)
    out = np.empty(len(values), dtype=np.float64)
    out[order] = (end - counts + 1 + end) / 2.0
    return out


def _weighted_r(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float | None:
    """Pearson's r of points `x`, `y` counted `w` times; None when either barely varies beside
    its size (numpy's centring of 1M values then need not agree within MARGIN)."""
    n = float(w.sum())
    wf = w.astype(np.float64)
    dx, dy = x - float(np.dot(wf, x)) / n, y - float(np.dot(wf, y)) / n
    sxx, syy = float(np.dot(wf, dx * dx)), float(np.dot(wf, dy * dy))
    if sxx <= 1e-8 * n * float(np.max(x * x)) or syy <= 1e-8 * n * float(np.max(y * y)):
        return None
    return float(np.dot(wf, dx * dy)) / math.sqrt(sxx * syy)


def _grouped(keys: list[np.ndarray], w: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The distinct key tuples (floats, no NaN) and their summed counts."""
    frame = pd.DataFrame({**{f"k{i}": k for i, k in enumerate(keys)}, "w": w})
    got = frame.groupby([f"k{i}" for i in range(len(keys))], sort=True)["w"].sum()
    idx = got.index
    levels = [np.asarray(idx.get_level_values(i), dtype=np.float64) for i in range(len(keys))]
    return levels, got.to_numpy(dtype=np.int64)


def relation(triples: Triples, target: str, min_n: int, max_n: int) -> tuple[int, bool, float | None] | None:
    """(n, whether both sides vary, r from the counts) of one measure against `target`
    ("resolved": Pearson with the resolved flag among known outcomes; "csat": Spearman with the
    rating); None where the rows must decide (at most `max_n` cases: the bootstrap's)."""
    value, oc, rating, count = triples
    has = ~np.isnan(value)
    among = has & (oc > 0) if target == "resolved" else has & ~np.isnan(rating)
    n = int(count[among].sum())
    y_raw = (oc[among] == 1).astype(np.float64) if target == "resolved" else rating[among]
    (x, y), w = _grouped([value[among], y_raw], count[among])
    varies = len(np.unique(x)) > 1 and len(np.unique(y)) > 1
    if n < min_n or not varies:
        return n, varies, None
    if n <= max_n:
        return None
    if target == "csat":
        xs, xi = np.unique(x, return_inverse=True)
        ys, yi = np.unique(y, return_inverse=True)
        x = _mean_ranks(xs, np.bincount(xi.reshape(-1), weights=w, minlength=len(xs)).astype(np.int64))[xi]
        y = _mean_ranks(ys, np.bincount(yi.reshape(-1), weights=w, minlength=len(ys)).astype(np.int64))[yi]
    r = _weighted_r(x, y, w)
    return None if r is None else (n, True, r)


def shown(r: float, n: int, method: str) -> dict[str, Any] | None:
    """The table's r, interval and note for numpy's r, which lies within MARGIN of `r`: the
    same at both ends of that span (each monotone in r past 5,000 cases, and no threshold of
    the note inside), else None."""
    a, b = r - MARGIN, r + MARGIN
    if any(a <= t <= b for t in (-0.5, -0.3, 0.3, 0.5)):
        return None
    ends = []
    for x in (a, b):
        lo, hi = fisher_ci(x, n, method)
        ends.append((round(x, 3), round(lo, 3), round(hi, 3), lo, hi))
    (ra, la, ha, lo_a, hi_a), (rb, lb, hb, lo_b, hi_b) = ends
    if not all(same_float(x, y) for x, y in ((ra, rb), (la, lb), (ha, hb))):
        return None  # a rounding step, or a zero of either sign, within the span
    if lo_b <= 0 <= hi_a:
        note = "no clear relation"
    elif lo_a > 0 or hi_b < 0:
        note = "weak" if abs(r) < 0.3 else "moderate" if abs(r) < 0.5 else "strong"
    else:
        return None  # the interval's sign changes inside the span
    return {"r": ra, "ci_low": la, "ci_high": ha, "note": note}


# -- kept between nights ----------------------------------------------------------------------


def cache_path(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "case-relations.arrow"


def load(out: Path, gen: str, n_rows: int, prefix: CopyRows | None = None) -> Counts | None:
    got = read_cache_table(
        cache_path(out),
        _META,
        _COLUMNS,
        lambda m: m.get("rule") == _RULE and accepts(m.get("gen"), m.get("n"), gen, n_rows, prefix),
    )
    if got is None:
        return None
    t = got[1]
    measure = np.asarray(t["measure"].to_pylist(), dtype=object)
    cols = [t[c].to_numpy() for c in _COLUMNS[1:]]
    triples = {}
    for m in MEASURES:
        at = measure == m
        v, o, r, c = (np.asarray(col[at]) for col in cols)
        triples[m] = (v.astype(np.float64), o.astype(np.int8), r.astype(np.float64), c.astype(np.int64))
    return Counts(triples, int(got[0]["n"]))


def save(out: Path, gen: str, counts: Counts) -> None:
    import pyarrow as pa

    parts = [counts.triples[m] for m in MEASURES]
    table = pa.table(
        {
            "measure": pa.array([m for m, p in zip(MEASURES, parts) for _ in range(len(p[0]))], pa.string()),
            "value": pa.array(np.concatenate([p[0] for p in parts]), pa.float64()),
            "outcome": pa.array(np.concatenate([p[1] for p in parts]), pa.int8()),
            "rating": pa.array(np.concatenate([p[2] for p in parts]), pa.float64()),
            "count": pa.array(np.concatenate([p[3] for p in parts]), pa.int64()),
        }
    )
    write_cache_table(
        cache_path(out),
        table,
        _META,
        {"gen": gen, "rule": _RULE, "n": counts.rows},
        "the case relation counts",
        "the next night counts every case",
    )


_READ = ("outcome", "csat", *MEASURES)
_HELD: Held[Counts] = Held(_READ)  # this export's counts (`remember`), for `known`


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
    if gen is None or not all(c in cases for c in _READ):
        return
    if any(cases[m].dtype != np.float64 for m in (*MEASURES, "csat")):
        return
    # Counts kept through the prefix cover fewer rows than the copy (it was rewritten for new
    # rows), so they are saved again below, under this generation.
    kept = load(out, gen, len(cases), prefix)
    try:
        counts = count_rows(cases) if kept is None else merge(kept, count_rows(cases, kept.rows))
    except (TypeError, ValueError):
        return
    if sum(len(counts.triples[m][0]) for m in MEASURES) > MAX_CELLS:
        return
    if kept is None or kept.rows != counts.rows:
        save(out, gen, counts)
    _HELD.hold(cases, counts, counts.rows)


def known(cases: pd.DataFrame) -> Counts | None:
    """The counts of `cases` when its columns are the ones `remember` counted."""
    return _HELD.find(cases)


def forget() -> None:
    _HELD.clear()
