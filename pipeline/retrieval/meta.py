"""The index's metadata table and its filters: what a query shows and filters on, per case.

Why apart from the vectors: FAISS holds only vectors and int64 ids, so everything a query shows
or filters on lives in a small table beside it, and a query never scans the processed partitions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# Metadata kept per case: what query display and filters need. `vid` is the FAISS id.
META_COLUMNS: tuple[str, ...] = (
    "case_id",
    "vid",
    "conversation_id",
    "problem",
    "handling",
    "outcome",
    "outcome_evidence",
    "issue_type",
    "urgency",
    "channel",
    "date",
    "product",
    "region",
    "emotion",
    "tokens",
    "text_hash",
)
_STRING_COLS = tuple(c for c in META_COLUMNS if c not in ("vid", "tokens"))
FILTER_FIELDS = ("issue_type", "urgency", "channel", "product", "region")


# -- pure helpers ----------------------------------------------------------------------------


def case_text(problem: str | None, handling: str | None, include_handling: bool) -> str:
    """The text embedded for a case: the condensed problem (plus handling when configured)."""
    p = (problem or "").strip()
    if include_handling and handling:
        return f"{p}\n{handling.strip()}"
    return p


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _str_or_none(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT:
        return None
    return str(v)


def meta_from_cases(cases: pd.DataFrame, include_handling: bool, cut=None) -> pd.DataFrame:
    """Project a case table onto the metadata columns (absent ones become null).

    `tokens` come from the case table (the segmenter's output); missing ones are cut here so BM25
    always has something to match.
    """
    n = len(cases)
    out = pd.DataFrame(index=range(n))
    for c in _STRING_COLS:
        if c == "text_hash":
            continue
        if c in cases.columns:
            out[c] = [_str_or_none(v) for v in cases[c]]
        else:
            out[c] = None
    texts = [case_text(p, h, include_handling) for p, h in zip(out["problem"], out["handling"])]
    out["text_hash"] = [text_hash(t) for t in texts]
    toks: list[list[str]] = []
    src = cases["tokens"].reset_index(drop=True) if "tokens" in cases.columns else [None] * n
    for t, text in zip(src, texts):
        if t is not None and not (isinstance(t, float) and np.isnan(t)) and len(t) > 0:
            toks.append([str(x) for x in t])
        else:
            toks.append(list(cut(text)) if cut else [])
    out["tokens"] = toks
    out["vid"] = np.zeros(n, dtype=np.int64)
    return out[list(META_COLUMNS)]


def filter_mask(meta: pd.DataFrame, filters: Filters | None) -> np.ndarray | None:
    """Boolean mask of metadata rows passing the filters (None when there are no filters)."""
    if filters is None or filters.empty():
        return None
    m = np.ones(len(meta), dtype=bool)
    for f in FILTER_FIELDS:
        want = getattr(filters, f)
        if want:
            m &= meta[f].isin(list(want)).to_numpy()
    if filters.case_ids:
        m &= meta["case_id"].isin(list(filters.case_ids)).to_numpy()
    dates = meta["date"].fillna("")
    if filters.since:
        m &= (dates >= filters.since).to_numpy()
    if filters.until:
        m &= ((dates <= filters.until) & (dates != "")).to_numpy()
    return m


@dataclass
class Filters:
    """Metadata filters; a list field matches any of its values, dates are inclusive YYYY-MM-DD."""

    issue_type: list[str] = field(default_factory=list)
    urgency: list[str] = field(default_factory=list)
    channel: list[str] = field(default_factory=list)
    product: list[str] = field(default_factory=list)
    region: list[str] = field(default_factory=list)
    since: str | None = None
    until: str | None = None
    # Restrict to these cases (the published typical-case library for `query --library`).
    case_ids: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return (
            not any(getattr(self, f) for f in FILTER_FIELDS) and not self.since and not self.until and not self.case_ids
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Filters:
        d = d or {}
        kw: dict[str, Any] = {
            f: list(d.get(f) or []) if not isinstance(d.get(f), str) else [d[f]] for f in FILTER_FIELDS
        }
        return cls(**kw, since=d.get("since"), until=d.get("until"), case_ids=list(d.get("case_ids") or []))
