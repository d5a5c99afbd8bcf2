"""One nightly run as plain functions: start, ingest, process, store, commit, summarise.

`run_pipeline` calls them in order for `casemine run --no-prefect` and the tests; `pipeline.orchestrate.prefect_flow`
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from pipeline.config import Config
from pipeline.ingest import FileResult, discover, input_name, read_file
from pipeline.io import atomic_write_text, sha256_file
from pipeline.orchestrate.batch import BatchResult
from pipeline.orchestrate.lock import run_lock
from pipeline.orchestrate.steps import Components, run_batch, through
from pipeline.progress import progress
from pipeline.schema import Conversation, QuarantineRecord
from pipeline.storage.state import (
    CommitRecord,
    FileStamp,
    State,
    StateError,
    manifests_on_disk,
    read_manifest,
    write_manifest,
)
from pipeline.storage.store import (
    CorruptOutputError,
    remove_orphans,
    run_of,
    run_parts,
    stored_parts,
    verify_parts,
    write_cases,
    write_quarantine,
    write_summary,
)
from pipeline.text.prepare import get_masker
from pipeline.text.segment import Segmenter

EMPTY_CASE_COLUMNS = ["outcome", "channel", "order_id", "timings_missing"]


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
    runner: str = "plain"  # how the steps ran, for the summary (Prefect, or why not)
    # The run's one connection to the state database: opened by `start_run`, used by the steps
    # that read or write the state (ingest, commit, the derived-output marker), closed by
    # `close()`. Batch workers never get it (a Dask worker is another process, and a pickled
    # context leaves it behind): what they need from it, the prior orders, is passed to them.
    state: State | None = field(default=None, repr=False, compare=False)

    @property
    def db(self) -> State:
        if self.state is None:
            raise StateError(f"run {self.run_id}: the state database is not open in this process")
        return self.state

    def close(self) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "state": None}


@dataclass
class IngestResult:
    accepted: list[Conversation]
    quarantined: list[QuarantineRecord]
    files: list[FileStamp]
    counts: Counter
    reasons: Counter
    files_skipped: int = 0
    encodings: Counter = field(default_factory=Counter)
    # Order ids of accepted conversations that earlier runs committed (repeat contacts): looked up
    # once here, so batches (possibly in other processes) need no state database.
    prior_orders: frozenset[str] = frozenset()


def checkpoint(stage: str) -> None:
    """Fault injection for the crash tests: with CASEMINE_KILL_AT=<stage> the process dies here by
    SIGKILL, as a machine losing power would (no cleanup, no finally blocks)."""
    if os.environ.get("CASEMINE_KILL_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def start_run(cfg: Config, input_dir: Path, out: Path, runner: str = "plain") -> RunContext:
    """Check that the stored history is whole, undo what killed runs left behind, open a new run.

    Never deletes what it cannot account for: a lost state database, a missing index `CURRENT`
    or case files of an unknown run stop the run with what to do, instead of shrinking history.
    The returned context holds the run's open state database; the caller closes it (`ctx.close()`)."""
    if not input_dir.exists():
        raise FileNotFoundError(
            f"input {input_dir} does not exist; pass --input DIR with *.jsonl, *.json or *.csv files "
            "(or run `casemine sample` to make some)"
        )
    out.mkdir(parents=True, exist_ok=True)
    from pipeline.retrieval.index import IndexStore
    from pipeline.retrieval.update import index_root

    IndexStore(index_root(out), cfg.index).check_intact()
    state = State(out)
    try:
        reconcile_manifests(out, state)
        problems = verify_parts(out, state.parts())
        if problems:
            first = problems[0]
            raise CorruptOutputError(
                f"{len(problems)} stored case file(s) are damaged, e.g. {first['path']}: {first['problem']}. "
                f"Run `casemine repair --out {out}` to drop the affected runs' cases; the next `casemine run` "
                "reprocesses their transcripts (keep the input files in place)."
            )
        abandoned = state.abandoned_runs()
        removed = remove_orphans(out, state.known_runs())
        state.mark_abandoned(abandoned)
        ctx = RunContext(
            cfg,
            out,
            input_dir,
            new_run_id(),
            datetime.now().date(),
            orphans_removed=len(removed),
            runner=runner,
            state=state,
        )
        state.begin_run(ctx.run_id)
    except BaseException:
        state.close()
        raise
    return ctx


