"""Hybrid case retrieval: dense vectors + BM25 over jieba tokens, fused by reciprocal rank.

Why hybrid: dense vectors find paraphrases ("快递没到" ~ "物流一直不动"), BM25 finds exact product
names, order placeholders and rare terms the small embedding model blurs. Reciprocal-rank fusion
needs no score calibration between the two, which matters because cosine and BM25 scales differ
per query.

The core (`rrf_fuse`, `Bm25`, `Searcher.rank`) is pure over an in-memory `CaseIndex`; loading from
disk and printing live in the CLI and `pipeline.serve`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.config import Config
from pipeline.index import Bm25, CaseIndex, Filters, filter_mask  # noqa: F401  (Bm25 re-exported)

MODES = ("dense", "bm25", "hybrid")
# Fields returned with every hit (what a person needs to judge a similar case).
DISPLAY_FIELDS = ("case_id", "issue_type", "urgency", "channel", "date", "product", "region",
                  "problem", "handling", "outcome")
_JUNK = re.compile(r"^[\s\W_]+$", re.UNICODE)


# -- tokens ----------------------------------------------------------------------------------

_CUTTERS: dict[tuple[str, str], Any] = {}


def _cutter(cfg: Config):
    key = (str(cfg.root), cfg.segment.model_dump_json())
    if key not in _CUTTERS:
        try:
            from pipeline.segment import Segmenter  # the project's segmenter (domain dict, stop words)
        except ImportError:
            Segmenter = None
        if Segmenter is not None:
            _CUTTERS[key] = Segmenter(cfg).cut
        else:
            import jieba

            jieba.setLogLevel(logging.WARNING)
            _CUTTERS[key] = lambda text: [t for t in jieba.lcut(text) if not _JUNK.match(t)]
    return _CUTTERS[key]


def tokenize(cfg: Config, text: str) -> list[str]:
    """BM25 tokens of a text, the same way case `tokens` are made (the project's Segmenter)."""
    return list(_cutter(cfg)(text or ""))


# -- fusion ----------------------------------------------------------------------------------

def rrf_fuse(rankings: Sequence[Sequence[int]], weights: Sequence[float], k: int = 60
             ) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: score(d) = sum_i w_i / (k + rank_i(d)), ranks from 1.

    Items missing from a ranking get nothing from it. Ties keep first-seen order (the first
    ranking wins), so the output is deterministic.
    """
    scores: dict[int, float] = {}
    for ranking, w in zip(rankings, weights):
        if w == 0:
            continue
        for r, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + w / (k + r)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def _top(scores: np.ndarray, k: int, allowed: np.ndarray | None, positive: bool) -> np.ndarray:
    s = scores.astype(np.float64, copy=True)
    if allowed is not None:
        s[~allowed] = -np.inf
    if positive:
        s[s <= 0] = -np.inf
    n_ok = int(np.isfinite(s).sum())
    k = min(k, n_ok)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-s, k - 1)[:k]
    return top[np.argsort(-s[top], kind="stable")]


@dataclass
class Hit:
    row: int
    score: float
    dense: float | None = None
    bm25: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"score": round(self.score, 6)}
        if self.dense is not None:
            d["dense_score"] = round(self.dense, 6)
        if self.bm25 is not None:
            d["bm25_score"] = round(self.bm25, 6)
        return {**d, **self.fields}


class Searcher:
    """Search one `CaseIndex` by text. Holds the query encoder and a lazily built BM25."""

    def __init__(self, cfg: Config, index: CaseIndex, embedder=None):
        self.cfg = cfg
        self.index = index
        self._embedder = embedder

    @property
    def embedder(self):
        if self._embedder is None:
            from pipeline.embed import Embedder

            self._embedder = Embedder(self.cfg, use_cache=False)
        return self._embedder

    @property
    def bm25(self) -> Bm25:
        return self.index.bm25()

    def rank(self, query_vec: np.ndarray | None, query_tokens: list[str] | None, k: int,
             mode: str, allowed: np.ndarray | None = None) -> list[Hit]:
        """Core ranking for one query over metadata rows (pure given the index)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        sc = self.cfg.search
        depth = k if mode != "hybrid" else max(k, sc.fusion_depth)
        rows_allowed = np.flatnonzero(allowed) if allowed is not None else None
        dense_rank: list[int] = []
        dense_score: dict[int, float] = {}
        if mode in ("dense", "hybrid"):
            D, R = self.index.search_vectors(query_vec[None, :], depth, rows_allowed)
            for s, r in zip(D[0], R[0]):
                if r >= 0:
                    dense_rank.append(int(r))
                    dense_score[int(r)] = float(s)
        bm_rank: list[int] = []
        bm_scores: np.ndarray | None = None
        if mode in ("bm25", "hybrid"):
            bm_scores = self.bm25.scores(query_tokens or [])
            bm_rank = [int(r) for r in _top(bm_scores, depth, allowed, positive=True)]
        if mode == "dense":
            ranked = [(r, dense_score[r]) for r in dense_rank]
        elif mode == "bm25":
            ranked = [(r, float(bm_scores[r])) for r in bm_rank]  # type: ignore[index]
        else:
            ranked = rrf_fuse([dense_rank, bm_rank], [sc.dense_weight, sc.bm25_weight], sc.rrf_k)
        hits = []
        for r, s in ranked[:k]:
            hits.append(Hit(r, s, dense_score.get(r),
                            float(bm_scores[r]) if bm_scores is not None else None))
        return hits

    def _fields(self, row: int) -> dict[str, Any]:
        m = self.index.meta
        return {f: (m.at[row, f] if f in m.columns else None) for f in DISPLAY_FIELDS}

    def search_many(self, queries: Sequence[str], k: int = 5, filters: Filters | None = None,
                    mode: str | None = None) -> list[list[Hit]]:
        """The k most similar cases for each query, with display fields."""
        mode = mode or self.cfg.search.mode
        queries = list(queries)
        vecs = self.embedder.encode_queries(queries) if mode != "bm25" and len(self.index) else None
        allowed = filter_mask(self.index.meta, filters)
        out = []
        for i, q in enumerate(queries):
            toks = tokenize(self.cfg, q) if mode != "dense" else None
            hits = self.rank(vecs[i] if vecs is not None else None, toks, k, mode, allowed) if len(self.index) else []
            for h in hits:
                h.fields = self._fields(h.row)
            out.append(hits)
        return out

    def search(self, query: str, k: int = 5, filters: Filters | None = None, mode: str | None = None) -> list[Hit]:
        return self.search_many([query], k, filters, mode)[0]
