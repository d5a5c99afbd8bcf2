"""Each membership row's stored-case row, kept between nights beside the case copy.

Why: a night asks which membership rows hold a case still selected, with its run (`locate`).
Answered by hashing, that looked 2M membership case ids up among 1M case ids each night at 1M
stored cases (0.5-0.9 s of a 6 s night) while the answer for every row but tonight's did not
change: the case copy (`pipeline.storage.case_cache`) only grows at its end between its whole
writes, so a case's row in it stays put. Kept per membership part (parts are written once):
each row's case row in the copy (-1: none) and whether that row's run is the member's. A night
looks up only the parts it has not seen (last night's new members: the few ids are hashed and
the cases probed against them) and, for rows that had no case, only the cases added since.

Layout: `state/cache/member-rows/part-<seq>.arrow` (columns `row`, `same`), its metadata naming
the part's size and mtime, the copy generation and how many of its rows were looked in. It is a
cache: written by a rename, never synced; an entry of another part (same number rewritten),
another copy generation (but the one whose rows lead this one, `case_cache.accepts`) or another
length is ignored and written again, and one that cannot be written only costs the next night
its speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.insights.membership import Members
from pipeline.io import read_cache_table, write_cache_table
from pipeline.storage.case_cache import CopyRows, accepts

_META = b"casemine_member_rows"
# Fewer ids than this share of the cases: the ids are hashed and the cases probed against them
# (hashing 1M case ids to find 1,000 cost ~40x the probe).
_PROBE_SHARE = 0.25


def cache_dir(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "member-rows"


def arrow_strings(col: pd.Series) -> pa.Array:
    """A column as one Arrow large_string array; no copy for the Arrow-backed strings read from
    the store."""
    arr = pa.array(col.astype(str), from_pandas=True)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.large_string())


def index_in(values: pa.Array, among: pa.Array) -> np.ndarray:
    """Each of `values`' position in `among` (its first), -1 where it is not there or missing."""
    found = pc.index_in(values, value_set=among, skip_nulls=True)
    return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def case_rows(ids: pa.Array, case_ids: pa.Array, start: int = 0) -> np.ndarray:
    """`index_in(ids, case_ids[start:]) + start` (-1 kept) for `case_ids` that hold each id once:
    few ids are hashed and the cases probed against them, rather than every case hashed."""
    among = case_ids.slice(start)
    if len(ids) >= _PROBE_SHARE * len(among):
        found = index_in(ids, among)
        return np.where(found >= 0, found + start, -1)
    uniq = pc.unique(ids)
    at = index_in(among, uniq)
    hits = np.flatnonzero(at >= 0)
    row_of = np.full(len(uniq), -1, dtype=np.int64)
    row_of[at[hits]] = hits + start
    k = index_in(ids, uniq)
    return np.where(k >= 0, row_of[np.maximum(k, 0)], -1)


def _same_runs(runs: pa.Array, case_runs: pa.Array, rows: np.ndarray) -> np.ndarray:
    """Whether each row's case row has its run (a missing run on either side: no)."""
    same = np.zeros(len(rows), dtype=bool)
    hit = rows >= 0
    if hit.any():
        eq = pc.equal(runs.filter(pa.array(hit)), case_runs.take(pa.array(rows[hit])))
        same[hit] = np.asarray(pc.fill_null(eq, False).to_numpy(zero_copy_only=False), dtype=bool)
    return same


def _stat(path: Path) -> list[int]:
    s = path.stat()
    return [s.st_size, s.st_mtime_ns]


def _load(
    path: Path, stat: list[int], gen: str, n: int, n_cases: int, prefix: CopyRows | None = None
) -> tuple[np.ndarray, np.ndarray, int, bool] | None:
    """The part's `n` rows' kept case rows and runs' sameness, how many case rows they were
    looked in (rows of generation `gen`, `n_cases` now, or of the one that leads it: `prefix`),
    and whether they were kept of `gen` itself; or None."""

    def accept(meta: dict[str, Any]) -> bool:
        return (
            meta.get("part") == stat
            and meta.get("n") == n
            and accepts(meta.get("gen"), meta.get("looked"), gen, n_cases, prefix)
        )

    got = read_cache_table(path, _META, ["row", "same"], accept)
    if got is None or len(got[1]) != n:
        return None
    meta, t = got
    rows = np.asarray(t["row"].to_numpy(), dtype=np.int64)
    same = np.asarray(t["same"].to_numpy(), dtype=bool)
    return rows, same, int(meta["looked"]), meta["gen"] == gen


