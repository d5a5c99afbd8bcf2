"""The stored case -> cluster membership and the clustering model between exports.

Layout under `<out>/state/clusters/`:
- `members/part-<seq>.parquet`: membership rows (MEMBER_COLUMNS + seq). A night appends one part
  with its new and re-processed cases only, so appending is cheap; a case's rows in the newest
  part that holds it replace its older ones (re-processed cases are re-assigned, not doubled).
  A full re-cluster writes one part with every case and moves `members_from` past the older
  parts, which are then deleted.
- `projections.parquet`: each scope's PCA (and the report map's), `described.parquet`: the last
  re-cluster's cluster descriptions, `meta.json`: last full re-cluster day and `members_from`.
`meta.json` is written last, so an export killed midway leaves the previous generation in force.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.insights.cluster import Projection
from pipeline.insights.incremental import MEMBER_COLUMNS
from pipeline.insights.member_parts import group_bounds
from pipeline.io import atomic_write_parquet, atomic_write_parquet_groups, atomic_write_text, write_cache

_PART = re.compile(r"part-(\d+)\.parquet$")
COMPACT_PARTS = 60  # more parts than this and the membership is rewritten as one
# Every part's Parquet row groups hold this many rows (`append_groups`): a re-cluster's part (two
# rows a case) built whole and written as one group was the peak of a back-fill's export. The
# batch of the part's Arrow copy (`_read_part`, feather's 64K) too: a night reads the same chunks.
GROUP_ROWS = 65_536


def state_dir(out: Path) -> Path:
    return Path(out) / "state" / "clusters"


def members_dir(out: Path) -> Path:
    return state_dir(out) / "members"


def load_meta(out: Path) -> dict[str, Any]:
    p = state_dir(out) / "meta.json"
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def save_meta(out: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(state_dir(out) / "meta.json", json.dumps(meta, ensure_ascii=False, indent=2) + "\n")


def _parts(out: Path) -> list[tuple[int, Path]]:
    d = members_dir(out)
    found = (
        [(int(m.group(1)), p) for p in d.glob("part-*.parquet") if (m := _PART.search(p.name))] if d.is_dir() else []
    )
    return sorted(found)


def last_part(out: Path) -> int:
    """The newest membership part's sequence number (0: none)."""
    return max((s for s, _ in _parts(out)), default=0)


def current_parts(out: Path, meta: dict[str, Any]) -> list[tuple[int, Path]]:
    """The membership parts `read_members` reads (from `members_from` on), in order."""
    start = int(meta.get("members_from", 0))
    return [(s, p) for s, p in _parts(out) if s >= start]


def first_row(seq: int, path: Path) -> pd.DataFrame | None:
    """A part's first row as `read_members` gives it (its columns' types: what a night's new rows
    are joined to), read without decoding the part; None where it has none."""
    try:
        f = pq.ParquetFile(path)
        batch = next(f.iter_batches(batch_size=1), None)
    except (OSError, pa.ArrowException):
        return None
    if batch is None or not batch.num_rows or b"PANDAS_ATTRS" in (f.schema_arrow.metadata or {}):
        return None
    table = pa.Table.from_batches([batch.slice(0, 1)]).replace_schema_metadata(f.schema_arrow.metadata)
    return table.to_pandas().assign(seq=seq)


@dataclass
class Members:
    """The current membership (`frame`) and where its rows came from: `rows`, every row of the
    parts it was read from (seq, path, row count) in order, and `kept`, which of them `frame`
    holds (for `member_rows`, which keeps facts per part row between nights)."""

    frame: pd.DataFrame
    rows: pd.DataFrame
    parts: list[tuple[int, Path, int]]
    kept: np.ndarray


