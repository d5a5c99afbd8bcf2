"""A reader's copy of the stored cases, kept between runs so a night reads only the new parts.

Why: the nightly export reads every stored case (a few columns, free text shrunk), and at 100k
cases decoding the ~60 Parquet parts took 0.3-0.5 s of a 1.7 s export, the same each night while
the new cases cost a few milliseconds. The copy is one zstd Arrow IPC file holding the rows the
newest-row rule keeps, with the parts it was read from (path, size, mtime) in its
metadata. A read takes the copy plus the parts it has not seen; if any part it has seen is gone
or changed (`casemine repair`, a lost or rewritten file) it reads every part again. Rows are
the same as `read_cases` gives, in the same order: new runs' rows sort after the copy's by run
id, and the rows the copy dropped were each superseded by a newer run's row it kept.

It is a cache: never fsynced, any unreadable or foreign copy is ignored and rewritten, and a copy
that cannot be written (a read-only output) only costs the next read its speed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline.io import write_cache
from pipeline.storage.store import (
    CASE_SCHEMA,
    cases_dir,
    cases_frame,
    newest_row_mask,
    read_cases,
    read_columns,
    read_parts,
    stored_parts,
)

log = logging.getLogger(__name__)

# The copy is rewritten once the parts it has not seen hold this share of its rows, or number
# this many: a rewrite costs the whole history (0.05 s at 100k), the unseen parts only their own
# rows, so a night of 1% new cases rewrites it about every fifth night.
REWRITE_SHARE = 0.05
REWRITE_PARTS = 16

_META = b"casemine_case_cache"
Stat = tuple[int, int]


def _stat(path: Path) -> Stat:
    # Size and modification time, as make and rsync judge a file: a copy made with its times
    # (a restored backup) keeps the copy valid; a part rewritten in place changes both.
    s = path.stat()
    return (s.st_size, s.st_mtime_ns)


def _load(cache: Path, key: str, columns: list[str]) -> tuple[pa.Table, dict[str, Stat]] | None:
    """The copy and the parts it holds, or None when it is missing, unreadable or made for other
    columns or another `key`."""
    try:
        with pa.memory_map(str(cache)) as src:
            reader = ipc.open_file(src)
            meta = json.loads((reader.schema.metadata or {})[_META])
            # read_parts lays columns out in the case schema's order, whatever order was asked.
            if meta.get("key") != key or reader.schema.names != [f.name for f in CASE_SCHEMA if f.name in columns]:
                return None
            table = reader.read_all()
        return table.replace_schema_metadata(None), {k: tuple(v) for k, v in meta["files"].items()}
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None


def _save(cache: Path, table: pa.Table, key: str, files: dict[str, Stat]) -> None:
    meta = json.dumps({"key": key, "files": files}, separators=(",", ":")).encode()
    table = table.replace_schema_metadata({_META: meta})

    def write(f) -> None:
        with ipc.new_file(f, table.schema, options=ipc.IpcWriteOptions(compression="zstd")) as w:
            w.write_table(table)

    write_cache(cache, write, "the case cache", "the next read decodes every part")


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
    seen: dict[str, Stat] = {}
    tables: list[pa.Table] = []
    if loaded is not None and all(stats.get(rel) == st for rel, st in loaded[1].items()):
        tables.append(loaded[0])
        seen = loaded[1]
    new = [f for f in files if f.relative_to(root).as_posix() not in seen]
    if new:
        tables.append(read_parts(new, read, shrink))
    table = pa.concat_tables(tables).combine_chunks()
    n_seen = len(tables[0]) if seen else 0
    if new and (not seen or len(new) >= REWRITE_PARTS or len(table) - n_seen >= REWRITE_SHARE * n_seen):
        keep = newest_row_mask(table.select(["case_id", "run_id"]))
        _save(cache, table.filter(pa.array(keep)), key, stats)
    return cases_frame(table, wanted, latest=True)