def _save(path: Path, rows: np.ndarray, same: np.ndarray, stat: list[int], gen: str, looked: int) -> None:
    meta = {"part": stat, "gen": gen, "n": len(rows), "looked": looked}
    write_cache_table(
        path,
        pa.table({"row": rows, "same": same}),
        _META,
        meta,
        "the membership rows cache",
        "the next night looks every member up",
    )


def part_rows(
    out: Path, members: Members, case_ids: pa.Array, case_runs: pa.Array, gen: str, prefix: CopyRows | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Over every row of `members.rows` (every part's): its case's row among `case_ids` (the case
    copy generation `gen`, whole: each id once; `prefix`: its `case_cache.copy_prefix`) and
    whether that row's run (`case_runs`) is its run; kept per part between nights, and brought up
    to date here."""
    folder = cache_dir(out)
    n_cases = len(case_ids)
    rows_of: list[np.ndarray] = []
    same_of: list[np.ndarray] = []
    offset = 0
    for seq, path, n in members.parts:
        part = members.rows.iloc[offset : offset + n]
        offset += n
        entry_path, stat = folder / f"part-{seq:06d}.arrow", _stat(path)
        entry = _load(entry_path, stat, gen, n, n_cases, prefix)
        if entry is None:
            rows = case_rows(arrow_strings(part["case_id"]), case_ids)
            same = _same_runs(arrow_strings(part["run_id"]), case_runs, rows)
            _save(entry_path, rows, same, stat, gen, n_cases)
        else:
            rows, same, looked, same_gen = entry
            missing = np.flatnonzero(rows < 0)
            found = np.zeros(0, dtype=np.int64)
            if looked < n_cases and len(missing):
                # Cases added to the copy since: a member without a case may have one now.
                ids = arrow_strings(part["case_id"].iloc[missing])
                found = case_rows(ids, case_ids, looked)
                if (found >= 0).any():
                    rows, same = rows.copy(), same.copy()
                    rows[missing] = found
                    same[missing] = _same_runs(arrow_strings(part["run_id"].iloc[missing]), case_runs, found)
            # An entry kept through the prefix is saved under `gen`: a later rewrite names only `gen`.
            if (found >= 0).any() or not same_gen:
                _save(entry_path, rows, same, stat, gen, n_cases)
        rows_of.append(rows)
        same_of.append(same)
    if folder.is_dir():
        current = {f"part-{seq:06d}.arrow" for seq, _, _ in members.parts}
        for f in folder.glob("part-*.arrow"):
            if f.name not in current:
                f.unlink(missing_ok=True)
    empty = np.zeros(0, dtype=np.int64)
    return np.concatenate(rows_of) if rows_of else empty, np.concatenate(same_of) if same_of else empty.astype(bool)


def locate(
    rows: np.ndarray, same: np.ndarray, selected: Sequence[int] | np.ndarray, n_cases: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`export.locate_members` from each membership row's case row (`rows`, -1: none) and whether
    it has the member's run (`same`), for a frame of the cases at `selected` (each id once):
    which rows hold a selected case (`alive`), which frame rows no member holds with their run
    (`todo`), which members hold a case of those (`redone`), and each member's frame row."""
    frame_row = np.full(n_cases + 1, -1, dtype=np.int64)  # the last: for rows without a case
    frame_row[np.asarray(selected, dtype=np.int64)] = np.arange(len(selected))
    pos = frame_row[np.where(rows >= 0, rows, n_cases)]
    alive = pos >= 0
    todo = np.ones(len(selected), dtype=bool)
    todo[pos[alive & same]] = False
    redone = np.zeros(len(rows), dtype=bool)
    redone[alive] = todo[pos[alive]]
    return alive, todo, redone, pos
