"""Incremental export: new cases meet yesterday's clusters, counts are redone without vectors.

Why: re-embedding and re-clustering all history every night costs time that grows faster than
the history; a night's new cases are a few percent of it. Between full re-clusters the clusters'
space (each scope's PCA), centres and ids stay fixed, a new case goes to the cluster a re-cluster
would most likely give it (nearest KMeans centre in the stored PCA space), and a case outside
every cluster's radius is noise. The share of such cases among the night's new ones is the drift
that asks for a re-cluster. Pure: frames and arrays in, frames out (I/O in
`pipeline.insights.membership` and `pipeline.insights.export`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.insights.cluster import (
    ALL_SCOPE,
    NOISE,
    OUTCOME_KEYS,
    ClusterState,
    Projection,
    ScopeResult,
    Vectors,
    _as_list,
    _history,
    _with_entry,
    format_shares,
)
from pipeline.insights.codes import Codes
from pipeline.insights.member_tallies import Tally, _first_seen, cluster_groups, mean_scores
from pipeline.insights.member_tallies import shares as tally_shares

MEMBER_COLUMNS = ["case_id", "run_id", "scope", "cluster_id", "is_noise", "similarity", "x", "y"]
MODEL_COLUMNS = ("center", "radius_full", "model_day")
MAP_SCOPE = "__map__"  # the report map's 2-D PCA, stored beside the scopes' projections


@dataclass
class ScopeModel:
    """One scope's assignable clusters: ids, centres in the scope's PCA space, centroids in the
    embedding space, and the cosine radius that holds all but `noise_quantile` of the members."""

    projection: Projection
    cluster_ids: list[str]
    centers: np.ndarray  # (k, d) in the projected space
    centroids: np.ndarray  # (k, dim) normalised, embedding space
    radius_full: np.ndarray  # smallest cosine to the centroid still a member (all but noise_quantile)


def fit_models(
    results: list[ScopeResult], clusters: pd.DataFrame, X: Vectors, noise_quantile: float
) -> tuple[dict[str, Projection], pd.DataFrame]:
    """Per scope its projection, and per cluster id its centre and radii (MODEL_COLUMNS without
    model_day), from a full re-cluster's results and today's id table."""
    ids = (
        {(r["scope"], int(r["local_label"])): r["cluster_id"] for r in clusters.to_dict("records")}
        if len(clusters)
        else {}
    )
    projections: dict[str, Projection] = {}
    rows: list[dict[str, Any]] = []
    for res in results:
        if res.fit is None:
            continue
        idx = res.row_index if res.row_index is not None else np.arange(len(res.labels))
        projections[res.scope] = res.fit.projection
        if not res.fit.centers:
            continue
        for lab, center in res.fit.centers.items():
            cid = ids.get((res.scope, lab))
            if cid is None:
                continue
            sims = res.sims.get(lab)
            if sims is None:
                mine = res.labels == lab
                sims = X[idx[mine]] @ res.centroids[lab]  # only the cluster's rows copied, not the scope's per cluster
            rows.append(
                {
                    "cluster_id": cid,
                    "center": center.astype(float).tolist(),
                    "radius_full": float(np.quantile(sims, noise_quantile)),
                }
            )
    return projections, pd.DataFrame(rows, columns=["cluster_id", "center", "radius_full"])


def scope_models(state: ClusterState, projections: dict[str, Projection], model_day: str) -> dict[str, ScopeModel]:
    """The assignable clusters of each scope: those fitted by the last full re-cluster."""
    t = state.table
    if t.empty or "model_day" not in t:
        return {}
    t = t[(t["model_day"] == model_day) & t["center"].map(lambda v: len(_as_list(v)) > 0)]
    out = {}
    for scope, g in t.groupby("scope", sort=True):
        if scope not in projections:
            continue
        out[str(scope)] = ScopeModel(
            projections[str(scope)],
            g["cluster_id"].astype(str).tolist(),
            np.stack([np.asarray(_as_list(v), dtype=np.float32) for v in g["center"]]),
            np.stack([np.asarray(_as_list(v), dtype=np.float32) for v in g["centroid"]]),
            g["radius_full"].to_numpy(dtype=np.float64),
        )
    return out


def assign_to(model: ScopeModel, X: np.ndarray, space: str) -> tuple[np.ndarray, np.ndarray]:
    """Row -> cluster position in `model` (NOISE when far from every centroid), and each row's
    cosine to that cluster's centroid (embedding space, as the members table reports).

    The cluster: in "pca" space the nearest KMeans centre in the scope's stored PCA (what a
    re-cluster would most likely do), in "full" the highest cosine. Far is judged in the
    embedding space in both: a new kind of problem can be orthogonal to the stored PCA's few
    components and land anywhere once projected, but not close to a centroid in 384 dimensions."""
    n = len(X)
    if n == 0 or not len(model.cluster_ids):
        return np.full(n, NOISE, dtype=int), np.full(n, np.nan)
    s = np.asarray(X, dtype=np.float32) @ model.centroids.T
    far = ~(s >= model.radius_full[None, :]).any(axis=1)
    if space == "pca":
        Z = model.projection.apply(X)
        d = ((Z[:, None, :] - model.centers[None, :, :]) ** 2).sum(axis=2)
        pos = np.argmin(d, axis=1)
    else:
        pos = np.argmax(s, axis=1)
    sims = s[np.arange(n), pos].astype(np.float64)
    pos = np.where(far, NOISE, pos)
    return pos.astype(int), np.where(far, np.nan, sims)


def assign_cases(
    frame: pd.DataFrame,
    X: np.ndarray,
    models: dict[str, ScopeModel],
    space: str,
    scopes: list[str],
    map_projection: Projection | None,
) -> tuple[pd.DataFrame, float | None]:
    """Membership rows (MEMBER_COLUMNS) of `frame`'s cases in `scopes` (ALL_SCOPE and/or
    "issue_type" for each case's own type) and the drift: the share of them outside every
    cluster's radius (in the cross-type scope when there is one)."""
    parts, far = [], []
    for scope in scopes:
        if scope == ALL_SCOPE:
            groups = [(ALL_SCOPE, np.arange(len(frame)))]
        else:
            groups = [(str(it), np.asarray(ix)) for it, ix in frame.groupby("issue_type", sort=True).indices.items()]
        for name, idx in groups:
            model = models.get(name)
            if model is None:
                pos, sims = np.full(len(idx), NOISE, dtype=int), np.full(len(idx), np.nan)
            else:
                pos, sims = assign_to(model, X[idx], space)
            cid = [model.cluster_ids[p] if model is not None and p != NOISE else None for p in pos]
            part = pd.DataFrame(
                {
                    "case_id": frame["case_id"].iloc[idx].astype(str).to_numpy(),
                    "run_id": frame["run_id"].iloc[idx].astype(str).to_numpy() if "run_id" in frame else "",
                    "scope": name,
                    "cluster_id": cid,
                    "is_noise": pos == NOISE,
                    "similarity": [None if np.isnan(s) else round(float(s), 4) for s in sims],
                    "x": np.nan,
                    "y": np.nan,
                }
            )
            mp = map_projection
            if name == ALL_SCOPE and mp is not None and mp.components is not None and mp.mean is not None:
                xy = (np.asarray(X[idx], dtype=np.float32) - mp.mean) @ mp.components.T
                part["x"], part["y"] = np.round(xy[:, 0].astype(np.float64), 4), np.round(xy[:, 1], 4)
            parts.append(part)
            if scope == scopes[0]:
                far.extend((pos == NOISE).tolist())
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=MEMBER_COLUMNS)
    return rows[MEMBER_COLUMNS], (round(float(np.mean(far)), 4) if far else None)


