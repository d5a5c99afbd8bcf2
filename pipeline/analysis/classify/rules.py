"""Rule-based classification from the taxonomy: cold-start issue types, request kind, urgency.

Why rules at all: a new deployment has no labelled cases, yet the nightly report needs issue
types on day one. Keyword rules are weak labels, so every rule prediction says so
(`classifier: "rules"`) and lists the matched keywords; their confidence is deliberately modest
so most uncertain ones land in the review queue and become training data.

Why urgency is always rules (also once a model is trained): urgency has no labels, and it must
weigh structured signals from other steps (repeat contact, emotion score, threats, elapsed time)
that a text classifier cannot see. It is a weighted sum with every contributing signal listed,
so a supervisor can see *why* a case is 紧急 and tune the weights in the taxonomy or config.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.analysis.classify.taxonomy import Taxonomy, UrgencyWeights

# Rule confidence = top score / (total score + prior): one weight-1 hit gives 0.5, competing
# types pull it down, several hits for one type push it up.
_RULE_PRIOR = 1.0
# Confidence of the fallback type when nothing matched: below any sensible review threshold.
_NO_MATCH_CONFIDENCE = 0.2


def _cut_spans(text: str, phrases: Iterable[str]) -> str:
    # Replace with a separator rather than delete, so removing "物流很快" from "物流很快递" cannot
    # glue the neighbours into a new keyword.
    for p in phrases:
        if p:
            text = text.replace(p, "\u2063")
    return text


@dataclass
class RuleMatch:
    label: str
    score: float
    first_pos: int
    terms: list[str] = field(default_factory=list)


class KeywordRules:
    """Issue type from taxonomy keywords: scores per type, best type, confidence and evidence.

    Matching is substring-based on the prepared text (not on tokens) so it does not depend on
    which segmenter is installed and keywords split differently by jieba still match.
    """

    def __init__(self, taxonomy: Taxonomy) -> None:
        self.taxonomy = taxonomy
        self.labels = taxonomy.labels

    def match(self, text: str) -> list[RuleMatch]:
        """All types with at least one hit, best first (score, then first mentioned: the guide's
        tie rule)."""
        out: list[RuleMatch] = []
        for t in self.taxonomy.issue_types:
            if not t.keywords:
                continue
            cleaned = _cut_spans(text, t.exclude)
            score, first, terms = 0.0, math.inf, []
            for kw in t.keywords:
                pos = cleaned.find(kw.term)
                if pos >= 0:
                    score += kw.weight
                    first = min(first, pos)
                    terms.append(kw.term)
            if score > 0:
                out.append(RuleMatch(t.name, score, int(first), terms))
        # Longer keywords subsume shorter ones ("服务态度" contains "态度"): fine, both add weight.
        out.sort(key=lambda m: (-m.score, m.first_pos))
        return out

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(n, n_labels) keyword scores; used as extra features by the `+rules` model variant."""
        idx = {n: i for i, n in enumerate(self.labels)}
        mat = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        for r, text in enumerate(texts):
            for m in self.match(text):
                mat[r, idx[m.label]] = m.score
        return mat

    def predict_one(self, text: str) -> tuple[str, float, dict[str, Any]]:
        matches = self.match(text)
        if not matches:
            return self.taxonomy.fallback, _NO_MATCH_CONFIDENCE, {"rule": "no keyword matched", "matched": {}}
        total = sum(m.score for m in matches)
        best = matches[0]
        conf = best.score / (total + _RULE_PRIOR)
        evidence = {"rule": "taxonomy keywords", "matched": {m.label: m.terms for m in matches[:3]}}
        return best.label, float(conf), evidence

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.predict_one(t)[0] for t in texts]


