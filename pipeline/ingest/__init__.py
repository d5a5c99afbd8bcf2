"""Read transcript files: discover, decode, parse, and quarantine what cannot be read.

`read_file` is the one entry point per file. It never raises on bad data: every record it reads
comes back either as a Conversation or as a QuarantineRecord naming the file, line or byte offset
and a reason a person can act on. Counting (`FileResult.n_read`) is per record: a JSONL line, an
element of a JSON array, an ASR JSON file, or one conversation's rows in a CSV.

Why every record is fenced off on its own: a delivery holds thousands of records from systems we
do not control, and one value nobody anticipated (a 23-digit timestamp, a lone surrogate) must
cost that record, not the night. Anything a check did not foresee still becomes a `bad_value`
quarantine naming the field being read.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.config import IngestConfig
from pipeline.ingest.common import EXCERPT_CHARS, FileResult, unexpected
from pipeline.ingest.common import quarantine as _quarantine
from pipeline.ingest.csvrows import read_csv_lines
from pipeline.ingest.decode import BOM, Line, decode_lines
from pipeline.ingest.parse import (
    Parser,
    RecordError,
    find_long_int,
    has_escaped_surrogate,
    locate_long_int,
    scrub_surrogates,
)
from pipeline.ingest.spans import Span, read_span
from pipeline.schema import Conversation

__all__ = ["FileResult", "discover", "read_file"]

SUFFIXES = (".jsonl", ".json", ".csv")


def discover(input_dir: Path) -> list[Path]:
    """Every *.jsonl, *.json and *.csv under input_dir (recursively), in a stable order; hidden
    files and folders (editor swap files, .ipynb_checkpoints) are not input."""
    if input_dir.is_file():
        return [input_dir]
    found = [
        p
        for p in input_dir.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)
    ]
    return sorted(found)


def read_all(path: Path, cfg: IngestConfig) -> tuple[list[Conversation], int]:
    """Every conversation in a file or folder of transcripts, in file order, and how many records
    were quarantined: for one-off reads (training, evaluation) that do not go through a run."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    convs: list[Conversation] = []
    quarantined = 0
    for p in discover(path):
        res = read_file(p, cfg, root=root)
        convs.extend(res.conversations)
        quarantined += len(res.quarantined)
    return convs, quarantined


def input_name(input_dir: Path, path: Path) -> str:
    """How a discovered file is recorded between runs: relative to the input folder (its own name
    when the input is that file), so moving the whole delivery folder does not make it new."""
    return str(path.relative_to(input_dir)) if path != input_dir else path.name


def _display_name(path: Path, root: Path | None) -> str:
    name = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
    # A file name that is not valid UTF-8 arrives with lone surrogates (surrogateescape); they
    # could be written nowhere, so its odd bytes are shown as \xNN instead.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_file(path: Path, cfg: IngestConfig, root: Path | None = None, span: Span | None = None) -> FileResult:
    """Read one file of any supported format; `root` makes the recorded path relative. `span`
    reads only those lines of a big JSONL or CSV file (see `pipeline.ingest.spans`), numbered as in the file."""
    name = _display_name(path, root)
    try:
        data = path.read_bytes() if span is None else read_span(path, span)
    except OSError as e:
        res = FileResult(name, "unknown")
        res.quarantined.append(
            _quarantine(name, RecordError("unreadable_file", f"cannot read the file: {e.strerror}"), b"")
        )
        return res
    res = FileResult(name, "unknown")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            _read_json(path, data, Parser(cfg), res, cfg)
        else:
            res.encoding, lines = decode_lines(data)
            if span is not None and not span.whole:
                lines = _numbered_in_file(lines, span)
            if suffix == ".jsonl":
                _read_jsonl(lines, Parser(cfg), res, cfg)
            elif suffix == ".csv":
                read_csv_lines(lines, Parser(cfg), res, cfg)
    except Exception as e:  # noqa: BLE001 - a reader bug must not stop the night either
        # The records already read stand; the rest of the file is one quarantined record, so the
        # file is seen as broken (not silently short) and the counts still reconcile.
        res.quarantined.append(_quarantine(name, unexpected(e, "the file"), data, None, None, None, ""))
    for c in res.conversations:
        c.source_file = name
        c.encoding = c.encoding or res.encoding
        c.source_format = c.source_format or suffix.lstrip(".")
    return res


def _numbered_in_file(lines: list[Line], span: Span) -> list[Line]:
    """A span's lines with the numbers and byte offsets they have in the whole file."""
    out = []
    for x in lines:
        number, offset = span.in_file(x.number, x.offset)
        out.append(replace(x, number=number, offset=offset))
    return out


