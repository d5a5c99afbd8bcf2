"""Clustering quality on labelled texts (`casemine eval clusters`).

Why NMI and ARI against issue-type labels: there are no root-cause labels, but a clustering that
ignores the issue type entirely is not finding causes either; NMI rewards agreement of the two
partitions, ARI punishes lumping everything together. Noise (HDBSCAN's -1) counts as one extra
cluster in both, so leaving many cases unclustered is not free; `noise_share` is reported beside.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pipeline.config import Config
from pipeline.insights.cluster import NOISE, ClusterParams, cluster_vectors


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


def cluster_metrics(y_true: Sequence[str], labels: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """NMI, ARI, number of clusters and noise share of one clustering."""
    lab = np.asarray(labels, dtype=int)
    return {
        "nmi": round(float(normalized_mutual_info_score(y_true, lab)), 4),
        "ari": round(float(adjusted_rand_score(y_true, lab)), 4),
        "n_clusters": int(len(set(lab.tolist()) - {NOISE})),
        "noise_share": round(float((lab == NOISE).mean()), 4) if len(lab) else 0.0,
    }


def evaluate_clusters(
    cfg: Config, labels_path: Path, *, embedder: Any = None, out_root: Path | None = None
) -> dict[str, Any]:
    """The product's own clustering (config `cluster`) of the labelled texts, scored."""
    df = load_labelled_texts(labels_path)
    if embedder is None:
        from pipeline.embed import Embedder

        embedder = Embedder(cfg, out_root=out_root or cfg.resolve(cfg.paths.out))
    X = np.asarray(embedder.encode_passages(df["text"].tolist()), dtype=np.float32)
    params = ClusterParams.from_config(cfg)
    labels = cluster_vectors(X, params)
    return {
        **cluster_metrics(df["label"].tolist(), labels),
        "rows": int(len(df)),
        "n_labels": int(df["label"].nunique()),
        "params": params.__dict__,
        "data": str(labels_path),
    }