def reconcile_manifests(out: Path, state: State) -> None:
    """Bring the state database and the runs' manifests into agreement before a run starts.

    - a manifest of a run the database never saw: the database was lost, emptied or replaced;
      stop (nothing deleted) and point to `casemine repair`;
    - a manifest of a run the database saw begin but not commit: the run died between writing
      its manifest and its SQLite commit; finish that commit (the manifest is exactly it);
    - a committed run without a manifest (made before manifests existed): write it from the
      database, so a later repair can rebuild from manifests alone."""
    known = state.known_runs()
    on_disk = manifests_on_disk(out)
    unknown = sorted(r for r in on_disk if r not in known)
    if unknown:
        raise StateError(
            f"the state database does not know {len(unknown)} committed run(s) (e.g. {unknown[0]}): it "
            f"was lost, emptied or replaced. Nothing was deleted; run `casemine repair --out {out}` "
            "to rebuild it from the runs' manifests, then run again"
        )
    for run_id, status in known.items():
        if status == "running" and run_id in on_disk:
            state.commit_run(read_manifest(on_disk[run_id]))
        elif status == "committed" and run_id not in on_disk:
            write_manifest(out, state.record_of(run_id))


def ingest(ctx: RunContext) -> IngestResult:
    """Read every new or changed file; deduplicate against what earlier runs committed."""
    paths = discover(ctx.input_dir)
    state = ctx.db
    counts: Counter = Counter()
    reasons: Counter = Counter()
    encodings: Counter = Counter()
    accepted: list[Conversation] = []
    quarantined: list[QuarantineRecord] = []
    stamps: list[FileStamp] = []
    skipped = 0
    results: list[FileResult] = []
    for i, p in enumerate(paths):
        st = p.stat()
        rel = input_name(ctx.input_dir, p)
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
                q = QuarantineRecord(
                    c.source_file,
                    "conflicting_id",
                    f"conversation_id {c.conversation_id[:40]} was already accepted with different content; "
                    "give corrected re-deliveries a new id, or remove the earlier one from the output",
                    c.source_line,
                    None,
                    c.conversation_id,
                    " ".join(t.text for t in c.turns)[:120],
                    "conflict:" + c.content_hash,
                )
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
    counts["accepted"] = len(accepted)
    counts["quarantined"] = len(quarantined)
    prior = state.known_orders(_order_ids(accepted))
    return IngestResult(accepted, quarantined, stamps, counts, reasons, skipped, encodings, prior)


def _order_ids(convs: list[Conversation]) -> list[str]:
    return [str(c.metadata.get("order_id")) for c in convs if c.metadata.get("order_id")]


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Part(NamedTuple):
    """One batch of the run's accepted conversations, with the prior orders among them."""

    convs: list[Conversation]
    prior_orders: frozenset[str]


def parts_of(ing: IngestResult, size: int) -> list[Part]:
    return [Part(b, ing.prior_orders.intersection(_order_ids(b))) for b in batches(ing.accepted, size)]


def process(
    ctx: RunContext, convs: list[Conversation], segmenter: Segmenter | None = None, last: str = "emotion"
) -> BatchResult:
    """The declared batch steps through `last` over one batch (no writes), prior orders read
    from the run's state."""
    with Components.from_config(ctx.cfg, segmenter) as comp:
        return process_with(ctx, comp, convs, ctx.db.known_orders(_order_ids(convs)), last)


def process_with(
    ctx: RunContext,
    comp: Components,
    convs: list[Conversation],
    prior_orders: frozenset[str],
    last: str = "classify",
) -> BatchResult:
    return run_batch(
        convs,
        comp,
        through(last),
        run_id=ctx.run_id,
        ingest_date=ctx.ingest_date,
        prior_orders=prior_orders,
    )


def process_part(ctx: RunContext, comp: Components, part: Part, n: int) -> BatchResult:
    """One batch through every step, and its cases written as part `n` of the run."""
    res = process_with(ctx, comp, part.convs, part.prior_orders)
    t = time.perf_counter()
    store(ctx, res.cases, n)
    res.seconds["store"] = time.perf_counter() - t
    checkpoint("store")
    return res