class RequestKindRules:
    """咨询 / 投诉 / 建议 from what the customer said and the emotion step.

    Why 咨询 unless dissatisfaction shows: most contacts are routine requests, and a refund or a
    return asked for politely is a request, not a complaint (on real JD chats the old rule, which
    counted 退款 and question marks, called a quarter of plain consultations 投诉). Dissatisfaction
    is a complaint cue, an escalation threat, or a turn whose sentiment falls below
    `complaint_emotion_below` ("怎么还没到？" said at -0.8 is a complaint).
    """

    def __init__(self, taxonomy: Taxonomy) -> None:
        self.kinds = taxonomy.request_kinds
        self._cues = {k.name: list(k.keywords) for k in self.kinds.kinds}

    def predict_one(
        self, text: str, emotion_score: float | None = None, threats: Sequence[str] = ()
    ) -> tuple[str, dict[str, Any]]:
        """`emotion_score` is the lowest turn sentiment when the emotion step gave one (else the
        conversation's score)."""
        hits = {name: [w for w in words if w in text] for name, words in self._cues.items()}
        complaint = self.kinds.complaint
        why: list[str] = []
        if hits.get(complaint):
            why.append("complaint cues")
        if threats:
            why.append("escalation threat")
        thr = self.kinds.complaint_emotion_below
        if thr is not None and emotion_score is not None and not math.isnan(emotion_score) and emotion_score < thr:
            why.append(f"sentiment {emotion_score:.2f} < {thr:.2f}")
        evidence: dict[str, Any] = {k: v for k, v in hits.items() if v}
        if why:
            return complaint, {**evidence, "why": why}
        suggestion = next(
            (k.name for k in self.kinds.kinds if k.name not in (complaint, self.kinds.default) and hits.get(k.name)),
            None,
        )
        if suggestion is not None:
            return suggestion, {**evidence, "why": ["suggestion cues"]}
        return self.kinds.default, evidence

    def signals(self, text: str, emotion_score: float | None, threats: Sequence[str]) -> list[float]:
        """The same evidence as numbers, for a trained request-kind model: cue counts per kind,
        threats, and how far the sentiment fell."""
        counts = [float(sum(w in text for w in words)) for words in self._cues.values()]
        low = 0.0 if emotion_score is None or math.isnan(emotion_score) else float(min(0.0, emotion_score))
        return [*np.log1p(counts).tolist(), float(bool(threats)), low]


# Elapsed time: "三天了", "等了一个星期", "半个月还没", "2周". Units in days.
_CN_NUM = {
    "零": 0,
    "一": 1,
    "二": 2,
    "两": 2,
    "俩": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
    "十": 10,
    "几": 3,
    "半": 0.5,
}
_UNITS = {"小时": 1 / 24, "钟头": 1 / 24, "天": 1, "日": 1, "周": 7, "星期": 7, "礼拜": 7, "个月": 30, "月": 30}
_ELAPSED_RE = re.compile(
    r"(?P<num>\d+(?:\.\d+)?|[零一二两俩三四五六七八九十几半]+)\s*(?:个)?\s*"
    r"(?P<unit>小时|钟头|天|日|周|星期|礼拜|个月|月)(?P<tail>了|多|都|还|没|才|之久|以上)?"
)
# "一天" alone is often a duration of use ("用了一天就坏"), so a match only counts as elapsed
# waiting when the context says so: a tail (三天了/三天还没) or a waiting verb before it.
_WAIT_BEFORE_RE = re.compile(r"(等了|已经|过了|拖了|都|快|超过|整整|足足)\s*$")
# Amounts: "199元", "¥199", "200块", masked "[金额x]" / "<AMOUNT>".
_AMOUNT_RE = re.compile(r"(?:[¥￥]\s*(?P<a>\d+(?:\.\d+)?))|(?:(?P<b>\d+(?:\.\d+)?)\s*(?:元|块钱|块|rmb|RMB))")
_AMOUNT_PLACEHOLDER_RE = re.compile(r"\[金额x\]|<AMOUNT>|<MONEY>")


def _cn_number(s: str) -> float:
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return float(s)
    if s == "十":
        return 10.0
    if "十" in s:  # 十五, 二十, 二十三
        head, _, tail = s.partition("十")
        return (_CN_NUM.get(head, 1) if head else 1) * 10 + (_CN_NUM.get(tail, 0) if tail else 0)
    total = 0.0
    for ch in s:
        total = total * 10 + _CN_NUM.get(ch, 0) if ch != "半" else total + 0.5
    return total


def elapsed_days(text: str) -> tuple[float, list[str]]:
    """Longest waiting time mentioned, in days, and the phrases that said so."""
    best, phrases = 0.0, []
    for m in _ELAPSED_RE.finditer(text):
        waited = bool(m.group("tail")) or bool(_WAIT_BEFORE_RE.search(text[max(0, m.start() - 4) : m.start()]))
        if not waited:
            continue
        days = _cn_number(m.group("num")) * _UNITS[m.group("unit")]
        if days > 0:
            phrases.append(m.group(0))
            best = max(best, days)
    return best, phrases


