"""Mask personal data with typed placeholders before anything is stored.

Detection finds spans; replacement is separate so the same spans can be applied to the received
(original) text through a character map. Checksums decide between look-alike digit runs: an
18-digit run is an ID only if its GB 11643 check digit holds, a 16-19 digit run is a bank card
only if it passes Luhn; order numbers stay unless configured, because agents need them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

PLACEHOLDERS = {
    "phone": "<PHONE>", "landline": "<PHONE>", "id": "<ID>", "card": "<CARD>", "email": "<EMAIL>",
    "address": "<ADDRESS>", "name": "<NAME>", "account": "<ACCOUNT>", "order": "<ORDER>",
}
PLACEHOLDER_RE = re.compile(r"<[A-Z][A-Z_]*>")

# Corpora that were masked upstream (JDDC writes [姓名x], [电话x]...) are mapped to our tokens so
# every later step sees one vocabulary of placeholders.
FOREIGN_PLACEHOLDERS = {
    "姓名": "<NAME>", "电话": "<PHONE>", "手机": "<PHONE>", "地址": "<ADDRESS>", "邮箱": "<EMAIL>",
    "身份证": "<ID>", "身份证号": "<ID>", "银行卡": "<CARD>", "订单": "<ORDER>", "金额": "<AMOUNT>",
    "数字": "<NUM>", "日期": "<DATE>", "时间": "<TIME>", "站点": "<SITE>", "组织机构": "<ORG>",
    "链接": "<URL>", "商品": "<PRODUCT>", "账号": "<ACCOUNT>",
}
_FOREIGN_RE = re.compile(r"\[([\u4e00-\u9fff]{1,5})[xX]\]")

_ND = r"(?<![0-9A-Za-z])"  # not glued to a longer alphanumeric run (e.g. inside JD2409013388)
_NA = r"(?![0-9A-Za-z])"
_ID_CUE_RE = re.compile(r"(身份证|证件号|身份证号码?)[^0-9]{0,6}$")
_CARD_CUE_RE = re.compile(r"(卡号|银行卡|信用卡|储蓄卡)[^0-9]{0,6}$")
_ORDER_CUE_RE = re.compile(r"(订单|单号|运单|快递单|物流单|工单|编号|order)[^0-9]{0,6}$", re.I)

_ID_RE = re.compile(_ND + r"(\d{6}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx])" + _NA)
_CARD_RE = re.compile(_ND + r"(\d{4}(?:[ -]?\d{4}){2}[ -]?\d{4,7})" + _NA)
_MOBILE_RE = re.compile(_ND + r"((?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2})" + _NA)
_LANDLINE_RE = re.compile(_ND + r"((?:\(0\d{2,3}\)|0\d{2,3})[ -]?\d{7,8}(?:-\d{1,5})?)" + _NA)
_EMAIL_RE = re.compile(r"([A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})")
_ACCOUNT_RE = re.compile(r"(?:QQ|qq|微信号?|vx|VX|wx|WX|支付宝(?:账号)?)[号是:：\s]{0,3}([A-Za-z0-9_.@-]{5,30})")

_NOT_NAME = "的是在址到送寄我你他她请帮把给收货这那有个了吗呢吧啊"
_H = rf"(?:(?![{_NOT_NAME}])[\u4e00-\u9fff])"  # a Chinese character that can be part of a place name
_UNIT = r"(?:号楼|号院|栋|幢|座|楼|单元|室|号|层|户)"
_ADDRESS_RE = re.compile(
    rf"((?:{_H}{{2,7}}(?:省|自治区))?(?:{_H}{{2,7}}(?:市|州|盟))?(?:{_H}{{1,7}}(?:区|县|旗))?"
    rf"(?:{_H}{{1,8}}(?:镇|乡|街道))?"
    rf"(?:{_H}{{1,12}}(?:路|街|大道|巷|弄|胡同|村)[0-9一二三四五六七八九十]+号(?:院)?"
    rf"|{_H}{{2,10}}(?:小区|花园|公寓|大厦|家园|苑|广场|新村))"
    rf"(?:[-0-9A-Za-z一二三四五六七八九十]+{_UNIT})*)"
)
_ADDRESS_CUE_RE = re.compile(r"(?:收货地址|送货地址|详细地址|家庭住址|地址|住在|住址|送到|寄到)(?:是|为|:|：|在)?\s*"
                             r"([^\s,，。.!！?？;；<]{4,40})")
_ADDRESS_PREFILTER = re.compile(r"(?:路|街|大道|巷|弄|胡同|村)[0-9一二三四五六七八九十]|小区|花园|公寓|大厦|家园|苑|广场|新村")
_ADDRESS_END_RE = re.compile(r".*[0-9A-Za-z号室栋幢楼单元层户院座区县市镇村路街道巷弄]")
_ADDRESS_HINT = re.compile(r"[0-9]|路|街|号|栋|室|单元|区|县|镇|村|小区|大厦|省|市")
_NAME_CUE_RE = re.compile(r"(?:我叫|我的名字(?:是|叫)|本人姓名|姓名(?:是|为|:|：)?|收件人(?:是|为|:|：)?|收货人(?:是|为|:|：)?"
                          r"|联系人(?:是|为|:|：)?|(?:开户|持卡|账户)(?:名|人)(?:是|为|:|：)?|户名(?:是|为|:|：)?|我姓)\s*([\u4e00-\u9fff]{1,3})")
_HONORIFIC_RE = re.compile(r"([\u4e00-\u9fff]{1,2})(?=先生|女士|小姐)")


def id_checksum_ok(s: str) -> bool:
    """GB 11643-1999 check digit of an 18-character ID number."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    if len(s) != 18 or not s[:17].isdigit():
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], weights))
    return "10X98765432"[total % 11] == s[17].upper()


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