def index(ctx: RunContext, cases: pd.DataFrame) -> dict[str, Any]:
    """Embed the run's cases (cache first) and swap in an index version that holds them.

    Runs before the commit on purpose: if the run dies after it, the re-run replaces the same
    stable case ids, so the index never holds a case twice."""
    from pipeline.retrieval.update import update_from_cases

    if not len(cases):
        return {"added": 0, "replaced": 0}
    summary = update_from_cases(ctx.cfg, ctx.out, cases)
    progress("index", 1, 1)
    return summary


def export(ctx: RunContext) -> dict[str, Any]:
    """Clusters, trends, root-cause matrix, KPIs and the HTML report over all stored cases.

    After the commit: exports are derived from committed cases only, and rebuilding them is
    idempotent, so a run killed here is finished by the next one."""
    from pipeline.insights.export import export_all

    progress("export", 0, 1)
    summary = export_all(ctx.cfg, ctx.out)
    progress("export", 1, 1)
    keep = ("export_dir", "report", "n_cases", "n_clusters", "n_new_clusters", "alerts")
    return {k: summary[k] for k in keep if k in summary}


def refresh_library(ctx: RunContext) -> dict[str, Any]:
    """Re-select typical-case candidates; decisions already made in the review store are kept."""
    from pipeline.library.typical_cases import build

    progress("library", 0, 1)
    summary = build(ctx.cfg, ctx.out)
    progress("library", 1, 1)
    return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}


def classification_summary(cases: pd.DataFrame) -> dict[str, Any]:
    if not len(cases) or "issue_type" not in cases:
        return {}
    return {
        "classifier": str(cases["classifier"].iloc[0]),
        "needs_review": int(cases["needs_review"].sum()),
        "by_issue_type": {k: int(v) for k, v in cases["issue_type"].value_counts().items()},
        "by_urgency": {k: int(v) for k, v in cases["urgency"].value_counts().items()},
    }


def store(ctx: RunContext, cases: pd.DataFrame, part: int) -> list[Path]:
    return write_cases(ctx.out, cases, ctx.run_id, part) if len(cases) else []


def commit(ctx: RunContext, ing: IngestResult, rejected: list[QuarantineRecord], cases: pd.DataFrame) -> Path | None:
    """Write the quarantine file, then record the run as committed in one transaction."""
    masker = get_masker(ctx.cfg)
    quarantined = ing.quarantined + rejected
    qpath = write_quarantine(ctx.out, ctx.run_id, quarantined, masker)
    parts = [(str(p.relative_to(ctx.out)), sha256_file(p)) for p in run_parts(ctx.out, ctx.run_id)]
    # A conversation a step failed on (bad_value) is not recorded as seen: once the failure is
    # fixed, its next delivery is processed instead of counted as a duplicate.
    failed = {q.raw_hash for q in rejected if q.reason == "bad_value"}
    rec = CommitRecord.of(
        ctx.run_id,
        conversations=[(c.conversation_id, c.content_hash) for c in ing.accepted if c.content_hash not in failed],
        quarantined=[(q.raw_hash, q.reason) for q in quarantined],
        files=ing.files,
        orders=[o for o in cases["order_id"].dropna().unique()] if len(cases) else [],
        parts=parts,
    )
    # The manifest first: if the process dies before the SQLite commit, the next start finishes
    # that commit from it; if the database is ever lost, `casemine repair` rebuilds it from all.
    write_manifest(ctx.out, rec)
    ctx.db.commit_run(rec)
    return qpath


