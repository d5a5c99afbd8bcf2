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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from pipeline.analysis.classify.coldstart import ColdStartIssueClassifier, Encode, default_encoder
from pipeline.analysis.classify.rules import KeywordRules, RequestKindRules, UrgencyScorer
from pipeline.analysis.classify.store import CARD_FILE, ModelMismatchError, load_task_model
from pipeline.analysis.classify.tasks import TASKS, build_inputs, lowest_sentiment, to_float, to_list, to_str
from pipeline.analysis.classify.taxonomy import Taxonomy, load_taxonomy
from pipeline.analysis.classify.text import get_backend
from pipeline.config import ClassifyConfig, Config
from pipeline.schema import CLASSIFY_COLUMNS

log = logging.getLogger(__name__)

OUTPUT_COLUMNS: tuple[str, ...] = CLASSIFY_COLUMNS  # declared once in pipeline.schema
REVIEW_LABEL = "待人工"

_MODEL_CACHE: dict[tuple[str, str, float], Any] = {}
# A trained model and its card, or None when the task has none (rules decide).
Loaded = tuple[Any, dict[str, Any]] | None


def _card_path(cfg: Config, task: str) -> Path:
    from pipeline.analysis.classify.store import task_dir

    return task_dir(cfg, task) / CARD_FILE


def get_task_model(cfg: Config, task: str) -> tuple[Any, dict[str, Any]] | None:
    """A task's trained model if one exists and fits the taxonomy, else None (rules are used).

    A mismatching model is logged loudly rather than raised: the nightly run must still produce
    labels, and `casemine train` / `casemine classify` show the same message to a person.
    """
    card_path = _card_path(cfg, task)
    if not card_path.is_file():
        return None
    tax_path = cfg.resolve(cfg.classify.taxonomy)
    key = (task, f"{card_path}|{tax_path}", card_path.stat().st_mtime + tax_path.stat().st_mtime)
    if key not in _MODEL_CACHE:
        try:
            _MODEL_CACHE[key] = load_task_model(cfg, task)
        except ModelMismatchError as e:
            log.warning("using the rules for %s: %s", task, e)
            _MODEL_CACHE[key] = None
    return _MODEL_CACHE[key]


def get_model(cfg: Config) -> tuple[Any, dict[str, Any]] | None:
    """The trained issue-type model (text or case model), or None."""
    return get_task_model(cfg, "issue_type")


def get_model_status(cfg: Config) -> str | None:
    """A message for a person when a saved model cannot be used (None when all is well or no
    model exists): the CLI prints it so a stale model is never silently replaced by rules."""
    problems = []
    for task in TASKS:
        if not _card_path(cfg, task).is_file():
            continue
        try:
            load_task_model(cfg, task)
        except ModelMismatchError as e:
            problems.append(f"{e} (using the rules for {task} meanwhile)")
    return "; ".join(problems) or None


def _strings(v: Any) -> list[str]:
    return [str(x) for x in to_list(v)]


def case_texts(cases: pd.DataFrame, source: str) -> list[str]:
    """The text each case is classified on (see ClassifyConfig.text_source)."""
    n = len(cases)
    problem = cases["problem"].map(to_str).tolist() if "problem" in cases else [""] * n
    customer = cases["customer_text"].map(to_str).tolist() if "customer_text" in cases else [""] * n
    out = []
    for p, c in zip(problem, customer):
        if source == "customer" or not p.strip():
            out.append(c)
        elif source == "problem+customer" and c and c != p:
            out.append(f"{p}\n{c}")
        else:
            out.append(p)
    return out


def customer_texts(cases: pd.DataFrame) -> list[str]:
    """Everything the customer said in each case (the condensed problem when that is all there is,
    as for `casemine classify` on plain texts)."""
    n = len(cases)
    problem = cases["problem"].map(to_str).tolist() if "problem" in cases else [""] * n
    customer = cases["customer_text"].map(to_str).tolist() if "customer_text" in cases else [""] * n
    return [c if c.strip() else p for p, c in zip(problem, customer)]


IssueResult = tuple[list[str], list[float], list[dict[str, Any]], str]


