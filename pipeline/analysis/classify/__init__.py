"""Issue type, request kind and urgency classification of cases.

Public API:
- `CaseClassifiers.from_config(cfg)`: built once per process; `.transform(cases)` is what the
  nightly flow calls (`classify_cases(cases, cfg)` builds and applies it in one call).
- `classify_texts(texts, cfg)`: the same for raw texts (CLI).
- `train(cfg, labels_path=None)`: fit on labelled texts, save model + card.
- training on labelled conversations: `conversations.train_on` (the transcripts are made into
  cases by `pipeline.orchestrate.training.train_from_conversations`).
- `load_model(cfg)`, `load_taxonomy(cfg)`, `ModelMismatchError`, `LabeledDataError`.
"""

from pipeline.analysis.classify.api import (
    OUTPUT_COLUMNS,
    REVIEW_LABEL,
    CaseClassifiers,
    case_texts,
    classify_cases,
    classify_texts,
    get_model_status,
)
from pipeline.analysis.classify.data import LabeledDataError, load_labeled
from pipeline.analysis.classify.store import ModelMismatchError, load_model, read_card, train
from pipeline.analysis.classify.taxonomy import Taxonomy, load_taxonomy

__all__ = [
    "CaseClassifiers",
    "OUTPUT_COLUMNS",
    "REVIEW_LABEL",
    "LabeledDataError",
    "ModelMismatchError",
    "Taxonomy",
    "case_texts",
    "classify_cases",
    "classify_texts",
    "get_model_status",
    "load_labeled",
    "load_model",
    "load_taxonomy",
    "read_card",
    "train",
]
