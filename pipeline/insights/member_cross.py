"""Each case copy row's cross-type membership, kept between nights: what a night's members side
reads of the stored membership, without reading it.

Why: on a night that only adds cases, the per-type tables come from a kept tally
(`member_tallies`), and what was left of the members side still passed over every stored
member: every membership part read (2M rows at 1M stored cases), each row's case found, the
cross-type rows (the map, the emotion table, the issue chart and the noise share read them)
picked out of them and viewed with their cases. None of it changes between nights but for the
night's new rows. Kept here per row of the case copy (`pipeline.storage.case_cache`, whose rows
stay put while its generation lasts): whether the row was selected, whether any membership row
holds its case (with its run: every stored row does after a night), and its cross-type row's
cluster id (as a code of the kept ids), noise flag, similarity and map point. A primed 1M-case
+1,000 night: 2.96-3.39 -> 1.68-2.19 CPU s, peak RSS 1.27-1.30 -> 0.90 GiB.

A kept entry is used only while it describes the stored membership exactly: the same membership
parts (number, size and mtime of each, from `members_from` on), the same copy generation with at
least as many rows (or the generation whose rows lead it: `case_cache.copy_prefix`), and the
same selection of those rows; anything else (a re-cluster, a compaction, a removed or
re-processed case, another selection) and the night reads the membership as before and keeps a
new entry. Only nights after which every membership row's case
is a selected case are kept (the entry then stands for `locate_members` of the next night).

Layout: `state/cache/member-cross.arrow` (the columns of `Kept`, its metadata the key and the
ids). A cache: written by a rename, never synced; one that cannot be written only costs the next
night its speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.insights import membership as mb
from pipeline.insights.cluster import ALL_SCOPE
from pipeline.insights.codes import sorted_codes
from pipeline.io import read_cache_table, write_cache_table
from pipeline.storage.case_cache import accepts

_META = b"casemine_member_cross"
_VERSION = 1
COLUMNS = ["selected", "member", "cross", "code", "is_noise", "similarity", "x", "y"]


def cache_path(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "member-cross.arrow"


@dataclass
class Kept:
    """Per case copy row (`n` of them): selected, held by a membership row, has a cross-type row,
    and that row's cluster id (a code of `ids`, sorted; -1 none), noise flag, similarity (NaN:
    none) and map point (NaN: not placed). `n_members`: the membership's rows."""

    n_members: int
    ids: np.ndarray
    selected: np.ndarray
    member: np.ndarray
    cross: np.ndarray
    code: np.ndarray
    is_noise: np.ndarray
    similarity: np.ndarray
    x: np.ndarray
    y: np.ndarray

    @property
    def n(self) -> int:
        return len(self.selected)


def parts_key(out: Path, meta: dict[str, Any]) -> list[Any]:
    """What names the stored membership: `members_from` and each current part's number, size
    and mtime (parts are written once: a part written again changes its size or mtime)."""
    key: list[Any] = [int(meta.get("members_from", 0))]
    for seq, path in mb.current_parts(out, meta):
        st = path.stat()
        key.append([seq, st.st_size, st.st_mtime_ns])
    return key


def load(out: Path, gen: str, n_cases: int, key: list[Any], prefix: tuple[str, int] | None = None) -> Kept | None:
    """The kept entry when it was kept of this membership (`key`) and of copy generation `gen`
    with at most `n_cases` rows, or of the generation whose first rows lead it (`prefix`:
    `case_cache.copy_prefix`) with at most that many; else None."""

    def accept(meta: dict[str, Any]) -> bool:
        if meta.get("v") != _VERSION or meta.get("parts") != key:
            return False
        return accepts(meta.get("gen"), meta.get("n"), gen, n_cases, prefix)

    got = read_cache_table(cache_path(out), _META, COLUMNS, accept)
    if got is None:
        return None
    meta, t = got
    if t.num_rows != meta["n"]:
        return None

    def col(name: str, dtype: Any) -> np.ndarray:
        return np.asarray(t[name].to_numpy(), dtype=dtype)

    return Kept(
        int(meta["n_members"]),
        np.asarray(meta["ids"], dtype=object),
        col("selected", bool),
        col("member", bool),
        col("cross", bool),
        col("code", np.int64),
        col("is_noise", bool),
        col("similarity", np.float64),
        col("x", np.float64),
        col("y", np.float64),
    )


def save(out: Path, kept: Kept, gen: str, key: list[Any]) -> None:
    meta = {"v": _VERSION, "gen": gen, "parts": key, "n": kept.n, "n_members": kept.n_members}
    meta["ids"] = [str(i) for i in kept.ids]
    table = pa.table(
        {
            "selected": kept.selected,
            "member": kept.member,
            "cross": kept.cross,
            "code": kept.code.astype(np.int32),
            "is_noise": kept.is_noise,
            "similarity": kept.similarity,
            "x": kept.x,
            "y": kept.y,
        }
    )
    write_cache_table(
        cache_path(out), table, _META, meta, "the kept cross-type members", "the next night reads the membership"
    )


def _floats(values: pd.Series) -> np.ndarray:
    return np.asarray(pd.to_numeric(values, errors="coerce"), dtype=np.float64)