def summarize(
    ctx: RunContext,
    ing: IngestResult,
    rejected: list[QuarantineRecord],
    cases: pd.DataFrame,
    pii: Counter,
    chars_segmented: int,
    extra: dict[str, Any] | None = None,
    qpath: Path | None = None,
) -> dict[str, Any]:
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
        "records": {
            "read": counts["read"],
            "accepted": counts["accepted"],
            "duplicates": counts["duplicates"],
            "quarantined": counts["quarantined"],
            "reconciles": counts["read"] == counts["accepted"] + counts["duplicates"] + counts["quarantined"],
        },
        "reasons": dict(sorted(reasons.items())),
        "cases": {
            "written": int(len(cases)),
            "by_outcome": {k: int(v) for k, v in cases["outcome"].value_counts().items()} if len(cases) else {},
            "by_channel": {k: int(v) for k, v in cases["channel"].value_counts().items()} if len(cases) else {},
            "timings_missing": _timings_missing(cases),
        },
        "pii_masked": dict(sorted(pii.items())),
        "orphans_removed": ctx.orphans_removed,
        "runner": ctx.runner,
        "seconds": {k: round(v, 3) for k, v in {**ctx.seconds, "total": total}.items()},
        "throughput": {
            "transcripts_per_s": round(n_conv / total, 1) if total else None,
            "segment_chars_per_s": round(chars_segmented / ctx.seconds["segment"], 0)
            if ctx.seconds.get("segment")
            else None,
        },
        "outputs": {
            "cases": str(ctx.out / "processed" / "cases"),
            "quarantine": str(qpath) if qpath else None,
            "summary": str(ctx.out / "runs" / ctx.run_id / "summary.json"),
        },
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
        f"  records {r['read']} read = {r['accepted']} accepted + {r['duplicates']} duplicates"
        f" + {r['quarantined']} quarantined"
        f"  [{'reconciles' if r['reconciles'] else 'DOES NOT RECONCILE'}]",
    ]
    if s["reasons"]:
        lines.append("  reasons " + ", ".join(f"{k} {v}" for k, v in s["reasons"].items()))
    c = s["cases"]
    lines.append(
        f"  cases   {c['written']} written; outcomes: "
        + (", ".join(f"{k} {v}" for k, v in c["by_outcome"].items()) or "-")
    )
    if c["timings_missing"]:
        lines.append(
            "  timings not computable: " + ", ".join(f"{k} in {v} cases" for k, v in c["timings_missing"].items())
        )
    if s["pii_masked"]:
        lines.append("  masked  " + ", ".join(f"{k} {v}" for k, v in s["pii_masked"].items()))
    for key in ("classification", "index", "exports", "library"):
        items = (
            [f"{k} {v}" for k, v in (s.get(key) or {}).items() if not isinstance(v, (dict, list))]
            if isinstance(s.get(key), dict)
            else []
        )
        if items:
            lines.append(f"  {key:<7} " + ", ".join(items))
    lines.append("  seconds " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    tp = s["throughput"]
    speed = [f"{tp['transcripts_per_s']} transcripts/s end to end"] if r["accepted"] else []
    if tp.get("segment_chars_per_s"):
        speed.append(f"segmentation {tp['segment_chars_per_s']:.0f} chars/s")
    if speed:
        lines.append("  speed   " + "; ".join(speed))
    if s.get("runner"):
        lines.append(f"  runner  {s['runner']}")
    o = s["outputs"]
    lines.append(f"  outputs cases {o['cases']}")
    if isinstance(s.get("exports"), dict) and s["exports"].get("report"):
        lines.append(f"          report {s['exports']['report']}")
    if o.get("quarantine"):
        lines.append(f"          quarantine {o['quarantine']}")
    lines.append(f"          summary {o['summary']}")
    return "\n".join(lines) + "\n"


def repair(out: Path, check_only: bool = False) -> dict[str, Any]:
    """Make the output root consistent again, never by dropping history it can keep.

    1. A damaged state database is moved aside and rebuilt from the runs' manifests; manifests of
       runs the database does not know are replayed into it (in run order: contact counts add up).
    2. Case files of a run with neither a database record nor a manifest are adopted as committed
       (their conversations are read again by the next run; case ids are stable, so they replace
       the same cases instead of adding them).
    3. Damaged case files (checksum) drop their runs, so the next run reprocesses those transcripts.
    With `check_only`, nothing is changed and the problems are reported."""
    report: dict[str, Any] = {"state_rebuilt": False, "replayed_runs": [], "adopted_runs": []}
    try:
        state = State(out)
    except StateError:
        if check_only:
            return {
                **report,
                "problems": [{"path": "state/state.sqlite", "run_id": "", "problem": "damaged"}],
                "runs": [],
                "repaired": False,
                "removed": [],
            }
        _move_aside(out / "state" / "state.sqlite")
        state = State(out)
        report["state_rebuilt"] = True
    try:
        known = state.known_runs()
        on_disk = manifests_on_disk(out)
        replay = sorted(r for r in on_disk if known.get(r) not in ("committed", "repaired", "abandoned"))
        adopt = sorted({run_of(p) for p in stored_parts(out)} - set(known) - set(on_disk))
        problems = [
            {"path": str(on_disk[r].relative_to(out)), "run_id": r, "problem": "not in the state database"}
            for r in replay
        ]
        problems += [
            {"path": f"processed/cases/*/part-{r}-*", "run_id": r, "problem": "case files of no known run"}
            for r in adopt
        ]
        if not check_only:
            for r in replay:
                state.commit_run(read_manifest(on_disk[r]))
            for r in adopt:
                state.begin_run(r)
                state.commit_run(
                    CommitRecord(r, parts=[(str(p.relative_to(out)), sha256_file(p)) for p in run_parts(out, r)])
                )
                write_manifest(out, state.record_of(r))
            report.update(replayed_runs=replay, adopted_runs=adopt)
        damaged = verify_parts(out, state.parts())
        problems += damaged
        runs = sorted({p["run_id"] for p in damaged})
        removed: list[Path] = []
        if runs and not check_only:
            state.forget_runs(runs)
            removed = remove_orphans(out, state.known_runs())
    finally:
        state.close()
    return {
        **report,
        "problems": problems,
        "runs": runs,
        "repaired": bool(problems) and not check_only,
        "removed": [str(p) for p in removed],
    }


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    for suffix in ("", "-wal", "-shm"):
        p = path.with_name(path.name + suffix)
        if p.exists():
            p.rename(aside.with_name(aside.name + suffix))
    return aside


# -- the run, declared once ---------------------------------------------------------------------


@dataclass
class Night:
    """What a run's steps have made so far; each step adds one field (`RunStep.adds`). After the
    batch step the runner joins the batches' case tables once, into `cases`."""

    ctx: RunContext
    ingest: IngestResult | None = None
    batches: list[BatchResult] = field(default_factory=list)
    cases: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EMPTY_CASE_COLUMNS))
    index: dict[str, Any] = field(default_factory=dict)
    quarantine: Path | None = None
    exports: dict[str, Any] = field(default_factory=dict)
    library: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def rejected(self) -> list[QuarantineRecord]:
        return [q for r in self.batches for q in r.rejected]


