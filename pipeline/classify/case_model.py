"""The model trained from labelled conversations: one linear model per label column.

Input is a case record, not a free text: what the customer said, what the agent said, and a few
numbers other steps already computed (taxonomy keyword shares and prototype similarities for the
issue type, complaint cues and the lowest turn sentiment for the request kind, the rule outcome
for the outcome). Each part answers a different question: an agent restates the matter ("为您催促
物流") more cleanly than a customer does; the outcome is in how the chat ends.

Why character n-grams and logistic regression: a few hundred labelled chats, 2 cores, and a
model that must be explainable term by term and stable across folds; on the 413 complaints and
the 497 JD chats, word n-grams, SVMs and embedding features added no accuracy beyond fold noise.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from pipeline.classify.model import apply_temperature

CaseInput = dict[str, Any]  # {"customer": str, "agent": str, "signals": list[float]}


def _squash(text: str) -> str:
    return "".join((text or "").split())


class CaseClassifier(BaseEstimator, ClassifierMixin):
    """Char 1-3-gram TF-IDF of the customer side (+ the agent side) + dense signals -> balanced
    logistic regression. `signals_scale` sets how loud the dense signals are next to the sparse
    text block (whose rows have unit norm)."""

    def __init__(self, C: float = 4.0, use_agent: bool = True, signals_scale: float = 1.0,
                 char_ngram: tuple[int, int] = (1, 3)) -> None:
        self.C = C
        self.use_agent = use_agent
        self.signals_scale = signals_scale
        self.char_ngram = char_ngram

    def _vec(self) -> TfidfVectorizer:
        return TfidfVectorizer(analyzer="char", ngram_range=tuple(self.char_ngram), sublinear_tf=True,
                               max_features=200_000)

    def _blocks(self, X: Sequence[CaseInput], fit: bool) -> sp.csr_matrix:
        cust = [_squash(x.get("customer", "")) for x in X]
        blocks = [self.cust_vec_.fit_transform(cust) if fit else self.cust_vec_.transform(cust)]
        if self.agent_used_:
            agent = [_squash(x.get("agent", "")) for x in X]
            blocks.append(self.agent_vec_.fit_transform(agent) if fit else self.agent_vec_.transform(agent))
        sig = np.asarray([list(x.get("signals") or []) for x in X], dtype=np.float64)
        if sig.ndim == 2 and sig.shape[1]:
            blocks.append(sp.csr_matrix(sig * self.signals_scale))
        return sp.hstack(blocks, format="csr")

    def fit(self, X: Sequence[CaseInput], y: Sequence[str]) -> "CaseClassifier":
        y = np.asarray(y, dtype=object)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("need at least two different labels to train a classifier")
        self.cust_vec_ = self._vec()
        self.agent_vec_ = self._vec()
        # A task that gives no agent text (request kind) has no agent block at all.
        self.agent_used_ = self.use_agent and any(_squash(x.get("agent", "")) for x in X)
        Xm = self._blocks(X, fit=True)
        self.n_signals_ = len(X[0].get("signals") or []) if len(X) else 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf_ = LogisticRegression(C=self.C, class_weight="balanced", max_iter=3000).fit(Xm, y)
        coef = self.clf_.coef_
        self.coef_ = np.vstack([-coef[0], coef[0]]) if coef.shape[0] == 1 else coef
        return self

    def predict_proba(self, X: Sequence[CaseInput]) -> np.ndarray:
        proba = self.clf_.predict_proba(self._blocks(X, fit=False))
        return apply_temperature(proba, getattr(self, "temperature_", 1.0))

    def predict(self, X: Sequence[CaseInput]) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def feature_names(self, signal_names: Sequence[str] = ()) -> np.ndarray:
        names = [f"客户:{n}" for n in self.cust_vec_.get_feature_names_out()]
        if self.agent_used_:
            names += [f"客服:{n}" for n in self.agent_vec_.get_feature_names_out()]
        sig = list(signal_names) or [f"signal{i}" for i in range(self.n_signals_)]
        return np.asarray(names + [f"信号:{s}" for s in sig[:self.n_signals_]], dtype=object)

    def explain(self, X: Sequence[CaseInput], labels: Sequence[str], top_k: int = 5,
                signal_names: Sequence[str] = ()) -> list[list[dict[str, Any]]]:
        """Per input, the features pushing hardest toward its given label: coef x value."""
        Xm = self._blocks(X, fit=False)
        names = self.feature_names(signal_names)
        idx = {c: i for i, c in enumerate(self.classes_)}
        out = []
        for r, label in enumerate(labels):
            row = Xm.getrow(r)
            contrib = row.data * self.coef_[idx[label]][row.indices]
            order = np.argsort(-contrib)[:top_k]
            out.append([{"term": str(names[row.indices[i]]), "weight": round(float(contrib[i]), 4)}
                        for i in order if contrib[i] > 0])
        return out
