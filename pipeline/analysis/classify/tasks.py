"""What each trained task reads from a case: the same function builds the inputs at training
(from labelled conversations) and at run time (from the night's cases), so the two cannot drift.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import pandas as pd

from pipeline.analysis.classify.case_model import CaseInput
from pipeline.analysis.classify.coldstart import ColdStartIssueClassifier, Encode, embed_text
from pipeline.analysis.classify.rules import RequestKindRules
from pipeline.analysis.classify.taxonomy import Taxonomy
from pipeline.schema import OUTCOMES

TASKS: tuple[str, ...] = ("issue_type", "request_kind", "outcome")
# How the end of a chat reads: the customer's last words and the agent's last replies.
_TAIL_CUSTOMER = 2
_TAIL_AGENT = 3


def task_labels(task: str, taxonomy: Taxonomy) -> list[str]:
    """The labels a task may take (labelled data outside them is refused)."""
    if task == "issue_type":
        return taxonomy.labels
    if task == "request_kind":
        return [k.name for k in taxonomy.request_kinds.kinds]
    if task == "outcome":
        return list(OUTCOMES)
    raise ValueError(f"unknown task {task!r} (one of {TASKS})")


def to_str(v: Any) -> str:
    """Text of a case cell: missing and NaN are empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def to_list(v: Any) -> list[Any]:
    """Items of a list cell (Arrow lists arrive as arrays); missing and NaN are empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    return list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]


def lowest_sentiment(row: dict[str, Any]) -> float | None:
    """The emotion step's lowest turn sentiment when it ran, else the case's emotion score."""
    for col in ("emotion_min", "emotion_score"):
        v = to_float(row.get(col))
        if v is not None:
            return v
    return None


def _tail(turns: Any, speaker: str, n: int) -> str:
    texts = [to_str(t.get("text")) for t in to_list(turns) if isinstance(t, dict) and t.get("speaker") == speaker]
    return " ".join(texts[-n:])


def signal_names(task: str, taxonomy: Taxonomy, with_prototypes: bool, agent_signals: bool = False) -> list[str]:
    """Names of the dense signals build_inputs gives: the customer side's, then the agent side's."""
    if task == "issue_type":
        names = [f"关键词:{t}" for t in taxonomy.labels]
        names += [f"原型:{t}" for t in taxonomy.labels] if with_prototypes else []
        if agent_signals:
            names += [f"客服关键词:{t}" for t in taxonomy.labels]
            names += [f"客服原型:{t}" for t in taxonomy.labels] if with_prototypes else []
        return names
    if task == "request_kind":
        return [f"线索:{k.name}" for k in taxonomy.request_kinds.kinds] + ["威胁", "最低情绪"]
    return [f"规则:{o}" for o in OUTCOMES]


class _Memo:
    """An encoder that encodes each distinct text once per batch (the prototype scorer and the
    embedding block read the same customer texts)."""

    def __init__(self, encode: Encode) -> None:
        self.encode = encode
        self.seen: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.seen))
        if todo:
            self.seen.update(zip(todo, np.asarray(self.encode(todo))))
        return np.vstack([self.seen[t] for t in texts]) if texts else np.zeros((0, 1))


def issue_embed_texts(customer: list[str], taxonomy: Taxonomy) -> list[str]:
    """The customer's words as the cold-start prototypes read them (coldstart.embed_text: no
    placeholders, order cards or courtesies), the raw text when nothing else is left."""
    n = taxonomy.cold_start.embed_chars
    return [embed_text(t, n) or t[:n] for t in customer]


def _embed(enc: Encode, texts: list[str]) -> np.ndarray:
    """Embeddings of the texts; an empty text (a chat with no customer words) gets zeros."""
    todo = [i for i, t in enumerate(texts) if t]
    dim_probe = [texts[i] for i in todo] or ["空"]
    vecs = np.asarray(enc(dim_probe), dtype=np.float64)
    out = np.zeros((len(texts), vecs.shape[1]))
    if todo:
        out[todo] = vecs
    return out


# The cold-start classifier's confidence scale (coldstart._confidence): its scores as a softmax.
_PRIOR_SHARPNESS = 1.5


def rule_prior(share: np.ndarray, sim: np.ndarray | None, taxonomy: Taxonomy) -> np.ndarray:
    """The cold-start verdict as probabilities over the taxonomy's types: the softmax of its
    combined scores (keyword share x weight + standardised prototype similarity)."""
    scores = share * taxonomy.cold_start.keyword_weight + (sim if sim is not None else 0.0)
    e = np.exp((scores - scores.max(axis=1, keepdims=True)) * _PRIOR_SHARPNESS)
    return e / e.sum(axis=1, keepdims=True)


def agent_rule_scores(cold: ColdStartIssueClassifier, agent: list[str], taxonomy: Taxonomy) -> np.ndarray:
    """The cold-start rules' two terms read on the agent side: keyword share x the rules' keyword
    weight, then (with an embedder) the standardised prototype similarity, side by side so the
    model weighs each per type. Why: an agent restates the matter in the taxonomy's own words
    ("为您催促物流", "发票已补开") where the customer wanders."""
    share, sim = cold.features(agent)
    kw = share * taxonomy.cold_start.keyword_weight
    return np.hstack([kw, sim]) if sim is not None else kw


def build_inputs(
    task: str,
    cases: pd.DataFrame,
    taxonomy: Taxonomy,
    encode: Encode | None = None,
    with_prototypes: bool = False,
    agent_signals: bool = False,
) -> list[CaseInput]:
    """One input per case row for `task` (see the module docstring of case_model). With
    `agent_signals` (issue type only; a model card says whether its model reads them) each input
    also carries the agent side's rule scores."""
    rows = cast(list[dict[str, Any]], cases.to_dict("records"))
    if task == "issue_type":
        customer = [to_str(r.get("customer_text")) or to_str(r.get("problem")) for r in rows]
        enc = _Memo(encode) if with_prototypes and encode is not None else None
        cold = ColdStartIssueClassifier(taxonomy, enc)
        share, sim = cold.features(customer)
        if with_prototypes and sim is None:
            raise ValueError("this issue-type model uses prototype similarities but no sentence embedder is available")
        sig = np.hstack([share, sim]) if sim is not None else share
        prior = rule_prior(share, sim, taxonomy)
        agent_sig: Any = (
            agent_rule_scores(cold, [to_str(r.get("agent_text")) for r in rows], taxonomy)
            if agent_signals
            else [None] * len(rows)
        )
        # The customer side's sentence embedding, as the prototypes read it (same texts, so the
        # memo encodes each once).
        emb = _embed(enc, issue_embed_texts(customer, taxonomy)) if enc is not None else [None] * len(rows)
        return [
            {
                "customer": c,
                "agent": to_str(r.get("agent_text")),
                "signals": s.tolist(),
                "prior": dict(zip(taxonomy.labels, (round(float(v), 6) for v in p))),
                "emb": None if e is None else [float(v) for v in e],
                "agent_signals": None if a is None else [float(v) for v in a],
            }
            for c, r, s, p, e, a in zip(customer, rows, sig, prior, emb, agent_sig)
        ]
    if task == "request_kind":
        rules = RequestKindRules(taxonomy)
        out = []
        for r in rows:
            text = to_str(r.get("customer_text")) or to_str(r.get("problem"))
            out.append(
                {
                    "customer": text,
                    "agent": "",
                    "signals": rules.signals(text, lowest_sentiment(r), to_list(r.get("escalation_threats"))),
                }
            )
        return out
    if task == "outcome":
        out = []
        for r in rows:
            rule = to_str(r.get("outcome"))
            out.append(
                {
                    "customer": _tail(r.get("turns"), "customer", _TAIL_CUSTOMER),
                    "agent": _tail(r.get("turns"), "agent", _TAIL_AGENT) or to_str(r.get("agent_text")),
                    "signals": [float(rule == o) for o in OUTCOMES],
                }
            )
        return out
    raise ValueError(f"unknown task {task!r} (one of {TASKS})")


