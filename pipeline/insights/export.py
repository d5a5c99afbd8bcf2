"""The nightly export: clusters, members, trends, alerts, matrix, KPIs and report.html.

This is the I/O edge of the analysis steps: it reads the (already masked) case table, embeds,
calls the pure functions of `pipeline.insights.cluster`, `pipeline.insights.trends`, `pipeline.insights.kpis` and
`pipeline.insights.report`, and writes everything under `<out>/exports/<YYYY-MM-DD>/` in one atomic step
(a temporary folder renamed into place), then points `exports/LATEST` at it. Cluster state
(centroids, ids, label history) lives in `<out>/state/clusters/` so tomorrow's ids match today's.

The nightly flow calls `export_all(cfg, out, since)`; the CLI calls the same function.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.config import Config
from pipeline.insights.cluster import (
    ALL_SCOPE,
    CauseLexicon,
    ClusterState,
    ScopeResult,
    assign_stable_ids,
    cluster_cases,
    fill_classification,
    members_table,
    select_cases,
)
from pipeline.insights.emotion_stats import relations, trajectory_table, worsened_by_team
from pipeline.insights.kpis import compute_kpis, timing_coverage
from pipeline.insights.report import ReportData, map_coordinates, render_report
from pipeline.insights.trends import count_table, default_as_of, root_cause_matrix, trend_summary, week_over_week
from pipeline.io import atomic_write_bytes, atomic_write_parquet, atomic_write_text

CASE_COLUMNS = [
    "case_id",
    "conversation_id",
    "channel",
    "date",
    "date_source",
    "problem",
    "customer_text",
    "outcome",
    "emotion",
    "emotion_score",
    "first_response_s",
    "duration_s",
    "tokens",
    "region",
    "product",
    "repeat_contact",
    "issue_type",
    "issue_type_confidence",
    "request_kind",
    "urgency",
    "needs_review",
    "emotion_start",
    "emotion_end",
    "emotion_delta",
    "emotion_trajectory",
    "csat",
    "agent_id",
    "metadata_json",
]
TABLES = ("clusters", "members", "trends", "alerts", "matrix", "kpis", "emotion", "emotion_relations", "emotion_teams")


class PassageEncoder(Protocol):
    def encode_passages(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class ExportBundle:
    """Everything one export writes, before it is written."""

    day: str
    tables: dict[str, pd.DataFrame]
    report_html: str
    summary: dict[str, Any]
    state: ClusterState
    notes: list[str] = field(default_factory=list)


# -- paths --------------------------------------------------------------------------------------


def exports_root(out: Path) -> Path:
    return Path(out) / "exports"


def state_path(out: Path) -> Path:
    return Path(out) / "state" / "clusters" / "clusters.parquet"


def latest_export(out: Path) -> Path | None:
    """The folder `exports/LATEST` points at (what the notebook opens), or None."""
    p = exports_root(out) / "LATEST"
    if not p.is_file():
        return None
    d = exports_root(out) / p.read_text(encoding="utf-8").strip()
    return d if d.is_dir() else None


# -- reading ------------------------------------------------------------------------------------


def load_cases(out: Path, since: date | None = None) -> pd.DataFrame:
    """The stored cases (one row per case id: the latest run's wins), optionally from a date on."""
    from pipeline.storage.store import read_cases

    df = read_cases(Path(out), columns=CASE_COLUMNS)
    if since is not None and len(df):
        df = df[df["date"].astype(str) >= since.isoformat()]
    return df.reset_index(drop=True)


def ensure_classified(cases: pd.DataFrame, cfg: Config) -> tuple[pd.DataFrame, str | None]:
    """Cases with issue types: classify in memory the ones written before classification ran
    (when configured); return a note saying so. Nothing is written back to the case table."""
    missing = "issue_type" not in cases or cases["issue_type"].isna().any()
    if not (missing and cfg.cluster.classify_if_missing and len(cases)):
        return fill_classification(cases), None
    from pipeline.analysis.classify import classify_cases

    todo = cases["issue_type"].isna() if "issue_type" in cases else pd.Series(True, index=cases.index)
    done = classify_cases(cases[todo].reset_index(drop=True), cfg)
    out = cases.copy()
    for col in ("issue_type", "issue_type_confidence", "request_kind", "urgency", "needs_review"):
        if col not in out:
            out[col] = None
        out[col] = out[col].astype(object)
        out.loc[todo, col] = done[col].to_numpy(dtype=object)
    who = str(done["classifier"].iloc[0]) if "classifier" in done and len(done) else "classifier"
    return fill_classification(out), f"{int(todo.sum())} 个案例在导出时由 {who} 补充分类（未写回案例表）。"


def load_state(out: Path) -> ClusterState:
    p = state_path(out)
    if not p.is_file():
        return ClusterState.empty()
    t = pd.read_parquet(p)
    return ClusterState(t[[c for c in ClusterState.COLUMNS if c in t]])


# -- building (no writes) -----------------------------------------------------------------------


def _stopwords(cfg: Config) -> frozenset[str]:
    from pipeline.text.segment import read_wordlist

    return read_wordlist(cfg.resolve(cfg.segment.stopwords))


def _cutter(cfg: Config):
    from pipeline.text.segment import Segmenter

    seg = Segmenter(cfg)
    return seg.cut


def map_points(
    frame: pd.DataFrame, X: np.ndarray, all_scope: ScopeResult | None, clusters: pd.DataFrame, max_points: int
) -> pd.DataFrame:
    """x/y, cluster id, label and masked text of (a deterministic sample of) the cases."""
    if all_scope is None or len(frame) == 0:
        return pd.DataFrame(columns=["x", "y", "cluster_id", "label", "text"])
    # float64 rounded: float32 values print as long digit runs (0.005200000014156103) in the HTML.
    xy = np.round(map_coordinates(X).astype(np.float64), 4)
    ids = (
        {
            int(r["local_label"]): (r["cluster_id"], r["label"])
            for r in clusters[clusters["scope"] == ALL_SCOPE].to_dict("records")
        }
        if len(clusters)
        else {}
    )
    pts = pd.DataFrame(
        {
            "x": xy[:, 0],
            "y": xy[:, 1],
            "cluster_id": [ids.get(int(lab), (None, ""))[0] for lab in all_scope.labels],
            "label": [ids.get(int(lab), (None, "噪声"))[1] for lab in all_scope.labels],
            "text": frame["cluster_text"].tolist(),
        }
    )
    if len(pts) > max_points:
        pts = pts.sample(n=max_points, random_state=0).sort_index()
    return pts


def build_export(
    cases: pd.DataFrame,
    X: np.ndarray,
    frame: pd.DataFrame,
    cfg: Config,
    state: ClusterState,
    day: str,
    lexicon: CauseLexicon,
    cut=None,
    stopwords: frozenset[str] = frozenset(),
    notes: list[str] | None = None,
) -> ExportBundle:
    """All tables, the report and the new cluster state from cases and the selected cases'
    vectors (`X` aligned with `frame = select_cases(cases)`). Pure apart from CPU."""
    c = cfg.cluster
    notes = list(notes or [])
    results = cluster_cases(frame, X, cfg, lexicon, cut=cut, stopwords=stopwords) if len(frame) else []
    clusters, new_state = assign_stable_ids(results, state, day, c.match_threshold)
    members = members_table(frame, results, clusters, X)
    as_of = default_as_of(cases)
    labels = dict(zip(clusters["cluster_id"], clusters["label"])) if len(clusters) else {}
    new_ids = clusters.loc[clusters["is_new"], "cluster_id"].tolist() if len(clusters) and len(state.table) else []
    clustered = members[members["cluster_id"].notna()] if len(members) else members
    counts = pd.concat(
        [count_table(cases, "issue_type", "issue_type"), count_table(clustered, "cluster", "cluster_id")],
        ignore_index=True,
    )
    alerts = (
        pd.concat(
            [
                week_over_week(
                    clustered, "cluster", "cluster_id", as_of, c.alert_alpha, c.alert_min_count, labels, new_ids
                ),
                week_over_week(cases, "issue_type", "issue_type", as_of, c.alert_alpha, c.alert_min_count),
            ],
            ignore_index=True,
        )
        if as_of
        else week_over_week(pd.DataFrame(), "", "", date.today(), 0.5, 1)
    )
    if len(alerts):
        alerts = alerts.sort_values(
            ["emerging", "alert", "p_value"], ascending=[False, False, True], kind="stable"
        ).reset_index(drop=True)
    matrix = root_cause_matrix(
        members, clusters, frame["issue_type"].value_counts() if len(frame) else pd.Series(dtype=int), c.top_breakdown
    )
    kpis = compute_kpis(cases)
    notes.append(timing_coverage(kpis))
    if "date_source" in cases and (cases["date_source"] == "ingested").any():
        notes.append(f"{int((cases['date_source'] == 'ingested').sum())} 个案例无会话时间，按导入日期计入趋势。")
    all_scope = next((r for r in results if r.scope == ALL_SCOPE), None)
    points = map_points(frame, X, all_scope, clusters, c.map_max_points)
    emotion = trajectory_table(cases, members)
    emotion_rel = relations(cases)
    emotion_teams = worsened_by_team(cases)
    tables = {
        "clusters": clusters,
        "members": members,
        "trends": counts,
        "alerts": alerts,
        "matrix": matrix,
        "kpis": kpis,
        "emotion": emotion,
        "emotion_relations": emotion_rel,
        "emotion_teams": emotion_teams,
    }
    report = render_report(
        ReportData(
            day,
            as_of.isoformat() if as_of else None,
            len(cases),
            len(frame),
            clusters,
            members,
            alerts,
            counts,
            matrix,
            kpis,
            points,
            notes,
            emotion,
            emotion_rel,
            emotion_teams,
        )
    )
    all_members = members[members["scope"] == ALL_SCOPE] if len(members) else members
    summary = {
        "date": day,
        "as_of": as_of.isoformat() if as_of else None,
        "n_cases": int(len(cases)),
        "n_clustered_cases": int(len(frame)),
        "n_clusters": int(len(clusters)),
        "n_clusters_all_scope": int((clusters["scope"] == ALL_SCOPE).sum()) if len(clusters) else 0,
        "n_new_clusters": int(clusters["is_new"].sum()) if len(clusters) else 0,
        "noise_share_all_scope": round(float(all_members["is_noise"].mean()), 4) if len(all_members) else None,
        **trend_summary(alerts),
        "rows": {k: int(len(v)) for k, v in tables.items()},
        "notes": notes,
    }
    return ExportBundle(day, tables, report, summary, new_state, notes)


# -- writing ------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def to_csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """List cells as JSON text (CSV has no lists); everything else as is."""
    out = df.copy()
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, (list, tuple, np.ndarray, dict))).any():
            out[col] = out[col].map(
                lambda v: (
                    json.dumps(_jsonable(v), ensure_ascii=False)
                    if isinstance(v, (list, tuple, np.ndarray, dict))
                    else v
                )
            )
    return out


