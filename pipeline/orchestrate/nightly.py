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
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from pipeline.config import Config
from pipeline.embed.embedder import release_shared_models
from pipeline.heap import fix_mmap_threshold, release_unused_memory, use_system_arrow_pool
from pipeline.ingest import FileResult, discover, input_name, read_file
from pipeline.ingest.spans import Span, spans
from pipeline.io import atomic_write_text, sha256_file
from pipeline.orchestrate.batch import BatchResult
from pipeline.orchestrate.lock import run_lock
from pipeline.orchestrate.memtrace import step_ended, step_started
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

    # Set on a chunk's context (`for_chunk`): the run it belongs to. A run commits its input in
    # chunks, each under its own run id, so memory stays flat however much a run reads.
    chunk_of: str | None = None

    def close(self) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None

    @property
    def run(self) -> str:
        """The run's id (the same for all its chunks)."""
        return self.chunk_of or self.run_id

    def for_chunk(self, number: int) -> RunContext:
        """The context chunk `number` commits under: the run's own id for the first chunk (a run
        that fits one chunk looks as it always did), `<run_id>-c0001`.. for the next. It shares
        the run's state connection and timings."""
        if number == 0:
            return self
        return replace(self, run_id=f"{self.run}-c{number:04d}", chunk_of=self.run)

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


_PASSED: Counter = Counter()


def checkpoint(stage: str) -> None:
    """Fault injection for the crash tests: with CASEMINE_KILL_AT=<stage> the process dies here by
    SIGKILL, as a machine losing power would (no cleanup, no finally blocks); `<stage>#<n>` dies
    the n-th time the run passes it (a later chunk's commit)."""
    want = os.environ.get("CASEMINE_KILL_AT")
    if not want:
        return
    _PASSED[stage] += 1
    name, _, nth = want.partition("#")
    if name == stage and _PASSED[stage] == int(nth or 1):
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
    use_system_arrow_pool()
    # The encoder's batch buffers mapped and unmapped, not left to fragment the heap chunk after
    # chunk (`fix_mmap_threshold`).
    fix_mmap_threshold()
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


@dataclass(frozen=True)
class InputPiece:
    """A file, or a line-aligned span of a big JSONL file, to read in a chunk."""

    path: Path
    span: Span
    # Set on a file's last piece: the file counts as read once the chunk holding it commits.
    stamp: FileStamp | None
    first: bool  # the file's first piece (its encoding is counted once)


@dataclass(frozen=True)
class ChunkPlan:
    """The input one chunk of a run reads, processes, indexes and commits."""

    number: int
    pieces: tuple[InputPiece, ...] = ()
    skipped: int = 0  # unchanged files passed over while planning this chunk
    files_seen: int = 0  # files planned so far in the run, of `files_total`
    files_total: int = 0


def plan_chunks(ctx: RunContext, chunk_bytes: int | None = None) -> Iterator[ChunkPlan]:
    """The run's new input cut into chunks of about `flow.chunk_mb` megabytes (whole files; big
    JSONL files cut between lines). Lazy: a file is checked against the state when its chunk is
    planned, after the chunks before it committed. Always yields at least one chunk, so a night
    with nothing new still commits (and reports) its run."""
    limit = chunk_bytes or max(1, int(ctx.cfg.flow.chunk_mb * 1_000_000))
    paths = discover(ctx.input_dir)
    pieces: list[InputPiece] = []
    size_now, skipped, number = 0, 0, 0
    for i, p in enumerate(paths):
        st = p.stat()
        rel = input_name(ctx.input_dir, p)
        digest = functools.lru_cache(maxsize=1)(lambda p=p: sha256_file(p))
        if ctx.db.file_unchanged(rel, st.st_size, st.st_mtime_ns, digest):
            skipped += 1
            continue
        stamp = FileStamp(rel, st.st_size, st.st_mtime_ns, digest())
        cuts = spans(p, st.st_size, limit)
        for j, span in enumerate(cuts):
            last = j == len(cuts) - 1
            pieces.append(InputPiece(p, span, stamp if last else None, j == 0))
            size_now += span.end - span.start
            if size_now >= limit:
                yield ChunkPlan(number, tuple(pieces), skipped, i + int(last), len(paths))
                pieces, size_now, skipped, number = [], 0, 0, number + 1
    if pieces or skipped or number == 0:
        yield ChunkPlan(number, tuple(pieces), skipped, len(paths), len(paths))


def whole_input(ctx: RunContext) -> ChunkPlan:
    """All new input as one chunk (for callers that do not chunk: tests, one-off reads)."""
    big = 1 << 62
    plans = list(plan_chunks(ctx, chunk_bytes=big))
    return plans[0]