def conversation_rows(cases: pd.DataFrame) -> pd.DataFrame:
    """One row per conversation, its cases joined in order: labels describe whole conversations,
    and the few that split into several cases are learnt from as the customer lived them."""
    if cases.empty:
        return cases
    if cases["conversation_id"].is_unique:
        return cases.reset_index(drop=True)
    out = []
    for _, g in cases.sort_values(["conversation_id", "segment"]).groupby("conversation_id", sort=False):
        first, last = g.iloc[0].to_dict(), g.iloc[-1].to_dict()
        row = dict(first)
        row["customer_text"] = " ".join(g["customer_text"].map(to_str))
        row["agent_text"] = " ".join(g["agent_text"].map(to_str))
        row["turns"] = [t for ts in g["turns"] for t in to_list(ts)]
        row["outcome"] = last.get("outcome")
        row["escalation_threats"] = (
            [t for ts in g["escalation_threats"] for t in to_list(ts)] if "escalation_threats" in g else []
        )
        for col in ("emotion_min", "emotion_score"):
            if col in g:
                vals = [v for v in (to_float(x) for x in g[col]) if v is not None]
                row[col] = min(vals) if vals else None
        out.append(row)
    return pd.DataFrame(out)


def to_float(v: Any) -> float | None:
    """A number, or None for missing, unparsable and NaN values (case columns mix all three)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f
