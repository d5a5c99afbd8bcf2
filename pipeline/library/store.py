"""The library's review store (`<out>/library/library.sqlite`): candidates and the decisions
people make on them.

Why SQLite: two people can write at once (WAL, BEGIN IMMEDIATE), and a rebuilt candidate list
only adds to it: a decision already made is never overwritten by a build.

Statuses: candidate -> approved | rejected; approved -> published (by `publish`) | rejected;
rejected -> approved only with force; published -> rejected (it leaves the next publish).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.library.candidates import Candidate

STATUSES = ("candidate", "approved", "rejected", "published")


class LibraryError(ValueError):
    """Something the user must fix: an unknown case id, a disallowed transition, nothing to publish."""


def library_dir(out: Path) -> Path:
    return Path(out) / "library"


def db_path(out: Path) -> Path:
    return library_dir(out) / "library.sqlite"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
  case_id TEXT PRIMARY KEY, issue_type TEXT, cluster_id TEXT, groups TEXT, score REAL, reasons TEXT,
  parts TEXT, status TEXT NOT NULL, active INTEGER NOT NULL DEFAULT 1, decided_by TEXT, decided_at TEXT,
  note TEXT, published_at TEXT, first_built TEXT, last_built TEXT);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, case_id TEXT NOT NULL, from_status TEXT, to_status TEXT NOT NULL,
  by TEXT, at TEXT NOT NULL, note TEXT);
CREATE TABLE IF NOT EXISTS usage (case_id TEXT PRIMARY KEY, count INTEGER NOT NULL, last_used_at TEXT);
"""


@dataclass
class Decision:
    case_id: str
    from_status: str
    status: str
    changed: bool
    message: str