def ingest(ctx: RunContext, plan: ChunkPlan | None = None) -> IngestResult:
    """Read a chunk's files (by default all new input); deduplicate against what earlier runs
    and earlier chunks of this run committed, and within the chunk."""
    plan = plan if plan is not None else whole_input(ctx)
    state = ctx.db
    counts: Counter = Counter()
    reasons: Counter = Counter()
    encodings: Counter = Counter()
    accepted: list[Conversation] = []
    quarantined: list[QuarantineRecord] = []
    results: list[FileResult] = []
    root = ctx.input_dir if ctx.input_dir.is_dir() else ctx.input_dir.parent
    for i, piece in enumerate(plan.pieces):
        res = read_file(piece.path, ctx.cfg.ingest, root=root, span=piece.span)
        if piece.first:
            encodings[res.encoding] += 1
        results.append(res)
        progress("ingest", i + 1, len(plan.pieces))
    stamps = [piece.stamp for piece in plan.pieces if piece.stamp is not None]
    skipped = plan.skipped
    seen_ids: dict[str, str] = state.seen_hashes(c.conversation_id for r in results for c in r.conversations)
    seen_bad = state.quarantined_hashes(q.raw_hash for r in results for q in r.quarantined)
    batch_bad: set[str] = set()
    for r in results:
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


@dataclass
class RunTotals:
    """What the run's summary needs from each chunk, kept as counts: a run's memory must not
    grow with how much it reads (cases and conversations are dropped after their chunk)."""

    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    encodings: Counter = field(default_factory=Counter)
    files_read: int = 0
    files_skipped: int = 0
    rejected: int = 0  # accepted conversations a step then failed on (quarantined)
    pii: Counter = field(default_factory=Counter)
    chars_segmented: int = 0
    cases_written: int = 0
    by_outcome: Counter = field(default_factory=Counter)
    by_channel: Counter = field(default_factory=Counter)
    timings_missing: Counter = field(default_factory=Counter)
    classifier: str | None = None
    needs_review: int = 0
    by_issue_type: Counter = field(default_factory=Counter)
    by_urgency: Counter = field(default_factory=Counter)
    index: dict[str, Any] = field(default_factory=dict)
    quarantine_files: list[str] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)

    # Index figures that add up over chunks; the others (total, version, kind, model) are the last chunk's.
    _SUMMED = ("added", "replaced", "embedded_new", "embedded_cached", "seconds")

    def add_chunk(
        self,
        run_id: str,
        ing: IngestResult,
        batches: list[BatchResult],
        cases: pd.DataFrame,
        index: dict[str, Any],
        qpath: Path | None,
    ) -> None:
        rejected = [q for r in batches for q in r.rejected]
        self.chunks.append(run_id)
        self.counts.update(ing.counts)
        self.counts["accepted"] -= len(rejected)
        self.counts["quarantined"] += len(rejected)
        self.rejected += len(rejected)
        self.reasons.update(ing.reasons)
        self.reasons.update(q.reason for q in rejected)
        self.encodings.update(ing.encodings)
        self.files_read += len(ing.files)
        self.files_skipped += ing.files_skipped
        for r in batches:
            self.pii.update(r.pii_counts)
            self.chars_segmented += r.chars_segmented
        for k, v in index.items():
            if k in self._SUMMED and isinstance(v, (int, float)):
                self.index[k] = round(self.index.get(k, 0) + v, 3)
            else:
                self.index[k] = v
        if qpath is not None:
            self.quarantine_files.append(str(qpath))
        if not len(cases):
            return
        self.cases_written += len(cases)
        self.by_outcome.update(cases["outcome"].dropna())
        self.by_channel.update(cases["channel"].dropna())
        for xs in cases["timings_missing"]:
            self.timings_missing.update(list(xs))
        if "issue_type" in cases:
            self.classifier = str(cases["classifier"].iloc[0])
            self.needs_review += int(cases["needs_review"].sum())
            self.by_issue_type.update(cases["issue_type"].dropna())
            self.by_urgency.update(cases["urgency"].dropna())

    def classification(self) -> dict[str, Any]:
        if self.classifier is None:
            return {}
        return {
            "classifier": self.classifier,
            "needs_review": self.needs_review,
            "by_issue_type": _by_count(self.by_issue_type),
            "by_urgency": _by_count(self.by_urgency),
        }


def _by_count(c: Counter) -> dict[str, int]:
    return {str(k): int(v) for k, v in c.most_common()}


