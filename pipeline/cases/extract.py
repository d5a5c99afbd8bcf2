"""Turn one conversation (normalised and masked) into case records.

A case is what an analyst reads: the customer's problem in a sentence or two, what the agent did,
how it ended (with the words that show it) and the timings (emotion is the emotion step's,
`pipeline.analysis.emotion`). Extraction is
extractive and rule-based on purpose: it must work on day one on any deployment, show its
evidence, and never invent text that was not said. Cue lists live in configs/case_lexicon.yaml.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

from pydantic import model_validator

from pipeline.config import Config
from pipeline.resources import CueResource, load_resource
from pipeline.schema import Conversation, Turn
from pipeline.text.mask import PLACEHOLDER_RE

_SENT_SPLIT_RE = re.compile(r"(?<=[,.!?;:，。！？；：~])\s*|\s+")
_CLAUSE_STRIP = " ,.!?;:，。！？；：~、…-"
_CONTENT_RE = re.compile(r"[A-Za-z\u3400-\u9fff]")
_GAP_RE = re.compile(r"\s+")
# Masked spans: ours (<PHONE>) and those of corpora masked upstream that kept their own form ([数字]).
_TOKEN_RE = re.compile(PLACEHOLDER_RE.pattern + r"|\[[\u3400-\u9fff]{1,8}\]")
_URL_RE = re.compile(r"(?:https?://|www\.|[A-Za-z0-9-]+\.(?:com|cn|net)/)[!-~]*")
# Beyond this length a turn is not aligned with its received text (quadratic matcher); its
# punctuation alone splits it.
_ALIGN_MAX_CHARS = 2000
# An agent turn with more than PASTE_CLAUSES clauses counts as pasted text; its first PASTE_KEEP
# stand for it in `handling` (chosen on half the CSDS dev chats, confirmed on the other half).
PASTE_CLAUSES = 4
PASTE_KEEP = 2
# A customer clause sharing this share of its characters (in order) with an earlier one is a
# repeat ("退货运费还要我出" after "退货的运费也要我出").
NEAR_REPEAT = 0.8
_NOT_INITIAL = "的了么们样着过吗呢吧"
# Words that point into the chat itself: the speakers' words for themselves and each other (我,
# 你们的, 您, 咱们) and "this one / over here" (这个, 那边). A case is told in the third person to a
# reader who does not see the chat, so they name nothing for that reader (the human summaries
# almost never keep them). Dropped wherever they stand, with the 的 that makes a pronoun possessive
# and the 为 of the service formula 为您 ("已为您申请" -> "已申请", not 因为, 认为...); 你好 / 您好
# are left to the greeting rules, 自我 is not a pronoun, and 这个月 is a date.
_DEIXIS_RE = re.compile(
    r"(?<!自)(?:(?<![因认作成以行])为)?(?:[我你您]们?|咱们)(?!好)的?"
    r"|[这那](?:个(?![月周星礼年天时])|边)"
)
_QUESTION_MARK = "？"
# Endings that make a clause a question ("明天到对吧"); a bare 吧 may only soften a request. A
# customer clause with a question word asks too (`_is_question`); an agent's 呢 only softens.
_QUESTION_TAGS = ("吗", "对吧", "是吧", "对不对", "是不是")
# (turn index, clause) pairs, in spoken order.
_Clauses = list[tuple[int, str]]
# A-not-A questions (能不能, 可不可以): they ask, they do not refuse.
_ASKING_RE = re.compile(r"([\u4e00-\u9fff])不\1")
# A "no" may stand in the agent's last REFUSAL_TURNS concrete turns: a suggestion often follows it
# ("无法恢复" then "建议您重新下单"). Chosen on half A of the labelled JD chats (1, 2, 3 turns:
# unresolved F1 0.50, 0.63, 0.59), confirmed on half B.
REFUSAL_TURNS = 2


class OutcomeLexicon(CueResource):
    # The agent hands the matter on (another team, a specialist, a work order, a call-back).
    escalated: list[str]
    # The customer accepts what was done or said.
    resolved_customer: list[str]
    # The customer says the matter is settled: a hand-over before it did not leave it open.
    settled: list[str]
    # The agent reports a concrete action as done or arranged.
    resolved_agent: list[str]
    # The customer objects or gives up.
    unresolved: list[str]
    # The agent says the request cannot be done or answered.
    refused: list[str]
    # Grudging acceptance: after a refusal it means the customer did not get what they asked.
    resigned: list[str]


class CaseLexicon(CueResource):
    resource_kind: ClassVar[str] = "case lexicon"
    resource_reference: ClassVar[str] = "configs/case_lexicon.yaml in the repo"

    greetings: list[str]
    acknowledgements: list[str]
    # No longer read (problem keeps every clause that states something); accepted so that
    # lexicons written for earlier versions still load.
    problem_cues: list[str] = []
    customer_noise: list[str]
    clause_openers: list[str]
    clause_particles: list[str]
    agent_boilerplate: list[str]
    agent_actions: list[str]
    separate_issue_cues: list[str]
    outcome: OutcomeLexicon

    @model_validator(mode="before")
    @classmethod
    def _no_emotion_block(cls, raw: object) -> object:
        if isinstance(raw, dict) and "emotion" in raw:
            raise ValueError(
                "the `emotion` block is no longer read; emotion cues, threats included, live in the "
                "emotion lexicon (emotion.lexicon in the config, configs/emotion.yaml). Delete the block"
            )
        return raw


def load_lexicon(cfg: Config) -> CaseLexicon:
    return load_resource(cfg, cfg.cases.lexicon, CaseLexicon)


def _hits(text: str, words: Iterable[str]) -> list[str]:
    return [w for w in words if w and w in text]


def sentences(text: str) -> list[str]:
    """Clauses of a text, split at punctuation and spaces. ASR text has neither, so an unpunctuated
    call turn stays one clause. Links are left out: their dots would split them into fragments,
    and no reader of a case needs them."""
    text = _URL_RE.sub(" ", text)
    return [c for c in (s.strip(_CLAUSE_STRIP) for s in _SENT_SPLIT_RE.split(text) if s) if c]


def turn_clauses(turn: Turn) -> list[str]:
    """Clauses of a turn. Chat writers separate clauses with spaces as often as with commas, and
    normalisation joins Chinese across spaces (for segmentation), so the spaces of the received
    text are mapped back onto the normalised one as clause boundaries."""
    return list(_clauses(turn.text, turn.original))


@lru_cache(maxsize=8192)
def _clauses(text: str, original: str | None) -> tuple[str, ...]:
    # Cached: problem, handling, outcome and the issue split all read the same turns.
    if not original or original == text or not _GAP_RE.search(original.strip()) or len(text) > _ALIGN_MAX_CHARS:
        return tuple(sentences(text))
    pieces, prev = [], 0
    for cut in _gap_positions(text, original):
        pieces.append(text[prev:cut])
        prev = cut
    pieces.append(text[prev:])
    return tuple(c for p in pieces for c in sentences(p))


def _gap_positions(text: str, original: str) -> list[int]:
    """Positions in `text` where `original` had a space that `text` lost."""
    orig = original.strip()
    walked = _walk_gaps(text, orig)
    return walked if walked is not None else _matched_gaps(text, orig)


def _walk_gaps(text: str, orig: str) -> list[int] | None:
    """The usual case in one pass: the two differ only by dropped spaces and character-for-character
    folding (width, Traditional -> Simplified). None when they differ otherwise."""
    cuts: list[int] = []
    i, gap = 0, False
    for ch in orig:
        if ch.isspace():
            gap = True
            continue
        if gap and i < len(text) and text[i] == " ":
            i += 1  # a space normalisation kept: the splitter sees it
        elif gap and i > 0:
            cuts.append(i)
        gap = False
        if i >= len(text) or not _same_char(ch, text[i]):
            return None
        i += 1
    return cuts if i == len(text) else None


def _same_char(received: str, normalised: str) -> bool:
    if received == normalised:
        return True
    folded = unicodedata.normalize("NFKC", received)
    return folded == normalised or ("\u3400" <= received <= "\u9fff" and "\u3400" <= normalised <= "\u9fff")


def _matched_gaps(text: str, orig: str) -> list[int]:
    # Emoji dropped, repeats collapsed, placeholders of other lengths: align by matching blocks.
    from difflib import SequenceMatcher

    to_text: dict[int, int] = {}
    for blk in SequenceMatcher(None, orig, text, autojunk=False).get_matching_blocks():
        for k in range(blk.size):
            to_text[blk.a + k] = blk.b + k
    cuts = set()
    for m in _GAP_RE.finditer(orig):
        before = to_text.get(m.start() - 1)
        if before is not None and before + 1 < len(text) and not text[before + 1].isspace():
            cuts.add(before + 1)
    return sorted(cuts)


@dataclass(frozen=True)
class CaseExtractor:
    """`extract(conversation)` -> case dicts (one per separate issue). Pure given the lexicon."""

    lex: CaseLexicon
    problem_max_chars: int = 160
    handling_max_chars: int = 200
    split_separate_issues: bool = True
    timezone: str = "Asia/Shanghai"

    @classmethod
    def from_config(cls, cfg: Config) -> CaseExtractor:
        c = cfg.cases
        return cls(load_lexicon(cfg), c.problem_max_chars, c.handling_max_chars, c.split_separate_issues, c.timezone)

    # -- text pieces ----------------------------------------------------------------------------
    def _substance(self, sentence: str) -> str:
        """The sentence without greetings and acknowledgements; empty if nothing else is there."""
        s = _alternation(tuple(self.lex.greetings + self.lex.acknowledgements)).sub("", _TOKEN_RE.sub("", sentence))
        return s if len(_CONTENT_RE.findall(s)) >= 2 else ""

    def trim(self, clause: str) -> str:
        """The clause without what opens it as address or filler (亲, 您好, 就是, 那) and the
        particles that close it (哦, 呢, 哈): a summary keeps neither. Only the ends are cut, so the
        result is still words that were said, in their order."""
        words = tuple(self.lex.greetings + self.lex.clause_openers)
        opener, fillers = _alternation(words), set(words) | set(self.lex.clause_particles)
        particles = frozenset(self.lex.clause_particles)
        longest = max(map(len, particles), default=0)
        if clause in fillers:
            return ""
        prev = None
        while prev != clause:
            prev = clause
            m = opener.match(clause)
            # "我说的是" must not become "的是": only cut before a word that can start a clause.
            if m and len(clause) > m.end() + 1 and clause[m.end()] not in _NOT_INITIAL:
                clause = clause[m.end() :].lstrip(_CLAUSE_STRIP)
            for n in range(min(longest, len(clause) - 2), 0, -1):
                if clause[-n:] in particles:
                    clause = clause[:-n].rstrip(_CLAUSE_STRIP)
                    break
        return "" if clause in fillers else clause

    def _is_noise(self, clause: str) -> bool:
        """A customer clause that states nothing: a greeting, thanks, "在吗", or an order paste
        whose words are the form's labels around placeholders."""
        noise = _alternation(tuple(self.lex.greetings + self.lex.acknowledgements + self.lex.customer_noise))
        return len(_CONTENT_RE.findall(noise.sub("", _TOKEN_RE.sub("", clause)))) < 2

    def _told(self, clause: str) -> tuple[str, bool]:
        """(the clause as a case tells it, whether it asks something): without the words that
        point into the chat (我, 您, 这个), trimmed. Its question particle (吗, 对吧) is trimmed like
        any other, a summary keeps neither; the question mark `_marked` adds keeps it a question."""
        return self.trim(_DEIXIS_RE.sub("", clause)), clause.endswith(_QUESTION_TAGS)

    def customer_clauses(self, turns: list[Turn]) -> list[str]:
        """What the customer said that states the matter, in spoken order, repeats left out;
        a question ends with a question mark."""
        out: list[tuple[str, bool]] = []
        for t in turns:
            if t.speaker == "customer":
                out += [
                    (told, asks or _is_question(c))
                    for c in turn_clauses(t)
                    if not self._is_noise(c)
                    for told, asks in [self._told(c)]
                ]
        return _marked(_dedup([c for c, _ in out if c], near=NEAR_REPEAT), out)

    def problem(self, turns: list[Turn]) -> str:
        """The customer's statement of the matter: what they asked, complained of or requested,
        in spoken order, without greetings, pasted order cards, thanks, repeats or the words that
        point into the chat (我, 你们, 这个), cut at problem_max_chars. Every clause is kept that
        states something: the human summaries this was measured against keep the customer's
        context too, and choosing only the "cued" clauses lost more than it gained."""
        return _join(self.customer_clauses(turns), self.problem_max_chars)

    def _is_ritual(self, clause: str) -> bool:
        return self._ritual_only(clause) or not self._substance(clause)

    def _ritual_only(self, clause: str) -> bool:
        """A clause with a ritual phrase is ritual, unless what remains around the phrases still
        reports an action or a hand-over: an unpunctuated call turn is one clause, and
        "非常抱歉已为您升级给专员处理" must not be dropped for its 抱歉."""
        ritual = _alternation(tuple(self.lex.agent_boilerplate))
        if not ritual.search(clause):
            return False
        rest = ritual.sub(" ", clause)
        o = self.lex.outcome
        return not _alternation(tuple(o.escalated + o.resolved_agent + o.refused)).search(rest)

    def _is_reply(self, clause: str) -> bool:
        """An agent clause that says something to the customer's matter. Unlike in `handling`, a
        bare 是的 / 可以的 counts: it answers a yes-no question."""
        if self._ritual_only(clause):
            return False
        return bool(_CONTENT_RE.search(_alternation(tuple(self.lex.greetings)).sub("", _TOKEN_RE.sub("", clause))))

    def agent_clauses(self, turns: list[Turn]) -> list[str]:
        """What the agent said beyond service ritual, in spoken order, repeats left out."""
        out: list[tuple[str, bool]] = []
        for t in turns:
            if t.speaker == "agent":
                said = [(c, q) for c, q in (self._told(c) for c in turn_clauses(t) if not self._is_ritual(c)) if c]
                # A turn of many clauses is pasted text (steps in the app, a policy): a summary
                # names it by its opening, it does not copy it.
                out += said[:PASTE_KEEP] if len(said) > PASTE_CLAUSES else said
        return _marked(_dedup([c for c, _ in out]), out)

    def handling(self, turns: list[Turn]) -> str:
        """What the agent did, promised or answered: their clauses without ritual, cut at
        handling_max_chars."""
        return _join(self.agent_clauses(turns), self.handling_max_chars)

    def outcome(self, turns: list[Turn], metadata: dict[str, Any]) -> tuple[str, str]:
        """(resolved | unresolved | escalated | unknown, evidence). Read from the end, as a person
        would: a hand-over or promised call-back the chat does not settle is escalated; an
        objection, or a refusal the customer can only accept grudgingly, is unresolved; a
        question left unanswered is unresolved; otherwise what the agent did or said stands."""
        if _truthy(metadata.get("transferred")):
            return "escalated", "metadata.transferred"
        agent = [
            (i, c) for i, t in enumerate(turns) if t.speaker == "agent" for c in turn_clauses(t) if self._is_reply(c)
        ]
        customer = [(i, c) for i, t in enumerate(turns) if t.speaker == "customer" for c in turn_clauses(t)]
        if not agent:
            return (
                ("unknown", "")
                if not any(not self._is_noise(c) for _, c in customer)
                else ("unresolved", "no answer from the agent")
            )
        for decide in (
            self._objection_after,
            self._final_handover,
            self._objection,
            self._unanswered,
            self._escalation,
            self._refusal,
        ):
            if (found := decide(agent, customer)) is not None:
                return found
        last_i, last = agent[-1]
        if done := _hits(" ".join(c for i, c in agent if i == last_i), self.lex.outcome.resolved_agent):
            return "resolved", f"agent: {done[0]}"
        if good := _hits(" ".join(c for i, c in customer if i > last_i), self.lex.outcome.resolved_customer):
            return "resolved", f"customer: {good[0]}"
        return "resolved", f"agent answered: {last[:40]}"

    def _objection_after(self, agent: _Clauses, customer: _Clauses) -> tuple[str, str] | None:
        # The customer objects to the agent's last concrete word, whatever it was.
        return self._objection(agent, customer, after=agent[-1][0])

    def _objection(self, agent: _Clauses, customer: _Clauses, after: int | None = None) -> tuple[str, str] | None:
        # An objection in the customer's last two turns that reacts to what the agent did (not
        # the opening complaint), said after the agent's last concrete word or just before it.
        # Turns of thanks or "没了" to the closing question say nothing: they are not counted.
        cust_turns = sorted({i for i, c in customer if not self._is_noise(c)})[-2:]
        start = agent[-1][0] - 1 if after is None else after + 1
        tail = [c for i, c in customer if i in cust_turns and agent[0][0] < i and i >= start]
        if bad := _hits(" ".join(tail), self.lex.outcome.unresolved):
            return "unresolved", f"customer: {bad[0]}"
        return None

    def _unanswered(self, agent: _Clauses, customer: _Clauses) -> tuple[str, str] | None:
        # A question the customer asked after the agent's last concrete word, and did not then
        # let go of themselves ("...呢 好谢谢", thanks to the closing question).
        later = [c for i, c in customer if i > agent[-1][0]]
        asks = [n for n, c in enumerate(later) if _is_question(c) and not self._is_noise(c)]
        if asks and not _hits(" ".join(later[asks[-1] + 1 :]), self.lex.outcome.resolved_customer):
            return "unresolved", f"customer asked last: {later[asks[-1]][:40]}"
        return None

    def _final_handover(self, agent: _Clauses, customer: _Clauses) -> tuple[str, str] | None:
        # The agent's last concrete word is a hand-over: it answers whatever objection came before.
        last_i = agent[-1][0]
        return self._escalation([(i, c) for i, c in agent if i == last_i], customer)

    def _escalation(self, agent: _Clauses, customer: _Clauses) -> tuple[str, str] | None:
        # The last hand-over decides unless the customer then says it is settled, or went on to
        # ask something else: then it was one matter among several, or an offer the chat went past.
        esc = [(i, h[0]) for i, c in agent if (h := _hits(c, self.lex.outcome.escalated))]
        if not esc:
            return None
        at, cue = esc[-1]
        if any(i > at and _hits(c, self.lex.outcome.resolved_agent) for i, c in agent):
            return None  # the agent went on to settle something in the chat
        later = [c for i, c in customer if i > at]
        if any(_is_question(c) and not self._is_noise(c) for c in later) or _hits(
            " ".join(later), self.lex.outcome.settled
        ):
            return None
        return "escalated", f"agent: {cue}"

    def _refusal(self, agent: _Clauses, customer: _Clauses) -> tuple[str, str] | None:
        # The agent says no in one of its last two concrete turns and nothing done comes after it;
        # the customer leaves it there or accepts it grudgingly (好吧). A plain thanks after a
        # clear "no" still counts as answered. "能不能" asks, it does not refuse.
        turns = sorted({i for i, _ in agent})[-REFUSAL_TURNS:]
        for at in reversed(turns):
            no = _hits(_ASKING_RE.sub("", " ".join(c for i, c in agent if i == at)), self.lex.outcome.refused)
            if no:
                break
        else:
            return None
        if any(i > at and _hits(c, self.lex.outcome.resolved_agent) for i, c in agent):
            return None
        reply = [c for i, c in customer if i > at]
        if not reply or _hits(" ".join(reply), self.lex.outcome.resigned):
            return "unresolved", f"agent: {no[0]}"
        return None

    # -- structure ------------------------------------------------------------------------------
    def split(self, turns: list[Turn]) -> list[list[Turn]]:
        """Separate issues: a customer turn opening with a cue (另外, 还有一个问题...) after the
        agent has acted on the first matter starts a new segment."""
        if not self.split_separate_issues:
            return [turns]
        segments: list[list[Turn]] = [[]]
        agent_acted = False
        for t in turns:
            head = t.text[:12]
            if (
                t.speaker == "customer"
                and agent_acted
                and any(head.startswith(c) or c in head for c in self.lex.separate_issue_cues)
            ):
                rest = self._substance(t.text)
                if rest and len(rest) >= 6:
                    segments.append([])
                    agent_acted = False
            if t.speaker == "agent" and _hits(t.text, self.lex.agent_actions):
                agent_acted = True
            segments[-1].append(t)
        return [s for s in segments if any(t.speaker == "customer" for t in s)] or [turns]

    def timings(self, turns: list[Turn]) -> dict[str, Any]:
        missing: list[str] = []
        cust_t = next((t.t for t in turns if t.speaker == "customer" and t.t is not None), None)
        first_cust_idx = next((i for i, t in enumerate(turns) if t.speaker == "customer"), None)
        agent_t = None
        if first_cust_idx is not None:
            agent_t = next((t.t for t in turns[first_cust_idx + 1 :] if t.speaker == "agent" and t.t is not None), None)
        first_response = agent_t - cust_t if cust_t is not None and agent_t is not None and agent_t >= cust_t else None
        times = [x for t in turns for x in (t.t, t.t_end) if x is not None]
        duration = max(times) - min(times) if len(times) >= 2 else None
        if first_response is None:
            missing.append("first_response_s")
        if duration is None:
            missing.append("duration_s")
        return {"first_response_s": first_response, "duration_s": duration, "timings_missing": missing}

    def extract(
        self,
        conv: Conversation,
        run_id: str = "",
        ingest_date: date | None = None,
        prior_orders: frozenset[str] = frozenset(),
    ) -> list[dict[str, Any]]:
        md = conv.metadata or {}
        started = datetime.fromisoformat(conv.started_at) if conv.started_at else None
        if started is not None and started.tzinfo is None:
            started = started.replace(tzinfo=ZoneInfo(self.timezone))
        day = (
            started.astimezone(ZoneInfo(self.timezone)).date().isoformat()
            if started
            else (ingest_date or date.today()).isoformat()
        )
        order_id = _str_or_none(md.get("order_id"))
        repeat = (
            _truthy(md.get("repeat_contact"))
            or _truthy(md.get("repeat_consultation"))
            or (order_id is not None and order_id in prior_orders)
        )
        records = []
        for seg_no, seg in enumerate(self.split(conv.turns)):
            outcome, evidence = self.outcome(seg, md)
            timing = self.timings(seg)
            if started is None:
                timing["timings_missing"] = ["started_at"] + timing["timings_missing"]
            records.append(
                {
                    "case_id": case_id(conv.conversation_id, seg_no),
                    "conversation_id": conv.conversation_id,
                    "segment": seg_no,
                    "channel": conv.channel,
                    "source_file": conv.source_file,
                    "started_at": started,
                    "date": day,
                    "date_source": "started_at" if started else "ingested",
                    "problem": self.problem(seg),
                    "handling": self.handling(seg),
                    "outcome": outcome,
                    "outcome_evidence": evidence,
                    "customer_text": " ".join(t.text for t in seg if t.speaker == "customer"),
                    "agent_text": " ".join(t.text for t in seg if t.speaker == "agent"),
                    **timing,
                    "n_turns": len(seg),
                    "n_customer_turns": sum(t.speaker == "customer" for t in seg),
                    "n_agent_turns": sum(t.speaker == "agent" for t in seg),
                    "region": _str_or_none(md.get("region")),
                    "product": _str_or_none(md.get("product")),
                    "order_id": order_id,
                    "agent_id": _str_or_none(md.get("agent_id")),
                    "csat": _float_or_none(md.get("csat")),
                    "repeat_contact": bool(repeat),
                    "metadata_json": json.dumps(md, ensure_ascii=False, sort_keys=True, default=str),
                    "turns": [{"speaker": t.speaker, "text": t.text, "original": t.original, "t": t.t} for t in seg],
                    "pii_masked": sum(conv.pii_counts.values()) if seg_no == 0 else 0,
                    "content_hash": conv.content_hash,
                    "run_id": run_id,
                }
            )
        return records


