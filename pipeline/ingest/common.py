"""What every reader shares: the per-file result and how a quarantine record is made."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from pipeline.ingest.parse import RecordError, scrub_surrogates, unexpected
from pipeline.schema import Conversation, QuarantineRecord

__all__ = ["EXCERPT_CHARS", "FileResult", "quarantine", "raw_hash", "unexpected"]

EXCERPT_CHARS = 120


@dataclass
class FileResult:
    path: str
    encoding: str
    conversations: list[Conversation] = field(default_factory=list)
    quarantined: list[QuarantineRecord] = field(default_factory=list)

    @property
    def n_read(self) -> int:
        return len(self.conversations) + len(self.quarantined)


def raw_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def quarantine(
    path: str,
    err: RecordError,
    raw: bytes,
    line: int | None = None,
    offset: int | None = None,
    cid: Any = None,
    excerpt: str = "",
) -> QuarantineRecord:
    # The excerpt is cut here and masked by the caller before it is written anywhere.
    return QuarantineRecord(
        source_file=path,
        reason=err.reason,
        detail=err.detail,
        line=line,
        byte_offset=offset,
        conversation_id=None if cid is None else scrub_surrogates(str(cid)[:100]),
        excerpt=scrub_surrogates(excerpt[:EXCERPT_CHARS]),
        raw_hash=raw_hash(raw),
    )