# -- the clusters table from counts ---------------------------------------------------------------

__all__ = ["_first_seen", "cluster_groups"]  # moved to member_tallies; imported from here too
_COUNT_COLUMNS = ("size", "scope_size", "share_of_scope", "previous_size", "growth", "label_history")


def recount_clusters(
    described: pd.DataFrame,
    members: pd.DataFrame,
    state: ClusterState,
    day: str,
    top: int,
    cluster_codes: Codes | None = None,
) -> tuple[pd.DataFrame, ClusterState]:
    """Today's clusters table from the last re-cluster's descriptions (label, terms,
    representatives, causes: they need vectors and tokens) and today's members (sizes, shares,
    mix: counts). Clusters without a member today are left out; the state's size history and
    last_seen take today's figures. `cluster_codes`: the members' cluster ids' `sorted_codes`,
    when the caller has them (an object column: 2M ids hashed at 1M cases)."""
    if described.empty or members.empty:
        return described.iloc[0:0].copy(), state
    from pipeline.insights.member_tallies import count_members

    return clusters_from_tally(described, count_members(members, cluster_codes), state, day, top)


def clusters_from_tally(
    described: pd.DataFrame, tally: Tally, state: ClusterState, day: str, top: int
) -> tuple[pd.DataFrame, ClusterState]:
    """`recount_clusters` from the members' tally (`member_tallies`): what it counts of them,
    whether counted tonight or kept from last night and added to."""
    if described.empty or not tally.rows:
        return described.iloc[0:0].copy(), state
    groups = {key: code for code, key in enumerate(tally.keys)}
    # Per column, every group's share_dict at once (issue types: the top 3); a column the members
    # lack has no shares, as share_dict([]) had none.
    shares = {col: tally_shares(tally, col) for col in tally.mix}

    def mix(col: str, code: int) -> dict[str, float]:
        return shares[col].get(code, {}) if col in shares else {}

    # The state's histories as dicts: a .loc per cluster and column cost 0.2 s a night (~700 clusters).
    size_hist = dict(zip(state.table["cluster_id"], state.table["size_history"])) if len(state.table) else {}
    label_hist = dict(zip(state.table["cluster_id"], state.table["label_history"])) if len(state.table) else {}
    rows, seen = [], {}
    for r in described.to_dict("records"):
        found = groups.get((str(r["scope"]), str(r["cluster_id"])))
        if found is None:
            continue
        code = found
        n = int(tally.sizes[code])
        sizes_h = _history(size_hist[r["cluster_id"]]) if r["cluster_id"] in size_hist else []
        before = [e for e in sizes_h if e.get("date") != day]
        prev = int(before[-1]["size"]) if before else None
        scope_size = int(tally.scopes.get(r["scope"], n))
        outcome = mix("outcome", code)
        r.update(
            {
                "size": n,
                "scope_size": scope_size,
                "share_of_scope": round(n / max(scope_size, 1), 4),
                **{f"share_{k}": outcome.get(k, 0.0) for k in OUTCOME_KEYS},
                "mean_emotion": mean_scores(tally, code),
                "top_emotion": next(iter(mix("emotion", code).keys()), None) if "emotion" in shares else None,
                "channels": json.dumps(mix("channel", code), ensure_ascii=False),
                "issue_types": json.dumps(shares["issue_type"].get(code, {}), ensure_ascii=False),
                "top_regions": format_shares(mix("region", code), top),
                "top_products": format_shares(mix("product", code), top),
                "is_new": False,
                "previous_size": prev,
                "growth": (n - prev) if prev is not None else None,
                "label_history": label_hist.get(r["cluster_id"], r["label_history"]),
            }
        )
        rows.append(r)
        seen[r["cluster_id"]] = json.dumps(_with_entry(sizes_h, day, "size", n, dedupe=False))
    clusters = pd.DataFrame(rows, columns=described.columns)
    t = state.table.copy()
    if len(t) and seen:
        hit = t["cluster_id"].isin(list(seen))
        t.loc[hit, "size_history"] = t.loc[hit, "cluster_id"].map(seen)
        t.loc[hit, "last_seen"] = day
    return clusters.reset_index(drop=True), ClusterState(t)
