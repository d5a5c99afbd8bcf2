"""What the emotion trajectory table counts of the stored cases per issue type, channel, outcome
and team, kept between nights beside the case copy.

Why: `emotion_stats.trajectory_table` read every stored case's trajectory, emotions and four
grouping columns each night (75 ms at 1M cases) while a night adds a thousand. Its rows per
(dimension, key) are counts of each trajectory and, per emotion column, the known values' count
and mean. Counts add: the case copy (`pipeline.storage.case_cache`) only grows at its end between
its whole writes, so the counts and sums of a generation's first rows are kept and a night counts
its new rows alone. (The cluster dimension follows the membership, not the case rows: it is
still counted from the rows each night.)

A mean is shown rounded to 4 places, and pandas' compensated sum of a group's values is not the
kept float sum: both are within 2^-53 * n * sum(|x|) of the true sum, so the kept mean is shown
when every mean within that bound rounds alike (`case_kept.rounded_mean`); otherwise the table
is made from the rows as before.

Layout: `state/cache/case-trajectories/{counts,sums}.arrow`, their metadata naming the copy
generation and the rows counted. A cache: an entry of another generation (but the one whose
rows lead this one, `case_cache.accepts`) or counting more rows than the copy holds is ignored
and counted again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.insights.case_kept import Held, counted_generation, read_tables, rounded_mean, write_tables
from pipeline.storage.case_cache import CopyRows

_META = b"casemine_case_trajectories"
_RULE = 1
DIMS = ("issue_type", "channel", "outcome", "team")
MEANS = ("emotion_start", "emotion_end", "emotion_delta")
_COUNT_COLUMNS = ["dim", "key", "trajectory", "count"]
_SUM_COLUMNS = ["dim", "key", "column", "nobs", "sum", "abs"]
_TEXT = ("emotion_trajectory", "issue_type", "channel", "outcome", "agent_id")
_READ = (*_TEXT, "metadata_json", *MEANS)
_HELD: Held[TrajectoryCounts] = Held(_READ)  # this export's counts (`remember`), for `known`


@dataclass
class TrajectoryCounts:
    """Per (dimension, key): each trajectory's rows (`counts`); per (dimension, key, emotion
    column): the trajectory rows' known values' count, sum and sum of magnitudes (`sums`); the
    rows counted. Plain dicts: a night adds a few hundred entries, and pandas' frames for them
    cost more than the counting."""

    counts: dict[tuple[str, str], dict[str, int]]
    sums: dict[tuple[str, str, str], list[float]]
    rows: int


TeamCodes = Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]  # `emotion_stats.case_team_codes`


def _dim_codes(part: pd.DataFrame, dim: str, team_codes: TeamCodes) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's key code (-1: none) and the keys (text) of a dimension, as the table finds them."""
    from pipeline.insights.codes import arrow_backed, sorted_codes

    if dim == "team":
        codes, keys = team_codes(part)
    elif dim in part and arrow_backed(part[dim]):
        codes, keys = sorted_codes(part[dim])
    else:
        return None
    keys = np.asarray(keys, dtype=object)
    return (codes, keys) if all(isinstance(k, str) for k in keys.tolist()) else None


