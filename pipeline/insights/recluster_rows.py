"""A full re-cluster's members table kept as its parts, and made a block of rows at a time.

Why: issue 15 wants a run's peak memory flat in the stored cases, and a back-fill ends with an
export that re-clusters every case. Its members table has two rows a case (the cross-type scope's
and the case's issue type's) with the case's fields; built whole, it was held through every
table, counted whole, written whole and made again as the membership part: at 200k cases the
tail of that export was its peak. Yet only the cross-type rows are read as rows (the map, the
emotion table, the chart, the noise share); the per-type tables are sums over every row, and
sums add (`member_tallies.merge`). So the members are kept as what they are made of: each row's
scope, cluster, noise flag and similarity (`member_heads`), each row's case, the map's points
and the cases' own fields. The cross-type rows are the cases' columns themselves (no copy), the
tally is counted a block of rows at a time, and the whole table is made only for the members
file, as it is written, then let go.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.heap import release_mapped_pages
from pipeline.insights import member_tallies as mt
from pipeline.insights.cluster import ALL_SCOPE, MEMBER_FIELDS, _fields_at, leads_in_order
from pipeline.insights.codes import arrow_backed
from pipeline.insights.incremental import MEMBER_COLUMNS
from pipeline.insights.member_rows import arrow_strings, index_in

BLOCK_ROWS = 65_536  # member rows counted at a time: ~5 MiB of their fields
WINDOW_ROWS = 16_384  # the cases whose fields a block's take reads before their pages are dropped
# The fields no count reads (the members file's texts and labels, the case ids).
_UNCOUNTED = ("conversation_id", "request_kind", "urgency", "cluster_text", "case_id")


@dataclass
class ReclusterRows:
    """A re-cluster's members table (`members_with_fields`' rows) as its parts. `heads`: every
    row's scope, cluster id, noise flag and similarity (`member_heads`); `rows`: each scope's
    rows' cases (`scope_member_rows`), the cross-type scope's every case in order; `xy`: the
    cross-type rows' map points, or None (no map)."""

    frame: pd.DataFrame
    heads: pd.DataFrame
    rows: list[np.ndarray]
    xy: tuple[np.ndarray, np.ndarray] | None

    def fields(self, drop: tuple[str, ...] = ()) -> pd.DataFrame:
        """The cases' member fields (a view of the frame's columns), less `drop`."""
        keep = [c for c in MEMBER_FIELDS if c in self.frame and c not in drop]
        return self.frame[keep].reset_index(drop=True)

    @property
    def lead(self) -> int:
        """How many rows the leading cross-type scope has: one per case."""
        return len(self.rows[0])

    def cross(self) -> pd.DataFrame:
        """The cross-type scope's rows with their fields and map points, as the whole table's
        leading rows: the cases' own columns beside their heads."""
        n = self.lead
        body = self.fields().rename(columns={"cluster_text": "problem"})
        # The map's points as they are (the membership part reads them too): `assign` copied them.
        x, y = self.xy if self.xy is not None else (np.full(n, np.nan), np.full(n, np.nan))
        points = pd.DataFrame({"x": x, "y": y}, copy=False)
        return pd.concat([self.heads.iloc[:n], body, points], axis=1)

    def block(self, a: int, b: int, fields: pd.DataFrame) -> pd.DataFrame:
        """Member rows [a, b) with `fields` (the cases' fields, some of them) at their cases."""
        head = self.heads.iloc[a:b].reset_index(drop=True)
        body = take_by_windows(fields, rows_between(self.rows, a, b)).reset_index(drop=True)
        return pd.concat([head, body.rename(columns={"cluster_text": "problem"})], axis=1)

    def tally(self, cross: pd.DataFrame) -> mt.Tally:
        """`member_tallies.count_members` of the whole table: the cross-type rows (`cross`)
        counted, then the other rows a block at a time, each block's counts merged on."""
        tally = mt.count_members(cross)
        counted = self.fields(_UNCOUNTED)
        for a in range(self.lead, len(self.heads), BLOCK_ROWS):
            b = min(a + BLOCK_ROWS, len(self.heads))
            tally = mt.merge(tally, mt.count_members(self.block(a, b, counted), start=a))
        return tally

    def table(self) -> pd.DataFrame:
        """The whole members table (the members file's rows, without the map's x/y), as
        `members_with_fields` builds it: made just before it is written."""
        body = _fields_at(self.fields(), self.rows).rename(columns={"cluster_text": "problem"})
        return pd.concat([self.heads, body], axis=1)

    def file(self) -> FileBlocks:
        """The members file's rows (`table()`), made a block at a time as they are written."""
        return FileBlocks(self, self.fields())

    def stored(self) -> pd.DataFrame:
        """The membership part's columns of the whole table but its run ids (`stored_members`
        adds them): each row's case id, head and map point; for a part `part_groups` cannot
        build. Scope and cluster id as Arrow text where every value is text, so that the part
        is cast from Arrow (`member_part_table`): as Python objects, with the case and run ids,
        they were 2 strings a row."""
        case_ids = _fields_at(self.fields()[["case_id"]], self.rows)["case_id"] if "case_id" in self.frame else None
        x = np.full(len(self.heads), np.nan)
        y = np.full(len(self.heads), np.nan)
        if self.xy is not None:
            x[: self.lead], y[: self.lead] = self.xy
        out = self.heads.assign(**{c: _arrow_text(self.heads[c]) for c in ("scope", "cluster_id")})
        if case_ids is not None:
            out.insert(0, "case_id", case_ids)
        return out.assign(x=x, y=y)


