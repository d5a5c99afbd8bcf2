"""A reader's copy of the stored cases, kept between runs so a night reads only the new parts.

Why: the nightly export reads every stored case (a few columns, free text shrunk), and at 100k
cases decoding the ~60 Parquet parts took 0.3-0.5 s of a 1.7 s export, the same each night while
the new cases cost a few milliseconds. The copy holds the rows `read_cases` returns (the
newest-row rule applied, in its order) and the parts it was read from (path, size, mtime). A read
maps the copy (no decoding, no copy) and reads the parts it has not seen; only their rows meet
the rule: they replace the copy's rows of their cases and follow them, as their runs are newer
(a late older run's rows make it order everything again). If any part it has seen is gone or
changed (`casemine repair`, a lost or rewritten file) it reads every part again. (Rows of parts
read on different nights that tie on the run id keep the order they were read in, where
`read_cases` orders them by path; runs never share an id and every stored row has one.)

Layout: a folder with one file per Arrow buffer of each column (validity bits, offsets, data;
text as large_string, the type pandas keeps it in, so the frame is built without a cast) and
`meta.json` naming the files' sizes. Why not one Arrow IPC file: a night's new rows then made a
second chunk, and joining them to the mapped history copied every column (430 MB, 1.2 s of a 10 s
night at 1M stored cases), as every later take on a two-chunk column would. Here a night that
only adds rows after the copy's writes them at the ends of the files, in place, and the mapped
columns are one chunk again: a night costs its own rows. A night that replaces rows of the copy
(re-processed cases, a late older run) writes it whole, as do new rows past `REWRITE_SHARE`.

It is a cache, never fsynced, and never trusted beyond what `meta.json` (replaced by a rename,
last) records: bytes past the recorded sizes (an append cut short) are ignored and overwritten,
in-place writes never change a recorded row (a bitmap's shared last byte is written with the
same bits), the bytes appended since the copy was written whole carry a checksum that a read
verifies, and any unreadable, short or foreign copy (another key, other columns, an older
layout) is ignored and written again. A whole write goes to a new folder, so a reader still
holding the old copy mapped keeps reading it; a copy that cannot be written (a read-only output)
only costs the next read its speed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

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

# The copy is written whole once the rows appended since it last was reach this share of it: the
# checksum a read verifies covers those rows, so this bounds what a read reads beyond mapping.
REWRITE_SHARE = 0.05

# The copy's layout; a copy of another (the former single Arrow file, or none) is written again.
_FORMAT = 3
_META = "meta.json"
Stat = tuple[int, int]


def _stat(path: Path) -> Stat:
    # Size and modification time, as make and rsync judge a file: a copy made with its times
    # (a restored backup) keeps the copy valid; a part rewritten in place changes both.
    s = path.stat()
    return (s.st_size, s.st_mtime_ns)


def _storage(field: pa.Field) -> pa.Field:
    """A column as the copy keeps it: text as large_string (what pandas holds it as: the frame is
    then the mapped buffers, not a cast copy), fixed-width values as they are."""
    t = field.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.field(field.name, pa.large_string())
    if pa.types.is_boolean(t) or (pa.types.is_primitive(t) and t.bit_width % 8 == 0):
        return field
    raise TypeError(f"the case copy keeps text and fixed-width columns only, not {field.name} ({t})")


def _bits(values: np.ndarray) -> bytes:
    return np.packbits(values, bitorder="little").tobytes()


def _is_bitmap(name: str, schema: pa.Schema) -> bool:
    i, kind = name.split(".")
    return kind == "valid" or pa.types.is_boolean(schema.field(int(i)).type)


def _pieces(i: int, head: pa.Array, new: pa.Array, n0: int, text_size: int) -> dict[str, tuple[int, Any]]:
    """What writing `new` after the copy's first `n0` rows puts into column `i`'s files, as
    (position, bytes). Bitmaps start at the byte the copy's last `n0 % 8` rows (`head`) share
    with the new ones, offsets at the copy's end offset (`text_size`, its text's bytes): both
    rewrite what is there with the same values, so no recorded row changes."""
    both = pa.concat_arrays([head, new]) if len(head) else new
    valid = np.ones(len(both), bool) if not both.null_count else both.is_valid().to_numpy(zero_copy_only=False)
    out: dict[str, tuple[int, Any]] = {f"{i}.valid": (n0 // 8, _bits(np.asarray(valid, bool)))}
    t = new.type
    if pa.types.is_boolean(t):
        data = np.asarray(both.fill_null(False).to_numpy(zero_copy_only=False), bool)
        out[f"{i}.data"] = (n0 // 8, _bits(data))
    elif pa.types.is_large_string(t):
        bufs = new.buffers()
        offs = np.zeros(1, np.int64)
        if len(new):
            offs = np.frombuffer(bufs[1], np.int64)[new.offset : new.offset + len(new) + 1]
        start, end = int(offs[0]), int(offs[-1])
        text = memoryview(bufs[2])[start:end] if end > start else b""
        moved = np.concatenate([[text_size], offs[1:] - start + text_size]).astype(np.int64)
        out[f"{i}.offsets"] = (n0 * 8, moved.tobytes())
        out[f"{i}.data"] = (text_size, text)
    else:
        w = t.bit_width // 8
        buf = new.buffers()[1]
        out[f"{i}.data"] = (n0 * w, memoryview(buf)[new.offset * w : (new.offset + len(new)) * w] if len(new) else b"")
    return out


def _write(folder: Path, pieces: dict[str, tuple[int, Any]]) -> dict[str, int]:
    """Each piece written at its position, the file cut after it (past it: an earlier append cut
    short, never recorded); returns the files' sizes."""
    sizes = {}
    for name, (pos, data) in pieces.items():
        path = folder / name
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.seek(pos)
            f.write(data)
            f.truncate(pos + len(data))
        sizes[name] = pos + len(data)
    return sizes


