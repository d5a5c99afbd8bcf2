"""Detect a file's encoding and split it into lines without losing a byte.

Why not charset-normalizer alone: on short Chinese files it confuses GBK and Big5, and guessing
wrong turns a conversation into plausible-looking garbage. Here every candidate must decode
strictly, and among those that do, the one whose characters are common Chinese characters wins
(Big5 bytes read as GBK, and the reverse, decode but land on rare characters). Lines that no
encoding decodes are returned as errors with their byte offset, for the quarantine.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from functools import lru_cache

CANDIDATES = ("gb18030", "big5")


@lru_cache(maxsize=1)
def common_chars() -> frozenset[str]:
    """The 3,755 level-1 GB2312 characters plus the 5,401 common Big5 characters."""
    chars: set[str] = set()
    for lead in range(0xB0, 0xD8):
        for trail in range(0xA1, 0xFF):
            try:
                chars.add(bytes((lead, trail)).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    for lead in range(0xA4, 0xC7):
        for trail in list(range(0x40, 0x7F)) + list(range(0xA1, 0xFF)):
            try:
                chars.add(bytes((lead, trail)).decode("big5"))
            except UnicodeDecodeError:
                pass
    return frozenset(chars)


def plausibility(text: str) -> float:
    """Share of CJK characters that are common ones; 1.0 for text with no CJK at all."""
    cjk = [c for c in text if "\u3400" <= c <= "\u9fff"]
    if not cjk:
        return 1.0
    common = common_chars()
    return sum(c in common for c in cjk) / len(cjk)


def detect_encoding(data: bytes) -> str:
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    scored = []
    for enc in CANDIDATES:
        try:
            scored.append((plausibility(data.decode(enc)), 0, enc))
        except UnicodeDecodeError:
            # Not strictly decodable: still a candidate for line-by-line decoding, ranked by how
            # little of the file is broken.
            bad = data.decode(enc, errors="replace").count("\ufffd")
            scored.append((-1.0, -bad, enc))
    utf8_bad = data.decode("utf-8", errors="replace").count("\ufffd")
    scored.append((-1.0, -utf8_bad, "utf-8"))
    return max(scored)[2]


@dataclass(frozen=True)
class Line:
    number: int  # 1-based
    offset: int  # byte offset of the line's start in the file
    raw: bytes
    text: str | None  # None when the bytes do not decode
    error: str = ""


def split_lines(data: bytes, encoding: str) -> list[Line]:
    """Lines of the file, each decoded on its own so one bad line cannot spoil the rest.

    Splitting on b"\\n" is safe for UTF-8, GB18030 and Big5 (0x0A never occurs inside their
    multi-byte characters); UTF-16 is decoded whole first.
    """
    if encoding == "utf-16":
        text = data.decode("utf-16", errors="replace")
        lines, offset = [], 0
        for i, t in enumerate(text.split("\n"), start=1):
            raw = t.encode("utf-16-le")
            lines.append(Line(i, offset, raw, t.rstrip("\r"), "" if "\ufffd" not in t else "undecodable"))
            offset += len(raw) + 2
        return lines
    if encoding == "utf-8-sig":
        data, base, encoding = data[3:], 3, "utf-8"
    else:
        base = 0
    out: list[Line] = []
    offset = 0
    for i, raw in enumerate(data.split(b"\n"), start=1):
        try:
            out.append(Line(i, base + offset, raw, raw.decode(encoding).rstrip("\r")))
        except UnicodeDecodeError as e:
            out.append(Line(i, base + offset, raw, None, f"bytes {e.start}-{e.end} of the line are not valid {encoding}"))
        offset += len(raw) + 1
    return out
