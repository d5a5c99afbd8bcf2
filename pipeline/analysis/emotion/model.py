"""The trained text model: make, train (cross-validated, with a model card), save and load.

Why apart from the rules: the model is optional (the rules work alone) and pulls in
scikit-learn and joblib, which only training and a configured model need.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.analysis.emotion.lexicon import load_emotion_lexicon
from pipeline.config import Config

MODEL_FILE = "model.joblib"
CARD_FILE = "model_card.json"

# -- trained model ----------------------------------------------------------------------------


@dataclass
class EmotionModel:
    """A scikit-learn text model: `polarity` (p(positive) -> sentiment 2p-1) or `label` (service
    emotion labels, each mapped to a sentiment by the label's sign)."""

    pipeline: Any
    kind: Literal["polarity", "label"]
    card: dict[str, Any]

    def sentiment(self, texts: Sequence[str]) -> np.ndarray:
        proba = self.pipeline.predict_proba(list(texts))
        classes = [str(c) for c in self.pipeline.classes_]
        if self.kind == "polarity":
            return 2 * proba[:, classes.index("1")] - 1
        sign = np.array([_LABEL_SIGN.get(c, 0.0) for c in classes])
        return proba @ sign

    def labels(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        proba = self.pipeline.predict_proba(list(texts))
        classes = [str(c) for c in self.pipeline.classes_]
        return [(classes[i], float(p[i])) for p, i in zip(proba, proba.argmax(axis=1))]


_LABEL_SIGN = {"愤怒": -1.0, "不满": -0.7, "失望": -0.7, "焦虑": -0.4, "平静": 0.0, "满意": 0.8}


def make_text_model(seed: int = 0):
    """Character 1-3-gram TF-IDF + logistic regression: Chinese needs no segmenter for it, and it
    was the best of the simple models on the review corpora (see pipeline.evaluate.emotion)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True, max_features=300_000),
        LogisticRegression(C=4.0, max_iter=2000, random_state=seed),
    )


def make_baseline_model(seed: int = 0):
    """The plain reference the trained model must at least match on unseen domains: character
    1-3-gram TF-IDF and scikit-learn's default logistic regression, nothing tuned."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 3)), LogisticRegression(max_iter=2000, random_state=seed)
    )


class EmotionDataError(ValueError):
    """Labelled emotion data the user must fix (missing columns, one class, unknown labels)."""


_TEXT_COLUMNS = ("text", "review", "content", "sentence")
_LABEL_COLUMNS = ("label", "polarity", "emotion", "sentiment")


def read_labelled(path: Path, cfg: Config) -> tuple[pd.DataFrame, Literal["polarity", "label"], dict[str, Any]]:
    """(frame with text/label, kind, provenance): CSV/JSONL/Parquet file or a folder of them, a
    text column and a 1/0 polarity or a service emotion label. Texts are normalised and masked the
    way turns are, so the model sees at training what it sees in production."""
    from pipeline.io import sha256_file
    from pipeline.labelled import labeled_files, read_table
    from pipeline.text.prepare import prepare_text

    files = labeled_files(path) if path.exists() else []
    if not files:
        raise EmotionDataError(f"no labelled files (*.csv, *.jsonl, *.parquet) at {path}")
    frames, meta = [], []
    for f in files:
        df = read_table(f)
        df.columns = [str(c).lstrip("\ufeff").strip() for c in df.columns]
        tcol = next((c for c in _TEXT_COLUMNS if c in df.columns), None)
        lcol = next((c for c in _LABEL_COLUMNS if c in df.columns), None)
        if tcol is None or lcol is None:
            raise EmotionDataError(
                f"{f} needs a text column ({', '.join(_TEXT_COLUMNS)}) and a label column "
                f"({', '.join(_LABEL_COLUMNS)}); found {list(df.columns)}"
            )
        sub = pd.DataFrame(
            {
                "text": df[tcol].fillna("").astype(str).str.lstrip("\ufeff").str.strip(),
                "label": df[lcol].fillna("").astype(str).str.strip(),
            }
        )
        sub["label"] = sub["label"].str.replace(r"\.0$", "", regex=True)
        frames.append(sub[(sub["text"] != "") & (sub["label"] != "")])
        meta.append({"path": str(f), "sha256": sha256_file(f), "rows": len(df), "used": len(frames[-1])})
    frame = pd.concat(frames, ignore_index=True).drop_duplicates("text", keep="first")
    labels = set(frame["label"])
    if labels <= {"0", "1"}:
        kind: Literal["polarity", "label"] = "polarity"
    else:
        allowed = set(load_emotion_lexicon(cfg).labels)
        if unknown := labels - allowed:
            raise EmotionDataError(
                f"labels {sorted(unknown)} are neither 1/0 polarity nor service emotions {sorted(allowed)}"
            )
        kind = "label"
    if len(labels) < 2:
        raise EmotionDataError(f"{path}: only one label ({', '.join(labels) or 'none'}); a model needs two or more")
    frame["text"] = [prepare_text(t, cfg) for t in frame["text"]]
    return (
        frame.reset_index(drop=True),
        kind,
        {
            "files": meta,
            "rows": int(len(frame)),
            "label_counts": {k: int(v) for k, v in frame["label"].value_counts().items()},
        },
    )


def train_emotion(cfg: Config, labels: Path, model_dir: Path | None = None) -> tuple[EmotionModel, dict[str, Any]]:
    """Train on labelled texts, cross-validate, save model + model card under models/emotion/."""
    import sklearn
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from pipeline.io import atomic_write_bytes, atomic_write_json

    frame, kind, provenance = read_labelled(Path(labels), cfg)
    X, y = frame["text"].tolist(), frame["label"].to_numpy()
    folds = min(cfg.emotion.cv_folds, int(pd.Series(y).value_counts().min()))
    cv: dict[str, Any] = {"folds": folds}
    if folds >= 2:
        proba = cross_val_predict(
            make_text_model(), X, y, cv=StratifiedKFold(folds, shuffle=True, random_state=0), method="predict_proba"
        )
        classes = sorted(set(y))
        pred = np.array(classes)[proba.argmax(axis=1)]
        cv["accuracy"] = round(float(accuracy_score(y, pred)), 4)
        if kind == "polarity":
            cv["auc"] = round(float(roc_auc_score((y == "1").astype(int), proba[:, classes.index("1")])), 4)
        else:
            cv["macro_f1"] = round(float(f1_score(y, pred, average="macro")), 4)
    pipe = make_text_model().fit(X, y)
    created = datetime.now(UTC)
    card = {
        "model_id": f"emotion-{kind}-{created.strftime('%Y%m%dT%H%M%SZ')}",
        "created_at": created.isoformat(),
        "kind": kind,
        "classes": [str(c) for c in pipe.classes_],
        "features": "character 1-3-gram TF-IDF (sublinear), min_df 2, on normalised+masked text",
        "estimator": "LogisticRegression(C=4)",
        "training_data": provenance,
        "cv": cv,
        "use": f"emotion.model_mode={cfg.emotion.model_mode}, model_weight={cfg.emotion.model_weight}",
        "sklearn": sklearn.__version__,
        "limits": "trained on the given texts only; review-style text differs from chat turns (short, "
        "conversational), so check it on your own turns before replacing the rules",
    }
    target = model_dir or cfg.resolve(cfg.emotion.model_dir)
    import io

    import joblib

    buf = io.BytesIO()
    joblib.dump({"pipeline": pipe, "kind": kind}, buf)
    atomic_write_bytes(Path(target) / MODEL_FILE, buf.getvalue())
    atomic_write_json(Path(target) / CARD_FILE, card)
    return EmotionModel(pipe, kind, card), card


def load_emotion_model(cfg: Config, model_dir: Path | None = None) -> EmotionModel | None:
    """The trained model, or None when none was trained (the rules then work alone)."""
    d = Path(model_dir or cfg.resolve(cfg.emotion.model_dir))
    if cfg.emotion.model_mode == "ignore" or not (d / MODEL_FILE).is_file():
        return None
    import joblib

    blob = joblib.load(d / MODEL_FILE)
    card = json.loads((d / CARD_FILE).read_text(encoding="utf-8")) if (d / CARD_FILE).is_file() else {}
    return EmotionModel(blob["pipeline"], blob["kind"], card)