@dataclass(frozen=True)
class RunStep:
    """One step of the nightly run. `run(night)` returns the value of `night.<adds>`; a
    `per_batch` step instead runs `run(ctx, components, part, n)` on every `Part` of accepted
    conversations (the declared batch steps of `pipeline.orchestrate.steps`, then the part's case file).
    The runner times every step, reports progress, and offers a crash checkpoint after it."""

    name: str
    reads: tuple[str, ...]
    adds: str
    run: Callable[..., Any]
    per_batch: bool = False


def _ingest(night: Night) -> IngestResult:
    return ingest(night.ctx)


def _index(night: Night) -> dict[str, Any]:
    return index(night.ctx, night.cases)


def _commit(night: Night) -> Path | None:
    assert night.ingest is not None
    qpath = commit(night.ctx, night.ingest, night.rejected, night.cases)
    progress("commit", 1, 1)
    return qpath


def _derive_needed(night: Night) -> bool:
    """Exports and library are derived from all committed cases: redone when this run added cases
    or an earlier run died before finishing them; a night with nothing new keeps yesterday's."""
    return bool(len(night.cases)) or not derived_outputs_current(night.ctx.out, night.ctx.db)


def _exports(night: Night) -> dict[str, Any]:
    return export(night.ctx) if _derive_needed(night) else {"skipped": "no new cases"}


def _library(night: Night) -> dict[str, Any]:
    if not _derive_needed(night):
        return {"skipped": "no new cases"}
    done = refresh_library(night.ctx)
    mark_derived_current(night.ctx.out, night.ctx.db)  # the last derived output: both are now current
    return done


