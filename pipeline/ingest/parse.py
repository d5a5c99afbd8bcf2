"""Turn decoded records (chat JSON objects, ASR sentence lists, CSV rows) into Conversations.

Every check raises `RecordError(reason, detail)`: `reason` is a stable key for counting, `detail`
says what is wrong and what to do. Parsing does not normalise or mask; it keeps the text exactly
as received so the content hash identifies a re-delivery whatever the file's encoding was.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pipeline.config import IngestConfig
from pipeline.schema import SPEAKERS, Conversation, Turn

BUILTIN_SPEAKERS = {
    "customer": "customer",
    "agent": "agent",
    "system": "system",
    "bot": "bot",
    "client": "customer",
    "cs": "agent",
    "robot": "bot",
}
AGENT_CUES = (
    "您好",
    "请问",
    "为您",
    "帮您",
    "给您",
    "稍等",
    "工号",
    "很高兴",
    "感谢您",
    "抱歉",
    "您的",
    "客服",
    "请您",
    "亲",
    "核实",
    "处理",
)
CUSTOMER_CUES = ("我的", "我想", "我要", "我买", "你们", "怎么还", "为什么", "能不能")


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str, record: Any = None):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
        self.record = record  # what could still be parsed, for the quarantine's conversation id


def unexpected(err: BaseException, where: str) -> RecordError:
    """A `bad_value` for an exception no check anticipated. Only the exception's kind is named:
    its message may quote the record, and the detail is written unmasked in places."""
    return RecordError(
        "bad_value",
        f"{where or 'the record'}: unexpected {type(err).__name__} while reading it; check that field's value and type",
    )


# Timestamps outside these years are typos, unit mix-ups or sentinels (-1e18); they would also
# overflow the platform's time_t and the local-date arithmetic downstream.
MIN_YEAR, MAX_YEAR = 1970, 2100
_MAX_EPOCH_S = datetime(MAX_YEAR, 1, 1, tzinfo=UTC).timestamp()
_MS_ABOVE = 1e11  # epoch values above this are milliseconds (1e11 s is the year 5138)
# Call offsets beyond ten days are not a call; values this large come from unit mix-ups.
MAX_OFFSET_MS = 10 * 86_400_000
# Integers beyond 64 bits cannot be stored (SQLite, Arrow) and are never a real metadata value.
_MAX_INT = 2**63 - 1


def parse_time(value: Any, field: str) -> datetime | None:
    """ISO 8601 string (with zone; 'Z' allowed) or epoch seconds/ms -> aware datetime, between
    1970 and 2100."""
    if isinstance(value, str):  # first: nearly every value is one, and this runs once per turn
        if not value:
            return None
        try:
            parsed = datetime.fromisoformat(value.strip() if "T" in value else value.strip().replace(" ", "T", 1))
        except ValueError:
            raise RecordError(
                "bad_timestamp", f"{field} {value[:40]!r} is not ISO 8601 (e.g. 2025-09-01T10:02:03+08:00)"
            ) from None
        if MIN_YEAR <= parsed.year < MAX_YEAR:
            return parsed
        raise RecordError("bad_timestamp", f"{field} is in the year {parsed.year}, outside {MIN_YEAR}-{MAX_YEAR}")
    if value is None:
        return None
    if isinstance(value, bool):
        raise RecordError("bad_timestamp", f"{field} is {value!r}, expected ISO 8601 like 2025-09-01T10:02:03+08:00")
    if isinstance(value, (int, float)):
        return _epoch(value, field)
    raise RecordError("bad_timestamp", f"{field} {str(value)[:40]!r} is not ISO 8601 (e.g. 2025-09-01T10:02:03+08:00)")


def _epoch(value: int | float, field: str) -> datetime:
    # Range checks come before any arithmetic: a 23-digit int divided by 1000 overflows a float.
    if not math.isfinite(value):
        raise RecordError("bad_timestamp", f"{field} is {value!r}")
    secs = value / 1000 if _MS_ABOVE < value <= _MAX_EPOCH_S * 1000 else value
    if not 0 <= secs < _MAX_EPOCH_S:
        shown = (
            str(value) if isinstance(value, float) or value.bit_length() < 128 else f"a {len(str(value))}-digit number"
        )
        raise RecordError(
            "bad_timestamp",
            f"{field} is {shown[:40]}, outside {MIN_YEAR}-{MAX_YEAR} as epoch "
            "seconds or milliseconds; send ISO 8601 with a zone",
        )
    return datetime.fromtimestamp(secs, tz=UTC)


def check_numbers(obj: dict[str, Any] | list[Any], field: str) -> None:
    """Integers a 64-bit store cannot hold are a bad value, named by their path (metadata.csat)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        kind = type(value)
        if kind is int:
            if not -_MAX_INT - 1 <= value <= _MAX_INT:
                raise RecordError(
                    "bad_value",
                    f"{_path(field, key)} is a {len(str(abs(value)))}-digit integer, "
                    "beyond 64 bits; send it as a string if it is an identifier",
                )
        elif kind is dict or kind is list:
            check_numbers(value, _path(field, key))