def count_rows(cases: pd.DataFrame, team_codes: TeamCodes, start: int = 0) -> TrajectoryCounts | None:
    """The counts of `cases`' rows from `start` on; None when a column is not as counted here
    (not Arrow text, emotions not float64, a dimension missing)."""
    from pipeline.insights.codes import arrow_backed, sorted_codes

    part = cases.iloc[start:]
    if not all(c in part for c in (*_TEXT, *MEANS)) or not arrow_backed(part["emotion_trajectory"]):
        return None
    if any(part[c].dtype != np.float64 for c in MEANS):
        return None
    tcodes, tnames = sorted_codes(part["emotion_trajectory"])
    has = tcodes >= 0
    values = {c: part[c].to_numpy()[has] for c in MEANS}
    counts: dict[tuple[str, str], dict[str, int]] = {}
    sums: dict[tuple[str, str, str], list[float]] = {}
    names = np.asarray(tnames, dtype=object)
    for dim in DIMS:
        got = _dim_codes(part, dim, team_codes)
        if got is None:
            return None
        codes, keys = got[0][has], got[1]
        k, t = len(keys), max(len(tnames), 1)
        keyed = codes >= 0
        cells = np.bincount(codes[keyed] * t + tcodes[has][keyed], minlength=k * t)
        found = np.flatnonzero(cells)
        for key, traj, n in zip(keys[found // t].tolist(), names[found % t].tolist(), cells[found].tolist()):
            counts.setdefault((dim, key), {})[traj] = n
        for c, v in values.items():
            ok = keyed & ~np.isnan(v)
            nobs = np.bincount(codes[ok], minlength=k)
            at = np.flatnonzero(nobs)
            total = np.bincount(codes[ok], weights=v[ok], minlength=k)[at]
            magnitude = np.bincount(codes[ok], weights=np.abs(v[ok]), minlength=k)[at]
            for key, *row in zip(keys[at].tolist(), nobs[at].tolist(), total.tolist(), magnitude.tolist()):
                sums[(dim, key, c)] = row
    return TrajectoryCounts(counts, sums, len(cases))


def merge(kept: TrajectoryCounts, new: TrajectoryCounts) -> TrajectoryCounts:
    """Two rows' counts as one (the sums in float: the bound above covers their order)."""
    counts = {group: dict(trajs) for group, trajs in kept.counts.items()}
    for group, trajs in new.counts.items():
        into = counts.setdefault(group, {})
        for traj, n in trajs.items():
            into[traj] = into.get(traj, 0) + n
    sums = dict(kept.sums)  # rows are replaced, never written into
    for cell, row in new.sums.items():
        had = sums.get(cell)
        sums[cell] = row if had is None else [a + b for a, b in zip(had, row)]
    return TrajectoryCounts(counts, sums, new.rows)


def parts(counts: TrajectoryCounts, trajectories: tuple[str, ...]) -> dict[str, pd.DataFrame] | None:
    """The table's part of each kept dimension (its keys sorted, as the table's codes sort them),
    or None where a mean must be made from the rows. In Python over the few hundred kept rows:
    a pivot per dimension cost 30 ms."""
    by_traj, sums = counts.counts, counts.sums
    out = {}
    for dim in DIMS:
        keys = sorted(key for d, key in by_traj if d == dim)
        if not keys:
            continue
        n = np.array([sum(by_traj[(dim, k)].values()) for k in keys], dtype=np.int64)
        means: dict[str, list[float | None]] = {}
        for col in MEANS:
            vals: list[float | None] = []
            for key in keys:
                nobs, total, magnitude = sums.get((dim, key, col), (0, 0.0, 0.0))
                got = rounded_mean(float(total), float(magnitude), int(nobs), 4) if nobs else None
                if nobs and got is None:
                    return None
                vals.append(got)
            means[col] = vals
        zeros = np.zeros(len(n))
        shares = {}
        for t in trajectories:
            seen = any(t in by_traj[(dim, k)] for k in keys)
            at = np.array([by_traj[(dim, k)].get(t, 0) for k in keys], dtype=np.int64) if seen else zeros
            shares[f"share_{t}"] = [round(float(x / m), 4) for x, m in zip(at, n)]
        out[dim] = pd.DataFrame(
            {
                "dimension": dim,
                "key": keys,
                "n": n,
                **shares,
                **{f"mean_{c.split('_')[1]}": np.array(means[c], dtype=float) for c in MEANS},
            }
        )
    return out


# -- kept between nights ----------------------------------------------------------------------


def cache_dir(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "case-trajectories"


def load(out: Path, gen: str, n_rows: int, prefix: CopyRows | None = None) -> TrajectoryCounts | None:
    got = read_tables(
        cache_dir(out), {"counts": _COUNT_COLUMNS, "sums": _SUM_COLUMNS}, _META, gen, _RULE, n_rows, prefix
    )
    if got is None:
        return None
    cm, (ct, st) = got[0], (got[1]["counts"], got[1]["sums"])
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for dim, key, traj, n in zip(*(ct[c].to_pylist() for c in _COUNT_COLUMNS)):
        counts.setdefault((dim, key), {})[traj] = n
    sums = {(dim, key, col): row for dim, key, col, *row in zip(*(st[c].to_pylist() for c in _SUM_COLUMNS))}
    return TrajectoryCounts(counts, sums, int(cm["n"]))


def save(out: Path, gen: str, counts: TrajectoryCounts) -> None:
    import pyarrow as pa

    meta = {"gen": gen, "rule": _RULE, "n": counts.rows}
    cells = [(*group, traj, n) for group, trajs in counts.counts.items() for traj, n in trajs.items()]
    rows = [(*cell, *row) for cell, row in counts.sums.items()]
    kinds = {c: pa.string() for c in ("dim", "key", "trajectory", "column")}
    kinds.update({"count": pa.int64(), "nobs": pa.int64(), "sum": pa.float64(), "abs": pa.float64()})
    tables = {
        name: pa.table({c: pa.array([r[i] for r in data], kinds[c]) for i, c in enumerate(cols)})
        for name, cols, data in (("counts", _COUNT_COLUMNS, cells), ("sums", _SUM_COLUMNS, rows))
    }
    write_tables(cache_dir(out), tables, _META, meta, "the case trajectory counts")


def remember(
    out: Path,
    cases: pd.DataFrame,
    copy_rows: CopyRows | None,
    team_codes: TeamCodes,
    min_rows: int | None = None,
    prefix: CopyRows | None = None,
) -> None:
    """The counts of `cases` (the case copy's rows: `load_cases_copy`) from the kept ones and
    the rows after them, kept again and made known to `known` for these columns. `team_codes`:
    the table's teams of rows (`emotion_stats.case_team_codes`), passed in: the table imports
    this module. `prefix`: the copy's `case_cache.copy_prefix`."""
    forget()
    gen = counted_generation(cases, copy_rows, min_rows)
    if gen is None:
        return
    # Counts kept through the prefix cover fewer rows than the copy (it was rewritten for new
    # rows), so they are saved again below, under this generation.
    kept = load(out, gen, len(cases), prefix)
    new = count_rows(cases, team_codes, kept.rows if kept is not None else 0)
    if new is None:
        return
    counts = new if kept is None else merge(kept, new) if kept.rows < new.rows else kept
    if kept is None or kept.rows != counts.rows:
        save(out, gen, counts)
    _HELD.hold(cases, counts, counts.rows)


def known(cases: pd.DataFrame) -> TrajectoryCounts | None:
    """The counts of `cases` when its columns are the ones `remember` counted."""
    return _HELD.find(cases)


def forget() -> None:
    _HELD.clear()
