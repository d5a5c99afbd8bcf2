"""What the pipeline has already seen, kept in SQLite under `<out>/state/`.

Why SQLite: the commit of a run (its conversations, quarantined records, files and the run row)
must be one transaction, so a run killed anywhere before it leaves no trace and a re-run redoes
exactly that work. Parquet parts written by a run that never committed are orphans and are
deleted at the next start (see `pipeline.store.remove_orphans`).
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, run_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantined (
    raw_hash TEXT PRIMARY KEY, reason TEXT NOT NULL, run_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    run_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, contacts INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS parts (
    path TEXT PRIMARY KEY, run_id TEXT NOT NULL, sha256 TEXT NOT NULL);
"""


@dataclass(frozen=True)
class FileStamp:
    path: str
    size: int
    mtime_ns: int
    sha256: str


class State:
    """The seen-state of one output root. Reads are plain queries; `commit_run` writes it all."""

    def __init__(self, out: Path):
        self.path = out / "state" / "state.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    # -- runs -------------------------------------------------------------------------------------
    def begin_run(self, run_id: str) -> None:
        self.db.execute("INSERT INTO runs VALUES (?, ?, NULL, 'running')", (run_id, _now()))

    def committed_runs(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT run_id FROM runs WHERE status = 'committed'")}

    def abandoned_runs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT run_id FROM runs WHERE status = 'running'")]

    def mark_abandoned(self, run_ids: Iterable[str]) -> None:
        self.db.executemany("UPDATE runs SET status = 'abandoned', finished_at = ? WHERE run_id = ?",
                            [(_now(), r) for r in run_ids])

    # -- lookups ----------------------------------------------------------------------------------
    def seen_hashes(self, conversation_ids: Iterable[str]) -> dict[str, str]:
        ids = list(dict.fromkeys(conversation_ids))
        out: dict[str, str] = {}
        for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[i:i + 900]
            q = f"SELECT conversation_id, content_hash FROM conversations WHERE conversation_id IN ({','.join('?' * len(chunk))})"
            out.update(self.db.execute(q, chunk).fetchall())
        return out

    def quarantined_hashes(self, raw_hashes: Iterable[str]) -> set[str]:
        hs = list(dict.fromkeys(raw_hashes))
        found: set[str] = set()
        for i in range(0, len(hs), 900):
            chunk = hs[i:i + 900]
            q = f"SELECT raw_hash FROM quarantined WHERE raw_hash IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self.db.execute(q, chunk))
        return found

    def file_unchanged(self, path: str, size: int, mtime_ns: int, sha256: "Callable[[], str]") -> bool:
        """Whether a committed run already read this file as it is now. Size and mtime decide
        without reading the file; only a file whose mtime moved is hashed (a `touch` is not new
        data). `sha256` is called lazily for that reason."""
        row = self.db.execute("SELECT size, mtime_ns, sha256 FROM files WHERE path = ?", (path,)).fetchone()
        if row is None or row[0] != size:
            return False
        return row[1] == mtime_ns or row[2] == sha256()

    def known_orders(self, order_ids: Iterable[str]) -> frozenset[str]:
        ids = [o for o in dict.fromkeys(order_ids) if o]
        found: set[str] = set()
        for i in range(0, len(ids), 900):
            chunk = ids[i:i + 900]
            found.update(r[0] for r in self.db.execute(
                f"SELECT order_id FROM orders WHERE order_id IN ({','.join('?' * len(chunk))})", chunk))
        return frozenset(found)

    # -- the commit -------------------------------------------------------------------------------
    def commit_run(self, run_id: str, conversations: Iterable[tuple[str, str]], quarantined: Iterable[tuple[str, str]],
                   files: Iterable[FileStamp], orders: Iterable[str], parts: Iterable[tuple[str, str]] = ()) -> None:
        """Record everything the run accepted, quarantined, read and wrote, atomically."""
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO parts VALUES (?, ?, ?)", [(p, run_id, h) for p, h in parts])
            db.executemany("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?)",
                           [(cid, h, run_id) for cid, h in conversations])
            db.executemany("INSERT OR IGNORE INTO quarantined VALUES (?, ?, ?)",
                           [(h, reason, run_id) for h, reason in quarantined])
            db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                           [(f.path, f.size, f.mtime_ns, f.sha256, run_id) for f in files])
            db.executemany("INSERT INTO orders VALUES (?, 1) ON CONFLICT(order_id) DO UPDATE SET contacts = contacts + 1",
                           [(o,) for o in orders if o])
            db.execute("UPDATE runs SET status = 'committed', finished_at = ? WHERE run_id = ?", (_now(), run_id))


    # -- integrity ------------------------------------------------------------------------------
    def parts(self) -> list[tuple[str, str, str]]:
        """(path relative to the output root, run_id, sha256) of every committed case file."""
        return self.db.execute("SELECT path, run_id, sha256 FROM parts ORDER BY path").fetchall()

    def forget_runs(self, run_ids: Iterable[str]) -> None:
        """Undo committed runs in the state: their conversations, files and quarantined records
        are forgotten (the next run reads them again) and the runs count as never committed, so
        their remaining files are removed as orphans."""
        ids = list(run_ids)
        with self.transaction() as db:
            for table in ("conversations", "quarantined", "files", "parts"):
                db.executemany(f"DELETE FROM {table} WHERE run_id = ?", [(r,) for r in ids])
            db.executemany("UPDATE runs SET status = 'repaired', finished_at = ? WHERE run_id = ?", [(_now(), r) for r in ids])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
