"""The typical-case library (典型案例库): candidates, a review workflow, publishing, coverage.

Why this shape: trainers need a few *good, different* examples per issue type and root cause, and a
person must approve each one before agents see it. So candidate selection is a pure function of
the case table (scored, with the reasons shown), while decisions live in SQLite, which two people
can write at once (WAL, BEGIN IMMEDIATE) and which a rebuilt candidate list only adds to: a
decision already made is never overwritten by a build.

Statuses: candidate -> approved | rejected; approved -> published (by `publish`) | rejected;
rejected -> approved only with force; published -> rejected (it leaves the next publish).
"""

from __future__ import annotations

import html
import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from pipeline.config import Config, LibraryConfig

STATUSES = ("candidate", "approved", "rejected", "published")
PARTS = ("context", "problem", "handling", "outcome")
PART_NAMES = {"context": "客户背景", "problem": "问题", "handling": "处理", "outcome": "结果"}


class LibraryError(ValueError):
    """Something the user must fix: an unknown case id, a disallowed transition, nothing to publish."""


def library_dir(out: Path) -> Path:
    return Path(out) / "library"


def db_path(out: Path) -> Path:
    return library_dir(out) / "library.sqlite"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- candidates (pure) --------------------------------------------------------------------------


@dataclass
class Candidate:
    case_id: str
    issue_type: str
    cluster_id: str | None
    score: float
    reasons: list[str]
    parts: dict[str, str]
    groups: list[str] = field(default_factory=list)


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def case_parts(row: dict[str, Any]) -> dict[str, str]:
    """The four parts a trainer reads, from a (masked) case row: who and what context, the
    problem, what the agent did, how it ended, plus the agent turn at the biggest emotional rise."""
    raw_turns = row.get("turns")
    turns = [dict(t) for t in (raw_turns if raw_turns is not None else [])]
    first = next((_text(t.get("text")) for t in turns if t.get("speaker") == "customer"), "")
    ctx = [f"渠道:{_text(row.get('channel'))}"] + [
        f"{k}:{_text(row.get(c))}"
        for c, k in (("product", "商品"), ("region", "地区"), ("issue_type", "类型"))
        if _text(row.get(c))
    ]
    context = " ".join(ctx) + (f"；客户开场:{first[:120]}" if first else "")
    outcome = _text(row.get("outcome"))
    ev = _text(row.get("outcome_evidence"))
    traj = _text(row.get("emotion_trajectory"))
    out_text = outcome + (f"（{ev}）" if ev else "")
    if traj:
        out_text += f"；情绪{traj} {row.get('emotion_start', 0):+.2f}→{row.get('emotion_end', 0):+.2f}"
    parts = {
        "context": context if first else "",
        "problem": _text(row.get("problem")),
        "handling": _text(row.get("handling")),
        "outcome": out_text if outcome else "",
    }
    tp = _json(row.get("turning_points"))
    rise = (tp or {}).get("biggest_rise") or {}
    if rise.get("agent_before"):
        parts["turning_point"] = f"客服:{rise['agent_before']['text'][:160]} → 客户:{rise.get('customer', '')[:80]}"
    return parts


def _json(v: Any) -> Any:
    if isinstance(v, str) and v:
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return None
    return v if isinstance(v, (dict, list)) else None


class CandidateScorer:
    """`assess(row)` -> (eligible, score, reasons). Hard rules make a case eligible; the score
    orders eligible cases (a bigger emotional recovery, concrete actions, a readable length)."""

    def __init__(self, lib: LibraryConfig, actions: Sequence[str]):
        self.lib = lib
        self.actions = [a for a in actions if a and a not in set(lib.generic_actions)]

    @classmethod
    def from_config(cls, cfg: Config) -> CandidateScorer:
        from pipeline.cases.extract import load_lexicon

        return cls(cfg.library, load_lexicon(cfg).agent_actions)

    def assess(self, row: dict[str, Any]) -> tuple[bool, float, list[str]]:
        lib = self.lib
        reasons: list[str] = []
        fails: list[str] = []
        parts = case_parts(row)
        if _text(row.get("outcome")) == "resolved":
            reasons.append(f"已解决（{_text(row.get('outcome_evidence')) or '结果词'}）")
        else:
            fails.append(f"outcome={_text(row.get('outcome')) or '?'}")
        missing = [PART_NAMES[p] for p in PARTS if len(parts.get(p, "")) < 2]
        (fails.append("缺少:" + "、".join(missing)) if missing else reasons.append("四部分齐全"))
        acts = [a for a in self.actions if a in _text(row.get("handling"))]
        (reasons.append("具体处理:" + "、".join(acts[:3])) if acts else fails.append("处理无具体动作"))
        n_chars = len(_text(row.get("customer_text"))) + len(_text(row.get("agent_text")))
        n_turns = int(row.get("n_turns") or 0)
        if lib.min_chars <= n_chars <= lib.max_chars and n_turns <= lib.max_turns:
            reasons.append(f"长度适中（{n_chars}字,{n_turns}轮）")
        else:
            fails.append(f"长度{n_chars}字/{n_turns}轮")
        delta = row.get("emotion_delta")
        delta = float(delta) if delta is not None and not pd.isna(delta) else 0.0
        if delta > 0:
            reasons.append(f"情绪改善 {float(row['emotion_start']):+.2f}→{float(row['emotion_end']):+.2f}")
        elif lib.require_emotion_improved:
            fails.append("情绪未改善")
        if fails:
            return False, 0.0, fails
        low = row.get("emotion_min")
        recovery = float(row["emotion_end"]) - float(low) if low is not None and not pd.isna(low) else 0.0
        length_fit = 1.0 - min(1.0, abs(n_chars - 300) / 600)
        score = (
            0.4
            + 0.25 * min(delta, 1.0)
            + 0.15 * min(max(recovery, 0.0), 1.0)
            + 0.1 * min(len(acts), 2) / 2
            + 0.1 * length_fit
        )
        if recovery > delta + 0.1 and low is not None:
            reasons.append(f"从低点 {float(low):+.2f} 回升")
        return True, round(score, 4), reasons