def case_id(conversation_id: str, segment: int) -> str:
    """Stable: the same conversation id and segment always give the same case id."""
    return hashlib.sha1(conversation_id.encode("utf-8")).hexdigest()[:16] + f"-{segment}"


def _is_question(clause: str) -> bool:
    # Clauses come without their punctuation: the particle or a question word tells.
    return clause.endswith(("吗", "么", "呢")) or any(w in clause for w in _QUESTION_WORDS)


_QUESTION_WORDS = (
    "怎么",
    "为什么",
    "什么时候",
    "多久",
    "几天",
    "哪里",
    "能不能",
    "可不可以",
    "是不是",
    "有没有",
    "如何",
)


@lru_cache(maxsize=32)
def _longest_first(words: tuple[str, ...]) -> list[str]:
    return sorted(set(words), key=len, reverse=True)


@lru_cache(maxsize=32)
def _alternation(words: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern for a word list, longest words first so the longest match wins."""
    return re.compile("|".join(map(re.escape, _longest_first(tuple(w for w in words if w)))) or "(?!)")


def _dedup(clauses: list[str], near: float = 1.0) -> list[str]:
    """Clauses without repeats: customers paste the same question twice, agents repeat a
    promise; a clause inside a longer one already kept adds nothing, and with `near` < 1 neither
    does one that shares that share of its characters, in order, with a kept one."""
    kept: list[str] = []
    for c in clauses:
        if any(c in k or (near < 1 and _near(c, k, near)) for k in kept):
            continue
        inside = [n for n, k in enumerate(kept) if k in c]
        if inside:  # the longer wording takes the place of the first shorter one
            kept[inside[0]] = c
            kept = [k for n, k in enumerate(kept) if n not in inside[1:]]
        else:
            kept.append(c)
    return kept


def _near(a: str, b: str, share: float) -> bool:
    return lcs_length(a, b) >= share * min(len(a), len(b))


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004): len(b) big-integer
    steps instead of a len(a) x len(b) table."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def _marked(kept: list[str], told: list[tuple[str, bool]]) -> list[str]:
    """The kept clauses, each asked as a question ending with a question mark."""
    asked = {c for c, q in told if q}
    return [c + _QUESTION_MARK if c in asked else c for c in kept]


def _join(parts: list[str], limit: int) -> str:
    out = ""
    for p in parts:
        nxt = (f"{out}{p}" if out.endswith(_QUESTION_MARK) else f"{out}，{p}") if out else p
        if len(nxt) > limit:
            return out or p[:limit]
        out = nxt
    return out


def _truthy(v: Any) -> bool:
    return v in (True, 1, "1", "true", "True", "yes", "是")


def _str_or_none(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def _float_or_none(v: Any) -> float | None:
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None