def write_table(folder: Path, name: str, df: pd.DataFrame, csv_encoding: str) -> None:
    df = df.reset_index(drop=True)
    atomic_write_parquet(folder / f"{name}.parquet", pa.Table.from_pandas(df, preserve_index=False))
    atomic_write_bytes(folder / f"{name}.csv", to_csv_frame(df).to_csv(index=False).encode(csv_encoding))


def write_export(out: Path, bundle: ExportBundle, csv_encoding: str = "utf-8-sig") -> Path:
    """Write every file into a temporary folder, swap it in as exports/<day>, update LATEST.
    A killed export leaves the previous folder (and LATEST) untouched."""
    root = exports_root(out)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{bundle.day}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name in TABLES:
            write_table(tmp, name, bundle.tables[name], csv_encoding)
        atomic_write_text(tmp / "report.html", bundle.report_html)
        atomic_write_text(
            tmp / "summary.json", json.dumps(bundle.summary, ensure_ascii=False, indent=2, default=str) + "\n"
        )
        final = root / bundle.day
        old = root / f".{bundle.day}.old-{secrets.token_hex(4)}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(root / "LATEST", bundle.day + "\n")
    return final


def save_state(out: Path, state: ClusterState) -> Path:
    p = state_path(out)
    t = state.table.copy()
    t["centroid"] = t["centroid"].map(lambda v: [float(x) for x in v])
    atomic_write_parquet(p, pa.Table.from_pandas(t.reset_index(drop=True), preserve_index=False))
    return p