def read_members(out: Path, meta: dict[str, Any]) -> Members:
    """`load_members`, with where its rows came from."""
    parts = current_parts(out, meta)
    if not parts:
        empty = pd.DataFrame(columns=[*MEMBER_COLUMNS, "seq"])
        return Members(empty, empty, [], np.zeros(0, dtype=bool))
    frames = [_read_part(out, s, p).assign(seq=s) for s, p in parts]
    _drop_copies(out, {s for s, _ in parts})
    df = pd.concat(frames, ignore_index=True)
    # A part's rows are kept unless a newer part holds their case: looked up in Arrow part by
    # part, newest first (a groupby of every row by case id cost 20 ms a night at 100k cases,
    # most of them in the one part a full re-cluster wrote).
    keep: list[np.ndarray] = []
    newer = pa.array([], pa.large_string())
    for f in reversed(frames):
        ids = pa.array(f["case_id"], from_pandas=True)
        ids = (ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids).cast(pa.large_string())
        # A missing case id is kept by no part, as the groupby left it out.
        kept = pc.and_(pc.invert(pc.is_in(ids, value_set=newer)), pc.is_valid(ids))
        keep.append(np.asarray(pc.fill_null(kept, False).to_numpy(zero_copy_only=False), dtype=bool))
        newer = pa.concat_arrays([newer, ids])
    rows = np.concatenate(keep[::-1])
    # Usually every row (one re-cluster's part, nights of new cases): a filter copied them all,
    # 0.1 s at 1M stored cases.
    frame = df if rows.all() else df[rows].reset_index(drop=True)
    return Members(frame, df, [(s, p, len(f)) for (s, p), f in zip(parts, frames)], rows)


def copies_dir(out: Path) -> Path:
    """Uncompressed copies of the membership parts (`_read_part`): a cache."""
    return Path(out) / "state" / "cache" / "members"


_COPY_META = b"casemine_member_part"


def _read_part(out: Path, seq: int, path: Path) -> pd.DataFrame:
    """`pd.read_parquet(path)`, from an uncompressed Arrow copy of the part kept between nights.

    Why: a re-cluster's part holds every case twice (2M rows at 1M stored cases) and decoding
    it took 0.3-0.5 s each night; the copy is read (`pd.read_feather`: the same conversion to
    pandas as `read_parquet`) in 0.15 s, for 16x the disk (168 MB at 1M). A copy names the
    part's size and mtime: one of another part (the number written again) or unreadable is
    ignored and written again; one that cannot be written costs the next night its speed."""
    import pyarrow.feather as feather
    import pyarrow.ipc as ipc

    copy = copies_dir(out) / f"part-{seq:06d}.arrow"
    st = path.stat()
    stat = json.dumps([st.st_size, st.st_mtime_ns]).encode()
    try:
        with pa.memory_map(str(copy)) as src:
            found = (ipc.open_file(src).schema.metadata or {}).get(_COPY_META) == stat
        if found:
            return pd.read_feather(copy)
    except (OSError, ValueError, pa.ArrowException):
        pass  # no copy, or a broken one: read the part and write it again
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if b"PANDAS_ATTRS" in meta:
        return pd.read_parquet(path)  # read_feather would not restore them (the writer sets none)
    tagged = table.replace_schema_metadata({**meta, _COPY_META: stat})
    written = write_cache(
        copy,
        lambda f: feather.write_feather(tagged, f, compression="uncompressed"),
        "the membership part copy",
        "the next night decodes the part",
    )
    # Converted as every later night converts it.
    return pd.read_feather(copy) if written else pd.read_parquet(path)


def _drop_copies(out: Path, current: set[int]) -> None:
    d = copies_dir(out)
    for f in d.glob("part-*.arrow") if d.is_dir() else []:
        if (m := re.search(r"part-(\d+)\.arrow$", f.name)) and int(m.group(1)) not in current:
            f.unlink(missing_ok=True)


def load_members(out: Path, meta: dict[str, Any]) -> tuple[pd.DataFrame, int]:
    """The current membership (one set of rows per case: its newest part's) and the number of
    parts it was read from."""
    m = read_members(out, meta)
    return m.frame, len(m.parts)


def append_members(out: Path, rows: pd.DataFrame) -> int:
    """Write `rows` as the next part; returns its sequence number."""
    return append_part(out, member_part_table(rows))


def append_part(out: Path, table: pa.Table) -> int:
    """Write a part's table (`member_part_table`'s) as the next part; returns its number."""
    return append_groups(out, table.schema, table.num_rows, lambda a, b: table.slice(a, b - a))


def append_groups(out: Path, schema: pa.Schema, n: int, group: Callable[[int, int], pa.Table]) -> int:
    """Write a part of `n` rows as the next part, made a row group at a time (`group(a, b)`: its
    rows [a, b), `schema` with its metadata the part's); returns its number. The one rule for
    every part, whoever writes it: row groups of `GROUP_ROWS` rows, each column in one chunk, so
    the same rows give the same bytes (a re-cluster's part made a group at a time, a night's or a
    compaction's whole); a part within one group has the bytes it had written as one table."""
    seq = last_part(out) + 1
    groups = (group(a, b) for a, b in group_bounds(n, GROUP_ROWS))
    atomic_write_parquet_groups(members_dir(out) / f"part-{seq:06d}.parquet", schema, groups)
    return seq