@dataclass
class FileBlocks:
    """`ReclusterRows.table()` as `member_parts.RowBlocks`: its rows made a block at a time,
    the cases' `fields` taken at each block's rows, so the whole table (two rows a case with
    every field and the problem text) and its encoding are never held."""

    parts: ReclusterRows
    fields: pd.DataFrame

    def __len__(self) -> int:
        return len(self.parts.heads)

    def types(self) -> pa.Schema:
        """Each column's Arrow type in the whole table, without it: a field column holds the
        frame's values (every case is a cross-type row, the other rows repeat cases), so the
        type inferred from them is the one inferred from the whole column's."""
        body = self.fields.rename(columns={"cluster_text": "problem"})
        cols = [*self.parts.heads.items(), *body.items()]
        return pa.schema([(str(name), _arrow_type(col)) for name, col in cols])

    def block(self, a: int, b: int) -> pd.DataFrame:
        return self.parts.block(a, b, self.fields)

    def whole(self) -> pd.DataFrame:
        return self.parts.table()


def _arrow_type(col: pd.Series) -> pa.DataType:
    """The type `pa.Table.from_pandas` gives `col`: an object column's inferred from its values
    (Arrow's inference, without converting them), another's from its dtype."""
    if col.dtype == object:
        return pa.infer_type(col.to_numpy(), from_pandas=True)
    return pa.Schema.from_pandas(col.iloc[:0].to_frame(), preserve_index=False).field(0).type


class NotText(ValueError):
    """A membership part's text column holds a value that is not text (found in a row group):
    the object form converts it as it is, so the part is built from pandas rows."""


