"""`classify_cases`: the entry point the nightly flow calls, and `classify_texts` for the CLI.

Why issue type and urgency are decided separately: issue type is learnt from labelled text
(model, or keyword rules on day one), while urgency combines signals other steps computed
(repeat contact, emotion, threats, elapsed time) that no labelled data exists for; keeping them
apart lets each be explained on its own in `evidence`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.classify.rules import KeywordRules, RequestKindRules, UrgencyScorer
from pipeline.classify.store import CARD_FILE, ModelMismatchError, load_model
from pipeline.classify.taxonomy import load_taxonomy
from pipeline.classify.text import get_backend
from pipeline.config import Config

log = logging.getLogger(__name__)

OUTPUT_COLUMNS: tuple[str, ...] = ("issue_type", "issue_type_confidence", "request_kind", "urgency",
                                   "urgency_confidence", "urgency_due_hours", "needs_review", "evidence",
                                   "classifier")
REVIEW_LABEL = "待人工"

_MODEL_CACHE: dict[tuple[str, float], Any] = {}


def get_model(cfg: Config) -> tuple[Any, dict[str, Any]] | None:
    """The trained model if one exists and fits the taxonomy, else None (rules are used).

    A mismatching model is logged loudly rather than raised: the nightly run must still produce
    types, and `casemine train` / `casemine classify` show the same message to a person.
    """
    card_path = cfg.resolve(cfg.classify.model_dir) / CARD_FILE
    if not card_path.is_file():
        return None
    tax_path = cfg.resolve(cfg.classify.taxonomy)
    key = (f"{card_path}|{tax_path}", card_path.stat().st_mtime + tax_path.stat().st_mtime)
    if key not in _MODEL_CACHE:
        try:
            _MODEL_CACHE[key] = load_model(cfg)
        except ModelMismatchError as e:
            log.warning("using rule-based issue types: %s", e)
            _MODEL_CACHE[key] = None
    return _MODEL_CACHE[key]


def get_model_status(cfg: Config) -> str | None:
    """A message for a person when a saved model cannot be used (None when all is well or no
    model exists): the CLI prints it so a stale model is never silently replaced by rules."""
    if not (cfg.resolve(cfg.classify.model_dir) / CARD_FILE).is_file():
        return None
    try:
        load_model(cfg)
    except ModelMismatchError as e:
        return f"{e} (using the keyword rules meanwhile)"
    return None


def _str(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def _list(v: Any) -> list[str]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(x) for x in v]
    return [str(v)]


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def case_texts(cases: pd.DataFrame, source: str) -> list[str]:
    """The text each case is classified on (see ClassifyConfig.text_source)."""
    n = len(cases)
    problem = cases["problem"].map(_str).tolist() if "problem" in cases else [""] * n
    customer = cases["customer_text"].map(_str).tolist() if "customer_text" in cases else [""] * n
    out = []
    for p, c in zip(problem, customer):
        if source == "customer" or not p.strip():
            out.append(c)
        elif source == "problem+customer" and c and c != p:
            out.append(f"{p}\n{c}")
        else:
            out.append(p)
    return out


def classify_cases(cases: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """A copy of `cases` with issue type, request kind, urgency, review flag, evidence and the
    classifier id added (see OUTPUT_COLUMNS). Uses the trained model when one matches the
    taxonomy, else the taxonomy's keyword rules."""
    if "problem" not in cases.columns and "customer_text" not in cases.columns:
        raise ValueError("classify_cases needs a 'problem' or 'customer_text' column "
                         f"(got {list(cases.columns)})")
    out = cases.copy()
    taxonomy = load_taxonomy(cfg)
    n = len(out)
    if n == 0:
        for c, dtype in zip(OUTPUT_COLUMNS, (object, float, object, object, float, float, bool, object, object)):
            out[c] = pd.Series(dtype=dtype)
        return out

    texts = case_texts(out, cfg.classify.text_source)
    # Urgency and request-kind cues ("三天了", 12315) often sit in turns the condensed problem
    # leaves out, so they read everything the customer said.
    full = [t if not c or c == t else f"{t}\n{c}"
            for t, c in zip(texts, out["customer_text"].map(_str) if "customer_text" in out else [""] * n)]

    loaded = get_model(cfg)
    evid_issue: list[dict[str, Any]]
    if loaded is not None:
        model, card = loaded
        proba = model.predict_proba(texts)
        best = proba.argmax(axis=1)
        labels = [str(model.classes_[i]) for i in best]
        conf = proba.max(axis=1).astype(float).tolist()
        # Second best: a reviewer deciding between two types wants to see the runner-up.
        second = np.argsort(-proba, axis=1)[:, 1] if proba.shape[1] > 1 else best
        terms = model.explain(texts, labels, top_k=cfg.classify.evidence_terms)
        # Taxonomy keywords of the predicted type found in the text: a reviewer reads "发票" more
        # easily than a feature name like "规则:发票" or "字:票".
        rules = KeywordRules(taxonomy)
        kw = [{m.label: m.terms for m in rules.match(t)}.get(lab, []) for t, lab in zip(texts, labels)]
        evid_issue = [{"method": "model", "top_terms": t, "keywords": kw[i], "runner_up": str(model.classes_[s]),
                       "runner_up_confidence": round(float(proba[i, s]), 4)}
                      for i, (t, s) in enumerate(zip(terms, second))]
        classifier = card["model_id"]
    else:
        rules = KeywordRules(taxonomy)
        res = [rules.predict_one(t) for t in texts]
        labels = [r[0] for r in res]
        conf = [r[1] for r in res]
        evid_issue = [{"method": "rules", **r[2]} for r in res]
        classifier = "rules"

    kinds = RequestKindRules(taxonomy)
    scorer = UrgencyScorer(taxonomy, cfg.classify.urgency_weights)
    col = lambda name, conv, default: out[name].map(conv).tolist() if name in out else [default] * n  # noqa: E731
    emo = col("emotion_score", _float, None)
    cues = col("emotion_cues", _list, [])
    threats = col("escalation_threats", _list, [])
    repeat = col("repeat_contact", lambda v: bool(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else False, False)
    duration = col("duration_s", _float, None)

    thr = cfg.classify.review_threshold
    rk, urg, uconf, due, review, evidence = [], [], [], [], [], []
    for i in range(n):
        kind, kind_hits = kinds.predict_one(full[i], emo[i], threats[i])
        u = scorer.score_one(full[i], repeat_contact=repeat[i], emotion_score=emo[i], emotion_cues=cues[i],
                             escalation_threats=threats[i], duration_s=duration[i])
        needs = bool(conf[i] < thr)
        rk.append(kind)
        urg.append(u.level)
        uconf.append(u.confidence)
        due.append(u.due_hours)
        review.append(needs)
        ev = {"issue_type": evid_issue[i],
              "urgency": {"score": u.score, "signals": u.signals},
              "request_kind": {"cues": kind_hits}}
        if needs:
            ev["review"] = f"{REVIEW_LABEL}: confidence {conf[i]:.2f} < review_threshold {thr:.2f}"
        evidence.append(json.dumps(ev, ensure_ascii=False))

    out["issue_type"] = labels
    out["issue_type_confidence"] = np.round(np.asarray(conf, dtype=float), 4)
    out["request_kind"] = rk
    out["urgency"] = urg
    out["urgency_confidence"] = np.asarray(uconf, dtype=float)
    # float or None (object): the case store converts with pa.array(list), where None becomes a
    # proper null; pandas' NA or NaN would not.
    out["urgency_due_hours"] = pd.Series([None if d is None else float(d) for d in due], index=out.index, dtype=object)
    out["needs_review"] = np.asarray(review, dtype=bool)
    out["evidence"] = evidence
    out["classifier"] = classifier
    return out


def classify_texts(texts: Sequence[str], cfg: Config, extra: pd.DataFrame | None = None) -> pd.DataFrame:
    """Classify raw texts (CLI input): normalise and mask them like case text first.
    `extra` may carry case columns (repeat_contact, emotion_score, ...) aligned with `texts`."""
    prepare, _, _ = get_backend(cfg)
    frame = extra.reset_index(drop=True).copy() if extra is not None else pd.DataFrame(index=range(len(texts)))
    frame["problem"] = [prepare(t) for t in texts]
    if "customer_text" in frame:
        frame["customer_text"] = frame["customer_text"].map(lambda t: prepare(_str(t)))
    return classify_cases(frame, cfg)
