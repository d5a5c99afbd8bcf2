"""Clustering quality on labelled texts or mined cases (`casemine eval clusters`).

Why NMI and ARI against issue-type labels: there are no root-cause labels, but a clustering that
ignores the issue type entirely is not finding causes either; NMI rewards agreement of the two
partitions, ARI punishes lumping everything together. Noise (clusters under `min_cluster_size`)
counts as one extra cluster in both, so leaving cases unclustered is not free; `noise_share` is
reported beside. Why halves: a method chosen on one sample can win by luck, so each figure is also
given on the two halves of a few seeded splits (each half clustered on its own), with the spread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pipeline.config import Config
from pipeline.evaluate.cases import LabelFileError, load_labels, mine_cases
from pipeline.insights.cluster import (
    NOISE,
    ClusterParams,
    centroid_of,
    cluster_vectors,
    fit_clusters,
    match_centroids,
    select_cases,
)
from pipeline.insights.incremental import ScopeModel, assign_to

HALF_SEEDS = (0, 1, 2)


def load_labelled_texts(path: Path) -> pd.DataFrame:
    """`text` and `label` from a CSV or JSONL file; rows missing either are dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a CSV or JSONL file with `text` and `label`")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        df = pd.DataFrame(rows)
    else:
        df = pd.read_csv(path, encoding="utf-8-sig")
    missing = {"text", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks column(s) {sorted(missing)}; it needs `text` and `label`")
    df = df.dropna(subset=["text", "label"])
    df = df[df["text"].astype(str).str.strip() != ""]
    return df.assign(text=df["text"].astype(str), label=df["label"].astype(str)).reset_index(drop=True)


def label_mined_cases(cases: pd.DataFrame, gold: dict[str, dict[str, str]], cfg: Config) -> pd.DataFrame:
    """`text` (what the product clusters: the case's problem, as `select_cases` picks it) and
    `label` (the labelled issue type of the case's conversation) for every clusterable case of a
    labelled conversation. A conversation split into two cases lends its label to both."""
    frame = select_cases(cases, cfg.cluster.min_problem_chars, cfg.cluster.request_kinds)
    label = frame["conversation_id"].astype(str).map(lambda c: gold.get(c, {}).get("issue_type"))
    keep = label.notna()
    return pd.DataFrame(
        {
            "conversation_id": frame.loc[keep, "conversation_id"].astype(str),
            "text": frame.loc[keep, "cluster_text"],
            "label": label[keep].astype(str),
        }
    ).reset_index(drop=True)


def load_labelled_cases(cfg: Config, transcripts: Path, labels_path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Mine the transcripts with the nightly steps and label their cases from a JSONL/CSV file of
    `conversation_id` + `issue_type`. Returns the labelled frame and counts."""
    try:
        gold = load_labels(labels_path)
    except LabelFileError as e:
        raise ValueError(str(e)) from None
    if not any("issue_type" in g for g in gold.values()):
        raise ValueError(f"{labels_path} has no issue_type field to score clusters against")
    if not Path(transcripts).exists():
        raise FileNotFoundError(f"{transcripts} does not exist; pass a transcript file or folder")
    cases, counts = mine_cases(cfg, transcripts)
    df = label_mined_cases(cases, gold, cfg)
    return df, {**counts, "cases": int(len(cases)), "labelled_cases": int(len(df))}


def cluster_metrics(y_true: Sequence[str], labels: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """NMI, ARI, number of clusters and noise share of one clustering."""
    lab = np.asarray(labels, dtype=int)
    return {
        "nmi": round(float(normalized_mutual_info_score(y_true, lab)), 4),
        "ari": round(float(adjusted_rand_score(y_true, lab)), 4),
        "n_clusters": int(len(set(lab.tolist()) - {NOISE})),
        "noise_share": round(float((lab == NOISE).mean()), 4) if len(lab) else 0.0,
    }


def half_metrics(
    X: np.ndarray, y: Sequence[str], cluster: Callable[[np.ndarray], np.ndarray], seeds: Sequence[int] = HALF_SEEDS
) -> dict[str, Any]:
    """NMI and ARI of `cluster` run on each half of seeded random splits: mean, spread (std) and
    worst half, so one lucky sample cannot carry a method."""
    y_arr = np.asarray(y)
    nmis, aris = [], []
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(len(y_arr))
        for idx in (perm[: len(perm) // 2], perm[len(perm) // 2 :]):
            m = cluster_metrics(y_arr[idx].tolist(), cluster(X[idx]))
            nmis.append(m["nmi"])
            aris.append(m["ari"])
    return {
        "halves": len(nmis),
        "nmi_mean": round(float(np.mean(nmis)), 4),
        "nmi_std": round(float(np.std(nmis)), 4),
        "nmi_min": round(float(np.min(nmis)), 4),
        "ari_mean": round(float(np.mean(aris)), 4),
        "ari_std": round(float(np.std(aris)), 4),
    }


def _centroids(X: np.ndarray, labels: np.ndarray) -> tuple[list[int], np.ndarray]:
    ks = sorted(set(labels.tolist()) - {NOISE})
    return ks, (np.stack([centroid_of(X[labels == k]) for k in ks]) if ks else np.zeros((0, X.shape[1])))


def _carried(X_old: np.ndarray, old: np.ndarray, X_new: np.ndarray, new: np.ndarray, threshold: float) -> np.ndarray:
    """`new`'s labels renamed to the `old` label whose centroid they match (as stable ids do);
    unmatched clusters get labels no old cluster has."""
    ko, co = _centroids(X_old, old)
    kn, cn = _centroids(X_new, new)
    mapping = {kn[n]: ko[p] for p, n, _ in match_centroids(co, cn, threshold)}
    fresh = iter(range(10_000, 20_000))
    for k in kn:
        mapping.setdefault(k, next(fresh))
    mapping[NOISE] = NOISE
    return np.array([mapping[int(v)] for v in new])


def id_stability(
    X: np.ndarray,
    params: ClusterParams,
    threshold: float,
    grow: float = 0.11,
    seeds: Sequence[int] = HALF_SEEDS,
    seeded: bool = True,
    noise_quantile: float = 0.01,
) -> dict[str, Any]:
    """What happens to cluster ids when `grow` more cases arrive, on seeded random splits:
    cluster a base of n / (1 + grow) cases, then
    - `stability`: re-cluster all n (KMeans started from the base's centroids when `seeded`) and
      count the base cases whose stable id (centroid matching, as `assign_stable_ids`) is kept;
    - `agree_pca` / `agree_full`: assign only the new cases to the base clusters (the
      incremental export, in the stored PCA space or by cosine in the embedding space) and count
      the new cases given the id the seeded re-cluster gives them (noise counts as one id).
    Means over the splits."""
    stab: list[float] = []
    agree: dict[str, list[float]] = {"pca": [], "full": []}
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(len(X))
        n_base = int(round(len(X) / (1 + grow)))
        base, extra = perm[:n_base], perm[n_base:]
        fit = fit_clusters(X[base], params)
        ko, co = _centroids(X[base], fit.labels)
        again = fit_clusters(X[np.concatenate([base, extra])], params, seeds=co if seeded and len(ko) else None)
        carried = _carried(X[base], fit.labels, X[np.concatenate([base, extra])], again.labels, threshold)
        stab.append(float(np.mean(carried[:n_base] == fit.labels)))
        if not len(ko) or not len(extra):
            continue
        sims = [X[base][fit.labels == k] @ c for k, c in zip(ko, co)]
        model = ScopeModel(
            fit.projection,
            [str(k) for k in ko],
            np.stack([fit.centers[k] for k in ko]),
            co.astype(np.float32),
            np.array([float(np.quantile(s, noise_quantile)) for s in sims]),
        )
        for space in agree:
            pos, _ = assign_to(model, X[extra], space)
            got = np.array([ko[p] if p != NOISE else NOISE for p in pos])
            agree[space].append(float(np.mean(got == carried[n_base:])))
    return {
        "grow": grow,
        "splits": len(stab),
        "seeded": seeded,
        "stability": round(float(np.mean(stab)), 4),
        "stability_min": round(float(np.min(stab)), 4),
        **{f"agree_{k}": round(float(np.mean(v)), 4) if v else None for k, v in agree.items()},
    }


def evaluate_clusters(
    cfg: Config,
    labels_path: Path,
    *,
    transcripts: Path | None = None,
    embedder: Any = None,
    out_root: Path | None = None,
    halves: bool = True,
) -> dict[str, Any]:
    """The product's own clustering (config `cluster`) of labelled texts, scored; with
    `transcripts`, of the cases mined from them, labelled by their conversation's issue type."""
    counts: dict[str, Any] = {}
    if transcripts is not None:
        df, counts = load_labelled_cases(cfg, transcripts, labels_path)
        if df.empty:
            raise ValueError(f"no mined case of {transcripts} has a label in {labels_path} (conversation_id)")
    else:
        df = load_labelled_texts(labels_path)
    if embedder is None:
        from pipeline.embed import Embedder

        embedder = Embedder(cfg, out_root=out_root or cfg.resolve(cfg.paths.out))
    X = np.asarray(embedder.encode_passages(df["text"].tolist()), dtype=np.float32)
    params = ClusterParams.from_config(cfg)
    y = df["label"].tolist()
    labels = cluster_vectors(X, params)
    return {
        **cluster_metrics(y, labels),
        "rows": int(len(df)),
        "n_labels": int(df["label"].nunique()),
        "halves": half_metrics(X, y, lambda Z: cluster_vectors(Z, params)) if halves else None,
        "stability": {
            "unseeded": id_stability(X, params, cfg.cluster.match_threshold, seeded=False),
            "seeded": id_stability(X, params, cfg.cluster.match_threshold, noise_quantile=cfg.cluster.noise_quantile),
        }
        if halves
        else None,
        "params": params.__dict__,
        "data": str(labels_path),
        "transcripts": str(transcripts) if transcripts is not None else None,
        "counts": counts,
    }