def select_diverse(order: Sequence[int], vectors: np.ndarray, k: int, max_similarity: float) -> list[int]:
    """Greedy: take rows in score order, skipping any too similar to one already taken, so a type's
    examples are not five near-copies."""
    picked: list[int] = []
    for i in order:
        if len(picked) >= k:
            break
        if picked and float(np.max(vectors[picked] @ vectors[i])) > max_similarity:
            continue
        picked.append(i)
    return picked


def select_candidates(
    cases: pd.DataFrame, vectors: np.ndarray, scorer: CandidateScorer, clusters: dict[str, str] | None = None
) -> tuple[list[Candidate], dict[str, int]]:
    """Candidates per issue type and per root-cause cluster (case_id -> cluster_id), diverse within
    each group. Returns the union (a case picked by two groups is listed once) and counts."""
    clusters = clusters or {}
    rows = cast(list[dict[str, Any]], cases.to_dict("records"))
    assessed = [scorer.assess(r) for r in rows]
    ok = [i for i, (e, _, _) in enumerate(assessed) if e]
    groups: dict[str, list[int]] = {}
    for i in ok:
        groups.setdefault(f"type:{_text(rows[i].get('issue_type')) or '未分类'}", []).append(i)
        cid = clusters.get(str(rows[i]["case_id"]))
        if cid:
            groups.setdefault(f"cluster:{cid}", []).append(i)
    chosen: dict[int, list[str]] = {}
    for g, members in groups.items():
        order = sorted(members, key=lambda i: (-assessed[i][1], str(rows[i]["case_id"])))
        for i in select_diverse(order, vectors, scorer.lib.per_group, scorer.lib.max_similarity):
            chosen.setdefault(i, []).append(g)
    out = []
    for i, gs in sorted(chosen.items(), key=lambda kv: -assessed[kv[0]][1]):
        r = rows[i]
        out.append(
            Candidate(
                str(r["case_id"]),
                _text(r.get("issue_type")) or "未分类",
                clusters.get(str(r["case_id"])),
                assessed[i][1],
                assessed[i][2],
                case_parts(r),
                gs,
            )
        )
    return out, {"cases": len(rows), "eligible": len(ok), "groups": len(groups), "candidates": len(out)}


def cluster_map(members: pd.DataFrame | None) -> dict[str, str]:
    """case_id -> cluster_id, preferring the within-issue-type clustering over the all-cases one."""
    if members is None or not len(members) or "cluster_id" not in members:
        return {}
    m = members[members["cluster_id"].notna()].copy()
    if "scope" in m and "issue_type" in m:
        m["_own"] = (m["scope"] == m["issue_type"]).astype(int)
        m = m.sort_values("_own", ascending=False, kind="stable")
    return {str(k): str(v) for k, v in m.drop_duplicates("case_id")[["case_id", "cluster_id"]].itertuples(index=False)}


def load_members(out: Path) -> pd.DataFrame | None:
    from pipeline.insights.export import latest_export

    d = latest_export(Path(out))
    return pd.read_parquet(d / "members.parquet") if d is not None and (d / "members.parquet").is_file() else None


def case_texts(cases: pd.DataFrame) -> list[str]:
    """What a case is embedded on: its problem, else what the customer said."""
    prob = cases["problem"].fillna("").astype(str) if "problem" in cases else pd.Series([""] * len(cases))
    cust = cases["customer_text"].fillna("").astype(str) if "customer_text" in cases else pd.Series([""] * len(cases))
    return [p if len(p) >= 4 else c[:200] for p, c in zip(prob, cust)]


