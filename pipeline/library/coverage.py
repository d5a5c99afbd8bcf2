"""Library coverage: the share of stored cases whose nearest published case is close enough,
and the issue types and clusters no published case speaks for (the gaps to fill next)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.library.candidates import case_texts, cluster_map
from pipeline.library.sources import load_library_cases, load_members
from pipeline.library.store import LibraryError, LibraryStore


@dataclass
class CoverageResult:
    coverage: float
    n_cases: int
    n_covered: int
    threshold: float
    by_type: dict[str, dict[str, Any]]
    gaps: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_coverage(
    case_ids: Sequence[str],
    issue_types: Sequence[str],
    clusters: Sequence[str | None],
    vectors: np.ndarray,
    published: Sequence[str],
    pub_vectors: np.ndarray,
    pub_types: Sequence[str],
    pub_clusters: Sequence[str | None],
    threshold: float,
) -> CoverageResult:
    """Pure: a case is covered when its nearest published case has cosine >= threshold (vectors
    are L2-normalised). Gaps: issue types and clusters with cases but no published case, the most
    demanded first."""
    n = len(case_ids)
    if len(published):
        best = (np.asarray(vectors) @ np.asarray(pub_vectors).T).max(axis=1)
    else:
        best = np.full(n, -1.0)
    pub = set(published)
    covered = (best >= threshold) | np.array([c in pub for c in case_ids], dtype=bool)
    df = pd.DataFrame({"type": list(issue_types), "cluster": list(clusters), "covered": covered})
    by_type = {}
    for t, g in df.groupby("type", sort=True):
        by_type[str(t)] = {
            "cases": int(len(g)),
            "covered": int(g["covered"].sum()),
            "coverage": round(float(g["covered"].mean()), 4),
            "published": int(sum(pt == t for pt in pub_types)),
        }
    gaps: list[dict[str, Any]] = [
        {"kind": "issue_type", "id": t, "cases": v["cases"], "uncovered": v["cases"] - v["covered"]}
        for t, v in by_type.items()
        if v["published"] == 0
    ]
    pub_cl = {c for c in pub_clusters if c}
    for c, g in df[df["cluster"].notna()].groupby("cluster", sort=True):
        if c not in pub_cl:
            gaps.append(
                {
                    "kind": "cluster",
                    "id": str(c),
                    "issue_type": str(g["type"].mode().iloc[0]),
                    "cases": int(len(g)),
                    "uncovered": int((~g["covered"]).sum()),
                }
            )
    gaps.sort(key=lambda x: (-x["cases"], -x["uncovered"], x["kind"], x["id"]))
    return CoverageResult(
        round(float(covered.mean()), 4) if n else 0.0, n, int(covered.sum()), threshold, by_type, gaps
    )


def coverage(cfg: Config, out: Path, since: str | None = None, embedder=None) -> CoverageResult:
    cases = load_library_cases(cfg, out, since)
    if not len(cases):
        raise LibraryError(f"no processed cases under {out}" + (f" since {since}" if since else ""))
    store = LibraryStore(out)
    pubs = store.entries(status="published")
    if embedder is None:
        from pipeline.embed import Embedder

        embedder = Embedder(cfg, out_root=Path(out))
    cmap = cluster_map(load_members(out))
    ids = cases["case_id"].astype(str).tolist()
    vecs = np.asarray(embedder.encode_passages(case_texts(cases)), dtype=np.float32)
    pub_texts = [(p.get("parts") or {}).get("problem") or "" for p in pubs]
    pub_vecs = (
        np.asarray(embedder.encode_passages(pub_texts), dtype=np.float32)
        if pubs
        else np.zeros((0, vecs.shape[1]), np.float32)
    )
    types = (
        cases["issue_type"].fillna("未分类").astype(str).tolist() if "issue_type" in cases else ["未分类"] * len(cases)
    )
    return compute_coverage(
        ids,
        types,
        [cmap.get(i) for i in ids],
        vecs,
        [p["case_id"] for p in pubs],
        pub_vecs,
        [p["issue_type"] for p in pubs],
        [p["cluster_id"] for p in pubs],
        cfg.library.coverage_threshold,
    )
