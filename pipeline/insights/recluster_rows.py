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

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.insights import member_tallies as mt
from pipeline.insights.cluster import ALL_SCOPE, MEMBER_FIELDS, _fields_at, leads_in_order
from pipeline.insights.codes import arrow_backed

BLOCK_ROWS = 65_536  # member rows counted at a time: ~5 MiB of their fields
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
        out = pd.concat([self.heads.iloc[:n], body], axis=1)
        x, y = self.xy if self.xy is not None else (np.nan, np.nan)
        return out.assign(x=x, y=y)

    def block(self, a: int, b: int, fields: pd.DataFrame) -> pd.DataFrame:
        """Member rows [a, b) with `fields` (the cases' fields, some of them) at their cases."""
        head = self.heads.iloc[a:b].reset_index(drop=True)
        body = fields.iloc[rows_between(self.rows, a, b)].reset_index(drop=True)
        return pd.concat([head, body.rename(columns={"cluster_text": "problem"})], axis=1)

    def tally(self, cross: pd.DataFrame) -> mt.Tally:
        """`member_tallies.count_members` of the whole table: the cross-type rows (`cross`)
        counted, then the other rows a block at a time, each block's counts merged on."""
        tally = mt.count_members(cross)
        counted = self.fields(_UNCOUNTED)
        for a in range(self.lead, len(self.heads), BLOCK_ROWS):
            b = min(a + BLOCK_ROWS, len(self.heads))
            tally = merge_tallies(tally, mt.count_members(self.block(a, b, counted), start=a))
        return tally

    def table(self) -> pd.DataFrame:
        """The whole members table (the members file's rows, without the map's x/y), as
        `members_with_fields` builds it: made just before it is written."""
        body = _fields_at(self.fields(), self.rows).rename(columns={"cluster_text": "problem"})
        return pd.concat([self.heads, body], axis=1)

    def stored(self) -> pd.DataFrame:
        """The membership part's columns of the whole table but its run ids (`stored_members`
        adds them): each row's case id, head and map point. Scope and cluster id as Arrow text
        where every value is text, so that the part is cast from Arrow (`member_part_table`):
        as Python objects, with the case and run ids, they were 2 strings a row."""
        case_ids = _fields_at(self.fields()[["case_id"]], self.rows)["case_id"] if "case_id" in self.frame else None
        x = np.full(len(self.heads), np.nan)
        y = np.full(len(self.heads), np.nan)
        if self.xy is not None:
            x[: self.lead], y[: self.lead] = self.xy
        out = self.heads.assign(**{c: _arrow_text(self.heads[c]) for c in ("scope", "cluster_id")})
        if case_ids is not None:
            out.insert(0, "case_id", case_ids)
        return out.assign(x=x, y=y)


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
    return ReclusterRows(frame, heads, rows, xy)


def rows_between(rows: list[np.ndarray], a: int, b: int) -> np.ndarray:
    """`np.concatenate(rows)[a:b]`, without the whole concatenation."""
    out, start = [], 0
    for r in rows:
        end = start + len(r)
        if end > a and start < b:
            out.append(r[max(a - start, 0) : min(b, end) - start])
        start = end
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def merge_tallies(kept: mt.Tally, new: mt.Tally) -> mt.Tally:
    """`member_tallies.merge`, where the kept rows' daily counts may be none yet (their rows had
    no cluster): the empty frame's columns would change the joined counts' text type."""
    if kept.days is not None and new.days is not None and not len(kept.days):
        kept = dataclasses.replace(kept, days=new.days.iloc[0:0])
    return mt.merge(kept, new)


def _arrow_text(col: pd.Series) -> pd.Series:
    """A text column of Python strings (missing: None) as Arrow text, or as is where a value
    is not a string."""
    if arrow_backed(col):
        return col
    values = col.dropna()
    if not len(values) or not all(isinstance(v, str) for v in pd.unique(values.to_numpy(dtype=object))):
        return col
    return col.astype(pd.StringDtype("pyarrow"))
