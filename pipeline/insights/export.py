"""The nightly export: clusters, members, trends, alerts, matrix, KPIs and report.html.

This is the I/O edge of the analysis steps. Two paths, both ending in the same tables:
- incremental (most nights): only the cases that are not yet members are embedded and assigned
  to the stored clusters (`pipeline.insights.incremental`); every table is counted from the
  stored membership (`pipeline.insights.membership`) and the cases' columns, so a night's cost
  follows its new cases, not the history;
- full re-cluster (no state, `recluster_every_days`, drift, another embedder, `--recluster`):
  embeds all selected cases (through the embedding cache) and calls the pure functions of
  `pipeline.insights.cluster`, with KMeans started from the stored centroids so ids stay.
Everything is written under `<out>/exports/<YYYY-MM-DD>/` in one atomic step (a temporary folder
renamed into place), then `exports/LATEST` points at it. Cluster state (centroids, ids, label
history, the projections and membership) lives in `<out>/state/clusters/`.

The nightly flow calls `export_all(cfg, out, since)`; the CLI calls the same function.
"""

from __future__ import annotations

import codecs
import functools
import json
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.config import Config
from pipeline.embed.embedder import release_shared_models
from pipeline.heap import dropping_mapped_pages, release_mapped_pages, release_unused_memory
from pipeline.insights import case_kpis, case_numbers, case_relations, case_trajectories, member_rows
from pipeline.insights import member_cross as mc
from pipeline.insights import member_parts as mp
from pipeline.insights import member_tallies as mt
from pipeline.insights import membership as mb
from pipeline.insights.case_codes import remember_case_codes
from pipeline.insights.case_facts import kept_problem_facts
from pipeline.insights.cluster import (
    ALL_SCOPE,
    MEMBER_FIELDS,
    NOT_SPACE,
    CauseLexicon,
    ClusterState,
    ProblemFacts,
    Projection,
    ScopeResult,
    TokenCodes,
    Vectors,
    _as_list,
    _fields_at,
    arrow_text,
    assign_stable_ids,
    cluster_cases,
    fill_classification,
    leads_in_order,
    member_heads,
    members_with_fields,
    scope_member_rows,
    select_cases_at,
    token_codes,
)
from pipeline.insights.codes import Codes, arrow_backed, derive_codes, remember_codes, sorted_codes, taken_codes
from pipeline.insights.emotion_stats import (
    TEAM_KEY_PATTERN,
    case_team_codes,
    case_teams,
    relations,
    trajectory_table,
    worsened_by_team,
)
from pipeline.insights.incremental import (
    MAP_SCOPE,
    MEMBER_COLUMNS,
    MODEL_COLUMNS,
    assign_cases,
    clusters_from_tally,
    fit_models,
    recount_clusters,
    scope_models,
)
from pipeline.insights.kpis import compute_kpis, timing_coverage
from pipeline.insights.member_rows import arrow_strings as _arrow_strings
from pipeline.insights.member_rows import index_in as _index_in
from pipeline.insights.recluster_rows import (
    NotText,
    ReclusterRows,
    last_rows,
    part_groups,
    recluster_rows,
    run_ids_at,
    take_by_windows,
)
from pipeline.insights.report import ReportData, render_report
from pipeline.insights.row_file import RowFile
from pipeline.insights.stored_tokens import spilled, stored_token_codes
from pipeline.insights.trends import (
    BREAKDOWNS,
    count_table,
    counts_from_days,
    default_as_of,
    matrix_from_groups,
    root_cause_matrix,
    trend_summary,
    week_over_week,
    wow_from_days,
)
from pipeline.io import atomic_write_parquet, atomic_write_parquet_groups, atomic_write_stream, atomic_write_text
from pipeline.storage.case_cache import CopyRows, copy_prefix

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


