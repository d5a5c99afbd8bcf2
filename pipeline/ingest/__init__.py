"""Read transcript files: discover, decode, parse, and quarantine what cannot be read.

`read_file` is the one entry point per file. It never raises on bad data: every record it reads
comes back either as a Conversation or as a QuarantineRecord naming the file, line or byte offset
and a reason a person can act on. Counting (`FileResult.n_read`) is per record: a JSONL line, an
element of a JSON array, an ASR JSON file, or one conversation's rows in a CSV.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import IngestConfig
from pipeline.ingest.decode import Line, detect_encoding, split_lines
from pipeline.ingest.parse import Parser, RecordError
from pipeline.schema import Conversation, QuarantineRecord

SUFFIXES = (".jsonl", ".json", ".csv")
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


def discover(input_dir: Path) -> list[Path]:
    """Every *.jsonl, *.json and *.csv under input_dir (recursively), in a stable order; hidden
    files and folders (editor swap files, .ipynb_checkpoints) are not input."""
    if input_dir.is_file():
        return [input_dir]
    found = [p for p in input_dir.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)]
    return sorted(found)


def _raw_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _quarantine(path: str, err: RecordError, raw: bytes, line: int | None = None, offset: int | None = None,
                cid: Any = None, excerpt: str = "") -> QuarantineRecord:
    # The excerpt is cut here and masked by the caller before it is written anywhere.
    return QuarantineRecord(source_file=path, reason=err.reason, detail=err.detail, line=line, byte_offset=offset,
                            conversation_id=None if cid is None else str(cid)[:100],
                            excerpt=excerpt[:EXCERPT_CHARS], raw_hash=_raw_hash(raw))


def read_file(path: Path, cfg: IngestConfig, root: Path | None = None) -> FileResult:
    """Read one file of any supported format; `root` makes the recorded path relative."""
    name = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
    parser = Parser(cfg)
    try:
        data = path.read_bytes()
    except OSError as e:
        res = FileResult(name, "unknown")
        res.quarantined.append(_quarantine(name, RecordError("unreadable_file", f"cannot read the file: {e.strerror}"), b""))
        return res
    encoding = detect_encoding(data)
    res = FileResult(name, encoding)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        _read_jsonl(data, encoding, parser, res, cfg)
    elif suffix == ".json":
        _read_json(path, data, encoding, parser, res, cfg)
    elif suffix == ".csv":
        _read_csv(data, encoding, parser, res)
    for c in res.conversations:
        c.source_file, c.encoding = name, encoding
        c.source_format = c.source_format or suffix.lstrip(".")
    return res


def _read_jsonl(data: bytes, encoding: str, parser: Parser, res: FileResult, cfg: IngestConfig) -> None:
    for line in split_lines(data, encoding):
        if line.text is not None and not line.text.strip():
            continue
        _one_record(line, parser, res, cfg)


def _one_record(line: Line, parser: Parser, res: FileResult, cfg: IngestConfig) -> None:
    excerpt = line.text if line.text is not None else line.raw.decode("utf-8", errors="replace")
    try:
        if line.text is None:
            raise RecordError("undecodable_bytes", f"{line.error}; re-export the file in UTF-8")
        if len(line.raw) > cfg.max_record_bytes:
            raise RecordError("oversized_record", f"{len(line.raw)} bytes exceed ingest.max_record_bytes={cfg.max_record_bytes}")
        try:
            obj = json.loads(line.text)
        except json.JSONDecodeError as e:
            raise RecordError("malformed_json", f"not valid JSON ({e.msg} at column {e.colno}); fix or re-export the line") from None
        conv = parser.chat(obj)
        conv.source_line, conv.source_format = line.number, "chat_jsonl"
        res.conversations.append(conv)
    except RecordError as e:
        cid = obj.get("conversation_id") if "obj" in locals() and isinstance(obj, dict) else None
        res.quarantined.append(_quarantine(res.path, e, line.raw, line.number, line.offset, cid, excerpt))
    except RecursionError:
        res.quarantined.append(_quarantine(res.path, RecordError("malformed_json", "JSON nested too deeply"),
                                           line.raw, line.number, line.offset, None, excerpt))


def _read_json(path: Path, data: bytes, encoding: str, parser: Parser, res: FileResult, cfg: IngestConfig) -> None:
    text = None
    try:
        text = data.decode(encoding)
        if len(data) > cfg.max_record_bytes * 50:
            raise RecordError("oversized_record", f"{len(data)} bytes: split the file or raise ingest.max_record_bytes")
        obj = json.loads(text)
    except UnicodeDecodeError as e:
        res.quarantined.append(_quarantine(res.path, RecordError("undecodable_bytes", f"byte {e.start} is not valid {encoding}; re-export in UTF-8"), data, None, e.start))
        return
    except json.JSONDecodeError as e:
        res.quarantined.append(_quarantine(res.path, RecordError("malformed_json", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"),
                                           data, e.lineno, e.pos, None, text[:EXCERPT_CHARS] if text else ""))
        return
    except RecordError as e:
        res.quarantined.append(_quarantine(res.path, e, data))
        return
    except RecursionError:
        res.quarantined.append(_quarantine(res.path, RecordError("malformed_json", "JSON nested too deeply"), data))
        return
    items = obj if isinstance(obj, list) else [obj]
    for i, item in enumerate(items):
        raw = json.dumps(item, ensure_ascii=False, default=str).encode() if isinstance(obj, list) else data
        try:
            conv = _json_item(item, path, parser, index=i if isinstance(obj, list) else None)
            conv.source_line = i + 1 if isinstance(obj, list) else None
            res.conversations.append(conv)
        except RecordError as e:
            cid = item.get("conversation_id") if isinstance(item, dict) else None
            res.quarantined.append(_quarantine(res.path, e, raw, i + 1 if isinstance(obj, list) else None, None, cid,
                                               raw.decode("utf-8", errors="replace")))


def _json_item(item: Any, path: Path, parser: Parser, index: int | None) -> Conversation:
    if not isinstance(item, dict):
        raise RecordError("not_an_object", f"expected a conversation object, got {type(item).__name__}")
    sentences = _find_sentences(item)
    if sentences is None:
        conv = parser.chat(item)
        conv.source_format = "chat_json"
        return conv
    cid = item.get("conversation_id") or item.get("TaskId") or item.get("task_id") or (
        path.stem if index is None else f"{path.stem}-{index}")
    conv = parser.asr(sentences, str(cid), item.get("started_at"), item.get("metadata") if isinstance(item.get("metadata"), dict) else None,
                      item.get("agent_channel"), str(item.get("channel") or "call"))
    conv.source_format = "asr_json"
    return conv


def _find_sentences(item: dict[str, Any]) -> list | None:
    """The sentence list of a cloud ASR result: `Sentences` at the top or under `Result`."""
    for holder in (item, item.get("Result"), item.get("result"), item.get("Flash_Result"), item.get("flash_result")):
        if isinstance(holder, dict):
            for key in ("Sentences", "sentences", "Sentence", "sentence_list"):
                if isinstance(holder.get(key), list):
                    return holder[key]
    return None


_META_COLUMNS = ("region", "product", "order_id", "agent_id", "csat", "customer_id", "team")


def _read_csv(data: bytes, encoding: str, parser: Parser, res: FileResult) -> None:
    """CSV: one row per sentence (ASR: channel_id, begin_ms, end_ms) or per turn (chat: speaker),
    grouped into conversations by conversation_id in order of first appearance."""
    lines = split_lines(data, encoding)
    good = []
    for line in lines:
        if line.text is None:
            res.quarantined.append(_quarantine(res.path, RecordError("undecodable_bytes", f"{line.error}; re-export the file in UTF-8"),
                                               line.raw, line.number, line.offset, None, line.raw.decode("utf-8", errors="replace")))
        else:
            good.append(line)
    if not good:
        return
    reader = csv.reader(io.StringIO("\n".join(line.text for line in good)))
    numbers = [line.number for line in good]
    try:
        header = [h.strip().lower().lstrip("\ufeff") for h in next(reader)]
    except (StopIteration, csv.Error):
        return
    if "conversation_id" not in header or "text" not in header:
        res.quarantined.append(_quarantine(res.path, RecordError("bad_header", "the CSV needs conversation_id and text columns "
                                           f"(found: {', '.join(header)[:200]})"), good[0].raw, good[0].number, good[0].offset))
        return
    groups: dict[str, list[tuple[int, dict[str, str]]]] = {}
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            n = numbers[min(reader.line_num - 1, len(numbers) - 1)]
            res.quarantined.append(_quarantine(res.path, RecordError("malformed_csv", f"CSV parse error: {e}"), b"", n))
            continue
        n = numbers[min(reader.line_num - 1, len(numbers) - 1)]
        if not any(cell.strip() for cell in row):
            continue
        rec = dict(zip(header, row))
        cid = (rec.get("conversation_id") or "").strip()
        if not cid:
            res.quarantined.append(_quarantine(res.path, RecordError("missing_id", "row has no conversation_id"),
                                               ",".join(row).encode(), n, None, None, ",".join(row)))
            continue
        groups.setdefault(cid, []).append((n, rec))
    for cid, rows in groups.items():
        first_line, first = rows[0]
        raw = json.dumps([r for _, r in rows], ensure_ascii=False).encode()
        meta = {k: first[k] for k in _META_COLUMNS if first.get(k) not in (None, "")}
        try:
            if "speaker" in header and "channel_id" not in header:
                conv = parser.chat({"conversation_id": cid, "channel": first.get("channel") or "chat",
                                    "started_at": first.get("started_at") or None, "metadata": meta,
                                    "turns": [{"speaker": r.get("speaker"), "text": r.get("text"), "ts": r.get("ts") or None} for _, r in rows]})
                conv.source_format = "chat_csv"
            else:
                sentences = [{"ChannelId": r.get("channel_id"), "BeginTime": r.get("begin_ms", r.get("begin_time")),
                              "EndTime": r.get("end_ms", r.get("end_time")), "Text": r.get("text"),
                              **({"speaker": r["speaker"]} if r.get("speaker") else {})} for _, r in rows]
                conv = parser.asr(sentences, cid, first.get("started_at") or None, meta, first.get("agent_channel") or None,
                                  first.get("channel") or "call")
                conv.source_format = "asr_csv"
            conv.source_line = first_line
            res.conversations.append(conv)
        except RecordError as e:
            res.quarantined.append(_quarantine(res.path, e, raw, first_line, None, cid, rows[0][1].get("text", "")))
