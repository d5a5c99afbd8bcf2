"""What the clusters table counts of the members, kept between nights so a night counts only its new rows.

Why: on a night that only adds cases (last night's member parts linked, `member_parts`), the
stored members and their case fields do not change and the night's rows come after them in each
scope; yet `recount_clusters` counted every member again (0.34 s of a 1M-case night). Its inputs
are sums over the members: each (scope, cluster)'s size, each scope's size, each (cluster, value)
pair's count and first row per mix column, and each cluster's emotion scores. Counts add. A tie
between two values of a cluster is broken by the first row of each in the cluster, and the
night's rows come after the stored ones within a cluster, so a stored pair's first row stays the
first and a new pair's is any rank past every stored row. The mean emotion is numpy's pairwise
sum of the cluster's scores in row order, which no running state reproduces: the scores
themselves are kept (8 bytes a scored member) and the night's appended.

Kept in `state/cache/member-tallies/` (three Arrow files: groups, mix, scores), named by the
export folder whose members table they count (its parts and rows) and the membership part it was
written from: used only on a night that links exactly that folder's parts, which is the claim the
linking already rests on (`member_parts.reusable_parts`). Anything else counts the members afresh
and keeps that. Pure counting here; the caller reads and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.insights import member_parts as mp
from pipeline.insights.cluster import _ranked_shares, group_rows
from pipeline.insights.codes import Codes, column_codes, sorted_codes
from pipeline.io import read_cache_table, write_cache_table

# The mix columns `recount_clusters` reports, and how many values each keeps (None: all).
MIX = {"outcome": None, "emotion": None, "channel": None, "issue_type": 3, "region": None, "product": None}
UNKNOWN = "未知"  # `share_dict`'s name for a missing or empty value
_META = b"casemine_member_tallies"
_VERSION = 1


Pairs = tuple[np.ndarray, list[str], np.ndarray, np.ndarray]  # group, value name, count, first row


@dataclass
class Groups:
    """Rows counted by group: the groups' keys, sizes, and per mix column each (group, value
    name) pair's count and first row (a rank, only compared within a group)."""

    keys: list[tuple[str, str]]
    sizes: np.ndarray
    mix: dict[str, Pairs] = field(default_factory=dict)


@dataclass
class Tally:
    """Sums over member rows. The clusters' groups are (str(scope), str(cluster_id)) pairs;
    `typed` groups the per-type scopes' rows by (issue type, cluster id or ""), as the matrix
    does; `days` is the cluster counts' daily rows (`trends.day_counts`)."""

    keys: list[tuple[str, str]]
    sizes: np.ndarray  # rows per group
    scopes: dict[str, int]  # rows per scope, noise included
    mix: dict[str, Pairs] = field(default_factory=dict)
    scores: list[np.ndarray] | None = None  # per group its non-missing emotion scores in row order
    rows: int = 0  # member rows counted: the ranks of rows appended start here
    typed: Groups | None = None
    # Whether every per-type row's issue type is its scope: then a matrix group lies in one
    # scope, and rows appended to each scope come after its kept rows within the group too.
    typed_in_scope: bool = False
    days: pd.DataFrame | None = None
    breakdowns: list[str] = field(default_factory=list)  # the BREAKDOWNS the members had

    def cluster_ids(self) -> list[str]:
        """The distinct cluster ids counted, sorted (the week-over-week test's keys)."""
        return sorted({cid for _, cid in self.keys})


