"""File writes that never leave a half-written file behind.

Everything the pipeline stores is written to a temporary name in the same directory and renamed
into place (atomic on POSIX), so a run killed at any point leaves the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _tmp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates 0600; outputs are read by analysts on shared machines, so give them the
    # mode an ordinary open() would.
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_stream(path, lambda f: f.write(data))


def atomic_write_stream(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write `path` whole or not at all with what `write` writes to the open file (a temporary
    beside it, synced, then renamed): a big text (an export's CSV) goes to disk in pieces instead
    of whole in memory, once as text and once encoded."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_cache(path: Path, write: Callable[[BinaryIO], Any], name: str, without: str) -> bool:
    """Write a cache file whole or not at all, as `atomic_write_stream` but best effort: not
    synced (a cache lost in a crash is rebuilt), and a folder that cannot be written only logs a
    warning naming the cache and what its next reader does `without` it. Returns whether it
    was written."""
    import logging

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
        return True
    except OSError as e:
        logging.getLogger(__name__).warning("could not write %s %s (%s): %s", name, path, e, without)
        return False
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # its folder could not be made: there is nothing to remove


def write_cache_table(path: Path, table: pa.Table, key: bytes, meta: dict[str, Any], name: str, without: str) -> bool:
    """`table` as an Arrow IPC cache file (`write_cache`), `meta` kept as JSON in its schema
    metadata under `key`: what `read_cache_table` checks before it reads the rows."""
    import pyarrow.ipc as ipc

    t = table.replace_schema_metadata({key: json.dumps(meta, ensure_ascii=False).encode()})

    def write(f: BinaryIO) -> None:
        with ipc.new_file(f, t.schema) as w:
            w.write_table(t)

    return write_cache(path, write, name, without)


def read_cache_table(
    path: Path, key: bytes, columns: list[str], accept: Callable[[dict[str, Any]], bool]
) -> tuple[dict[str, Any], pa.Table] | None:
    """A `write_cache_table` file's metadata and rows, memory-mapped; None when there is none,
    it cannot be read, its metadata is not `accept`ed (checked before the rows are read), or
    its columns are not `columns`: a cache that does not answer is made again by its caller."""
    import pyarrow.ipc as ipc

    try:
        with pa.memory_map(str(path)) as src:
            reader = ipc.open_file(src)
            meta = json.loads((reader.schema.metadata or {})[key])
            if not accept(meta):
                return None
            t = reader.read_all()
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None
    return (meta, t) if t.column_names == columns else None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    tmp = _tmp_path(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_parquet_groups(path: Path, schema: pa.Schema, groups: Iterable[pa.Table]) -> None:
    """`atomic_write_parquet` of the tables `groups` gives, one after another, each one row group
    (of at most Arrow's million rows) with its columns in one chunk: a table written a block at
    a time is never whole in memory, and the bytes follow the rows alone (where a column's
    chunks end moves its pages' bounds: the same rows in other chunks were other bytes).
    `schema`, with its metadata, is the file's."""
    tmp = _tmp_path(path)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for group in groups:
                writer.write_table(group.combine_chunks())
                del group  # written: not alive while `groups` makes the next
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
