"""Line-aligned byte spans of big JSONL files, so one file never has to be in memory whole.

Why only JSONL: its records are lines, so any cut after a newline is a cut between records. A
CSV conversation spans rows (and a quoted cell may span lines), a JSON file is one document, and
UTF-16 has no single-byte newline: those are read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_BLOCK = 1 << 20
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class Span:
    """Bytes [start, end) of a file, starting at a line start; `first_line` is that line's
    1-based number in the file, so quarantine records still name the file's own line."""

    start: int
    end: int
    first_line: int = 1

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.first_line == 1


def spans(path: Path, size: int, max_bytes: int) -> list[Span]:
    """`path` cut into spans of about `max_bytes`, each ending just after a newline; a file that
    cannot be cut (not JSONL, UTF-16, or small) is one span."""
    if size <= max_bytes or path.suffix.lower() != ".jsonl":
        return [Span(0, size)]
    out: list[Span] = []
    with open(path, "rb") as fh:
        if fh.read(3).startswith(_UTF16_BOMS):
            return [Span(0, size)]
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


def read_span(path: Path, span: Span) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(span.start)
        return fh.read(span.end - span.start)


def _next_line_start(fh, pos: int, size: int) -> int:
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


def _count_newlines(fh, n: int) -> int:
    count = 0
    while n > 0:
        block = fh.read(min(_BLOCK, n))
        if not block:
            break
        count += block.count(b"\n")
        n -= len(block)
    return count


__all__ = ["Span", "read_span", "spans"]