def summarize(ctx: RunContext, t: RunTotals, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    counts = t.counts
    total = time.perf_counter() - ctx.started
    n_conv = counts["accepted"] + t.rejected
    summary: dict[str, Any] = {
        "run_id": ctx.run_id,
        "input": str(ctx.input_dir),
        "out": str(ctx.out),
        "files": {"read": t.files_read, "skipped_unchanged": t.files_skipped, "encodings": dict(t.encodings)},
        "records": {
            "read": counts["read"],
            "accepted": counts["accepted"],
            "duplicates": counts["duplicates"],
            "quarantined": counts["quarantined"],
            "reconciles": counts["read"] == counts["accepted"] + counts["duplicates"] + counts["quarantined"],
        },
        "reasons": dict(sorted(t.reasons.items())),
        "cases": {
            "written": t.cases_written,
            "by_outcome": _by_count(t.by_outcome),
            "by_channel": _by_count(t.by_channel),
            "timings_missing": dict(sorted(t.timings_missing.items())),
        },
        "pii_masked": dict(sorted(t.pii.items())),
        "orphans_removed": ctx.orphans_removed,
        "runner": ctx.runner,
        # The run ids its chunks committed under (one unless the input passed `flow.chunk_mb`).
        "chunks": list(t.chunks),
        "seconds": {k: round(v, 3) for k, v in {**ctx.seconds, "total": total}.items()},
        "throughput": {
            "transcripts_per_s": round(n_conv / total, 1) if total else None,
            "segment_chars_per_s": round(t.chars_segmented / ctx.seconds["segment"], 0)
            if ctx.seconds.get("segment")
            else None,
        },
        "outputs": {
            "cases": str(ctx.out / "processed" / "cases"),
            "quarantine": t.quarantine_files[0] if len(t.quarantine_files) == 1 else None,
            "quarantine_files": list(t.quarantine_files),
            "summary": str(ctx.out / "runs" / ctx.run_id / "summary.json"),
        },
    }
    if extra:
        summary.update(extra)
    write_summary(ctx.out, ctx.run_id, summary, summary_text(summary))
    return summary


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
    for q in o.get("quarantine_files") or ([o["quarantine"]] if o.get("quarantine") else []):
        lines.append(f"          quarantine {q}")
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
    """What a run's steps have made so far; each step adds one field (`RunStep.adds`).

    The chunk steps (ingest through commit) fill the chunk fields for one chunk of input at a
    time (`chunk` is the context that chunk commits under); the runner then folds them into
    `totals` and drops them, so a run holds one chunk's conversations and cases at most. After
    the batch step the runner joins that chunk's case tables once, into `cases`."""

    ctx: RunContext
    chunk: RunContext | None = None
    plan: ChunkPlan | None = None
    ingest: IngestResult | None = None
    batches: list[BatchResult] = field(default_factory=list)
    cases: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EMPTY_CASE_COLUMNS))
    index: dict[str, Any] = field(default_factory=dict)
    quarantine: Path | None = None
    totals: RunTotals = field(default_factory=RunTotals)
    exports: dict[str, Any] = field(default_factory=dict)
    library: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def rejected(self) -> list[QuarantineRecord]:
        return [q for r in self.batches for q in r.rejected]

    def start_chunk(self, plan: ChunkPlan) -> None:
        self.plan, self.chunk = plan, self.ctx.for_chunk(plan.number)
        if self.chunk is not self.ctx:
            self.ctx.db.begin_run(self.chunk.run_id)

    def end_chunk(self) -> None:
        assert self.chunk is not None and self.ingest is not None
        self.totals.add_chunk(self.chunk.run_id, self.ingest, self.batches, self.cases, self.index, self.quarantine)
        self.chunk = self.plan = self.ingest = self.quarantine = None
        self.batches, self.index = [], {}
        self.cases = pd.DataFrame(columns=EMPTY_CASE_COLUMNS)


@dataclass(frozen=True)
class RunStep:
    """One step of the nightly run. `run(night)` returns the value of `night.<adds>`; a
    `per_batch` step instead runs `run(ctx, components, part, n)` on every `Part` of the chunk's
    accepted conversations (the declared batch steps of `pipeline.orchestrate.steps`, then the
    part's case file). `per_chunk` steps run once per chunk of input, the others once per run.
    The runner times every step, reports progress, and offers a crash checkpoint after it."""

    name: str
    reads: tuple[str, ...]
    adds: str
    run: Callable[..., Any]
    per_batch: bool = False
    per_chunk: bool = False


def _chunk(night: Night) -> RunContext:
    assert night.chunk is not None, "a chunk step ran outside a chunk"
    return night.chunk


def _ingest(night: Night) -> IngestResult:
    return ingest(_chunk(night), night.plan)


def _index(night: Night) -> dict[str, Any]:
    return index(_chunk(night), night.cases)


