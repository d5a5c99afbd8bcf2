"""How customer emotion moves, by issue type, cluster, channel, outcome and team, and how strongly
start and end emotion relate to resolution and satisfaction.

Relations come with bootstrap confidence intervals, not just a chart: with a few hundred cases a
correlation of 0.15 can be noise, and an analyst needs to see that. Shares of 恶化 per team carry
Wilson intervals for the same reason (a team with 3 conversations is not "the worst team").
"""

from __future__ import annotations

import importlib
import json
import math
import re
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.analysis.emotion import TRAJECTORIES
from pipeline.insights import case_relations, case_trajectories
from pipeline.insights.case_kept import fisher_ci
from pipeline.insights.cluster import ALL_SCOPE, arrow_text
from pipeline.insights.codes import Codes, arrow_backed, column_codes, cross_counts, sorted_codes, taken_codes

_TEAM_KEYS = ("team", "agent_team", "group", "skill_group")


# Metadata without one of these substrings names no team (the export drops it unread).
TEAM_KEY_PATTERN = "|".join(map(re.escape, _TEAM_KEYS))
_TEAM_KEY_RE = re.compile(TEAM_KEY_PATTERN)


def _team(meta_json: Any, agent_id: Any) -> str | None:
    # Parse only metadata that can name a team: most has none, and this runs per stored case.
    if isinstance(meta_json, str) and _TEAM_KEY_RE.search(meta_json):
        try:
            meta = json.loads(meta_json)
        except ValueError:
            meta = {}
        for key in _TEAM_KEYS:
            if meta.get(key):
                return str(meta[key])
    return str(agent_id) if agent_id is not None and agent_id == agent_id else None


def case_teams(cases: pd.DataFrame) -> list[str | None]:
    """Each case's team (metadata's team keys, else its agent). Columns are read as lists: iterating
    an Arrow-backed column cell by cell costs ~1 us a cell, seconds a night at 100k cases. With
    no metadata, the agents' distinct names from their shared codes (`_agents_only`): one Python
    string per agent, not per case (converting 1M cells cost 45 ms a night)."""
    agents = _agents_only(cases)
    if agents is not None:
        codes, names = sorted_codes(agents)
        return np.array([*names.tolist(), None], dtype=object)[np.where(codes < 0, len(names), codes)].tolist()
    n = len(cases)
    fast = _arrow_text(cases, "metadata_json"), _arrow_text(cases, "agent_id")
    if fast[0] is not None and fast[1] is not None:
        return _teams_from_arrow(*fast)
    metas = cases["metadata_json"].tolist() if "metadata_json" in cases else [None] * n
    agents_list = cases["agent_id"].tolist() if "agent_id" in cases else [None] * n
    return [_team(m, a) for m, a in zip(metas, agents_list)]


def _agents_only(cases: pd.DataFrame) -> pd.Series | None:
    """The agent column when it names every case's team: Arrow text (its values are str or
    missing, each its own team) and no stored metadata, which is null wherever it names no team
    (the export's shrink), as on most nights. Else None."""
    if "agent_id" not in cases or arrow_text(cases["agent_id"]) is None:
        return None
    if "metadata_json" in cases and not bool(cases["metadata_json"].isna().all()):
        return None
    return cases["agent_id"]


def case_team_codes(cases: pd.DataFrame, teams: list[str | None] | None = None) -> Codes:
    """`pd.factorize(case_teams(cases), sort=True)` as int64 codes (-1: no team) and the teams;
    `teams`: `case_teams(cases)` when the caller has it already. With no metadata the agents'
    shared codes (`codes.sorted_codes`): no list of 1M Python strings hashed again (0.1 s a night
    at 1M cases)."""
    agents = _agents_only(cases)
    if agents is not None:
        return sorted_codes(agents)
    codes, names = pd.factorize(pd.Series(case_teams(cases) if teams is None else teams, dtype=object), sort=True)
    return codes.astype(np.int64, copy=False), np.asarray(names, dtype=object)


