"""Deterministic synthetic customer-service transcripts, with their ground truth.

Why this exists: real chat logs and call recordings cannot leave the business, yet the pipeline
needs (1) a committed sample under `data/sample/` that exercises every input path (encodings,
both ASR shapes, broken records), (2) tests that know the right answer for every conversation
(issue types, outcomes, each PII string that must be masked, each order id that must survive),
and (3) benchmark inputs of 10k-100k conversations. One seeded generator serves all three.

How it stays honest: each conversation is built from its own RNG (run seed + conversation id) as
a list of turns whose text is a list of *segments*: literal text, or a tagged value (a PII kind
or "order"). Format transforms (Traditional Chinese, ASR punctuation loss and noise, full-width
digits) run segment by segment at render time, and the labels record each tagged value exactly
as written, so the ground truth cannot drift from the bytes in the file.

Files written under `out_dir` (names fixed; `chat.jsonl` sorts before `chat_malformed.jsonl`
so an ingest that reads files in sorted order sees the originals before their duplicates):

    chat.jsonl            chat JSONL, UTF-8
    chat_gb18030.jsonl    chat JSONL, GB18030
    chat_big5.jsonl       chat JSONL, Big5, Traditional Chinese
    chat_bom.jsonl        chat JSONL, UTF-8 with BOM
    calls/CALL-*.json     one ASR file-transcription result per call
    calls_asr.csv         ASR sentences, one row each
    chat_malformed.jsonl  deliberately broken records (when malformed=True)
"""

from __future__ import annotations

import bisect
import csv
import functools
import json
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

from pipeline.sample import templates as T

__all__ = ["ALL_FORMATS", "SampleReport", "generate"]

ALL_FORMATS: tuple[str, ...] = ("chat_jsonl", "chat_gbk", "chat_big5", "chat_bom", "asr_json", "asr_csv")
MALFORMED_FILE = "chat_malformed.jsonl"
CALLS_DIR = "calls"
MAX_TURNS = 30
MIN_TURNS = 4
_TZ = timezone(timedelta(hours=8))
_BASE_TIME = datetime(2025, 9, 1, tzinfo=_TZ)

# A segment is literal text or (kind, value); kind is a PII kind or "order".
Seg = str | tuple[str, str]
ORDER = "order"
# Template slot -> PII kind in the labels.
_PII_SLOTS: dict[str, str] = {
    "phone": "phone",
    "landline": "landline",
    "idcard": "id",
    "card": "card",
    "email": "email",
    "address": "address",
    "name": "name",
    "title": "name",
}


@dataclass(frozen=True)
class _FormatSpec:
    key: str
    path: str  # relative to out_dir; "{id}" for one file per conversation
    style: str  # "chat" | "call"
    encoding: str  # label value
    source_format: str  # what the pipeline calls it (Conversation.source_format)
    share: float  # of n
    codec: str = "utf-8"
    bom: bool = False
    traditional: bool = False
    emoji: bool = True


_FORMATS: dict[str, _FormatSpec] = {
    s.key: s
    for s in (
        _FormatSpec("chat_jsonl", "chat.jsonl", "chat", "utf-8", "chat_jsonl", 0.55),
        _FormatSpec("chat_gbk", "chat_gb18030.jsonl", "chat", "gb18030", "chat_jsonl", 0.10, codec="gb18030"),
        # Big5 has no emoji; the text is converted to Traditional.
        _FormatSpec(
            "chat_big5",
            "chat_big5.jsonl",
            "chat",
            "big5",
            "chat_jsonl",
            0.08,
            codec="big5",
            traditional=True,
            emoji=False,
        ),
        _FormatSpec("chat_bom", "chat_bom.jsonl", "chat", "utf-8-sig", "chat_jsonl", 0.05, bom=True),
        _FormatSpec("asr_json", CALLS_DIR + "/{id}.json", "call", "utf-8", "asr_json", 0.12),
        _FormatSpec("asr_csv", "calls_asr.csv", "call", "utf-8", "asr_csv", 0.10),
    )
}
CSV_HEADER: tuple[str, ...] = (
    "conversation_id",
    "channel_id",
    "begin_ms",
    "end_ms",
    "text",
    "started_at",
    "region",
    "product",
    "order_id",
    "agent_id",
)


@dataclass
class SampleReport:
    files: list[Path]  # every file written under out_dir
    n_conversations: int  # well-formed conversations written (chat + call)
    n_malformed: int  # deliberately broken records written
    labels_path: Path | None


# ---------------------------------------------------------------------------------------------
# Small helpers


class _Choice:
    """Weighted choice with precomputed cumulative weights (rng.choices rebuilds them per call)."""

    def __init__(self, pairs: Sequence[tuple[str, float]] | Mapping[str, float]) -> None:
        items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
        self.names = tuple(name for name, _ in items)
        self.cum: list[float] = []
        total = 0.0
        for _, w in items:
            total += w
            self.cum.append(total)

    def __call__(self, rng: random.Random) -> str:
        return self.names[bisect.bisect_right(self.cum, rng.random() * self.cum[-1])]


_ISSUE_CHOICE = _Choice({name: t.weight for name, t in T.ISSUES.items()})
_SECOND_CHOICE = _Choice(T.SECOND_ISSUE_WEIGHTS)
_CHANNEL_CHOICE = _Choice(T.CHAT_CHANNELS)
_KIND_CHOICE = {name: _Choice(t.kinds) for name, t in T.ISSUES.items()}
_EMOTION_CHOICE = {k: _Choice(v) for k, v in T.EMOTION_BY_KIND.items()}
_URGENCY_CHOICE = {k: _Choice(v) for k, v in T.URGENCY_BY_KIND.items()}
_OUTCOME_CHOICE = {k: _Choice(v) for k, v in T.OUTCOME_BY_EMOTION.items()}

