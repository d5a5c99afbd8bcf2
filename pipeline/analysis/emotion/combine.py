"""The combiner: rule scores joined with, or replaced by, a trained model's, as configured.

Why its own module: the rules and the model each know one view of a turn; which one wins, and how
the label follows, is a decision of its own that tests and evaluation exercise directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pipeline.analysis.emotion.model import EmotionModel, load_emotion_model
from pipeline.analysis.emotion.rules import RuleScorer, TurnEmotion
from pipeline.config import Config


class EmotionAnalyzer:
    """`analyze(texts)` and `analyze_turns(turns)`: the rules, joined with or replaced by a
    trained model when one exists and the config says so."""

    def __init__(
        self,
        rules: RuleScorer,
        model: EmotionModel | None = None,
        mode: Literal["join", "replace", "ignore"] = "join",
        weight: float = 0.6,
    ):
        self.rules = rules
        self.model = model if mode != "ignore" else None
        self.mode = mode
        self.weight = weight

    @classmethod
    def from_config(cls, cfg: Config, model_dir: Path | None = None) -> EmotionAnalyzer:
        return cls(
            RuleScorer.from_config(cfg),
            load_emotion_model(cfg, model_dir),
            cfg.emotion.model_mode,
            cfg.emotion.model_weight,
        )

    def _combine(
        self, rule: TurnEmotion, text: str, model_s: float | None, model_label: tuple[str, float] | None
    ) -> TurnEmotion:
        if model_s is None:
            return rule
        lex = self.rules.lex
        has_cues = bool(rule.cues)
        if self.mode == "replace" or not has_cues:
            s, src = model_s, "model"
        else:
            s, src = self.weight * model_s + (1 - self.weight) * rule.sentiment, "rules+model"
        evidence = rule.evidence + [f"模型:{model_s:+.2f}"]
        if (
            model_label is not None
            and model_label[1] >= 0.5
            and (self.mode == "replace" or rule.emotion == lex.neutral_label)
        ):
            label = model_label[0]
        elif abs(s) < lex.neutral_band:
            label = lex.neutral_label
        elif s > 0:
            label = lex.positive_label
        else:
            label = rule.emotion if rule.emotion not in (lex.neutral_label, lex.positive_label) else "不满"
        intensity = round(min(1.0, max(abs(s), rule.intensity if s * rule.sentiment > 0 else 0.0)), 4)
        return TurnEmotion(round(float(s), 4), label, intensity, evidence, src, rule.cues)

    def analyze(
        self,
        texts: Sequence[str],
        *,
        originals: Sequence[str | None] | None = None,
        previous: Sequence[Sequence[str]] | None = None,
        asr: bool = False,
    ) -> list[TurnEmotion]:
        texts = [t or "" for t in texts]
        originals = originals or [None] * len(texts)
        previous = previous or [()] * len(texts)
        rules = [self.rules.score(t, original=o, previous=p, asr=asr) for t, o, p in zip(texts, originals, previous)]
        if self.model is None or not texts:
            return rules
        ms = self.model.sentiment(texts)
        ml = self.model.labels(texts) if self.model.kind == "label" else [None] * len(texts)
        return [self._combine(r, t, float(m), lab) for r, t, m, lab in zip(rules, texts, ms, ml)]

    def analyze_turns(self, turns: Sequence[dict[str, Any]], asr: bool = False) -> list[tuple[int, TurnEmotion]]:
        """(index in turns, emotion) for each customer turn; earlier customer turns feed the
        repeated-message cue."""
        idx = [i for i, t in enumerate(turns) if t.get("speaker") == "customer"]
        texts = [str(turns[i].get("text") or "") for i in idx]
        originals = [turns[i].get("original") for i in idx]
        previous = [texts[max(0, k - 3) : k] for k in range(len(idx))]
        return list(zip(idx, self.analyze(texts, originals=originals, previous=previous, asr=asr)))