def _arrow_text(cases: pd.DataFrame, col: str) -> pa.Array | None:
    """`arrow_text` of a column as one Arrow array; a missing column as nulls."""
    if col not in cases:
        return pa.nulls(len(cases), pa.string())
    arr = arrow_text(cases[col])
    return None if arr is None else arr.combine_chunks()


def _teams_from_arrow(metas: pa.Array, agents: pa.Array) -> list[str | None]:
    """`_team` of each row, calling it only where there is metadata: the stored metadata is
    null wherever it names no team (the export's shrink), so most rows are their agent."""
    teams = agents.to_pylist()
    rows = np.flatnonzero(metas.is_valid().to_numpy(zero_copy_only=False))
    for i, m in zip(rows.tolist(), metas.take(pa.array(rows)).to_pylist()):
        teams[i] = _team(m, teams[i])
    return teams


def _unique_positions(ids: pd.Series, among: pd.Series) -> np.ndarray | None:
    """Each of `ids`' position in `among` (-1: not there), by Arrow's hash look-up; None when a
    merge must decide: ids not all text (a merge matches missing ids with missing ones) or an id
    repeated in `among` (a merge repeats its case)."""
    a, b = arrow_text(ids), arrow_text(among)
    if a is None or b is None or a.null_count or b.null_count:
        return None
    a, b = a.cast(pa.large_string()).combine_chunks(), b.cast(pa.large_string()).combine_chunks()
    if len(pc.unique(b)) != len(b):
        return None
    found = pc.index_in(a, value_set=b)
    return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _known_positions(ids: pd.Series, column: pd.Series, rows: np.ndarray, at: np.ndarray) -> np.ndarray | None:
    """`_unique_positions(ids, column.take(rows))` where those are known to be `ids`' values at
    rows `at` and `ids` to hold each id once: each row's position from `at`, no id hashed
    (hashing every case id against the members' cost 0.43 s a night at 1M cases) and none taken.
    None where `_unique_positions` is: ids not all text, or a row twice in `at` (an id repeated)."""
    a, b = arrow_text(ids), arrow_text(column)
    if a is None or b is None or a.null_count or (len(at) and int(at.min()) < 0):
        return None
    if b.null_count and bool(np.asarray(b.is_null().to_numpy(zero_copy_only=False), dtype=bool)[rows].any()):
        return None
    pos = np.full(len(ids), -1, dtype=np.int64)
    pos[at] = np.arange(len(at))
    # A repeated row keeps its last position: its earlier ones then read another.
    return pos if bool((pos[at] == np.arange(len(at))).all()) else None


