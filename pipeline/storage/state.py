"""What the pipeline has already seen, kept in SQLite under `<out>/state/`, and each run's manifest.

Why SQLite: the commit of a run (its conversations, quarantined records, files and the run row)
must be one transaction, so a run killed anywhere before it leaves no trace and a re-run redoes
exactly that work.

Why a manifest per run as well (`runs/<run_id>/commit.json.gz`, written just before the SQLite
commit): the state database is one file, and when it was lost or emptied the next run took every
stored case for an orphan and deleted it. The manifests are a second, per-run record of what each
run committed; from them `casemine repair` rebuilds the database, and a run never deletes a
part that neither the database nor a manifest can account for.

Why keyed hashes instead of ids and file names: conversation ids and file names often carry a
phone number or a name, and personal data must not reach any output, this database included.
Deduplication only needs equality, which a hash keeps.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipeline.io import atomic_write_bytes

VERSION = "2"  # 2: conversation ids, file paths and order ids stored as keyed hashes

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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

MANIFEST = "commit.json.gz"


class StateError(RuntimeError):
    """The state database is damaged or does not match the stored runs; the message says what to do."""


def key(value: str) -> str:
    """The stored form of an id, file name or order id: equal inputs give equal keys, and the key
    does not reveal the input."""
    return hashlib.sha256(("casemine-state\x00" + value).encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class FileStamp:
    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class CommitRecord:
    """Everything one run commits, in stored (keyed) form: the SQLite rows and the manifest."""

    run_id: str
    conversations: list[tuple[str, str]] = field(default_factory=list)  # (key(conversation_id), content hash)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (raw hash, reason)
    files: list[tuple[str, int, int, str]] = field(default_factory=list)  # (key(path), size, mtime_ns, sha256)
    orders: list[str] = field(default_factory=list)  # key(order_id), one per case that named it
    parts: list[tuple[str, str]] = field(default_factory=list)  # (path under --out, sha256)

    @classmethod
    def of(
        cls,
        run_id: str,
        conversations: Iterable[tuple[str, str]],
        quarantined: Iterable[tuple[str, str]],
        files: Iterable[FileStamp],
        orders: Iterable[str],
        parts: Iterable[tuple[str, str]],
    ) -> CommitRecord:
        """From raw ids and file names (keyed here, so nothing raw is ever written)."""
        return cls(
            run_id,
            [(key(c), h) for c, h in conversations],
            [(h, r) for h, r in quarantined],
            [(key(f.path), f.size, f.mtime_ns, f.sha256) for f in files],
            [key(str(o)) for o in orders if o],
            [(p, h) for p, h in parts],
        )


def manifest_path(out: Path, run_id: str) -> Path:
    return out / "runs" / run_id / MANIFEST


def write_manifest(out: Path, rec: CommitRecord) -> Path:
    path = manifest_path(out, rec.run_id)
    atomic_write_bytes(path, gzip.compress(json.dumps(asdict(rec)).encode("utf-8"), mtime=0))
    return path


def read_manifest(path: Path) -> CommitRecord:
    try:
        raw = json.loads(gzip.decompress(path.read_bytes()))
        return CommitRecord(
            raw["run_id"],
            [tuple(x) for x in raw["conversations"]],
            [tuple(x) for x in raw["quarantined"]],
            [tuple(x) for x in raw["files"]],
            list(raw["orders"]),
            [tuple(x) for x in raw["parts"]],
        )
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise StateError(f"the run manifest {path} is damaged ({type(e).__name__})") from None


def manifests_on_disk(out: Path) -> dict[str, Path]:
    root = out / "runs"
    return {p.parent.name: p for p in sorted(root.glob(f"*/{MANIFEST}"))} if root.is_dir() else {}


class State:
    """The seen-state of one output root. Reads are plain queries; `commit_run` writes it all."""

    def __init__(self, out: Path):
        self.path = out / "state" / "state.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # One connection serves a whole run, whose steps may run on another thread than the
            # one that opened it (Prefect calls tasks from its own threads); the run loop uses it
            # from one step at a time, so sharing it across threads is safe.
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            self._upgrade()
        except sqlite3.DatabaseError as e:
            raise StateError(
                f"the state database {self.path} is damaged ({e}); move it aside and run "
                f"`casemine repair --out {out}` to rebuild it from the runs' manifests"
            ) from None

    def close(self) -> None:
        self.db.close()

    def _upgrade(self) -> None:
        """Version-1 databases stored raw ids and file names: key them in place, once."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if row and row[0] == VERSION:
            return
        with self.transaction() as db:
            if row is None and db.execute("SELECT 1 FROM runs LIMIT 1").fetchone():
                db.create_function("casemine_key", 1, key, deterministic=True)
                db.execute("UPDATE conversations SET conversation_id = casemine_key(conversation_id)")
                db.execute("UPDATE files SET path = casemine_key(path)")
                db.execute("UPDATE orders SET order_id = casemine_key(order_id)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (VERSION,))

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

    def latest_case_run(self) -> str:
        """The newest committed run that stored case files ("" when none): what exports derive from."""
        row = self.db.execute("SELECT max(run_id) FROM parts").fetchone()
        return row[0] or ""

    def known_runs(self) -> dict[str, str]:
        """run_id -> status of every run this database has seen begin."""
        return dict(self.db.execute("SELECT run_id, status FROM runs").fetchall())

    def abandoned_runs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT run_id FROM runs WHERE status = 'running'")]

    def mark_abandoned(self, run_ids: Iterable[str]) -> None:
        self.db.executemany(
            "UPDATE runs SET status = 'abandoned', finished_at = ? WHERE run_id = ?", [(_now(), r) for r in run_ids]
        )

    # -- lookups ----------------------------------------------------------------------------------
    def seen_hashes(self, conversation_ids: Iterable[str]) -> dict[str, str]:
        """conversation id -> content hash, for the given ids that a committed run accepted."""
        by_key = {key(c): c for c in dict.fromkeys(conversation_ids)}
        keys = list(by_key)
        out: dict[str, str] = {}
        for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = keys[i : i + 900]
            q = (
                "SELECT conversation_id, content_hash FROM conversations "
                f"WHERE conversation_id IN ({','.join('?' * len(chunk))})"
            )
            out.update((by_key[k], h) for k, h in self.db.execute(q, chunk))
        return out

    def quarantined_hashes(self, raw_hashes: Iterable[str]) -> set[str]:
        hs = list(dict.fromkeys(raw_hashes))
        found: set[str] = set()
        for i in range(0, len(hs), 900):
            chunk = hs[i : i + 900]
            q = f"SELECT raw_hash FROM quarantined WHERE raw_hash IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self.db.execute(q, chunk))
        return found

    def file_unchanged(self, path: str, size: int, mtime_ns: int, sha256: Callable[[], str]) -> bool:
        """Whether a committed run already read this file as it is now. Size and mtime decide
        without reading the file; only a file whose mtime moved is hashed (a `touch` is not new
        data). `sha256` is called lazily for that reason."""
        row = self.db.execute("SELECT size, mtime_ns, sha256 FROM files WHERE path = ?", (key(path),)).fetchone()
        if row is None or row[0] != size:
            return False
        return row[1] == mtime_ns or row[2] == sha256()

    def known_orders(self, order_ids: Iterable[str]) -> frozenset[str]:
        by_key = {key(o): o for o in dict.fromkeys(order_ids) if o}
        keys = list(by_key)
        found: set[str] = set()
        for i in range(0, len(keys), 900):
            chunk = keys[i : i + 900]
            found.update(
                by_key[r[0]]
                for r in self.db.execute(
                    f"SELECT order_id FROM orders WHERE order_id IN ({','.join('?' * len(chunk))})", chunk
                )
            )
        return frozenset(found)

    # -- the commit -------------------------------------------------------------------------------
    def commit_run(self, rec: CommitRecord) -> None:
        """Record everything the run accepted, quarantined, read and wrote, atomically."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO runs VALUES (?, ?, NULL, 'running')", (rec.run_id, _now()))
            db.executemany("INSERT OR REPLACE INTO parts VALUES (?, ?, ?)", [(p, rec.run_id, h) for p, h in rec.parts])
            db.executemany(
                "INSERT OR REPLACE INTO conversations VALUES (?, ?, ?)",
                [(c, h, rec.run_id) for c, h in rec.conversations],
            )
            db.executemany(
                "INSERT OR IGNORE INTO quarantined VALUES (?, ?, ?)",
                [(h, reason, rec.run_id) for h, reason in rec.quarantined],
            )
            db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                [(p, s, m, h, rec.run_id) for p, s, m, h in rec.files],
            )
            db.executemany(
                "INSERT INTO orders VALUES (?, 1) ON CONFLICT(order_id) DO UPDATE SET contacts = contacts + 1",
                [(o,) for o in rec.orders],
            )
            db.execute("UPDATE runs SET status = 'committed', finished_at = ? WHERE run_id = ?", (_now(), rec.run_id))

    def record_of(self, run_id: str) -> CommitRecord:
        """A committed run's record rebuilt from the database (manifests for runs made before them).
        Order contacts are counts, not per-run rows: the run's orders are not recoverable here."""
        q = self.db.execute
        return CommitRecord(
            run_id,
            [
                tuple(r)
                for r in q("SELECT conversation_id, content_hash FROM conversations WHERE run_id = ?", (run_id,))
            ],
            [tuple(r) for r in q("SELECT raw_hash, reason FROM quarantined WHERE run_id = ?", (run_id,))],
            [tuple(r) for r in q("SELECT path, size, mtime_ns, sha256 FROM files WHERE run_id = ?", (run_id,))],
            [],
            [tuple(r) for r in q("SELECT path, sha256 FROM parts WHERE run_id = ?", (run_id,))],
        )

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
            db.executemany(
                "UPDATE runs SET status = 'repaired', finished_at = ? WHERE run_id = ?", [(_now(), r) for r in ids]
            )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
