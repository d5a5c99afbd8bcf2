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

# The stored case table. Columns added by later steps (classification, emotion) are appended
# by those steps; readers must tolerate their absence in partitions written before them.
CASE_SCHEMA = pa.schema(
    [
        ("case_id", pa.string()),
        ("conversation_id", pa.string()),
        ("segment", pa.int32()),  # 0 for the first issue in a conversation, 1.. for later ones
        ("channel", pa.string()),
        ("source_file", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("date", pa.string()),  # YYYY-MM-DD partition key (local date of started_at, else ingest date)
        ("date_source", pa.string()),  # "started_at" | "ingested"
        ("problem", pa.string()),
        ("handling", pa.string()),
        ("outcome", pa.string()),  # resolved | unresolved | escalated | unknown
        ("outcome_evidence", pa.string()),
        ("customer_text", pa.string()),
        ("agent_text", pa.string()),
        # Set by the emotion step (pipeline.analysis.emotion), null before it runs:
        ("emotion", pa.string()),  # configs/emotion.yaml labels: 愤怒 不满 失望 焦虑 满意 平静
        ("emotion_score", pa.float64()),  # the customer's lowest turn sentiment, -1 .. 1
        ("emotion_cues", pa.list_(pa.string())),  # cues of the customer's negative turns
        ("escalation_threats", pa.list_(pa.string())),  # 投诉, 12315, 曝光 ...
        ("first_response_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("n_turns", pa.int32()),
        ("n_customer_turns", pa.int32()),
        ("n_agent_turns", pa.int32()),
        ("timings_missing", pa.list_(pa.string())),
        ("tokens", pa.list_(pa.string())),  # jieba tokens of `problem`, stop words out
        ("keywords", pa.list_(pa.string())),
        ("region", pa.string()),
        ("product", pa.string()),
        ("order_id", pa.string()),
        ("agent_id", pa.string()),
        ("csat", pa.float64()),
        ("repeat_contact", pa.bool_()),
        ("metadata_json", pa.string()),
        ("turns", pa.list_(TURN_TYPE)),
        ("pii_masked", pa.int32()),
        ("content_hash", pa.string()),
        ("run_id", pa.string()),
    ]
)

CASE_COLUMNS: tuple[str, ...] = tuple(CASE_SCHEMA.names)
OUTCOMES: tuple[str, ...] = ("resolved", "unresolved", "escalated", "unknown")
