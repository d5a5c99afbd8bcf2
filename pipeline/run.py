"""One nightly run as plain functions: start, ingest, process, store, commit, summarise.

`run_pipeline` calls them in order for `casemine run --no-prefect` and the tests; `pipeline.flows`
wraps the same functions in Prefect tasks. Idempotence comes from three rules: a conversation is
processed once (its id and content hash are committed with the run), case ids are stable, and a
run's files count only once its commit is in the state database.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from pipeline.config import Config
from pipeline.ingest import FileResult, discover, read_file
from pipeline.io import sha256_file
from pipeline.process import BatchResult, process_batch
from pipeline.schema import Conversation, QuarantineRecord
from pipeline.segment import Segmenter
from pipeline.state import FileStamp, State
from pipeline.store import (CorruptOutputError, remove_orphans, run_parts, verify_parts, write_cases, write_quarantine,
                            write_summary)
from pipeline.textprep import get_masker

Progress = Callable[[str, int, int], None]
EMPTY_CASE_COLUMNS = ["outcome", "channel", "order_id", "timings_missing"]


def _noop(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class RunContext:
    cfg: Config
    out: Path
    input_dir: Path
    run_id: str
    ingest_date: date
    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    orphans_removed: int = 0


@dataclass
class IngestResult:
    accepted: list[Conversation]
    quarantined: list[QuarantineRecord]
    files: list[FileStamp]
    counts: Counter
    reasons: Counter
    files_skipped: int = 0
    encodings: Counter = field(default_factory=Counter)


def checkpoint(stage: str) -> None:
    """Fault injection for the crash tests: with CASEMINE_KILL_AT=<stage> the process dies here by
    SIGKILL, as a machine losing power would (no cleanup, no finally blocks)."""
    if os.environ.get("CASEMINE_KILL_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def start_run(cfg: Config, input_dir: Path, out: Path) -> RunContext:
    """Undo what killed runs left behind, then open a new run."""
    if not input_dir.exists():
        raise FileNotFoundError(f"input {input_dir} does not exist; pass --input DIR with *.jsonl, *.json or *.csv files "
                                "(or run `casemine sample` to make some)")
    out.mkdir(parents=True, exist_ok=True)
    state = State(out)
    try:
        problems = verify_parts(out, state.parts())
        if problems:
            first = problems[0]
            raise CorruptOutputError(
                f"{len(problems)} stored case file(s) are damaged, e.g. {first['path']}: {first['problem']}. "
                f"Run `casemine repair --out {out}` to drop the affected runs' cases; the next `casemine run` "
                "reprocesses their transcripts (keep the input files in place).")
        abandoned = state.abandoned_runs()
        removed = remove_orphans(out, state.committed_runs())
        state.mark_abandoned(abandoned)
        ctx = RunContext(cfg, out, input_dir, new_run_id(), datetime.now().date(), orphans_removed=len(removed))
        state.begin_run(ctx.run_id)
    finally:
        state.close()
    return ctx


def ingest(ctx: RunContext, progress: Progress = _noop) -> IngestResult:
    """Read every new or changed file; deduplicate against what earlier runs committed."""
    t0 = time.perf_counter()
    paths = discover(ctx.input_dir)
    state = State(ctx.out)
    counts: Counter = Counter()
    reasons: Counter = Counter()
    encodings: Counter = Counter()
    accepted: list[Conversation] = []
    quarantined: list[QuarantineRecord] = []
    stamps: list[FileStamp] = []
    skipped = 0
    try:
        results: list[FileResult] = []
        for i, p in enumerate(paths):
            st = p.stat()
            rel = str(p.relative_to(ctx.input_dir)) if p != ctx.input_dir else p.name
            digest = functools.lru_cache(maxsize=1)(lambda p=p: sha256_file(p))
            if state.file_unchanged(rel, st.st_size, st.st_mtime_ns, digest):
                skipped += 1
            else:
                stamps.append(FileStamp(rel, st.st_size, st.st_mtime_ns, digest()))
                results.append(read_file(p, ctx.cfg.ingest, root=ctx.input_dir if ctx.input_dir.is_dir() else p.parent))
            progress("ingest", i + 1, len(paths))
        seen_ids: dict[str, str] = state.seen_hashes(c.conversation_id for r in results for c in r.conversations)
        seen_bad = state.quarantined_hashes(q.raw_hash for r in results for q in r.quarantined)
        batch_bad: set[str] = set()
        for r in results:
            encodings[r.encoding] += 1
            counts["read"] += r.n_read
            for q in r.quarantined:
                if q.raw_hash in seen_bad or q.raw_hash in batch_bad:
                    counts["duplicates"] += 1
                    reasons["duplicate:already_quarantined"] += 1
                    continue
                batch_bad.add(q.raw_hash)
                quarantined.append(q)
                reasons[q.reason] += 1
            for c in r.conversations:
                prev = seen_ids.get(c.conversation_id)
                if prev == c.content_hash:
                    counts["duplicates"] += 1
                    reasons["duplicate:same_content"] += 1
                elif prev is not None:
                    q = QuarantineRecord(c.source_file, "conflicting_id",
                                         f"conversation_id {c.conversation_id[:40]} was already accepted with different content; "
                                         "give corrected re-deliveries a new id, or remove the earlier one from the output",
                                         c.source_line, None, c.conversation_id,
                                         " ".join(t.text for t in c.turns)[:120], "conflict:" + c.content_hash)
                    if q.raw_hash in seen_bad or q.raw_hash in batch_bad:
                        counts["duplicates"] += 1
                        reasons["duplicate:already_quarantined"] += 1
                    else:
                        batch_bad.add(q.raw_hash)
                        quarantined.append(q)
                        reasons["conflicting_id"] += 1
                else:
                    seen_ids[c.conversation_id] = c.content_hash
                    accepted.append(c)
    finally:
        state.close()
    counts["accepted"] = len(accepted)
    counts["quarantined"] = len(quarantined)
    ctx.seconds["ingest"] = time.perf_counter() - t0
    return IngestResult(accepted, quarantined, stamps, counts, reasons, skipped, encodings)


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def process(ctx: RunContext, convs: list[Conversation], segmenter: Segmenter | None = None) -> BatchResult:
    """Normalise, mask, extract cases and segment one batch (pure; no writes)."""
    state = State(ctx.out)
    try:
        prior = state.known_orders(str(c.metadata.get("order_id")) for c in convs if c.metadata.get("order_id"))
    finally:
        state.close()
    res = process_batch(convs, ctx.cfg, ctx.run_id, ctx.ingest_date, prior, segmenter)
    from pipeline.emotion import add_emotion

    t = time.perf_counter()
    res.cases = add_emotion(res.cases, ctx.cfg)
    res.seconds["emotion"] = time.perf_counter() - t
    return res


def classify(ctx: RunContext, cases: pd.DataFrame) -> pd.DataFrame:
    """Issue type, request kind and urgency for a batch of cases (trained model, else rules)."""
    from pipeline.classify import classify_cases

    t = time.perf_counter()
    out = classify_cases(cases, ctx.cfg)
    ctx.seconds["classify"] = ctx.seconds.get("classify", 0.0) + time.perf_counter() - t
    return out


def index(ctx: RunContext, cases: pd.DataFrame) -> dict[str, Any]:
    """Embed the run's cases (cache first) and swap in an index version that holds them.

    Runs before the commit on purpose: if the run dies after it, the re-run replaces the same
    stable case ids, so the index never holds a case twice."""
    from pipeline.index import update_from_cases

    t = time.perf_counter()
    summary = update_from_cases(ctx.cfg, ctx.out, cases)
    ctx.seconds["embed+index"] = time.perf_counter() - t
    return summary


def export(ctx: RunContext) -> dict[str, Any]:
    """Clusters, trends, root-cause matrix, KPIs and the HTML report over all stored cases.

    After the commit: exports are derived from committed cases only, and rebuilding them is
    idempotent, so a run killed here is finished by the next one."""
    from pipeline.export import export_all

    t = time.perf_counter()
    summary = export_all(ctx.cfg, ctx.out)
    ctx.seconds["export"] = time.perf_counter() - t
    keep = ("export_dir", "report", "n_cases", "n_clusters", "n_new_clusters", "alerts")
    return {k: summary[k] for k in keep if k in summary}


def refresh_library(ctx: RunContext) -> dict[str, Any]:
    """Re-select typical-case candidates; decisions already made in the review store are kept."""
    from pipeline.library import build

    t = time.perf_counter()
    summary = build(ctx.cfg, ctx.out)
    ctx.seconds["library"] = time.perf_counter() - t
    return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}


def classification_summary(cases: pd.DataFrame) -> dict[str, Any]:
    if not len(cases) or "issue_type" not in cases:
        return {}
    return {"classifier": str(cases["classifier"].iloc[0]),
            "needs_review": int(cases["needs_review"].sum()),
            "by_issue_type": {k: int(v) for k, v in cases["issue_type"].value_counts().items()},
            "by_urgency": {k: int(v) for k, v in cases["urgency"].value_counts().items()}}


def store(ctx: RunContext, cases: pd.DataFrame, part: int) -> list[Path]:
    return write_cases(ctx.out, cases, ctx.run_id, part) if len(cases) else []


def commit(ctx: RunContext, ing: IngestResult, rejected: list[QuarantineRecord], cases: pd.DataFrame) -> Path | None:
    """Write the quarantine file, then record the run as committed in one transaction."""
    masker = get_masker(ctx.cfg)
    quarantined = ing.quarantined + rejected
    qpath = write_quarantine(ctx.out, ctx.run_id, quarantined, masker)
    parts = [(str(p.relative_to(ctx.out)), sha256_file(p)) for p in run_parts(ctx.out, ctx.run_id)]
    state = State(ctx.out)
    try:
        state.commit_run(
            ctx.run_id,
            conversations=[(c.conversation_id, c.content_hash) for c in ing.accepted],
            quarantined=[(q.raw_hash, q.reason) for q in quarantined],
            files=ing.files,
            orders=[o for o in cases["order_id"].dropna().unique()] if len(cases) else [],
            parts=parts,
        )
    finally:
        state.close()
    return qpath


def summarize(ctx: RunContext, ing: IngestResult, rejected: list[QuarantineRecord], cases: pd.DataFrame,
              pii: Counter, chars_segmented: int, extra: dict[str, Any] | None = None,
              qpath: Path | None = None) -> dict[str, Any]:
    counts = Counter(ing.counts)
    counts["accepted"] -= len(rejected)
    counts["quarantined"] += len(rejected)
    reasons = Counter(ing.reasons)
    for q in rejected:
        reasons[q.reason] += 1
    total = time.perf_counter() - ctx.started
    n_conv = counts["accepted"] + len(rejected)
    summary: dict[str, Any] = {
        "run_id": ctx.run_id,
        "input": str(ctx.input_dir),
        "out": str(ctx.out),
        "files": {"read": len(ing.files), "skipped_unchanged": ing.files_skipped, "encodings": dict(ing.encodings)},
        "records": {"read": counts["read"], "accepted": counts["accepted"], "duplicates": counts["duplicates"],
                    "quarantined": counts["quarantined"],
                    "reconciles": counts["read"] == counts["accepted"] + counts["duplicates"] + counts["quarantined"]},
        "reasons": dict(sorted(reasons.items())),
        "cases": {"written": int(len(cases)),
                  "by_outcome": {k: int(v) for k, v in cases["outcome"].value_counts().items()} if len(cases) else {},
                  "by_channel": {k: int(v) for k, v in cases["channel"].value_counts().items()} if len(cases) else {},
                  "timings_missing": _timings_missing(cases)},
        "pii_masked": dict(sorted(pii.items())),
        "orphans_removed": ctx.orphans_removed,
        "seconds": {k: round(v, 3) for k, v in {**ctx.seconds, "total": total}.items()},
        "throughput": {
            "transcripts_per_s": round(n_conv / total, 1) if total else None,
            "segment_chars_per_s": round(chars_segmented / ctx.seconds["segment"], 0) if ctx.seconds.get("segment") else None,
        },
        "outputs": {"cases": str(ctx.out / "processed" / "cases"), "quarantine": str(qpath) if qpath else None,
                    "summary": str(ctx.out / "runs" / ctx.run_id / "summary.json")},
    }
    if extra:
        summary.update(extra)
    write_summary(ctx.out, ctx.run_id, summary, summary_text(summary))
    return summary


def _timings_missing(cases: pd.DataFrame) -> dict[str, int]:
    c: Counter = Counter()
    if len(cases):
        for xs in cases["timings_missing"]:
            c.update(list(xs))
    return dict(sorted(c.items()))


def summary_text(s: dict[str, Any]) -> str:
    r = s["records"]
    lines = [
        f"casemine run {s['run_id']}",
        f"  input   {s['input']}",
        f"  files   {s['files']['read']} read, {s['files']['skipped_unchanged']} unchanged since an earlier run "
        f"(encodings: {', '.join(f'{k} {v}' for k, v in s['files']['encodings'].items()) or '-'})",
        f"  records {r['read']} read = {r['accepted']} accepted + {r['duplicates']} duplicates + {r['quarantined']} quarantined"
        f"  [{'reconciles' if r['reconciles'] else 'DOES NOT RECONCILE'}]",
    ]
    if s["reasons"]:
        lines.append("  reasons " + ", ".join(f"{k} {v}" for k, v in s["reasons"].items()))
    c = s["cases"]
    lines.append(f"  cases   {c['written']} written; outcomes: " + (", ".join(f"{k} {v}" for k, v in c["by_outcome"].items()) or "-"))
    if c["timings_missing"]:
        lines.append("  timings not computable: " + ", ".join(f"{k} in {v} cases" for k, v in c["timings_missing"].items()))
    if s["pii_masked"]:
        lines.append("  masked  " + ", ".join(f"{k} {v}" for k, v in s["pii_masked"].items()))
    for key in ("classification", "index", "exports", "library"):
        if key in s and isinstance(s[key], dict):
            lines.append(f"  {key:<7} " + ", ".join(f"{k} {v}" for k, v in s[key].items() if not isinstance(v, (dict, list))))
    secs = s["seconds"]
    lines.append("  seconds " + ", ".join(f"{k} {v}" for k, v in secs.items()))
    tp = s["throughput"]
    lines.append(f"  speed   {tp['transcripts_per_s']} transcripts/s end to end; segmentation {tp['segment_chars_per_s']} chars/s")
    o = s["outputs"]
    lines.append(f"  outputs cases {o['cases']}")
    if isinstance(s.get("exports"), dict) and s["exports"].get("report"):
        lines.append(f"          report {s['exports']['report']}")
    if o.get("quarantine"):
        lines.append(f"          quarantine {o['quarantine']}")
    lines.append(f"          summary {o['summary']}")
    return "\n".join(lines) + "\n"


def repair(out: Path, check_only: bool = False) -> dict[str, Any]:
    """Find damaged case files; unless check_only, forget the runs that wrote them (so the next
    run reprocesses their transcripts) and delete those runs' files."""
    state = State(out)
    try:
        problems = verify_parts(out, state.parts())
        runs = sorted({p["run_id"] for p in problems})
        removed: list[Path] = []
        if runs and not check_only:
            state.forget_runs(runs)
            removed = remove_orphans(out, state.committed_runs())
    finally:
        state.close()
    return {"problems": problems, "runs": runs, "repaired": bool(runs) and not check_only,
            "removed": [str(p) for p in removed]}


