"""CSV rows -> conversations, without letting one row's broken quoting swallow its neighbours.

Why not `csv.reader` over the whole file: an opening quote that is never closed makes it read
every following line, whole conversations included, as part of one text field, and nothing is
left to notice. Here each row is assembled from its lines first: a row spans lines only while a
quoted field is open, and the span is accepted only if it closes into exactly one row whose
continuation lines do not look like rows themselves. Otherwise the opening line is a broken row
(`malformed_csv`) and reading resumes on the very next line.

A conversation with any broken row is quarantined whole (naming that line): stored without one
of its turns it would look complete, and its fixed re-delivery would then conflict with it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from typing import Any

from pipeline.config import IngestConfig
from pipeline.ingest.common import FileResult, quarantine, unexpected
from pipeline.ingest.decode import Line
from pipeline.ingest.parse import Parser, RecordError
from pipeline.schema import Conversation

META_COLUMNS = ("region", "product", "order_id", "agent_id", "csat", "customer_id", "team")


@dataclass
class Row:
    lines: list[Line]  # one, or several when a quoted field holds line breaks
    fields: dict[str, str]


@dataclass
class Broken:
    line: Line
    error: RecordError
    cid: str | None  # the conversation it belonged to, when that can still be read


def read_csv_lines(lines: list[Line], parser: Parser, res: FileResult, cfg: IngestConfig) -> None:
    """CSV: one row per sentence (ASR: channel_id, begin_ms, end_ms) or per turn (chat: speaker),
    grouped into conversations by conversation_id in order of first appearance."""
    start = _header_index(lines, res)
    if start is None:
        return
    first = lines[start]
    header_text = (first.text or "").lstrip("\ufeff")
    header = header_names(header_text)
    if "conversation_id" not in header or "text" not in header:
        res.quarantined.append(
            quarantine(
                res.path,
                RecordError(
                    "bad_header", f"the CSV needs conversation_id and text columns (found: {', '.join(header)[:200]})"
                ),
                first.raw,
                first.number,
                first.offset,
            )
        )
        return
    # Files pasted together repeat their header (often behind their own BOM): not a record.
    rest = [ln for ln in lines[start + 1 :] if ln.text is None or ln.text.lstrip("\ufeff") != header_text]
    rows, broken = _rows(rest, header, cfg.max_record_bytes)
    _conversations(rows, broken, header, parser, res)


def _header_index(lines: list[Line], res: FileResult) -> int | None:
    """The first readable, non-blank line; undecodable lines before it are quarantined alone."""
    for i, line in enumerate(lines):
        if line.text is None:
            res.quarantined.append(
                quarantine(
                    res.path,
                    _undecodable(line),
                    line.raw,
                    line.number,
                    line.offset,
                    None,
                    line.raw.decode("utf-8", errors="replace"),
                )
            )
        elif line.text.strip():
            return i
    return None


def _undecodable(line: Line) -> RecordError:
    return RecordError("undecodable_bytes", f"{line.error}; re-export the file in UTF-8")


def _rows(lines: list[Line], header: list[str], max_bytes: int) -> tuple[list[Row], list[Broken]]:
    ncols = len(header)
    rows: list[Row] = []
    broken: list[Broken] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        text = line.text
        if text is None:
            broken.append(Broken(line, _undecodable(line), _cid_of_bytes(line.raw)))
            i += 1
            continue
        if not text.strip():
            i += 1
            continue
        end = i + 1
        if '"' in text and _ends_open(text, False):
            closing = _closing(lines, i, ncols, max_bytes)
            if closing is None:
                broken.append(
                    Broken(
                        line,
                        RecordError(
                            "malformed_csv",
                            f"line {line.number} opens a quoted field that is not closed before the next row; "
                            "fix the quote or re-export the file",
                        ),
                        _cid_of_text(text),
                    )
                )
                i += 1
                continue
            end = closing
        try:
            fields = (
                text.split(",")
                if end == i + 1 and '"' not in text
                else first_row([ln.text or "" for ln in lines[i:end]])
            )
        except csv.Error as e:
            err = RecordError("malformed_csv", f"line {line.number}: CSV parse error ({e})")
            broken.append(Broken(line, err, _cid_of_text(text)))
            i = end
            continue
        if any(f.strip() for f in fields[ncols:]):
            broken.append(
                Broken(
                    line,
                    RecordError(
                        "malformed_csv",
                        f"line {line.number} has {len(fields)} fields, the header {ncols}; quote text that "
                        "holds commas",
                    ),
                    fields[0].strip() or None,
                )
            )
        else:
            rows.append(Row(lines[i:end], dict(zip(header, fields))))
        i = end
    return rows, broken


def header_names(text: str) -> list[str]:
    """A header line's column names, as rows are matched to them (trimmed, lower case)."""
    return [h.strip().lower() for h in first_row([text])]


def first_row(texts: list[str]) -> list[str]:
    """The first row of these lines (a quoted field may join them)."""
    return next(csv.reader(t + "\n" for t in texts), [])


def _ends_open(text: str, open_at_start: bool) -> bool:
    """Whether a quoted field is open at the end of this line, as Python's csv reads quotes (a
    quote opens a field only at its start; "" inside is a quote; text after a closing quote is
    kept)."""
    in_quotes, at_field_start, after_quote = open_at_start, not open_at_start, False
    for c in text:
        if in_quotes:
            if c == '"':
                in_quotes, after_quote = False, True
            continue
        if after_quote and c == '"':  # "" inside a quoted field
            in_quotes, after_quote = True, False
            continue
        after_quote = False
        if c == ",":
            at_field_start = True
        elif at_field_start and c == '"':
            in_quotes, at_field_start = True, False
        else:
            at_field_start = False
    return in_quotes


