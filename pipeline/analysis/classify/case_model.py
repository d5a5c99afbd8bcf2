"""The model trained from labelled conversations: one linear model per label column.

Input is a case record, not a free text: what the customer said, what the agent said, and a few
numbers other steps already computed (taxonomy keyword shares and prototype similarities for the
issue type, complaint cues and the lowest turn sentiment for the request kind, the rule outcome
for the outcome). Each part answers a different question: an agent restates the matter ("为您催促
物流") more cleanly than a customer does; the outcome is in how the chat ends.

Why character n-grams and logistic regression: a few hundred labelled chats, 2 cores, and a
model that must be explainable term by term and stable across folds. Measured on the 497 labelled
JD chats (5 seeds x 5 stratified folds, see conversations.py), these earned their place for the
issue type, each by more than the seed-to-seed spread: the sentence embedding of the customer
side as a dense block (it reads paraphrases the n-grams miss), a soft vote with the cold-start
rules' own confidence on the customer side (`prior_weight`): the rules know the rare types from
the taxonomy, which a few examples cannot teach; and the same rules read on the agent side as
dense signals (`agent_signals_scale` 0.5 on keyword share x 2 and prototype similarity, i.e. x1
and x0.5): the agent restates the matter in the taxonomy's words. That last one took accuracy
0.792 -> 0.819 +- 0.030 and macro-F1 0.688 -> 0.719 +- 0.063 (short of 0.82). Word n-grams
(jieba), SVMs, unbalanced class weights (accuracy and macro-F1 both fell), a prior computed from
both sides (fell) and the agent side's sentence embedding as a second block did not help.

Extra labelled texts of the same taxonomy (complaints written elsewhere: `--extra-labels`) enter
through a second, text-only model trained on them alone: its issue-type probabilities for the
customer side are a small dense block (`extra_model_scale`) that the conversation model weighs per
type. Mixing those texts into the training rows instead shifted the classes towards their style
(review prose is not a chat) and cost macro-F1; as features, the conversation labels decide how far
to trust them. With the 413 dev complaints (issue 13): accuracy 0.818 -> 0.825, macro-F1 0.719 ->
0.725 over 10 seeds x 5 folds, confirmed on 10 other seeds (see conversations.TASK_PARAMS).

Labels with fewer than `min_class_count` examples cannot be learnt (a class seen once is absent
from the training part of its own fold): the model trains without them, says so in
`unlearnt_`, and can still return them when the rule vote names them.
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

from pipeline.analysis.classify.model import Labels, apply_temperature

# {"customer": str, "agent": str, "signals": list[float]} and, per task, "agent_signals",
# "prior" ({label: probability}) and "emb" (list[float]).
CaseInput = dict[str, Any]

# The text-only model of the extra labelled texts: customer side (their only side) as char n-grams
# and its sentence embedding, as the conversation model reads them; no rule vote (the rules already
# speak through the prior), C fixed (a few hundred texts, no labels of the conversations to tune on).
EXTRA_MODEL_PARAMS: dict[str, Any] = {
    "C": 1.0,
    "use_agent": False,
    "signals_scale": 0.0,
    "min_df": 2,
    "emb_scale": 2.0,
    "min_class_count": 2,
}


def _squash(text: str) -> str:
    return "".join((text or "").split())


def _dense(X: Sequence[CaseInput], key: str, used: bool, missing: str) -> np.ndarray | None:
    """The inputs' `key` values as a float matrix when the model reads them (None when it does
    not); a model that reads them refuses inputs without them rather than guessing zeros."""
    if not used:
        return None
    if any(x.get(key) is None for x in X):
        raise ValueError(missing)
    return np.asarray([x[key] for x in X], dtype=np.float64)


class CaseClassifier(BaseEstimator, ClassifierMixin):
    """Char 1-3-gram TF-IDF of the customer side (+ the agent side) + dense signals (+ dense
    signals of the agent side, + the customer-side sentence embedding) -> balanced logistic
    regression, optionally soft-voted with a rule prior.

    `signals_scale` sets how loud the dense signals are next to the sparse text blocks (whose
    rows have unit norm); `emb_scale` does the same for the unit-norm embedding (0: unused, or no
    "emb" in the inputs), and `agent_signals_scale` for the inputs' "agent_signals" (0: unused).
    `extra_model_scale` sets the loudness of the extra text model's probabilities (0: unused, or no
    `extra` given to fit; see the module docstring).
    `prior_weight` w mixes the inputs' "prior" ({label: probability}, the
    rules' verdict) into the output: (1 - w) * model + w * prior; classes the prior names but the
    model never learnt are added to `classes_`. `min_df` 2 drops n-grams seen in one chat only
    (they cannot generalise, and they made the fit four times slower)."""

    def __init__(
        self,
        C: float = 4.0,
        use_agent: bool = True,
        signals_scale: float = 1.0,
        char_ngram: tuple[int, int] = (1, 3),
        min_df: int = 1,
        emb_scale: float = 0.0,
        prior_weight: float = 0.0,
        min_class_count: int = 1,
        agent_signals_scale: float = 0.0,
        extra_model_scale: float = 0.0,
    ) -> None:
        self.C = C
        self.use_agent = use_agent
        self.signals_scale = signals_scale
        self.char_ngram = char_ngram
        self.min_df = min_df
        self.emb_scale = emb_scale
        self.prior_weight = prior_weight
        self.min_class_count = min_class_count
        self.agent_signals_scale = agent_signals_scale
        self.extra_model_scale = extra_model_scale

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Models saved before the agent-side signals existed: they never read them.
        state.setdefault("agent_signals_scale", 0.0)
        # ... and before extra labelled texts could be given: they never read an extra model.
        state.setdefault("extra_model_scale", 0.0)
        state.setdefault("extra_model_", None)
        super().__setstate__(state)

    def _vec(self, n_docs: int) -> TfidfVectorizer:
        # min_df is a count: on a handful of rows (tests, tiny sets) it would leave no vocabulary.
        min_df = self.min_df if n_docs >= 20 * self.min_df else 1
        return TfidfVectorizer(
            analyzer="char", ngram_range=tuple(self.char_ngram), sublinear_tf=True, max_features=200_000, min_df=min_df
        )

    def _emb(self, X: Sequence[CaseInput]) -> np.ndarray | None:
        e = _dense(
            X,
            "emb",
            getattr(self, "emb_used_", False),
            "this model reads the customer-side sentence embedding, but the inputs have none "
            "(is the sentence embedder available?)",
        )
        return None if e is None else e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-12)

    def _agent_signals(self, X: Sequence[CaseInput]) -> np.ndarray | None:
        a = _dense(
            X,
            "agent_signals",
            getattr(self, "agent_signals_used_", False),
            "this model reads rule signals computed on the agent side, but the inputs have none "
            "(build them with agent_signals=True, as the model card's `agent_signals` says)",
        )
        if a is not None and a.shape[1] != self.n_agent_signals_:
            raise ValueError(
                f"the inputs carry {a.shape[1]} agent-side signals but the model was trained on "
                f"{self.n_agent_signals_}: retrain it with `casemine train`"
            )
        return a

    def _blocks(self, X: Sequence[CaseInput], fit: bool) -> sp.csr_matrix:
        cust = [_squash(x.get("customer", "")) for x in X]
        blocks = [self.cust_vec_.fit_transform(cust) if fit else self.cust_vec_.transform(cust)]
        if self.agent_used_:
            agent = [_squash(x.get("agent", "")) for x in X]
            blocks.append(self.agent_vec_.fit_transform(agent) if fit else self.agent_vec_.transform(agent))
        sig = np.asarray([list(x.get("signals") or []) for x in X], dtype=np.float64)
        n_sig = getattr(self, "n_signals_", None)
        if not fit and n_sig is not None and sig.ndim == 2 and sig.shape[1] != n_sig:
            raise ValueError(
                f"the inputs carry {sig.shape[1]} signals but the model was trained on {n_sig}: "
                "retrain it with `casemine train`"
            )
        if sig.ndim == 2 and sig.shape[1]:
            blocks.append(sp.csr_matrix(sig * self.signals_scale))
        agent_sig = self._agent_signals(X)
        if agent_sig is not None:
            blocks.append(sp.csr_matrix(agent_sig * self.agent_signals_scale))
        extra = getattr(self, "extra_model_", None)
        if extra is not None:
            # Before the embedding: feature_names counts the embedding's dimensions as the rest.
            blocks.append(sp.csr_matrix(extra._model_proba(X) * self.extra_model_scale))
        emb = self._emb(X)
        if emb is not None:
            blocks.append(sp.csr_matrix(emb * self.emb_scale))
        return sp.hstack(blocks, format="csr")

    def fit(
        self,
        X: Sequence[CaseInput],
        y: Labels,
        extra: tuple[Sequence[CaseInput], Labels] | None = None,
        extra_model: CaseClassifier | None = None,
    ) -> CaseClassifier:
        """`extra`: labelled inputs of another source (texts, no agent side) for the extra text model;
        they are never training rows of this model. `extra_model`: that model already fitted
        (`fit_extra_model`), for callers fitting many models beside the same extra texts."""
        y = np.asarray(y, dtype=object)
        self.n_rows_ = len(y)
        labels, counts = np.unique(y, return_counts=True)
        # A label seen fewer than min_class_count times is not learnt (see the module docstring).
        self.unlearnt_ = [str(c) for c, k in zip(labels, counts) if k < self.min_class_count]
        if self.unlearnt_:
            keep = ~np.isin(y, self.unlearnt_)
            X, y = [x for x, k in zip(X, keep) if k], y[keep]
        self.model_classes_ = np.unique(y)
        if len(self.model_classes_) < 2:
            raise ValueError("need at least two different labels to train a classifier")
        self.cust_vec_ = self._vec(len(X))
        self.agent_vec_ = self._vec(len(X))
        # A task that gives no agent text (request kind) has no agent block at all.
        self.agent_used_ = self.use_agent and any(_squash(x.get("agent", "")) for x in X)
        self.emb_used_ = bool(self.emb_scale) and bool(len(X)) and X[0].get("emb") is not None
        self.n_signals_ = len(X[0].get("signals") or []) if len(X) else 0
        self.agent_signals_used_ = (
            bool(self.agent_signals_scale) and bool(len(X)) and X[0].get("agent_signals") is not None
        )
        self.n_agent_signals_ = len(X[0].get("agent_signals") or []) if self.agent_signals_used_ else 0
        if not self.extra_model_scale:
            self.extra_model_ = None
        else:
            self.extra_model_ = extra_model if extra_model is not None else fit_extra_model(*extra) if extra else None
        Xm = self._blocks(X, fit=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf_ = LogisticRegression(C=self.C, class_weight="balanced", max_iter=3000).fit(Xm, y)
        coef = self.clf_.coef_
        self.coef_ = np.vstack([-coef[0], coef[0]]) if coef.shape[0] == 1 else coef
        prior_labels = {str(k) for x in X for k in (x.get("prior") or {})} if self.prior_weight else set()
        self.classes_ = np.asarray(
            sorted(
                set(self.model_classes_) | prior_labels | set(self.unlearnt_)
                if self.prior_weight
                else self.model_classes_
            ),
            dtype=object,
        )
        return self

    def _model_proba(self, X: Sequence[CaseInput]) -> np.ndarray:
        """The logistic model's probabilities over `classes_` (0 for classes it never learnt)."""
        p = self.clf_.predict_proba(self._blocks(X, fit=False))
        model_classes = getattr(self, "model_classes_", self.classes_)
        if len(model_classes) == len(self.classes_):
            return p
        col = {c: i for i, c in enumerate(self.classes_)}
        out = np.zeros((len(X), len(self.classes_)))
        out[:, [col[c] for c in model_classes]] = p
        return out

    def _prior(self, X: Sequence[CaseInput]) -> np.ndarray:
        P = np.zeros((len(X), len(self.classes_)))
        col = {c: i for i, c in enumerate(self.classes_)}
        for r, x in enumerate(X):
            for k, v in (x.get("prior") or {}).items():
                if k in col:
                    P[r, col[k]] = float(v)
        s = P.sum(axis=1, keepdims=True)
        # No prior for a row: the model alone decides it.
        return np.where(s > 0, P / np.where(s > 0, s, 1.0), np.nan)

    def predict_proba(self, X: Sequence[CaseInput]) -> np.ndarray:
        proba = self._model_proba(X)
        w = getattr(self, "prior_weight", 0.0)
        if w:
            prior = self._prior(X)
            has = ~np.isnan(prior[:, 0])
            proba[has] = (1 - w) * proba[has] + w * prior[has]
        return apply_temperature(proba, getattr(self, "temperature_", 1.0))

    def predict(self, X: Sequence[CaseInput]) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def feature_names(self, signal_names: Sequence[str] = ()) -> np.ndarray:
        names = [f"客户:{n}" for n in self.cust_vec_.get_feature_names_out()]
        if self.agent_used_:
            names += [f"客服:{n}" for n in self.agent_vec_.get_feature_names_out()]
        # signal_names lists the customer-side signals, then the agent-side ones (tasks.signal_names).
        n_agent = getattr(self, "n_agent_signals_", 0)
        sig = list(signal_names)
        if len(sig) < self.n_signals_ + n_agent:
            sig = [f"signal{i}" for i in range(self.n_signals_)] + [f"agent_signal{i}" for i in range(n_agent)]
        names += [f"信号:{s}" for s in sig[: self.n_signals_]]
        names += [f"信号:{s}" for s in sig[self.n_signals_ : self.n_signals_ + n_agent]]
        extra = getattr(self, "extra_model_", None)
        if extra is not None:
            names += [f"{_EXTRA_NAME}:{c}" for c in extra.classes_]
        if getattr(self, "emb_used_", False):
            names += [f"{_EMB_NAME}#{i}" for i in range(self.clf_.coef_.shape[1] - len(names))]
        return np.asarray(names, dtype=object)

    def explain(
        self, X: Sequence[CaseInput], labels: Sequence[str], top_k: int = 5, signal_names: Sequence[str] = ()
    ) -> list[list[dict[str, Any]]]:
        """Per input, the features pushing hardest toward its given label: coef x value. The
        embedding's dimensions mean nothing one by one, so they are summed into one term; a
        label only the rule vote can give is explained by that vote."""
        Xm = self._blocks(X, fit=False)
        names = self.feature_names(signal_names)
        is_emb = np.asarray([str(n).startswith(_EMB_NAME) for n in names])
        model_classes = list(getattr(self, "model_classes_", self.classes_))
        idx = {c: i for i, c in enumerate(model_classes)}
        prior = self._prior(X) if getattr(self, "prior_weight", 0.0) else None
        col = {c: i for i, c in enumerate(self.classes_)}
        out = []
        for r, label in enumerate(labels):
            if label not in idx:
                p = prior[r, col[label]] if prior is not None and label in col else np.nan
                out.append([{"term": _PRIOR_NAME, "weight": round(float(p), 4)}] if p == p and p > 0 else [])
                continue
            row = Xm.getrow(r)
            contrib = row.data * self.coef_[idx[label]][row.indices]
            emb_mask = is_emb[row.indices]
            terms = [(str(names[row.indices[i]]), float(contrib[i])) for i in np.flatnonzero(~emb_mask)]
            if emb_mask.any():
                terms.append((_EMB_NAME, float(contrib[emb_mask].sum())))
            terms.sort(key=lambda t: -t[1])
            out.append([{"term": t, "weight": round(w, 4)} for t, w in terms[:top_k] if w > 0])
        return out


def fit_extra_model(inputs: Sequence[CaseInput], labels: Labels) -> CaseClassifier | None:
    """The text-only model of extra labelled texts (None without texts). It depends on the texts
    alone, not on the conversations' folds or C: cross-validation fits it once."""
    return CaseClassifier(**EXTRA_MODEL_PARAMS).fit(inputs, labels) if len(inputs) else None


_EMB_NAME = "嵌入:客户原话整体语义"
_PRIOR_NAME = "规则投票"
_EXTRA_NAME = "外部标注文本模型"