def load_json(text: str) -> Any:
    """json.loads for one record, with its hostile cases turned into RecordErrors and lone
    surrogates replaced (they would raise in every writer downstream)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(
            "malformed_json",
            f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix or re-export the record",
        ) from None
    except ValueError:
        # Python refuses to convert integers over 4,300 digits; say where the number is.
        where, digits, record = locate_long_int(text) or ("a number", 0, None)
        raise RecordError("bad_value", _long_int_detail(where, digits), scrub_surrogates(record)) from None
    except RecursionError:
        raise RecordError("malformed_json", "JSON nested too deeply") from None
    return scrub_surrogates(obj) if has_escaped_surrogate(text) else obj


def _long_int_detail(where: str, digits: int) -> str:
    return f"{where} is a {digits}-digit integer, too long to be any real value"


def _read_jsonl(lines: list[Line], parser: Parser, res: FileResult, cfg: IngestConfig) -> None:
    for line in lines:
        if line.text is not None and not line.text.strip():
            continue
        _one_record(line, parser, res, cfg)


def _one_record(line: Line, parser: Parser, res: FileResult, cfg: IngestConfig) -> None:
    excerpt = line.text if line.text is not None else line.raw.decode("utf-8", errors="replace")
    obj: Any = None
    try:
        if line.text is None:
            raise RecordError("undecodable_bytes", f"{line.error}; re-export the file in UTF-8")
        if len(line.raw) > cfg.max_record_bytes:
            raise RecordError(
                "oversized_record", f"{len(line.raw)} bytes exceed ingest.max_record_bytes={cfg.max_record_bytes}"
            )
        # A BOM inside the file is where another export was pasted on; JSON does not allow it.
        obj = load_json(line.text[1:] if line.text.startswith("\ufeff") else line.text)
        conv = parser.chat(obj)
        conv.source_line, conv.source_format, conv.encoding = line.number, "chat_jsonl", line.encoding
        res.conversations.append(conv)
    except RecordError as e:
        cid = _cid(obj if obj is not None else e.record)
        res.quarantined.append(_quarantine(res.path, e, line.raw, line.number, line.offset, cid, excerpt))
    except Exception as e:  # noqa: BLE001 - see the module docstring
        res.quarantined.append(
            _quarantine(res.path, unexpected(e, "the record"), line.raw, line.number, line.offset, _cid(obj), excerpt)
        )


def _cid(obj: Any) -> Any:
    return obj.get("conversation_id") if isinstance(obj, dict) else None


def _json_text(data: bytes) -> tuple[str, str | None, str, int | None]:
    """A .json file's encoding and text, decided line by line like JSONL (a pretty-printed file
    pasted together from two exports can mix encodings); the text is None when a line does not
    decode, with the reason and that line's byte offset."""
    label, skip = ("utf-8-sig", 3) if data.startswith(BOM) else ("utf-8", 0)
    try:  # the common case, without splitting the file into lines
        return label, data[skip:].decode("utf-8"), "", None
    except UnicodeDecodeError:
        pass
    encoding, lines = decode_lines(data)
    if encoding == "utf-16":
        try:
            return encoding, data.decode("utf-16"), "", None
        except UnicodeDecodeError as e:
            return encoding, None, f"byte {e.start} is not valid UTF-16", e.start
    bad = next((ln for ln in lines if ln.text is None), None)
    if bad is not None:
        return encoding, None, f"line {bad.number}: {bad.error}", bad.offset
    return encoding, "\n".join(ln.text or "" for ln in lines), "", None


def _read_json(path: Path, data: bytes, parser: Parser, res: FileResult, cfg: IngestConfig) -> None:
    if len(data) > cfg.max_record_bytes * 50:
        res.quarantined.append(
            _quarantine(
                res.path,
                RecordError("oversized_record", f"{len(data)} bytes: split the file or raise ingest.max_record_bytes"),
                data,
            )
        )
        return
    res.encoding, text, error, offset = _json_text(data)
    if text is None:
        res.quarantined.append(
            _quarantine(res.path, RecordError("undecodable_bytes", f"{error}; re-export in UTF-8"), data, None, offset)
        )
        return
    long_ints = False
    try:
        obj = load_json(text)
    except RecordError as e:
        if not (e.reason == "bad_value" and isinstance(e.record, list)):
            res.quarantined.append(_quarantine(res.path, e, data, None, None, _cid(e.record), text[:EXCERPT_CHARS]))
            return
        # A list of conversations: only the items holding such a number are bad.
        obj, long_ints = e.record, True
    items = obj if isinstance(obj, list) else [obj]
    for i, item in enumerate(items):
        index = i if isinstance(obj, list) else None
        try:
            raw = json.dumps(item, ensure_ascii=False, default=str).encode() if index is not None else data
        except Exception:  # noqa: BLE001 - only for the hash; the item itself is judged below
            raw = repr(item).encode("utf-8", "backslashreplace")
        try:
            found = find_long_int(item) if long_ints else None
            if found:
                raise RecordError("bad_value", _long_int_detail(*found))
            conv = _json_item(item, path, parser, index)
            conv.source_line = None if index is None else i + 1
            res.conversations.append(conv)
        except Exception as e:  # noqa: BLE001 - see the module docstring
            err = e if isinstance(e, RecordError) else unexpected(e, "the record")
            res.quarantined.append(
                _quarantine(
                    res.path,
                    err,
                    raw,
                    None if index is None else i + 1,
                    None,
                    _cid(item),
                    raw.decode("utf-8", errors="replace"),
                )
            )


_ID_TYPES = (str, int)


def _json_item(item: Any, path: Path, parser: Parser, index: int | None) -> Conversation:
    if not isinstance(item, dict):
        raise RecordError("not_an_object", f"expected a conversation object, got {type(item).__name__}")
    sentences = _find_sentences(item)
    if sentences is None:
        conv = parser.chat(item)
        conv.source_format = "chat_json"
        return conv
    given = item.get("conversation_id")
    if given is not None and (not isinstance(given, _ID_TYPES) or isinstance(given, bool)):
        raise RecordError("missing_id", f"conversation_id is {type(given).__name__}; it must be a string or a number")
    cid = given or item.get("TaskId") or item.get("task_id") or (path.stem if index is None else f"{path.stem}-{index}")
    conv = parser.asr(
        sentences,
        str(cid),
        item.get("started_at"),
        item.get("metadata") if isinstance(item.get("metadata"), dict) else None,
        item.get("agent_channel"),
        str(item.get("channel") or "call"),
    )
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
