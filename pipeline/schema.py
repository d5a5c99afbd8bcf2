"""Record shapes shared by every step: conversations in, case records out.

Why plain dataclasses for conversations and an Arrow schema for cases: ingest builds a few
thousand small objects per batch (dataclasses are cheap and typed), while the case table is what
gets stored, queried and joined, so its columns are fixed here once and every writer conforms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

Speaker = Literal["customer", "agent", "system", "bot"]
SPEAKERS: tuple[str, ...] = ("customer", "agent", "system", "bot")


@dataclass
class Turn:
    speaker: str
    text: str
    # Seconds since the conversation started (ASR offsets, or chat timestamps minus the first);
    # None when the source has no time for this turn.
    t: float | None = None
    t_end: float | None = None
    original: str | None = None  # the text as received (masked later, like `text`)


@dataclass
class Conversation:
    conversation_id: str
    channel: str
    turns: list[Turn]
    started_at: str | None = None  # ISO 8601 with zone, as received (validated)
    metadata: dict[str, Any] = field(default_factory=dict)
    source_file: str = ""
    source_line: int | None = None  # 1-based line (JSONL/CSV) of the record's first line
    source_format: str = ""  # chat_jsonl | chat_json | asr_json | asr_csv | chat_csv
    encoding: str = "utf-8"
    content_hash: str = ""
    # Filled by later steps (kept on the object so batches flow through one shape).
    pii_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class QuarantineRecord:
    source_file: str
    reason: str  # short machine key, e.g. "malformed_json"
    detail: str  # what a person should do about it
    line: int | None = None
    byte_offset: int | None = None
    conversation_id: str | None = None
    excerpt: str = ""  # masked before it is written
    raw_hash: str = ""


TURN_TYPE = pa.struct(
    [
        ("speaker", pa.string()),
        ("text", pa.string()),
        ("original", pa.string()),
        ("t", pa.float64()),
    ]
)

_AGENT_TURN = pa.struct([("turn", pa.int32()), ("text", pa.string())])
_CURVE_POINT = [
    ("turn", pa.int32()),
    ("sentiment", pa.float64()),
    ("customer", pa.string()),
    ("agent_before", _AGENT_TURN),  # null when no agent spoke before the point
    ("agent_after", _AGENT_TURN),
]
# pipeline.analysis.emotion.curve.summarize_curve: the lowest point of the customer's curve and the
# biggest rise; both null when the customer never spoke, `biggest_rise` null when nothing rose.
TURNING_POINTS_TYPE = pa.struct(
    [
        ("lowest", pa.struct(_CURVE_POINT)),
        ("biggest_rise", pa.struct([*_CURVE_POINT, ("from_turn", pa.int32()), ("rise", pa.float64())])),
    ]
)
# pipeline.analysis.emotion.rules.TurnEmotion.as_dict, with the turn's index in `turns`.
TURN_EMOTION_TYPE = pa.struct(
    [
        ("turn", pa.int32()),
        ("sentiment", pa.float64()),
        ("emotion", pa.string()),
        ("intensity", pa.float64()),
        ("evidence", pa.list_(pa.string())),  # the cues as people read them: 投诉(-0.70), 质问(-0.30)
        ("source", pa.string()),  # rules | model | rules+model
    ]
)

# The stored case table, every column of it: which step adds which is declared in
# pipeline.orchestrate.steps (BATCH_STEPS), checked against these names. The store casts every part
# it writes to this schema and upgrades older parts to it when reading (pipeline.storage.store).
CASE_SCHEMA = pa.schema(
    [
        # -- the `cases` step (pipeline.cases.extract):
        ("case_id", pa.string()),
        ("conversation_id", pa.string()),
        ("segment", pa.int32()),  # 0 for the first issue in a conversation, 1.. for later ones
        ("channel", pa.string()),
        ("source_file", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        # YYYY-MM-DD (local date of started_at, else ingest date). The partition key: stored in the
        # folder name (date=YYYY-MM-DD) only, never inside a part.
        ("date", pa.string()),
        ("date_source", pa.string()),  # "started_at" | "ingested"
        ("problem", pa.string()),
        ("handling", pa.string()),
        ("outcome", pa.string()),  # resolved | unresolved | escalated | unknown
        ("outcome_evidence", pa.string()),
        ("customer_text", pa.string()),
        ("agent_text", pa.string()),
        # -- the `emotion` step (pipeline.analysis.emotion), null in the table until it runs:
        ("emotion", pa.string()),  # configs/emotion.yaml labels: 愤怒 不满 失望 焦虑 满意 平静
        ("emotion_score", pa.float64()),  # the customer's lowest turn sentiment, -1 .. 1
        ("emotion_cues", pa.list_(pa.string())),  # cues of the customer's negative turns
        ("escalation_threats", pa.list_(pa.string())),  # 投诉, 12315, 曝光 ...
        # -- the `cases` step again:
        ("first_response_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("n_turns", pa.int32()),
        ("n_customer_turns", pa.int32()),
        ("n_agent_turns", pa.int32()),
        ("timings_missing", pa.list_(pa.string())),
        # -- the `segment` step:
        ("tokens", pa.list_(pa.string())),  # jieba tokens of `problem`, stop words out
        ("keywords", pa.list_(pa.string())),
        # -- the `cases` step again:
        ("region", pa.string()),
        ("product", pa.string()),
        ("order_id", pa.string()),
        ("agent_id", pa.string()),
        ("csat", pa.float64()),
        ("repeat_contact", pa.bool_()),
        # A JSON string on purpose: the source's metadata, whose keys are whatever each delivery
        # carries (team, skill_group, vip ...); no fixed struct fits them.
        ("metadata_json", pa.string()),
        ("turns", pa.list_(TURN_TYPE)),
        ("pii_masked", pa.int32()),
        ("content_hash", pa.string()),
        ("run_id", pa.string()),
        # -- the `emotion` step: the curve over the customer's turns.
        ("emotion_curve", pa.list_(pa.float64())),  # sentiment of each customer turn, in order
        ("emotion_curve_turns", pa.list_(pa.int32())),  # their indexes in `turns`
        ("emotion_labels", pa.list_(pa.string())),
        ("emotion_start", pa.float64()),
        ("emotion_end", pa.float64()),
        ("emotion_min", pa.float64()),
        ("emotion_min_turn", pa.int32()),  # -1 when the customer never spoke
        ("emotion_delta", pa.float64()),
        ("emotion_trajectory", pa.string()),  # 改善 平稳 恶化
        ("turning_points", TURNING_POINTS_TYPE),
        ("emotion_turn_detail", pa.list_(TURN_EMOTION_TYPE)),
        # -- the `classify` step (pipeline.analysis.classify):
        ("issue_type", pa.string()),
        ("issue_type_confidence", pa.float64()),
        ("request_kind", pa.string()),
        ("urgency", pa.string()),
        ("urgency_confidence", pa.float64()),
        ("urgency_due_hours", pa.float64()),  # null: no deadline for this urgency level
        ("needs_review", pa.bool_()),
        # A JSON string on purpose: each task's evidence has its own keys and free-form ones inside
        # (taxonomy labels -> matched terms, request kinds -> cues, per-signal details of mixed
        # types such as amounts that are numbers or "masked"); `casemine classify --json` prints it.
        ("evidence", pa.string()),
        ("classifier", pa.string()),  # the model id, or "rules"
    ]
)

CASE_COLUMNS: tuple[str, ...] = tuple(CASE_SCHEMA.names)
# The case table as the `table` step makes it, before the steps over the table (emotion, classify)
# add theirs: the emotion step's first four columns are already there, null until it runs.
RECORD_COLUMNS: tuple[str, ...] = CASE_COLUMNS[: CASE_COLUMNS.index("run_id") + 1]
RECORD_SCHEMA = pa.schema([CASE_SCHEMA.field(c) for c in RECORD_COLUMNS])
PARTITION_KEY = "date"
# A stored part: the case table without its partition key, which lives in the folder name.
PART_SCHEMA = CASE_SCHEMA.remove(CASE_SCHEMA.get_field_index(PARTITION_KEY))
OUTCOMES: tuple[str, ...] = ("resolved", "unresolved", "escalated", "unknown")

# The columns the emotion step adds (pipeline.analysis.emotion): the conversation's emotion first
# (what urgency, clusters and reports read), then the curve. And the classify step's columns.
CASE_EMOTION_COLUMNS: tuple[str, ...] = ("emotion", "emotion_score", "emotion_cues", "escalation_threats")
EMOTION_COLUMNS: tuple[str, ...] = (
    "emotion_curve",
    "emotion_curve_turns",
    "emotion_labels",
    "emotion_start",
    "emotion_end",
    "emotion_min",
    "emotion_min_turn",
    "emotion_delta",
    "emotion_trajectory",
    "turning_points",
    "emotion_turn_detail",
)
CLASSIFY_COLUMNS: tuple[str, ...] = (
    "issue_type",
    "issue_type_confidence",
    "request_kind",
    "urgency",
    "urgency_confidence",
    "urgency_due_hours",
    "needs_review",
    "evidence",
    "classifier",
)