def trajectory_table(
    cases: pd.DataFrame,
    members: pd.DataFrame | None = None,
    teams: list[str | None] | None = None,
    cluster_codes: Codes | None = None,
    case_rows: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per dimension value: cases, shares of 改善/平稳/恶化, mean start, end and delta. `teams`:
    `case_teams(cases)` when the caller has it already; `cluster_codes`: the members' cluster
    ids' `sorted_codes`, when the caller has them; `case_rows`: each members row's row in
    `cases` (its case, by id), when the caller knows them and `cases` holds each id once."""
    if not len(cases) or "emotion_trajectory" not in cases:
        return pd.DataFrame(
            columns=[
                "dimension",
                "key",
                "n",
                *[f"share_{t}" for t in TRAJECTORIES],
                "mean_start",
                "mean_end",
                "mean_delta",
            ]
        )
    # The issue type, channel, outcome and team parts from the counts kept between nights
    # (`case_trajectories`), when these are the counted columns; the clusters' from the rows.
    counted = case_trajectories.known(cases)
    kept = case_trajectories.parts(counted, TRAJECTORIES) if counted is not None else None
    if kept is not None and (members is None or not len(members) or "scope" not in members):
        return _sorted_parts(list(kept.values()))  # no cluster dimension to count from the rows
    used = ["case_id", "issue_type", "channel", "outcome", "emotion_trajectory", "emotion_start", "emotion_end"]
    # Groups copy only these; shallow (copy-on-write), as `team` is added, not written into a column.
    df = cases[[c for c in [*used, "emotion_delta"] if c in cases]].copy(deep=False)
    team_of = case_teams(cases) if teams is None else teams
    case_clusters = None  # each case's cluster as a code of `cluster_codes` (-1: none), when given
    if members is not None and len(members) and "scope" in members:
        # Columns chosen in the filter: filtering first copied every members column.
        # The cross-type scope's clustered rows by position, two columns taken: a filter of the
        # members frame, then a merge's hash join on 100k string keys, cost 40 ms a night.
        rows = np.flatnonzero(_cross_clustered(members, cluster_codes))
        # The rows' ids and cluster ids are taken only where a merge or the ids themselves are
        # read: with the cluster codes and each row's case known, neither is. As Python strings
        # they were the emotion table's largest step at a re-cluster (0.3 MiB per 1,000 cases).
        if case_rows is not None and len(case_rows) == len(members):
            pos = _known_positions(df["case_id"], members["case_id"], rows, np.asarray(case_rows, dtype=np.int64)[rows])
        else:
            pos = _unique_positions(df["case_id"], members["case_id"].take(rows))
        if pos is None:
            kept = None  # the merge repeats a case: not the counted rows
            df["team"] = team_of  # the merge repeats a case with its team
            ids, cids = members["case_id"].take(rows), members["cluster_id"].to_numpy(dtype=object)[rows]
            df = df.merge(pd.DataFrame({"case_id": ids.to_numpy(), "cluster_id": cids}), on="case_id", how="left")
        elif cluster_codes is not None:
            # The merge's result when each case has at most one cluster, as codes: the cases in
            # their order, each with its cluster's code or none (-1). No column of ids is built
            # and hashed again below.
            df = df.reset_index(drop=True)
            of_rows = cluster_codes[0][rows]
            case_clusters = np.where(pos >= 0, of_rows[np.maximum(pos, 0)] if len(rows) else -1, -1)
        else:
            # The merge's result when each case has at most one cluster: the cases in their order
            # (a new index, as a merge's), each with its cluster or none.
            df = df.reset_index(drop=True)
            cids = members["cluster_id"].to_numpy(dtype=object)[rows]
            df["cluster_id"] = np.where(pos >= 0, cids[np.maximum(pos, 0)], np.nan) if len(cids) else np.nan
    # Every group of a dimension counted at once: a groupby iterated group by group (a value_counts
    # and three means per group, ~170 groups) cost 0.2 s of a night's export at 100k cases.
    means = ["emotion_start", "emotion_end", "emotion_delta"]
    # The cases with a trajectory, as positions: only the three means are copied; a filter of
    # `df` copied its text columns too, and the codes of those are the columns' shared ones
    # (`codes.sorted_codes`) taken at these rows, not the filtered copies hashed again.
    traj = df["emotion_trajectory"]  # any numbering serves: unsorted unless shared, as before
    # Arrow text is missing exactly where its shared codes are -1: no notna pass over the text.
    traj_rows = np.flatnonzero(sorted_codes(traj)[0] >= 0 if arrow_backed(traj) else traj.notna().to_numpy())
    stacked = _stacked(df, means, traj_rows)
    values = df[means].iloc[traj_rows] if stacked is None else None
    # Each dimension's values as sorted codes, once: sizes and trajectory counts are bincounts of
    # them, the means a groupby on the codes (the same rows in the same order per group as on
    # the values, so the same sums); three groupbys on text columns per dimension cost most of
    # the table's 0.1 s at 100k cases.
    traj_codes, trajs = _codes_at(traj, traj_rows) if arrow_backed(traj) else pd.factorize(traj.iloc[traj_rows])
    traj_of = {t: i for i, t in enumerate(trajs)}
    parts = []
    for dim in ("issue_type", "cluster_id", "channel", "outcome", "team"):
        if kept is not None and dim in case_trajectories.DIMS:
            if dim in kept:
                parts.append(kept[dim])
            continue
        # -1: missing, in no group. Teams and clusters from the arrays beside `df` when they are
        # not its columns: a column of 100k Python strings was converted to Arrow text (6 ms).
        if dim == "cluster_id" and case_clusters is not None and cluster_codes is not None:
            codes, keys = taken_codes(case_clusters, cluster_codes[1], traj_rows)
        elif dim == "team" and dim not in df:
            # The teams' sorted codes at these rows (without metadata the agents' shared codes,
            # hashed once for `case_teams`): a list of every case's team was factorized again
            # (50 ms at 1M cases).
            codes, keys = taken_codes(*case_team_codes(cases, team_of), traj_rows)
        elif dim in df:
            codes, keys = _codes_at(df[dim], traj_rows)
        else:
            continue
        if not len(keys):
            continue
        # Every trajectory row has a trajectory code: a group's size is its row of counts' sum.
        counts = cross_counts(codes, len(keys), traj_codes, len(trajs))
        n = counts.sum(axis=1)
        if stacked is not None:
            avg = dict(zip(means, _group_means(stacked, codes, len(keys)).T))
        else:
            assert values is not None
            by = values.groupby(pd.Series(codes, index=values.index).where(codes >= 0), sort=True).mean()
            avg = {c: by[c].to_numpy() for c in means}
        part = pd.DataFrame(
            {
                "dimension": dim,
                "key": [str(k) for k in keys],
                "n": n.astype(np.int64),
                **{
                    f"share_{t}": [
                        round(float(c / m), 4)
                        for c, m in zip(counts[:, traj_of[t]] if t in traj_of else np.zeros(len(n)), n)
                    ]
                    for t in TRAJECTORIES
                },
                **{f"mean_{c.split('_')[1]}": np.array([_r(v) for v in avg[c].tolist()], dtype=float) for c in means},
            }
        )
        parts.append(part)
    return _sorted_parts(parts)


def _sorted_parts(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The dimensions' parts as one table, by dimension, then by size (largest first)."""
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return (
        out.sort_values(["dimension", "n"], ascending=[True, False], kind="stable").reset_index(drop=True)
        if len(out)
        else out
    )


def _cross_clustered(members: pd.DataFrame, cluster_codes: Codes | None) -> np.ndarray:
    """Which members rows are the cross-type scope's and have a cluster. From the scopes' and
    cluster ids' codes where they are known (-1: missing, as notna tells): comparing and testing
    1M object cells each cost 20 ms a night at 1M cases."""
    scope = members["scope"]
    if arrow_backed(scope):
        scope_codes, scopes = sorted_codes(scope)
        cross = np.asarray(scopes == ALL_SCOPE, dtype=bool)[scope_codes] & (scope_codes >= 0)
    else:
        cross = np.asarray(scope == ALL_SCOPE, dtype=bool)
    if cluster_codes is not None and len(cluster_codes[0]) == len(members):
        return cross & (np.asarray(cluster_codes[0]) >= 0)
    return cross & members["cluster_id"].notna().to_numpy()


def _stacked(df: pd.DataFrame, means: list[str], rows: np.ndarray) -> np.ndarray | None:
    """The `means` columns at `rows` as one (rows x columns) float64 array for `_group_means`,
    or None where a column is not plain float64 (its groupby mean is pandas' to decide)."""
    if _GROUP_MEAN is None or not all(c in df and df[c].dtype == np.float64 for c in means):
        return None
    out = np.empty((len(rows), len(means)), dtype=np.float64, order="F")
    for j, c in enumerate(means):
        np.take(df[c].to_numpy(), rows, out=out[:, j])
    return out


def _kernel(module: str, name: str) -> Any:
    """A pandas kernel by name, or None (another pandas: the public call it backs is used)."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:  # pragma: no cover
        return None


# pandas' own per-group mean kernel, the one `DataFrameGroupBy.mean` runs on float64 columns.
_GROUP_MEAN = _kernel("pandas._libs.groupby", "group_mean")


def _group_means(values: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """`DataFrame(values).groupby(codes).mean()` (codes -1: in no group; every group present)
    as an (n_groups x columns) array: the kernel the groupby calls (a Kahan-compensated sum of
    each group's values in row order, over their count), without the groupby's factorizing of
    the codes and its frames, most of the trajectory table's time (80 ms a night at 1M cases).
    A compensated sum depends on every value before it, so no kept state can resume it: the
    sums are made again over all rows, once per dimension."""
    out = np.zeros((n_groups, values.shape[1]), dtype=np.float64)
    assert _GROUP_MEAN is not None
    _GROUP_MEAN(out, np.zeros(n_groups, dtype=np.int64), values, codes.astype(np.intp, copy=False))
    return out


def _codes_at(values: pd.Series, rows: np.ndarray) -> tuple[np.ndarray, Any]:
    """`pd.factorize(values.iloc[rows], sort=True)`: from the column's shared codes when it is
    Arrow text, else factorized here."""
    if arrow_backed(values):
        return taken_codes(*sorted_codes(values), rows)
    return pd.factorize(values.iloc[rows], sort=True)


def _r(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


# Above this many cases the interval is Fisher's, not the bootstrap's: a bootstrap resamples an
# (n_boot x n) matrix, 35 s and GBs at 100k stored cases on every night's export, while the two
# intervals agree within 0.003 from 2,000 cases on (point-biserial and Spearman, tests/test_emotion.py).
BOOTSTRAP_MAX_N = 5_000


def average_ranks(values: np.ndarray) -> np.ndarray:
    """`pd.Series(values).rank()` (ties share their mean rank, 1-based), from the distinct values:
    pandas' rank sorts every value (35 ms per column of 1M cases, six a night), while stored
    emotions and ratings hold a few hundred distinct ones. NaN and non-float input keep pandas'
    rule (NaN ranks are NaN)."""
    v = np.asarray(values)
    if v.dtype != np.float64 or not len(v) or np.isnan(v).any():
        return pd.Series(v).rank().to_numpy()
    # The hash table holds -0.0 and 0.0 as one value, as pandas' rank ties them.
    codes, distinct = pd.factorize(v)
    order = np.argsort(distinct, kind="stable")
    counts = np.bincount(codes, minlength=len(distinct))[order]
    # Each value's tie run covers ranks first+1 .. end in sorted order; their mean (first+1+end)/2
    # is exact in floats, as pandas' sum of the run's ranks over its length is.
    end = np.cumsum(counts)
    mean_rank = np.empty(len(distinct), dtype=np.float64)
    mean_rank[order] = (end - counts + 1 + end) / 2.0
    return mean_rank[codes]


def bootstrap_corr(
    x: np.ndarray,
    y: np.ndarray,
    method: str = "pearson",
    n_boot: int = 1000,
    seed: int = 0,
    max_n: int = BOOTSTRAP_MAX_N,
    ranked: bool = False,
) -> tuple[float, float, float]:
    """(r, 95% CI low, high) by resampling cases (Fisher's interval past `max_n` cases, where the
    two agree and the bootstrap's cost grows with the history); Spearman works on ranks (`ranked`:
    x and y are `average_ranks` already)."""
    if method == "spearman" and not ranked:
        x, y = average_ranks(x), average_ranks(y)
    r = float(np.corrcoef(x, y)[0, 1])
    if len(x) > max_n:
        lo, hi = fisher_ci(r, len(x), method)
        return r, lo, hi
    rng = np.random.default_rng(seed)
    parts = []
    # 100 resamples at a time: the same draws as one (n_boot x n) matrix, a tenth of its memory.
    for k in range(0, n_boot, 100):
        idx = rng.integers(0, len(x), size=(min(100, n_boot - k), len(x)))
        xs, ys = x[idx], y[idx]
        xs = xs - xs.mean(axis=1, keepdims=True)
        ys = ys - ys.mean(axis=1, keepdims=True)
        denom = np.sqrt((xs**2).sum(axis=1) * (ys**2).sum(axis=1))
        parts.append(np.divide((xs * ys).sum(axis=1), denom, out=np.full(len(idx), np.nan), where=denom > 0))
    lo, hi = np.nanpercentile(np.concatenate(parts), [2.5, 97.5])
    return r, float(lo), float(hi)


def _varies(values: np.ndarray) -> bool:
    """Whether known values (no NaN) hold two distinct ones, as nunique() >= 2 tells (0.0 and
    -0.0 are one value to both), without hashing 100k of them."""
    return bool(len(values)) and bool((values != values[0]).any())


def _numbers(cases: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    """`pd.to_numeric(cases[col], errors="coerce")` as floats and where it is known (notna)."""
    x = pd.to_numeric(cases[col], errors="coerce")
    known = x.notna().to_numpy()
    return x.to_numpy(dtype=np.float64, na_value=np.nan), known


_KNOWN_OUTCOMES = ("resolved", "unresolved", "escalated")


def relations(cases: pd.DataFrame, min_n: int = 20) -> pd.DataFrame:
    """Correlation of emotion start/end with resolution (point-biserial) and with csat (Spearman),
    with bootstrap 95% intervals (Fisher's past BOOTSTRAP_MAX_N cases); rows with fewer than
    `min_n` usable cases say so instead.

    On float arrays and row masks: each measure's usable values are its rows known in both, in
    row order, as the filtered frames gave them; filtering and converting the frames for each
    target cost 60 ms a night at 1M cases."""
    cols = ["measure", "outcome_measure", "method", "n", "r", "ci_low", "ci_high", "note"]
    if not len(cases) or "emotion_start" not in cases:
        return pd.DataFrame(columns=cols)
    counts = case_relations.known(cases)
    kept = _relations_from_counts(counts, min_n, "csat" in cases) if counts is not None else None
    if kept is not None:
        return pd.DataFrame(kept, columns=cols)
    rows: list[dict[str, Any]] = []
    # The outcome's codes (shared for an Arrow column), looked up per distinct value: an isin of
    # every stored case's text.
    codes, names = column_codes(cases["outcome"])
    known_code = np.array([isinstance(v, str) and v in _KNOWN_OUTCOMES for v in names.tolist()], dtype=bool)
    resolved_code = np.array([isinstance(v, str) and v == "resolved" for v in names.tolist()], dtype=bool)
    known = (codes >= 0) & known_code[np.maximum(codes, 0)] if len(names) else np.zeros(len(codes), dtype=bool)
    resolved = (codes >= 0) & resolved_code[np.maximum(codes, 0)] if len(names) else known
    targets = [("resolved", "pearson", known, resolved.astype(np.float64))]
    if "csat" in cases:
        csat, rated = _numbers(cases, "csat")
        targets.append(("csat", "spearman", rated, csat))
    # Per Spearman target, the rows last ranked and its ranks: each measure is usually known
    # wherever the other is, so the rating is ranked once, not once per measure.
    ranked: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for measure in ("emotion_start", "emotion_end", "emotion_delta"):
        values, has = _numbers(cases, measure)
        for name, method, among, target in targets:
            ok = among & has  # the target is known on all of `among`
            n = int(ok.sum())
            x, y = values[ok], target[ok]
            if n < min_n or not _varies(x) or not _varies(y):
                rows.append(
                    {
                        "measure": measure,
                        "outcome_measure": name,
                        "method": method,
                        "n": n,
                        "r": None,
                        "ci_low": None,
                        "ci_high": None,
                        "note": f"too few cases with both values (need {min_n})",
                    }
                )
                continue
            if method == "spearman":
                last = ranked.get(name)
                if last is None or not np.array_equal(last[0], ok):
                    last = ranked[name] = (ok, average_ranks(y))
                x, y = average_ranks(x), last[1]
            r, lo, hi = bootstrap_corr(x, y, method, ranked=True)
            strength = (
                "no clear relation"
                if lo <= 0 <= hi
                else ("weak" if abs(r) < 0.3 else "moderate" if abs(r) < 0.5 else "strong")
            )
            rows.append(
                {
                    "measure": measure,
                    "outcome_measure": name,
                    "method": method,
                    "n": n,
                    "r": round(r, 3),
                    "ci_low": round(lo, 3),
                    "ci_high": round(hi, 3),
                    "note": strength,
                }
            )
    return pd.DataFrame(rows, columns=cols)


def _relations_from_counts(counts: case_relations.Counts, min_n: int, rated: bool) -> list[dict[str, Any]] | None:
    """`relations`' rows from the cases' kept counts (`case_relations`), or None where any row
    must be made from the cases (a bootstrap's few cases, or an r too near a rounding step)."""
    rows: list[dict[str, Any]] = []
    targets = [("resolved", "pearson")] + ([("csat", "spearman")] if rated else [])
    for measure in case_relations.MEASURES:
        for name, method in targets:
            got = case_relations.relation(counts.triples[measure], name, min_n, BOOTSTRAP_MAX_N)
            if got is None:
                return None
            n, _, r = got
            head = {"measure": measure, "outcome_measure": name, "method": method, "n": n}
            if r is None:
                note = f"too few cases with both values (need {min_n})"
                rows.append({**head, "r": None, "ci_low": None, "ci_high": None, "note": note})
                continue
            shown = case_relations.shown(r, n, method)
            if shown is None:
                return None
            rows.append({**head, **shown})
    return rows


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = p + z * z / (2 * n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (c - h) / d, (c + h) / d


_TEAM_COLUMNS = ["team", "n", "worsened", "share_worsened", "ci_low", "ci_high"]


def worsened_by_team(cases: pd.DataFrame, teams: list[str | None] | None = None) -> pd.DataFrame:
    """Share of conversations whose emotion worsened, per agent team (or agent), with Wilson CI.
    `teams`: `case_teams(cases)` when the caller has it already."""
    if not len(cases) or "emotion_trajectory" not in cases:
        return pd.DataFrame(columns=_TEAM_COLUMNS)
    # Teams as sorted codes (a groupby's order), their cases and worsened ones counted by
    # bincount: a groupby iterated team by team copied ~120 groups a night.
    codes, names = case_team_codes(cases, teams)  # -1: no team, counted nowhere
    # The trajectory's codes (shared for an Arrow column): one comparison per distinct value.
    traj, found = column_codes(cases["emotion_trajectory"])
    is_worse = np.array([v == "恶化" for v in found.tolist()] + [False], dtype=bool)
    worse = is_worse[np.where(traj < 0, len(found), traj)]
    by = cross_counts(codes, len(names), worse.astype(np.int64), 2)
    return team_table(names, by.sum(axis=1), by[:, 1])


def team_table(names: Any, sizes: np.ndarray, worsened: np.ndarray) -> pd.DataFrame:
    """The worsened-by-team table from each team's case and worsened counts (teams in `names`'
    order), with Wilson intervals, ranked by their lower bound."""
    rows = []
    for team, n, k in zip(names, np.asarray(sizes).tolist(), np.asarray(worsened).tolist()):
        lo, hi = wilson(k, n)
        rows.append(
            {
                "team": team,
                "n": n,
                "worsened": k,
                "share_worsened": round(k / n, 4),
                "ci_low": round(lo, 4),
                "ci_high": round(hi, 4),
            }
        )
    out = pd.DataFrame(rows, columns=_TEAM_COLUMNS)
    # By the lower bound: a team with 2 of 2 worsened is not ranked above one with 40 of 100.
    return out.sort_values(["ci_low", "n"], ascending=[False, False]).reset_index(drop=True)