def _issue_from_model(
    cases: pd.DataFrame,
    settings: ClassifyConfig,
    taxonomy: Taxonomy,
    encoder: Callable[[], Encode | None],
    model: Any,
    card: dict[str, Any],
) -> IssueResult:
    if card.get("input") == "case":
        X: Any = build_inputs(
            "issue_type",
            cases,
            taxonomy,
            encoder() if card.get("uses_prototypes") else None,
            with_prototypes=bool(card.get("uses_prototypes")),
            # Cards written before the agent-side signals existed have no such field: their
            # models never read them.
            agent_signals=bool(card.get("agent_signals")),
        )
        kw_texts = customer_texts(cases)
        # Only the case model names its signal features.
        explain_kw: dict[str, Any] = {"signal_names": card.get("signals", ())}
    else:
        X = kw_texts = case_texts(cases, settings.text_source)
        explain_kw = {}
    proba = model.predict_proba(X)
    best = proba.argmax(axis=1)
    labels = [str(model.classes_[i]) for i in best]
    conf = proba.max(axis=1).astype(float).tolist()
    # Second best: a reviewer deciding between two types wants to see the runner-up.
    second = np.argsort(-proba, axis=1)[:, 1] if proba.shape[1] > 1 else best
    terms = model.explain(X, labels, top_k=settings.evidence_terms, **explain_kw)
    # Taxonomy keywords of the predicted type found in the text: a reviewer reads "发票" more
    # easily than a feature name like "客户:票".
    rules = KeywordRules(taxonomy)
    kw = [{m.label: m.terms for m in rules.match(t)}.get(lab, []) for t, lab in zip(kw_texts, labels)]
    evidence = [
        {
            "method": "model",
            "top_terms": t,
            "keywords": kw[i],
            "runner_up": str(model.classes_[s]),
            "runner_up_confidence": round(float(proba[i, s]), 4),
        }
        for i, (t, s) in enumerate(zip(terms, second))
    ]
    return labels, conf, evidence, str(card["model_id"])


def _issue_cold_start(cases: pd.DataFrame, taxonomy: Taxonomy, encoder: Callable[[], Encode | None]) -> IssueResult:
    encode = encoder() if taxonomy.cold_start.embeddings else None
    cold = ColdStartIssueClassifier(taxonomy, encode)
    res = cold.predict(customer_texts(cases))
    return res.labels, res.confidence, [{"method": "rules", **e} for e in res.evidence], "rules"


def _request_kinds(cases: pd.DataFrame, taxonomy: Taxonomy, loaded: Loaded) -> tuple[list[str], list[dict[str, Any]]]:
    rows = cast(list[dict[str, Any]], cases.to_dict("records"))
    if loaded is not None:
        model, card = loaded
        proba = model.predict_proba(build_inputs("request_kind", cases, taxonomy))
        kinds = [str(model.classes_[i]) for i in proba.argmax(axis=1)]
        return kinds, [
            {"method": "model", "model_id": card["model_id"], "confidence": round(float(p.max()), 4)} for p in proba
        ]
    rules = RequestKindRules(taxonomy)
    texts = customer_texts(cases)
    out = [
        rules.predict_one(t, lowest_sentiment(r), _strings(r.get("escalation_threats"))) for t, r in zip(texts, rows)
    ]
    return [k for k, _ in out], [{"method": "rules", "cues": hits} for _, hits in out]


def _model_outcomes(cases: pd.DataFrame, taxonomy: Taxonomy, loaded: Loaded) -> list[dict[str, Any]] | None:
    """Outcomes from a trained outcome model, written over the rule outcome (whose verdict stays
    in the evidence); None when no outcome model is trained."""
    if loaded is None or "outcome" not in cases:
        return None
    model, card = loaded
    proba = model.predict_proba(build_inputs("outcome", cases, taxonomy))
    labels = [str(model.classes_[i]) for i in proba.argmax(axis=1)]
    rule = cases["outcome"].map(to_str).tolist()
    rule_ev = cases["outcome_evidence"].map(to_str).tolist() if "outcome_evidence" in cases else [""] * len(cases)
    evidence = []
    for p, r, rev in zip(proba, rule, rule_ev):
        evidence.append(
            {
                "method": "model",
                "model_id": card["model_id"],
                "confidence": round(float(p.max()), 4),
                "rules_said": r,
                "rules_evidence": rev,
            }
        )
    cases["outcome"] = labels
    cases["outcome_evidence"] = [
        f"model {e['model_id']} ({e['confidence']:.2f}); rules: {e['rules_said']}"
        + (f" ({e['rules_evidence']})" if e["rules_evidence"] else "")
        for e in evidence
    ]
    return evidence


