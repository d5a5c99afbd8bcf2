"""Byte spans of big JSONL and CSV files, each starting at a record, so one file never has to be in
memory whole: a run's peak then follows its chunk size, not the size of the biggest input file.

Why these two: a JSONL record is a line, so any cut after a newline is a cut between records. A
CSV conversation is several rows, in order, and a quoted cell may span lines; it is cut only
between two conversations, at a line that is certainly a row of its own (see `_csv_spans`), and
each later span is read behind the file's header line. A JSON file is one document and UTF-16
has no single-byte newline: those are read whole.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.ingest.csvrows import first_row, header_names, is_row

_BLOCK = 1 << 20
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Span:
    """Bytes [start, end) of a file, starting at a line start; `first_line` is that line's
    1-based number in the file, so quarantine records still name the file's own line. A CSV span
    after the first carries `header`, the file's bytes of its header line (line `header_line`),
    which `read_span` puts before the span's own bytes."""

    start: int
    end: int
    first_line: int = 1
    header: tuple[int, int] | None = None
    header_line: int = 1

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.first_line == 1

    def in_file(self, number: int, offset: int) -> tuple[int, int]:
        """A line's number and byte offset in the file, from those it has in `read_span`'s bytes."""
        if self.header is None:
            return number + self.first_line - 1, offset + self.start
        head = self.header[1] - self.header[0]
        if offset < head:
            return self.header_line, self.header[0] + offset
        return number - 2 + self.first_line, offset - head + self.start


def spans(path: Path, size: int, max_bytes: int) -> list[Span]:
    """`path` cut into spans of about `max_bytes` (more where a CSV conversation goes on), each
    starting at a record; a file that cannot be cut (JSON, UTF-16, small) is one span."""
    suffix = path.suffix.lower()
    if size <= max_bytes or suffix not in (".jsonl", ".csv"):
        return [Span(0, size)]
    with open(path, "rb") as fh:
        if fh.read(3).startswith(_UTF16_BOMS):
            return [Span(0, size)]
        return _jsonl_spans(fh, size, max_bytes) if suffix == ".jsonl" else _csv_spans(fh, size, max_bytes)


def read_span(path: Path, span: Span) -> bytes:
    with open(path, "rb") as fh:
        head = b""
        if span.header is not None:
            fh.seek(span.header[0])
            head = fh.read(span.header[1] - span.header[0])
        fh.seek(span.start)
        return head + fh.read(span.end - span.start)


def _jsonl_spans(fh: BinaryIO, size: int, max_bytes: int) -> list[Span]:
    out: list[Span] = []
    start, line = 0, 1
    while start < size:
        target = start + max_bytes
        if target >= size:
            out.append(Span(start, size, line))
            break
        end = _next_line_start(fh, target, size)
        fh.seek(start)
        line_count = _count_newlines(fh, end - start)
        out.append(Span(start, end, line))
        start, line = end, line + line_count
    return out