class LibraryStore:
    """Decisions and candidates in `<out>/library/library.sqlite`. Every write is one BEGIN
    IMMEDIATE transaction: the state is read and changed under the write lock, so two approvals
    racing from two processes cannot both see "candidate" (one changes it, the other sees it done)."""

    def __init__(self, out: Path, timeout_s: float = 30.0):
        self.path = db_path(out)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    # -- build ----------------------------------------------------------------------------------
    def sync_candidates(self, cands: Sequence[Candidate]) -> dict[str, int]:
        """Add new candidates and refresh scores of known ones without touching their status;
        undecided candidates the new build no longer picks are retired (hidden, not deleted)."""
        now = _now()
        ids = {c.case_id for c in cands}
        counts = {"new": 0, "refreshed": 0, "decisions_kept": 0, "retired": 0}
        with self._tx() as con:
            known = {r["case_id"]: r["status"] for r in con.execute("SELECT case_id, status FROM entries")}
            for c in cands:
                vals = (
                    c.issue_type,
                    c.cluster_id,
                    json.dumps(c.groups, ensure_ascii=False),
                    c.score,
                    json.dumps(c.reasons, ensure_ascii=False),
                    json.dumps(c.parts, ensure_ascii=False),
                )
                if c.case_id in known:
                    con.execute(
                        "UPDATE entries SET issue_type=?, cluster_id=?, groups=?, score=?, reasons=?, parts=?, "
                        "active=1, last_built=? WHERE case_id=?",
                        (*vals, now, c.case_id),
                    )
                    counts["decisions_kept" if known[c.case_id] != "candidate" else "refreshed"] += 1
                else:
                    con.execute(
                        "INSERT INTO entries (case_id, issue_type, cluster_id, groups, score, reasons, parts, status, "
                        "active, first_built, last_built) VALUES (?,?,?,?,?,?,?, 'candidate', 1, ?, ?)",
                        (c.case_id, *vals, now, now),
                    )
                    con.execute(
                        "INSERT INTO events (case_id, from_status, to_status, by, at, note) VALUES (?,?,?,?,?,?)",
                        (c.case_id, None, "candidate", "build", now, None),
                    )
                    counts["new"] += 1
            for cid, status in known.items():
                if cid not in ids and status == "candidate":
                    con.execute("UPDATE entries SET active=0 WHERE case_id=? AND status='candidate'", (cid,))
                    counts["retired"] += 1
                elif cid not in ids:
                    counts["decisions_kept"] += 1
        return counts

    # -- decisions ------------------------------------------------------------------------------
    def _transition(self, case_id: str, to: str, by: str, note: str | None, allowed: dict[str, str | None]) -> Decision:
        """Move one entry to `to` if its current status allows it. `allowed` maps a from-status to
        None (go ahead) or the error to raise; a missing from-status means "already there"."""
        if not by or not by.strip():
            raise LibraryError("say who decides: --by NAME")
        with self._tx() as con:
            row = con.execute(
                "SELECT status, decided_by, decided_at FROM entries WHERE case_id=?", (case_id,)
            ).fetchone()
            if row is None:
                raise LibraryError(
                    f"unknown case id {case_id!r}: not in the library (run `casemine library build`, "
                    "then `casemine library list` for the ids)"
                )
            cur = row["status"]
            if cur == to:
                return Decision(
                    case_id, cur, cur, False, f"already {cur} by {row['decided_by']} at {row['decided_at']}"
                )
            if cur not in allowed:
                raise LibraryError(f"{case_id} is {cur}; it cannot become {to}")
            if allowed[cur] is not None:
                raise LibraryError(allowed[cur])
            now = _now()
            con.execute(
                "UPDATE entries SET status=?, decided_by=?, decided_at=?, note=?, "
                "published_at=CASE WHEN ?='published' THEN ? ELSE published_at END WHERE case_id=?",
                (to, by, now, note, to, now, case_id),
            )
            con.execute(
                "INSERT INTO events (case_id, from_status, to_status, by, at, note) VALUES (?,?,?,?,?,?)",
                (case_id, cur, to, by, now, note),
            )
            return Decision(case_id, cur, to, True, f"{cur} -> {to}")

    def approve(self, case_id: str, by: str, note: str | None = None, force: bool = False) -> Decision:
        allowed: dict[str, str | None] = {
            "candidate": None,
            "rejected": None
            if force
            else f"{case_id} was rejected; approving it reverses that decision: pass --force (and a --note saying why)",
        }
        if "published" == self.status(case_id):
            return Decision(case_id, "published", "published", False, "already published")
        return self._transition(case_id, "approved", by, note, allowed)

    def reject(self, case_id: str, by: str, note: str) -> Decision:
        if not note or not note.strip():
            raise LibraryError("a rejection needs a reason: --note TEXT")
        return self._transition(case_id, "rejected", by, note, {"candidate": None, "approved": None, "published": None})

    def status(self, case_id: str) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT status FROM entries WHERE case_id=?", (case_id,)).fetchone()
        return row["status"] if row else None

    def publish(self, by: str = "publish") -> tuple[list[str], list[dict[str, Any]]]:
        """Approved -> published in one transaction; returns (newly published ids, all published)."""
        now = _now()
        with self._tx() as con:
            new = [r["case_id"] for r in con.execute("SELECT case_id FROM entries WHERE status='approved'")]
            for cid in new:
                con.execute("UPDATE entries SET status='published', published_at=? WHERE case_id=?", (now, cid))
                con.execute(
                    "INSERT INTO events (case_id, from_status, to_status, by, at, note) VALUES (?,?,?,?,?,?)",
                    (cid, "approved", "published", by, now, None),
                )
            rows = [
                dict(r)
                for r in con.execute("SELECT * FROM entries WHERE status='published' ORDER BY issue_type, score DESC")
            ]
        if not rows:
            raise LibraryError(
                "nothing to publish: no case is approved (approve some with "
                "`casemine library approve CASE_ID --by NAME`)"
            )
        return new, [_decode(r) for r in rows]

    # -- reads ----------------------------------------------------------------------------------
    def entries(
        self, status: str | None = None, issue_type: str | None = None, include_retired: bool = False
    ) -> list[dict[str, Any]]:
        if status is not None and status not in STATUSES:
            raise LibraryError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
        q, args = (
            "SELECT e.*, COALESCE(u.count, 0) AS used FROM entries e LEFT JOIN usage u USING (case_id) WHERE 1=1",
            [],
        )
        if status:
            q += " AND status=?"
            args.append(status)
        if issue_type:
            q += " AND issue_type=?"
            args.append(issue_type)
        if not include_retired:
            q += " AND (active=1 OR status!='candidate')"
        with self._connect() as con:
            return [_decode(dict(r)) for r in con.execute(q + " ORDER BY issue_type, score DESC, case_id", args)]

    def events(self, case_id: str | None = None) -> list[dict[str, Any]]:
        with self._connect() as con:
            q = "SELECT * FROM events" + (" WHERE case_id=?" if case_id else "") + " ORDER BY id"
            return [dict(r) for r in con.execute(q, (case_id,) if case_id else ())]

    def published_ids(self) -> set[str]:
        with self._connect() as con:
            return {r[0] for r in con.execute("SELECT case_id FROM entries WHERE status='published'")}

    def record_usage(self, case_ids: Sequence[str]) -> None:
        now = _now()
        with self._tx() as con:
            for cid in case_ids:
                con.execute(
                    "INSERT INTO usage (case_id, count, last_used_at) VALUES (?, 1, ?) ON CONFLICT(case_id) "
                    "DO UPDATE SET count=count+1, last_used_at=excluded.last_used_at",
                    (cid, now),
                )


def _decode(r: dict[str, Any]) -> dict[str, Any]:
    for k in ("groups", "reasons", "parts"):
        if isinstance(r.get(k), str):
            r[k] = json.loads(r[k])
    return r


# -- API for search (pipeline/cli/search_cmds.py wires `casemine query --library`) --------------


def published_case_ids(out: Path) -> set[str]:
    """Ids of the published library cases (empty when no library exists yet)."""
    return LibraryStore(out).published_ids() if db_path(out).is_file() else set()


def record_usage(out: Path, case_ids: Sequence[str]) -> None:
    """Count that these library cases were shown to someone. Only counts: never the query text."""
    if case_ids:
        LibraryStore(out).record_usage(list(dict.fromkeys(case_ids)))