@dataclass
class PartGroups:
    """The membership part of the whole table (`member_part_table(stored_members(...))`) made a
    row group (`membership.append_groups` asks for each) at a time, each column made in Arrow in
    its type from that group's rows alone: built whole and written as one row group, the part (two
    rows a case) was the peak of the export a back-fill ends with (+167 MiB at 400k stored
    cases). `schema` is the whole part's, its pandas metadata the object form's; `last`, each
    case's frame row holding its id's run (`last_rows`), None without run ids."""

    parts: ReclusterRows
    schema: pa.Schema
    ids: pa.Array
    last: np.ndarray | None

    def __len__(self) -> int:
        return len(self.parts.heads)

    def group(self, a: int, b: int) -> pa.Table:
        """Member rows [a, b) of the part; `NotText` where a text column's value is not text."""
        at = rows_between(self.parts.rows, a, b)  # each row's case
        columns = []
        for f in self.schema:
            try:
                columns.append(self._column(f.name, a, b, at).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                raise NotText(f.name) from e
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _column(self, name: str, a: int, b: int, at: np.ndarray) -> pa.Array:
        """One column of rows [a, b), as Arrow makes it from the object form's values."""
        heads = self.parts.heads
        if name == "case_id":
            return self.ids.take(pa.array(at))
        if name == "run_id":
            return run_ids_at(self.parts.frame, at if self.last is None else self.last[at])
        if name in ("scope", "cluster_id"):
            return pa.array(heads[name].iloc[a:b].to_numpy(dtype=object), pa.large_string(), from_pandas=True)
        if name == "is_noise":
            return pa.array(heads["is_noise"].iloc[a:b].to_numpy(dtype=bool))
        if name == "similarity":
            values = pd.to_numeric(heads["similarity"].iloc[a:b], errors="coerce").to_numpy(dtype=np.float64)
        else:  # the map's x or y: the cross-type rows' points, none for the others
            values = np.full(b - a, np.nan)
            xy = self.parts.xy
            if xy is not None and a < self.parts.lead:
                end = min(b, self.parts.lead)
                values[: end - a] = xy[0 if name == "x" else 1][a:end]
        return pa.array(values, from_pandas=True)


def part_groups(parts: ReclusterRows) -> PartGroups | None:
    """The membership part of the whole table as `PartGroups`. The schema (and its pandas
    metadata) is the object form's, taken from a one-row frame of each text column's first value,
    as `membership._arrow_texts_table` takes it. None where that cannot be the same table (a text
    column without a value, no case ids): then the caller builds it from pandas rows."""
    if "case_id" not in parts.frame or not len(parts.heads):
        return None
    ids = arrow_strings(parts.frame["case_id"])
    # Each case's run found once, not once a member row (`export._run_ids`).
    last = last_rows(ids, ids) if "run_id" in parts.frame else None
    first = _first_texts(parts, ids, last)
    if first is None:
        return None  # Arrow's null type in the object form
    sample = pd.DataFrame(
        {
            **{c: pd.Series([v], dtype=object) for c, v in first.items()},
            "is_noise": pd.Series([False], dtype=bool),
            **{c: pd.Series([np.nan], dtype=np.float64) for c in ("similarity", "x", "y")},
        }
    )[MEMBER_COLUMNS]
    return PartGroups(parts, pa.Table.from_pandas(sample, preserve_index=False).schema, ids, last)


def _first_texts(parts: ReclusterRows, ids: pa.Array, last: np.ndarray | None) -> dict[str, str] | None:
    """Each text column's first value, None where a column has none."""
    valid = np.asarray(ids.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    case = next((int(r[valid[r]][0]) for r in parts.rows if valid[r].any()), None)
    if case is None:
        return None
    at = rows_between(parts.rows, 0, 1)  # the first member row's case
    first = {
        "case_id": ids[case].as_py(),
        "run_id": run_ids_at(parts.frame, at if last is None else last[at])[0].as_py(),
    }
    for name in ("scope", "cluster_id"):
        col = parts.heads[name]
        where = col.first_valid_index()
        if where is None:
            return None
        first[name] = col.loc[where]
    return first


def last_rows(values: pa.Array, ids: pa.Array) -> np.ndarray:
    """Each of `values`' last position in `ids` (a frame's case ids), -1 where none or missing:
    the row a dict built from the rows in order keeps."""
    last = index_in(values, ids[::-1])
    return np.where(last >= 0, len(ids) - 1 - last, -1)


def run_ids_at(frame: pd.DataFrame, pos: np.ndarray) -> pa.Array:
    """The frame's run ids at rows `pos`, "" at -1 or without run ids: the membership's key."""
    if "run_id" not in frame:
        return pa.array([""] * len(pos), pa.large_string())
    runs = arrow_strings(frame["run_id"]).take(pa.array(pos, mask=pos < 0))
    return pc.fill_null(runs, "")


def recluster_rows(
    frame: pd.DataFrame,
    heads: pd.DataFrame | None,
    rows: list[np.ndarray],
    xy: tuple[np.ndarray, np.ndarray] | None,
) -> ReclusterRows | None:
    """The parts of a re-cluster's members table, or None where its first scope is not the
    cross-type one holding every case in order (the whole table is built then)."""
    if heads is None or not len(frame) or not leads_in_order(rows, len(frame)):
        return None
    if not (heads["scope"].iloc[: len(frame)] == ALL_SCOPE).all():
        return None
    # The member fields and run ids alone, all the parts read, copied: the texts stay Arrow's,
    # shared, and the one number (emotion_score) becomes its own. The cases' eight float columns
    # are one pandas block, and a view of one kept all eight alive for as long as the tables held
    # these rows, after the cases were let go.
    held = frame[[c for c in (*MEMBER_FIELDS, "run_id") if c in frame]].copy()
    return ReclusterRows(held, heads, rows, xy)


def take_by_windows(frame: pd.DataFrame, rows: np.ndarray, window: int = WINDOW_ROWS) -> pd.DataFrame:
    """`frame.iloc[rows]`, read `window` of the frame's rows at a time in ascending order, the
    pages mapped from the export's case copy dropped after each (`release_mapped_pages`).

    Why: a per-type scope's block of member rows picks cases from across the whole history, so
    one take touched a page of every text column nearly everywhere: at the members file's write
    of a 129k-case re-cluster 44.5 MiB of the copy were resident (`/proc/self/smaps`), the
    export's peak, and it grew with the history. Each window is sliced before it is taken from:
    Arrow takes from a column of several chunks by joining them first, a copy of the whole
    column. The same rows, in the same order, with the same index: the pieces are joined and
    put back in the order asked."""
    if not len(rows):
        return frame.iloc[rows]
    first = int(rows.min())
    if int(rows.max()) - first < window:
        out = frame.iloc[first : int(rows.max()) + 1].iloc[rows - first]
        release_mapped_pages()
        return out
    order = np.argsort(rows, kind="stable")
    at = rows[order]
    cuts = np.flatnonzero(np.diff(at // window)) + 1
    pieces = []
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(at)]):
        start = int(at[lo]) // window * window
        pieces.append(frame.iloc[start : start + window].iloc[at[lo:hi] - start])
        release_mapped_pages()
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return pd.concat(pieces).iloc[back]


def rows_between(rows: list[np.ndarray], a: int, b: int) -> np.ndarray:
    """`np.concatenate(rows)[a:b]`, without the whole concatenation."""
    out, start = [], 0
    for r in rows:
        end = start + len(r)
        if end > a and start < b:
            out.append(r[max(a - start, 0) : min(b, end) - start])
        start = end
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _arrow_text(col: pd.Series) -> pd.Series:
    """A text column of Python strings (missing: None) as Arrow text, or as is where a value
    is not a string."""
    if arrow_backed(col):
        return col
    values = col.dropna()
    if not len(values) or not all(isinstance(v, str) for v in pd.unique(values.to_numpy(dtype=object))):
        return col
    return col.astype(pd.StringDtype("pyarrow"))