_MEMBER_TEXTS = ("case_id", "run_id", "scope", "cluster_id")


def member_part_table(rows: pd.DataFrame) -> pa.Table:
    """`rows` as a membership part: its text columns as Python objects (missing: None) converted
    by Arrow, as they have always been written (the part's schema and pandas metadata)."""
    # No copy: every column changed below is replaced, not written into (pandas' copy on write),
    # and a copy of the 2 rows a case after a re-cluster was held at the export's last step.
    t = rows[MEMBER_COLUMNS].reset_index(drop=True)
    for c in ("similarity", "x", "y"):
        t[c] = pd.to_numeric(t[c], errors="coerce").astype(np.float64)
    t["is_noise"] = t["is_noise"].astype(bool)
    direct = _arrow_texts_table(t)
    if direct is not None:
        return direct
    for c in _MEMBER_TEXTS:
        t[c] = t[c].astype(object).where(t[c].notna(), None)
    return pa.Table.from_pandas(t, preserve_index=False)


def _arrow_texts_table(t: pd.DataFrame) -> pa.Table | None:
    """The object form's table (`member_part_table`) with the text columns cast from their Arrow
    arrays, None where that cannot be the same table (a text column not Arrow strings, or with
    no value: Arrow's null type there). Why: the object form made a Python str of every value,
    2 rows a case after a re-cluster (4 columns, ~70 bytes each), the top of the export's last
    step; the Arrow arrays are there already. The schema and its pandas metadata are the object
    form's, taken from a one-row frame of each column's first value."""
    texts = {}
    for c in _MEMBER_TEXTS:
        dtype = t[c].dtype
        if not (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"):
            return None
        arr = pa.chunked_array([pa.array(t[c].array)]) if len(t) else None
        if arr is None or arr.null_count == len(arr):
            return None
        texts[c] = arr
    sample = t.iloc[:1].copy()
    for c in _MEMBER_TEXTS:  # each has a value (checked above)
        sample[c] = pd.Series([t[c].loc[t[c].first_valid_index()]], index=sample.index, dtype=object)
    schema = pa.Table.from_pandas(sample, preserve_index=False).schema
    rest = pa.Table.from_pandas(t.drop(columns=list(_MEMBER_TEXTS)), preserve_index=False)
    columns = [
        texts[c].cast(schema.field(c).type).combine_chunks() if c in texts else rest.column(c).combine_chunks()
        for c in schema.names
    ]
    if any(col.type != f.type for col, f in zip(columns, schema)):
        return None
    return pa.Table.from_arrays(columns, schema=schema)


def drop_parts_before(out: Path, seq: int) -> None:
    for s, p in _parts(out):
        if s < seq:
            p.unlink(missing_ok=True)


def save_projections(out: Path, projections: dict[str, Projection]) -> None:
    rows = [
        {
            "scope": scope,
            "mean": None if p.mean is None else p.mean.astype(float).tolist(),
            "components": None if p.components is None else p.components.astype(float).ravel().tolist(),
            "n_components": 0 if p.components is None else int(p.components.shape[0]),
        }
        for scope, p in projections.items()
    ]
    df = pd.DataFrame(rows, columns=["scope", "mean", "components", "n_components"])
    atomic_write_parquet(state_dir(out) / "projections.parquet", pa.Table.from_pandas(df, preserve_index=False))


def load_projections(out: Path) -> dict[str, Projection]:
    p = state_dir(out) / "projections.parquet"
    if not p.is_file():
        return {}
    out_: dict[str, Projection] = {}
    for r in pd.read_parquet(p).to_dict("records"):
        k = int(r["n_components"])
        if k == 0:
            out_[str(r["scope"])] = Projection()
            continue
        mean = np.asarray(r["mean"], dtype=np.float32)
        out_[str(r["scope"])] = Projection(mean, np.asarray(r["components"], dtype=np.float32).reshape(k, len(mean)))
    return out_


def save_described(out: Path, clusters: pd.DataFrame) -> None:
    t = clusters.reset_index(drop=True).copy()
    atomic_write_parquet(state_dir(out) / "described.parquet", pa.Table.from_pandas(t, preserve_index=False))


def load_described(out: Path) -> pd.DataFrame:
    p = state_dir(out) / "described.parquet"
    return pd.read_parquet(p) if p.is_file() else pd.DataFrame()
