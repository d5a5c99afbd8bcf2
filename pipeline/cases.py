"""Turn one conversation (normalised and masked) into case records.

A case is what an analyst reads: the customer's problem in a sentence or two, what the agent did,
how it ended (with the words that show it), the customer's emotion and the timings. Extraction is
extractive and rule-based on purpose: it must work on day one on any deployment, show its
evidence, and never invent text that was not said. Cue lists live in configs/case_lexicon.yaml.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Iterable
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict

from pipeline.config import Config, load_yaml_resource
from pipeline.mask import PLACEHOLDER_RE
from pipeline.schema import Conversation, Turn

_SENT_SPLIT_RE = re.compile(r"(?<=[,.!?;:，。！？；：~])\s*|\s+")
_CONTENT_RE = re.compile(r"[A-Za-z\u3400-\u9fff]")
_REPEAT_PUNCT_RE = re.compile(r"[!?！？]{2,}")


class _Strict(BaseModel):
    # YAML reads 12315 as a number; cue lists are strings whatever YAML thinks.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class OutcomeLexicon(_Strict):
    escalated: list[str]
    resolved_customer: list[str]
    resolved_agent: list[str]
    unresolved: list[str]


class EmotionLexicon(_Strict):
    anger: list[str]
    anxiety: list[str]
    satisfaction: list[str]
    threats: list[str]
    angry_emoji: list[str] = []


class CaseLexicon(_Strict):
    greetings: list[str]
    acknowledgements: list[str]
    problem_cues: list[str]
    agent_boilerplate: list[str]
    agent_actions: list[str]
    separate_issue_cues: list[str]
    outcome: OutcomeLexicon
    emotion: EmotionLexicon


def load_lexicon(cfg: Config) -> CaseLexicon:
    from pydantic import ValidationError

    from pipeline.config import ConfigError

    raw = load_yaml_resource(cfg, cfg.cases.lexicon)
    try:
        return CaseLexicon.model_validate(raw)
    except ValidationError as e:
        keys = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{cfg.resolve(cfg.cases.lexicon)}: {keys}") from None


def _hits(text: str, words: Iterable[str]) -> list[str]:
    return [w for w in words if w and w in text]


def sentences(text: str) -> list[str]:
    """Clauses of a turn. Chat writers separate clauses with spaces as often as with commas;
    ASR text has neither, so an unpunctuated call turn stays one clause."""
    return [s.strip(" ,.!?;:，。！？；：~") for s in _SENT_SPLIT_RE.split(text) if s and s.strip(" ,.!?;:，。！？；：~")]


@dataclass(frozen=True)
class CaseExtractor:
    """`extract(conversation)` -> case dicts (one per separate issue). Pure given the lexicon."""

    lex: CaseLexicon
    problem_max_chars: int = 160
    handling_max_chars: int = 200
    split_separate_issues: bool = True
    timezone: str = "Asia/Shanghai"

    @classmethod
    def from_config(cls, cfg: Config) -> "CaseExtractor":
        c = cfg.cases
        return cls(load_lexicon(cfg), c.problem_max_chars, c.handling_max_chars, c.split_separate_issues, c.timezone)

    # -- text pieces ----------------------------------------------------------------------------
    def _substance(self, sentence: str) -> str:
        """The sentence without greetings and acknowledgements; empty if nothing else is there."""
        s = PLACEHOLDER_RE.sub("", sentence)
        for w in sorted(self.lex.greetings + self.lex.acknowledgements, key=len, reverse=True):
            s = s.replace(w, "")
        return s if len(_CONTENT_RE.findall(s)) >= 2 else ""

    def _strip_greeting(self, sentence: str) -> str:
        for g in sorted(self.lex.greetings, key=len, reverse=True):
            if sentence.startswith(g) and len(sentence) > len(g) + 3:
                return sentence[len(g):].lstrip(" ,.!，。！")
        return sentence

    def problem(self, turns: list[Turn]) -> str:
        """The customer's statement of the problem: substantive clauses from their first turns,
        those with problem cues first in spoken order, cut at problem_max_chars."""
        cands: list[tuple[int, str]] = []
        n_turns = 0
        for t in turns:
            if t.speaker != "customer":
                continue
            subs = [self._strip_greeting(s) for s in sentences(t.text) if self._substance(s)]
            if subs:
                n_turns += 1
                cands += [(len(cands), s) for s in subs]
            if n_turns >= 3:
                break
        if not cands:
            return ""
        seen: set[str] = set()
        cands = [c for c in cands if not (c[1] in seen or seen.add(c[1]))]  # customers repeat themselves
        cued = [c for c in cands if _hits(c[1], self.lex.problem_cues)]
        chosen = sorted(cued[:4] or cands[:2])
        return _join([s for _, s in chosen], self.problem_max_chars)

    def handling(self, turns: list[Turn]) -> str:
        """What the agent did or promised: clauses with action words, ritual phrases left out."""
        picked: list[str] = []
        fallback: list[str] = []
        for t in turns:
            if t.speaker != "agent":
                continue
            for s in sentences(t.text):
                if _hits(s, self.lex.agent_boilerplate) or not self._substance(s):
                    continue
                (picked if _hits(s, self.lex.agent_actions) else fallback).append(s)
        seen: set[str] = set()
        uniq = [s for s in picked or fallback[:2] if not (s in seen or seen.add(s))]
        return _join(uniq, self.handling_max_chars)

    def outcome(self, turns: list[Turn], metadata: dict[str, Any]) -> tuple[str, str]:
        """(resolved | unresolved | escalated | unknown, evidence). The end of the conversation
        decides: what the customer said last, then what the agent said last."""
        lex = self.lex.outcome
        agent_text = " ".join(t.text for t in turns if t.speaker == "agent")
        esc = _hits(agent_text, lex.escalated)
        if metadata.get("transferred") in (True, 1, "1", "true", "True") or esc:
            return "escalated", ("metadata.transferred" if not esc else f"agent: {esc[0]}")
        customer_tail = [t.text for t in turns if t.speaker == "customer"][-2:]
        agent_tail = [t.text for t in turns if t.speaker == "agent"][-3:]
        tail = " ".join(customer_tail)
        if bad := _hits(tail, lex.unresolved):
            return "unresolved", f"customer: {bad[0]}"
        if good := _hits(tail, lex.resolved_customer):
            return "resolved", f"customer: {good[0]}"
        if done := _hits(" ".join(agent_tail), lex.resolved_agent):
            return "resolved", f"agent: {done[0]}"
        return "unknown", ""

    def emotion(self, turns: list[Turn]) -> dict[str, Any]:
        lex = self.lex.emotion
        cust = [t for t in turns if t.speaker == "customer"]
        text = " ".join(t.text for t in cust)
        original = " ".join(t.original or "" for t in cust)
        anger = _hits(text, lex.anger)
        threats = _hits(text, lex.threats)
        anxiety = _hits(text, lex.anxiety)
        emoji = _hits(original, lex.angry_emoji)
        punct = len(_REPEAT_PUNCT_RE.findall(text))
        tail = " ".join(t.text for t in cust[-2:])
        satisfied = _hits(tail, lex.satisfaction)
        score = 0.3 * min(len(satisfied), 2) - 0.25 * min(len(anger) + len(emoji), 4) - 0.35 * min(len(threats), 2) \
            - 0.1 * min(punct, 3) - 0.1 * min(len(anxiety), 2)
        score = max(-1.0, min(1.0, score))
        if threats or len(anger) + len(emoji) >= 2:
            label = "angry"
        elif anger or emoji or punct:
            label = "dissatisfied"
        elif anxiety:
            label = "anxious"
        elif satisfied:
            label = "satisfied"
        else:
            label = "neutral"
        cues = anger + emoji + anxiety + (["!!/??"] * min(punct, 1))
        return {"emotion": label, "emotion_score": round(score, 3), "emotion_cues": cues, "escalation_threats": threats}

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
            if t.speaker == "customer" and agent_acted and any(head.startswith(c) or c in head for c in self.lex.separate_issue_cues):
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
            agent_t = next((t.t for t in turns[first_cust_idx + 1:] if t.speaker == "agent" and t.t is not None), None)
        first_response = agent_t - cust_t if cust_t is not None and agent_t is not None and agent_t >= cust_t else None
        times = [x for t in turns for x in (t.t, t.t_end) if x is not None]
        duration = max(times) - min(times) if len(times) >= 2 else None
        if first_response is None:
            missing.append("first_response_s")
        if duration is None:
            missing.append("duration_s")
        return {"first_response_s": first_response, "duration_s": duration, "timings_missing": missing}

    def extract(self, conv: Conversation, run_id: str = "", ingest_date: date | None = None,
                prior_orders: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        md = conv.metadata or {}
        started = datetime.fromisoformat(conv.started_at) if conv.started_at else None
        if started is not None and started.tzinfo is None:
            started = started.replace(tzinfo=ZoneInfo(self.timezone))
        day = started.astimezone(ZoneInfo(self.timezone)).date().isoformat() if started else (ingest_date or date.today()).isoformat()
        order_id = _str_or_none(md.get("order_id"))
        repeat = _truthy(md.get("repeat_contact")) or _truthy(md.get("repeat_consultation")) or (
            order_id is not None and order_id in prior_orders)
        records = []
        for seg_no, seg in enumerate(self.split(conv.turns)):
            outcome, evidence = self.outcome(seg, md)
            timing = self.timings(seg)
            if started is None:
                timing["timings_missing"] = ["started_at"] + timing["timings_missing"]
            records.append({
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
                **self.emotion(seg),
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
            })
        return records


def case_id(conversation_id: str, segment: int) -> str:
    """Stable: the same conversation id and segment always give the same case id."""
    return hashlib.sha1(conversation_id.encode("utf-8")).hexdigest()[:16] + f"-{segment}"


def _join(parts: list[str], limit: int) -> str:
    out = ""
    for p in parts:
        nxt = f"{out}，{p}" if out else p
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
