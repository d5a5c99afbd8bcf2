"""How the trained model's recipe holds on review domains it never saw, against a plain baseline.

Why here and not in the model module: it is an experiment over the model and the rules together
(the product's join), run from `casemine emotion eval`, not something training needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.analysis.emotion.combine import EmotionAnalyzer
from pipeline.analysis.emotion.model import EmotionModel, make_baseline_model, make_text_model
from pipeline.analysis.emotion.rules import RuleScorer
from pipeline.config import Config


def _shift_auc(
    make,
    train_texts: list[str],
    train_y: np.ndarray,
    test_texts: list[str],
    test_y: np.ndarray,
    analyzer: EmotionAnalyzer | None = None,
) -> float:
    """AUC of a recipe trained on one domain and scored on another; with `analyzer`, of what the
    product reports (the model joined with the rules as configured)."""
    from sklearn.metrics import roc_auc_score

    pipe = make().fit(train_texts, train_y.astype(str))
    if analyzer is not None:
        joined = EmotionAnalyzer(analyzer.rules, EmotionModel(pipe, "polarity", {}), analyzer.mode, analyzer.weight)
        return float(roc_auc_score(test_y, [e.sentiment for e in joined.analyze(test_texts)]))
    proba = pipe.predict_proba(test_texts)[:, list(pipe.classes_).index("1")]
    return float(roc_auc_score(test_y, proba))


def _reviews_by_domain(reviews_dir: Path, per_domain: int, seed: int) -> pd.DataFrame:
    """Both review corpora as (text, label, domain): waimai is one domain, each online_shopping
    category another; deduplicated, texts labelled both ways dropped, at most `per_domain` texts
    per domain (label-stratified)."""
    frames = [pd.read_csv(reviews_dir / "waimai_10k.csv", encoding="utf-8-sig", dtype=str).assign(cat="外卖")]
    frames.append(pd.read_csv(reviews_dir / "online_shopping_10_cats.csv", encoding="utf-8-sig", dtype=str))
    df = pd.concat(frames, ignore_index=True)
    df = pd.DataFrame(
        {
            "text": df["review"].fillna("").str.lstrip("\ufeff").str.strip(),
            "label": df["label"].astype(int),
            "domain": df["cat"].fillna(""),
        }
    )
    df = df[df["text"].str.len() > 0]
    both = df.groupby("text")["label"].nunique()
    df = df[~df["text"].isin(set(both[both > 1].index))].drop_duplicates("text")
    parts = []
    for _, g in df.groupby("domain"):
        if per_domain and len(g) > per_domain:
            g = pd.concat(
                [
                    x.sample(n=max(1, round(per_domain * len(x) / len(g))), random_state=seed)
                    for _, x in g.groupby("label")
                ]
            )
        parts.append(g)
    return pd.concat(parts, ignore_index=True)


def evaluate_domain_shift(
    cfg: Config,
    reviews_dir: Path,
    per_domain: int = 1500,
    seed: int = 0,
    methods: dict[str, Any] | None = None,
    with_rules: bool = True,
) -> dict[str, Any]:
    """AUC on reviews from a domain the model never saw, for the trained model's recipe and the
    plain baseline in the same run: train on food delivery, test on shopping and the reverse; and
    within shopping, leave one category out (酒店 = hotel reviews, ...). Texts are prepared as turns
    are (normalised, masked)."""
    from pipeline.text.prepare import prepare_text

    methods = methods or {"trained": make_text_model, "baseline": make_baseline_model}
    analyzer = (
        EmotionAnalyzer(RuleScorer.from_config(cfg), None, cfg.emotion.model_mode, cfg.emotion.model_weight)
        if with_rules
        else None
    )
    data = _reviews_by_domain(Path(reviews_dir), per_domain, seed)
    data["text"] = [prepare_text(t, cfg) for t in data["text"]]
    shop = data["domain"] != "外卖"
    splits: list[tuple[str, np.ndarray, np.ndarray]] = [
        ("外卖 -> online_shopping", (~shop).to_numpy(), shop.to_numpy()),
        ("online_shopping -> 外卖", shop.to_numpy(), (~shop).to_numpy()),
    ]
    for cat in sorted(set(data.loc[shop, "domain"])):
        test = (data["domain"] == cat).to_numpy()
        splits.append((f"online_shopping without {cat} -> {cat}", shop.to_numpy() & ~test, test))
    texts, y = data["text"].tolist(), data["label"].to_numpy()
    rows: list[dict[str, Any]] = []
    for name, tr, te in splits:
        tr_t, te_t = [texts[i] for i in np.flatnonzero(tr)], [texts[i] for i in np.flatnonzero(te)]
        aucs = {m: round(_shift_auc(make, tr_t, y[tr], te_t, y[te]), 4) for m, make in methods.items()}
        if analyzer is not None:
            aucs[f"trained+rules ({analyzer.mode})"] = round(
                _shift_auc(make_text_model, tr_t, y[tr], te_t, y[te], analyzer), 4
            )
        rows.append({"split": name, "train": int(tr.sum()), "test": int(te.sum()), "auc": aucs})
    summary: dict[str, dict[str, Any]] = {}
    for group, sel in (("cross_corpus", rows[:2]), ("leave_one_category_out", rows[2:])):
        summary[group] = {m: round(float(np.mean([r["auc"][m] for r in sel])), 4) for m in sel[0]["auc"]}
        if {"trained", "baseline"} <= set(methods):
            diffs = [r["auc"]["trained"] - r["auc"]["baseline"] for r in sel]
            summary[group]["trained_minus_baseline"] = {
                "mean": round(float(np.mean(diffs)), 4),
                "min": round(float(np.min(diffs)), 4),
                "wins": int(sum(d >= 0 for d in diffs)),
                "of": len(diffs),
            }
    return {"per_domain": per_domain, "seed": seed, "splits": rows, "summary": summary}