def _crc(path: Path, start: int, end: int) -> int:
    with open(path, "rb") as f:
        f.seek(start)
        return zlib.crc32(f.read(end - start))


def _map(path: Path, size: int) -> pa.Buffer:
    """The first `size` bytes of the file, mapped (bytes past them are not the copy's)."""
    if not size:
        return pa.py_buffer(b"")
    # Buffers point into the map (it stays mapped while they live, closed or not).
    with pa.memory_map(str(path)) as src:
        if src.size() < size:
            raise ValueError(f"{path} is shorter than recorded")
        return src.read_buffer(size)


def _load(cache: Path, key: str, schema: pa.Schema) -> tuple[pa.Table, dict[str, Stat], dict[str, Any]] | None:
    """The copy (one chunk a column, mapped), the parts it holds and its meta, or None when it is
    missing, unreadable, short, fails its checksum, or is of another layout (`_FORMAT`), other
    columns or another `key`."""
    try:
        meta = json.loads((cache / _META).read_text(encoding="utf-8"))
        if (
            meta.get("format") != _FORMAT
            or meta.get("key") != key
            or meta.get("columns") != [[f.name, str(f.type)] for f in schema]
        ):
            return None
        folder, n = cache / meta["gen"], int(meta["rows"])
        bufs = {name: _map(folder / name, int(size)) for name, size in meta["sizes"].items()}
        for name, (start, crc) in meta["check"].items():
            if zlib.crc32(memoryview(bufs[name])[start:]) != crc:
                return None
        arrays = []
        for i, f in enumerate(schema):
            kinds = ["valid", "offsets", "data"] if pa.types.is_large_string(f.type) else ["valid", "data"]
            arr = pa.Array.from_buffers(f.type, n, [bufs[f"{i}.{k}"] for k in kinds])
            arr.validate()
            arrays.append(arr)
        table = pa.Table.from_arrays(arrays, schema=schema)
        return table, {k: (int(v[0]), int(v[1])) for k, v in meta["files"].items()}, meta
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None


def _save_meta(cache: Path, meta: dict[str, Any]) -> bool:
    text = json.dumps(meta, separators=(",", ":")).encode()
    return write_cache(cache / _META, lambda f: f.write(text), "the case cache", "the next read decodes every part")


