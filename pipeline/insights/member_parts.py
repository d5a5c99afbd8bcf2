"""The export's members table as parts: a night writes its new cases' rows and links the rest.

Layout: `exports/<day>/members.parquet/part-<n>.parquet` and `members.csv/part-<n>.csv`, the
same rows in each pair; the parts together are the members table. The folders keep the names the
single files had, as Spark and Hive name a table's folder: `pd.read_parquet(folder /
"members.parquet")` (and DuckDB, Polars) still read the whole table, and each CSV part opens in a
spreadsheet.

Why: the members table has a row per case and scope, with its problem text. Written whole, a
100k history cost 0.23 s a night and 69 MB on disk in every day's folder (a year of nightly
folders would hold the history 365 times). On an incremental night the rows of the cases
already exported do not change: the previous folder's parts are hard-linked (no bytes copied,
no disk used) and one part with the night's new cases is written. Everything is written again
as one part when that does not hold: a full re-cluster, cases re-processed or removed, cases
classified in memory at export (stored without an issue type), a `since` view, the state's
membership compacted, or a previous folder that does not match the state (checked by the
membership part it was written from and its row count).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pandas as pd
import pyarrow as pa

MEMBERS = "members"
PARQUET_DIR, CSV_DIR = f"{MEMBERS}.parquet", f"{MEMBERS}.csv"
MAX_PARTS = 60  # more and the next night writes the table again as one part
_PART = re.compile(r"^part-(\d{6})\.parquet$")
# Every part's Parquet row groups hold this many rows (the last fewer), whoever writes it: a
# re-cluster's part is written a block of rows at a time (its whole table, two rows a case with
# their texts, and its one row group's encoding were the peak of the export a back-fill ends
# with), and the same rows give the same file written whole (a night's, a compaction's).
# 16,384: a block of 65,536 rows took 36-40 MiB as its pandas rows and their Arrow table, and
# two were alive while the next was made (+101 MiB over a 60k history's re-cluster export).
GROUP_ROWS = 16_384


class RowBlocks(Protocol):
    """A part's rows made a block at a time as they are written, not held whole."""

    def __len__(self) -> int: ...

    def types(self) -> pa.Schema:
        """The Arrow type of each column of all the rows (no metadata)."""
        ...

    def block(self, a: int, b: int) -> pd.DataFrame:
        """Rows [a, b), with the columns and dtypes of all the rows."""
        ...

    def whole(self) -> pd.DataFrame:
        """All the rows: for a file the blocks cannot make the same."""
        ...


def group_bounds(n: int, size: int | None = None) -> Iterator[tuple[int, int]]:
    """Each row group's rows [a, b) of a part of `n` rows (`size`, else `GROUP_ROWS`); an empty
    part's one."""
    size = size or GROUP_ROWS
    if not n:
        yield 0, 0
    for a in range(0, n, size):
        yield a, min(a + size, n)


def parts(folder: Path) -> list[Path]:
    """The members parts (Parquet) of an export folder, in order."""
    d = Path(folder) / PARQUET_DIR
    return sorted(p for p in d.glob("part-*.parquet") if _PART.match(p.name)) if d.is_dir() else []


def csv_part(part: Path) -> Path:
    """The CSV of a Parquet part."""
    return part.parent.parent / CSV_DIR / part.with_suffix(".csv").name


def members_files(folder: Path) -> list[Path]:
    """The Parquet files that make the members table of an export folder: its parts, or the one
    file of folders written before parts."""
    single = Path(folder) / PARQUET_DIR
    return parts(folder) or ([single] if single.is_file() else [])


def read_members(folder: Path, columns: list[str] | None = None) -> pd.DataFrame | None:
    """The members table of an export folder: its parts, or the single `members.parquet` of
    folders written before parts; None when the folder has neither."""
    found = members_files(folder)
    if not found:
        return None
    return pd.concat([pd.read_parquet(p, columns=columns) for p in found], ignore_index=True)


def reusable_parts(previous: Path | None, state_part: int, n_old_rows: int) -> list[Path]:
    """The previous export's parts when they hold exactly the members tonight keeps: written
    from the state's current membership part (`members_state_part` in its summary) and with
    `n_old_rows` rows in all. Otherwise [] (write everything)."""
    if previous is None:
        return []
    found = parts(previous)
    try:
        summary = json.loads((Path(previous) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not found or len(found) >= MAX_PARTS or summary.get("since") is not None:
        return []
    if summary.get("members_state_part") != state_part or summary.get("members_parts") != len(found):
        return []
    if (summary.get("rows") or {}).get(MEMBERS) != n_old_rows:
        return []
    return found


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)  # a filesystem without hard links: a copy is still right


def write_members(
    folder: Path,
    rows: pd.DataFrame | RowBlocks,
    reuse: list[Path],
    write_part: Callable[[Path, Path, pd.DataFrame | RowBlocks], None],
) -> int:
    """Write the members table as parts into `folder`: the `reuse` parts linked (with their
    CSVs) and `rows`, the rows after them, as the next part; with no `reuse`, `rows` is the whole
    table, one part. The caller hands the new rows alone, not the whole table and a mask: a
    filter of every member to keep a night's few joined each Arrow column's chunks (0.8 s at
    1M cases). `rows` may be `RowBlocks` (a re-cluster's, made as written). `write_part(parquet,
    csv, rows)` writes one part's two files. Returns the part count."""
    d = Path(folder) / PARQUET_DIR
    for sub in (d, Path(folder) / CSV_DIR):
        sub.mkdir(parents=True, exist_ok=True)
    if not reuse:
        first = d / "part-000001.parquet"
        write_part(first, csv_part(first), rows)
        return 1
    for p in reuse:
        _link(p, d / p.name)
        if csv_part(p).is_file():
            _link(csv_part(p), csv_part(d / p.name))
    if not len(rows):
        return len(reuse)
    n = int(_PART.match(reuse[-1].name).group(1))  # type: ignore[union-attr]
    nxt = d / f"part-{n + 1:06d}.parquet"
    write_part(nxt, csv_part(nxt), rows)
    return len(reuse) + 1