def of_membership(
    membership: pd.DataFrame,
    positions: np.ndarray,
    selected: np.ndarray,
    n_cases: int,
    cluster_codes: tuple[np.ndarray, np.ndarray] | None = None,
) -> Kept | None:
    """The entry of a night's final membership (`positions`: each row's frame row; `selected`:
    each frame row's copy row, of `n_cases`; `cluster_codes`: its cluster ids' `sorted_codes`,
    when the night has them), or None where it could not stand for the next night's look-up: a
    row without a selected case, a case twice in the cross-type scope, ids that are not all
    text, similarities not stored as floats. Each column taken alone, as arrays: a filter of the
    whole frame's cross-type rows, and a sort to find a case twice, cost 1 s at 1M cases."""
    if len(positions) != len(membership) or (len(positions) and int(positions.min()) < 0):
        return None
    if membership["similarity"].dtype != np.float64:
        return None
    sel = np.zeros(n_cases, dtype=bool)
    sel[selected] = True
    member = np.zeros(n_cases, dtype=bool)
    copy_rows = np.asarray(selected, dtype=np.int64)[positions]
    member[copy_rows] = True
    is_cross = np.flatnonzero((membership["scope"] == ALL_SCOPE).to_numpy(dtype=bool))
    at = copy_rows[is_cross]
    if len(at) and int(np.bincount(at, minlength=n_cases).max()) > 1:
        return None
    if cluster_codes is None or len(cluster_codes[0]) != len(membership):
        cluster_codes = sorted_codes(membership["cluster_id"].iloc[is_cross])
        codes = np.asarray(cluster_codes[0], dtype=np.int64)
    else:
        codes = np.asarray(cluster_codes[0], dtype=np.int64)[is_cross]
    ids = np.asarray(cluster_codes[1], dtype=object)
    if not all(isinstance(i, str) for i in ids):
        return None
    cross = np.zeros(n_cases, dtype=bool)
    cross[at] = True
    code = np.full(n_cases, -1, dtype=np.int64)
    code[at] = codes

    def column(name: str, fill: Any) -> np.ndarray:
        values = membership[name]
        taken = values.to_numpy(dtype=bool)[is_cross] if name == "is_noise" else _floats(values)[is_cross]
        return _scatter(n_cases, at, taken, fill)

    return Kept(
        len(membership),
        ids,
        sel,
        member,
        cross,
        code,
        column("is_noise", False),
        column("similarity", np.nan),
        column("x", np.nan),
        column("y", np.nan),
    )


def _scatter(n: int, at: np.ndarray, values: np.ndarray, fill: Any) -> np.ndarray:
    out = np.full(n, fill, dtype=values.dtype)
    out[at] = values
    return out


def _grown(values: np.ndarray, n: int, fill: Any) -> np.ndarray:
    out = np.full(n, fill, dtype=values.dtype)
    out[: len(values)] = values
    return out


def with_new_rows(
    kept: Kept, new_rows: pd.DataFrame, copy_rows: np.ndarray, selected: np.ndarray, n_cases: int
) -> Kept | None:
    """`kept` after a night that appended `new_rows` to the membership (`copy_rows`: each new
    row's case copy row; `selected`: tonight's selected copy rows, of `n_cases`). None where it
    could not stand (see `of_membership`): a new row's case held before, or twice in the
    cross-type scope."""
    if len(copy_rows) and (int(copy_rows.min()) < 0 or kept.member[copy_rows[copy_rows < kept.n]].any()):
        return None
    is_cross = (new_rows["scope"] == ALL_SCOPE).to_numpy(dtype=bool) if len(new_rows) else np.zeros(0, bool)
    at = copy_rows[is_cross]
    if len(np.unique(at)) != len(at):
        return None
    rows = new_rows.iloc[np.flatnonzero(is_cross)]
    new_ids = rows["cluster_id"]
    if not all(isinstance(i, str) for i in new_ids.dropna()):
        return None
    ids = np.asarray(sorted(set(kept.ids.tolist()) | set(new_ids.dropna().tolist())), dtype=object)
    remap = np.append(np.searchsorted(ids, kept.ids).astype(np.int64), -1)
    code = _grown(remap[kept.code], n_cases, -1)
    found = new_ids.notna().to_numpy(dtype=bool)
    code[at] = np.where(found, np.searchsorted(ids, new_ids.fillna("").to_numpy(dtype=object)), -1) if len(at) else -1
    sel = np.zeros(n_cases, dtype=bool)
    sel[selected] = True
    member = _grown(kept.member, n_cases, False)
    member[copy_rows] = True
    cross = _grown(kept.cross, n_cases, False)
    cross[at] = True
    out = Kept(
        kept.n_members + len(new_rows),
        ids,
        sel,
        member,
        cross,
        code,
        _grown(kept.is_noise, n_cases, False),
        _grown(kept.similarity, n_cases, np.nan),
        _grown(kept.x, n_cases, np.nan),
        _grown(kept.y, n_cases, np.nan),
    )
    if len(at):
        out.is_noise[at] = rows["is_noise"].to_numpy(dtype=bool)
        out.similarity[at] = _floats(rows["similarity"])
        out.x[at] = _floats(rows["x"])
        out.y[at] = _floats(rows["y"])
    return out


def repeated(text: str, n: int) -> pd.Series:
    """`text` n times as an Arrow-backed text column, as the stored membership's scopes are (an
    object column of 1M strings compared 6x slower)."""
    arr = pa.array([text], pa.large_string()).take(pa.array(np.zeros(n, dtype=np.int64)))
    return pd.Series(pd.array(arr, dtype="str"))
