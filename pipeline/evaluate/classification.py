"""Issue-type classification quality on labelled data (`casemine eval classify`).

Why both numbers side by side: the rules are what a deployment gets on day one, the trained
model what labelling buys; showing the two on the same rows tells a team whether labelling more
is worth it. Why cross-validation (and optionally nested): the dev set is small, one split
would be noise; the plain CV score of the variant that won the selection is optimistic, the
nested one (selection redone inside every outer fold) is not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from pipeline.analysis.classify.data import load_labeled
from pipeline.analysis.classify.model import DEFAULT_CANDIDATES, cv_splits, select_model
from pipeline.analysis.classify.rules import KeywordRules
from pipeline.analysis.classify.taxonomy import Taxonomy, load_taxonomy
from pipeline.analysis.classify.text import CachedTokenizer, get_backend
from pipeline.config import Config
from pipeline.io import atomic_write_json, atomic_write_text


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], order: Sequence[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1/support over the labels present in y_true, their macro mean,
    accuracy, and the confusion matrix (rows true, columns predicted) over every label seen."""
    present = [c for c in order if c in set(y_true)] + sorted(set(y_true) - set(order))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    cm_labels = present + [c for c in order if c in set(y_pred) and c not in present]
    cm = confusion_matrix(y_true, y_pred, labels=cm_labels)
    return {
        "macro_f1": round(float(np.mean(f)), 4),
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "per_class": {
            c: {
                "precision": round(float(p[i]), 4),
                "recall": round(float(r[i]), 4),
                "f1": round(float(f[i]), 4),
                "support": int(s[i]),
            }
            for i, c in enumerate(present)
        },
        "confusion": {"labels": cm_labels, "matrix": cm.tolist()},
    }


def abstention(
    y_true: Sequence[str], y_pred: Sequence[str], conf: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, Any]:
    """What the review threshold does: share sent to review, accuracy of what is kept vs sent."""
    yt, yp, c = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object), np.asarray(conf)
    keep = c >= threshold
    acc = lambda m: round(float((yt[m] == yp[m]).mean()), 4) if m.any() else None  # noqa: E731
    return {
        "threshold": threshold,
        "needs_review_share": round(float((~keep).mean()), 4),
        "accuracy_kept": acc(keep),
        "accuracy_sent_to_review": acc(~keep),
    }