def _share_names(uniques: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The share names of a column's distinct values (missing or empty: "未知") in first-seen
    order, and each value's position among them; the last entry stands for a missing value."""
    pos: dict[str, int] = {}
    named = [u if isinstance(u, str) and u else UNKNOWN for u in uniques.tolist()] + [UNKNOWN]
    merged = np.array([pos.setdefault(n, len(pos)) for n in named], dtype=np.int64)
    return list(pos), merged


def _pairs(codes: np.ndarray, values: np.ndarray, width: int, start: int) -> tuple[np.ndarray, ...]:
    """Each (group, value) pair's group, value, count and first row (+ `start`) of grouped rows
    (`codes` >= 0), in order of the pair's key. Binned over the pairs' span where it is small
    beside the rows (as `coded_shares` counts): a sort of 2M members' keys per column cost more
    than the recount it feeds."""
    grouped = np.flatnonzero(codes >= 0)
    key = codes[grouped] * width + values[grouped]
    span = (int(key.max()) + 1) if len(key) else 0
    if span <= 4 * len(key) + 1024:
        binned = np.bincount(key, minlength=span)
        ukey = np.flatnonzero(binned)
        counts = binned[ukey]
        at = np.full(span, len(codes), dtype=np.int64)
        np.minimum.at(at, key, grouped)
        first = at[ukey]
    else:
        ukey, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        first = np.full(len(ukey), len(codes), dtype=np.int64)
        np.minimum.at(first, inverse.reshape(-1), grouped)
    return ukey // width, ukey % width, counts.astype(np.int64), first + start


def count_members(members: pd.DataFrame, cluster_codes: Codes | None = None, start: int = 0) -> Tally:
    """The tally of `members` (the members table's scope, cluster_id, mix and emotion_score
    columns), its rows ranked from `start`. `cluster_codes`: the cluster ids' codes, when known."""
    scope_codes, scope_names = sorted_codes(members["scope"])
    scopes = dict(zip(scope_names.tolist(), np.bincount(scope_codes[scope_codes >= 0]).tolist()))
    codes, keys = cluster_groups(scope_codes, scope_names, members["cluster_id"], cluster_codes)
    sizes = np.bincount(codes[codes >= 0], minlength=len(keys)).astype(np.int64)
    mix = {}
    for col in MIX:
        if col in members:
            vcodes, uniques = column_codes(members[col])
            names, merged = _share_names(uniques)
            group, value, counts, first = _pairs(codes, merged[vcodes], len(names), start)
            mix[col] = (group, [names[v] for v in value.tolist()], counts, first)
    scores = None
    if "emotion_score" in members:
        floats = pd.to_numeric(members["emotion_score"], errors="coerce").to_numpy(dtype=float)
        scores = [s[~np.isnan(s)] for s in (floats[idx] for idx in group_rows(codes, len(keys)))]
    typed, in_scope = _typed_groups(members, cluster_codes, start)
    days, breakdowns = _days(members, cluster_codes)
    return Tally(keys, sizes, scopes, mix, scores, start + len(members), typed, in_scope, days, breakdowns)


def _typed_groups(members: pd.DataFrame, cluster_codes: Codes | None, start: int) -> tuple[Groups | None, bool]:
    """The matrix's groups of the per-type rows (`trends._type_cluster_groups`), with their
    region and product pairs; and whether each per-type row's issue type is its scope."""
    from pipeline.insights.trends import _type_cluster_groups

    if "issue_type" not in members:
        return None, False
    per_type, keys, sizes, codes = _type_cluster_groups(members, cluster_codes)
    codes = np.where(codes < len(keys), codes, -1)
    mix = {}
    for col in ("region", "product"):
        if col in members:
            vcodes, uniques = sorted_codes(members[col])
            names, merged = _share_names(uniques)
            group, value, counts, first = _pairs(codes, merged[vcodes[per_type]], len(names), 0)
            mix[col] = (group, [names[v] for v in value.tolist()], counts, per_type[first] + start)
    typed = [(str(it), str(cid)) for it, cid in keys]
    return Groups(typed, np.asarray(sizes, dtype=np.int64), mix), _types_are_scopes(members, per_type)


def _types_are_scopes(members: pd.DataFrame, rows: np.ndarray) -> bool:
    """Whether each of `rows` has its scope for issue type, compared by codes (the columns'
    shared ones): 2M members' values as Python strings cost a second at 1M cases."""
    scope_codes, scopes = sorted_codes(members["scope"])
    type_codes, types = sorted_codes(members["issue_type"])
    where = {t: i for i, t in enumerate(types.tolist())}
    # Each scope's issue type code (-2: a scope no issue type spells, equal to no row's code).
    as_type = np.array([where.get(s, -2) for s in scopes.tolist()] + [-2], dtype=np.int64)
    return bool((as_type[scope_codes[rows]] == type_codes[rows]).all())


def _days(members: pd.DataFrame, cluster_codes: Codes | None) -> tuple[pd.DataFrame, list[str]]:
    """The cluster counts' daily rows of the members (none when no row has a cluster, where the
    export counts an empty frame) and which breakdown columns they had."""
    from pipeline.insights.trends import BREAKDOWNS, day_counts, day_counts_of

    codes = cluster_codes if cluster_codes is not None else sorted_codes(members["cluster_id"])
    if not len(members) or not (codes[0] >= 0).any() or "date" not in members:
        return day_counts(pd.DataFrame()), [b for b in BREAKDOWNS if b in members]
    return day_counts_of(members, "cluster_id", codes), [b for b in BREAKDOWNS if b in members]


def merge(kept: Tally, new: Tally) -> Tally:
    """The tally of kept rows followed by new ones (`new` counted with start=kept.rows). Raises
    ValueError where the two did not count the same columns."""
    from pipeline.insights.trends import add_day_counts

    if kept.breakdowns != new.breakdowns or (kept.typed is None) != (new.typed is None):
        raise ValueError("tallies of members with different columns")
    clusters, where = _merge_groups(Groups(kept.keys, kept.sizes, kept.mix), Groups(new.keys, new.sizes, new.mix))
    scopes = dict(kept.scopes)
    for scope, n in new.scopes.items():
        scopes[scope] = scopes.get(scope, 0) + n
    scores = None
    if kept.scores is not None and new.scores is not None:
        scores = list(kept.scores) + [np.zeros(0) for _ in range(len(clusters.keys) - len(kept.keys))]
        for i, s in zip(where.tolist(), new.scores):
            scores[i] = np.concatenate([scores[i], s])
    elif kept.scores is not None or new.scores is not None:
        raise ValueError("tallies of members with and without emotion scores")
    typed = _merge_groups(kept.typed, new.typed)[0] if kept.typed is not None and new.typed is not None else None
    days = None
    if kept.days is not None and new.days is not None:
        # Kept rows with no cluster yet have no daily counts: their empty frame's columns would
        # change the added counts' text type, so the new rows' count from none.
        kept_days = kept.days if len(kept.days) else new.days.iloc[0:0]
        days = add_day_counts(kept_days, new.days)
    return Tally(
        clusters.keys,
        clusters.sizes,
        scopes,
        clusters.mix,
        scores,
        new.rows,
        typed,
        kept.typed_in_scope and new.typed_in_scope,
        days,
        kept.breakdowns,
    )


def _merge_groups(kept: Groups, new: Groups) -> tuple[Groups, np.ndarray]:
    """Two counts of groups as one (the kept groups first, then the new ones), and each new
    group's number in it. The groups' order never reaches a table: the clusters follow
    `described`, the matrix sorts its groups."""
    index = {k: i for i, k in enumerate(kept.keys)}
    keys = list(kept.keys)
    for k in new.keys:
        if k not in index:
            index[k] = len(keys)
            keys.append(k)
    where = np.array([index[k] for k in new.keys], dtype=np.int64)
    sizes = np.zeros(len(keys), dtype=np.int64)
    sizes[: len(kept.keys)] = kept.sizes
    np.add.at(sizes, where, new.sizes)
    if set(kept.mix) != set(new.mix):
        raise ValueError("tallies of members with different columns")
    mix = {name: _merge_pairs(kept.mix[name], _regrouped(new.mix[name], where)) for name in kept.mix}
    return Groups(keys, sizes, mix), where


def _regrouped(pairs: Any, where: np.ndarray) -> Any:
    return None if pairs is None else (where[pairs[0]], pairs[1], pairs[2], pairs[3])


def _merge_pairs(a: Pairs, b: Pairs) -> Pairs:
    """Two tallies' pairs of one column as one: counts summed, the earlier first row kept. By
    integer keys (group, name number): a groupby on the names cost 15 ms a column at 1M cases."""
    index: dict[str, int] = {}
    names = np.array([index.setdefault(n, len(index)) for n in [*a[1], *b[1]]], dtype=np.int64)
    width = max(len(index), 1)
    key = np.concatenate([a[0], b[0]]).astype(np.int64) * width + names
    ukey, start, inverse = np.unique(key, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.zeros(len(ukey), dtype=np.int64)
    np.add.at(counts, inverse, np.concatenate([a[2], b[2]]).astype(np.int64))
    first = np.full(len(ukey), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, inverse, np.concatenate([a[3], b[3]]).astype(np.int64))
    joined = [*a[1], *b[1]]
    return ukey // width, [joined[i] for i in start.tolist()], counts, first


def shares(tally: Tally, col: str) -> dict[int, dict[str, float]]:
    """`group_shares` of column `col` per group: most common first, ties by first row."""
    if col not in tally.mix:
        return {}
    group, labels, counts, first = tally.mix[col]
    names, value = _share_names(np.asarray(labels, dtype=object))
    return _ranked_shares(group, value[:-1], counts, first, tally.sizes, names, MIX[col])


def makes_tables(tally: Tally | None) -> bool:
    """Whether the tally makes every per-type table: daily counts (none when no member has a
    cluster: then the tables count an empty frame) and matrix groups each within one scope."""
    if tally is None or tally.days is None or not len(tally.days):
        return False
    return tally.typed is not None and tally.typed_in_scope


def typed_shares(tally: Tally) -> tuple[list[tuple[str, str]], list[int], dict[str, dict[int, dict[str, float]]]]:
    """The matrix's groups in sorted order, their sizes and region and product shares, as
    `trends.root_cause_matrix` counts them (`trends.matrix_from_groups`)."""
    typed = tally.typed
    if typed is None:
        return [], [], {}
    order = sorted(range(len(typed.keys)), key=typed.keys.__getitem__)
    number = np.empty(len(order), dtype=np.int64)
    number[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
    sizes = typed.sizes[np.asarray(order, dtype=np.int64)] if order else typed.sizes
    out = {}
    for col, (group, labels, counts, first) in typed.mix.items():
        names, value = _share_names(np.asarray(labels, dtype=object))
        out[col] = _ranked_shares(number[group], value[:-1], counts, first, sizes, names, None)
    return [typed.keys[i] for i in order], sizes.tolist(), out


def mean_scores(tally: Tally, group: int) -> float | None:
    """`_float_mean` of a group's scores: numpy's pairwise mean of them in row order."""
    if tally.scores is None:
        return None
    kept = tally.scores[group]
    return round(float(np.mean(kept)), 3) if len(kept) else None


def cluster_groups(
    scope_codes: np.ndarray, scope_names: Any, cluster_ids: pd.Series, cluster_codes: Codes | None = None
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Each member row's (scope, cluster) group number (-1: noise, or a missing scope) and the
    groups as (str(scope), str(cluster_id)), numbered in order of first appearance as a
    groupby(sort=False) numbers them. `cluster_codes`: the ids' codes when the caller has them
    (any numbering serves: the pairs are numbered by first appearance)."""
    cid_codes, cids = cluster_codes if cluster_codes is not None else pd.factorize(cluster_ids)
    codes = np.full(len(cid_codes), -1, dtype=np.int64)
    kept = (cid_codes >= 0) & (scope_codes >= 0)
    width = max(len(cids), 1)
    numbered, pairs = _first_seen(
        scope_codes[kept].astype(np.int64) * width + cid_codes[kept], len(scope_names) * width
    )
    codes[kept] = numbered
    names, ids = np.asarray(scope_names, dtype=object), np.asarray(cids, dtype=object)
    keys = [(str(names[p // width]), str(ids[p % width])) for p in np.asarray(pairs).tolist()]
    return codes, keys


def _first_seen(keys: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """`pd.factorize(keys)` of keys in [0, span): each key's number in order of first appearance,
    and the keys so numbered. By each key's first row (a minimum.at over the span, a few
    thousand scope x cluster pairs) where the span is small beside the rows: hashing the 2M
    members' keys cost 30 ms a night at 1M cases."""
    if span > 4 * len(keys) + 1024:
        numbered, uniques = pd.factorize(keys)
        return numbered, np.asarray(uniques)
    first = np.full(span, len(keys), dtype=np.int64)
    np.minimum.at(first, keys, np.arange(len(keys), dtype=np.int64))
    seen = np.flatnonzero(first < len(keys))
    pairs = seen[np.argsort(first[seen], kind="stable")]
    number = np.full(span, -1, dtype=np.int64)
    number[pairs] = np.arange(len(pairs))
    return number[keys], pairs


# -- kept between nights --------------------------------------------------------------------------


def cache_dir(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "member-tallies"


def folder_key(folder: Path, rows: int, state_part: int) -> dict[str, Any] | None:
    """What names an export folder's members table: its parts (count, the last one's name, size
    and mtime), its rows and the membership part it was written from."""
    found = mp.parts(folder)
    if not found:
        return None
    st = os.stat(found[-1])
    # Not the inode: a copy of the output (cp -a, a restored backup) holds the same table.
    return {
        "v": _VERSION,
        "folder": Path(folder).name,
        "parts": len(found),
        "last": [found[-1].name, st.st_size, st.st_mtime_ns],
        "rows": int(rows),
        "state_part": int(state_part),
    }


_FILES = {
    "groups": ["scope", "cluster_id", "size", "n_scores"],
    "mix": ["column", "group", "name", "count", "first"],
    "scores": ["score"],
    "typed": ["scope", "cluster_id", "size"],
    "typed_mix": ["column", "group", "name", "count", "first"],
    "days": ["breakdown", "key", "period", "value", "count"],
}


def _text(values: Any) -> pa.Array:
    return pa.array(list(values), pa.large_string())


def _column_text(col: pd.Series) -> pa.Array:
    """A text column as Arrow large_string, without a Python string per cell where it is Arrow."""
    arr = pa.array(col, from_pandas=True) if len(col) else pa.array([], pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.large_string())


def _groups_table(keys: list[tuple[str, str]], sizes: np.ndarray) -> dict[str, pa.Array]:
    return {
        "scope": _text(k[0] for k in keys),
        "cluster_id": _text(k[1] for k in keys),
        "size": pa.array(sizes, pa.int64()),
    }


def _mix_table(mix: dict[str, Pairs]) -> pa.Table:
    cols = sorted(mix)
    return pa.table(
        {
            "column": _text(c for c in cols for _ in mix[c][1]),
            "group": pa.array(_joined([mix[c][0] for c in cols]), pa.int64()),
            "name": _text(n for c in cols for n in mix[c][1]),
            "count": pa.array(_joined([mix[c][2] for c in cols]), pa.int64()),
            "first": pa.array(_joined([mix[c][3] for c in cols]), pa.int64()),
        }
    )


def save(out: Path, tally: Tally, key: dict[str, Any]) -> None:
    """Keep `tally` as the count of the members table `key` names (`folder_key`)."""
    scores = tally.scores
    n_scores = [len(s) for s in scores] if scores is not None else [0] * len(tally.keys)
    typed = tally.typed if tally.typed is not None else Groups([], np.zeros(0, dtype=np.int64))
    days = tally.days if tally.days is not None else pd.DataFrame({c: [] for c in _FILES["days"]})
    tables = {
        "groups": pa.table({**_groups_table(tally.keys, tally.sizes), "n_scores": pa.array(n_scores, pa.int64())}),
        "mix": _mix_table(tally.mix),
        "scores": pa.table({"score": pa.array(np.concatenate(scores) if scores else np.zeros(0), pa.float64())}),
        "typed": pa.table(_groups_table(typed.keys, typed.sizes)),
        "typed_mix": _mix_table(typed.mix),
        "days": pa.table(
            {
                **{c: _column_text(days[c]) for c in _FILES["days"][:-1]},
                "count": pa.array(days["count"].to_numpy(dtype=np.int64), pa.int64()),
            }
        ),
    }
    meta = {
        **key,
        "scopes": tally.scopes,
        "columns": sorted(tally.mix),
        "typed_columns": sorted(typed.mix) if tally.typed is not None else None,
        "typed_in_scope": tally.typed_in_scope,
        "has_scores": scores is not None,
        "has_days": tally.days is not None,
        "breakdowns": tally.breakdowns,
        "counted": tally.rows,
    }
    for name, t in tables.items():
        write_cache_table(
            cache_dir(out) / f"{name}.arrow", t, _META, meta, "the member tallies", "the next night counts every member"
        )


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def _arrow_frame(t: pa.Table) -> pd.DataFrame:
    """A kept table's text columns as Arrow-backed text (no copy into Python strings: the
    daily counts' 170k rows' codes are Arrow's hash), its integers as int64."""
    from pipeline.insights.cluster import list_str_dtype

    dtype = list_str_dtype()  # pandas' own text dtype, so the night's rows join without a cast
    cols: dict[str, Any] = {}
    for name in t.column_names:
        col = t[name]
        if pa.types.is_integer(col.type):
            cols[name] = col.to_numpy().astype(np.int64)
        else:
            cols[name] = pd.Series(pd.array(col, dtype=dtype) if dtype is not None else col.to_pylist(), dtype=dtype)
    return pd.DataFrame(cols)


def _read_mix(t: pa.Table, columns: list[str]) -> dict[str, Pairs]:
    column = np.asarray(t["column"].to_pylist(), dtype=object)
    group, names = t["group"].to_numpy(), t["name"].to_pylist()
    count, first = t["count"].to_numpy(), t["first"].to_numpy()
    pairs = {}
    for col in columns:
        at = np.flatnonzero(column == col)
        pairs[col] = (group[at], [names[i] for i in at.tolist()], count[at], first[at])
    return pairs


def _keys(t: pa.Table) -> list[tuple[str, str]]:
    return list(zip(t["scope"].to_pylist(), t["cluster_id"].to_pylist()))


def load(out: Path, key: dict[str, Any] | None) -> Tally | None:
    """The kept tally of the members table `key` names, or None."""
    if key is None:
        return None
    got = {}
    for name, cols in _FILES.items():
        found = read_cache_table(
            cache_dir(out) / f"{name}.arrow", _META, cols, lambda m: {k: m.get(k) for k in key} == key
        )
        if found is None:
            return None
        got[name] = found
    metas = [m for m, _ in got.values()]
    if any(m != metas[0] for m in metas):
        return None  # files of two saves
    meta = metas[0]
    groups, scores = got["groups"][1], got["scores"][1]
    n_scores = groups["n_scores"].to_numpy()
    score_values = scores["score"].to_numpy()
    if int(n_scores.sum()) != len(score_values):
        return None
    kept_scores = np.split(score_values, np.cumsum(n_scores)[:-1]) if len(groups) else []
    typed_t = got["typed"][1]
    typed = None
    if meta["typed_columns"] is not None:
        typed = Groups(
            _keys(typed_t),
            typed_t["size"].to_numpy().astype(np.int64),
            _read_mix(got["typed_mix"][1], meta["typed_columns"]),
        )
    days = _arrow_frame(got["days"][1]) if meta["has_days"] else None
    return Tally(
        _keys(groups),
        groups["size"].to_numpy().astype(np.int64),
        {str(k): int(v) for k, v in meta["scopes"].items()},
        _read_mix(got["mix"][1], meta["columns"]),
        [np.asarray(s) for s in kept_scores] if meta["has_scores"] else None,
        int(meta["counted"]),
        typed,
        bool(meta["typed_in_scope"]),
        days,
        list(meta["breakdowns"]),
    )
