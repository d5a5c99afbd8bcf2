"""Issue type, request kind and urgency classification of cases (issue 3).

Public API:
- `classify_cases(cases, cfg) -> DataFrame`: what the nightly flow calls.
- `classify_texts(texts, cfg)`: the same for raw texts (CLI).
- `train(cfg, labels_path=None)`: fit on labelled texts, save model + card.
- `train_from_conversations(cfg, labels, transcripts)`: one model per label column (issue_type,
  request_kind, outcome) of labelled conversations, each with a card.
- `load_model(cfg)`, `load_taxonomy(cfg)`, `ModelMismatchError`, `LabeledDataError`.
"""

from pipeline.classify.api import (OUTPUT_COLUMNS, REVIEW_LABEL, case_texts, classify_cases, classify_texts,
                                   get_model_status)
from pipeline.classify.conversations import evaluate_conversations, train_from_conversations
from pipeline.classify.data import LabeledDataError, load_labeled
from pipeline.classify.store import ModelMismatchError, load_model, read_card, train
from pipeline.classify.taxonomy import Taxonomy, load_taxonomy

__all__ = ["OUTPUT_COLUMNS", "REVIEW_LABEL", "LabeledDataError", "ModelMismatchError", "Taxonomy", "case_texts",
           "classify_cases", "classify_texts", "evaluate_conversations", "get_model_status", "load_labeled", "load_model", "load_taxonomy", "read_card", "train",
           "train_from_conversations"]
