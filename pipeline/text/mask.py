"""Mask personal data with typed placeholders before anything is stored.

Detection finds spans; replacement is separate so the same spans can be applied to the received
(original) text through a character map. Checksums decide between look-alike digit runs: an
18-digit run is an ID only if its GB 11643 check digit holds, a 16-19 digit run is a bank card
only if it passes Luhn; order numbers stay unless configured, because agents need them.

Real exports write numbers in any grouping (`110105 19900307 1234`, `6222-0212-3456-7890-123`,
`0086 138 1234 5678`, two mobiles glued together), so digits are read as runs of groups and each
run is split into the numbers its group shapes allow. Names are found after cue words, before
先生/女士, and without any cue where a surname is followed by given-name characters in a context
that says "person" (next to a phone number, after 我是/给/找, before 的订单/说/先生...), with
jieba's dictionary vetoing ordinary words such as 马上, 黄金 or 高兴.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PLACEHOLDERS = {
    "phone": "<PHONE>",
    "landline": "<PHONE>",
    "id": "<ID>",
    "card": "<CARD>",
    "email": "<EMAIL>",
    "address": "<ADDRESS>",
    "name": "<NAME>",
    "account": "<ACCOUNT>",
    "order": "<ORDER>",
}
PLACEHOLDER_RE = re.compile(r"<[A-Z][A-Z_]*>")

# Corpora that were masked upstream (JDDC writes [姓名x], [电话x]...) are mapped to our tokens so
# every later step sees one vocabulary of placeholders.
FOREIGN_PLACEHOLDERS = {
    "姓名": "<NAME>",
    "电话": "<PHONE>",
    "手机": "<PHONE>",
    "地址": "<ADDRESS>",
    "邮箱": "<EMAIL>",
    "身份证": "<ID>",
    "身份证号": "<ID>",
    "银行卡": "<CARD>",
    "订单": "<ORDER>",
    "金额": "<AMOUNT>",
    "数字": "<NUM>",
    "日期": "<DATE>",
    "时间": "<TIME>",
    "站点": "<SITE>",
    "组织机构": "<ORG>",
    "链接": "<URL>",
    "商品": "<PRODUCT>",
    "账号": "<ACCOUNT>",
}
_FOREIGN_RE = re.compile(r"\[([\u4e00-\u9fff]{1,5})[xX]\]")

_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GIVEN_CHARS_PATH = _CONFIGS / "given_name_chars.txt"
KEEP_WORDS_PATH = _CONFIGS / "mask_keep.txt"

_ND = r"(?<![0-9A-Za-z])"  # not glued to a longer alphanumeric run (e.g. inside JD2409013388)
_NA = r"(?![0-9A-Za-z])"

# -- digits ----------------------------------------------------------------------------------

# Groups of digits joined by one space or dash, maybe led by + (country code); an ID may end in X.
_DIGIT_RUN_RE = re.compile(_ND + r"\+?\d+(?:[ -]\d+)*(?:[Xx](?![0-9A-Za-z]))?(?![0-9A-Za-z])")
_ID_CUE_RE = re.compile(r"(?:身份证|证件|身份证号码?)[^0-9]{0,6}$")
_CARD_CUE_RE = re.compile(r"(?:卡号|银行卡|信用卡|储蓄卡|借记卡|卡上|这张卡|账户|账号|户号)[^0-9]{0,6}$")
_ORDER_CUE = r"(?:订单|单号|运单|快递单|物流单|工单|编号|order|发票号|流水号|交易号|售后单|服务单|取件码)"
_ORDER_CUE_RE = re.compile(_ORDER_CUE + r"[^0-9]{0,6}$", re.I)
# A personal cue closer to the number than an order cue wins: "订单号和手机号：138...".
_PERSONAL_CUE_RE = re.compile(r"(?:手机|电话|联系方式|座机|身份证|证件|卡号|银行卡|微信|qq|扣扣)[^0-9]{0,6}$", re.I)
_MOBILE_SHAPES = {(11,), (3, 4, 4), (3, 8), (4, 3, 4), (4, 4, 3), (7, 4), (3, 3, 5)}
_ID_SHAPES = {(18,), (6, 8, 4), (6, 4, 4, 4), (4, 4, 4, 4, 2), (6, 12), (3, 3, 4, 4, 4)}

_LANDLINE_RE = re.compile(_ND + r"((?:\(0\d{2,3}\)|0\d{2,3})[ -]?\d{7,8}(?:-\d{1,5})?)" + _NA)
_EMAIL_RE = re.compile(r"([A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})")
_ACCOUNT_RE = re.compile(
    r"(?<![A-Za-z0-9])(wxid_[A-Za-z0-9_-]{4,30})|"  # first, or the wx cue would leave "wx" visible
    r"(?:QQ|qq|Qq|扣扣|抠抠|企鹅号?|(?<![A-Za-z])[Qq]号|微信号?|微心|威信|薇信|卫星号|(?<![A-Za-z])[vV]信"
    r"|vx|VX|Vx|wx|WX|Wx|weixin|wechat|WeChat|支付宝(?:账号)?"
    # a bare v (加v, 我的v是) only where it cannot be part of a model name such as V2309A
    r"|(?<=加)[vV]|(?:(?<=[\u4e00-\u9fff])|^)[vV](?=\s*[:：是]\s*[A-Za-z0-9]|\s+[A-Za-z0-9]))"
    r"(?:号码?|账号|id|ID)?\s*(?:也是|是|为)*\s*[:：]?\s*([A-Za-z0-9][A-Za-z0-9_.@-]{4,29})(?![A-Za-z0-9_.@-])"
)

_ACCOUNT_HINT = re.compile("[QqVvWw扣抠企微威薇卫支]")

# -- addresses -------------------------------------------------------------------------------

_NOT_NAME = "的是在址到送寄我你他她请帮把给收货这那有个了吗呢吧啊"
_H = rf"(?:(?![{_NOT_NAME}])[\u4e00-\u9fff])"  # a Chinese character that can be part of a place name
_NUM = r"[0-9一二三四五六七八九十]"
_UNIT = r"(?:号楼|号院|栋|幢|座|楼|单元|室|号|层|户)"
_ADDRESS_RE = re.compile(
    rf"((?:{_H}{{2,7}}(?:省|自治区))?(?:{_H}{{2,7}}(?:市|州|盟))?(?:{_H}{{1,7}}(?:区|县|旗))?"
    rf"(?:{_H}{{1,8}}(?:镇|乡|街道))?"
    rf"(?:{_H}{{1,12}}(?:路|街|大道|巷|弄|胡同|村){_NUM}+(?:号|组|队|社)(?:院)?"
    rf"|{_H}{{2,10}}(?:小区|花园|公寓|大厦|家园|苑|广场|新村))"
    rf"(?:[-0-9A-Za-z一二三四五六七八九十]+{_UNIT})*)"
)
# Function characters: never the start of a name or the given name read after a cue.
_FUNCTION_CHARS = "很它也都还就才又再不没么着过被把让对从向和与及或但而吗呢吧啊哦嗯时候"
# Characters an estate name does not start with (verbs and adverbs that sit before it).
_NOT_ESTATE = _NOT_NAME + "去住放往就也还找说要想能让被从跟写改"
_HE = rf"(?:(?![{_NOT_ESTATE}])[\u4e00-\u9fff])"
# A building with a unit or room after it is an address with or without a cue, whatever the
# estate is called: 龙湖春森彼岸19栋6单元302室, 万科城四期12栋2单元1801, 金融大厦A座1608.
_BUILDING = r"(?:[0-9A-Za-z]{1,4}|[一二三四五六七八九十]{1,3})(?:号楼|栋|幢|座|号院)"
_ROOM_TAIL = r"(?:[-]?\d[0-9A-Za-z]{0,4}(?:单元|室|层|楼|号|户)?)+"
_BUILDING_RE = re.compile(rf"((?:{_HE}{{2,20}}?(?:{_NUM}+期)?|[A-Za-z]{{2,10}})?{_BUILDING}{_ROOM_TAIL})")
# What may follow a found address and still belong to it (estate, building, unit, room).
_UNITS = rf"(?:-?[0-9A-Za-z]+{_UNIT}|[一二三四五六七八九十]+{_UNIT})"
_ROOM = r"(?:-?\d+(?:-\d+)?)"
# A bare number (a room) only after a building or unit: 时代广场80港币 is not a room.
_TAIL_RE = re.compile(
    rf"(?:{_HE}{{0,14}}?(?:{_BUILDING}|{_NUM}+期){_UNITS}*{_ROOM}?|{_UNITS}+{_ROOM}?"
    rf"|{_HE}{{0,14}}?(?:大厦|广场|中心|大楼|写字楼|公寓|小区|花园){_UNITS}*\d{{3,5}}(?!\d))"
)
_RURAL_RE = re.compile(
    rf"((?:{_H}{{1,6}}(?:县|市|区))?(?:{_H}{{1,6}}(?:镇|乡))?{_H}{{1,5}}村(?:{_NUM}+(?:组|队|社))(?:\d+号)?)"
)
_ADDRESS_CUE_RE = re.compile(
    r"(?:收货地址|送货地址|详细地址|家庭住址|地址|住在|住址|送到|寄到|我家在|家住)"
    r"(?:是|为|:|：|在|改成|改为|换成)?\s*([^\s,，。.!！?？;；<]{4,40})"
)
_NOT_ADDRESS_START = "的过了进宿着得地别其另"
_ADDRESS_CUE_HINT = re.compile("[址住送寄家]")
_ADDRESS_PREFILTER = re.compile(
    r"(?:路|街|大道|巷|弄|胡同|村)[0-9一二三四五六七八九十]|小区|花园|公寓|大厦|家园|苑|广场|新村"
    r"|[0-9A-Za-z](?:号楼|栋|幢|座)"
)
_ADDRESS_END_RE = re.compile(r".*[0-9A-Za-z号室栋幢楼单元层户院座区县市镇村路街道巷弄组]")
# A cue's value is an address only if it names a place unit: 送到别的小区 / 地址预计48 are not.
_ADDRESS_HINT = re.compile(r"路|街|号|栋|幢|室|单元|区|县|镇|乡|村|组|小区|大厦|省|市|弄|巷|楼|座|苑|园")

# -- names -----------------------------------------------------------------------------------

_NAME_CUE_RE = re.compile(
    r"(?:我叫|我的名字(?:是|叫)|本人姓名|姓名(?:是|为|:|：)?|(?:收件|收货|寄件|发件)人(?:是|为|:|：|改成|改为)?"
    r"|联系人(?:是|为|:|：)?|(?:开户|持卡|账户)(?:名|人)(?:是|为|:|：)?|户名(?:是|为|:|：)?|我姓)"
    r"\s*([\u4e00-\u9fff]{1,4})"
)
_NAME_CUE_HINT = re.compile("[叫名人姓]")
_TITLE_HINT = re.compile("先生|女士|小姐")
_HONORIFIC_RE = re.compile(r"([\u4e00-\u9fff]{1,4})(?=先生|女士|小姐)")
_TITLE_AFTER = ("先生", "女士", "小姐")
_ROLE_AFTER = (
    "经理",
    "老师",
    "师傅",
    "主管",
    "总监",
    "医生",
    "律师",
    "工程师",
    "同学",
    "阿姨",
    "叔叔",
    "大爷",
    "大姐",
    "大哥",
    "老板",
    "主任",
    "店长",
    "专员",
)
# What comes before a name in a chat: 我是 / 给 / 找 / 老公 / 快递员 ... (longest first).
_LEFT_CUES = tuple(
    sorted(
        (
            "我是",
            "是",
            "叫",
            "给",
            "找",
            "帮",
            "替",
            "让",
            "和",
            "跟",
            "与",
            "问",
            "请",
            "喊",
            "催",
            "告诉",
            "转告",
            "联系",
            "通知",
            "麻烦",
            "寄给",
            "送给",
            "交给",
            "转给",
            "发给",
            "签收人",
            "取件人",
            "下单人",
            "老公",
            "老婆",
            "爱人",
            "媳妇",
            "妈妈",
            "我妈",
            "爸爸",
            "我爸",
            "儿子",
            "女儿",
            "朋友",
            "同事",
            "家人",
            "老板",
            "快递员",
            "配送员",
            "骑手",
            "售后",
            "客服",
            "经理",
            "工程师",
            "主管",
            "同学",
            "邻居",
            "姐姐",
            "哥哥",
            "弟弟",
            "妹妹",
            "一下",
            "查下",
            "就是",
            "写的是",
            "签收的是",
            "名字",
            "称呼",
            "本人",
            "师傅",
            "小哥",
            "老师",
            "领导",
            "上次是",
            "我朋友",
            "人是",
            "放到",
            "改成",
            "改为",
            "换成",
            "写成",
            "我姐",
            "我哥",
            "我弟",
            "我妹",
            "我爱人",
            "我婆婆",
            "我岳母",
            "我舅舅",
            "我姨",
            "我叔",
            "我表姐",
            "我表哥",
            "我同事",
            "我领导",
            "我室友",
        ),
        key=len,
        reverse=True,
    )
)
# What comes after one: 的订单 / 说 / 在家 / 先生 ...
_RIGHT_CUES = tuple(
    sorted(
        (
            "先生",
            "女士",
            "小姐",
            "老师",
            "经理",
            "师傅",
            "同学",
            "阿姨",
            "叔叔",
            "总",
            "收",
            "签收",
            "说",
            "在家",
            "不在",
            "电话",
            "手机",
            "的",
            "吗",
            "帮",
            "给",
            "让",
            "买",
            "下的",
            "答应",
            "态度",
            "本人",
            "也",
            "和",
            "跟",
            "在",
            "打",
            "来",
            "去",
            "处理",
            "负责",
            "同志",
            "那边",
            "这边",
            "家",
            "签",
            "代收",
            "代签",
            "取件",
            "你好",
            "您好",
        ),
        key=len,
        reverse=True,
    )
)
_CONTACT_NUMBER_RE = re.compile(r"[ ,，:：]{0,2}(?:\+|\d[\d -]{6})")
_CONTACT_PLACEHOLDERS = ("<PHONE>", "<ID>", "<CARD>", "<EMAIL>", "<ACCOUNT>", "<ADDRESS>")
_BOUNDARY = set(" \t\n,，.。!！?？;；:：、/|()（）[]【】\"'“”‘’<>《》~～-—…")
# A dictionary word this frequent is an ordinary word, even if jieba also lists it as a name.
_COMMON_FREQ = 50
_WORD_FREQ = 100  # at or above: a word, whatever jieba's tag
# 张伟明天, 单可以: a name's last character is given up to a following word this common (明天,
# 家门, 可以), not to a rare one (贵在).
_TAIL_FREQ = 300
_LONGER_FREQ = 20
# 全保修: a two-character given name this common as a word (保修) asks for more context.
_SPLIT_FREQ = 1000


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


def _id_date_ok(s: str) -> bool:
    """Birth date part of an ID (positions 7-14) looks like 19xx/20xx-MM-DD."""
    return s[6:8] in ("19", "20") and "01" <= s[10:12] <= "12" and "01" <= s[12:14] <= "31"


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


def load_surnames(path: Path) -> frozenset[str]:
    return _load_words(path)


def _load_words(path: Path) -> frozenset[str]:
    if not path.is_file():
        return frozenset()
    lines = (ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#"))
    return frozenset(w.strip() for ln in lines for w in ln.split() if w.strip())


@lru_cache(maxsize=1)
def _jieba_lexicon() -> tuple[dict[str, int], frozenset[str]]:
    """jieba's dictionary: word frequencies, and the words it tags as person names (nr).
    Read lazily, once per process, only when a name candidate needs a verdict."""
    try:
        import jieba
    except ImportError:  # the masker still works on context alone
        return {}, frozenset()
    freq: dict[str, int] = {}
    names: set[str] = set()
    path = Path(jieba.__file__).with_name("dict.txt")
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and 2 <= len(parts[0]) <= 4 and parts[1].isdigit():
                    freq[parts[0]] = int(parts[1])
                    if len(parts) > 2 and parts[2] == "nr":
                        names.add(parts[0])
    except OSError:
        return {}, frozenset()
    return freq, frozenset(names)


def _is_boundary(c: str) -> bool:
    return c in _BOUNDARY or c.isdigit() or c.isascii()


@dataclass
class Masker:
    """Finds personal data in normalised (NFKC, Simplified) text and replaces it with placeholders."""

    surnames: frozenset[str] = frozenset()
    mask_order_ids: bool = False
    mask_addresses: bool = True
    mask_names: bool = True
    given_chars: frozenset[str] = field(default_factory=lambda: _load_words(GIVEN_CHARS_PATH))
    keep_words: frozenset[str] = field(default_factory=lambda: _load_words(KEEP_WORDS_PATH))
    _detectors: list[Callable[[str], Iterable[Span]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Order matters: earlier detectors win overlaps (an ID's digits are not also a card).
        self._detectors = [self._emails, self._accounts, self._digit_runs, self._landlines]
        if self.mask_addresses:
            self._detectors += [self._addresses]
        if self.mask_names:
            self._detectors += [self._names]
        # One character class finds every place a surname may start (compounds by their first
        # character); a plain class scans far faster than an alternation of 400 surnames.
        firsts = "".join(sorted({s[0] for s in self.surnames}))
        follows = "".join(sorted(set(self.given_chars) | {s[1] for s in self.surnames if len(s) > 1}))
        self._candidate_re = (
            re.compile(f"[{re.escape(firsts)}](?=[{re.escape(follows)}])") if firsts and follows else None
        )
        if self.mask_names:
            _jieba_lexicon()  # load once with the masker, not inside the first transcript
        keep = sorted(self.keep_words, key=len, reverse=True)
        self._keep_re = re.compile("|".join(map(re.escape, keep))) if keep else None

    # -- detection -------------------------------------------------------------------------
    def find(self, text: str) -> list[Span]:
        taken: list[Span] = []
        for detect in self._detectors:
            for s in detect(text):
                if s.end > s.start and not any(s.start < t.end and t.start < s.end for t in taken):
                    taken.append(s)
        return sorted(taken, key=lambda s: s.start)

    def find_original(self, original: str) -> list[Span]:
        """Spans in received-text coordinates, found on its folded (NFKC, Simplified) copy."""
        folded, back = fold_with_map(original)
        return [Span(back[s.start], back[s.end - 1] + 1, s.kind) for s in self.find(folded)]

    def _is_order(self, text: str, start: int) -> bool:
        if self.mask_order_ids:
            return False
        before = text[max(0, start - 12) : start]
        order = _ORDER_CUE_RE.search(before)
        if not order:
            return False
        personal = _PERSONAL_CUE_RE.search(before)
        return not personal or personal.start() < order.start()

    def _emails(self, t: str) -> Iterable[Span]:
        return (Span(*m.span(1), "email") for m in _EMAIL_RE.finditer(t))

    def _accounts(self, t: str) -> Iterable[Span]:
        if not _ACCOUNT_HINT.search(t):
            return
        for m in _ACCOUNT_RE.finditer(t):
            g = 1 if m.group(1) else 2  # a wxid_ on its own, or the value after a cue
            yield Span(*m.span(g), "account")

    def _landlines(self, t: str) -> Iterable[Span]:
        return (Span(*m.span(1), "landline") for m in _LANDLINE_RE.finditer(t) if not self._is_order(t, m.start(1)))

    # -- digit runs ------------------------------------------------------------------------
    def _digit_runs(self, t: str) -> Iterable[Span]:
        for m in _DIGIT_RUN_RE.finditer(t):
            if sum(c.isdigit() for c in m.group()) >= 11:
                yield from self._split_run(t, m.start(), m.group())

    def _split_run(self, t: str, run_start: int, run: str) -> Iterable[Span]:
        """Read a run of digit groups as the numbers its group shapes allow, left to right,
        longest first: 0086 138 1234 5678 is one mobile, 13812345678 2号楼 a mobile and a 2."""
        groups = [(m.start() + run_start, m.end() + run_start) for m in re.finditer(r"\+?\d+[Xx]?", run)]
        i = 0
        while i < len(groups):
            for j in range(len(groups), i, -1):
                start, end = groups[i][0], groups[j - 1][1]
                kind = self._classify(t, start, [t[a:b] for a, b in groups[i:j]])
                if kind:
                    if kind != "order":
                        yield from self._spans_for(t, start, end, kind)
                    i = j
                    break
            else:
                i += 1

    def _spans_for(self, t: str, start: int, end: int, kind: str) -> Iterable[Span]:
        if kind == "phone2":  # two mobiles typed without a separator: two numbers, two masks
            yield Span(start, start + 11, "phone")
            yield Span(start + 11, end, "phone")
        else:
            yield Span(start, end, kind)

    def _classify(self, t: str, start: int, groups: list[str]) -> str | None:
        digits = "".join(groups).lstrip("+")
        kind = self._shape_kind(t, start, groups, digits)
        if kind and self._is_order(t, start):
            return "order"  # whatever it looks like, a number after 订单号 is the order
        return kind

    def _shape_kind(self, t: str, start: int, groups: list[str], digits: str) -> str | None:
        if self._is_mobile(groups):
            return "phone"
        shape = tuple(len(g) for g in groups)
        if len(digits) == 22 and shape == (22,) and _mobile_digits(digits[:11]) and _mobile_digits(digits[11:]):
            return "phone2"
        before = t[max(0, start - 12) : start]
        if len(digits) == 18 and (shape in _ID_SHAPES or len(groups) == 1):
            if (id_checksum_ok(digits) and _id_date_ok(digits)) or _ID_CUE_RE.search(before):
                return "id"
        if len(digits) == 15 and digits.isdigit() and _ID_CUE_RE.search(before):
            return "id"  # first-generation 15-digit ID, only when the customer says it is one
        if 16 <= len(digits) <= 19 and digits.isdigit() and _card_shape(shape):
            if luhn_ok(digits) or _CARD_CUE_RE.search(before):
                return "card"
        return None

    @staticmethod
    def _is_mobile(groups: list[str]) -> bool:
        gs = [g.lstrip("+") for g in groups]
        plus = groups[0].startswith("+")
        if len(gs) > 1 and gs[0] in ("86", "0086"):
            gs = gs[1:]
        elif plus or gs[0].startswith("0086") or (gs[0].startswith("86") and len(gs[0]) == 13):
            head = gs[0][4:] if gs[0].startswith("0086") else gs[0][2:] if gs[0].startswith("86") else None
            if head is None:
                return False
            gs = ([head] if head else []) + gs[1:]
        if not gs:
            return False
        shape = tuple(len(g) for g in gs)
        return shape in _MOBILE_SHAPES and _mobile_digits("".join(gs))

    # -- addresses -------------------------------------------------------------------------
    def _addresses(self, t: str) -> Iterable[Span]:
        spans = list(self._cued_addresses(t))
        # The structural patterns are the costliest regexes here; most texts hold no street,
        # estate or building word at all, so check for one first.
        if _ADDRESS_PREFILTER.search(t):
            spans += [m.span(1) for m in _ADDRESS_RE.finditer(t)]
            spans += [m.span(1) for m in _BUILDING_RE.finditer(t)]
        if "村" in t:
            spans += [m.span(1) for m in _RURAL_RE.finditer(t)]
        for start, end in _merge([(a, self._extend_tail(t, b)) for a, b in spans]):
            yield Span(start, end, "address")

    @staticmethod
    def _cued_addresses(t: str) -> Iterable[tuple[int, int]]:
        if not _ADDRESS_CUE_HINT.search(t):
            return
        for m in _ADDRESS_CUE_RE.finditer(t):
            value = m.group(1)
            if value[0] in _NOT_ADDRESS_START or PLACEHOLDER_RE.fullmatch(value):
                continue  # 家住的房子, 送到了
            # The cue's capture runs to the next punctuation; end it at the last address unit so
            # "送到...1202室吧" keeps its 吧.
            tail = _ADDRESS_END_RE.search(value)
            # 送到堡镇 is a place; 送到楼上 is not (two characters need a town or district unit).
            if tail and (tail.end() >= 3 or value[tail.end() - 1] in "镇乡村县区市") and _ADDRESS_HINT.search(value):
                yield m.start(1), m.start(1) + tail.end()

    @staticmethod
    def _extend_tail(t: str, end: int) -> int:
        # After 重庆市渝北区 the estate, building, unit and room are still the address.
        m = _TAIL_RE.match(t, end)
        return m.end() if m else end

    # -- names -----------------------------------------------------------------------------
    def _names(self, t: str) -> Iterable[Span]:
        # Each pass is gated by a one-character search: most turns have no cue, no title and
        # no surname followed by a given-name character, and masking runs on every turn.
        if _NAME_CUE_HINT.search(t):
            for m in _NAME_CUE_RE.finditer(t):
                span = self._cued_name(t, m.start(1), m.group(1), m.group(0))
                if span:
                    yield span
        keep: list[tuple[int, int]] | None = None
        if _TITLE_HINT.search(t):
            keep = self._keep_spans(t)
            for m in _HONORIFIC_RE.finditer(t):
                span = self._titled_name(m.start(1), m.group(1))
                if span and not any(a <= span.start < b for a, b in keep):  # 蒙牛女士 is a brand's ad
                    yield span
        if self._candidate_re is not None:
            for m in self._candidate_re.finditer(t):
                i = m.start()
                sur = self._surname_len(t, i)
                if not sur:
                    continue
                keep = self._keep_spans(t) if keep is None else keep
                span = self._free_name(t, i, sur, keep)
                if span:
                    yield span

    def _titled_name(self, start: int, cand: str) -> Span | None:
        """张先生, 张建国女士, 诸葛亮亮先生: the leftmost surname whose rest is a given name;
        这位先生 has none, and 谢谢张先生 masks only 张."""
        for strict in (True, False):
            # A title vouches for a name, so a rare given-name character (杨绛, 鲁迅) is read
            # as one when no reading with listed characters exists.
            for i in range(len(cand)):
                sur = self._surname_len(cand, i)
                rest = cand[i + sur :]
                if sur and len(rest) <= 2 and all(self._title_given(c, strict) for c in rest):
                    return Span(start + i, start + len(cand), "name")
        return None

    def _title_given(self, c: str, strict: bool) -> bool:
        return c in self.given_chars if strict else c not in _FUNCTION_CHARS and c not in _NOT_NAME

    def _surname_len(self, t: str, i: int) -> int:
        """2 for a compound surname at i, 1 for a single one, 0 for none."""
        if i + 2 <= len(t) and t[i : i + 2] in self.surnames:
            return 2
        return 1 if i < len(t) and t[i] in self.surnames else 0

    def _cued_name(self, t: str, start: int, cand: str, cue: str) -> Span | None:
        sur = self._surname_len(cand, 0)
        if (
            not sur
            and not cue.startswith("我姓")
            and cand[0] not in _NOT_NAME + _FUNCTION_CHARS
            and self._given_len(t, start + 1)
        ):
            sur = 1  # 我叫连娴英: a surname missing from the list, followed by a given name
        if not sur:
            return None
        if cue.startswith("我姓"):
            return Span(start, start + sur, "name")
        n = self._given_len(t, start + sur)
        # After a cue the customer is telling us a name: a rare given-name character must not
        # leave the name half visible, so take one character even when the list lacks it.
        nxt = t[start + sur : start + sur + 1]
        if n == 0 and nxt and "\u4e00" <= nxt <= "\u9fff" and nxt not in _NOT_NAME and nxt not in _FUNCTION_CHARS:
            n = 1
        freq, names = _jieba_lexicon()
        head = t[start : start + 2]
        # 收货人商品一致, 联系人姓名: the cue is followed by a word, not a name.
        if sur == 1 and freq.get(head, 0) >= _COMMON_FREQ and head not in names and head != t[start : start + n + 2]:
            return None
        return Span(start, start + sur + n, "name")

    def _given_len(self, t: str, pos: int) -> int:
        """How many of the (at most two) characters at pos are a given name."""
        n = 0
        while n < 2 and pos + n < len(t) and t[pos + n] in self.given_chars:
            n += 1
        if n == 2:
            freq, _ = _jieba_lexicon()
            # 张伟明天: 明天 is a word, so the name is 张伟.
            if freq.get(t[pos + 1 : pos + 3], 0) >= _TAIL_FREQ and t[pos : pos + 2] not in freq:
                n = 1
        return n

    def _keep_spans(self, t: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._keep_re.finditer(t)] if self._keep_re else []

    def _free_name(self, t: str, start: int, sur: int, keep: list[tuple[int, int]]) -> Span | None:
        """A name with no cue word: a surname, one or two given-name characters, and a context
        that reads as a person. Context points: a turn or clause edge 1, a cue before (我是, 给,
        老公) 2, 的/说/在家 after 1, a role after (经理) 2, a phone or ID beside it 2, 先生 after 3.
        A name jieba has never seen needs 2 points; one that is also a word or a rare dictionary
        entry needs 3; a common word (马上, 黄金) is never a name here."""
        n = self._given_len(t, start + sur)
        if n == 0:
            return None
        end = start + sur + n
        if any(a <= start < b for a, b in keep):
            return None  # 李宁的鞋, 黄金会员; but 王光明 is a name even though 光明 is a brand
        left = self._left_score(t, start)
        context = left + self._right_score(t, end)
        verdict = self._lexical(t, start, end, sur, glued_ok=left == 0)
        if verdict == "word":
            return None
        need = 2 if verdict == "new" else 3
        return Span(start, end, "name") if context >= need else None

    def _lexical(self, t: str, start: int, end: int, sur: int, glued_ok: bool = True) -> str:
        """'word' (an ordinary word: 黄金, 马上, 提高明显), 'known' (in the dictionary but rare, or
        a given name that is also a word: 葛娟, 全保修), or 'new' (not in the dictionary, like
        most people's names). jieba tags 祝福 and 金刚石 as names too, so frequency decides."""
        freq, names = _jieba_lexicon()
        cand = t[start:end]
        f = freq.get(cand, 0)
        if f >= _WORD_FREQ or (f and len(cand) > 2 and cand not in names):
            return "word"
        # The surname character belongs to the word before it (提高, 每周) ...
        before = t[start - 1 : start + 1] if start > 0 else ""
        if glued_ok and freq.get(before, 0) >= _COMMON_FREQ and (before not in names or freq[before] >= _WORD_FREQ):
            return "word"
        # Doubts a strong context may overrule (黎明辉 13510002000 is a contact line): the last
        # character starts the next word (单可以, 包沐浴露), the candidate is the head of a longer
        # word (袁大头, 夏威夷), or its first two characters are a common word (黄金花, 黎明辉).
        if freq.get(t[end - 1 : end + 1], 0) >= _TAIL_FREQ and end < len(t):
            return "known"
        for k in (1, 2):
            if end + k <= len(t) and freq.get(t[start : end + k], 0) >= _LONGER_FREQ:
                return "known"
        if sur + 1 < len(cand) and freq.get(t[start : start + sur + 1], 0) >= 500:
            return "known"
        given = cand[sur:]
        if len(given) == 2 and freq.get(given, 0) >= _SPLIT_FREQ and given not in names:
            return "known"  # 全保修: a surname before a common word needs more than a bare turn
        # A rare three-character dictionary name (张建国, 段正明) is a person like any other.
        return "known" if f and not (len(cand) > 2 and cand in names) else "new"

    @staticmethod
    def _left_score(t: str, start: int) -> int:
        if start > 0 and t[start - 1] == ">":
            # After a contact placeholder a name may follow; after <NUM> or <NAME> it is noise.
            return 1 if t[max(0, start - 10) : start].endswith(_CONTACT_PLACEHOLDERS) else 0
        if start > 0 and t[start - 1].isdigit():
            return 0  # 9成新, 2包沐浴露: a measure word after a number, not a name
        if start > 1 and t[start - 1] in " ,，:：" and t[start - 2].isdigit():
            return 2  # 138... 张伟: a contact line
        if start == 0 or _is_boundary(t[start - 1]):
            return 1
        before = t[max(0, start - 4) : start]
        return 2 if before.endswith(_LEFT_CUES) else 0

    @staticmethod
    def _right_score(t: str, end: int) -> int:
        if end >= len(t):
            return 1
        after = t[end : end + 3]
        if after.startswith(_TITLE_AFTER):
            return 3
        if after.startswith(_ROLE_AFTER):
            return 2  # 罗建平经理, 孙辉老师
        if t.startswith(_CONTACT_PLACEHOLDERS, end) or _CONTACT_NUMBER_RE.match(t, end):
            return 2  # next to a phone or ID number: a contact line
        if after[0].isdigit():
            return 0  # 高清80: a number that is not a contact
        if after[0] == "<":
            return 0
        if _is_boundary(after[0]):
            return 1
        return 1 if after.startswith(_RIGHT_CUES) else 0

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
        spans = self.find_original(original)
        return apply_spans(original, spans), Counter(s.kind for s in spans)


def _mobile_digits(d: str) -> bool:
    return len(d) == 11 and d.isdigit() and d[0] == "1" and d[1] in "3456789"


def _card_shape(shape: tuple[int, ...]) -> bool:
    """Solid, groups of four with a shorter last group, or 6 + the rest."""
    if len(shape) == 1:
        return True
    if all(g == 4 for g in shape[:-1]) and 1 <= shape[-1] <= 4:
        return True
    return len(shape) == 2 and shape[0] == 6


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def apply_spans(text: str, spans: list[Span]) -> str:
    out, pos = [], 0
    for s in sorted(spans, key=lambda s: s.start):
        if s.start < pos:
            continue
        out.append(text[pos : s.start])
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
    from pipeline.text.normalize import to_simplified

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