def case_cache_path(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "export-cases"


def token_spill_path(out: Path) -> Path:
    """Where a re-cluster keeps its cases' token codes while it runs (unnamed files, `spilled`)."""
    return Path(out) / "state" / "cache" / "export-tokens"


# What the case copy's rows hold beyond their columns: bump when `shrink_case_part` changes.
CASE_CACHE_KEY = "export:shrink_case_part:1"


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


def shrink_case_part(t: pa.Table) -> pa.Table:
    """A stored part with its two big free-text columns nulled where the export cannot read them,
    so that all-history memory holds them only for the cases that need them.

    customer_text: read by `select_cases` only when the problem is blank (it becomes the cluster
    text) and by `ensure_classified` for cases without an issue type. metadata_json: read by
    `case_teams` only when it can name a team (the same test `_team` makes before parsing), and
    by the classifier for cases without an issue type. Every other value is dropped: the tables
    come out the same. The tests are made in Arrow (a Python pass over every stored problem cost
    more than the read)."""
    n = t.num_rows
    names = t.column_names
    if not n or not {"customer_text", "metadata_json"} & set(names):
        return t
    unclassified = pc.is_null(t["issue_type"]) if "issue_type" in names else pa.array(np.ones(n, dtype=bool))
    if "customer_text" in names:
        # Kept for every problem without a non-space character: a superset of the blank ones.
        # NOT_SPACE: a character str.strip() keeps; a problem with one is not blank.
        worded = pc.match_substring_regex(t["problem"], NOT_SPACE) if "problem" in names else None
        blank = pa.array(np.ones(n, dtype=bool)) if worded is None else pc.invert(pc.fill_null(worded, False))
        t = _null_unless(t, "customer_text", pc.or_(blank, unclassified))
    if "metadata_json" in names:
        teams = pc.fill_null(pc.match_substring_regex(t["metadata_json"], TEAM_KEY_PATTERN), False)
        t = _null_unless(t, "metadata_json", pc.or_(teams, unclassified))
    return t


def _null_unless(t: pa.Table, name: str, keep: Any) -> pa.Table:
    """Column `name` null where `keep` is false, its text buffer holding the kept values only (a
    take with null indices; `pc.if_else` keeps the whole buffer)."""
    mask = ~np.asarray(pc.fill_null(keep, False).to_numpy(zero_copy_only=False), dtype=bool)
    col = t[name].take(pa.array(np.arange(len(mask)), mask=mask))
    return t.set_column(t.column_names.index(name), name, col)


def load_cases(out: Path, since: date | None = None) -> pd.DataFrame:
    """The stored cases (one row per case id: the latest run's wins), optionally from a date on;
    customer_text and metadata_json only where the export reads them (`shrink_case_part`).
    Read through a copy kept between nights (`case_cache_path`), so a night decodes only the
    parts written since the last export."""
    df, _ = load_cases_copy(out)
    if since is not None and len(df):
        df = df[df["date"].astype(str) >= since.isoformat()]
    return df.reset_index(drop=True)


def load_cases_copy(out: Path) -> tuple[pd.DataFrame, tuple[str, int] | None]:
    """`load_cases(out)` and which generation of the case copy its rows are
    (`pipeline.storage.case_cache.CopyRows`)."""
    from pipeline.storage.case_cache import read_cases_copy

    # run_id tells a re-processed case (same id, newer row) from a member; tokens are read only
    # by a re-cluster (`stored_token_codes`).
    columns = [c for c in CASE_COLUMNS if c != "tokens"] + ["run_id"]
    got = read_cases_copy(Path(out), case_cache_path(out), columns, CASE_CACHE_KEY, shrink=shrink_case_part)
    # The former layout's single file (430 MB at 1M cases): read by nothing since.
    try:
        (case_cache_path(out).parent / "export-cases.arrow").unlink(missing_ok=True)
    except OSError:
        pass  # a read-only output: it only takes room
    return got


def copy_lead(out: Path, copy_rows: CopyRows | None) -> CopyRows | None:
    """The former case copy generation whose rows lead the copy's, and how many
    (`case_cache.copy_prefix`): what every cache kept of those rows still holds for this one."""
    return copy_prefix(case_cache_path(out), copy_rows[0]) if copy_rows is not None else None


def selection_facts(
    out: Path, cases: pd.DataFrame, copy_rows: CopyRows | None, min_chars: int, prefix: CopyRows | None = None
) -> ProblemFacts | None:
    """The cases' `problem_facts`, kept between nights (`case_facts`) when the cases are the case
    copy's rows (`load_cases_copy`; `prefix`: `copy_lead`); None where the selection computes them
    itself."""
    problem = arrow_text(cases["problem"]) if len(cases) and "problem" in cases else None
    if problem is None or problem.num_chunks != 1:
        return None
    gen = copy_rows[0] if copy_rows is not None and copy_rows[1] == len(cases) else None
    return kept_problem_facts(out, problem.chunk(0), gen, min_chars, prefix)


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
    return ClusterState(t[[c for c in (*ClusterState.COLUMNS, *MODEL_COLUMNS) if c in t]])


# -- building (no writes) -----------------------------------------------------------------------


def _stopwords(cfg: Config) -> frozenset[str]:
    from pipeline.text.segment import read_wordlist

    return read_wordlist(cfg.resolve(cfg.segment.stopwords))


def _cutter(cfg: Config):
    from pipeline.text.segment import Segmenter

    seg = Segmenter(cfg)
    return seg.cut


def fit_map(X: np.ndarray) -> Projection:
    """The report map's 2-D PCA (kept in the state so new cases land on yesterday's map)."""
    if len(X) < 3:
        return Projection()
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(np.asarray(X, dtype=np.float32))
    return Projection(pca.mean_.astype(np.float32), pca.components_.astype(np.float32))


@dataclass
class MapFit:
    """The map's projection and every row's point on it (rounded), None when not placed."""

    projection: Projection
    xy: tuple[np.ndarray, np.ndarray] | None


def fit_map_points(X: np.ndarray, consume: bool = False) -> MapFit:
    """`fit_map` and every row's map point. `consume`: the caller reads `X` no more, so it is
    centred in place (overwritten) instead of copied: the centred copy was a second all-history
    matrix. The same float32 values either way, and the same product of a C-ordered matrix."""
    proj = fit_map(X)
    if not len(X) or proj.components is None or proj.mean is None:
        return MapFit(proj, None)
    mean = proj.mean
    if consume and X.flags.c_contiguous and X.flags.writeable and X.dtype == np.result_type(X, mean):
        pts = np.subtract(X, mean, out=X) @ proj.components.T
    else:
        pts = (X - mean) @ proj.components.T
    return MapFit(proj, (np.round(pts[:, 0].astype(np.float64), 4), np.round(pts[:, 1].astype(np.float64), 4)))


# Rows a re-cluster's map projects at a time (1.5 KiB each at 384 dimensions): at 65,536 a
# block was 96 MiB and the loop briefly held two, the peak of a 129,000-case re-cluster.
_MAP_ROWS = 16_384
# Texts a re-cluster embeds (or reads from the cache) at a time. A block's lookup holds about
# 2.7 KiB a text at its peak (the vectors, their keys, the shards' rows read): 65,536 texts made
# it the peak of a 120,000-transcript run's export (+177 MiB anonymous); 16,384 keep it near 45.
_EMBED_BLOCK = 16_384


def embed_to_rows(embedder: PassageEncoder, texts: pd.Series, folder: Path, block: int = _EMBED_BLOCK) -> RowFile:
    """Every text's vector, in order, spilled to a `RowFile` a block at a time: neither the
    vectors (1.5 KiB a case) nor the texts as Python strings are ever all in memory. The same
    vectors as one call: each text's vector is its own (cached or encoded alone)."""
    return RowFile.from_blocks(
        (_embed(embedder, texts.iloc[a : a + block].tolist()) for a in range(0, len(texts), block)), folder
    )


def map_of_rows(vectors: RowFile, max_rows: int, seed: int = 0, block: int = _MAP_ROWS) -> MapFit:
    """The map of spilled vectors. Up to `max_rows` (`cluster.fit_max_cases`), read whole and
    fitted as `fit_map_points` (the map of any smaller history is as before). Past it, the PCA
    fits a seeded sample of that many rows, as each scope's projection does, and the points are
    projected a block at a time: a map's two axes need no more, and its PCA was the one step of
    a re-cluster that held every vector at once."""
    n = len(vectors)
    if n <= max_rows:
        return fit_map_points(vectors[:], consume=True)
    sample = np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
    proj = fit_map(vectors[sample])
    assert proj.mean is not None and proj.components is not None  # fitted on >= 100 rows
    x, y = np.empty(n), np.empty(n)
    for a in range(0, n, block):
        rows = vectors[a : a + block]  # the block's own copy: centred in place
        pts = np.subtract(rows, proj.mean, out=rows) @ proj.components.T
        x[a : a + len(rows)], y[a : a + len(rows)] = pts[:, 0], pts[:, 1]
        del rows, pts  # before the next block is read, not after
    return MapFit(proj, (np.round(x, 4), np.round(y, 4)))


def map_points(members: pd.DataFrame, clusters: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """x/y, cluster id, label and masked text of (a deterministic sample of) the cross-type
    scope's members, from the map coordinates kept with the membership."""
    cols = ["x", "y", "cluster_id", "label", "text"]
    if members.empty or "x" not in members:
        return pd.DataFrame(columns=cols)
    # Only the columns a point shows, of the rows it keeps: filtering copies every column kept,
    # and a copy of every point's text (before sampling) was an all-history column.
    rows = np.flatnonzero(((members["scope"] == ALL_SCOPE) & members["x"].notna()).to_numpy())
    if not len(rows):
        return pd.DataFrame(columns=cols)
    # Cut (a view) after the last row shown: the cross-type rows lead the members table, which
    # `members_view` builds as two Arrow chunks (the cases' own columns, then the per-type rows
    # taken), and a take from two chunks first joins them, a copy of every member's text (3-10
    # ms, 60 ms when fresh memory is first touched); from the leading rows it takes from one.
    shown = members[["x", "y", "cluster_id", "problem"]].iloc[: int(rows[-1]) + 1]
    # The rows a sample of all points keeps (DataFrame.sample draws positions from the length
    # alone), chosen before the columns are built: building them for 100k points to keep a few
    # thousand cost half a second a night. The index is the sampled positions, as before. Taken
    # a window of rows at a time: a sample across the history touched a page of the mapped
    # texts nearly everywhere, 36 MiB resident at a 200k-case re-cluster's tables.
    if len(rows) > max_points:
        keep = np.sort(pd.Series(np.arange(len(rows))).sample(n=max_points, random_state=0).to_numpy())
        m = take_by_windows(shown, rows[keep]).set_axis(pd.Index(keep))
    else:
        m = take_by_windows(shown, rows).reset_index(drop=True)
    labels = dict(zip(clusters["cluster_id"], clusters["label"])) if len(clusters) else {}
    pts = pd.DataFrame(
        {
            # float64 rounded: float32 values print as long digit runs (0.005200000014156103) in the HTML.
            "x": np.round(m["x"].astype(np.float64), 4),
            "y": np.round(m["y"].astype(np.float64), 4),
            "cluster_id": m["cluster_id"].where(m["cluster_id"].notna(), None),
            "label": [labels.get(c, "噪声") if isinstance(c, str) else "噪声" for c in m["cluster_id"]],
            "text": m["problem"].tolist(),
        },
        index=m.index,
    )
    return pts


def seeds_from_state(state: ClusterState, meta: dict[str, Any], dim: int) -> dict[str, np.ndarray]:
    """Per scope, the centroids of the clusters the last re-cluster made (older ones that did not
    come back then are not seeds: they would pull k towards yesterday's count)."""
    t = state.table
    if t.empty:
        return {}
    last = meta.get("last_full")
    if last and "model_day" in t and (t["model_day"] == last).any():
        t = t[t["model_day"] == last]
    else:
        t = t[t["last_seen"] == t["last_seen"].max()]
    out = {}
    for scope, g in t.groupby("scope", sort=True):
        vecs = [np.asarray(_as_list(v), dtype=np.float32) for v in g["centroid"]]
        vecs = [v for v in vecs if len(v) == dim]
        if vecs:
            out[str(scope)] = np.stack(vecs)
    return out


@dataclass
class Clustering:
    """What either path (full re-cluster or incremental assignment) hands to the tables."""

    clusters: pd.DataFrame
    members: pd.DataFrame  # the export's members table, plus x/y for the map
    state: ClusterState
    cluster_codes: Codes | None = None  # the members' cluster ids' `sorted_codes`, when known
    # Each members row's row in the cases handed to the tables with it, when known: only for
    # cases that hold each id once (the store's newest rows), as the tables then assume.
    case_rows: np.ndarray | None = None
    tally: mt.Tally | None = None  # what the tables count of all the members (`member_tallies`)
    # `members` holds the cross-type scope's rows alone: the per-type tables are the tally's.
    partial: bool = False


def full_clustering(
    frame: pd.DataFrame,
    X: np.ndarray,
    cfg: Config,
    state: ClusterState,
    day: str,
    lexicon: CauseLexicon,
    cut=None,
    stopwords: frozenset[str] = frozenset(),
    seeds: dict[str, np.ndarray] | None = None,
    consume_vectors: bool = False,
) -> tuple[Clustering, dict[str, Projection], pd.DataFrame]:
    """Re-cluster every selected case (KMeans started from `seeds`), keep ids stable, and fit
    what later nights assign new cases with. Returns the clustering, the projections per scope
    (and the map's) and the membership rows to store. `consume_vectors`: the caller reads `X`
    no more, so it is centred in place for the map (overwritten) instead of copied. The two
    halves, `fit_vectors` then `recluster_members`; a caller that can let `X` go between them
    (`export_all`) calls them itself."""
    fitted = fit_vectors(frame, X, cfg, state, day, lexicon, cut, stopwords, seeds, consume_vectors)
    return recluster_members(frame.drop(columns=["tokens"]) if "tokens" in frame else frame, fitted)


@dataclass
class VectorFit:
    """What a re-cluster takes from the vectors: the rest (`recluster_members`) reads the frame
    alone, so the vectors (1.5 KiB a case) need not be held while 2 member rows a case are built."""

    results: list[ScopeResult]
    clusters: pd.DataFrame
    state: ClusterState
    heads: pd.DataFrame | None  # `member_heads`
    projections: dict[str, Projection]
    all_rows: np.ndarray  # the heads' rows of the cross-type scope
    xy: tuple[np.ndarray, np.ndarray] | None  # their map coordinates, rounded; None when not placed


def fit_vectors(
    frame: pd.DataFrame,
    X: Vectors,
    cfg: Config,
    state: ClusterState,
    day: str,
    lexicon: CauseLexicon,
    cut=None,
    stopwords: frozenset[str] = frozenset(),
    seeds: dict[str, np.ndarray] | None = None,
    consume_vectors: bool = False,
    stored_tokens: TokenCodes | Callable[[], TokenCodes] | None = None,
    mapped: MapFit | None = None,
    token_folder: Path | None = None,
) -> VectorFit:
    """The clusters, stable ids, models, members' similarities and map points of a re-cluster
    (`full_clustering`'s arguments): everything of it that reads `X`. `stored_tokens`: the
    frame's stored tokens as codes (`stored_token_codes`), in place of a tokens column.
    `mapped`: the map of spilled vectors (`map_of_rows`); needed when `X` is spilled.
    `token_folder`: where the codes read through a callable `stored_tokens` are kept, mapped,
    while the scopes are described (`stored_tokens.spilled`)."""
    c = cfg.cluster
    results: list[ScopeResult] = []
    if len(frame):
        # The token lists as codes, then let go (with what reading them left in the allocators):
        # kept in the frame, Arrow's lists of every case's tokens were held to the end.
        without = frame.drop(columns=["tokens"]) if "tokens" in frame else frame
        tokens: TokenCodes | Callable[[], TokenCodes]
        if callable(stored_tokens):
            # Read when the clusters are first labelled (`cluster_cases`): not held through the
            # cross-type scope's KMeans search, the re-cluster's peak.
            tokens = functools.partial(_token_codes_of, without, cut, stored_tokens, token_folder)
        else:
            tokens = token_codes(frame, cut, stored_tokens)
        frame = without
        del stored_tokens, without
        # What the map's fit or the token read freed, back before the KMeans search grows on it.
        release_unused_memory()
        results = cluster_cases(frame, X, cfg, lexicon, stopwords=stopwords, seeds=seeds, tokens=tokens)
        del tokens
    clusters, new_state = assign_stable_ids(results, state, day, c.match_threshold)
    heads = member_heads(results, clusters, X)
    projections, model = fit_models(results, clusters, X, c.noise_quantile)
    if mapped is None:
        if not isinstance(X, np.ndarray):
            raise TypeError("spilled vectors come with their map (map_of_rows)")
        mapped = fit_map_points(X, consume_vectors)
    projections[MAP_SCOPE] = mapped.projection
    t = new_state.table.drop(columns=[m for m in MODEL_COLUMNS if m in new_state.table])
    t = t.merge(model.assign(model_day=day), on="cluster_id", how="left") if len(t) else t
    for m in MODEL_COLUMNS:
        if m not in t:
            t[m] = None
    all_rows = np.zeros(0, int)
    if heads is not None and len(heads):
        all_rows = np.flatnonzero((heads["scope"] == ALL_SCOPE).to_numpy())
    # The ALL scope's rows are the frame's, in order: the map's points are theirs.
    xy = mapped.xy if len(all_rows) == len(X) > 0 else None
    return VectorFit(results, clusters, ClusterState(t), heads, projections, all_rows, xy)


def _token_codes_of(frame: pd.DataFrame, cut, read: Callable[[], TokenCodes], folder: Path | None) -> TokenCodes:
    """`token_codes` of the frame with its stored tokens read (`stored_token_codes`) now; kept
    in a mapped file under `folder` when given (`spilled`)."""
    codes = token_codes(frame, cut, read())
    return codes if folder is None else spilled(codes, folder)


def recluster_members(
    frame: pd.DataFrame, fitted: VectorFit, texts: bool = True
) -> tuple[Clustering, dict[str, Projection], pd.DataFrame]:
    """`full_clustering`'s result from `fit_vectors`' and the selected cases (without tokens):
    the members table with the case fields and map points, and the membership rows to store
    (`recluster_table`, then `stored_members`)."""
    clustering, projections = recluster_table(frame, fitted, texts)
    return clustering, projections, stored_members(clustering.members, frame)


def recluster_table(
    frame: pd.DataFrame, fitted: VectorFit, texts: bool = True
) -> tuple[Clustering, dict[str, Projection]]:
    """The members table with the case fields and map points, and the projections.
    `texts=False`: the per-type rows' `_FILE_ONLY` fields left null (`members_view_rows`'
    form), the members file's rows then made by `with_file_texts` when it is written."""
    blank = () if texts else _FILE_ONLY_FIELDS
    members = members_with_fields(frame, fitted.results, fitted.heads, blank)
    members["x"], members["y"] = np.nan, np.nan
    if fitted.xy is not None:
        members.loc[fitted.all_rows, "x"] = fitted.xy[0]
        members.loc[fitted.all_rows, "y"] = fitted.xy[1]
    return Clustering(fitted.clusters, members, fitted.state), fitted.projections


def recluster_clustering(
    frame: pd.DataFrame,
    fitted: VectorFit,
    tail: ReclusterRows | None,
    texts: bool = True,
    case_rows: np.ndarray | None = None,
) -> tuple[Clustering, dict[str, Projection]]:
    """The clustering the tables read of a re-cluster: with its members' parts (`tail`), the
    cross-type rows and the tally of every row (a partial clustering, as a night's with a kept
    tally), where that tally makes every per-type table; else the whole table
    (`recluster_table`). `case_rows`: each frame row's row in the cases (`select_cases_at`)."""
    if tail is not None:
        cross = tail.cross()
        tally = tail.tally(cross)
        if mt.makes_tables(tally):
            # The cross-type rows are the frame's in order: each one's case row is known, so the
            # emotion table finds them without hashing every case id twice.
            clustering = Clustering(
                fitted.clusters, cross, fitted.state, case_rows=case_rows, tally=tally, partial=True
            )
            return clustering, fitted.projections
    return recluster_table(frame, fitted, texts)


def stored_members(members: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """The membership rows to store of a re-cluster's members table (`recluster_table`): made
    when they are written, as their run ids (2 a case) were held through every table."""
    stored = members.assign(run_id=_run_ids(members, frame)) if len(members) else members
    return stored.reindex(columns=MEMBER_COLUMNS)


def _run_ids(members: pd.DataFrame, frame: pd.DataFrame) -> pd.Series:
    """Each member row's case's run id from `frame` (its last row of that id), "" where there is
    none: the membership's key. Found by Arrow's hash look-up, not a dict of every case built and
    mapped in Python (two Python strings a case, held at the re-cluster's fullest)."""
    n = len(members)
    if "run_id" not in frame or not len(frame):
        return pd.Series([""] * n, index=members.index, dtype=object)
    runs = run_ids_at(frame, last_rows(_key(members["case_id"]), _key(frame["case_id"])))
    return pd.Series(runs.to_pandas().array, index=members.index)


# The members' columns only the members file shows (its texts and two labels no table counts);
# the tables read problem from the cross-type rows alone (the map's points).
_FILE_ONLY = ("conversation_id", "request_kind", "urgency", "problem")
# The same fields by the frame's names (the members table calls the cluster text `problem`).
_FILE_ONLY_FIELDS = tuple("cluster_text" if c == "problem" else c for c in _FILE_ONLY)


def with_file_texts(members: pd.DataFrame, frame: pd.DataFrame, rows: list[np.ndarray]) -> pd.DataFrame:
    """The members file's rows from a re-cluster's `recluster_members(..., texts=False)` table:
    the per-type rows' `_FILE_ONLY` fields taken from `frame` as `members_with_fields` takes
    them (`rows`: `member_rows` of its results). Made just before the file is written: held
    beside every table, those rows' texts (a copy of each selected case's problem) were the
    largest part of the members table."""
    cols = [c for c in _FILE_ONLY_FIELDS if c in frame]
    if not cols or not leads_in_order(rows, len(frame)) or len(members) != sum(len(r) for r in rows):
        return members
    body = _fields_at(frame[cols].reset_index(drop=True), rows).rename(columns={"cluster_text": "problem"})
    return members.assign(**{c: body[c] for c in body.columns})


def members_view(
    frame: pd.DataFrame, membership: pd.DataFrame, pos: np.ndarray | None = None, texts: bool = True
) -> pd.DataFrame:
    """`members_view_rows` without the rows."""
    return members_view_rows(frame, membership, pos, texts)[0]


def members_view_rows(
    frame: pd.DataFrame,
    membership: pd.DataFrame,
    pos: np.ndarray | None = None,
    texts: bool = True,
    cluster_codes: Codes | None = None,
) -> tuple[pd.DataFrame, np.ndarray, Codes | None]:
    """The export's members table (as `members_table` lays it out) from stored membership rows
    and the cases' current fields: no vectors needed. `pos`: each membership row's frame row
    (-1: none) where the caller has them (`locate_members`), else found here. `texts=False`: the
    per-type rows' `_FILE_ONLY` columns left null, for a view only the tables read (the file is
    written from other rows): taking them, the long problem texts most, for a million per-type
    rows was most of the view's 1.6 s at 1M cases. Also each view row's frame row: the tables
    then find a member's case by position, not by hashing its id again; and, given the
    membership's cluster ids' `sorted_codes` (`cluster_codes`), the view's (else None)."""
    keep = [c for c in MEMBER_FIELDS if c in frame]
    fields = frame[[c for c in keep if c != "case_id"]].rename(columns={"cluster_text": "problem"})
    m = membership[["scope", "cluster_id", "is_noise", "similarity", "case_id", "x", "y"]]
    # Each row's case by position (-1: no longer a selected case, left out as an inner join
    # would), found by Arrow's hash look-up: pandas' get_indexer on 200k string keys cost 0.06 s
    # a night. Rows in the members table's order (cross-type scope first, then scopes by name,
    # cases in frame order) by one sort of integer codes, not a sort of the string columns: the
    # three keys combined into one int64 (a case is once in a scope, so no two rows tie), whose
    # stable sort (timsort: the membership is mostly in this order already) took a third of the
    # three-key lexsort's 15 ms.
    if pos is None:
        pos = _index_in(_key(m["case_id"]), _key(frame["case_id"]))
    scope_codes, scopes = sorted_codes(m["scope"])  # scopes are never missing
    per_type = np.asarray(scopes != ALL_SCOPE, dtype=np.int64)[scope_codes]
    rows = np.flatnonzero(pos >= 0)
    order_key = (per_type[rows] * len(scopes) + scope_codes[rows]) * max(len(frame), 1) + pos[rows]
    rows = rows[np.argsort(order_key, kind="stable")]
    taken = pos[rows]
    # The cross-type scope's rows lead, and are usually every selected case in frame order:
    # those are the frame's own columns, a slice, and only the per-type rows are copied. Taking
    # all rows copied the cases' text twice (40 MB at 100k cases), 0.1 s of a night's export.
    off = np.flatnonzero(taken != np.arange(len(taken)))
    lead = int(off[0]) if len(off) else len(taken)
    # Arrow columns only: an object column's take with fills turns its None into NaN.
    blank = [c for c in _FILE_ONLY if c in fields and arrow_backed(fields[c])] if not texts else []
    rest = fields.drop(columns=blank).iloc[taken[lead:]]
    if blank:
        # Null where a row is per-type, the cross-type rows' texts kept (the map shows them).
        # Taken into the rows after the slice before they meet it: joined to the slice without
        # them, the columns were filled with nulls (a 1M-row array each at 1M cases) and then
        # replaced, 0.06 s a night.
        cross = (per_type[rows] == 0)[lead:]
        tail = np.where(cross, taken[lead:], -1)
        rest = rest.assign(**{col: fields[col].array.take(tail, allow_fill=True) for col in blank})[fields.columns]
    picked = pd.concat([fields.iloc[:lead], rest], ignore_index=True) if 0 < lead else rest.reset_index(drop=True)
    head = m.iloc[rows].reset_index(drop=True)
    head["case_id"] = head["case_id"].astype(str)  # as matched (no copy when they are text already)
    out = pd.concat([head, picked], axis=1)
    view_codes = taken_codes(*cluster_codes, rows) if cluster_codes is not None else None
    out["cluster_id"] = _none_where_missing(out["cluster_id"], view_codes)
    out["is_noise"] = out["is_noise"].astype(bool)
    out["similarity"] = _objects_or_none(out["similarity"])
    order = ["scope", "cluster_id", "is_noise", "similarity", *[c if c != "cluster_text" else "problem" for c in keep]]
    view = out[[*order, "x", "y"]].reset_index(drop=True)
    # The cases' columns at each row's case: the tables' codes of them are the frame's, taken
    # (`derive_codes`), not 2M members' strings hashed again; the scopes are the membership's.
    derive_codes(view["scope"], m["scope"], rows)
    for col in keep:
        name = "problem" if col == "cluster_text" else col
        if col != "case_id" and name not in _FILE_ONLY:
            derive_codes(view[name], frame[col], taken)
    return view, taken, view_codes


def cross_view(frame: pd.DataFrame, kept: mc.Kept, selected: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, Codes]:
    """`members_view_rows(frame, viewed, pos, texts=False, cluster_codes=codes)` of the stored
    membership's cross-type rows, the view a tally night's tables read, built from the kept
    entry's arrays (`member_cross`): the same columns, values and types, and the view's frame rows
    and cluster ids' codes. Why: handed a frame of those rows, that call selects, sorts, copies
    and converts them again (the scopes hashed, every id and similarity made a Python object),
    0.2 s at 1M cases, where here they are in frame order and of one scope already."""
    pos = np.flatnonzero(kept.cross[selected])
    rows = np.asarray(selected, dtype=np.int64)[pos]
    keep = [c for c in MEMBER_FIELDS if c in frame]
    fields = frame[[c for c in keep if c != "case_id"]].rename(columns={"cluster_text": "problem"})
    off = np.flatnonzero(pos != np.arange(len(pos)))
    lead = int(off[0]) if len(off) else len(pos)
    blank = [c for c in _FILE_ONLY if c in fields and arrow_backed(fields[c])]
    rest = fields.drop(columns=blank).iloc[pos[lead:]]
    if blank:
        rest = rest.assign(**{col: fields[col].array.take(pos[lead:]) for col in blank})[fields.columns]
    picked = pd.concat([fields.iloc[:lead], rest], ignore_index=True) if 0 < lead else rest.reset_index(drop=True)
    code = kept.code[rows]
    view_codes = taken_codes(code, kept.ids, np.arange(len(code)))
    ids = np.append(kept.ids, np.array([None], dtype=object))[code]  # -1 (none) reads the last
    head = pd.DataFrame(
        {
            "scope": mc.repeated(ALL_SCOPE, len(rows)),
            "cluster_id": pd.Series(ids, dtype=object),
            "is_noise": kept.is_noise[rows],
            "similarity": _objects_or_none(pd.Series(kept.similarity[rows])),
            "case_id": frame["case_id"].iloc[pos].reset_index(drop=True).astype(str),
            # Here, not set after the join: each set on the joined frame cost 9 ms at 1M rows.
            "x": kept.x[rows],
            "y": kept.y[rows],
        }
    )
    out = pd.concat([head, picked], axis=1)
    order = ["scope", "cluster_id", "is_noise", "similarity", *[c if c != "cluster_text" else "problem" for c in keep]]
    view = out[[*order, "x", "y"]].reset_index(drop=True)
    remember_codes(view["scope"], (np.zeros(len(view), dtype=np.int64), np.array([ALL_SCOPE], dtype=object)))
    for col in keep:
        name = "problem" if col == "cluster_text" else col
        if col != "case_id" and name not in _FILE_ONLY:
            derive_codes(view[name], frame[col], pos)
    return view, pos, view_codes


def _objects_or_none(values: pd.Series) -> pd.Series:
    """`values.astype(object).where(values.notna(), None)`. For floats, the missing ones are
    found as NaN in the floats, not by visiting the 2M Python objects made of them (0.03 s a
    night at 1M cases)."""
    if values.dtype != np.float64:
        return values.astype(object).where(values.notna(), None)
    floats = values.to_numpy()
    out = floats.astype(object)
    out[np.isnan(floats)] = None
    return pd.Series(out, index=values.index, dtype=object, name=values.name)


def float_similarity(new: pd.DataFrame, held: pd.DataFrame) -> pd.DataFrame:
    """The night's new membership rows with their similarities as floats (missing: NaN) when the
    stored rows hold floats, so that the joined column stays floats (`_objects_or_none`): the
    new rows' Python floats (or None) made an object column of all 2M. The same values: a stored
    part keeps them as floats (`membership.member_part_table`)."""
    if held["similarity"].dtype != np.float64 or "similarity" not in new:
        return new
    return new.assign(similarity=pd.to_numeric(new["similarity"], errors="coerce").astype(np.float64))


def _none_where_missing(ids: pd.Series, codes: Codes | None) -> pd.Series:
    """`ids.where(ids.notna(), None)`: missing ids as None. For an object column whose codes are
    known, the missing cells are the codes' -1, not found by visiting every object (`notna` and
    `where` on the 2M members' ids cost 0.05 s a night at 1M cases)."""
    if codes is None or ids.dtype != object or len(codes[0]) != len(ids):
        return ids.where(ids.notna(), None)
    values = ids.to_numpy(dtype=object, copy=True)
    values[codes[0] < 0] = None
    return pd.Series(values, index=ids.index, dtype=object, name=ids.name)


def member_cluster_codes(kept: pd.Series, new: pd.Series) -> Codes | None:
    """`sorted_codes` of the cluster ids `pd.concat([kept, new])` holds (a night's membership:
    the stored rows it keeps, then its new rows), from the stored rows' Arrow text (hashed 4x
    faster than the joined object column: 0.11 s for 2M members at 1M cases) and the few new
    ones. None (hash the joined column) unless every id is text: a sorted factorization of
    other values could order them otherwise."""
    if not arrow_backed(kept):
        return None
    (a, ua), (b, ub) = sorted_codes(kept), sorted_codes(new)
    if not all(isinstance(u, str) for u in ub):
        return None
    # Arrow orders text by code point, as Python compares str: one sorted list of both.
    both = np.asarray(sorted(set(ua.tolist()) | set(ub.tolist())), dtype=object)
    where_a = np.append(np.searchsorted(both, ua).astype(np.int64), -1)  # -1 (missing) reads the last
    where_b = np.append(np.searchsorted(both, ub).astype(np.int64), -1)
    return np.concatenate([where_a[a], where_b[b]]), both


def counted_members(members: pd.DataFrame, counted: list[str], cluster_codes: Codes | None) -> pd.DataFrame:
    """The members' `counted` columns, or none of their rows when no row has a cluster (where
    the counts and the week-over-week test answer for an empty frame). Whether any has, from the
    cluster ids' codes when given (-1: missing, as notna tells): a notna of 2M object cells cost
    65 ms a night at 1M cases."""
    if not len(members):
        return members
    has_cluster = (
        bool((cluster_codes[0] >= 0).any()) if cluster_codes is not None else members["cluster_id"].notna().any()
    )
    return members[counted] if has_cluster else members.iloc[0:0][counted]


def _member_tables(
    members: pd.DataFrame,
    clustering: Clustering,
    clusters: pd.DataFrame,
    cfg: Config,
    as_of: date | None,
    labels: dict[str, str],
    new_ids: list[str],
    issue_counts: pd.Series,
) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame, Codes | None]:
    """The cluster counts, the clusters' week-over-week rows and the matrix counted from every
    member row, and the members' cluster ids' codes."""
    c = cfg.cluster
    # Only what the counts and the week-over-week test read, rows without a cluster kept: both
    # count a missing key nowhere, and filtering 200k members cost 15 ms a night. Filtered when
    # no row has a cluster, where both answer for an empty frame.
    counted = [col for col in ("cluster_id", "date", *BREAKDOWNS) if col in members]
    cluster_codes = _cluster_codes(members, clustering.cluster_codes)
    clustered = counted_members(members, counted, cluster_codes)
    by_cluster = cluster_codes if len(clustered) == len(members) else None  # rows as the codes'
    counts = count_table(clustered, "cluster", "cluster_id", key_codes=by_cluster)
    alerts = (
        week_over_week(
            clustered, "cluster", "cluster_id", as_of, c.alert_alpha, c.alert_min_count, labels, new_ids, by_cluster
        )
        if as_of
        else None
    )
    matrix = root_cause_matrix(members, clusters, issue_counts, c.top_breakdown, cluster_codes)
    return counts, alerts, matrix, cluster_codes


def _cluster_codes(members: pd.DataFrame, known: Codes | None) -> Codes | None:
    """The members' cluster ids as sorted codes, once: `known` when they are these rows', else
    hashed (an object column, no shared Arrow codes: ~15 ms a table at 200k members)."""
    if known is not None and len(known[0]) == len(members):
        return known
    return sorted_codes(members["cluster_id"]) if len(members) and "cluster_id" in members else None


def finish_export(
    cases: pd.DataFrame,
    frame: pd.DataFrame,
    clustering: Clustering,
    cfg: Config,
    day: str,
    notes: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ExportBundle:
    """Trends, alerts, matrix, KPIs, emotion tables, the report and the summary from cases and
    their membership: counts only, no vectors. Pure apart from CPU."""
    c = cfg.cluster
    notes = list(notes or [])
    clusters, state = clustering.clusters, clustering.state
    points = map_points(clustering.members, clusters, c.map_max_points)
    members = clustering.members.drop(columns=[x for x in ("x", "y") if x in clustering.members])
    as_of = default_as_of(cases)
    labels = dict(zip(clusters["cluster_id"], clusters["label"])) if len(clusters) else {}
    new_ids = clusters.loc[clusters["is_new"], "cluster_id"].tolist() if len(clusters) and len(state.table) else []
    # The per-type tables from the members' tally (`member_tallies`) when it makes them all: on
    # a night whose members are a kept tally's and a few new rows, `members` holds the
    # cross-type rows alone; on another, the tally counted every member once for the clusters
    # table, and counting them again for the counts and the matrix cost as much again.
    tally = clustering.tally if clustering.partial or mt.makes_tables(clustering.tally) else None
    issue_counts = frame["issue_type"].value_counts() if len(frame) else pd.Series(dtype=int)
    if tally is not None and tally.days is not None:
        cluster_counts = counts_from_days("cluster", tally.days, tally.breakdowns)
        cluster_alerts = (
            wow_from_days(
                tally.days, tally.cluster_ids(), "cluster", as_of, c.alert_alpha, c.alert_min_count, labels, new_ids
            )
            if as_of
            else None
        )
        cluster_codes = _cluster_codes(members, clustering.cluster_codes)
        matrix = matrix_from_groups(*mt.typed_shares(tally), clusters, issue_counts, c.top_breakdown)
    else:
        cluster_counts, cluster_alerts, matrix, cluster_codes = _member_tables(
            members, clustering, clusters, cfg, as_of, labels, new_ids, issue_counts
        )
    counts = pd.concat([count_table(cases, "issue_type", "issue_type"), cluster_counts], ignore_index=True)
    alerts = (
        pd.concat(
            [
                cluster_alerts,
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
    # Each table reads whole columns of the cases, which a re-cluster maps from the export's case
    # copy: their pages leave the process after each table, not after the report (23 MiB of the
    # copy resident while a 129k-case report was rendered, the export's peak once the members
    # file and the clusters' vectors were read a block at a time).
    release_mapped_pages()
    kpis = compute_kpis(cases)
    notes.append(timing_coverage(kpis))
    if "date_source" in cases and (cases["date_source"] == "ingested").any():
        notes.append(f"{int((cases['date_source'] == 'ingested').sum())} 个案例无会话时间，按导入日期计入趋势。")
    release_mapped_pages()
    teams = case_teams(cases)  # both emotion tables group by team: parse the metadata once
    emotion = trajectory_table(cases, members, teams, cluster_codes, clustering.case_rows)
    release_mapped_pages()
    emotion_rel = relations(cases)
    emotion_teams = worsened_by_team(cases, teams)
    release_mapped_pages()
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
    release_mapped_pages()  # the members' columns its charts read
    all_noise = members.loc[members["scope"] == ALL_SCOPE, "is_noise"] if len(members) else pd.Series(dtype=bool)
    summary = {
        "date": day,
        "as_of": as_of.isoformat() if as_of else None,
        "n_cases": int(len(cases)),
        "n_clustered_cases": int(len(frame)),
        "n_clusters": int(len(clusters)),
        "n_clusters_all_scope": int((clusters["scope"] == ALL_SCOPE).sum()) if len(clusters) else 0,
        "n_new_clusters": int(clusters["is_new"].sum()) if len(clusters) else 0,
        "noise_share_all_scope": round(float(all_noise.mean()), 4) if len(all_noise) else None,
        **trend_summary(alerts),
        **(extra or {}),
        # The members file's rows: the tally counted them all where `members` is the cross-type part.
        "rows": {k: int(tally.rows if k == "members" and tally is not None else len(v)) for k, v in tables.items()},
        "notes": notes,
    }
    return ExportBundle(day, tables, report, summary, state, notes)


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
    """All tables, the report and the new cluster state from a full re-cluster of the selected
    cases' vectors (`X` aligned with `frame = select_cases(cases)`). Pure apart from CPU."""
    clustering, _, _ = full_clustering(frame, X, cfg, state, day, lexicon, cut, stopwords)
    return finish_export(cases, frame, clustering, cfg, day, notes)


# -- writing ------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


_SCALAR_KINDS = frozenset({"empty", "string", "floating", "integer", "boolean", "bytes", "decimal", "complex"})


def to_csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """List cells as JSON text (CSV has no lists); everything else as is. Only object columns can
    hold lists: string, number and bool columns are left alone without visiting their cells (at
    100k cases the visit cost seconds per export)."""
    # Shallow: columns are replaced below, never written into, and a deep copy of the members
    # table (its problem text) was the write's peak.
    out = df.copy(deep=False)
    listy = (list, tuple, np.ndarray, dict)
    for col in out.columns:
        # infer_dtype scans in C: an object column of one scalar kind with None (the members'
        # cluster ids and similarities) holds no list, and visiting its 200k cells cost time.
        if out[col].dtype != object or pd.api.types.infer_dtype(out[col], skipna=True) in _SCALAR_KINDS:
            continue
        vals = out[col].tolist()
        if any(isinstance(v, listy) for v in vals):
            text = [json.dumps(_jsonable(v), ensure_ascii=False) if isinstance(v, listy) else v for v in vals]
            out[col] = pd.Series(text, index=out.index, dtype=object)
    return out


_UTF8 = {"utf-8": b"", "utf8": b"", "utf-8-sig": codecs.BOM_UTF8, "utf_8_sig": codecs.BOM_UTF8}


def _csv_bom(encoding: str) -> bytes | None:
    """The bytes Arrow's CSV text starts with for `encoding` (a BOM or none), None where Arrow
    cannot write it (not UTF-8: pandas writes it)."""
    return _UTF8.get(encoding.lower().replace("_", "-"))


def _pandas_writes(bom: bytes | None, frame: pd.DataFrame) -> bool:
    """Whether pandas, not Arrow, writes `frame`'s CSV (`write_csv`'s reasons): another encoding
    than UTF-8, one column, or date-times."""
    return bom is None or len(frame.columns) < 2 or any(pd.api.types.is_datetime64_any_dtype(t) for t in frame.dtypes)


def write_csv(path: Path, df: pd.DataFrame, encoding: str, table: pa.Table | None = None) -> None:
    """`df` as CSV (lists as JSON text), whole or not at all. `table`: `df` as Arrow already (the
    Parquet file's), reused when no column is nested, so the members table is converted once.

    Why Arrow's writer: pandas' took 1.1 s for the members table of a 100k history (202k rows),
    most of a night's incremental export; Arrow's takes 0.1 s. Its text differs in form, not in
    value: strings are always quoted, booleans are written true/false, whole floats without ".0".
    Pandas writes what Arrow would write differently or not at all: other encodings than UTF-8,
    columns Arrow cannot type (mixed objects), date-times (Arrow adds nanoseconds), and one-column
    tables (Arrow writes a null as an empty line, which readers skip)."""
    bom = _csv_bom(encoding)
    if table is not None and any(pa.types.is_nested(f.type) for f in table.schema):
        table = None  # lists and dicts are written as JSON text: converted again from `csv`
    # Without nested columns `to_csv_frame` has nothing to change: the reused table is the text.
    csv = df if table is not None else to_csv_frame(df)
    if _pandas_writes(bom, csv):
        table = None
    elif table is None:
        try:
            table = pa.Table.from_pandas(csv, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            table = None  # a mixed column: pandas writes each cell's own text
    if table is None or bom is None:
        atomic_write_stream(path, lambda f: csv.to_csv(f, index=False, encoding=encoding))
        return

    def write(f: Any) -> None:
        f.write(bom)
        pacsv.write_csv(table, f, pacsv.WriteOptions(quoting_style="needed"))

    atomic_write_stream(path, write)


def write_table(folder: Path, name: str, df: pd.DataFrame, csv_encoding: str) -> None:
    """`df` as `<name>.parquet` and `<name>.csv` in `folder`."""
    write_pair(folder / f"{name}.parquet", folder / f"{name}.csv", df, csv_encoding)


def write_pair(parquet: Path, csv: Path, df: pd.DataFrame, csv_encoding: str) -> None:
    """`df` as a Parquet and a CSV file, converted to Arrow once for both."""
    df = df.reset_index(drop=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    atomic_write_parquet(parquet, table)
    write_csv(csv, df, csv_encoding, table)


def write_members_pair(parquet: Path, csv: Path, rows: pd.DataFrame | mp.RowBlocks, csv_encoding: str) -> None:
    """A members part as `write_pair` writes a table, but in row groups of `GROUP_ROWS` rows
    (`member_parts`); `RowBlocks` a block at a time, where the blocks make the same files."""
    if not isinstance(rows, pd.DataFrame):
        bom = _csv_bom(csv_encoding)
        schema = _block_schema(rows, bom)
        if schema is not None and bom is not None:
            _write_blocks(parquet, csv, rows, schema, bom)
            return
        rows = rows.whole()
    df = rows.reset_index(drop=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    atomic_write_parquet_groups(parquet, table.schema, (table.slice(a, b - a) for a, b in mp.group_bounds(len(df))))
    write_csv(csv, df, csv_encoding, table)


def _block_schema(rows: mp.RowBlocks, bom: bytes | None) -> pa.Schema | None:
    """The whole table's schema, its pandas metadata included, where the blocks' CSV is Arrow's
    written from them as `write_csv` writes it from the whole table; else None. Arrow's values
    are written each on its own; `write_csv`'s decisions made over a whole column (lists as JSON,
    pandas' writer for dates) are not taken block by block."""
    try:
        types = rows.types()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None  # a mixed column: as the whole table fails
    empty = rows.block(0, 0)
    if _pandas_writes(bom, empty) or any(pa.types.is_nested(t) for t in types.types):
        return None
    # The metadata follows the dtypes and the types alone, not the rows.
    return pa.Table.from_pandas(empty, schema=types, preserve_index=False).schema


def _write_blocks(parquet: Path, csv: Path, rows: mp.RowBlocks, schema: pa.Schema, bom: bytes) -> None:
    """`rows` into both files, a block (a row group) at a time: each block converted once."""

    def groups(f: Any) -> Iterator[pa.Table]:
        with pacsv.CSVWriter(f, schema, write_options=pacsv.WriteOptions(quoting_style="needed")) as out:
            for a, b in mp.group_bounds(len(rows)):
                table = pa.Table.from_pandas(rows.block(a, b), schema=schema, preserve_index=False)
                out.write_table(table)
                yield table
                del table  # written to both: not alive while the next block is made
                release_mapped_pages()  # the block's texts read from the mapped case copy

    def write(f: Any) -> None:
        f.write(bom)
        atomic_write_parquet_groups(parquet, schema, groups(f))

    atomic_write_stream(csv, write)


def _members_to_write(
    bundle: ExportBundle, rows: pd.DataFrame | None, blocks: mp.RowBlocks | None
) -> pd.DataFrame | mp.RowBlocks:
    """The members part's rows: `rows` (after linked parts), else `blocks`, else the bundle's."""
    if rows is not None:
        return rows
    return blocks if blocks is not None else bundle.tables[mp.MEMBERS]


def write_export(
    out: Path,
    bundle: ExportBundle,
    csv_encoding: str = "utf-8-sig",
    members_reuse: list[Path] | None = None,
    members_rows: pd.DataFrame | None = None,
    members_blocks: mp.RowBlocks | None = None,
) -> Path:
    """Write every file into a temporary folder, swap it in as exports/<day>, update LATEST.
    A killed export leaves the previous folder (and LATEST) untouched. The members table is
    written as parts (`member_parts`): `members_reuse`, the previous folder's parts to link,
    and `members_rows`, the rows after them (the next part); without both, the bundle's
    members table, or `members_blocks` (a re-cluster's, made as written), as one part."""
    root = exports_root(out)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{bundle.day}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        # The other tables written on two threads while this one writes the members: Parquet's
        # compression, Arrow's CSV writer and the syncs release the GIL, and one after another
        # the nine tables were 0.15 s of a night's wall time at 100k cases (the trends, a row
        # per key, day and breakdown, most of it). Each file is its own; the folder is swapped
        # in only once every write has returned.
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = [
                pool.submit(write_table, tmp, name, bundle.tables[name], csv_encoding)
                for name in TABLES
                if name != mp.MEMBERS
            ]
            linked = members_reuse is not None and members_rows is not None and len(members_reuse) > 0
            bundle.summary["members_parts"] = mp.write_members(
                tmp,
                _members_to_write(bundle, members_rows if linked else None, members_blocks),
                (members_reuse or []) if linked else [],
                lambda parquet, csv, rows: write_members_pair(parquet, csv, rows, csv_encoding),
            )
            atomic_write_text(tmp / "report.html", bundle.report_html)
            for done in pending:
                done.result()  # a failed write raises here, before anything is swapped in
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


def _float_vector(v: Any) -> np.ndarray | None:
    """A stored vector as float64 values (None when empty or not a vector). An array, not a list
    of Python floats: Arrow converts it whole to the same list<double> cells, where the per-value
    float() and the conversion of each Python float cost 20 ms a night (~700 vectors of 384)."""
    if isinstance(v, (list, tuple, np.ndarray)) and len(v):
        return np.asarray(v, dtype=np.float64)
    return None


def save_state(out: Path, state: ClusterState) -> Path:
    p = state_path(out)
    t = state.table.copy()
    for col in ("centroid", "center"):
        if col in t:
            t[col] = pd.Series([_float_vector(v) for v in t[col]], index=t.index, dtype=object)
    for col in ("radius_full",):
        if col in t:
            t[col] = pd.to_numeric(t[col], errors="coerce").astype(np.float64)
    if "model_day" in t:
        t["model_day"] = t["model_day"].astype(object).where(t["model_day"].notna(), None)
    atomic_write_parquet(p, pa.Table.from_pandas(t.reset_index(drop=True), preserve_index=False))
    return p


# -- the entry point ----------------------------------------------------------------------------


def embedder_identity(embedder: Any) -> str:
    """Which vectors the stored clusters live among: another model's vectors cannot be assigned."""
    return f"{getattr(embedder, 'model_name', type(embedder).__name__)}|{getattr(embedder, 'backend', '')}"


def full_reason(
    cfg: Config, meta: dict[str, Any], state: ClusterState, day: date, recluster: bool, embedder_id: str
) -> str | None:
    """Why tonight re-clusters everything, or None for an incremental night."""
    if recluster:
        return "requested"
    last = meta.get("last_full")
    if not last or state.table.empty or "model_day" not in state.table:
        return "no_state"
    if meta.get("embedder") != embedder_id:
        return "embedder_changed"
    every = cfg.cluster.recluster_every_days
    if every == 0:
        return "schedule"
    try:
        age = (day - date.fromisoformat(str(last))).days
    except ValueError:
        return "no_state"
    if age >= every:
        return "schedule"
    return None


def _key(*cols: pd.Series) -> pa.Array:
    """Each row's key as one Arrow string (several columns joined by U+001F, which ids never
    hold), for `_is_in`."""
    arrays = [_arrow_strings(c) for c in cols]
    return arrays[0] if len(arrays) == 1 else pc.binary_join_element_wise(*arrays, pa.scalar("\x1f", pa.large_string()))


def _is_in(values: pa.Array, among: pa.Array) -> np.ndarray:
    """Which `values` are in `among`, as a bool array; a missing value is in nothing. Arrow's
    hash look-up: Python sets of 200k (case, run) tuples built and probed each night cost 0.3 s
    at 100k stored cases, and Series.isin on Arrow strings makes one Arrow scalar per value."""
    return np.asarray(pc.is_in(values, value_set=among, skip_nulls=True).to_numpy(zero_copy_only=False), dtype=bool)


def locate_members(
    membership: pd.DataFrame, frame: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """What a night asks of the membership: which of its rows hold a case `frame` still selects
    (`alive`), which `frame` rows no membership row holds with their run (`todo`: new or
    re-processed), and which membership rows hold a case of those (`redone`: replaced tonight).
    Where `frame` holds each case once (the newest-row rule's frame always does), one hash of its
    case ids answers all three: hashing the membership's 200k joined (case, run) keys and probing
    them cost 25-40 ms at 100k cases. Otherwise the keys are looked up as such (`_is_in`).
    A missing id or run matches nothing. Fourth: each membership row's frame row (-1: none) as
    `members_view` finds it, kept from that hash (None where the frame repeats an id)."""
    frame_ids = _key(frame["case_id"])
    member_ids = _key(membership["case_id"])
    codes = frame_ids.dictionary_encode()
    if len(codes.dictionary) != len(frame_ids) - frame_ids.null_count:
        todo = ~_is_in(_key(frame["case_id"], frame["run_id"]), _key(membership["case_id"], membership["run_id"]))
        alive = _is_in(member_ids, frame_ids)
        return alive, todo, _is_in(member_ids, frame_ids.filter(pa.array(todo))), None
    # The dictionary is the frame's ids in row order, less the missing ones.
    rows = np.flatnonzero(np.asarray(codes.indices.is_valid().to_numpy(zero_copy_only=False), dtype=bool))
    found = _index_in(member_ids, codes.dictionary)
    alive = found >= 0
    pos = rows[found[alive]]  # the frame row of each alive membership row
    member_runs = _arrow_strings(membership["run_id"]).filter(pa.array(alive))
    same = pc.equal(member_runs, _arrow_strings(frame["run_id"]).take(pa.array(pos)))
    todo = np.ones(len(frame), dtype=bool)
    todo[pos[np.asarray(pc.fill_null(same, False).to_numpy(zero_copy_only=False), dtype=bool)]] = False
    redone = np.zeros(len(member_ids), dtype=bool)
    redone[np.flatnonzero(alive)[todo[pos]]] = True
    where = np.full(len(member_ids), -1, dtype=np.int64)
    where[alive] = pos
    return alive, todo, redone, where


def renewed_positions(
    kept: np.ndarray, new_ids: pd.Series, todo_frame: pd.DataFrame, todo: np.ndarray
) -> np.ndarray | None:
    """`locate_members`' positions for tonight's membership (the `kept` rows' positions, then
    the new rows'), the new rows found among the few `todo_frame` cases they came from rather
    than by hashing the whole frame again. Where the frame holds each id once, a new row's case
    is that todo row's and nowhere else (a missing key is nowhere, -1, as it was); None (look up
    as before) when a key is not found there, so that a key `_key` spells differently cannot be
    placed elsewhere."""
    keys = _key(new_ids)
    found = _index_in(keys, _key(todo_frame["case_id"]))
    valid = np.asarray(keys.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    if (valid & (found < 0)).any():
        return None
    rows = np.where(found >= 0, np.flatnonzero(todo)[np.maximum(found, 0)] if todo.any() else -1, -1)
    return np.concatenate([kept, rows]).astype(np.int64, copy=False)


def located(
    out: Path,
    meta: dict[str, Any],
    cases: pd.DataFrame,
    copy_rows: CopyRows | None,
    frame: pd.DataFrame,
    selected: np.ndarray,
    prefix: CopyRows | None = None,
) -> tuple[pd.DataFrame, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The stored membership, its part count and `locate_members` of it (alive, todo, redone,
    positions), read from every membership part (`prefix`: `copy_lead`)."""
    read = mb.read_members(out, meta)
    membership, n_parts = read.frame, len(read.parts)
    if copy_rows is not None and copy_rows[1] == len(cases):
        # The cases are the case copy's rows: each member's case row is kept between nights.
        rows, same = member_rows.part_rows(
            out, read, _key(cases["case_id"]), _arrow_strings(cases["run_id"]), copy_rows[0], prefix
        )
        return membership, n_parts, *member_rows.locate(rows[read.kept], same[read.kept], selected, len(cases))
    return membership, n_parts, *locate_members(membership, frame)


@dataclass
class KeptNight:
    """A night whose membership is the kept cross-type entry's (`member_cross`): `todo`, the frame
    rows no member holds; `head`, one stored membership row (the stored columns' types, which
    tonight's new rows are joined to as the read membership's rows were); what the linked
    members parts and the kept tally are (`reuse`, `tally`)."""

    kept: mc.Kept
    todo: np.ndarray
    head: pd.DataFrame
    n_parts: int
    reuse: list[Path]
    tally: mt.Tally


@dataclass
class FastView:
    """A kept night's members side after its new rows: the members file's new part, the tally
    with them, and the entry with them (`kept`), which the cross-type view is read from."""

    reuse: list[Path]
    part_rows: pd.DataFrame
    tally: mt.Tally
    kept: mc.Kept


def kept_night(
    out: Path,
    meta: dict[str, Any],
    copy_rows: CopyRows | None,
    n_cases: int,
    selected: np.ndarray,
    prefix: CopyRows | None = None,
) -> KeptNight | None:
    """The night as the kept entry describes it, when it can be taken so: the entry is of this
    membership and case copy (`prefix`: `copy_lead`), the same rows of it selected, the
    membership not due to be compacted, last night's members parts linkable with their kept
    tally, and every case no member holds after every held one in the frame (as `_kept_tally`
    needs); else None."""
    if copy_rows is None or copy_rows[1] != n_cases:
        return None
    parts = mb.current_parts(out, meta)
    if not parts or len(parts) + 1 > mb.COMPACT_PARTS:
        return None
    kept = mc.load(out, copy_rows[0], n_cases, mc.parts_key(out, meta), prefix)
    if kept is None:
        return None
    is_selected = np.zeros(n_cases, dtype=bool)
    is_selected[selected] = True
    if not np.array_equal(is_selected[: kept.n], kept.selected):
        return None
    held = np.zeros(n_cases, dtype=bool)
    held[: kept.n] = kept.member
    held_rows = held[selected]
    todo = ~held_rows
    at = np.flatnonzero(held_rows)
    if len(at) and todo.any() and int(at[-1]) > int(np.flatnonzero(todo)[0]):
        return None
    state_part = mb.last_part(out)
    reuse = mp.reusable_parts(latest_export(out), state_part, kept.n_members)
    if not reuse:
        return None
    tally = mt.load(out, mt.folder_key(reuse[0].parent.parent, kept.n_members, state_part))
    if tally is None:
        return None
    head = mb.first_row(parts[-1][0], parts[-1][1])
    if head is None:
        return None
    return KeptNight(kept, todo, head, len(parts), reuse, tally)


def fast_members(
    night: KeptNight,
    frame: pd.DataFrame,
    selected: np.ndarray,
    new_rows: pd.DataFrame,
    todo_frame: pd.DataFrame,
    todo: np.ndarray,
    n_cases: int,
) -> FastView | None:
    """What a kept night's tables read of its members, from the entry and tonight's new rows;
    None where the entry cannot give it (then the membership is read)."""
    head = night.head
    joined = pd.concat([head, float_similarity(new_rows, head)], ignore_index=True).iloc[len(head) :]
    new_positions = renewed_positions(np.zeros(0, dtype=np.int64), new_rows["case_id"], todo_frame, todo)
    if new_positions is None or (len(new_positions) and int(new_positions.min()) < 0):
        return None
    part_rows = members_view(frame, joined, new_positions)
    try:
        tally = (
            mt.merge(night.tally, mt.count_members(part_rows, start=night.tally.rows))
            if len(part_rows)
            else night.tally
        )
    except ValueError:  # kept of other columns than tonight's
        return None
    if not mt.makes_tables(tally):
        return None
    kept = mc.with_new_rows(night.kept, new_rows, np.asarray(selected)[new_positions], selected, n_cases)
    if kept is None:
        return None
    return FastView(night.reuse, part_rows, tally, kept)


def _kept_tally(
    out: Path, reuse: list[Path], positions: np.ndarray | None, n_kept: int, part_rows: pd.DataFrame | None
) -> mt.Tally | None:
    """The tally of tonight's members (`member_tallies`): last night's kept one with tonight's
    new rows (`part_rows`) added, when last night's members table is linked as tonight's
    leading rows (`reuse`) and every new row's case comes after every kept row's in the cases
    (so after them within its cluster and matrix group, as the ties assume); else None (the
    members are viewed and counted whole). Only a tally that can make every per-type table:
    daily counts to add to, matrix groups each within one scope."""
    if not reuse or positions is None or part_rows is None:
        return None
    new_pos, old_pos = positions[n_kept:], positions[:n_kept]
    new_pos, old_pos = new_pos[new_pos >= 0], old_pos[old_pos >= 0]
    if len(new_pos) and len(old_pos) and int(new_pos.min()) <= int(old_pos.max()):
        return None
    kept = mt.load(out, mt.folder_key(reuse[0].parent.parent, len(old_pos), mb.last_part(out)))
    if kept is None:
        return None
    try:
        tally = mt.merge(kept, mt.count_members(part_rows, start=kept.rows)) if len(part_rows) else kept
    except ValueError:  # kept of other columns than tonight's
        return None
    return tally if mt.makes_tables(tally) else None


def _keep_tally(
    out: Path, folder: Path, tally: mt.Tally | None, clustering: Clustering, state_part: int, summary: dict[str, Any]
) -> None:
    """Keep tonight's members tally for the next night, named by the members table just written."""
    rows = int(summary["rows"]["members"])
    if tally is None or tally.rows != rows:
        if len(clustering.members) != rows or clustering.partial:
            return
        tally = mt.count_members(clustering.members, clustering.cluster_codes) if rows else None
    key = mt.folder_key(folder, rows, state_part)
    if tally is not None and key is not None:
        mt.save(out, tally, key)


def _embed(embedder: PassageEncoder, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, 384), np.float32)
    return np.asarray(embedder.encode_passages(texts), dtype=np.float32)


# Free text the tables never read once `frame` has its cluster_text: all-history copies of them
# were most of the export's memory (the cases keep metadata_json, which `case_teams` reads).
_CASE_TEXTS = ("problem", "customer_text")
_FRAME_TEXTS = ("problem", "customer_text", "metadata_json")


def drop_texts(cases: pd.DataFrame, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`cases` and the selected `frame` without the free-text columns no later step reads."""
    return (
        cases.drop(columns=[col for col in _CASE_TEXTS if col in cases]),
        frame.drop(columns=[col for col in _FRAME_TEXTS if col in frame]),
    )


def _remember_counts(out: Path, cases: pd.DataFrame, copy_rows: CopyRows | None, lead: CopyRows | None) -> None:
    """Hand the kept-count modules this export's case columns: each reads (or counts and keeps)
    its counts beside the case copy (`lead`: `copy_lead`), for the table that counts the very
    same column."""
    remember_case_codes(out, cases, copy_rows, lead)
    case_numbers.remember(out, cases, copy_rows, prefix=lead)
    case_relations.remember(out, cases, copy_rows, prefix=lead)
    case_kpis.remember(out, cases, copy_rows, prefix=lead)
    case_trajectories.remember(out, cases, copy_rows, case_team_codes, prefix=lead)


def _forget_counts() -> None:
    """Let the kept counts go once the tables are counted, and when an export raises before
    that: else a failed export's counts stay held until the next export's."""
    case_numbers.forget()
    case_relations.forget()
    case_kpis.forget()
    case_trajectories.forget()


@dataclass
class _Recluster:
    """A full re-cluster's result: the clustering the tables read, the scopes' projections to
    save, and the members as the file is written from them: `tail` (the parts of the whole
    table, `ReclusterRows`) or `file_rows` (each scope's member rows, for the texts the tables'
    members lack); neither under `since`."""

    clustering: Clustering
    projections: dict[str, Any]
    tail: ReclusterRows | None
    file_rows: list[np.ndarray] | None
    t_embed: float


def _recluster(
    cfg: Config,
    out: Path,
    frame: pd.DataFrame,
    embedder: PassageEncoder,
    state: ClusterState,
    meta: dict[str, Any],
    embedder_id: str,
    day: str,
    since: date | None,
    selected: np.ndarray,
) -> _Recluster:
    """Re-cluster every selected case (`fit_vectors`), from vectors embedded (mostly read from
    the cache) into a file a block at a time and read back a few rows at a time by every
    stage: the vectors are never all in memory. `selected`: each frame row's row in the cases."""
    c = cfg.cluster
    t1 = time.perf_counter()
    vectors = embed_to_rows(embedder, frame["cluster_text"], case_cache_path(out).parent)
    t_embed = time.perf_counter() - t1
    # The model, if a text the cache lacked loaded it (a run lets it go before the export), and
    # the encoding's buffers: what the re-cluster would grow on top of.
    release_shared_models()
    release_unused_memory()
    with vectors:
        mapped = map_of_rows(vectors, c.fit_max_cases)
        same_space = meta.get("embedder") == embedder_id
        seeds = seeds_from_state(state, meta, vectors.shape[1]) if c.seed_from_state and same_space else {}
        fitted = fit_vectors(
            frame,
            vectors,
            cfg,
            state,
            day,
            CauseLexicon.load(cfg),
            cut=_cutter(cfg),
            stopwords=_stopwords(cfg),
            seeds=seeds,
            # Each case's newest stored tokens (only a re-cluster labels clusters), read and
            # encoded a block of parts at a time: never every case's token strings at once.
            stored_tokens=functools.partial(_stored_tokens, out, frame) if len(frame) else None,
            mapped=mapped,
            token_folder=token_spill_path(out),
        )
    # Without `since` the tables read the per-type rows' counted fields alone: their texts are
    # added for the members file only, as it is written.
    file_rows = scope_member_rows(fitted.results) if since is None else None
    tail = recluster_rows(frame, fitted.heads, file_rows, fitted.xy) if file_rows is not None else None
    clustering, projections = recluster_clustering(frame, fitted, tail, texts=file_rows is None, case_rows=selected)
    if clustering.partial:
        file_rows = None  # the members file is `tail`'s table
    else:
        tail = None
    del fitted
    release_unused_memory()  # the blocks counted: what the tables would grow on top of
    return _Recluster(clustering, projections, tail, file_rows, t_embed)


def _stored_tokens(out: Path, frame: pd.DataFrame) -> TokenCodes:
    return stored_token_codes(out, _key(frame["case_id"]))


@dataclass
class _Tonight:
    """Tonight's membership before the tables are counted: the stored one, located in the cases
    (`located`) or taken from the kept entry (`kept_night`), with the cases no member holds
    embedded and assigned to the stored clusters (`assign_cases`). `reason`: why the night
    re-clusters instead (the caller's, or no state to assign to, or drift); then nothing was
    assigned, or what was is not read."""

    reason: str | None
    n_new: int  # the selected cases no member holds (new, or re-processed by a later run)
    dropped: int  # members whose case is gone (`casemine repair`) or no longer selected
    membership: pd.DataFrame  # tonight's: the stored rows kept, then `new_rows`
    positions: np.ndarray | None  # its rows' frame rows, where known
    todo_frame: pd.DataFrame  # the assigned cases' frame rows
    new_rows: pd.DataFrame = field(default_factory=pd.DataFrame)
    drift: float | None = None
    t_embed: float = 0.0
    fast_view: FastView | None = None  # what the kept entry gives the tables, when it does
    member_positions: np.ndarray | None = None  # `positions` of a membership read and located
    member_codes: Codes | None = None  # and its cluster ids' codes
    n_redone: int = 0  # members re-assigned because a later run re-processed their case
    compact: bool = False  # the membership to be written as one part


def _tonight(
    cfg: Config,
    out: Path,
    meta: dict[str, Any],
    state: ClusterState,
    cases: pd.DataFrame,
    copy_rows: CopyRows | None,
    lead: CopyRows | None,
    frame: pd.DataFrame,
    selected: np.ndarray,
    embedder: PassageEncoder,
    reason: str | None,
    simple: bool,
) -> _Tonight:
    """Locate tonight's stored membership and assign the cases no member holds. `simple`: a
    night that may only add cases, which reads the membership's cross-type rows kept per case
    row (`member_cross`), not the stored membership (every member, twice a case). `lead`:
    `copy_lead`, for the caches kept per case copy row."""
    c = cfg.cluster
    fast = kept_night(out, meta, copy_rows, len(cases), selected, lead) if simple else None
    positions: np.ndarray | None
    if fast is not None:
        membership, n_parts, todo = fast.head, fast.n_parts, fast.todo
        alive, redone, positions = np.ones(1, dtype=bool), np.zeros(1, dtype=bool), None
    else:
        membership, n_parts, alive, todo, redone, positions = located(
            out, meta, cases, copy_rows, frame, selected, lead
        )
    night = _Tonight(
        reason, int(np.count_nonzero(todo)), int((~alive).sum()), membership, positions, frame.iloc[0:0].copy()
    )
    projections = mb.load_projections(out)
    models = scope_models(state, projections, str(meta.get("last_full")))
    if night.reason is None and not models and len(frame):
        night.reason = "no_state"  # an export killed between its state files: nothing to assign to
    if night.reason is not None:
        # A re-cluster reads the frame itself; the stored membership is not read again.
        night.membership = membership.iloc[0:0]
        return night
    todo_frame = frame[todo].reset_index(drop=True)
    t1 = time.perf_counter()
    X_new = _embed(embedder, todo_frame["cluster_text"].tolist())
    night.t_embed = time.perf_counter() - t1
    scopes = ([ALL_SCOPE] if c.cluster_across_all else []) + (["issue_type"] if c.cluster_within_issue_types else [])
    new_rows, night.drift = assign_cases(todo_frame, X_new, models, c.assign_space, scopes, projections.get(MAP_SCOPE))
    night.new_rows = new_rows
    if night.drift is not None and night.n_new >= c.drift_min_cases and night.drift > c.recluster_drift:
        night.reason = "drift"
        night.membership = membership.iloc[0:0]
        return night
    night.todo_frame = todo_frame
    if fast is not None:
        night.fast_view = fast_members(fast, frame, selected, new_rows, todo_frame, todo, len(cases))
        if night.fast_view is not None:
            return night
        # Not as kept after all: the membership read and located.
        membership, n_parts, alive, _, redone, positions = located(out, meta, cases, copy_rows, frame, selected, lead)
        night.dropped = int((~alive).sum())
    night.n_redone = int(redone.sum())
    held = membership[alive & ~redone]
    night.member_codes = member_cluster_codes(held["cluster_id"], new_rows["cluster_id"])
    night.membership = pd.concat([held, float_similarity(new_rows, held)], ignore_index=True)
    del held
    if positions is not None:  # the frame rows of tonight's membership, without a hash
        positions = renewed_positions(positions[alive & ~redone], new_rows["case_id"], todo_frame, todo)
    night.positions = night.member_positions = positions
    night.compact = night.dropped > 0 or n_parts + 1 > mb.COMPACT_PARTS
    return night


@dataclass
class _NightView:
    """An incremental night's clustering as the tables read it, and the members file's parts:
    `reuse` (last export's parts to link) and `part_rows` (the rows after them), or neither."""

    clustering: Clustering
    reuse: list[Path]
    part_rows: pd.DataFrame | None
    positions: np.ndarray | None  # the view's members' frame rows, where known


def _night_view(
    out: Path,
    frame: pd.DataFrame,
    selected: np.ndarray,
    described: pd.DataFrame,
    membership: pd.DataFrame,
    n_new_rows: int,
    positions: np.ndarray | None,
    stored_codes: Codes | None,
    fast_view: FastView | None,
    linkable: bool,
    state: ClusterState,
    day: str,
    top_breakdown: int,
) -> _NightView:
    """Tonight's clusters recounted over tonight's membership (the stored rows kept and the new
    rows assigned: `membership`, its rows' frame rows `positions` where known) with the stored
    clusters' descriptions. `linkable`: nothing but new rows was added tonight (no compaction,
    removal, re-processing, `since` or in-memory classification), so last night's member parts
    may be linked."""
    n_kept = len(membership) - n_new_rows
    reuse: list[Path] = []
    part_rows: pd.DataFrame | None = None
    # Whether last night's member parts can be linked, known before the view is built: then the
    # tables' view goes without the per-type rows' texts, and the members file's new part is
    # built from tonight's new membership rows alone (a slice), not filtered out of a view of
    # every member (a filter of 2M rows joined each column's chunks: 0.8 s at 1M cases).
    if fast_view is not None:
        reuse, part_rows = fast_view.reuse, fast_view.part_rows
    elif linkable and positions is not None:
        reuse = mp.reusable_parts(latest_export(out), mb.last_part(out), int((positions[:n_kept] >= 0).sum()))
    if reuse and positions is not None and fast_view is None:  # (always with reuse: for the type checker)
        part_rows = members_view(frame, membership.iloc[n_kept:], positions[n_kept:])
    # Last night's tally with tonight's rows added, when it holds all the per-type rows' tables
    # need: then the view is of the cross-type rows alone (the map, the emotion table, the chart
    # and the noise share read them), not of every member twice.
    tally = _kept_tally(out, reuse, positions, n_kept, part_rows) if fast_view is None else fast_view.tally
    cluster_codes: Codes | None
    if fast_view is not None:
        members, frame_rows, cluster_codes = cross_view(frame, fast_view.kept, selected)
        positions = frame_rows
    else:
        viewed = membership
        if tally is not None and positions is not None:
            cross = np.flatnonzero((membership["scope"] == ALL_SCOPE).to_numpy())
            viewed, positions = membership.iloc[cross], positions[cross]
            if stored_codes is not None:
                stored_codes = (stored_codes[0][cross], stored_codes[1])
        members, frame_rows, cluster_codes = members_view_rows(
            frame, viewed, positions, texts=not reuse, cluster_codes=stored_codes
        )
        del viewed
    # The cluster ids (an object column) hashed once for the recount and the tables, unless the
    # view has them from the stored membership's codes.
    if not len(members):
        cluster_codes = None
    elif cluster_codes is None:
        cluster_codes = sorted_codes(members["cluster_id"])
    counted = tally if tally is not None else mt.count_members(members, cluster_codes)
    clusters, new_state = clusters_from_tally(described, counted, state, day, top_breakdown)
    # The cases are the store's newest rows, one per id: a member's case is its frame row's.
    clustering = Clustering(
        clusters, members, new_state, cluster_codes, selected[frame_rows], counted, tally is not None
    )
    return _NightView(clustering, reuse, part_rows, positions)


def _since_view(
    cases: pd.DataFrame,
    frame: pd.DataFrame,
    clustering: Clustering,
    described: pd.DataFrame,
    since: date,
    day: str,
    top_breakdown: int,
    full: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, Clustering]:
    """The cases, frame and clustering the tables count from `since` on: clusters and
    membership cover all history, `since` narrows what the tables count."""
    keep = since.isoformat()
    view_cases = cases[cases["date"].astype(str) >= keep].reset_index(drop=True)
    view_frame = frame[frame["date"].astype(str) >= keep].reset_index(drop=True)
    vm = clustering.members[_is_in(_key(clustering.members["case_id"]), _key(view_frame["case_id"]))]
    view_clusters, _ = recount_clusters(described, vm.reset_index(drop=True), clustering.state, day, top_breakdown)
    if full and len(view_clusters):
        view_clusters["is_new"] = view_clusters["cluster_id"].map(
            dict(zip(clustering.clusters["cluster_id"], clustering.clusters["is_new"]))
        )
    return view_cases, view_frame, Clustering(view_clusters, vm.reset_index(drop=True), clustering.state)


def _save_recluster(
    out: Path,
    rc: _Recluster,
    frame: pd.DataFrame,
    meta: dict[str, Any],
    day: str,
    embedder_id: str,
) -> None:
    """A re-cluster's state: its membership as a new first part (the parts before it dropped),
    the scopes' projections, the clusters' descriptions and state, and the meta naming it."""
    made = part_groups(rc.tail) if rc.tail is not None else None
    try:
        seq = mb.append_groups(out, made.schema, len(made), made.group) if made is not None else None
    except NotText:
        seq = None  # no part written: the object form converts the value as it is
    if seq is None:
        seq = mb.append_members(
            out, stored_members(rc.tail.stored() if rc.tail is not None else rc.clustering.members, frame)
        )
    mb.save_projections(out, rc.projections)
    mb.save_described(out, rc.clustering.clusters)
    save_state(out, rc.clustering.state)
    mb.save_meta(out, {**meta, "last_full": day, "members_from": seq, "embedder": embedder_id})
    mb.drop_parts_before(out, seq)


def _save_night(
    out: Path,
    state: ClusterState,
    meta: dict[str, Any],
    membership: pd.DataFrame,
    new_rows: pd.DataFrame,
    compact: bool,
) -> None:
    """A night's state: the clusters' state, and its membership compacted into one new part
    (`compact`) or its new rows appended as the next."""
    save_state(out, state)
    if compact:
        seq = mb.append_members(out, membership)
        mb.save_meta(out, {**meta, "members_from": seq})
        mb.drop_parts_before(out, seq)
    elif len(new_rows):
        mb.append_members(out, new_rows)


def export_all(
    cfg: Config,
    out: Path,
    since: date | None = None,
    *,
    embedder: PassageEncoder | None = None,
    today: date | None = None,
    recluster: bool = False,
) -> dict[str, Any]:
    """Cluster, trend and report the stored cases; write `<out>/exports/<today>/` and LATEST.

    Incremental by default: only cases that are not yet members (new, or re-processed by a later
    run) are embedded and assigned to the stored clusters, and every table is counted from the
    stored membership. A full re-cluster runs when there is no state, on `recluster`, every
    `cluster.recluster_every_days`, or when more than `cluster.recluster_drift` of the new cases
    fall outside every cluster. Clusters and membership always cover all stored cases; `since`
    only narrows what the tables count.

    Returns a JSON-able summary: export_dir, report, date, as_of, case and cluster counts, new
    clusters, alerts, rows per table, mode (incremental|full) and why, drift, seconds. `embedder`
    defaults to `pipeline.embed.Embedder` (its cache under `<out>/state/embeddings/` makes
    re-exports cheap); tests pass a fake.
    """
    # What each step read of the mapped case copy is let go at every release point, not held in
    # this process to the end (`dropping_mapped_pages`).
    # The same for a re-cluster's token codes (`spilled`): read by each scope's description,
    # not held through the next scope's fit.
    with dropping_mapped_pages(case_cache_path(Path(out))), dropping_mapped_pages(token_spill_path(Path(out))):
        return _export_all(cfg, out, since, embedder, today, recluster)


def _export_all(
    cfg: Config,
    out: Path,
    since: date | None,
    embedder: PassageEncoder | None,
    today: date | None,
    recluster: bool,
) -> dict[str, Any]:
    """`export_all`, its copy's mapped pages dropped at each release point."""
    t0 = time.perf_counter()
    out = Path(out)
    today_d = today or date.today()
    day = today_d.isoformat()
    c = cfg.cluster
    loaded, copy_rows = load_cases_copy(out)
    lead = copy_lead(out, copy_rows)
    _remember_counts(out, loaded, copy_rows, lead)
    try:
        cases, note = ensure_classified(loaded.reset_index(drop=True), cfg)
        del loaded
        facts = selection_facts(out, cases, copy_rows, c.min_problem_chars, lead)
        frame, selected = select_cases_at(cases, c.min_problem_chars, c.request_kinds, facts)
        del facts
        cases, frame = drop_texts(cases, frame)
        # Reading the case copy, classifying and selecting freed more than the frames they left
        # (at a 129k-case history the heap kept 162 MiB freed over 146 live): given back before
        # the embedding and clustering grow on top of it.
        release_unused_memory()
        if embedder is None:
            from pipeline.embed import Embedder

            embedder = Embedder(cfg, out_root=out)
        meta = mb.load_meta(out)
        state = load_state(out)
        embedder_id = embedder_identity(embedder)
        reason = full_reason(cfg, meta, state, today_d, recluster, embedder_id)
        # Which cases are not yet members (new, or re-processed: same id, newer run): counted on
        # every night, embedded and assigned on an incremental one.
        simple = reason is None and since is None and note is None
        n_cases = len(cases)  # the case copy's rows, while `cases` lives
        night = _tonight(cfg, out, meta, state, cases, copy_rows, lead, frame, selected, embedder, reason, simple)
        reason, t_embed = night.reason, night.t_embed
        rc: _Recluster | None = None
        reuse: list[Path] = []  # last night's member parts to link (`member_parts`)
        part_rows: pd.DataFrame | None = None  # the members file's rows after them
        positions: np.ndarray | None = None  # the tables' members' frame rows, where known
        # Nothing but new rows added to the stored membership tonight.
        linked = not night.compact and not night.dropped and not night.n_redone
        if reason is not None:
            rc = _recluster(cfg, out, frame, embedder, state, meta, embedder_id, day, since, selected)
            t_embed += rc.t_embed
            clustering, described = rc.clustering, rc.clustering.clusters
        else:
            described = mb.load_described(out)
            seen = _night_view(
                out,
                frame,
                selected,
                described,
                night.membership,
                len(night.new_rows),
                night.positions,
                night.member_codes,
                night.fast_view,
                linked and since is None and note is None,
                state,
                day,
                c.top_breakdown,
            )
            clustering, reuse, part_rows, positions = seen.clustering, seen.reuse, seen.part_rows, seen.positions
            del seen
        t_cluster = time.perf_counter() - t0
        view_cases, view_frame, view = cases, frame, clustering
        if since is not None:
            view_cases, view_frame, view = _since_view(
                cases, frame, clustering, described, since, day, c.top_breakdown, reason is not None
            )
        # The members table as parts: on a night that only adds cases, last night's parts are
        # linked and the new cases' rows written (`member_parts`); the state's membership part it
        # was written from tells the next night whether they still match.
        state_part = mb.last_part(out)
        appends = reason is not None or night.compact or len(night.new_rows) > 0
        # Not when cases were classified in memory (`note`): their issue types follow today's
        # model, so yesterday's rows of them may differ.
        if reason is None and positions is None and since is None and linked:
            if note is None:
                # The frame repeats a case id (no positions): the new rows found by their ids.
                members_new = _is_in(_key(view.members["case_id"]), _key(night.todo_frame["case_id"]))
                reuse = mp.reusable_parts(latest_export(out), state_part, len(view.members) - int(members_new.sum()))
                part_rows = view.members[members_new] if reuse else None
        extra = {
            "mode": "full" if reason is not None else "incremental",
            "mode_reason": reason or "new_cases_assigned",
            "drift": night.drift,
            "n_new_cases": night.n_new,
            "n_members_dropped": night.dropped,
            "since": since.isoformat() if since else None,
            "members_state_part": state_part + 1 if appends else state_part,
        }
        bundle = finish_export(view_cases, view_frame, view, cfg, day, notes=[note] if note else [], extra=extra)
    finally:
        _forget_counts()  # the columns' codes and counts let go with them
    del cases, view_cases  # no later step reads the cases: not held while the files are written
    tail = rc.tail if rc is not None else None
    if tail is not None:
        # The files read the member fields and run ids alone: the tail's own copy of them
        # (`recluster_rows`), the frame's other columns let go.
        frame = view_frame = tail.frame
    if reason is not None:
        release_unused_memory()  # the cases and what the tables freed: the files are made on top
    if part_rows is not None:
        part_rows = part_rows.drop(columns=[x for x in ("x", "y") if x in part_rows])
    tables_members = bundle.tables[mp.MEMBERS]
    # A re-cluster's members file is made a block at a time as written (the tables read the
    # cross-type rows alone).
    file_blocks = tail.file() if tail is not None else None
    if rc is not None and rc.file_rows is not None:
        bundle.tables[mp.MEMBERS] = with_file_texts(tables_members, frame, rc.file_rows)
        rc.file_rows = None
    folder = write_export(out, bundle, c.csv_encoding, reuse, part_rows, file_blocks)
    del file_blocks
    # The file's texts let go once written: the membership part is written after it.
    bundle.tables[mp.MEMBERS] = tables_members
    del tables_members
    if reason is not None:
        release_unused_memory()  # the members file's table and its encoding, before the part's
    if since is None:
        kept_tally = clustering.tally if clustering is view else None
        _keep_tally(out, folder, kept_tally, clustering, state_part + 1 if appends else state_part, bundle.summary)
    if rc is not None:
        _save_recluster(out, rc, frame, meta, day, embedder_id)
    else:
        _save_night(out, clustering.state, meta, night.membership, night.new_rows, night.compact)
        if simple and copy_rows is not None and copy_rows[1] == n_cases:
            kept: mc.Kept | None = None
            if night.fast_view is not None:
                kept = night.fast_view.kept
            elif night.member_positions is not None:
                kept = mc.of_membership(night.membership, night.member_positions, selected, n_cases, night.member_codes)
            if kept is not None:
                mc.save(out, kept, copy_rows[0], mc.parts_key(out, mb.load_meta(out)))
    return {
        "export_dir": str(folder),
        "report": str(folder / "report.html"),
        **bundle.summary,
        "seconds": {
            "embed": round(t_embed, 2),
            "load_and_embed": round(t_embed, 2),
            "load_embed_cluster": round(t_cluster, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }
