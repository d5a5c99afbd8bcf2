"""The supervised issue-type classifier: TF-IDF word n-grams (jieba tokens) + character n-grams
(+ optional taxonomy keyword scores, + optional sentence embeddings) into a linear model with
calibrated probabilities.

Why this shape: complaint texts are short and the labelled sets small (hundreds to a few
thousand rows), where sparse linear models are strong, fast on 2 cores and explainable term by
term. Word n-grams carry meaning; character n-grams survive segmentation errors and unseen
compounds (外卖小哥, 充不进电). `class_weight="balanced"` because the streams are very
imbalanced (质量问题 ~54 %, 发票 <1 %) and the rare types are exactly the ones routing must not
lose; candidates are compared on macro-F1 so every type counts equally.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from pipeline.analysis.classify.rules import KeywordRules
from pipeline.analysis.classify.taxonomy import Taxonomy

# Labels as callers hold them: a list, or an object array (a DataFrame column's values).
Labels = Sequence[str] | np.ndarray


def _token_ngrams(tokens: Sequence[str], n_max: int = 2) -> list[str]:
    """Word 1..n_max-grams of an already segmented text (module level so models pickle)."""
    toks = list(tokens)
    out = list(toks)
    for n in range(2, n_max + 1):
        out.extend(" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1))
    return out


def _squash(text: str) -> str:
    return "".join(text.split())


class TextClassifier(BaseEstimator, ClassifierMixin):
    """sklearn-style classifier on raw (prepared) texts.

    `tokenizer` and `embed` are callables bound at run time (the segmenter and embedder belong
    to the deployment, not to the pickle); they are dropped when the model is saved and re-bound
    by `pipeline.analysis.classify.store.load_model`.
    """

    def __init__(
        self,
        features: str = "word+char",
        model: str = "lr",
        C: float = 4.0,
        word_ngram_max: int = 2,
        char_ngram: tuple[int, int] = (1, 3),
        tokenizer: Callable[[str], list[str]] | None = None,
        taxonomy: Taxonomy | None = None,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        rules_scale: float = 0.5,
        random_state: int = 0,
    ) -> None:
        self.features = features
        self.model = model
        self.C = C
        self.word_ngram_max = word_ngram_max
        self.char_ngram = char_ngram
        self.tokenizer = tokenizer
        self.taxonomy = taxonomy
        self.embed = embed
        self.rules_scale = rules_scale
        self.random_state = random_state

    # -- features -------------------------------------------------------------------------
    @property
    def _parts(self) -> set[str]:
        return set(self.features.split("+"))

    def _blocks(self, texts: Sequence[str], fit: bool) -> sp.csr_matrix:
        blocks = []
        parts = self._parts
        if "word" in parts:
            if self.tokenizer is None:
                raise RuntimeError("TextClassifier has no tokenizer bound; load it with load_model(cfg)")
            toks = [self.tokenizer(t) for t in texts]
            if fit:
                self.word_vec_ = TfidfVectorizer(
                    analyzer=partial(_token_ngrams, n_max=self.word_ngram_max),
                    sublinear_tf=True,
                    min_df=1,
                    max_features=300_000,
                )
                blocks.append(self.word_vec_.fit_transform(toks))
            else:
                blocks.append(self.word_vec_.transform(toks))
        if "char" in parts:
            sq = [_squash(t) for t in texts]
            if fit:
                self.char_vec_ = TfidfVectorizer(
                    analyzer="char",
                    ngram_range=tuple(self.char_ngram),
                    sublinear_tf=True,
                    min_df=1,
                    max_features=300_000,
                )
                blocks.append(self.char_vec_.fit_transform(sq))
            else:
                blocks.append(self.char_vec_.transform(sq))
        if "rules" in parts:
            if self.taxonomy is None:
                raise RuntimeError("the +rules feature variant needs the taxonomy")
            # log1p keeps one strong keyword from swamping the text features.
            blocks.append(sp.csr_matrix(np.log1p(KeywordRules(self.taxonomy).scores(texts)) * self.rules_scale))
        if "emb" in parts:
            if self.embed is None:
                raise RuntimeError(
                    "this model uses sentence embeddings but no embedder is available "
                    "(pipeline.embed); retrain without embeddings: casemine train"
                )
            blocks.append(sp.csr_matrix(np.asarray(self.embed(list(texts)), dtype=np.float64)))
        if not blocks:
            raise ValueError(f"unknown feature set {self.features!r}")
        return sp.hstack(blocks, format="csr")

    def feature_names(self) -> np.ndarray:
        names: list[str] = []
        parts = self._parts
        if "word" in parts:
            names += [f"词:{n}" for n in self.word_vec_.get_feature_names_out()]
        if "char" in parts:
            names += [f"字:{n}" for n in self.char_vec_.get_feature_names_out()]
        if "rules" in parts:
            names += [f"规则:{n}" for n in self.taxonomy.labels]  # type: ignore[union-attr]
        if "emb" in parts:
            names += [f"向量:{i}" for i in range(self.n_features_in_ - len(names))]
        return np.asarray(names, dtype=object)

    # -- estimator API --------------------------------------------------------------------
    def fit(self, X: Sequence[str], y: Labels) -> TextClassifier:
        y = np.asarray(y, dtype=object)
        Xm = self._blocks(X, fit=True)
        self.n_features_in_ = Xm.shape[1]
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("need at least two different labels to train a classifier")
        with warnings.catch_warnings():
            # Tiny classes (2 examples of 发票) trigger fold-size warnings that are expected here.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.model == "lr":
                # newton-cg: on these wide sparse matrices lbfgs took 5x longer for the same fit.
                clf = LogisticRegression(C=self.C, class_weight="balanced", solver="newton-cg", max_iter=500)
                clf.fit(Xm, y)
                self.coef_ = clf.coef_
            elif self.model == "svm":
                base = LinearSVC(C=self.C, class_weight="balanced", random_state=self.random_state)
                min_count = int(min(np.unique(y, return_counts=True)[1]))
                if min_count < 2:
                    raise ValueError("svm calibration needs at least 2 examples of every label")
                clf = CalibratedClassifierCV(base, method="sigmoid", cv=max(2, min(3, min_count)))
                clf.fit(Xm, y)
                # The calibrated model averages per-fold SVMs; for evidence one SVM on all the
                # data gives the same term weights up to noise.
                self.coef_ = (
                    LinearSVC(C=self.C, class_weight="balanced", random_state=self.random_state).fit(Xm, y).coef_
                )
            else:
                raise ValueError(f"unknown model {self.model!r} (use 'lr' or 'svm')")
        if self.coef_.shape[0] == 1:  # binary: sklearn stores one row for the positive class
            self.coef_ = np.vstack([-self.coef_[0], self.coef_[0]])
        self.clf_ = clf
        return self

    def predict_proba(self, X: Sequence[str]) -> np.ndarray:
        proba = self.clf_.predict_proba(self._blocks(X, fit=False))
        return apply_temperature(proba, getattr(self, "temperature_", 1.0))

    def predict(self, X: Sequence[str]) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def explain(self, X: Sequence[str], labels: Sequence[str], top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Per text, the features pushing hardest toward its given label: coef × feature value."""
        Xm = self._blocks(X, fit=False)
        names = self.feature_names()
        idx = {c: i for i, c in enumerate(self.classes_)}
        out = []
        for r, label in enumerate(labels):
            row = Xm.getrow(r)
            coef = self.coef_[idx[label]]
            contrib = row.data * coef[row.indices]
            order = np.argsort(-contrib)[:top_k]
            out.append(
                [
                    {"term": str(names[row.indices[i]]), "weight": round(float(contrib[i]), 4)}
                    for i in order
                    if contrib[i] > 0
                ]
            )
        return out

    # The segmenter and embedder are re-bound at load; pickling them would tie the model to one
    # machine's dictionaries and drag a neural model into the joblib file.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["tokenizer"] = None
        state["embed"] = None
        return state


@dataclass
class Candidate:
    name: str
    params: dict[str, Any]


# A small grid. On the 413 dev complaints a 60-point sweep (features x C x rule scale, two CV
# seeds) put word+char+rules at C 0.5-2 on top (macro-F1 0.50-0.56) and plain word+char at
# ~0.49; neighbouring settings differed by less than the seed-to-seed noise (~0.03), so a wider
# search would mostly select noise.
DEFAULT_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("word+char/lr/C=0.5", {"features": "word+char", "model": "lr", "C": 0.5}),
    Candidate("word+char/lr/C=2", {"features": "word+char", "model": "lr", "C": 2.0}),
    Candidate("word/lr/C=1", {"features": "word", "model": "lr", "C": 1.0}),
    Candidate("char/lr/C=1", {"features": "char", "model": "lr", "C": 1.0}),
    Candidate("word+char/svm/C=0.5", {"features": "word+char", "model": "svm", "C": 0.5}),
    # Taxonomy keyword scores as 12 extra features: the rules' knowledge helps the rare types
    # the text alone has 2-15 examples of.
    Candidate("word+char+rules/lr/C=0.5", {"features": "word+char+rules", "model": "lr", "C": 0.5}),
    Candidate("word+char+rules/lr/C=1", {"features": "word+char+rules", "model": "lr", "C": 1.0}),
    Candidate("word+char+rules/lr/C=2", {"features": "word+char+rules", "model": "lr", "C": 2.0}),
)
EMBEDDING_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("word+char+emb/lr/C=4", {"features": "word+char+emb", "model": "lr", "C": 4.0}),
)


@dataclass
class CVResult:
    name: str
    params: dict[str, Any]
    macro_f1: float
    accuracy: float
    y_pred: list[str] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)  # out-of-fold max probability
    proba: np.ndarray | None = None  # out-of-fold probabilities, columns = sorted labels


def cv_splits(y: Labels, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds; fewer folds when the data cannot fill them (tiny sets)."""
    y = np.asarray(y, dtype=object)
    n_splits = max(2, min(folds, len(y) // 2))
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only 2 members"
        return list(skf.split(np.zeros(len(y)), y))


def apply_temperature(proba: np.ndarray, t: float) -> np.ndarray:
    """Probabilities rescaled as softmax(log p / t): t < 1 sharpens, t > 1 flattens; the argmax
    never changes."""
    if t == 1.0:
        return proba
    logp = np.log(np.clip(proba, 1e-12, 1.0)) / t
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(proba: np.ndarray, y: Labels, classes: np.ndarray) -> float:
    """The temperature minimising log-loss of out-of-fold probabilities.

    Why: an L2-regularised, class-balanced logistic model over 10+ types spreads its probability
    thin (on the dev complaints 3 in 4 predictions had max probability < 0.45 while 75 % were
    right), which would send most cases to review. One scalar fitted on held-out predictions
    fixes the scale without touching the ranking."""
    from scipy.optimize import minimize_scalar

    idx = {c: i for i, c in enumerate(classes)}
    rows = np.arange(len(y))
    cols = np.array([idx[c] for c in y])

    def nll(log_t: float) -> float:
        p = apply_temperature(proba, float(np.exp(log_t)))
        return float(-np.log(np.clip(p[rows, cols], 1e-12, 1.0)).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(5.0)), method="bounded")
    return round(float(np.exp(res.x)), 4)


def cross_val_predict_texts(
    make: Callable[[], TextClassifier], texts: Sequence[str], y: Labels, splits: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold labels, confidences (max probability) and probabilities (columns: the sorted
    labels of y; a label missing from a fold's training part gets 0) for every row."""
    texts = list(texts)
    y = np.asarray(y, dtype=object)
    classes = np.unique(y)
    col = {c: i for i, c in enumerate(classes)}
    pred = np.empty(len(y), dtype=object)
    conf = np.zeros(len(y))
    full = np.zeros((len(y), len(classes)))
    for train, test in splits:
        m = make().fit([texts[i] for i in train], y[train])
        proba = m.predict_proba([texts[i] for i in test])
        pred[test] = m.classes_[proba.argmax(axis=1)]
        conf[test] = proba.max(axis=1)
        full[np.ix_(test, np.array([col[c] for c in m.classes_], dtype=np.intp))] = proba
    return pred, conf, full


def macro_f1(y_true: Labels, y_pred: Labels) -> float:
    """Macro-F1 over the labels present in y_true: a taxonomy type with no examples in the data
    cannot be scored, and must not drag the mean to zero."""
    labels = sorted(set(y_true))
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def select_model(
    texts: Sequence[str],
    y: Labels,
    *,
    tokenizer: Callable[[str], list[str]],
    taxonomy: Taxonomy,
    folds: int = 5,
    candidates: Sequence[Candidate] = DEFAULT_CANDIDATES,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[TextClassifier, list[CVResult], list[tuple[np.ndarray, np.ndarray]], list[dict[str, str]]]:
    """Cross-validate every candidate, pick the best macro-F1 (ties: the earlier, simpler one),
    refit it on all rows. Returns the fitted model, every candidate's CV result, the folds and
    the candidates that could not be trained (with why)."""
    splits = cv_splits(y, folds, seed)
    skipped: list[dict[str, str]] = []
    results: list[CVResult] = []
    for cand in candidates:

        def make(p: dict[str, Any] = cand.params) -> TextClassifier:
            return TextClassifier(**p, tokenizer=tokenizer, taxonomy=taxonomy, embed=embed, random_state=seed)

        try:
            pred, conf, proba = cross_val_predict_texts(make, texts, y, splits)
        except ValueError as e:
            # A variant that cannot train on this data (svm calibration with singleton labels in
            # a fold) is skipped and recorded, not fatal.
            skipped.append({"name": cand.name, "reason": str(e)})
            continue
        results.append(
            CVResult(
                cand.name,
                dict(cand.params),
                macro_f1(y, pred),
                float(accuracy_score(y, pred)),
                [str(p) for p in pred],
                conf.tolist(),
                proba,
            )
        )
    if not results:
        raise ValueError(f"no model variant could be trained: {skipped}")
    best = max(results, key=lambda r: (round(r.macro_f1, 4), -results.index(r)))
    model = TextClassifier(**best.params, tokenizer=tokenizer, taxonomy=taxonomy, embed=embed, random_state=seed).fit(
        list(texts), list(y)
    )
    assert best.proba is not None  # cross_val_predict_texts gave every result its probabilities
    model.temperature_ = fit_temperature(best.proba, list(y), np.unique(np.asarray(y, dtype=object)))
    best.confidence = apply_temperature(best.proba, model.temperature_).max(axis=1).tolist()
    return model, results, splits, skipped
