"""Training and evaluating on labelled conversations: the transcripts become cases through the
nightly run's own steps (`pipeline.orchestrate.steps`, through emotion), so a model learns from
exactly the case records it will classify at run time; fitting and scoring are
`pipeline.analysis.classify.conversations`'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.analysis.classify.coldstart import Encode
from pipeline.analysis.classify.conversations import (
    LabelledConversations,
    TaskFit,
    evaluate_on,
    labelled_conversations,
    train_on,
)
from pipeline.analysis.classify.data import LabeledDataError
from pipeline.config import Config


def transcript_cases(cfg: Config, transcripts: Path) -> tuple[pd.DataFrame, dict[str, str], int]:
    """The case table a nightly run would make of these transcripts (through the emotion step), a
    map from every id a labeller may use (as delivered, or as stored after masking) to the stored
    id, and how many records were quarantined."""
    from pipeline.ingest import read_all
    from pipeline.orchestrate.steps import process_conversations

    transcripts = Path(transcripts)
    if not transcripts.exists():
        raise LabeledDataError(
            f"transcripts {transcripts} do not exist; pass the folder (or file) the labelled "
            "conversations were delivered in"
        )
    convs, quarantined = read_all(transcripts, cfg.ingest)
    if not convs:
        raise LabeledDataError(f"no readable conversations under {transcripts} ({quarantined} records quarantined)")
    cases = process_conversations(convs, cfg, "emotion").cases
    # Masking may rename a conversation (an id that is a phone number); the content hash is the
    # same before and after, so it links the delivered id to the stored one.
    by_hash = dict(zip(cases["content_hash"], cases["conversation_id"]))
    ids = {c.conversation_id: by_hash[c.content_hash] for c in convs if c.content_hash in by_hash}
    ids.update({v: v for v in by_hash.values()})
    return cases, ids, quarantined


def labelled(cfg: Config, labels_path: Path, transcripts: Path) -> LabelledConversations:
    cases, ids, _ = transcript_cases(cfg, transcripts)
    return labelled_conversations(cfg, labels_path, transcripts, cases, ids)


def train_from_conversations(
    cfg: Config,
    labels_path: Path,
    transcripts: Path,
    *,
    save: bool = True,
    encode: Encode | None = None,
    extra_labels: Path | None = None,
) -> list[TaskFit]:
    """`casemine train --labels FILE --transcripts DIR [--extra-labels TEXTS]`: one model per
    label column, with its card."""
    extra_labels = _extra_path(cfg, extra_labels)
    data = labelled(cfg, labels_path, transcripts)
    return train_on(cfg, data, labels_path, transcripts, save=save, encode=encode, extra_labels=extra_labels)


def evaluate_conversations(
    cfg: Config,
    labels_path: Path,
    transcripts: Path,
    *,
    seed: int = 2026,
    trained_cv: bool = False,
    extra_labels: Path | None = None,
) -> dict[str, Any]:
    """Cold-start figures against labelled conversations (and, with `trained_cv`, the
    cross-validated figures of the models training would make, reading `extra_labels` as
    training would); nothing is saved."""
    extra_labels = _extra_path(cfg, extra_labels)
    data = labelled(cfg, labels_path, transcripts)
    return evaluate_on(cfg, data, seed=seed, trained_cv=trained_cv, extra_labels=extra_labels)


def _extra_path(cfg: Config, extra_labels: Path | None) -> Path | None:
    """The extra labelled texts: the option's, else classify.extra_labels; checked before the slow
    case mining."""
    if extra_labels is None and cfg.classify.extra_labels is not None:
        extra_labels = cfg.resolve(cfg.classify.extra_labels)
    if extra_labels is not None and not Path(extra_labels).exists():
        raise LabeledDataError(
            f"extra labels {extra_labels} do not exist; pass a CSV/JSONL (or folder) of text,label issue types"
        )
    return extra_labels