def _save(cache: Path, table: pa.Table, key: str, files: dict[str, Stat], prefix: CopyRows | None = None) -> str | None:
    """The copy written whole, into a new folder (a reader of the former keeps it), then named;
    returns its generation (None: not written). `prefix`: the generation and row count of the
    former copy whose rows are this one's first, in order (`copy_prefix`)."""
    return _save_columns(cache, table.schema, table.num_rows, iter(table.columns), key, files, prefix)


def _save_columns(
    cache: Path,
    schema: pa.Schema,
    n: int,
    columns: Iterator[pa.Array | pa.ChunkedArray],
    key: str,
    files: dict[str, Stat],
    prefix: CopyRows | None = None,
) -> str | None:
    """`_save` of a table given as its schema, row count and columns, each made only when the
    one before is written (`_written_from_parts`)."""
    gen = f"g{time.time_ns()}"
    folder = cache / gen
    try:
        folder.mkdir(parents=True)
        sizes: dict[str, int] = {}
        for i, col in enumerate(columns):
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
            if len(col) != n:
                raise ValueError(f"column {schema.field(i).name} has {len(col)} rows, not {n}")
            sizes.update(_write(folder, _pieces(i, col.slice(0, 0), col, 0, 0)))
            del col
    except OSError as e:
        log.warning("could not write the case cache %s (%s): the next read decodes every part", cache, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    starts = {name: (n // 8 if _is_bitmap(name, schema) else size) for name, size in sizes.items()}
    meta = {
        "format": _FORMAT,
        "key": key,
        "columns": [[f.name, str(f.type)] for f in schema],
        "gen": gen,
        "rows": n,
        "base_rows": n,
        "sizes": sizes,
        "check": {name: [s, _crc(folder / name, s, sizes[name])] for name, s in starts.items()},
        "files": files,
    }
    if prefix is not None:
        meta["prefix"] = [prefix[0], prefix[1]]
    if not _save_meta(cache, meta):
        shutil.rmtree(folder, ignore_errors=True)
        return None
    for old in cache.glob("g*"):
        if old.name != gen:
            shutil.rmtree(old, ignore_errors=True)
    return gen


def _append(cache: Path, meta: dict[str, Any], copy: pa.Table, new: pa.Table, files: dict[str, Stat]) -> bool:
    """`new` (rows that follow the copy's by the rule) written after the copy's rows, in place;
    whether the copy now holds them (if not, it still reads as it was: nothing recorded changed)."""
    folder, n0 = cache / meta["gen"], len(copy)
    sizes = {k: int(v) for k, v in meta["sizes"].items()}
    try:
        for i in range(copy.num_columns):
            col = copy.column(i)
            # Only the rows sharing the bitmaps' last byte: combining the column copied it whole.
            head = col.slice(n0 - n0 % 8, n0 % 8).combine_chunks()
            text = sizes[f"{i}.data"] if pa.types.is_large_string(col.type) else 0
            sizes.update(_write(folder, _pieces(i, head, new.column(i).combine_chunks(), n0, text)))
        check = {name: [s, _crc(folder / name, s, sizes[name])] for name, (s, _) in meta["check"].items()}
    except OSError as e:
        log.warning("could not write the case cache %s (%s): the next read decodes the new parts again", cache, e)
        return False
    return _save_meta(cache, {**meta, "rows": n0 + len(new), "sizes": sizes, "check": check, "files": files})


def _newest(table: pa.Table) -> pa.Table:
    """`table`'s rows as `newest_rows` keeps and orders them."""
    return table.take(pa.array(newest_order(table.select(["case_id", "run_id"]))))


def _follows(copy: pa.Table, new: pa.Table) -> bool:
    """Whether every new run id sorts at or after the copy's last: then the rule's sort leaves
    the copy first and orders only the new rows."""
    last = copy["run_id"][-1] if len(copy) else None
    first_new = pc.min(new["run_id"]).as_py()  # nulls skipped: a missing run id sorts last anyway
    return last is None or (last.is_valid and (first_new is None or first_new >= last.as_py()))


def _replaced(copy: pa.Table, new: pa.Table) -> pa.ChunkedArray:
    """Which of the copy's rows are of cases the new rows hold."""
    # A missing case id is one more id, as pandas' drop_duplicates counts it (skip_nulls=False).
    return pc.is_in(copy["case_id"], value_set=new["case_id"].combine_chunks(), skip_nulls=False)


def with_new_rows(copy: pa.Table, new: pa.Table) -> pa.Table:
    """`_newest(concat(copy, new))` for a `copy` that is already its own newest rows in order:
    when every new run id sorts at or after the copy's last, only the new rows are ordered, and
    the copy loses just the rows of the cases they hold (the rule over all history cost 70 ms a
    night at 100k cases, for 1,000 new rows)."""
    if not len(new):
        return copy
    if not _follows(copy, new):
        return _newest(pa.concat_tables([copy, new]))
    replaced = _replaced(copy, new)
    if pc.any(replaced).as_py():
        copy = copy.filter(pc.invert(replaced))
    return pa.concat_tables([copy, _newest(new)])


# Which copy a frame's rows are: its first `rows` rows are those of the copy generation `gen`, in
# order (rows after them, if any, follow them). A generation only ever grows at its end, so facts
# kept about its rows (`pipeline.insights.member_rows`) hold while it is the copy, and after it
# for the copy it leads (`copy_prefix`): `accepts` says which.
CopyRows = tuple[str, int]


def read_cases_cached(
    out: Path,
    cache: Path,
    columns: list[str],
    key: str,
    shrink: Callable[[pa.Table], pa.Table] | None = None,
) -> pd.DataFrame:
    """`read_cases(out, columns, shrink=shrink)` (newest row per case), reading only the parts
    the copy in the folder `cache` has not seen, and taking them into it. `key` names what the
    copy holds beyond its columns (the shrink rule and its version): a copy with another key is
    not used."""
    return read_cases_copy(out, cache, columns, key, shrink)[0]


def read_cases_copy(
    out: Path,
    cache: Path,
    columns: list[str],
    key: str,
    shrink: Callable[[pa.Table], pa.Table] | None = None,
) -> tuple[pd.DataFrame, CopyRows | None]:
    """`read_cases_cached`, and which copy its rows are (None: none written)."""
    out = Path(out)
    files = stored_parts(out)
    wanted = [c for c in columns if c in CASE_SCHEMA.names]
    if not files:
        return read_cases(out, columns, shrink=shrink), None
    read = read_columns(wanted, latest=True) or wanted
    schema = pa.schema([_storage(f) for f in CASE_SCHEMA if f.name in read])
    root = cases_dir(out)
    # Stat before reading: a part changed after this is seen as changed next time.
    stats = {f.relative_to(root).as_posix(): _stat(f) for f in files}
    loaded = _load(cache, key, schema)
    rows: CopyRows | None
    if loaded is not None and all(stats.get(rel) == st for rel, st in loaded[1].items()):
        copy, seen, meta = loaded
        new = [f for f in files if f.relative_to(root).as_posix() not in seen]
        table, rows = copy, (meta["gen"], len(copy))
        if new:
            added = read_parts(new, read, shrink).cast(schema)
            appended = int(meta["rows"]) - int(meta["base_rows"]) + len(added)
            fits = appended <= REWRITE_SHARE * (len(copy) + len(added))
            grows = _follows(copy, added) and not pc.any(_replaced(copy, added)).as_py()
            if fits and grows:
                ordered = _newest(added)
                reread = _load(cache, key, schema) if _append(cache, meta, copy, ordered, stats) else None
                # Mapped again: the history and tonight's rows as one chunk, nothing copied.
                table = reread[0] if reread is not None else pa.concat_tables([copy, ordered])
                rows = (meta["gen"], len(table) if reread is not None else len(copy))
            else:
                # Only grown (past the share appended in place): the copy's rows lead the new one.
                prefix = (str(meta["gen"]), len(copy)) if grows else None
                table, rows = _written(cache, with_new_rows(copy, added), key, stats, schema, prefix)
    else:
        table, rows = _written_from_parts(cache, files, read, shrink, key, stats, schema)
    return cases_frame(table, wanted, latest=False), rows


def _written_from_parts(
    cache: Path,
    files: list[Path],
    read: list[str],
    shrink: Callable[[pa.Table], pa.Table] | None,
    key: str,
    stats: dict[str, Stat],
    schema: pa.Schema,
) -> tuple[pa.Table, CopyRows | None]:
    """`_written(cache, _newest(read_parts(files, read, shrink).cast(schema)), ...)`, the same
    files, with the parts' columns cast, ordered and written one at a time, each let go once
    written, and the copy read back mapped.

    Why: the first export of a history (a back-fill's) makes the copy from every stored part. Cast,
    ordered and combined as whole tables, every column was held three times at once (the read,
    the cast, the ordered copy): the export's first peak, and it grew with the history."""
    table = read_parts(files, read, shrink)
    order = pa.array(newest_order(table.select(["case_id", "run_id"])))
    held = {name: table.column(name) for name in table.column_names}
    del table  # each column is let go as it is written

    def columns() -> Iterator[pa.ChunkedArray]:
        for f in schema:
            yield held.pop(f.name).cast(f.type).take(order)

    gen = _save_columns(cache, schema, len(order), columns(), key, stats)
    held.clear()  # what a failed write left
    mapped = _mapped(cache, key, schema, gen)
    if mapped is not None:
        return mapped, (str(gen), len(order))
    # Not written (a read-only output): the copy in memory, as `_written` returns it.
    return _newest(read_parts(files, read, shrink).cast(schema)), None


def _written(
    cache: Path,
    table: pa.Table,
    key: str,
    files: dict[str, Stat],
    schema: pa.Schema,
    prefix: CopyRows | None = None,
) -> tuple[pa.Table, CopyRows | None]:
    """`table` written whole as the copy, and read back mapped: one chunk a column without
    combining it in memory (a second copy of every column, 1 s at 1M cases)."""
    gen = _save(cache, table, key, files, prefix)
    mapped = _mapped(cache, key, schema, gen)
    return (table, None) if mapped is None else (mapped, (str(gen), len(table)))


def _mapped(cache: Path, key: str, schema: pa.Schema, gen: str | None) -> pa.Table | None:
    """The copy generation `gen` just written, read back mapped; None when it was not written
    (`gen` None) or another writer's copy is there now."""
    if gen is None:
        return None
    reread = _load(cache, key, schema)
    return reread[0] if reread is not None and reread[2]["gen"] == gen else None


def accepts(kept_gen: Any, kept_n: Any, gen: str, n_rows: int, prefix: CopyRows | None = None) -> bool:
    """Whether facts kept about the first `kept_n` rows of copy generation `kept_gen` describe the
    first `kept_n` rows of generation `gen` (`n_rows` rows now): kept of `gen` itself (it only
    grows at its end), or of the former generation whose rows lead it (`prefix`: `copy_prefix`)
    and within the rows it handed on. The one rule every cache kept per copy row answers by: a
    cache taken through the prefix saves itself under `gen`, so later nights take it by the first
    part however many generations follow."""
    if not isinstance(kept_n, int) or isinstance(kept_n, bool) or not 0 <= kept_n <= n_rows:
        return False
    if kept_gen == gen:
        return True
    return prefix is not None and kept_gen == prefix[0] and kept_n <= prefix[1]


def copy_prefix(cache: Path, gen: str) -> CopyRows | None:
    """The former generation whose rows lead the copy generation `gen` in `cache`, in order, and
    how many: a copy written whole only because the rows appended in place passed
    `REWRITE_SHARE` keeps them, so facts kept about them still hold. None when `gen` is not the
    copy or was written from anything else."""
    try:
        meta = json.loads((cache / _META).read_text(encoding="utf-8"))
        prefix = meta.get("prefix") if meta.get("gen") == gen else None
        return (str(prefix[0]), int(prefix[1])) if prefix else None
    except (OSError, ValueError, TypeError, IndexError, KeyError):
        return None