def load_surnames(path: Path) -> frozenset[str]:
    words = [w.strip() for w in path.read_text(encoding="utf-8").split() if w.strip() and not w.startswith("#")]
    return frozenset(words)


@dataclass
class Masker:
    """Finds personal data in normalised (NFKC, Simplified) text and replaces it with placeholders."""

    surnames: frozenset[str] = frozenset()
    mask_order_ids: bool = False
    mask_addresses: bool = True
    mask_names: bool = True
    _detectors: list[Callable[[str], Iterable[Span]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Order matters: earlier detectors win overlaps (an ID's digits are not also a card).
        self._detectors = [self._emails, self._ids, self._cards, self._mobiles, self._landlines, self._accounts]
        if self.mask_addresses:
            self._detectors += [self._addresses]
        if self.mask_names:
            self._detectors += [self._names]

    # -- detection -------------------------------------------------------------------------
    def find(self, text: str) -> list[Span]:
        taken: list[Span] = []
        for detect in self._detectors:
            for s in detect(text):
                if s.end > s.start and not any(s.start < t.end and t.start < s.end for t in taken):
                    taken.append(s)
        return sorted(taken, key=lambda s: s.start)

    def _is_order(self, text: str, start: int) -> bool:
        return not self.mask_order_ids and bool(_ORDER_CUE_RE.search(text[max(0, start - 12):start]))

    def _emails(self, t: str) -> Iterable[Span]:
        return (Span(*m.span(1), "email") for m in _EMAIL_RE.finditer(t))

    def _ids(self, t: str) -> Iterable[Span]:
        # A wrong check digit usually means a digit run that is not an ID, unless the customer
        # just said it is one: then a typo must not let it through.
        return (Span(*m.span(1), "id") for m in _ID_RE.finditer(t)
                if id_checksum_ok(m.group(1)) or _ID_CUE_RE.search(t[max(0, m.start(1) - 12):m.start(1)]))

    def _cards(self, t: str) -> Iterable[Span]:
        for m in _CARD_RE.finditer(t):
            digits = re.sub(r"[ -]", "", m.group(1))
            cued = _CARD_CUE_RE.search(t[max(0, m.start(1) - 12):m.start(1)])
            if 16 <= len(digits) <= 19 and (cued or (luhn_ok(digits) and not self._is_order(t, m.start(1)))):
                yield Span(*m.span(1), "card")

    def _mobiles(self, t: str) -> Iterable[Span]:
        return (Span(*m.span(1), "phone") for m in _MOBILE_RE.finditer(t))

    def _landlines(self, t: str) -> Iterable[Span]:
        return (Span(*m.span(1), "landline") for m in _LANDLINE_RE.finditer(t) if not self._is_order(t, m.start(1)))

    def _accounts(self, t: str) -> Iterable[Span]:
        return (Span(*m.span(1), "account") for m in _ACCOUNT_RE.finditer(t))

    def _addresses(self, t: str) -> Iterable[Span]:
        for m in _ADDRESS_CUE_RE.finditer(t):
            value = m.group(1)
            # The cue's capture runs to the next punctuation; end it at the last address unit so
            # "送到...1202室吧" keeps its 吧.
            tail = _ADDRESS_END_RE.search(value)
            if tail and _ADDRESS_HINT.search(value) and not PLACEHOLDER_RE.fullmatch(value):
                yield Span(m.start(1), m.start(1) + tail.end(), "address")
        # The structural pattern is the costliest regex here; most texts hold no street or
        # estate word at all, so check for one first.
        if _ADDRESS_PREFILTER.search(t):
            for m in _ADDRESS_RE.finditer(t):
                yield Span(*m.span(1), "address")

    def _names(self, t: str) -> Iterable[Span]:
        for m in _NAME_CUE_RE.finditer(t):
            name = m.group(1)
            if name[:1] in self.surnames or name[:2] in self.surnames:
                yield Span(*m.span(1), "name")
        for m in _HONORIFIC_RE.finditer(t):
            cand = m.group(1)
            # "张先生" or "张伟先生": the span must start with a surname; "这位先生" must not match.
            for i in range(len(cand)):
                if cand[i] in self.surnames or cand[i:i + 2] in self.surnames:
                    yield Span(m.start(1) + i, m.end(1), "name")
                    break

    # -- replacement -----------------------------------------------------------------------
    def mask(self, text: str) -> tuple[str, Counter]:
        """(masked text, counts per kind). Also maps upstream placeholders like [姓名x]."""
        if not text:
            return text, Counter()
        text = map_foreign_placeholders(text)
        spans = self.find(text)
        return apply_spans(text, spans), Counter(s.kind for s in spans)

    def mask_original(self, original: str) -> tuple[str, Counter]:
        """Mask received text (maybe full-width, Traditional) by detecting on a folded copy that
        keeps a map back to the received characters, so nothing is lost but the PII."""
        if not original:
            return original, Counter()
        original = map_foreign_placeholders(original)
        folded, back = fold_with_map(original)
        spans = [Span(back[s.start], back[s.end - 1] + 1, s.kind) for s in self.find(folded)]
        return apply_spans(original, spans), Counter(s.kind for s in spans)


def apply_spans(text: str, spans: list[Span]) -> str:
    out, pos = [], 0
    for s in sorted(spans, key=lambda s: s.start):
        if s.start < pos:
            continue
        out.append(text[pos:s.start])
        out.append(PLACEHOLDERS[s.kind])
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


def map_foreign_placeholders(text: str) -> str:
    if "[" not in text:
        return text
    return _FOREIGN_RE.sub(lambda m: FOREIGN_PLACEHOLDERS.get(m.group(1), m.group(0)), text)


_ONE_TO_ONE_RE = re.compile(r"[\x20-\x7e\u3001-\u3003\u3008-\u3011\u4e00-\u9fff\uff01-\uff5e]*")


def fold_with_map(text: str) -> tuple[str, list[int]]:
    """NFKC + Traditional-to-Simplified per character, with each folded char's source index."""
    from pipeline.normalize import to_simplified

    if _ONE_TO_ONE_RE.fullmatch(text):
        # ASCII, CJK and full-width forms fold one character to one: no per-character walk.
        folded = unicodedata.normalize("NFKC", text)
        simp = to_simplified(folded)
        return (simp if len(simp) == len(folded) else folded), list(range(len(text)))
    chars: list[str] = []
    back: list[int] = []
    for i, c in enumerate(text):
        f = unicodedata.normalize("NFKC", c) if ord(c) > 0x7F else c
        chars.append(f)
        back.extend([i] * len(f))
    folded = "".join(chars)
    simp = to_simplified(folded)
    # t2s is character-for-character for almost all text; when a phrase rule changes the length
    # we keep the unconverted fold rather than lose the alignment.
    if len(simp) == len(folded):
        folded = simp
    return folded, back
