"""Clustering quality: casemine's clustering vs HDBSCAN variants, KMeans baselines and BERTopic.

Two real labelled sets: the hand-labelled complaints (text, label) and the real JD chats, mined
into cases by the nightly steps and scored by their conversation's labelled issue type (what the
product clusters: each case's problem text). All methods cluster the SAME embeddings (the
configured embedder, cached under --cache), so the comparison is of the clustering, not of the
embedding model. Scores: NMI and ARI against the labels (noise counted as one cluster), cluster
count, noise share, seconds; and the same on both halves of 3 seeded splits (each half clustered
on its own: mean, spread, worst), so no method wins on one lucky sample.

The baseline the product must reach is KMeans on the raw embeddings with k chosen by silhouette
over the same range as the product (never from the label count); "KMeans k = label count" is
shown for reference only, since it peeks at the labels.

BERTopic is not a product dependency (optional `bench` extra: bertopic, umap-learn, hdbscan);
when it is not installed its row says so and the other methods still run.

    .venv/bin/python bench/bench_clusters.py [--sets complaints,jddc] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

# Every method on one OpenMP thread, as the product's k search runs: on a busy shared host
# OpenMP's spin-waits slowed these small fits 20-50x, which would time the host, not the method.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate.clusters import cluster_metrics, half_metrics, load_labelled_cases, load_labelled_texts  # noqa: E402
from pipeline.insights.cluster import NOISE, ClusterParams, cluster_vectors, kmeans_by_silhouette, reduce_vectors  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
Method = Callable[[np.ndarray, list[str]], np.ndarray]
BASELINE = "KMeans raw 384-d, silhouette k (baseline)"
PRODUCT = "casemine: PCA-10 + KMeans, silhouette k"


def _k_max(n: int, params: ClusterParams) -> int:
    return min(params.max_clusters, math.isqrt(n))


def _nearest(Z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """HDBSCAN's noise given to the nearest cluster centroid (cosine), for scoring it whole."""
    ks = sorted(set(labels.tolist()) - {NOISE})
    if not ks:
        return np.zeros(len(labels), dtype=int)
    C = np.stack([Z[labels == k].mean(axis=0) for k in ks])
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    out = labels.copy()
    noise = labels == NOISE
    out[noise] = np.asarray(ks)[np.argmax(Z[noise] @ C.T, axis=1)]
    return out


def methods(params: ClusterParams) -> dict[str, Method]:
    from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans
    from sklearn.metrics import silhouette_score

    def hdbscan_pca(X: np.ndarray, reassign: bool) -> np.ndarray:
        Z = reduce_vectors(X, params.pca_components)
        lab = HDBSCAN(min_cluster_size=5, min_samples=2, copy=True).fit_predict(Z)
        return _nearest(Z, lab) if reassign else lab

    def ward_silhouette(X: np.ndarray) -> np.ndarray:
        Z = reduce_vectors(X, params.pca_components)
        best: tuple[float, np.ndarray] | None = None
        for k in range(2, _k_max(len(Z), params) + 1):
            lab = AgglomerativeClustering(k, linkage="ward").fit_predict(Z)
            s = float(silhouette_score(Z, lab))
            if best is None or s > best[0]:
                best = (s, lab)
        assert best is not None
        return best[1]

    def kmeans_fixed(X: np.ndarray, k: int) -> np.ndarray:
        return KMeans(k, n_init=10, random_state=0).fit_predict(X)

    return {
        PRODUCT: lambda X, t: cluster_vectors(X, params),
        BASELINE: lambda X, t: kmeans_by_silhouette(X, _k_max(len(X), params)),
        # Sensitivity: the product with twice the PCA components (is 10 a knife-edge choice?).
        "PCA-20 + KMeans, silhouette k": lambda X, t: cluster_vectors(X, replace(params, pca_components=20)),
        "KMeans raw 384-d, k = sqrt(n/2) rule": lambda X, t: kmeans_fixed(X, max(2, round(math.sqrt(len(X) / 2)))),
        "Ward on PCA-10, silhouette k": lambda X, t: ward_silhouette(X),
        "former casemine: PCA-10 + HDBSCAN 5/2, noise=1": lambda X, t: hdbscan_pca(X, False),
        "PCA-10 + HDBSCAN 5/2, noise -> nearest": lambda X, t: hdbscan_pca(X, True),
        "HDBSCAN raw 384-d (mcs 5), noise=1": lambda X, t: HDBSCAN(min_cluster_size=5, copy=True).fit_predict(X),
        "BERTopic default (UMAP + hdbscan)": bertopic_default,
    }


def bertopic_default(X: np.ndarray, texts: list[str]) -> np.ndarray:
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


def score_set(name: str, X: np.ndarray, texts: list[str], y: list[str], params: ClusterParams) -> list[dict[str, Any]]:
    """Every method on the whole set and on its halves."""
    from sklearn.cluster import KMeans

    all_methods = methods(params)
    k_labels = len(set(y))
    all_methods[f"KMeans raw, k = {k_labels} label count (reference: uses labels)"] = (
        lambda X_, t: KMeans(k_labels, n_init=10, random_state=0).fit_predict(X_))
    rows = []
    text_arr = np.asarray(texts, dtype=object)
    for mname, fn in all_methods.items():
        t0 = time.perf_counter()
        try:
            labels = fn(X, texts)
        except ImportError as e:
            rows.append({"set": name, "method": mname, "error": f"not installed: {e}"})
            continue
        secs = time.perf_counter() - t0
        halves = _halves(X, text_arr, y, fn)
        rows.append({"set": name, "method": mname, **cluster_metrics(y, labels), "seconds": round(secs, 2),
                     "halves": halves})
    return rows