def _closing(lines: list[Line], i: int, ncols: int, max_bytes: int) -> int | None:
    """The index after the line that closes the quoted field opened on line i, if that makes one
    well-formed row; None when the quote is never closed, or closing it would take in a line that
    is a row of its own (the neighbour an unterminated quote would otherwise swallow)."""
    size = len(lines[i].raw)
    for k in range(i + 1, len(lines)):
        line = lines[k]
        size += len(line.raw) + 1
        if line.text is None or size > max_bytes or is_row(line.text, ncols):
            return None
        if not _ends_open(line.text, True):
            try:
                fields = first_row([ln.text or "" for ln in lines[i : k + 1]])
            except csv.Error:
                return None
            return k + 1 if len(fields) == ncols else None
    return None


def is_row(text: str, ncols: int) -> bool:
    """A complete row by itself: exactly the header's number of fields, no open quote, and an id
    with no quote in it (`0",,,` is the end of a quoted id that holds a line break, not a row)."""
    if '"' in text:
        if _ends_open(text, False):
            return False
        try:
            fields = first_row([text])
        except csv.Error:
            return False
    else:
        fields = text.split(",")
    return len(fields) == ncols and bool(fields[0].strip()) and '"' not in fields[0]


def _cid_of_text(text: str) -> str | None:
    first = text.split(",", 1)[0].strip()
    return first if first and '"' not in first else None


def _cid_of_bytes(raw: bytes) -> str | None:
    head = raw.split(b",", 1)[0].strip()
    return head.decode("ascii") if head and head.isascii() and b'"' not in head else None


def _conversations(rows: list[Row], broken: list[Broken], header: list[str], parser: Parser, res: FileResult) -> None:
    groups: dict[str, list[Row]] = {}
    first_line: dict[str, int] = {}
    for row in rows:
        cid = (row.fields.get("conversation_id") or "").strip()
        line = row.lines[0]
        if not cid:
            text = ",".join(row.fields.values())
            res.quarantined.append(
                quarantine(
                    res.path,
                    RecordError("missing_id", "row has no conversation_id"),
                    b"\n".join(ln.raw for ln in row.lines),
                    line.number,
                    line.offset,
                    None,
                    text,
                )
            )
            continue
        groups.setdefault(cid, []).append(row)
        first_line.setdefault(cid, line.number)
    breaks: dict[str, Broken] = {}
    for b in broken:
        if b.cid is None:
            excerpt = b.line.text if b.line.text is not None else b.line.raw.decode("utf-8", errors="replace")
            res.quarantined.append(
                quarantine(res.path, b.error, b.line.raw, b.line.number, b.line.offset, None, excerpt)
            )
            continue
        breaks.setdefault(b.cid, b)
        first_line[b.cid] = min(first_line.get(b.cid, b.line.number), b.line.number)
    for cid in sorted(first_line, key=first_line.__getitem__):
        if cid in breaks:
            _quarantine_conversation(cid, breaks[cid], groups.get(cid, []), res)
        else:
            _one_conversation(cid, groups[cid], header, parser, res)


def _quarantine_conversation(cid: str, b: Broken, rows: list[Row], res: FileResult) -> None:
    held = f"; its other {len(rows)} row(s) are held back with it" if rows else ""
    err = RecordError(b.error.reason, b.error.detail + held)
    raw = b"\n".join([b.line.raw] + [ln.raw for row in rows for ln in row.lines])
    excerpt = b.line.text if b.line.text is not None else b.line.raw.decode("utf-8", errors="replace")
    res.quarantined.append(quarantine(res.path, err, raw, b.line.number, b.line.offset, cid, excerpt))


def _one_conversation(cid: str, rows: list[Row], header: list[str], parser: Parser, res: FileResult) -> None:
    first = rows[0]
    try:
        conv = _build(cid, [r.fields for r in rows], header, parser)
        conv.source_line, conv.encoding = first.lines[0].number, first.lines[0].encoding
        res.conversations.append(conv)
    except Exception as e:  # noqa: BLE001 - one conversation's surprise must not stop the file
        err = e if isinstance(e, RecordError) else unexpected(e, "the record")
        raw = json.dumps([r.fields for r in rows], ensure_ascii=False).encode()
        res.quarantined.append(
            quarantine(res.path, err, raw, first.lines[0].number, None, cid, first.fields.get("text", ""))
        )


def _build(cid: str, recs: list[dict[str, str]], header: list[str], parser: Parser) -> Conversation:
    first = recs[0]
    meta: dict[str, Any] = {k: first[k] for k in META_COLUMNS if first.get(k) not in (None, "")}
    if "speaker" in header and "channel_id" not in header:
        conv = parser.chat(
            {
                "conversation_id": cid,
                "channel": first.get("channel") or "chat",
                "started_at": first.get("started_at") or None,
                "metadata": meta,
                "turns": [
                    {"speaker": r.get("speaker"), "text": r.get("text"), "ts": r.get("ts") or None} for r in recs
                ],
            }
        )
        conv.source_format = "chat_csv"
        return conv
    sentences = [
        {
            "ChannelId": r.get("channel_id"),
            "BeginTime": r.get("begin_ms", r.get("begin_time")),
            "EndTime": r.get("end_ms", r.get("end_time")),
            "Text": r.get("text"),
            **({"speaker": r["speaker"]} if r.get("speaker") else {}),
        }
        for r in recs
    ]
    conv = parser.asr(
        sentences,
        cid,
        first.get("started_at") or None,
        meta,
        first.get("agent_channel") or None,
        first.get("channel") or "call",
    )
    conv.source_format = "asr_csv"
    return conv