def amounts(text: str) -> tuple[list[float], bool]:
    """Explicit amounts in yuan, and whether a masked amount placeholder occurs."""
    vals = [float(m.group("a") or m.group("b")) for m in _AMOUNT_RE.finditer(text)]
    return vals, bool(_AMOUNT_PLACEHOLDER_RE.search(text))


def _find_cues(text: str, cues: Sequence[str], negation: Sequence[str]) -> list[str]:
    """Cues present and not negated just before ("没有冒烟", "不会起诉")."""
    found = []
    for cue in cues:
        start = 0
        while (pos := text.find(cue, start)) >= 0:
            before = text[max(0, pos - 3) : pos]
            if not any(before.endswith(n) or before.endswith(n + "有") or before.endswith(n + "会") for n in negation):
                found.append(cue)
                break
            start = pos + len(cue)
    return found


@dataclass
class UrgencyResult:
    level: str
    score: float
    confidence: float
    due_hours: float | None
    signals: list[dict[str, Any]]


class UrgencyScorer:
    """Urgency as a weighted sum of signals; each signal that fires is kept as evidence."""

    def __init__(self, taxonomy: Taxonomy, weight_overrides: dict[str, float] | None = None) -> None:
        self.u = taxonomy.urgency
        w = self.u.weights.model_dump()
        w.update(weight_overrides or {})
        self.w = UrgencyWeights(**w)  # validates override keys (extra="forbid")
        self.levels = self.u.ordered_levels()
        self.thresholds = sorted(
            lv.min_score for lv in self.levels if lv.min_score is not None and not math.isnan(lv.min_score)
        )

    def score_one(
        self,
        text: str,
        *,
        repeat_contact: bool = False,
        emotion_score: float | None = None,
        emotion_cues: Sequence[str] = (),
        escalation_threats: Sequence[str] = (),
        duration_s: float | None = None,
    ) -> UrgencyResult:
        w, cues = self.w, self.u.cues
        signals: list[dict[str, Any]] = []

        def add(name: str, weight: float, **detail: Any) -> None:
            if weight:
                signals.append({"signal": name, "weight": round(float(weight), 3), **detail})

        safety = _find_cues(text, cues.safety, cues.negation)
        if safety:
            add("safety", w.safety, cues=safety)
        threats = list(dict.fromkeys([*escalation_threats, *_find_cues(text, cues.escalation, cues.negation)]))
        if threats:
            add("escalation", w.escalation, cues=threats)
        if repeat_contact:
            add("repeat_contact", w.repeat_contact)
        if emotion_score is not None and not math.isnan(emotion_score) and emotion_score < 0:
            add("negative_emotion", w.negative_emotion * -emotion_score, emotion_score=round(emotion_score, 3))
        if emotion_cues:
            add("emotion_cues", w.emotion_cue * min(3, len(emotion_cues)), cues=list(emotion_cues)[:5])
        vals, masked_amount = amounts(text)
        if vals or masked_amount:
            add("money", w.money, amounts=vals[:5] or ["masked"])
            if vals and max(vals) >= self.u.large_amount:
                add("large_amount", w.large_amount, max_amount=max(vals))
        refund = _find_cues(text, cues.refund, cues.negation)
        if refund:
            add("refund", w.refund, cues=refund)
        days, phrases = elapsed_days(text)
        if days > 0:
            add("elapsed_time", min(w.elapsed_max, w.elapsed_per_day * days), days=round(days, 2), phrases=phrases[:3])
        urgent = _find_cues(text, cues.urgent_words, cues.negation)
        if urgent:
            add("urgent_words", w.urgent_words, cues=urgent)
        if duration_s is not None and not math.isnan(duration_s) and duration_s >= self.u.long_contact_s:
            add("long_contact", w.long_contact, duration_s=round(duration_s, 1))

        score = sum(s["weight"] for s in signals)
        level = self.levels[-1]
        for lv in self.levels:
            if lv.min_score is not None and not math.isnan(lv.min_score) and score >= lv.min_score:
                level = lv
                break
        return UrgencyResult(level.name, round(score, 3), self._confidence(score), level.due_hours, signals)

    def _confidence(self, score: float) -> float:
        # Distance to the nearest level boundary: a score sitting on a threshold is a coin flip
        # between two levels (0.5); two points clear of it is as sure as rules get.
        if not self.thresholds:
            return 1.0
        margin = min(abs(score - t) for t in self.thresholds)
        return round(0.5 + 0.5 * (1.0 - math.exp(-margin / 0.75)), 4)
