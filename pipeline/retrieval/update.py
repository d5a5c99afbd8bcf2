"""The index's entry points for the flow and the CLI: embed new cases and commit a new version
(`update_from_cases`), or bring the index in line with the stored cases (`sync_index`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config
from pipeline.retrieval.index import CaseIndex, IndexStore
from pipeline.retrieval.meta import META_COLUMNS, case_text, meta_from_cases


def index_root(out_root: Path) -> Path:
    return Path(out_root) / "index"


def _cutter(cfg: Config):
    from pipeline.text.segment import tokenize

    return lambda text: tokenize(cfg, text)


def _embed_meta(cfg: Config, out_root: Path, meta: pd.DataFrame):
    from pipeline.embed import Embedder

    emb = Embedder(cfg, out_root=out_root)
    texts = [case_text(p, h, cfg.embed.include_handling) for p, h in zip(meta["problem"], meta["handling"])]
    vecs = emb.encode_passages(texts)
    return emb, vecs


def update_from_cases(cfg: Config, out_root: Path, cases: pd.DataFrame) -> dict[str, Any]:
    """Embed `cases` (cache first), add/replace them in the live index and swap in a new version
    that writes only their segment (see `IndexStore.append`).

    Called by the nightly flow after cases are written. Returns a JSON-able summary.
    """
    from pipeline.embed import model_identity

    t0 = time.time()
    out_root = Path(out_root)
    store = IndexStore(index_root(out_root), cfg.index)
    meta = meta_from_cases(cases, cfg.embed.include_handling, _cutter(cfg))
    # Embedding happens outside the writer lock: it is the slow part and the cache is safe to share.
    emb, vecs = _embed_meta(cfg, out_root, meta)
    with store.writer():
        store.check_intact()
        # Only the new cases' segment is written; the history's segments are linked, not loaded.
        version, got = store.append(
            meta, vecs, model=model_identity(cfg), backend=emb.backend, dim=vecs.shape[1] if len(vecs) else emb.dim
        )
    return {
        "added": got["added"],
        "replaced": got["replaced"],
        "total": got["total"],
        **emb.last_stats,
        "seconds": round(time.time() - t0, 2),
        "version": version,
        "kind": got["kind"],
        "model": model_identity(cfg),
    }


def read_processed_cases(out_root: Path) -> pd.DataFrame:
    """All processed cases (latest row per case_id) with the columns the index keeps; columns a
    partition predates (issue_type before classification existed) come back empty."""
    from pipeline.storage.store import read_cases

    df = read_cases(Path(out_root), columns=list(META_COLUMNS))
    for c in META_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df


def sync_index(cfg: Config, out_root: Path, rebuild: bool = False) -> dict[str, Any]:
    """Bring the index in line with the processed cases: add new, replace changed, drop gone.

    `rebuild=True` ignores the stored index (use after a model change or a corrupt file);
    vectors still come from the embedding cache where possible.
    """
    from pipeline.embed import model_identity

    t0 = time.time()
    out_root = Path(out_root)
    store = IndexStore(index_root(out_root), cfg.index)
    cases = read_processed_cases(out_root)
    meta = meta_from_cases(cases, cfg.embed.include_handling, _cutter(cfg))
    old: CaseIndex | None = None
    if not rebuild and store.exists():
        old = store.load(expect_model=model_identity(cfg))
    if old is not None:
        cmp = [c for c in META_COLUMNS if c not in ("case_id", "vid", "tokens")]
        merged = meta[["case_id", *cmp]].merge(
            old.meta[["case_id", *cmp]], on="case_id", how="left", suffixes=("", "_old"), indicator=True
        )
        changed = (merged["_merge"] == "left_only").to_numpy().copy()
        for c in cmp:
            changed = (
                changed | (merged[c].fillna("\0").astype(str) != merged[f"{c}_old"].fillna("\0").astype(str)).to_numpy()
            )
        todo = meta[changed].reset_index(drop=True)
        gone = sorted(set(old.meta["case_id"]) - set(meta["case_id"]))
    else:
        todo, gone = meta, []
    emb, vecs = _embed_meta(cfg, out_root, todo)
    with store.writer():
        if old is not None:
            # Another writer may have committed meanwhile: apply the diff to the newest version.
            idx = store.load(expect_model=model_identity(cfg))
        else:
            idx = CaseIndex(
                vecs.shape[1] if len(vecs) else emb.dim, model_identity(cfg), cfg.index, backend=emb.backend
            )
        counts = idx.update(todo, vecs) if len(todo) else {"added": 0, "replaced": 0}
        removed = idx.remove(gone) if gone else 0
        version = store.commit(idx)
    return {
        **counts,
        "removed": removed,
        "total": len(idx),
        **emb.last_stats,
        "seconds": round(time.time() - t0, 2),
        "version": version,
        "kind": idx.kind,
        "model": idx.model,
    }