# -- the review store (SQLite) ------------------------------------------------------------------

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


# -- build / publish / coverage (I/O at the edges) ----------------------------------------------


def load_library_cases(cfg: Config, out: Path, since: str | None = None) -> pd.DataFrame:
    """Stored cases, one per id, with issue types and emotion curves (added in memory when the
    stored partitions predate them)."""
    from pipeline.insights.export import ensure_classified
    from pipeline.storage.store import read_cases

    base = read_cases(Path(out))
    if since is not None and len(base):
        base = base[base["date"].astype(str) >= since]
    if not len(base):
        return base
    base, _ = ensure_classified(base.reset_index(drop=True), cfg)
    if "emotion_delta" not in base or base["emotion_delta"].isna().all():
        from pipeline.analysis.emotion import add_emotion

        base = add_emotion(base, cfg)
    return base


def build(cfg: Config, out: Path, embedder=None) -> dict[str, Any]:
    """Select candidates from the processed cases and merge them into the review store."""
    cases = load_library_cases(cfg, out)
    if not len(cases):
        raise LibraryError(f"no processed cases under {out}; run `casemine run` first")
    if embedder is None:
        from pipeline.embed import Embedder

        embedder = Embedder(cfg, out_root=Path(out))
    vectors = np.asarray(embedder.encode_passages(case_texts(cases)), dtype=np.float32)
    cands, counts = select_candidates(cases, vectors, CandidateScorer.from_config(cfg), cluster_map(load_members(out)))
    synced = LibraryStore(out).sync_candidates(cands)
    return {**counts, **synced, "db": str(db_path(out))}


_SLUG_RE = re.compile(r"[^\w\u3400-\u9fff-]+")


def _slug(s: str) -> str:
    return _SLUG_RE.sub("_", s).strip("_") or "未分类"


def publish(cfg: Config, out: Path, by: str = "publish") -> dict[str, Any]:
    """Mark approved cases published and export the library: Parquet plus one self-contained HTML
    page per issue type. Texts were masked at ingest; they are masked again here so nothing a
    later edit let through leaves in an export."""
    from pipeline.io import atomic_write_parquet, atomic_write_text
    from pipeline.text.prepare import get_masker

    new, rows = LibraryStore(out).publish(by)
    mask = get_masker(cfg).mask
    recs = []
    for r in rows:
        parts = {k: mask(v)[0] for k, v in (r.get("parts") or {}).items()}
        recs.append(
            {
                "case_id": r["case_id"],
                "issue_type": r["issue_type"],
                "cluster_id": r["cluster_id"],
                "score": r["score"],
                "reasons": "；".join(mask(x)[0] for x in r.get("reasons") or []),
                **{p: parts.get(p, "") for p in (*PARTS, "turning_point")},
                "approved_by": r["decided_by"],
                "note": mask(r["note"] or "")[0],
                "published_at": r["published_at"],
            }
        )
    df = pd.DataFrame(recs)
    dest = library_dir(out) / "published"
    import pyarrow as pa

    atomic_write_parquet(dest / "library.parquet", pa.Table.from_pandas(df, preserve_index=False))
    pages = {}
    for t, g in df.groupby("issue_type", sort=True):
        path = dest / "html" / f"{_slug(str(t))}.html"
        atomic_write_text(path, render_page(str(t), cast(list[dict[str, Any]], g.to_dict("records"))))
        pages[str(t)] = str(path)
    atomic_write_text(dest / "html" / "index.html", render_index(pages, df))
    return {"newly_published": len(new), "published": len(df), "parquet": str(dest / "library.parquet"), "pages": pages}


_CSS = (
    "body{font-family:system-ui,'PingFang SC','Microsoft YaHei',sans-serif;max-width:960px;margin:2em auto;"
    "padding:0 1em;color:#222}article{border:1px solid #ddd;border-radius:8px;padding:1em;margin:1em 0}"
    "dt{font-weight:bold;color:#555;margin-top:.5em}dd{margin-left:1em}.meta{color:#888;font-size:.85em}"
)


def render_page(issue_type: str, recs: Sequence[dict[str, Any]]) -> str:
    """One self-contained page (inline CSS, no scripts, no external links): the four parts of each
    published case of one issue type."""
    e = html.escape
    arts = []
    for r in recs:
        dl = "".join(f"<dt>{e(PART_NAMES[p])}</dt><dd>{e(str(r.get(p) or ''))}</dd>" for p in PARTS)
        if r.get("turning_point"):
            dl += f"<dt>转折点</dt><dd>{e(str(r['turning_point']))}</dd>"
        arts.append(
            f"<article><h2>案例 {e(str(r['case_id']))}</h2><dl>{dl}</dl>"
            f"<p class='meta'>入选理由：{e(str(r.get('reasons') or ''))}"
            f" · 审核：{e(str(r.get('approved_by') or ''))} · 发布：{e(str(r.get('published_at') or ''))}</p></article>"
        )
    return (
        f"<!doctype html><html lang='zh'><head><meta charset='utf-8'><title>典型案例库 · {e(issue_type)}</title>"
        f"<style>{_CSS}</style></head><body><h1>典型案例库 · {e(issue_type)}</h1>"
        f"<p>{len(recs)} 个案例</p>{''.join(arts)}</body></html>"
    )