def _commit(night: Night) -> Path | None:
    assert night.ingest is not None
    qpath = commit(_chunk(night), night.ingest, night.rejected, night.cases)
    progress("commit", 1, 1)
    return qpath


def _derive_needed(night: Night) -> bool:
    """Exports and library are derived from all committed cases: redone when this run added cases
    or an earlier run died before finishing them; a night with nothing new keeps yesterday's."""
    return bool(night.totals.cases_written) or not derived_outputs_current(night.ctx.out, night.ctx.db)


def _exports(night: Night) -> dict[str, Any]:
    return export(night.ctx) if _derive_needed(night) else {"skipped": "no new cases"}


def _library(night: Night) -> dict[str, Any]:
    if not _derive_needed(night):
        return {"skipped": "no new cases"}
    done = refresh_library(night.ctx)
    mark_derived_current(night.ctx.out, night.ctx.db)  # the last derived output: both are now current
    return done


def _summary(night: Night) -> dict[str, Any]:
    t = night.totals
    extra = {
        "index": t.index,
        "classification": t.classification(),
        "exports": night.exports,
        "library": night.library,
    }
    return summarize(night.ctx, t, extra)


NIGHTLY: tuple[RunStep, ...] = (
    RunStep("ingest", ("input files", "state"), "ingest", _ingest, per_chunk=True),
    RunStep("process", ("ingest",), "batches", process_part, per_batch=True, per_chunk=True),
    RunStep("index", ("batches",), "index", _index, per_chunk=True),
    RunStep("commit", ("ingest", "batches"), "quarantine", _commit, per_chunk=True),
    RunStep("export", ("committed cases",), "exports", _exports),
    RunStep("library", ("committed cases",), "library", _library),
    RunStep("summary", ("totals", "exports", "library"), "summary", _summary),
)
# The chunk steps come first: a run reads, processes, indexes and commits chunk by chunk, then
# derives its outputs from everything committed.
CHUNK_STEPS = tuple(s for s in NIGHTLY if s.per_chunk)
assert NIGHTLY[: len(CHUNK_STEPS)] == CHUNK_STEPS


def add_seconds(ctx: RunContext, name: str, seconds: float) -> None:
    ctx.seconds[name] = ctx.seconds.get(name, 0.0) + seconds


def run_declared(
    ctx: RunContext,
    call: Callable[[RunStep, Night], Any],
    each_batch: Callable[[RunStep, RunContext, list[Part]], Iterator[BatchResult]],
) -> dict[str, Any]:
    """`NIGHTLY` in order, the one loop both runners share: the chunk steps once per chunk of
    input (`plan_chunks`), then the run's steps. `call(step, night)` runs a step (a plain call, or
    a Prefect task), `each_batch(step, chunk_ctx, parts)` yields the batch step's results in part
    order. Timings, progress and crash checkpoints are kept here, not in the steps."""
    night = Night(ctx)
    for plan in plan_chunks(ctx):
        if plan.number and not plan.pieces:  # only unchanged files after the last chunk
            night.totals.files_skipped += plan.skipped
            continue
        night.start_chunk(plan)
        for step in CHUNK_STEPS:
            _run_step(night, step, call, each_batch)
        night.end_chunk()
        progress("files", plan.files_seen, plan.files_total)
    # The encoder is the chunk steps' (classify and index embed); the export and the library
    # read their vectors from the cache and load it again only for a text it lacks. Kept, it
    # sat under the export, the one step that grows with the history (`release_shared_models`).
    release_shared_models()
    release_unused_memory()
    for step in NIGHTLY[len(CHUNK_STEPS) :]:
        _run_step(night, step, call, each_batch)
    return night.summary


def _run_step(
    night: Night,
    step: RunStep,
    call: Callable[[RunStep, Night], Any],
    each_batch: Callable[[RunStep, RunContext, list[Part]], Iterator[BatchResult]],
) -> None:
    ctx = night.ctx
    chunk = night.chunk.run_id if night.chunk is not None else None
    step_started(step.name, chunk)
    t = time.perf_counter()
    if step.per_batch:
        assert night.ingest is not None
        parts = parts_of(night.ingest, ctx.cfg.flow.batch_size)
        done = 0
        for part, res in zip(parts, each_batch(step, _chunk(night), parts)):
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
    # What the step freed goes back to the OS, glibc's heap and Arrow's pool alike: kept, RSS crept
    # up chunk by chunk (Arrow's pool alone held 12-56 MiB at a 60k run's commits).
    release_unused_memory()
    step_ended(step.name, chunk)
    checkpoint(step.name)


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
                    lambda step, chunk, parts: (step.run(chunk, comp, part, n) for n, part in enumerate(parts)),
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
