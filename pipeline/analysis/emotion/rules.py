"""The rule scorer: one customer turn -> sentiment, label, intensity, and the cues that decided.

Why rules: the pipeline must score emotion on day one, offline, and say *why*. Each cue is kept
as data (`Cue`: what fired, its weight, the threat it names) so that the case's cues and threats
are read from it, never parsed back out of the evidence strings shown to people.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.analysis.emotion.lexicon import EmotionLexicon, general_lexicons, load_emotion_lexicon
from pipeline.config import Config
from pipeline.text.mask import PLACEHOLDER_RE

_PUNCT_RE = re.compile(r"[,.!?;:，。！？；：、~…]")
_REPEAT_PUNCT_RE = re.compile(r"[!?！？]{2,}")
_CAPS_RE = re.compile(r"(?<![A-Za-z])[A-Z]{3,}(?![A-Za-z])")
_CONTENT_RE = re.compile(r"[A-Za-z\u3400-\u9fff]")


@dataclass(frozen=True)
class Cue:
    """One thing that moved a turn's score: the cue as people read it (`投诉`, `威胁:12315`,
    `重复标点:！！`), its weight, and for a threat of escalation the word threatened with."""

    text: str
    weight: float
    threat: str | None = None

    @property
    def evidence(self) -> str:
        return f"{self.text}({self.weight:+.2f})"


@dataclass
class TurnEmotion:
    sentiment: float  # -1 very negative .. 1 positive
    emotion: str
    intensity: float  # 0 .. 1: how strongly it is felt, from the score and arousal cues
    evidence: list[str] = field(default_factory=list)  # what people read: the cues, then notes
    source: str = "rules"  # rules | model | rules+model
    cues: tuple[Cue, ...] = ()  # the rule cues behind `evidence`, as data

    def as_dict(self) -> dict[str, Any]:
        """What is shown and stored per turn: the evidence strings, not the Cue objects."""
        return {
            "sentiment": self.sentiment,
            "emotion": self.emotion,
            "intensity": self.intensity,
            "evidence": list(self.evidence),
            "source": self.source,
        }


@dataclass
class _Tally:
    raw: float = 0.0
    arousal: int = 0
    masses: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    cues: list[Cue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # evidence that is no cue (no weight)

    def add(self, weight: float, label: str | None, cue: str, threat: str | None = None) -> None:
        self.raw += weight
        if label:
            self.masses[label] += abs(weight)
        self.cues.append(Cue(cue, weight, threat))

    @property
    def evidence(self) -> list[str]:
        return [c.evidence for c in self.cues] + self.notes


class RuleScorer:
    """`score(text)` -> TurnEmotion from service phrases, general lexicons and non-word cues."""

    def __init__(self, lex: EmotionLexicon, tokenize):
        self.lex = lex
        self.tokenize = tokenize
        self.dutir, self.pos, self.neg, self.has_lexicons = general_lexicons()
        self.neutral = frozenset(lex.neutral_tokens)
        self.negators = frozenset(lex.negators)
        self.intensifiers = frozenset(lex.intensifiers)
        # Longest first, so 非常满意 is matched before 满意 inside it.
        self.phrases = sorted(
            ((p, float(w), lab) for lab, by_w in lex.phrases.items() for w, ps in by_w.items() for p in ps),
            key=lambda x: -len(x[0]),
        )
        self.caps_allow = frozenset(lex.cues.caps_allow)
        # Threats and profanity are scored once, as cues, never again as lexicon tokens.
        self.cue_words = frozenset(lex.threats) | frozenset(lex.profanity)

    @classmethod
    def from_config(cls, cfg: Config) -> RuleScorer:
        from pipeline.text.segment import Segmenter

        tok = Segmenter(cfg).tokenizer
        return cls(load_emotion_lexicon(cfg), tok.lcut)

    def _modifier(self, text: str, start: int) -> tuple[bool, bool]:
        """(negated, intensified) from the few characters before a phrase."""
        before = text[max(0, start - 3) : start]
        negated = any(before.endswith(n) for n in self.negators)
        intens = any(before.endswith(w) for w in self.intensifiers)
        return negated, intens

    def _phrases(self, text: str, t: _Tally) -> list[tuple[int, int]]:
        covered: list[tuple[int, int]] = []
        lex = self.lex
        for phrase, w, label in self.phrases:
            start = text.find(phrase)
            while start >= 0:
                end = start + len(phrase)
                if not any(s < end and start < e for s, e in covered):
                    covered.append((start, end))
                    negated, intens = self._modifier(text, start)
                    if negated and w > 0:
                        t.add(lex.negated_positive_weight, "不满", f"不{phrase}")
                    elif negated and not phrase.startswith(("不", "没")):
                        t.add(lex.negated_negative_weight, None, f"不{phrase}")
                    else:
                        t.add(w * (lex.intensifier_factor if intens else 1.0), label, phrase)
                start = text.find(phrase, end)
        return covered

    def _tokens(self, text: str, covered: list[tuple[int, int]], t: _Tally) -> None:
        lex = self.lex
        pos = 0
        history: list[str] = []
        for tok in self.tokenize(text):
            start, end = pos, pos + len(tok)
            pos = end
            window = history[-lex.negation_window :]
            history.append(tok)
            if (
                tok in self.neutral
                or tok in self.negators
                or tok in self.cue_words
                or len(tok) < 2
                and tok not in self.dutir
                or any(s < end and start < e for s, e in covered)
            ):
                continue
            cat = self.dutir.get(tok)
            label = lex.dutir_map.get(cat) if cat else None
            if cat and label and cat in lex.dutir_weight:
                w = lex.dutir_weight[cat]
            elif tok in self.pos:
                w, label = lex.hownet_weight, lex.positive_label
            elif tok in self.neg:
                w, label = -lex.hownet_weight, "不满"
            else:
                continue
            negated = any(x in self.negators for x in window)
            if any(x in self.intensifiers for x in window):
                w *= lex.intensifier_factor
            if negated and w > 0:
                t.add(lex.negated_positive_weight, "不满", f"不…{tok}")
            elif negated:
                t.add(lex.negated_negative_weight, None, f"不…{tok}")
            else:
                t.add(w, label, tok)

    def _cues(self, text: str, original: str, previous: Sequence[str], t: _Tally) -> None:
        lex, c = self.lex, self.lex.cues
        for w in lex.threats:
            if w in text:
                t.add(lex.threat_weight, lex.threat_label, f"威胁:{w}", threat=w)
                t.arousal += 1
        low = original.lower()
        for w in lex.profanity:
            if re.search(rf"(?<![a-z]){re.escape(w.lower())}(?![a-z])", low) if w.isascii() else w in original:
                t.add(lex.profanity_weight, "愤怒", f"粗口:{w}")
                t.arousal += 1
                break
        for e in lex.angry_emoji:
            if e in original:
                t.add(lex.angry_emoji_weight, "愤怒", f"表情:{e}")
        runs = _REPEAT_PUNCT_RE.findall(original)
        for r in runs[: c.repeated_punct_max]:
            t.add(c.repeated_punct_weight, None, f"重复标点:{r}")
            t.arousal += 1
        for w in _CAPS_RE.findall(PLACEHOLDER_RE.sub(" ", original)):
            if w not in self.caps_allow:
                t.add(c.caps_weight, None, f"全大写:{w}")
                t.arousal += 1
                break
        body = text.strip()
        if len(_CONTENT_RE.findall(body)) >= 2 and body in (p.strip() for p in previous):
            t.add(c.repeated_message_weight, c.repeated_message_label, "重复发送")
            t.arousal += 1
        if t.raw < 0 and any(q in text for q in c.question_pressure):
            t.add(c.question_pressure_weight, "不满", "质问")

    def score(
        self, text: str, *, original: str | None = None, previous: Sequence[str] = (), asr: bool = False
    ) -> TurnEmotion:
        """Score one customer turn. `previous`: the customer's earlier turns (repeated messages);
        `asr`: call text, where missing punctuation says nothing about calm."""
        lex = self.lex
        text = text or ""
        original = original if original is not None else text
        t = _Tally()
        covered = self._phrases(text, t)
        self._tokens(text, covered, t)
        self._cues(text, original, previous, t)
        if (asr or len(text) >= 30) and not _PUNCT_RE.search(original):
            # Call text has no punctuation: punctuation cues cannot fire, so only words decide.
            t.notes.append("无标点(ASR):仅依据词汇")
        sentiment = math.tanh(t.raw / lex.scale)
        return TurnEmotion(
            round(sentiment, 4),
            self._label(sentiment, t),
            self._intensity(sentiment, t),
            t.evidence,
            cues=tuple(t.cues),
        )

    def _label(self, sentiment: float, t: _Tally) -> str:
        lex = self.lex
        if abs(sentiment) < lex.neutral_band:
            return lex.neutral_label
        if sentiment > 0:
            return lex.positive_label
        neg = {k: v for k, v in t.masses.items() if k != lex.positive_label and v > 0}
        if not neg:
            return "不满"
        best = max(neg.values())
        return next(lab for lab in lex.labels if neg.get(lab, 0) == best)

    @staticmethod
    def _intensity(sentiment: float, t: _Tally) -> float:
        return round(min(1.0, abs(sentiment) * (1 + 0.25 * min(t.arousal, 4))), 4)