@dataclass(frozen=True)
class CaseClassifiers:
    """Issue type, request kind, urgency (and a trained outcome), built once per process from the
    config: the taxonomy, the trained models that match it, and the sentence encoder on first use
    (only the cold start and prototype-reading models need it, and loading it costs seconds)."""

    settings: ClassifyConfig
    taxonomy: Taxonomy
    issue_model: Loaded
    request_model: Loaded
    outcome_model: Loaded
    encoder: Callable[[], Encode | None]

    @classmethod
    def from_config(cls, cfg: Config) -> CaseClassifiers:
        return cls(
            cfg.classify,
            load_taxonomy(cfg),
            get_model(cfg),
            get_task_model(cfg, "request_kind"),
            get_task_model(cfg, "outcome"),
            lambda: default_encoder(cfg),
        )

    def transform(self, cases: pd.DataFrame) -> pd.DataFrame:
        """A copy of `cases` with issue type, request kind, urgency, review flag, evidence and the
        classifier id added (see OUTPUT_COLUMNS). Each task uses its trained model when one matches
        the taxonomy, else the cold start (issue type) or the rules; a trained outcome model replaces
        the rule outcome."""
        if "problem" not in cases.columns and "customer_text" not in cases.columns:
            raise ValueError(f"classify_cases needs a 'problem' or 'customer_text' column (got {list(cases.columns)})")
        out = cases.copy()
        taxonomy = self.taxonomy
        n = len(out)
        if n == 0:
            for c, dtype in zip(OUTPUT_COLUMNS, (object, float, object, object, float, float, bool, object, object)):
                out[c] = pd.Series(dtype=dtype)
            return out

        texts = case_texts(out, self.settings.text_source)
        # Urgency cues ("三天了", 12315) often sit in turns the condensed problem leaves out, so it
        # reads everything the customer said.
        full = [
            t if not c or c == t else f"{t}\n{c}"
            for t, c in zip(texts, out["customer_text"].map(to_str) if "customer_text" in out else [""] * n)
        ]

        if self.issue_model is not None:
            labels, conf, evid_issue, classifier = _issue_from_model(
                out, self.settings, taxonomy, self.encoder, *self.issue_model
            )
        else:
            labels, conf, evid_issue, classifier = _issue_cold_start(out, taxonomy, self.encoder)
        kinds, evid_kind = _request_kinds(out, taxonomy, self.request_model)
        evid_outcome = _model_outcomes(out, taxonomy, self.outcome_model)

        scorer = UrgencyScorer(taxonomy, self.settings.urgency_weights)

        def col(name: str, conv: Callable[[Any], Any], default: Any) -> list[Any]:
            return out[name].map(conv).tolist() if name in out else [default] * n

        emo = col("emotion_score", to_float, None)
        cues = col("emotion_cues", _strings, [])
        threats = col("escalation_threats", _strings, [])
        repeat = col(
            "repeat_contact",
            lambda v: bool(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else False,
            False,
        )
        duration = col("duration_s", to_float, None)

        thr = self.settings.review_threshold
        urg, uconf, due, review, evidence = [], [], [], [], []
        for i in range(n):
            u = scorer.score_one(
                full[i],
                repeat_contact=repeat[i],
                emotion_score=emo[i],
                emotion_cues=cues[i],
                escalation_threats=threats[i],
                duration_s=duration[i],
            )
            needs = bool(conf[i] < thr)
            urg.append(u.level)
            uconf.append(u.confidence)
            due.append(u.due_hours)
            review.append(needs)
            ev: dict[str, Any] = {
                "issue_type": evid_issue[i],
                "urgency": {"score": u.score, "signals": u.signals},
                "request_kind": evid_kind[i],
            }
            if evid_outcome is not None:
                ev["outcome"] = evid_outcome[i]
            if needs:
                ev["review"] = f"{REVIEW_LABEL}: confidence {conf[i]:.2f} < review_threshold {thr:.2f}"
            evidence.append(json.dumps(ev, ensure_ascii=False))

        out["issue_type"] = labels
        out["issue_type_confidence"] = np.round(np.asarray(conf, dtype=float), 4)
        out["request_kind"] = kinds
        out["urgency"] = urg
        out["urgency_confidence"] = np.asarray(uconf, dtype=float)
        # float or None (object): the case store converts with pa.array(list), where None becomes a
        # proper null; pandas' NA or NaN would not.
        out["urgency_due_hours"] = pd.Series(
            [None if d is None else float(d) for d in due], index=out.index, dtype=object
        )
        out["needs_review"] = np.asarray(review, dtype=bool)
        out["evidence"] = evidence
        out["classifier"] = classifier
        return out


def classify_cases(cases: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """`CaseClassifiers.from_config(cfg).transform(cases)`, for one-off callers (CLI, evaluation)."""
    return CaseClassifiers.from_config(cfg).transform(cases)


def classify_texts(texts: Sequence[str], cfg: Config, extra: pd.DataFrame | None = None) -> pd.DataFrame:
    """Classify raw texts (CLI input): normalise and mask them like case text first.
    `extra` may carry case columns (repeat_contact, emotion_score, ...) aligned with `texts`."""
    prepare, _, _ = get_backend(cfg)
    frame = extra.reset_index(drop=True).copy() if extra is not None else pd.DataFrame(index=range(len(texts)))
    frame["problem"] = [prepare(t) for t in texts]
    if "customer_text" in frame:
        frame["customer_text"] = frame["customer_text"].map(lambda t: prepare(to_str(t)))
    return classify_cases(frame, cfg)