# -- the entry point ----------------------------------------------------------------------------


def export_all(
    cfg: Config,
    out: Path,
    since: date | None = None,
    *,
    embedder: PassageEncoder | None = None,
    today: date | None = None,
) -> dict[str, Any]:
    """Cluster, trend and report the stored cases; write `<out>/exports/<today>/` and LATEST.

    Returns a JSON-able summary: export_dir, report, date, as_of, case and cluster counts, new
    clusters, alerts, rows per table, seconds. `embedder` defaults to `pipeline.embed.Embedder`
    (its cache under `<out>/state/embeddings/` makes re-exports cheap); tests pass a fake.
    """
    t0 = time.perf_counter()
    out = Path(out)
    day = (today or date.today()).isoformat()
    cases, note = ensure_classified(load_cases(out, since), cfg)
    frame = select_cases(cases, cfg.cluster.min_problem_chars, cfg.cluster.request_kinds)
    if embedder is None:
        from pipeline.embed import Embedder

        embedder = Embedder(cfg, out_root=out)
    X = (
        np.asarray(embedder.encode_passages(frame["cluster_text"].tolist()), dtype=np.float32)
        if len(frame)
        else np.zeros((0, 384), np.float32)
    )
    t_embed = time.perf_counter() - t0
    bundle = build_export(
        cases,
        X,
        frame,
        cfg,
        load_state(out),
        day,
        CauseLexicon.load(cfg),
        cut=_cutter(cfg),
        stopwords=_stopwords(cfg),
        notes=[note] if note else [],
    )
    folder = write_export(out, bundle, cfg.cluster.csv_encoding)
    save_state(out, bundle.state)
    return {
        "export_dir": str(folder),
        "report": str(folder / "report.html"),
        **bundle.summary,
        "since": since.isoformat() if since else None,
        "seconds": {"load_and_embed": round(t_embed, 2), "total": round(time.perf_counter() - t0, 2)},
    }