def evaluate_classification(
    cfg: Config, labels_path: Path, *, nested: bool = False, folds: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Rules vs trained model on one labelled file/folder, cross-validated."""
    t0 = time.perf_counter()
    taxonomy: Taxonomy = load_taxonomy(cfg)
    data = load_labeled(Path(labels_path), taxonomy)
    prepare, cut, tok_name = get_backend(cfg)
    texts = [prepare(t) for t in data.frame["text"]]
    y = data.frame["label"].tolist()
    order = taxonomy.labels
    thr = cfg.classify.review_threshold
    folds = folds or cfg.classify.cv_folds

    rules = KeywordRules(taxonomy)
    rule_res = [rules.predict_one(t) for t in texts]
    rule_pred = [r[0] for r in rule_res]
    report: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": {
            "path": str(labels_path),
            "sha256": data.sha256,
            "rows": len(y),
            "skipped_rows": data.skipped,
            "label_counts": {k: int(v) for k, v in data.frame["label"].value_counts().items()},
            "labels_absent": [c for c in order if c not in set(y)],
        },
        "tokenizer": tok_name,
        "metric_note": "macro-F1 averages the labels present in the data (types with no examples cannot be scored)",
        "rules": {
            **classification_metrics(y, rule_pred, order),
            **{"abstention": abstention(y, rule_pred, [r[1] for r in rule_res], thr)},
        },
    }
    if len(set(y)) < 2:
        report["model"] = {"error": "only one label in the data: nothing to train"}
        return report

    tokenizer = CachedTokenizer(cut, tok_name)
    _, results, splits, skipped = select_model(texts, y, tokenizer=tokenizer, taxonomy=taxonomy, folds=folds, seed=seed)
    best = max(results, key=lambda r: (round(r.macro_f1, 4), -results.index(r)))
    report["model"] = {
        "cv": {"folds": len(splits), "stratified": True, "seed": seed},
        "candidates": [
            {"name": r.name, "macro_f1": round(r.macro_f1, 4), "accuracy": round(r.accuracy, 4)} for r in results
        ],
        "skipped_candidates": skipped,
        "chosen": best.name,
        **classification_metrics(y, best.y_pred, order),
        "abstention": abstention(y, best.y_pred, best.confidence, thr),
    }
    if nested:
        # Selection redone on each outer training fold; the outer test fold is never seen by it.
        outer = cv_splits(y, folds, seed + 1)
        pred = np.empty(len(y), dtype=object)
        conf = np.zeros(len(y))
        chosen: list[str] = []
        for train, test in outer:
            tr_texts, tr_y = [texts[i] for i in train], [y[i] for i in train]
            m, inner, _, _ = select_model(
                tr_texts,
                tr_y,
                tokenizer=tokenizer,
                taxonomy=taxonomy,
                folds=folds,
                candidates=DEFAULT_CANDIDATES,
                seed=seed,
            )
            proba = m.predict_proba([texts[i] for i in test])
            pred[test] = m.classes_[proba.argmax(axis=1)]
            conf[test] = proba.max(axis=1)
            chosen.append(max(inner, key=lambda r: (round(r.macro_f1, 4), -inner.index(r))).name)
        report["model_nested"] = {
            "outer_folds": len(outer),
            "chosen_per_fold": chosen,
            **classification_metrics(y, list(pred), order),
            "abstention": abstention(y, list(pred), conf, thr),
        }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _md_table(m: dict[str, Any]) -> list[str]:
    lines = ["| type | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for c, v in m["per_class"].items():
        lines.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    lines.append(f"| **macro** | | | **{m['macro_f1']:.3f}** | {sum(v['support'] for v in m['per_class'].values())} |")
    return lines


def _md_confusion(m: dict[str, Any]) -> list[str]:
    labels, mat = m["confusion"]["labels"], m["confusion"]["matrix"]
    lines = ["| true \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {labels[i]} | " + " | ".join(str(x) for x in row) + " |" for i, row in enumerate(mat)]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    d = report["data"]
    out = [
        f"# Issue-type classification: {d['path']}",
        "",
        f"{d['rows']} rows (sha256 {d['sha256'][:12]}); labels absent from the data: "
        f"{', '.join(d['labels_absent']) or 'none'}. {report['metric_note']}.",
        "",
    ]
    sections = [("Rules only (cold start, no training)", report["rules"])]
    if "candidates" in report.get("model", {}):
        m = report["model"]
        out += (
            [
                "## Model selection (cross-validated macro-F1)",
                "",
                "| variant | macro-F1 | accuracy |",
                "|---|---:|---:|",
            ]
            + [f"| {c['name']} | {c['macro_f1']:.3f} | {c['accuracy']:.3f} |" for c in m["candidates"]]
            + [""]
        )
        sections.append(
            (f"Trained model: {m['chosen']} ({m['cv']['folds']}-fold CV; optimistic, it won the selection)", m)
        )
    if "model_nested" in report:
        sections.append(("Trained model, nested CV (unbiased)", report["model_nested"]))
    for title, m in sections:
        a = m["abstention"]
        out += [
            f"## {title}",
            "",
            f"macro-F1 **{m['macro_f1']:.3f}**, accuracy {m['accuracy']:.3f}. "
            f"At review_threshold {a['threshold']}: {a['needs_review_share']:.0%} to review; accuracy kept "
            f"{a['accuracy_kept']}, sent to review {a['accuracy_sent_to_review']}.",
            "",
        ]
        out += _md_table(m) + ["", "Confusion matrix:", ""] + _md_confusion(m) + [""]
    return "\n".join(out) + "\n"


def write_reports(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, md = out_dir / "classification.json", out_dir / "classification.md"
    atomic_write_json(j, report)
    atomic_write_text(md, to_markdown(report))
    return j, md


def summary_line(report: dict[str, Any]) -> str:
    parts = [f"rules macro-F1 {report['rules']['macro_f1']:.3f}"]
    if "macro_f1" in report.get("model", {}):
        parts.append(f"model ({report['model']['chosen']}) CV macro-F1 {report['model']['macro_f1']:.3f}")
    if "model_nested" in report:
        parts.append(f"nested CV macro-F1 {report['model_nested']['macro_f1']:.3f}")
    return "; ".join(parts)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, ensure_ascii=False)