def _halves(X: np.ndarray, texts: np.ndarray, y: list[str], fn: Method) -> dict[str, Any]:
    """half_metrics with each half's texts handed to methods that read them (BERTopic)."""
    index = {X[i].tobytes(): i for i in range(len(X))}

    def cluster(Xh: np.ndarray) -> np.ndarray:
        return fn(Xh, [str(texts[index[v.tobytes()]]) for v in Xh])

    return half_metrics(X, y, cluster)


def load_sets(args: argparse.Namespace, cfg: Any) -> dict[str, tuple[list[str], list[str], str]]:
    """name -> (texts, labels, source) of each requested set that is present."""
    out: dict[str, tuple[list[str], list[str], str]] = {}
    if "complaints" in args.sets:
        if args.labels.is_file():
            df = load_labelled_texts(args.labels)
            out["complaints"] = (df["text"].tolist(), df["label"].tolist(), str(args.labels))
        else:
            print(f"complaints not found at {args.labels}; skipping that set", file=sys.stderr)
    if "jddc" in args.sets:
        if args.transcripts.exists() and args.jddc_labels.is_file():
            t0 = time.perf_counter()
            df, counts = load_labelled_cases(cfg, args.transcripts, args.jddc_labels)
            print(f"mined {counts} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            out["jddc"] = (df["text"].tolist(), df["label"].tolist(), f"{args.transcripts} + {args.jddc_labels}")
        else:
            print(f"JD chats not found at {args.transcripts} / {args.jddc_labels}; skipping that set", file=sys.stderr)
    return out


def print_table(name: str, source: str, n: int, n_labels: int, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {name}: {n} texts, {n_labels} labels ({source})")
    print(f"{'method':58s} {'NMI':>6s} {'ARI':>6s} {'k':>4s} {'noise':>6s} {'sec':>6s} | "
          f"{'halves NMI mean±std (worst)':>28s} {'ARI mean':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:58s} {r['error']}")
            continue
        h = r["halves"]
        print(f"{r['method']:58s} {r['nmi']:6.3f} {r['ari']:6.3f} {r['n_clusters']:4d} {r['noise_share']:6.1%} "
              f"{r['seconds']:6.2f} | {h['nmi_mean']:.3f} ± {h['nmi_std']:.3f} ({h['nmi_min']:.3f})     "
              f"{h['ari_mean']:8.3f}")


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the product reach the label-free KMeans baseline, on the whole set and on the halves?"""
    by = {r["method"]: r for r in rows if "error" not in r}
    p, b = by[PRODUCT], by[BASELINE]
    return {"nmi_full": p["nmi"] >= b["nmi"], "nmi_halves_mean": p["halves"]["nmi_mean"] >= b["halves"]["nmi_mean"],
            "product_nmi": p["nmi"], "baseline_nmi": b["nmi"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sets", default="complaints,jddc", help="comma-separated: complaints, jddc")
    ap.add_argument("--labels", type=Path, default=SHARED / "complaints" / "dev.csv", help="complaints text,label")
    ap.add_argument("--transcripts", type=Path, default=SHARED / "jddc" / "dev.jsonl", help="JD chat transcripts")
    ap.add_argument("--jddc-labels", type=Path, default=SHARED / "jddc-labels" / "dev.jsonl",
                    help="conversation_id -> issue_type of the JD chats")
    ap.add_argument("--cache", type=Path, default=ROOT / "data", help="output root whose embedding cache is used")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.sets = {s.strip() for s in args.sets.split(",") if s.strip()}
    cfg = load_config(ROOT / "configs" / "casemine.yaml")
    sets = load_sets(args, cfg)
    if not sets:
        print("no labelled set found; pass --labels and/or --transcripts with --jddc-labels", file=sys.stderr)
        raise SystemExit(1)

    from pipeline.embed import Embedder

    embedder = Embedder(cfg, out_root=args.cache, show_progress=False)
    params = ClusterParams.from_config(cfg)
    result: dict[str, Any] = {"params": params.__dict__, "versions": versions(), "sets": {}}
    for name, (texts, y, source) in sets.items():
        t0 = time.perf_counter()
        X = np.asarray(embedder.encode_passages(texts), dtype=np.float32)
        embed_s = time.perf_counter() - t0
        rows = score_set(name, X, texts, y, params)
        result["sets"][name] = {"data": source, "rows": len(y), "n_labels": len(set(y)),
                                "embed_seconds": round(embed_s, 1), "results": rows, "verdict": verdict(rows)}
        if not args.json:
            print_table(name, source, len(y), len(set(y)), rows)
            v = result["sets"][name]["verdict"]
            print(f"product reaches the silhouette-KMeans baseline: whole set {v['nmi_full']}, "
                  f"halves mean {v['nmi_halves_mean']}")
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print("versions:", result["versions"])
    return result


if __name__ == "__main__":
    main()