_SLOT_RE = re.compile(r"\{(\w+)\}")


@functools.cache
def _parse(template: str) -> tuple[str, ...]:
    """Even items are literal text, odd items slot names."""
    return tuple(_SLOT_RE.split(template))


def _fill(template: str, slots: Mapping[str, Seg]) -> list[Seg]:
    out: list[Seg] = []
    for i, part in enumerate(_parse(template)):
        if i % 2:
            out.append(slots[part])
        elif part:
            out.append(part)
    return out


# (customer phrasing, the handlings that answer it)
_Phrasing = tuple[str, tuple[str, ...]]


@functools.cache
def _problem_pool(issue_type: str, category: str) -> tuple[tuple[_Phrasing, ...], tuple[_Phrasing, ...]]:
    """(phrasings without money at stake, phrasings with it) for an issue and product category."""
    pool = [
        (p, s.handlings)
        for s in T.ISSUES[issue_type].scenarios
        if s.categories is None or category in s.categories
        for p in s.problems
    ]
    return (tuple(x for x in pool if "{amount}" not in x[0]), tuple(x for x in pool if "{amount}" in x[0]))


@functools.cache
def _products_for(issue_type: str) -> tuple[str, ...]:
    cats = T.ISSUES[issue_type].categories
    return tuple(p for p, c in T.PRODUCTS.items() if cats is None or c in cats)


# ---------------------------------------------------------------------------------------------
# Fake personal data (checksums valid so validators cannot tell them from real ones)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_BIRTH_FIRST = date(1960, 1, 1).toordinal()
_BIRTH_LAST = date(2005, 12, 31).toordinal()


def id_check_char(body17: str) -> str:
    """GB 11643 check character for the first 17 digits of a resident ID number."""
    return _ID_CHECK[sum(int(c) * w for c, w in zip(body17, _ID_WEIGHTS)) % 11]


def luhn_check_digit(payload: str) -> str:
    total = 0
    # Counting from the right of the payload, the first digit is the one doubled once the check
    # digit is appended.
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str(-total % 10)


def _digits(rng: random.Random, k: int) -> str:
    return "".join(rng.choices("0123456789", k=k))


def _fake_id(rng: random.Random) -> str:
    birth = date.fromordinal(rng.randint(_BIRTH_FIRST, _BIRTH_LAST))
    body = f"{rng.choice(T.ID_AREA_CODES)}{birth:%Y%m%d}{rng.randint(1, 999):03d}"
    return body + id_check_char(body)


def _fake_card(rng: random.Random, spaced: bool) -> str:
    prefix, length = rng.choice(T.CARD_SHAPES)
    payload = prefix + _digits(rng, length - len(prefix) - 1)
    number = payload + luhn_check_digit(payload)
    return " ".join(number[i : i + 4] for i in range(0, len(number), 4)) if spaced else number


def _fake_phone(rng: random.Random, style: str) -> str:
    head, mid, tail = rng.choice(T.PHONE_PREFIXES), _digits(rng, 4), _digits(rng, 4)
    if style == "call":
        return head + mid + tail
    r = rng.random()
    if r < 0.55:
        return head + mid + tail
    if r < 0.65:
        return f"+86 {head}{mid}{tail}"
    if r < 0.70:
        return f"+86{head}{mid}{tail}"
    if r < 0.85:
        return f"{head} {mid} {tail}"
    return f"{head}-{mid}-{tail}"


def _fake_landline(rng: random.Random, style: str) -> str:
    area, length = rng.choice(T.LANDLINE_AREAS)
    local = str(rng.randint(2, 8)) + _digits(rng, length - 1)
    return area + local if style == "call" else f"{area}-{local}"


def _fake_address(rng: random.Random, region: str) -> str:
    prov, city, district = rng.choice(T.LOCATIONS[region])
    head = f"{prov}{city}{district}"
    shape = rng.randrange(3)
    if shape == 0:
        return (
            f"{head}{rng.choice(T.ROADS)}{rng.randint(1, 299)}号{rng.randint(1, 12)}栋"
            f"{rng.randint(1, 32)}{rng.randint(1, 4):02d}室"
        )
    if shape == 1:
        return (
            f"{head}{rng.choice(T.ROADS)}{rng.randint(1, 299)}号院{rng.randint(1, 9)}号楼"
            f"{rng.randint(1, 4)}单元{rng.randint(1, 25)}{rng.randint(1, 4):02d}"
        )
    return (
        f"{head}{rng.choice(T.COMMUNITIES)}小区{rng.randint(1, 30)}栋{rng.randint(1, 4)}单元"
        f"{rng.randint(1, 30)}{rng.randint(1, 4):02d}"
    )


