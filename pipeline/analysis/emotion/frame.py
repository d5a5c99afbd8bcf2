"""The DataFrame adapter: a case table in, the same table with the emotion columns out.

Why the columns are native lists and structs here (not JSON strings): the store casts each part
to `pipeline.schema.CASE_SCHEMA`, which types them, so an all-empty batch no longer needs a
string to avoid a list<null> column.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from pipeline.analysis.emotion.combine import EmotionAnalyzer
from pipeline.analysis.emotion.curve import summarize_curve
from pipeline.analysis.emotion.rules import TurnEmotion
from pipeline.config import Config
from pipeline.schema import CASE_EMOTION_COLUMNS, EMOTION_COLUMNS


def _as_turns(value: Any) -> list[dict[str, Any]]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [dict(t) for t in list(value)]


def conversation_emotion(
    turns: Sequence[dict[str, Any]], analyzer: EmotionAnalyzer, cfg: Config, asr: bool = False
) -> tuple[dict[str, Any], list[tuple[int, TurnEmotion]]]:
    scored = analyzer.analyze_turns(turns, asr=asr)
    summary = summarize_curve(
        [(i, e.sentiment) for i, e in scored], turns, cfg.emotion.improve_delta, cfg.emotion.worsen_delta
    )
    return summary, scored


def conversation_label(scored: Sequence[tuple[int, TurnEmotion]], neutral: str) -> str:
    """The label of the customer's lowest turn if it is negative (how upset they got), else of
    their last turn (how they left); `neutral` with no customer turn."""
    if not scored:
        return neutral
    low = min((e for _, e in scored), key=lambda e: e.sentiment)
    return low.emotion if low.sentiment < 0 else scored[-1][1].emotion


def case_emotion(scored: Sequence[tuple[int, TurnEmotion]], neutral: str) -> dict[str, Any]:
    """The case's emotion columns from its scored customer turns: label, score (the lowest turn
    sentiment: how bad it got, which is what urgency weighs), the cues of its negative turns and
    the threats of escalation the customer made."""
    cues: list[str] = []
    threats: list[str] = []
    for _, e in scored:
        for c in e.cues:
            if c.threat is not None:
                threats.append(c.threat)
            elif e.sentiment < 0 and c.weight < 0:
                cues.append(c.text)
    low = min((e.sentiment for _, e in scored), default=float("nan"))
    return {
        "emotion": conversation_label(scored, neutral),
        "emotion_score": float(low),
        "emotion_cues": list(dict.fromkeys(cues)),
        "escalation_threats": list(dict.fromkeys(threats)),
    }


def add_emotion(cases: pd.DataFrame, cfg: Config, analyzer: EmotionAnalyzer | None = None) -> pd.DataFrame:
    """The case table with the emotion columns added (a copy; the input is not changed): the
    case's label, score, cues and threats, and the curve over the customer's turns.

    Lists and structs stay Python lists and dicts: the store casts them to the types
    `pipeline.schema.CASE_SCHEMA` gives them. Missing values are NaN (floats) and -1
    (emotion_min_turn), as they always were."""
    analyzer = analyzer or EmotionAnalyzer.from_config(cfg)
    neutral = analyzer.rules.lex.neutral_label
    rows = []
    for turns_value, channel in zip(
        cases["turns"] if "turns" in cases else [None] * len(cases),
        cases["channel"] if "channel" in cases else [""] * len(cases),
    ):
        turns = _as_turns(turns_value)
        summary, scored = conversation_emotion(
            turns, analyzer, cfg, asr=str(channel) in ("call", "asr", "voice", "phone")
        )
        rows.append(
            {
                **case_emotion(scored, neutral),
                **summary,
                "emotion_labels": [e.emotion for _, e in scored],
                "emotion_turn_detail": [{"turn": i, **e.as_dict()} for i, e in scored],
            }
        )
    out = cases.copy()
    columns = CASE_EMOTION_COLUMNS + EMOTION_COLUMNS
    extra = pd.DataFrame(rows, columns=list(columns), index=cases.index)
    for c in columns:
        out[c] = extra[c]
    for c in ("emotion_score", "emotion_start", "emotion_end", "emotion_min", "emotion_delta"):
        out[c] = out[c].astype("float64")
    out["emotion_min_turn"] = out["emotion_min_turn"].astype("int64")
    return out


def analyze_texts(texts: Iterable[str], cfg: Config, analyzer: EmotionAnalyzer | None = None) -> list[TurnEmotion]:
    """Free texts (normalised and masked here, as turns are) -> one TurnEmotion each."""
    from pipeline.text.prepare import prepare_text

    analyzer = analyzer or EmotionAnalyzer.from_config(cfg)
    originals = list(texts)
    prepared = [prepare_text(t, cfg) for t in originals]
    return analyzer.analyze(prepared)
