"""A reader's copy of the stored cases, kept between runs so a night reads only the new parts.

Why: the nightly export reads every stored case (a few columns, free text shrunk), and at 100k
cases decoding the ~60 Parquet parts took 0.3-0.5 s of a 1.7 s export, the same each night while
the new cases cost a few milliseconds. The copy is one uncompressed Arrow IPC file holding the
rows `read_cases` returns (the newest-row rule applied, in its order), with the parts it was read
from (path, size, mtime) in its metadata. A read maps the copy (no decoding, no copy: zstd cost
30-60 ms a night at 100k cases to decompress, for a file 5x smaller) and reads the parts it has
not seen; only their rows meet the rule: they replace the copy's rows of their cases and follow
them, as their runs are newer (a late older run's rows make it order everything again). If any
part it has seen is gone or changed (`casemine repair`, a lost or rewritten file) it reads every
part again. (Rows of parts read on different nights that tie on the run id keep the order they
were read in, where `read_cases` orders them by path; runs never share an id and every stored
row has one. The former layout did the same.)

It is a cache: never fsynced, any unreadable or foreign copy (another key, other columns, an
older layout) is ignored and rewritten, and a copy that cannot be written (a read-only output)
only costs the next read its speed. It is replaced by a rename, never written in place, so a
reader still holding the old copy mapped keeps reading it whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from pipeline.io import write_cache
from pipeline.storage.store import (
    CASE_SCHEMA,
    cases_dir,
    cases_frame,
    newest_order,
    read_cases,
    read_columns,
    read_parts,
    stored_parts,
)

log = logging.getLogger(__name__)

# The copy is rewritten once the parts it has not seen hold this share of its rows, or number
# this many: a rewrite costs the whole history (writing 43 MiB, 0.03 s at 100k cases), the unseen
# parts only their own rows, so a night of 1% new cases rewrites it about every fifth night.
REWRITE_SHARE = 0.05
REWRITE_PARTS = 16

_META = b"casemine_case_cache"
# The copy's layout: rows in `newest_order`, uncompressed. A copy without it (zstd, rows in file
# order) is ignored and rewritten.
_FORMAT = 2
# None: the copy is mapped, not decoded (43 MiB at 100k cases, larger than the parts it copies:
# 32 MiB). "lz4": 15 MiB, decoded in 16-50 ms; "zstd" (the former copy): 8 MiB, 30-110 ms. A
# reader takes any of them.
_COMPRESSION: str | None = None
Stat = tuple[int, int]


def _stat(path: Path) -> Stat:
    # Size and modification time, as make and rsync judge a file: a copy made with its times
    # (a restored backup) keeps the copy valid; a part rewritten in place changes both.
    s = path.stat()
    return (s.st_size, s.st_mtime_ns)


def _load(cache: Path, key: str, columns: list[str]) -> tuple[pa.Table, dict[str, Stat]] | None:
    """The copy and the parts it holds, or None when it is missing, unreadable, of another
    layout (`_FORMAT`) or made for other columns or another `key`."""
    try:
        with pa.memory_map(str(cache)) as src:
            reader = ipc.open_file(src)
            meta = json.loads((reader.schema.metadata or {})[_META])
            # read_parts lays columns out in the case schema's order, whatever order was asked.
            names = [f.name for f in CASE_SCHEMA if f.name in columns]
            if meta.get("format") != _FORMAT or meta.get("key") != key or reader.schema.names != names:
                return None
            # Buffers point into the map (it stays mapped while they live, closed or not).
            table = reader.read_all()
        return table.replace_schema_metadata(None), {k: tuple(v) for k, v in meta["files"].items()}
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None


def _save(cache: Path, table: pa.Table, key: str, files: dict[str, Stat]) -> None:
    meta = json.dumps({"format": _FORMAT, "key": key, "files": files}, separators=(",", ":")).encode()
    table = table.replace_schema_metadata({_META: meta})

    def write(f) -> None:
        with ipc.new_file(f, table.schema, options=ipc.IpcWriteOptions(compression=_COMPRESSION)) as w:
            w.write_table(table)

    write_cache(cache, write, "the case cache", "the next read decodes every part")


def _newest(table: pa.Table) -> pa.Table:
    """`table`'s rows as `newest_rows` keeps and orders them."""
    return table.take(pa.array(newest_order(table.select(["case_id", "run_id"]))))


def with_new_rows(copy: pa.Table, new: pa.Table) -> pa.Table:
    """`_newest(concat(copy, new))` for a `copy` that is already its own newest rows in order:
    when every new run id sorts at or after the copy's last, the sort leaves the copy first, so
    only the new rows are ordered, and the copy loses just the rows of the cases they hold (the
    rule over all history cost 70 ms a night at 100k cases, for 1,000 new rows)."""
    if not len(new):
        return copy
    last = copy["run_id"][-1] if len(copy) else None
    first_new = pc.min(new["run_id"]).as_py()  # nulls skipped: a missing run id sorts last anyway
    if last is not None and (not last.is_valid or (first_new is not None and first_new < last.as_py())):
        return _newest(pa.concat_tables([copy, new]))
    # A missing case id is one more id, as pandas' drop_duplicates counts it (skip_nulls=False).
    replaced = pc.is_in(copy["case_id"], value_set=new["case_id"].combine_chunks(), skip_nulls=False)
    if pc.any(replaced).as_py():
        copy = copy.filter(pc.invert(replaced))
    return pa.concat_tables([copy, _newest(new)])


def read_cases_cached(
    out: Path,
    cache: Path,
    columns: list[str],
    key: str,
    shrink: Callable[[pa.Table], pa.Table] | None = None,
) -> pd.DataFrame:
    """`read_cases(out, columns, shrink=shrink)` (newest row per case), reading only the parts
    the copy at `cache` has not seen; the copy takes them in once they are many
    (`REWRITE_SHARE`, `REWRITE_PARTS`). `key` names what the copy holds
    beyond its columns (the shrink rule and its version): a copy with another key is not used."""
    out = Path(out)
    files = stored_parts(out)
    wanted = [c for c in columns if c in CASE_SCHEMA.names]
    if not files:
        return read_cases(out, columns, shrink=shrink)
    read = read_columns(wanted, latest=True) or wanted
    root = cases_dir(out)
    # Stat before reading: a part changed after this is seen as changed next time.
    stats = {f.relative_to(root).as_posix(): _stat(f) for f in files}
    loaded = _load(cache, key, read)
    if loaded is not None and all(stats.get(rel) == st for rel, st in loaded[1].items()):
        copy, seen = loaded
        new = [f for f in files if f.relative_to(root).as_posix() not in seen]
        added = read_parts(new, read, shrink) if new else None
        table = copy if added is None else with_new_rows(copy, added)
        rewrite = added is not None and (len(new) >= REWRITE_PARTS or len(added) >= REWRITE_SHARE * len(copy))
    else:
        table = _newest(read_parts(files, read, shrink))
        rewrite = True
    if rewrite:
        _save(cache, table, key, stats)
    return cases_frame(table, wanted, latest=False)