def render_index(pages: dict[str, str], df: pd.DataFrame) -> str:
    e = html.escape
    items = "".join(
        f"<li><a href='{e(Path(p).name)}'>{e(t)}</a>（{int((df['issue_type'] == t).sum())}）</li>"
        for t, p in pages.items()
    )
    return (
        f"<!doctype html><html lang='zh'><head><meta charset='utf-8'><title>典型案例库</title>"
        f"<style>{_CSS}</style></head><body><h1>典型案例库</h1><ul>{items}</ul></body></html>"
    )


@dataclass
class CoverageResult:
    coverage: float
    n_cases: int
    n_covered: int
    threshold: float
    by_type: dict[str, dict[str, Any]]
    gaps: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_coverage(
    case_ids: Sequence[str],
    issue_types: Sequence[str],
    clusters: Sequence[str | None],
    vectors: np.ndarray,
    published: Sequence[str],
    pub_vectors: np.ndarray,
    pub_types: Sequence[str],
    pub_clusters: Sequence[str | None],
    threshold: float,
) -> CoverageResult:
    """Pure: a case is covered when its nearest published case has cosine >= threshold (vectors
    are L2-normalised). Gaps: issue types and clusters with cases but no published case, the most
    demanded first."""
    n = len(case_ids)
    if len(published):
        best = (np.asarray(vectors) @ np.asarray(pub_vectors).T).max(axis=1)
    else:
        best = np.full(n, -1.0)
    pub = set(published)
    covered = (best >= threshold) | np.array([c in pub for c in case_ids], dtype=bool)
    df = pd.DataFrame({"type": list(issue_types), "cluster": list(clusters), "covered": covered})
    by_type = {}
    for t, g in df.groupby("type", sort=True):
        by_type[str(t)] = {
            "cases": int(len(g)),
            "covered": int(g["covered"].sum()),
            "coverage": round(float(g["covered"].mean()), 4),
            "published": int(sum(pt == t for pt in pub_types)),
        }
    gaps: list[dict[str, Any]] = [
        {"kind": "issue_type", "id": t, "cases": v["cases"], "uncovered": v["cases"] - v["covered"]}
        for t, v in by_type.items()
        if v["published"] == 0
    ]
    pub_cl = {c for c in pub_clusters if c}
    for c, g in df[df["cluster"].notna()].groupby("cluster", sort=True):
        if c not in pub_cl:
            gaps.append(
                {
                    "kind": "cluster",
                    "id": str(c),
                    "issue_type": str(g["type"].mode().iloc[0]),
                    "cases": int(len(g)),
                    "uncovered": int((~g["covered"]).sum()),
                }
            )
    gaps.sort(key=lambda x: (-x["cases"], -x["uncovered"], x["kind"], x["id"]))
    return CoverageResult(
        round(float(covered.mean()), 4) if n else 0.0, n, int(covered.sum()), threshold, by_type, gaps
    )


def coverage(cfg: Config, out: Path, since: str | None = None, embedder=None) -> CoverageResult:
    cases = load_library_cases(cfg, out, since)
    if not len(cases):
        raise LibraryError(f"no processed cases under {out}" + (f" since {since}" if since else ""))
    store = LibraryStore(out)
    pubs = store.entries(status="published")
    if embedder is None:
        from pipeline.embed import Embedder

        embedder = Embedder(cfg, out_root=Path(out))
    cmap = cluster_map(load_members(out))
    ids = cases["case_id"].astype(str).tolist()
    vecs = np.asarray(embedder.encode_passages(case_texts(cases)), dtype=np.float32)
    pub_texts = [(p.get("parts") or {}).get("problem") or "" for p in pubs]
    pub_vecs = (
        np.asarray(embedder.encode_passages(pub_texts), dtype=np.float32)
        if pubs
        else np.zeros((0, vecs.shape[1]), np.float32)
    )
    types = (
        cases["issue_type"].fillna("未分类").astype(str).tolist() if "issue_type" in cases else ["未分类"] * len(cases)
    )
    return compute_coverage(
        ids,
        types,
        [cmap.get(i) for i in ids],
        vecs,
        [p["case_id"] for p in pubs],
        pub_vecs,
        [p["issue_type"] for p in pubs],
        [p["cluster_id"] for p in pubs],
        cfg.library.coverage_threshold,
    )
