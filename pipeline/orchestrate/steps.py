"""The per-batch steps of a run, declared once, in order: what each reads and what it adds.

Every way of turning conversations into cases takes its order from `BATCH_STEPS`: the nightly
runners (`pipeline.orchestrate.nightly` as a plain loop, `pipeline.orchestrate.prefect_flow` as
Prefect tasks), `casemine classify` and `casemine emotion` on transcripts, and training from
labelled conversations (`through` gives a prefix of the list). Steps are pure: no I/O, no
timing, no progress; the runner times each one (`run_batch`) and does the rest.

A step never lets one conversation cost the batch: whatever raises on a conversation sets that
conversation aside as `bad_value` (with the step's name) and the batch goes on without it.
Masking comes before anything that keeps text, so nothing unmasked reaches cases, tokens,
emotion, classification or storage.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.cases.extract import CaseExtractor
from pipeline.config import Config
from pipeline.orchestrate.batch import (
    BatchResult,
    Failure,
    case_table,
    empty_record,
    failure_record,
    guard_case_step,
    guarded,
    mask_conversation,
    normalize_conversation,
    segment_records,
)
from pipeline.schema import (
    CASE_EMOTION_COLUMNS,
    CASE_SCHEMA,
    CLASSIFY_COLUMNS,
    EMOTION_COLUMNS,
    Conversation,
    QuarantineRecord,
)
from pipeline.text.mask import Masker
from pipeline.text.normalize import Normalizer
from pipeline.text.segment import Segmenter

if TYPE_CHECKING:
    from pipeline.analysis.emotion import EmotionAnalyzer


@dataclass
class Components:
    """What the steps use, built once per process from the config: models and lexicons load once,
    not once per batch. Steps take these, never the whole config."""

    normalizer: Normalizer
    masker: Masker
    extractor: CaseExtractor
    segmenter: Segmenter
    emotion: Callable[[pd.DataFrame], pd.DataFrame]
    classify: Callable[[pd.DataFrame], pd.DataFrame]
    owns_segmenter: bool = False

    @classmethod
    def from_config(
        cls, cfg: Config, segmenter: Segmenter | None = None, analyzer: EmotionAnalyzer | None = None
    ) -> Components:
        from pipeline.analysis.classify import CaseClassifiers
        from pipeline.analysis.emotion import EmotionAnalyzer, add_emotion
        from pipeline.text.prepare import get_masker, get_normalizer

        built: list[EmotionAnalyzer] = [analyzer] if analyzer else []  # on first use: slices before it skip it

        classifiers: list[CaseClassifiers] = []

        def classify(cases: pd.DataFrame) -> pd.DataFrame:
            if not classifiers:
                classifiers.append(CaseClassifiers.from_config(cfg))
            return classifiers[0].transform(cases)

        def emotion(cases: pd.DataFrame) -> pd.DataFrame:
            if not built:
                built.append(EmotionAnalyzer.from_config(cfg))
            return add_emotion(cases, cfg, built[0])

        return cls(
            get_normalizer(cfg),
            get_masker(cfg),
            CaseExtractor.from_config(cfg),
            segmenter or Segmenter(cfg),
            emotion,
            classify,
            owns_segmenter=segmenter is None,
        )

    def close(self) -> None:
        if self.owns_segmenter:
            self.segmenter.close()

    def __enter__(self) -> Components:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Item:
    """One conversation on its way through the steps: as received (for quarantine records and
    dedup), as the steps have made it so far, and its case records once cut."""

    received: Conversation
    conv: Conversation
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Batch:
    items: list[Item]
    run_id: str = ""
    ingest_date: date | None = None
    prior_orders: frozenset[str] = frozenset()  # order ids earlier runs saw: repeat contacts
    cases: pd.DataFrame | None = None  # the case table, from the `table` step on
    failures: list[Failure] = field(default_factory=list)
    empty: list[Conversation] = field(default_factory=list)
    rejected: list[QuarantineRecord] = field(default_factory=list)  # from steps over the case table


@dataclass(frozen=True)
class Step:
    name: str
    reads: tuple[str, ...]
    adds: tuple[str, ...]
    run: Callable[[Batch, Components], None]
    doc: str
    # The case-table columns the step adds, named as in pipeline.schema.CASE_SCHEMA: the steps'
    # columns together are the schema's, each declared once (checked below, at import).
    columns: tuple[str, ...] = ()


# What each step adds to the case table (see Step.columns). Literal names rather than imports of
# the steps' own constants: importing the analysers here would load them for every slice.
CASE_COLUMNS_OF_CASES: tuple[str, ...] = (
    "case_id",
    "conversation_id",
    "segment",
    "channel",
    "source_file",
    "started_at",
    "date",
    "date_source",
    "problem",
    "handling",
    "outcome",
    "outcome_evidence",
    "customer_text",
    "agent_text",
    "first_response_s",
    "duration_s",
    "n_turns",
    "n_customer_turns",
    "n_agent_turns",
    "timings_missing",
    "region",
    "product",
    "order_id",
    "agent_id",
    "csat",
    "repeat_contact",
    "metadata_json",
    "turns",
    "pii_masked",
    "content_hash",
    "run_id",
)
EMOTION_STEP_COLUMNS: tuple[str, ...] = (*CASE_EMOTION_COLUMNS, *EMOTION_COLUMNS)
CLASSIFY_STEP_COLUMNS: tuple[str, ...] = CLASSIFY_COLUMNS


def _per_conversation(step: str, fn: Callable[[Item, Components, Batch], Any]) -> Callable[[Batch, Components], None]:
    """A step over each conversation, isolated: one that raises is noted as a failure of `step`."""

    def run(batch: Batch, comp: Components) -> None:
        kept = []
        for it in batch.items:
            if guarded(batch.failures, it.received, step, fn, it, comp, batch) is not None:
                kept.append(it)
        batch.items = kept

    return run


def _normalize(it: Item, comp: Components, batch: Batch) -> bool:
    it.conv = normalize_conversation(it.conv, comp.normalizer)
    return True


def _drop_empty(batch: Batch, comp: Components) -> None:
    batch.empty += [it.received for it in batch.items if not it.conv.turns]
    batch.items = [it for it in batch.items if it.conv.turns]


def _normalize_step(batch: Batch, comp: Components) -> None:
    _per_conversation("normalize", _normalize)(batch, comp)
    _drop_empty(batch, comp)


def _mask(it: Item, comp: Components, batch: Batch) -> bool:
    it.conv = mask_conversation(it.conv, comp.masker)
    return True


def _cases(it: Item, comp: Components, batch: Batch) -> bool:
    it.records = comp.extractor.extract(it.conv, batch.run_id, batch.ingest_date, batch.prior_orders)
    return True


def _segment(batch: Batch, comp: Components) -> None:
    comp.segmenter.warm()
    batch.items = segment_records(batch.items, comp.segmenter, batch.failures)


def _table(batch: Batch, comp: Components) -> None:
    batch.items, batch.cases = case_table(batch.items, batch.failures)


def _on_cases(step: str, attr: str) -> Callable[[Batch, Components], None]:
    def run(batch: Batch, comp: Components) -> None:
        assert batch.cases is not None, f"{step} runs on the case table: put it after `table`"
        batch.cases, bad = guard_case_step(batch.cases, getattr(comp, attr), step)
        batch.rejected += bad

    return run


BATCH_STEPS: tuple[Step, ...] = (
    Step(
        "normalize",
        ("turns",),
        ("turns.text", "turns.original"),
        _normalize_step,
        "encodings already decoded; Traditional to Simplified, full-width to half-width, ASR fixes",
    ),
    Step(
        "mask",
        ("turns", "metadata", "conversation_id"),
        ("pii_counts",),
        _per_conversation("mask", _mask),
        "personal data replaced by placeholders, in every text the conversation carries",
    ),
    Step(
        "cases",
        ("turns", "metadata"),
        ("case records",),
        _per_conversation("cases", _cases),
        "one case per separate issue: problem, handling, outcome, timings",
        CASE_COLUMNS_OF_CASES,
    ),
    Step(
        "segment",
        ("problem", "customer_text"),
        ("tokens", "keywords"),
        _segment,
        "jieba tokens and keywords",
        ("tokens", "keywords"),
    ),
    Step("table", ("case records",), ("case table",), _table, "the records as the Parquet writer will accept them"),
    Step(
        "emotion",
        ("turns", "channel"),
        ("emotion columns",),
        _on_cases("emotion", "emotion"),
        "per-turn emotion and the conversation's curve",
        EMOTION_STEP_COLUMNS,
    ),
    Step(
        "classify",
        ("problem", "customer_text", "emotion columns"),
        ("issue_type", "request_kind", "urgency"),
        _on_cases("classify", "classify"),
        "issue type, request kind, urgency: trained models, else rules",
        CLASSIFY_STEP_COLUMNS,
    ),
)
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in BATCH_STEPS)


def check_declared_columns(steps: Sequence[Step] = BATCH_STEPS) -> None:
    """Raise unless the steps' declared columns are the case schema's, each declared once: a
    column added to one and not the other is caught on import, not by a reader months later."""
    declared = [c for s in steps for c in s.columns]
    twice = sorted({c for c in declared if declared.count(c) > 1})
    undeclared = [c for c in CASE_SCHEMA.names if c not in declared]
    unknown = [c for c in declared if c not in CASE_SCHEMA.names]
    if twice or undeclared or unknown:
        raise RuntimeError(
            "BATCH_STEPS' columns do not match pipeline.schema.CASE_SCHEMA: "
            f"declared twice {twice}, declared by no step {undeclared}, not in the schema {unknown}"
        )


check_declared_columns()


def through(last: str) -> tuple[Step, ...]:
    """The steps up to and including `last`, in order."""
    if last not in STEP_NAMES:
        raise ValueError(f"no step {last!r}; steps are {', '.join(STEP_NAMES)}")
    return BATCH_STEPS[: STEP_NAMES.index(last) + 1]


def run_batch(
    convs: Sequence[Conversation],
    comp: Components,
    steps: Sequence[Step] = BATCH_STEPS,
    *,
    run_id: str = "",
    ingest_date: date | None = None,
    prior_orders: frozenset[str] = frozenset(),
) -> BatchResult:
    """Conversations (as parsed) through `steps`: the case table, what was set aside and why, and
    each step's seconds."""
    batch = Batch([Item(c, c) for c in convs], run_id, ingest_date, prior_orders)
    seconds: dict[str, float] = {}
    for step in steps:
        t = time.perf_counter()
        step.run(batch, comp)
        seconds[step.name] = time.perf_counter() - t
    if batch.cases is None:  # a slice that stops before `table`
        _table(batch, comp)
    assert batch.cases is not None  # set by the table step or by _table just above
    pii: Counter = Counter()
    for it in batch.items:
        pii.update(it.conv.pii_counts)
    records = [r for it in batch.items for r in it.records]
    rejected = (
        [empty_record(c) for c in batch.empty]
        + [failure_record(f, comp.masker) for f in batch.failures]
        + batch.rejected
    )
    chars = sum(len(r["problem"]) + len(r["customer_text"]) for r in records)
    return BatchResult(batch.cases, rejected, pii, seconds, chars)


def process_conversations(
    convs: Sequence[Conversation],
    cfg: Config,
    last: str = "classify",
    *,
    segmenter: Segmenter | None = None,
    **batch: Any,
) -> BatchResult:
    """Conversations through the declared steps up to `last`, for one-off callers holding a
    config (`casemine classify` and `emotion` on transcripts, training, evaluation): the same
    order and the same isolation as a nightly run."""
    with Components.from_config(cfg, segmenter) as comp:
        return run_batch(convs, comp, through(last), **batch)


def process_batch(
    convs: Sequence[Conversation],
    cfg: Config,
    run_id: str = "",
    ingest_date: date | None = None,
    prior_orders: frozenset[str] = frozenset(),
    segmenter: Segmenter | None = None,
) -> BatchResult:
    """Conversations (as parsed) -> their case table: the declared steps up to `table`
    (normalise, mask, cases, segment)."""
    return process_conversations(
        convs, cfg, "table", segmenter=segmenter, run_id=run_id, ingest_date=ingest_date, prior_orders=prior_orders
    )