def _fake_email(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return f"{rng.randint(10000, 9_999_999_999)}@qq.com"
    return (
        f"{rng.choice(T.EMAIL_USERS)}{rng.choice(('', '_', '.'))}{rng.randint(1, 2005)}@{rng.choice(T.EMAIL_DOMAINS)}"
    )


class _Slots(dict):
    """Template slot values; personal data is made up on first use (most turns need none, and
    making it is the costly part of a conversation). One surname serves both name and title."""

    def __init__(self, base: dict[str, Seg], rng: random.Random, style: str, region: str) -> None:
        super().__init__(base)
        self.rng, self.style, self.region = rng, style, region
        self.surname: str | None = None

    def __missing__(self, slot: str) -> Seg:
        value = (_PII_SLOTS[slot], self._make(slot))  # KeyError for an unknown slot
        self[slot] = value
        return value

    def _make(self, slot: str) -> str:
        rng, style = self.rng, self.style
        if slot in ("name", "title"):
            self.surname = self.surname or rng.choice(T.SURNAMES)
            return self.surname + rng.choice(T.GIVEN_NAMES if slot == "name" else ("先生", "女士"))
        if slot == "phone":
            return _fake_phone(rng, style)
        if slot == "landline":
            return _fake_landline(rng, style)
        if slot == "idcard":
            return _fake_id(rng)
        if slot == "card":
            return _fake_card(rng, spaced=style == "chat" and rng.random() < 0.3)
        if slot == "email":
            return _fake_email(rng)
        return _fake_address(rng, self.region)


def _order_id(rng: random.Random, when: datetime) -> str:
    """Order numbers look like numbers but are not PII. Lengths 11 and 15-19 are avoided so an
    order number is never also a valid phone, card or ID shape."""
    r = rng.random()
    if r < 0.5:
        return f"JD{when:%y%m%d}{_digits(rng, 6)}"
    if r < 0.65:
        return "DD" + _digits(rng, 10)
    length = rng.choice((4, 5, 6, 8, 9, 10, 12))
    return str(rng.randint(2, 9)) + _digits(rng, length - 1)


# ---------------------------------------------------------------------------------------------
# Conversation model


@dataclass
class _Turn:
    speaker: str
    segs: list[Seg]
    issue: int = 0  # which issue block the turn belongs to
    starts_issue: bool = False
    drop_group: int = 0  # 0 = required; turns sharing a group id are dropped together
    pause: bool = False  # the agent asked the customer to wait; a longer gap follows


@dataclass
class _Issue:
    issue_type: str
    urgency: str
    request_kind: str
    emotion: str
    outcome: str
    urgency_via: str  # safety | threat | money | repeat | ""

    def label(self, start_turn: int) -> dict[str, Any]:
        return {
            "issue_type": self.issue_type,
            "urgency": self.urgency,
            "request_kind": self.request_kind,
            "emotion": self.emotion,
            "outcome": self.outcome,
            "start_turn": start_turn,
        }


@dataclass
class _Conv:
    conversation_id: str
    style: str
    channel: str
    started_at: datetime | None
    metadata: dict[str, Any]
    turns: list[_Turn]
    issues: list[_Issue]
    flags: list[str]
    rng: random.Random = field(repr=False)  # the builder's RNG, carried on for render-time noise


class _Builder:
    """Builds one conversation's turns (and its issue plan) from its RNG."""

    def __init__(
        self,
        rng: random.Random,
        style: str,
        emoji: bool,
        force_pii: bool,
        issue_type: str,
        product: str,
        region: str,
        when: datetime,
    ) -> None:
        self.rng = rng
        self.style = style
        self.first_issue = issue_type
        self.product, self.category = product, T.PRODUCTS[product]
        self.turns: list[_Turn] = []
        self.flags: list[str] = []
        self.issue = 0  # index of the issue block being spoken
        self.group = 0  # current optional-turn group
        self.order_given = False
        self.handlings: tuple[str, ...] = ()  # answers to the problem phrasing just chosen
        self.emoji = emoji and style == "chat" and rng.random() < 0.10
        self.has_pii = force_pii or rng.random() < 0.40
        self.order = _order_id(rng, when)
        amount = rng.choice((59, 89, 129, 199, 299, 399, 499, 799, 1299, 1599, 2499, 3999, 5999))
        self.agent_no = f"{rng.randint(1, 120):03d}"
        self.slots = _Slots(
            {
                "product": product,
                "days": rng.choice(T.DAYS),
                "amount": str(amount),
                "amount2": str(amount * rng.choice((7, 8, 9)) // 10),
                "order": (ORDER, self.order),
                "promise": rng.choice(T.PROMISES),
                "coupon": rng.choice(T.COUPONS),
                "courier": rng.choice(T.COURIERS),
                "agent_no": self.agent_no,
                "shop": rng.choice(T.SHOPS),
            },
            rng,
            style,
            region,
        )

    # -- primitives

    def say(
        self,
        speaker: str,
        template: str | Sequence[str],
        *,
        optional: bool = False,
        starts: bool = False,
        pause: bool = False,
    ) -> _Turn:
        tpl = template if isinstance(template, str) else self.rng.choice(template)
        return self.say_segs(speaker, _fill(tpl, self.slots), optional=optional, starts=starts, pause=pause)

    def say_segs(
        self, speaker: str, segs: list[Seg], *, optional: bool = False, starts: bool = False, pause: bool = False
    ) -> _Turn:
        turn = _Turn(speaker, segs, self.issue, starts, self.group if optional else 0, pause)
        self.turns.append(turn)
        return turn

    def new_group(self) -> None:
        self.group += 1

    def pick(self, options: Sequence[str]) -> list[Seg]:
        return _fill(self.rng.choice(options), self.slots)

    # -- whole conversation

    def build(self) -> list[_Issue]:
        rng = self.rng
        first = _plan_issue(rng, self.first_issue, self.category, first=True)
        issues = [first]
        # A second issue only after the first is settled, so the two are clearly separate.
        if first.outcome == "resolved" and rng.random() < 0.13:
            second_type = self._second_issue_type(first.issue_type)
            if second_type:
                issues.append(_plan_issue(rng, second_type, self.category, first=False))
        customer_first = self._opening()
        for k, issue in enumerate(issues):
            self.issue = k
            self._issue_block(issue, k, hello=customer_first and k == 0)
            if k + 1 < len(issues):
                self.say("agent", T.ANYTHING_ELSE)
        self._closing(issues[-1])
        return issues

    def _second_issue_type(self, first: str) -> str | None:
        for _ in range(8):
            cand = _SECOND_CHOICE(self.rng)
            if cand != first and self.product in _products_for(cand):
                return cand
        return None

    def _opening(self) -> bool:
        """Returns True when the customer speaks first with no greeting to answer."""
        rng = self.rng
        if self.style == "call":
            self.say("agent", T.CALL_GREETINGS)
            return False
        r = rng.random()
        if r < 0.30:
            self.flags.append("bot")
            self.say("bot", T.BOT_GREETINGS)
            self.say("customer", T.ASK_HUMAN)
            self.say("system", T.SYSTEM_TRANSFER)
            self.say("agent", T.CHAT_GREETINGS)
        elif r < 0.45:
            self.say("customer", T.CUSTOMER_OPENERS)
            self.say("agent", T.AGENT_REPLY_OPENER)
        elif r < 0.75:
            self.say("agent", T.CHAT_GREETINGS)
        else:
            return True
        return False

    def _issue_block(self, issue: _Issue, k: int, hello: bool) -> None:
        rng = self.rng
        tpl = T.ISSUES[issue.issue_type]
        self.say_segs("customer", self._problem(issue, tpl, k, hello), starts=True)
        if self.style == "chat" and rng.random() < 0.025:
            self._flood(issue.emotion)
        upset = issue.emotion == "angry" or issue.request_kind == "投诉"
        if tpl.needs_order and not self.order_given:
            ask = (self.pick(T.EMPATHY) if upset else []) + self.pick(T.ASK_ORDER)
            self.say_segs("agent", ask)
            self.say("customer", T.GIVE_ORDER)
            self.order_given = True
            self.say("agent", T.VERIFY, pause=True)
            self.new_group()
            self.say("agent", T.VERIFIED, optional=True)
        elif upset:
            self.say("agent", T.EMPATHY)
        if self.has_pii and k == 0:
            self._pii_turns()
        self._exchanges(tpl)
        if issue.request_kind == "建议":
            self.say("agent", T.SUGGESTION_ACK)
        self.say("agent", self.handlings, pause=rng.random() < 0.2)
        self._outcome(issue)

    def _problem(self, issue: _Issue, tpl: T.IssueTemplates, k: int, hello: bool) -> list[Seg]:
        rng = self.rng
        segs: list[Seg] = []
        if k > 0:
            segs.append(rng.choice(T.SECOND_ISSUE_INTROS))
        elif hello or rng.random() < 0.3:
            segs.append(rng.choice(T.CUSTOMER_HELLO))
        prefixed = issue.emotion == "angry" and rng.random() < 0.5
        if prefixed:
            segs.append(rng.choice(T.ANGRY_PREFIXES))
        if issue.urgency_via == "repeat":
            segs.append(rng.choice(T.REPEAT_CONTACT))
        plain, money = _problem_pool(issue.issue_type, self.category)
        wants_money = issue.urgency_via == "money"
        phrasing, self.handlings = rng.choice(money if wants_money and money else plain)
        segs += _fill(phrasing, self.slots)
        if wants_money and not money:
            segs += self.pick(T.MONEY_AT_STAKE)
        if issue.urgency_via == "safety":
            segs += self.pick(T.HAZARDS[self.category])
        elif issue.urgency_via == "threat":
            segs.append(rng.choice(T.SEVERE_THREATS))
        if issue.request_kind == "投诉":
            segs.append(rng.choice(T.COMPLAINT_MARKERS))
        elif issue.request_kind == "咨询" and rng.random() < 0.3:
            segs.append(rng.choice(T.CONSULT_MARKERS))
        elif issue.request_kind == "建议":
            segs.append(rng.choice(tpl.suggestions))
        # Every non-neutral label gets a cue in the text, or the label would be unknowable.
        suffixes = T.EMOTION_SUFFIX[issue.emotion]
        if suffixes and not (prefixed and rng.random() < 0.5):
            segs.append(rng.choice(suffixes))
        if self.emoji:
            segs.append(rng.choice(T.EMOJI[issue.emotion]) * rng.randint(1, 3))
        return segs

    def _flood(self, emotion: str) -> None:
        marks = T.FLOODS if self.emoji else ("？", "！")
        mark = self.rng.choice(marks)
        self.flags.append("flood")
        self.say_segs("customer", [mark * self.rng.randint(8, 40)])

    def _pii_turns(self) -> None:
        rng = self.rng
        self.new_group()
        if rng.random() < 0.5:
            self.say("agent", T.AGENT_PII_PROMPTS, optional=True)
        pool = [tpl for tpl, slots in T.CUSTOMER_PII if self.style == "chat" or "email" not in slots]
        for tpl in rng.sample(pool, 2 if rng.random() < 0.3 else 1):
            self.say("customer", tpl)
        if rng.random() < 0.3:
            self.say("agent", [tpl for tpl, _ in T.AGENT_PII])

    def _exchanges(self, tpl: T.IssueTemplates) -> None:
        rng = self.rng
        n = rng.choices((0, 1, 2, 3, 4, 6, 8), weights=(30, 25, 18, 12, 8, 5, 2))[0]
        pool = tpl.exchanges + T.GENERIC_EXCHANGES
        for agent_line, customer_line in rng.sample(pool, min(n, len(pool))):
            self.new_group()
            self.say("agent", agent_line, optional=True)
            self.say("customer", customer_line, optional=True)

    def _outcome(self, issue: _Issue) -> None:
        rng = self.rng
        if issue.outcome == "resolved":
            lines = T.RESOLVED.get(issue.emotion, T.RESOLVED["default"])
            self.say("customer", lines)
            self.new_group()
            self.say("agent", T.AGENT_AFTER_RESOLVED, optional=True)
        elif issue.outcome == "unresolved":
            self.say("customer", T.UNRESOLVED)
            self.say("agent", T.AGENT_AFTER_UNRESOLVED)
        else:
            severe = issue.urgency == "紧急" and rng.random() < 0.6
            self.say("customer", T.ESCALATE_SEVERE if severe else T.ESCALATE_THREATS)
            self.say("agent", T.ESCALATE_AGENT)

    def _closing(self, last: _Issue) -> None:
        rng = self.rng
        if last.outcome == "resolved" and rng.random() < 0.5:
            self.new_group()
            self.say("agent", T.ANYTHING_ELSE, optional=True)
            self.say("customer", T.NOTHING_ELSE, optional=True)
            self.say("agent", T.AGENT_BYE_CALL if self.style == "call" else T.AGENT_BYE_CHAT, optional=True)
        if self.style == "chat" and rng.random() < 0.3:
            self.say("system", T.SYSTEM_END)


def _plan_issue(rng: random.Random, issue_type: str, category: str, first: bool) -> _Issue:
    tpl = T.ISSUES[issue_type]
    kind = _KIND_CHOICE[issue_type](rng)
    emotion = _EMOTION_CHOICE[kind](rng)
    urgency = _URGENCY_CHOICE[kind](rng)
    via = ""
    if urgency == "紧急":
        via = "safety" if tpl.safety and category in T.HAZARDS and rng.random() < 0.7 else "threat"
        # Nobody reports smoke calmly or threatens a lawsuit contentedly.
        if emotion in ("neutral", "satisfied"):
            emotion = "anxious" if via == "safety" else "angry"
    elif urgency == "重要":
        via = "repeat" if first and rng.random() < 0.5 else "money"
    outcome = _OUTCOME_CHOICE[emotion](rng)
    if via == "threat" and outcome == "resolved" and rng.random() < 0.5:
        outcome = "escalated"
    return _Issue(issue_type, urgency, kind, emotion, outcome, via)


def _trim(turns: list[_Turn]) -> list[_Turn]:
    """Drop optional groups (latest first) until the conversation fits MAX_TURNS."""
    groups = sorted({t.drop_group for t in turns if t.drop_group}, reverse=True)
    for g in groups:
        if len(turns) <= MAX_TURNS:
            break
        turns = [t for t in turns if t.drop_group != g]
    return turns


def _build_conversation(cid: str, seed: int, spec: _FormatSpec, attempt: int = 0, force_pii: bool = False) -> _Conv:
    rng = random.Random(f"{seed}:{cid}:{attempt}")
    issue_type = _ISSUE_CHOICE(rng)
    product = rng.choice(_products_for(issue_type))
    region = rng.choice(T.REGIONS)
    when = _BASE_TIME + timedelta(days=rng.randrange(61), seconds=rng.randrange(8 * 3600, 23 * 3600))
    b = _Builder(rng, spec.style, spec.emoji, force_pii, issue_type, product, region, when)
    issues = b.build()
    turns = _trim(b.turns)
    if len(turns) < MIN_TURNS:
        turns.append(_Turn("agent", [rng.choice(T.AGENT_AFTER_RESOLVED)], issue=len(issues) - 1))
    flags = b.flags
    if b.emoji:
        flags.append("emoji")
    if spec.style == "chat":
        r = rng.random()
        if r < 0.10:
            flags.append("fullwidth")
        elif r < 0.20:
            flags.append("halfwidth_punct")
    has_times = spec.style == "call" or rng.random() >= 0.10
    metadata: dict[str, Any] = {
        "region": region,
        "product": product,
        "order_id": b.order if b.order_given else None,
        "agent_id": "A" + b.agent_no,
        "csat": _csat(rng, issues),
    }
    if any(i.urgency_via == "repeat" for i in issues):
        metadata["repeat_contact"] = True
    channel = "call" if spec.style == "call" else _CHANNEL_CHOICE(rng)
    return _Conv(cid, spec.style, channel, when if has_times else None, metadata, turns, issues, flags, rng)


def _csat(rng: random.Random, issues: list[_Issue]) -> int | None:
    if rng.random() < 0.2:
        return None  # customer skipped the survey
    worst = max(("resolved", "unresolved", "escalated").index(i.outcome) for i in issues)
    low, high = ((3, 5), (1, 3), (1, 2))[worst]
    if worst == 0 and any(i.emotion == "satisfied" for i in issues):
        low = 4
    return rng.randint(low, high)


# ---------------------------------------------------------------------------------------------
# Rendering


_FULLWIDTH = {c: c + 0xFEE0 for c in range(ord("0"), ord("9") + 1)}
_FULLWIDTH.update({c: c + 0xFEE0 for c in range(ord("A"), ord("Z") + 1)})
_FULLWIDTH.update({c: c + 0xFEE0 for c in range(ord("a"), ord("z") + 1)})
_HALFWIDTH_PUNCT = str.maketrans({"，": ",", "！": "!", "？": "?", "：": ":", "；": ";", "（": "(", "）": ")"})
# OpenCC's s2t prefers some variant forms that Big5 lacks; these are the Big5 spellings.
_BIG5_VARIANTS = str.maketrans(
    {
        "爲": "為",
        "裏": "裡",
        "着": "著",
        "牀": "床",
        "僞": "偽",
        "啓": "啟",
        "峯": "峰",
        "羣": "群",
        "綫": "線",
        "衆": "眾",
        "麪": "麵",
        "鷄": "雞",
        "儁": "俊",
    }
)
_ASR_PUNCT = re.compile(r"[\s，。！？、；：“”‘’（）《》…—·,.!?;:()\"'\-]+")


@functools.lru_cache(maxsize=1)
def _s2t() -> Any:
    from opencc import OpenCC  # imported lazily: only the Big5 sample needs it

    return OpenCC("s2t")


@functools.lru_cache(maxsize=65536)
def _traditional(text: str) -> str:
    return _s2t().convert(text).translate(_BIG5_VARIANTS)


def _chat_seg(seg: Seg, turn: _Turn, flags: list[str], spec: _FormatSpec) -> tuple[str, str | None]:
    """Rendered text of one segment and, for tagged segments, its kind."""
    kind, text = (None, seg) if isinstance(seg, str) else seg
    if turn.speaker == "customer":
        if "fullwidth" in flags and kind != "email":
            text = text.translate(_FULLWIDTH)
        elif "halfwidth_punct" in flags and kind is None:
            text = text.translate(_HALFWIDTH_PUNCT)
    if spec.traditional:
        text = _traditional(text)
    return text, kind


class _Truth:
    """Collects what the labels must say about tagged segments, as they were written."""

    def __init__(self) -> None:
        self.pii: list[dict[str, Any]] = []
        self.order_ids: list[str] = []

    def add(self, kind: str, written: str, original: str, speaker: str, turn: int) -> None:
        if kind == ORDER:
            if written not in self.order_ids:
                self.order_ids.append(written)
        else:
            self.pii.append(
                {"kind": kind, "value": written, "value_normalized": original, "speaker": speaker, "turn": turn}
            )


def _render_chat_text(turn: _Turn, index: int, conv: _Conv, spec: _FormatSpec, truth: _Truth) -> str:
    parts: list[str] = []
    for seg in turn.segs:
        text, kind = _chat_seg(seg, turn, conv.flags, spec)
        if kind is not None:
            truth.add(kind, text, seg[1], turn.speaker, index)
        parts.append(text)
    return "".join(parts)


def _chat_offsets(conv: _Conv) -> list[float]:
    """Seconds from the start for each turn: bots answer at once, people take a while."""
    rng, t, out = conv.rng, 0.0, []
    for i, turn in enumerate(conv.turns):
        if i:
            if turn.speaker in ("bot", "system"):
                t += rng.randint(1, 3)
            elif turn.speaker == "agent":
                t += rng.randint(8, 90)
            else:
                t += rng.randint(5, 120)
            if conv.turns[i - 1].pause:
                t += rng.randint(30, 240)
        out.append(t)
    return out


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds")


def _render_chat(conv: _Conv, spec: _FormatSpec) -> tuple[dict[str, Any], _Truth]:
    truth = _Truth()
    turns: list[dict[str, Any]] = []
    started = conv.started_at
    offsets = _chat_offsets(conv) if started else []
    for i, turn in enumerate(conv.turns):
        row: dict[str, Any] = {"speaker": turn.speaker, "text": _render_chat_text(turn, i, conv, spec, truth)}
        if started:
            row["ts"] = _iso(started + timedelta(seconds=offsets[i]))
        turns.append(row)
    record = {
        "conversation_id": conv.conversation_id,
        "channel": conv.channel,
        "started_at": _iso(conv.started_at) if conv.started_at else None,
        "turns": turns,
        "metadata": _traditional_values(conv.metadata) if spec.traditional else conv.metadata,
    }
    return record, truth


def _traditional_values(meta: dict[str, Any]) -> dict[str, Any]:
    """A Big5 export is Traditional throughout, metadata included."""
    return {k: _traditional(v) if isinstance(v, str) else v for k, v in meta.items()}


def _add_homophones(conv: _Conv) -> list[dict[str, Any]]:
    """Swap a word or two for the sound-alike ASR would hear; only literal text, never PII."""
    rng = conv.rng
    if rng.random() >= 0.4:
        return []
    used: list[dict[str, Any]] = []
    for right, wrong in rng.sample(T.HOMOPHONES, len(T.HOMOPHONES)):
        spots = [
            (ti, si)
            for ti, turn in enumerate(conv.turns)
            for si, seg in enumerate(turn.segs)
            if isinstance(seg, str) and right in seg
        ]
        if not spots:
            continue
        ti, si = rng.choice(spots)
        segs = conv.turns[ti].segs
        segs[si] = segs[si].replace(right, wrong, 1)  # type: ignore[union-attr]
        used.append({"heard": wrong, "meant": right, "turn": ti})
        if len(used) == 2 or rng.random() < 0.7:
            break
    return used


def _asr_literal(text: str, rng: random.Random) -> str:
    """ASR output has no punctuation; people fill pauses where the commas were."""
    pieces = _ASR_PUNCT.split(text)
    out = pieces[0]
    for piece in pieces[1:]:
        if out and piece and rng.random() < 0.12:
            out += rng.choice(T.ASR_FILLERS)
        out += piece
    return out


def _render_asr_text(turn: _Turn, index: int, rng: random.Random, truth: _Truth) -> str:
    parts: list[str] = []
    if rng.random() < (0.3 if turn.speaker == "customer" else 0.1):
        parts.append(rng.choice(T.ASR_FILLERS))
    for seg in turn.segs:
        if isinstance(seg, str):
            parts.append(_asr_literal(seg, rng))
        else:
            truth.add(seg[0], seg[1], seg[1], turn.speaker, index)
            parts.append(seg[1])
    return "".join(parts) or "嗯"


@dataclass
class _Sentence:
    begin: int
    end: int
    text: str
    channel: int
    rate: int
    emotion: float


_EMOTION_VALUE = {"angry": (6.5, 9.0), "anxious": (5.5, 7.5), "neutral": (4.5, 6.0), "satisfied": (5.0, 6.5)}


def _render_call(conv: _Conv, agent_channel: int) -> tuple[list[_Sentence], _Truth, list[dict[str, Any]]]:
    rng = conv.rng
    homophones = _add_homophones(conv)
    truth = _Truth()
    out: list[_Sentence] = []
    t = rng.randint(200, 1500)
    for i, turn in enumerate(conv.turns):
        text = _render_asr_text(turn, i, rng, truth)
        rate = rng.randint(160, 300)
        duration = max(600, len(text) * 60000 // rate)
        is_agent = turn.speaker == "agent"
        low, high = (4.8, 6.0) if is_agent else _EMOTION_VALUE[conv.issues[turn.issue].emotion]
        out.append(
            _Sentence(
                t,
                t + duration,
                text,
                agent_channel if is_agent else 1 - agent_channel,
                rate,
                round(rng.uniform(low, high), 1),
            )
        )
        t += duration + rng.randint(200, 1500) + (rng.randint(5000, 30000) if turn.pause else 0)
    return out, truth, homophones


# ---------------------------------------------------------------------------------------------
# Writing


def _allocate(n: int, formats: Sequence[str]) -> dict[str, int]:
    """Split n across formats by their shares (largest remainder, ties in canonical order)."""
    chosen = [k for k in ALL_FORMATS if k in formats]
    total = sum(_FORMATS[k].share for k in chosen)
    exact = {k: n * _FORMATS[k].share / total for k in chosen}
    counts = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(chosen, key=lambda k: (-(exact[k] - counts[k]), ALL_FORMATS.index(k)))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _label(
    conv: _Conv,
    spec: _FormatSpec,
    file: str,
    line: int | None,
    truth: _Truth,
    agent_channel: int | None,
    homophones: list[dict[str, Any]],
) -> dict[str, Any]:
    starts = [i for i, t in enumerate(conv.turns) if t.starts_issue]
    return {
        "conversation_id": conv.conversation_id,
        "file": file,
        "line": line,
        "format": spec.source_format,
        "variant": spec.key,
        "encoding": spec.encoding,
        "channel": conv.channel,
        "started_at": _iso(conv.started_at) if conv.started_at else None,
        "has_timestamps": conv.started_at is not None,
        "n_turns": len(conv.turns),
        "issues": [issue.label(start) for issue, start in zip(conv.issues, starts)],
        "pii": truth.pii,
        "order_ids": truth.order_ids,
        "agent_channel": agent_channel,
        "homophones": homophones,
        "flags": conv.flags,
    }


class _ChatFile:
    def __init__(self, path: Path, spec: _FormatSpec, stack: ExitStack) -> None:
        self.spec = spec
        self.fh: IO[bytes] = stack.enter_context(open(path, "wb"))
        if spec.bom:
            self.fh.write(b"\xef\xbb\xbf")
        self.line = 0

    def write(self, text: str) -> int:
        """Writes one record line; raises UnicodeEncodeError (writing nothing) if it cannot be encoded."""
        data = text.encode(self.spec.codec) + b"\n"
        self.fh.write(data)
        self.line += 1
        return self.line


class _Generator:
    def __init__(self, out_dir: Path, seed: int, labels: IO[str] | None, stack: ExitStack) -> None:
        self.out_dir = out_dir
        self.seed = seed
        self.labels = labels
        self.stack = stack
        self.files: list[Path] = []
        self.chat_seq = 0
        self.call_seq = 0
        self.first_chat_lines: list[tuple[str, str]] = []  # (id, line) of the first chat records

    def _emit_label(self, obj: dict[str, Any]) -> None:
        if self.labels is not None:
            self.labels.write(_dumps(obj) + "\n")

    def _open(self, rel: str) -> Path:
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(path)
        return path

    def chat(self, spec: _FormatSpec, count: int) -> None:
        out = _ChatFile(self._open(spec.path), spec, self.stack)
        for _ in range(count):
            self.chat_seq += 1
            cid = f"CHAT-{self.chat_seq:06d}"
            for attempt in range(50):
                conv = _build_conversation(cid, self.seed, spec, attempt)
                record, truth = _render_chat(conv, spec)
                line_text = _dumps(record)
                try:
                    line = out.write(line_text)
                    break
                except UnicodeEncodeError:
                    continue  # a character Big5 lacks: build this conversation again
            else:
                raise RuntimeError(f"could not encode {cid} as {spec.codec}")
            if len(self.first_chat_lines) < 2:
                self.first_chat_lines.append((cid, line_text))
            self._emit_label(_label(conv, spec, spec.path, line, truth, None, []))

    def asr_json(self, spec: _FormatSpec, count: int) -> None:
        for _ in range(count):
            conv, sentences, truth, homophones, agent_channel = self._call(spec)
            rel = spec.path.format(id=conv.conversation_id)
            doc = {
                "TaskId": f"{conv.rng.getrandbits(128):032x}",
                "conversation_id": conv.conversation_id,
                "started_at": _iso(conv.started_at) if conv.started_at else None,
                "metadata": conv.metadata,
                "Result": {
                    "Sentences": [
                        {
                            "BeginTime": s.begin,
                            "EndTime": s.end,
                            "Text": s.text,
                            "ChannelId": s.channel,
                            "SpeechRate": s.rate,
                            "EmotionValue": s.emotion,
                        }
                        for s in sentences
                    ]
                },
            }
            self._open(rel).write_text(_dumps(doc) + "\n", encoding="utf-8")
            self._emit_label(_label(conv, spec, rel, None, truth, agent_channel, homophones))

    def asr_csv(self, spec: _FormatSpec, count: int) -> None:
        fh = self.stack.enter_context(open(self._open(spec.path), "w", encoding="utf-8", newline=""))
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        line = 1
        for _ in range(count):
            conv, sentences, truth, homophones, agent_channel = self._call(spec)
            meta = conv.metadata
            started = _iso(conv.started_at) if conv.started_at else ""
            first_line = line + 1
            for s in sentences:
                writer.writerow(
                    (
                        conv.conversation_id,
                        s.channel,
                        s.begin,
                        s.end,
                        s.text,
                        started,
                        meta["region"],
                        meta["product"],
                        meta["order_id"] or "",
                        meta["agent_id"],
                    )
                )
                line += 1
            self._emit_label(_label(conv, spec, spec.path, first_line, truth, agent_channel, homophones))

    def _call(self, spec: _FormatSpec) -> tuple[_Conv, list[_Sentence], _Truth, list[dict[str, Any]], int]:
        self.call_seq += 1
        conv = _build_conversation(f"CALL-{self.call_seq:06d}", self.seed, spec)
        agent_channel = 0 if conv.rng.random() < 0.6 else 1
        sentences, truth, homophones = _render_call(conv, agent_channel)
        return conv, sentences, truth, homophones, agent_channel

    def malformed(self) -> int:
        path = self._open(MALFORMED_FILE)
        records = list(_malformed_records(self.seed, self.first_chat_lines))
        with open(path, "wb") as fh:
            for line_no, (data, reason, cid, pii) in enumerate(records, start=1):
                fh.write(data + b"\n")
                self._emit_label(
                    {
                        "malformed": True,
                        "file": MALFORMED_FILE,
                        "line": line_no,
                        "expect_reason": reason,
                        "conversation_id": cid,
                        "pii": pii,
                    }
                )
        return len(records)


def _malformed_records(
    seed: int, good: list[tuple[str, str]]
) -> Iterator[tuple[bytes, str, str | None, list[dict[str, Any]]]]:
    """(bytes, expect_reason, conversation_id, pii present in the bytes) for each broken record."""
    spec = _FORMATS["chat_jsonl"]

    def conv(k: int) -> tuple[dict[str, Any], _Truth]:
        return _render_chat(_build_conversation(f"CHAT-M{k:05d}", seed, spec, force_pii=True), spec)

    def pii_in(text: str, truth: _Truth) -> list[dict[str, Any]]:
        return [p for p in truth.pii if p["value"] in text]

    rec, truth = conv(1)
    cut = _dumps(rec)
    cut = cut[: len(cut) * 11 // 20]
    yield cut.encode(), "malformed_json", rec["conversation_id"], pii_in(cut, truth)

    rec, truth = conv(2)
    text = _dumps([rec])
    yield text.encode(), "not_an_object", rec["conversation_id"], pii_in(text, truth)

    rec, _ = conv(3)
    rec["turns"] = []
    yield _dumps(rec).encode(), "no_turns", rec["conversation_id"], []

    rec, _ = conv(4)
    for turn in rec["turns"]:
        turn["text"] = ""
    yield _dumps(rec).encode(), "empty_text", rec["conversation_id"], []

    rec, truth = conv(5)
    next(t for t in rec["turns"] if t["speaker"] == "agent")["speaker"] = "manager"
    text = _dumps(rec)
    yield text.encode(), "unknown_speaker", rec["conversation_id"], pii_in(text, truth)

    rec, truth = conv(6)
    marker = "\u2063BAD\u2063"  # placed in the first turn, which never carries PII
    first = rec["turns"][0]
    first["text"] = first["text"][: len(first["text"]) // 2] + marker + first["text"][len(first["text"]) // 2 :]
    text = _dumps(rec)
    yield (
        text.encode().replace(marker.encode(), b"\xff\xfe\xc3"),
        "undecodable_bytes",
        rec["conversation_id"],
        pii_in(text, truth),
    )

    rec, truth = conv(7)
    del rec["conversation_id"]
    text = _dumps(rec)
    yield text.encode(), "missing_id", None, pii_in(text, truth)

    if good:
        dup_id, dup_line = good[0]
        yield dup_line.encode(), "duplicate", dup_id, []
        target_id, target_line = good[-1]
        for k in range(8, 20):
            rec, truth = conv(k)
            rec["conversation_id"] = target_id
            text = _dumps(rec)
            if text != target_line:
                break
        yield text.encode(), "conflicting_id", target_id, pii_in(text, truth)


def _owned_outputs(out_dir: Path) -> list[Path]:
    """Files a previous run of this generator may have left (only those are ever deleted)."""
    fixed = [out_dir / s.path for s in _FORMATS.values() if "{id}" not in s.path] + [out_dir / MALFORMED_FILE]
    calls = sorted((out_dir / CALLS_DIR).glob("CALL-*.json")) if (out_dir / CALLS_DIR).is_dir() else []
    return [p for p in fixed if p.exists()] + calls


def generate(
    out_dir: Path,
    n: int = 150,
    seed: int = 7,
    labels_out: Path | None = None,
    malformed: bool = True,
    formats: tuple[str, ...] = ALL_FORMATS,
) -> SampleReport:
    """Write n well-formed conversations (plus broken ones) under out_dir; labels go to labels_out.

    Same arguments give byte-identical files. Files this generator wrote earlier under out_dir are
    removed first, so a smaller run never leaves stale calls behind.
    """
    out_dir = Path(out_dir)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unknown = [f for f in formats if f not in _FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; choose from {list(ALL_FORMATS)}")
    if n and not formats:
        raise ValueError("formats is empty")
    if labels_out is not None:
        labels_out = Path(labels_out)
        if labels_out.resolve().is_relative_to(out_dir.resolve()):
            raise ValueError(f"labels_out {labels_out} is inside out_dir {out_dir}: the pipeline would ingest it")

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in _owned_outputs(out_dir):
        stale.unlink()
    counts = _allocate(n, formats) if n else {}
    with ExitStack() as stack:
        labels = None
        if labels_out is not None:
            labels_out.parent.mkdir(parents=True, exist_ok=True)
            labels = stack.enter_context(open(labels_out, "w", encoding="utf-8", newline="\n"))
        gen = _Generator(out_dir, seed, labels, stack)
        for key in ALL_FORMATS:
            count = counts.get(key, 0)
            if not count:
                continue
            spec = _FORMATS[key]
            if spec.style == "chat":
                gen.chat(spec, count)
            elif key == "asr_json":
                gen.asr_json(spec, count)
            else:
                gen.asr_csv(spec, count)
        n_bad = gen.malformed() if malformed else 0
    return SampleReport(
        files=sorted(gen.files), n_conversations=sum(counts.values()), n_malformed=n_bad, labels_path=labels_out
    )