def _path(field: str, key: Any) -> str:
    return f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}"


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_escaped_surrogate(text: str) -> bool:
    """Whether JSON text may decode to a lone surrogate (a `\\ud83d` cut from its pair): a cheap
    test so only those records pay for `scrub_surrogates`."""
    return "\\ud" in text or "\\uD" in text


def scrub_surrogates(obj: Any) -> Any:
    """Lone surrogates replaced by U+FFFD, in keys and values: they cannot be encoded, so Parquet,
    SQLite and the quarantine file would all raise on them. (Pairs were already joined by the
    JSON parser, so a surrogate left here is always a lone half.)"""
    if isinstance(obj, str):
        return _SURROGATE.sub("\ufffd", obj) if _SURROGATE.search(obj) else obj
    if isinstance(obj, dict):
        return {scrub_surrogates(k): scrub_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_surrogates(v) for v in obj]
    return obj


def content_hash(conv: Conversation) -> str:
    """Hash of what was said, by whom and when: the same conversation re-delivered in another file
    or encoding hashes the same; any change of content does not."""
    body = {
        "channel": conv.channel,
        "started_at": conv.started_at,
        "turns": [[t.speaker, t.text, t.t] for t in conv.turns],
        "metadata": conv.metadata,
    }
    return hashlib.sha256(json.dumps(body, ensure_ascii=False, sort_keys=True, default=str).encode()).hexdigest()


