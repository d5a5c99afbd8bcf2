"""The review queue: the least certain stored cases, exported for labelling (active learning).

Why least-confident first: a label on a case the model already gets right with 0.95 teaches it
little; the cases near the decision boundary are the ones whose labels move it most per minute
of a reviewer's time.

Why the file has empty `issue_type`, `request_kind` and `outcome` columns next to `predicted_*`
ones: the labelled file goes straight back into `casemine train --labels FILE --transcripts DIR`
(one model per filled column, rows left empty skipped) or, with its `text` column,
`casemine train --labels FILE`; a prediction must never be read back as a label.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.analysis.classify.api import classify_cases
from pipeline.config import Config
from pipeline.io import atomic_write_text

LABEL_COLUMNS = ("issue_type", "request_kind", "outcome")
QUEUE_COLUMNS = (
    "case_id",
    "conversation_id",
    "date",
    "channel",
    "text",
    "predicted_issue_type",
    "issue_type_confidence",
    "predicted_request_kind",
    "predicted_outcome",
    "urgency",
    "classifier",
    *LABEL_COLUMNS,
)
_CLASSIFY_OUTPUTS = (
    "issue_type",
    "issue_type_confidence",
    "needs_review",
    "evidence",
    "classifier",
    "request_kind",
    "urgency",
    "urgency_confidence",
    "urgency_due_hours",
)


def review_queue(cfg: Config, out_root: Path, n: int = 50, out_file: Path | None = None) -> tuple[Path, pd.DataFrame]:
    """Write the `n` least certain cases under `out_root/processed/cases/` to a CSV with empty
    label columns; returns the path and the rows."""
    from pipeline.storage.store import cases_dir, read_cases

    cases = read_cases(out_root)
    if cases.empty:
        raise ValueError(f"no stored cases under {cases_dir(out_root)}; run `casemine run` first")
    # Stored confidences came from whatever model was current that night; re-score with the
    # current one so the queue reflects what the model is unsure about now.
    scored = classify_cases(cases.drop(columns=[c for c in _CLASSIFY_OUTPUTS if c in cases.columns]), cfg)
    scored["text"] = scored["problem"].fillna("")
    scored = scored[scored["text"].str.strip() != ""]
    # Same text twice (a customer's repeated complaint) would cost two labels for one lesson.
    scored = scored.sort_values(["issue_type_confidence", "case_id"]).drop_duplicates("text")
    queue = scored.head(n).copy()
    queue = queue.rename(
        columns={
            "issue_type": "predicted_issue_type",
            "request_kind": "predicted_request_kind",
            "outcome": "predicted_outcome",
        }
    )
    for c in LABEL_COLUMNS:
        queue[c] = ""
    queue = queue[[c for c in QUEUE_COLUMNS if c in queue.columns]]
    path = out_file or (out_root / "review" / "review_queue.csv")
    # utf-8-sig: the file is meant to be opened in a spreadsheet, which needs the BOM for Chinese.
    atomic_write_text(Path(path), "\ufeff" + queue.to_csv(index=False))
    return Path(path), queue
