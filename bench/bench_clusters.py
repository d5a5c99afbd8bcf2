"""Clustering quality: casemine's clustering vs BERTopic's default pipeline and sklearn baselines.

All methods cluster the SAME precomputed embeddings (the configured embedder, cached under
--cache), so the comparison is of the clustering, not of the embedding model. Scores: NMI and
ARI against the labels (noise counted as one cluster), cluster count, noise share, seconds.

BERTopic is not a product dependency (optional `bench` extra: bertopic, umap-learn, hdbscan);
when it is not installed its row says so and the sklearn baselines still run.

    .venv/bin/python bench/bench_clusters.py --labels ../shared/data/complaints/dev.csv [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.insights.cluster import ClusterParams, cluster_vectors  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate.clusters import cluster_metrics, load_labelled_texts  # noqa: E402


def product(X: np.ndarray, texts: list[str], params: ClusterParams) -> np.ndarray:
    return cluster_vectors(X, params)


def hdbscan_raw(X: np.ndarray, texts: list[str], params: ClusterParams) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    return HDBSCAN(min_cluster_size=params.min_cluster_size, copy=True).fit_predict(X)


def kmeans(k: int) -> Callable[..., np.ndarray]:
    def run(X: np.ndarray, texts: list[str], params: ClusterParams) -> np.ndarray:
        from sklearn.cluster import KMeans

        return KMeans(k, n_init=10, random_state=0).fit_predict(X)
    return run


def bertopic_default(X: np.ndarray, texts: list[str], params: ClusterParams) -> np.ndarray:
    """BERTopic with its default UMAP + HDBSCAN + c-TF-IDF, fed our embeddings (no model download).
    Chinese has no spaces, so the vectorizer gets jieba tokens (its default one would see whole
    sentences as words); that changes only topic words, not the clustering being scored."""
    import jieba
    from bertopic import BERTopic
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(tokenizer=lambda t: jieba.lcut(t), token_pattern=None)
    model = BERTopic(vectorizer_model=vec, embedding_model=None, calculate_probabilities=False)
    topics, _ = model.fit_transform(texts, embeddings=X)
    return np.asarray(topics, dtype=int)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("bertopic", "umap-learn", "hdbscan", "scikit-learn", "numba"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, default=ROOT.parent / "shared" / "data" / "complaints" / "dev.csv")
    ap.add_argument("--cache", type=Path, default=ROOT / "data", help="output root whose embedding cache is used")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.labels.is_file():
        print(f"labelled data not found at {args.labels}; pass --labels FILE (text,label)", file=sys.stderr)
        raise SystemExit(1)
    cfg = load_config(ROOT / "configs" / "casemine.yaml")
    df = load_labelled_texts(args.labels)
    texts, y = df["text"].tolist(), df["label"].tolist()

    from pipeline.embed import Embedder

    t = time.perf_counter()
    X = np.asarray(Embedder(cfg, out_root=args.cache, show_progress=False).encode_passages(texts), dtype=np.float32)
    embed_s = time.perf_counter() - t
    params = ClusterParams.from_config(cfg)
    methods: dict[str, Callable[..., np.ndarray]] = {
        "casemine (PCA-10 + HDBSCAN)": product,
        "sklearn HDBSCAN on raw 384-d": hdbscan_raw,
        f"KMeans k={df['label'].nunique()} (labels' count)": kmeans(df["label"].nunique()),
        "BERTopic default (UMAP + hdbscan)": bertopic_default,
    }
    rows = []
    for name, fn in methods.items():
        t = time.perf_counter()
        try:
            labels = fn(X, texts, params)
        except ImportError as e:
            rows.append({"method": name, "error": f"not installed: {e}"})
            continue
        rows.append({"method": name, **cluster_metrics(y, labels), "seconds": round(time.perf_counter() - t, 2)})
    result = {"data": str(args.labels), "rows": len(df), "n_labels": int(df["label"].nunique()),
              "embed_seconds": round(embed_s, 1), "params": params.__dict__, "versions": versions(), "results": rows}
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print(f"{len(df)} texts, {result['n_labels']} labels ({args.labels})")
        print(f"{'method':40s} {'NMI':>6s} {'ARI':>6s} {'k':>4s} {'noise':>6s} {'sec':>6s}")
        for r in rows:
            if "error" in r:
                print(f"{r['method']:40s} {r['error']}")
            else:
                print(f"{r['method']:40s} {r['nmi']:6.3f} {r['ari']:6.3f} {r['n_clusters']:4d} "
                      f"{r['noise_share']:6.1%} {r['seconds']:6.2f}")
        print("versions:", result["versions"])
    return result


if __name__ == "__main__":
    main()