class Parser:
    """Validates and builds Conversations according to the ingest config."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.aliases = {**BUILTIN_SPEAKERS, **{k.lower(): v for k, v in cfg.speaker_aliases.items()}}

    def speaker(self, raw: Any) -> str:
        name = str(raw).strip().lower() if raw is not None else ""
        if name in self.aliases:
            return self.aliases[name]
        raise RecordError(
            "unknown_speaker",
            f"speaker {str(raw)[:30]!r} is not one of {', '.join(SPEAKERS)}; "
            "map it under ingest.speaker_aliases in configs/casemine.yaml",
        )

    def _check_sizes(self, conv: Conversation) -> None:
        if len(conv.turns) > self.cfg.max_turns:
            raise RecordError(
                "oversized_record", f"{len(conv.turns)} turns exceed ingest.max_turns={self.cfg.max_turns}"
            )
        for i, t in enumerate(conv.turns):
            if len(t.text) > self.cfg.max_message_chars:
                raise RecordError(
                    "oversized_message",
                    f"turn {i} has {len(t.text)} characters, over "
                    f"ingest.max_message_chars={self.cfg.max_message_chars}; split or truncate it upstream",
                )

    def _finish(self, conv: Conversation) -> Conversation:
        if not conv.turns:
            raise RecordError("empty_text", "every turn's text is empty")
        self._check_sizes(conv)
        conv.content_hash = content_hash(conv)
        return conv

    # -- chat ---------------------------------------------------------------------------------
    def chat(self, obj: Any) -> Conversation:
        if not isinstance(obj, dict):
            raise RecordError("not_an_object", f"expected a JSON object per conversation, got {type(obj).__name__}")
        # The field being read (an int: that turn), to name it if something unforeseen raises; a
        # local, not an attribute, since it is set once per turn on the hot path.
        at: str | int = "conversation_id"
        try:
            cid = obj.get("conversation_id")
            if cid is None or (isinstance(cid, str) and not cid.strip()) or isinstance(cid, (dict, list, bool)):
                raise RecordError(
                    "missing_id", "conversation_id is missing or empty; every conversation needs a stable id"
                )
            turns_raw = obj.get("turns")
            if not isinstance(turns_raw, list) or not turns_raw:
                raise RecordError("no_turns", "`turns` is missing, empty or not a list")
            at = "started_at"
            started = parse_time(obj.get("started_at"), "started_at")
            at = "metadata"
            metadata = obj.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise RecordError("bad_metadata", f"`metadata` must be an object, got {type(metadata).__name__}")
            check_numbers(metadata, "metadata")
            turns: list[Turn] = []
            stamps: list[datetime | None] = []
            for i, t in enumerate(turns_raw):
                at = i
                if not isinstance(t, dict):
                    raise RecordError(
                        "bad_turn", f"turn {i} is {type(t).__name__}, expected an object with speaker and text"
                    )
                speaker = self.speaker(t.get("speaker"))
                text = t.get("text")
                if text is None:
                    text = ""
                if not isinstance(text, str):
                    raise RecordError("bad_turn", f"turn {i} text is {type(text).__name__}, expected a string")
                if not text.strip():
                    continue
                turns.append(Turn(speaker=speaker, text=text))
                stamps.append(parse_time(t.get("ts"), f"turns[{i}].ts"))
            at = "turns"
            origin = started or next((s for s in stamps if s is not None), None)
            for turn, ts in zip(turns, stamps):
                if ts is not None and origin is not None:
                    turn.t = _seconds_between(origin, ts)
            at = "channel"
            conv = Conversation(
                conversation_id=str(cid).strip(),
                channel=str(obj.get("channel") or "chat").strip().lower(),
                turns=turns,
                started_at=started.isoformat() if started else None,
                metadata=metadata,
            )
            return self._finish(conv)
        except RecordError:
            raise
        except Exception as e:  # noqa: BLE001 - one unforeseen value costs its record only
            raise unexpected(e, f"turns[{at}]" if isinstance(at, int) else at) from None

    # -- ASR ----------------------------------------------------------------------------------
    def asr(
        self,
        sentences: list[dict[str, Any]],
        conversation_id: str,
        started_at: Any = None,
        metadata: dict[str, Any] | None = None,
        agent_channel: Any = None,
        channel: str = "call",
    ) -> Conversation:
        """Sentences with ChannelId/BeginTime/EndTime/Text (any key case) -> a call Conversation."""
        if not sentences:
            raise RecordError("no_turns", "the ASR result has no sentences")
        at: str | int = "sentences"  # as in `chat`
        try:
            rows = []
            for i, s in enumerate(sentences):
                at = i
                rows.append(self._sentence(s, i))
            at = "sentences"
            rows.sort(key=lambda r: (r[0], r[1]))  # by time; input order breaks ties
            agent = self._agent_channel(rows, agent_channel)
            at = "started_at"
            started = parse_time(started_at, "started_at")
            at = "sentences"
            turns = []
            for _, _, ch, speaker, text, begin, end in rows:
                if not text.strip():
                    continue
                who = (
                    self.speaker(speaker) if speaker is not None else ("agent" if str(ch) == str(agent) else "customer")
                )
                turns.append(
                    Turn(who, text, None if begin is None else begin / 1000, None if end is None else end / 1000)
                )
            at = "metadata"
            meta = dict(metadata or {})
            check_numbers(meta, "metadata")
            if agent is not None:
                meta.setdefault("agent_channel", agent)
            conv = Conversation(
                conversation_id=str(conversation_id),
                channel=channel or "call",
                turns=turns,
                started_at=started.isoformat() if started else None,
                metadata=meta,
            )
            return self._finish(conv)
        except RecordError:
            raise
        except Exception as e:  # noqa: BLE001 - one unforeseen value costs its record only
            raise unexpected(e, f"Sentences[{at}]" if isinstance(at, int) else at) from None

    @staticmethod
    def _sentence(s: Any, i: int) -> tuple:
        """(sort time, index, channel, speaker, text, begin ms, end ms) of one ASR sentence."""
        if not isinstance(s, dict):
            raise RecordError("bad_turn", f"sentence {i} is {type(s).__name__}, expected an object")
        k = {str(key).lower(): v for key, v in s.items()}
        text = k.get("text")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise RecordError("bad_turn", f"sentence {i} Text is {type(text).__name__}, expected a string")
        ch = k.get("channelid", k.get("channel_id", k.get("speakerid", k.get("speaker_id"))))
        speaker = k.get("speaker")
        begin = _ms(k.get("begintime", k.get("begin_ms", k.get("begin_time"))), i, "BeginTime")
        end = _ms(k.get("endtime", k.get("end_ms", k.get("end_time"))), i, "EndTime")
        if ch is None and speaker is None:
            raise RecordError("bad_turn", f"sentence {i} has neither ChannelId nor speaker")
        return (begin if begin is not None else math.inf, i, ch, speaker, text, begin, end)

    def _agent_channel(self, rows: list[tuple], explicit: Any) -> Any:
        channels = [r[2] for r in rows if r[2] is not None]
        if not channels:
            return None
        if explicit is not None and explicit != "":
            return explicit
        if self.cfg.agent_channel != "infer":
            return self.cfg.agent_channel
        return infer_agent_channel([(r[2], r[4]) for r in rows if r[2] is not None])


def infer_agent_channel(rows: Iterable[tuple[Any, str]]) -> Any:
    """The channel that talks like an agent (greets, 您/请问/稍等, gives a 工号); ties go to the
    side that spoke first, since agents open calls."""
    rows = list(rows)
    scores: dict[str, float] = {}
    first = str(rows[0][0])
    for ch, text in rows:
        s = sum(text.count(c) for c in AGENT_CUES) - sum(text.count(c) for c in CUSTOMER_CUES)
        scores[str(ch)] = scores.get(str(ch), 0.0) + s
    best = max(scores.items(), key=lambda kv: (kv[1], kv[0] == first))[0]
    original = next(ch for ch, _ in rows if str(ch) == best)
    return original


def _ms(value: Any, i: int, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RecordError(
            "bad_turn", f"sentence {i} time {str(value)[:20]!r} is not a number of milliseconds"
        ) from None
    except OverflowError:  # an int too large for a float
        v = math.inf
    if not math.isfinite(v) or v < 0:
        raise RecordError(
            "bad_turn", f"sentence {i} time {str(value)[:20]!r} is not a non-negative number of milliseconds"
        )
    if v > MAX_OFFSET_MS:
        raise RecordError(
            "bad_timestamp",
            f"Sentences[{i}].{name} is {v:.0f} ms, over {MAX_OFFSET_MS} (ten days) "
            "from the start of the call; check the time unit",
        )
    return v


def _seconds_between(a: datetime, b: datetime) -> float | None:
    if (a.tzinfo is None) != (b.tzinfo is None):
        a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
    return (b - a).total_seconds()


class _LongInt(str):
    """An integer literal kept as text because Python refuses to convert it."""


def locate_long_int(text: str) -> tuple[str, int, Any] | None:
    """Where the JSON text holds an integer too long to convert (json.loads raises a bare
    ValueError for it, naming no field): its path, e.g. `turns[0].ts`, its digit count, and the
    record parsed with such numbers left as text."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or math.inf

    def keep_long(literal: str) -> int | _LongInt:
        return _LongInt(literal) if len(literal.lstrip("-")) > limit else int(literal)

    try:
        obj = json.loads(text, parse_int=keep_long)
    except (ValueError, RecursionError):
        return None
    found = find_long_int(obj)
    return (found[0], found[1], obj) if found else None


def find_long_int(obj: Any) -> tuple[str, int] | None:
    """The path and digit count of the first integer `locate_long_int` left as text."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _LongInt):
            return path or "the record", len(value.lstrip("-"))
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None