def _csv_spans(fh: BinaryIO, size: int, max_bytes: int) -> list[Span]:
    """Cuts before a line L, past each span's `max_bytes`, where L and the line before it hold no
    quote and have the header's number of fields, and their conversation ids differ.

    Why that is always a row boundary as `pipeline.ingest.csvrows` reads the whole file: a quoted
    field open before L could only close on a line with a quote, so it would take in L; csvrows
    never lets a quoted field take in a line that is a row by itself, so it reads L (and the
    line before) as rows. Rows of one conversation may also lie apart in a file (csvrows groups
    them by id): every row's id is noted per span, and spans that share an id are joined again,
    so no conversation is ever split between chunks. A header without conversation_id and text
    (csvrows rejects it) leaves the file whole."""
    lines = _lines(fh)
    found = next(((n, off, raw) for n, (off, raw) in enumerate(lines, start=1) if raw.strip(b" \t\r" + _BOM)), None)
    if found is None:
        return [Span(0, size)]
    header_line, header_off, header_raw = found
    names = _header_names(header_raw)
    if names is None or "conversation_id" not in names or "text" not in names:
        return [Span(0, size)]
    ncols, k = len(names), names.index("conversation_id")
    header_key = header_raw.removeprefix(_BOM).rstrip(b"\r")
    cuts: list[tuple[int, int]] = [(0, 1)]
    ids: list[set[bytes]] = [set()]
    target, prev = max_bytes, None
    for number, (offset, raw) in enumerate(lines, start=header_line + 1):
        if b'"' in raw:
            cid, prev = _quoted_id(raw, k), None
        else:
            # csvrows' own test of a row that stands alone, on the bytes as latin-1 (every byte
            # kept: commas and quotes are the same bytes in UTF-8, GB18030 and Big5).
            text = raw.decode("latin-1")
            pasted = raw.removeprefix(_BOM).rstrip(b"\r") == header_key  # files joined, each with its header
            cid = (text.split(",")[k].strip().encode("latin-1") or None) if is_row(text, ncols) and not pasted else None
            if cid is not None and prev is not None and cid != prev and offset >= target:
                cuts.append((offset, number))
                ids.append(set())
                target = offset + max_bytes
            prev = cid
        if cid is not None:
            ids[-1].add(cid)
    kept = [cuts[j] for j in _apart(ids)]
    header = (header_off, header_off + len(header_raw) + 1)
    ends = [off for off, _ in kept[1:]] + [size]
    return [
        Span(off, end, line, None if j == 0 else header, header_line)
        for j, ((off, line), end) in enumerate(zip(kept, ends))
    ]


def _apart(ids: list[set[bytes]]) -> list[int]:
    """The spans (by index) that start a group of spans no conversation id crosses."""
    sizes = [len(s) for s in ids]
    h = np.concatenate([np.fromiter(map(hash, s), dtype=np.int64, count=len(s)) for s in ids])
    s = np.repeat(np.arange(len(ids)), sizes)
    order = np.lexsort((s, h))
    h, s = h[order], s[order]
    if not len(h):
        return list(range(len(ids)))
    first = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    last = np.r_[first[1:], len(h)] - 1
    # An id seen in spans lo..hi joins them: the cuts before spans lo+1..hi go.
    joined = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(joined, s[first] + 1, 1)
    np.add.at(joined, s[last] + 1, -1)
    inside = np.cumsum(joined)[: len(ids)] > 0
    return [j for j in range(len(ids)) if j == 0 or not inside[j]]


def _header_names(raw: bytes) -> list[str] | None:
    """The header's column names as csvrows reads them (`header_names`); None when it is not
    UTF-8 (or ASCII) or opens a quote it does not close on its line."""
    try:
        text = raw.removeprefix(_BOM).decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        return None
    if text.count('"') % 2:
        return None
    try:
        return header_names(text)
    except csv.Error:
        return None


def _quoted_id(raw: bytes, k: int) -> bytes | None:
    """The id field of a line with quotes, read byte for byte (latin-1 keeps every byte). A line
    that is the middle of a quoted cell may yield a false id: that only joins spans."""
    try:
        fields = first_row([raw.decode("latin-1")])
    except csv.Error:
        return None
    return (fields[k].encode("latin-1").strip() or None) if len(fields) > k else None


def _lines(fh: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes without the newline) of each line, read a block at a time."""
    fh.seek(0)
    pos, rest = 0, b""
    while block := fh.read(_BLOCK):
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield pos, part
            pos += len(part) + 1
    if rest:
        yield pos, rest


def _next_line_start(fh: BinaryIO, pos: int, size: int) -> int:
    """The offset just after the first newline at or after `pos` (or the file's end)."""
    fh.seek(pos)
    while True:
        block = fh.read(_BLOCK)
        if not block:
            return size
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)


def _count_newlines(fh: BinaryIO, n: int) -> int:
    count = 0
    while n > 0:
        block = fh.read(min(_BLOCK, n))
        if not block:
            break
        count += block.count(b"\n")
        n -= len(block)
    return count


__all__ = ["Span", "read_span", "spans"]