def _summary(night: Night) -> dict[str, Any]:
    assert night.ingest is not None
    pii: Counter = Counter()
    for r in night.batches:
        pii.update(r.pii_counts)
    cases = night.cases
    extra = {
        "index": night.index,
        "classification": classification_summary(cases),
        "exports": night.exports,
        "library": night.library,
    }
    return summarize(
        night.ctx,
        night.ingest,
        night.rejected,
        cases,
        pii,
        sum(r.chars_segmented for r in night.batches),
        extra,
        qpath=night.quarantine,
    )


NIGHTLY: tuple[RunStep, ...] = (
    RunStep("ingest", ("input files", "state"), "ingest", _ingest),
    RunStep("process", ("ingest",), "batches", process_part, per_batch=True),
    RunStep("index", ("batches",), "index", _index),
    RunStep("commit", ("ingest", "batches"), "quarantine", _commit),
    RunStep("export", ("committed cases",), "exports", _exports),
    RunStep("library", ("committed cases",), "library", _library),
    RunStep("summary", ("ingest", "batches", "index", "quarantine", "exports", "library"), "summary", _summary),
)


def add_seconds(ctx: RunContext, name: str, seconds: float) -> None:
    ctx.seconds[name] = ctx.seconds.get(name, 0.0) + seconds


def run_declared(
    ctx: RunContext,
    call: Callable[[RunStep, Night], Any],
    each_batch: Callable[[RunStep, list[Part]], Iterator[BatchResult]],
) -> dict[str, Any]:
    """`NIGHTLY` in order, the one loop both runners share: `call(step, night)` runs a step (a
    plain call, or a Prefect task), `each_batch(step, parts)` yields the batch step's results in
    part order. Timings, progress and crash checkpoints are kept here, not in the steps."""
    night = Night(ctx)
    for step in NIGHTLY:
        t = time.perf_counter()
        if step.per_batch:
            assert night.ingest is not None
            parts = parts_of(night.ingest, ctx.cfg.flow.batch_size)
            done = 0
            for part, res in zip(parts, each_batch(step, parts)):
                night.batches.append(res)
                for k, v in res.seconds.items():
                    add_seconds(ctx, k, v)
                done += len(part.convs)
                progress(step.name, done, len(night.ingest.accepted))
            if night.batches:
                night.cases = pd.concat([r.cases for r in night.batches], ignore_index=True)
        else:
            setattr(night, step.adds, call(step, night))
            if step.adds != "summary":
                add_seconds(ctx, step.name, time.perf_counter() - t)
        checkpoint(step.name)
    return night.summary


def run_pipeline(cfg: Config, input_dir: Path, out: Path, runner: str = "plain") -> dict[str, Any]:
    """The whole nightly run as a plain loop over `NIGHTLY` (the Prefect flow runs the same list
    as tasks), holding the output root's lock (re-entrant: `casemine run` already holds it)."""
    with run_lock(out):
        ctx = start_run(cfg, input_dir, out, runner)
        try:
            with Components.from_config(cfg) as comp:
                return run_declared(
                    ctx,
                    lambda step, night: step.run(night),
                    lambda step, parts: (step.run(ctx, comp, part, n) for n, part in enumerate(parts)),
                )
        finally:
            ctx.close()


def mark_derived_current(out: Path, state: State) -> None:
    atomic_write_text(_derived_marker(out), state.latest_case_run() + "\n")


def _derived_marker(out: Path) -> Path:
    return out / "exports" / "DERIVED_FROM_RUN"


def _latest_case_run(out: Path) -> str:
    if not (out / "state" / "state.sqlite").is_file():
        return ""
    state = State(out)
    try:
        return state.latest_case_run()
    finally:
        state.close()


def derived_outputs_current(out: Path, state: State | None = None) -> bool:
    """Whether exports and library reflect every stored case: the marker names the newest run
    that stored case files. A run killed after its commit leaves them behind and the next run,
    even with nothing new, finishes them; a run that stored no cases changes nothing they derive
    from, so it does not make them stale. A run passes its open `state`; outside a run (the
    CLI's check) the database is opened for the question, if it exists."""
    latest = state.latest_case_run() if state is not None else _latest_case_run(out)
    marker = _derived_marker(out)
    return not latest or (marker.is_file() and marker.read_text(encoding="utf-8").strip() == latest)