def run_pipeline(cfg: Config, input_dir: Path, out: Path, progress: Progress = _noop) -> dict[str, Any]:
    """The whole nightly run without Prefect (same steps the flow runs as tasks)."""
    ctx = start_run(cfg, input_dir, out)
    ing = ingest(ctx, progress)
    checkpoint("ingest")
    frames, rejected, pii, chars = [], [], Counter(), 0
    parts = batches(ing.accepted, cfg.flow.batch_size)
    with Segmenter(cfg) as seg:
        for n, batch in enumerate(parts):
            res = process(ctx, batch, seg)
            res.cases = classify(ctx, res.cases)
            for k, v in res.seconds.items():
                ctx.seconds[k] = ctx.seconds.get(k, 0.0) + v
            t = time.perf_counter()
            store(ctx, res.cases, n)
            checkpoint("store")
            ctx.seconds["store"] = ctx.seconds.get("store", 0.0) + time.perf_counter() - t
            frames.append(res.cases)
            rejected += res.rejected
            pii.update(res.pii_counts)
            chars += res.chars_segmented
            progress("process", n + 1, len(parts))
    cases = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EMPTY_CASE_COLUMNS)
    extra = {"index": index(ctx, cases) if len(cases) else {"added": 0, "replaced": 0},
             "classification": classification_summary(cases)}
    checkpoint("index")
    qpath = commit(ctx, ing, rejected, cases)
    checkpoint("commit")
    extra["exports"] = export(ctx)
    extra["library"] = refresh_library(ctx)
    return summarize(ctx, ing, rejected, cases, pii, chars, extra, qpath=qpath)
