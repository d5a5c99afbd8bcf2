"""The typical-case library (典型案例库): build candidates into the review store, publish approved cases.

The library's jobs live in their own modules: `candidates` (pure selection), `store` (the SQLite
review store), `render` (HTML pages), `sources` (reading a run's outputs), `coverage`. This module
is the workflow over them, and keeps the names callers import from it.

Why this shape: trainers need a few *good, different* examples per issue type and root cause, and a
person must approve each one before agents see it. So candidate selection is a pure function of
the case table (scored, with the reasons shown), while decisions live in SQLite, which two people
can write at once (WAL, BEGIN IMMEDIATE) and which a rebuilt candidate list only adds to: a
decision already made is never overwritten by a build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.config import Config
from pipeline.heap import release_unused_memory
from pipeline.library import pool_state
from pipeline.library.candidates import (
    PART_NAMES,
    PARTS,
    Candidate,
    CandidateScorer,
    Fallback,
    case_parts,
    case_texts,
    cluster_map,
    extend_selection,
    pool_selection,
    rows_in_groups,
    select_candidates,
    select_candidates_in_blocks,
    select_diverse,
)
from pipeline.library.coverage import CoverageResult, compute_coverage, coverage
from pipeline.library.render import render_index, render_page, slug
from pipeline.library.sources import (
    iter_library_blocks,
    load_cluster_lookup,
    load_library_cases,
    load_members,
    part_keys,
)
from pipeline.library.spill import Spill
from pipeline.library.store import (
    STATUSES,
    Decision,
    LibraryError,
    LibraryStore,
    db_path,
    library_dir,
    published_case_ids,
    record_usage,
)
from pipeline.storage.store import cases_dir, stored_parts

__all__ = [
    "PARTS",
    "PART_NAMES",
    "STATUSES",
    "Candidate",
    "CandidateScorer",
    "CoverageResult",
    "Decision",
    "LibraryError",
    "LibraryStore",
    "build",
    "case_parts",
    "case_texts",
    "cluster_map",
    "compute_coverage",
    "coverage",
    "db_path",
    "library_dir",
    "load_library_cases",
    "load_members",
    "publish",
    "published_case_ids",
    "record_usage",
    "render_index",
    "render_page",
    "select_candidates",
    "select_candidates_in_blocks",
    "select_from_store",
    "select_diverse",
]


# Stored cases read per block: whole part files, at least this many rows. A block of full rows
# (turns, texts, per-turn emotion) costs about 25 MiB per 1,000 rows while it is assessed, and
# smaller blocks cost little time (each part file is read once either way).
BLOCK_ROWS = 1_000


def select_from_store(
    cfg: Config, out: Path, embedder=None, full: bool = False
) -> tuple[list[Candidate], dict[str, Any]]:
    """The candidates of the stored cases (`select_candidates` over all of them), read block by
    block in memory that does not follow the history's length: per block only what selection
    needs of each eligible case is kept, and per group only its best cases (see
    `select_candidates_in_blocks`); only those reach the encoder, loaded when one does.

    A night continues from the pools the last build kept (`pool_state`): it reads only the parts
    added since, when the checks there hold, and otherwise (or with `full`) every part. The
    counts say which (`build`: "incremental" or "full", and why a full one was needed)."""
    from pipeline.insights.export import latest_export
    from pipeline.insights.member_parts import members_files

    out = Path(out)
    scorer = CandidateScorer.from_config(cfg)
    encoder = [embedder] if embedder is not None else []

    def encode(texts: list[str]) -> np.ndarray:
        if not encoder:
            from pipeline.embed import Embedder

            encoder.append(Embedder(cfg, out_root=out))
        return np.asarray(encoder[0].encode_passages(texts), dtype=np.float32)

    key = pool_state.build_key(cfg, scorer.actions)
    path = pool_state.state_file(out)
    root = cases_dir(out)
    files = stored_parts(out)
    stats = pool_state.part_stats(root, files)  # before reading: a part changed later is seen next time
    members = members_files(latest) if (latest := latest_export(out)) is not None else []
    member_ids = pool_state.file_ids(members)
    # The pools' Candidates and vectors, which grow with a crowded history, wait on disk while
    # the build runs (`pipeline.library.spill`); the file goes when the last entry does.
    spill = Spill(path.parent)
    previous = pool_state.load(path, key, spill)
    caps: dict[str, int] = {}
    if isinstance(previous, str):
        why = "asked" if full else previous
    else:
        # Groups that ran short before keep their deeper pools in a read of everything too.
        caps = previous.selection.caps
        step = "asked" if full else _continue(cfg, out, previous, files, stats, members, member_ids, encode, scorer)
        if isinstance(step, tuple):
            return step
        why, caps = (step.reason, step.caps) if isinstance(step, Fallback) else (step, caps)
    # Rows no rule of `scorer.assess` can pass are dropped while still Arrow (see may_pass): most
    # stored cases, which would otherwise each become a pandas row and a dict to be rejected.
    lookup = load_cluster_lookup(out, members)
    keys = part_keys(files)  # read once: every pass of the build and the saved ids use them
    # Reading the members and the keys freed several times what the lookup keeps (53 MiB the heap
    # held at a 129k-case history): given back before the pools grow on top of it.
    release_unused_memory()
    sel = pool_selection(
        lambda: iter_library_blocks(cfg, out, BLOCK_ROWS, scorer.may_pass, parts=files, keys=keys),
        encode,
        scorer,
        lookup,
        caps=caps,
        blocks_of=lambda groups: blocks_of(cfg, out, scorer, files, keys, lookup, groups),
        spill=spill,
    )
    if files and sel.copies_dropped:
        pool_state.save(path, pool_state.PoolState(key, stats, member_ids, _id_hashes(keys), sel))
    return sel.candidates, {**sel.counts, "build": "full", "full_because": why}


def _continue(
    cfg: Config,
    out: Path,
    previous: pool_state.PoolState,
    files: list[Path],
    stats: dict[str, tuple[int, int]],
    members: list[Path],
    member_ids: list[pool_state.FileId],
    encode,
    scorer: CandidateScorer,
) -> tuple[list[Candidate], dict[str, Any]] | Fallback | str:
    """The selection of `previous` with the parts added since, or why it needs every part read
    (the checks of `pool_state`)."""
    if any(stats.get(rel) != st for rel, st in previous.parts.items()):
        return "stored parts changed"
    n_old = len(previous.members)
    if member_ids[:n_old] != previous.members:
        return "clusters changed"
    new_members = members[n_old:]
    if new_members and pool_state.any_seen(previous.seen, pool_state.id_hashes(member_case_ids(new_members))):
        return "clusters changed"
    root = cases_dir(out)
    new = [f for f in files if f.relative_to(root).as_posix() not in previous.parts]
    new_keys = part_keys(new)
    new_hashes = _id_hashes(new_keys)
    if pool_state.any_seen(previous.seen, new_hashes):
        return "cases re-processed"
    blocks = iter_library_blocks(cfg, out, BLOCK_ROWS, scorer.may_pass, parts=new, keys=new_keys) if new else iter(())
    every_keys: list[list[pa.Table]] = []

    def everything(groups: set[str]):
        # A group short of picks whose reserve is used up is read again from every stored case
        # (its rows only): its pool lacks the old texts beyond it.
        if not every_keys:
            every_keys.append(part_keys(files))
        lookup = load_cluster_lookup(out, members)
        return blocks_of(cfg, out, scorer, files, every_keys[0], lookup, groups), lookup

    lookup = load_cluster_lookup(out, members=new_members)
    sel = extend_selection(previous.selection, blocks, encode, scorer, lookup, reread=everything)
    if isinstance(sel, Fallback):
        return sel
    seen = np.sort(np.concatenate([previous.seen, new_hashes])) if new else previous.seen
    if new or member_ids != previous.members:
        pool_state.save(pool_state.state_file(out), pool_state.PoolState(previous.key, stats, member_ids, seen, sel))
    return sel.candidates, {**sel.counts, "build": "incremental", "new_parts": len(new)}


def blocks_of(
    cfg: Config,
    out: Path,
    scorer: CandidateScorer,
    files: list[Path],
    keys: list[pa.Table],
    lookup: Callable[[list[str]], list[str | None]],
    groups: set[str],
):
    """The stored blocks a deeper pass over `groups` reads: rows `scorer.may_pass` keeps and that
    may be in those groups (clusters by `lookup`), dropped while still Arrow (`rows_in_groups`)."""

    def keep(table, emotion_known: bool) -> np.ndarray:
        return rows_in_groups(table, groups, lookup, scorer.may_pass(table, emotion_known))

    return iter_library_blocks(cfg, out, BLOCK_ROWS, keep, parts=files, keys=keys)


def _id_hashes(keys: list[pa.Table]) -> np.ndarray:
    """`pool_state.id_hashes` of every case id of `part_keys` tables, hashed a table at a time:
    the ids of every stored case as one array of Python strings (and its str copy) were the
    build's last peak, and grew with the history."""
    return np.sort(
        np.concatenate(
            [pool_state.id_hashes(k["case_id"].to_numpy(zero_copy_only=False)) for k in keys]
            or [pool_state.id_hashes([])]
        )
    )


def member_case_ids(files: list[Path]) -> np.ndarray:
    """The case ids of members files (Parquet with a case_id column)."""
    import pyarrow.parquet as pq

    return np.concatenate(
        [pq.read_table(f, columns=["case_id"])["case_id"].to_numpy(zero_copy_only=False) for f in files]
    )


def build(cfg: Config, out: Path, embedder=None, full: bool = False) -> dict[str, Any]:
    """Select candidates from the processed cases and merge them into the review store."""
    cands, counts = select_from_store(cfg, out, embedder, full)
    if not counts["cases"]:
        raise LibraryError(f"no processed cases under {out}; run `casemine run` first")
    synced = LibraryStore(out).sync_candidates(cands)
    return {**counts, **synced, "db": str(db_path(out))}


def publish(cfg: Config, out: Path, by: str = "publish") -> dict[str, Any]:
    """Mark approved cases published and export the library: Parquet plus one self-contained HTML
    page per issue type. Texts were masked at ingest; they are masked again here so nothing a
    later edit let through leaves in an export."""
    from pipeline.io import atomic_write_parquet, atomic_write_text
    from pipeline.text.prepare import get_masker

    new, rows = LibraryStore(out).publish(by)
    mask = get_masker(cfg).mask
    recs = []
    for r in rows:
        parts = {k: mask(v)[0] for k, v in (r.get("parts") or {}).items()}
        recs.append(
            {
                "case_id": r["case_id"],
                "issue_type": r["issue_type"],
                "cluster_id": r["cluster_id"],
                "score": r["score"],
                "reasons": "；".join(mask(x)[0] for x in r.get("reasons") or []),
                **{p: parts.get(p, "") for p in (*PARTS, "turning_point")},
                "approved_by": r["decided_by"],
                "note": mask(r["note"] or "")[0],
                "published_at": r["published_at"],
            }
        )
    df = pd.DataFrame(recs)
    dest = library_dir(out) / "published"
    import pyarrow as pa

    atomic_write_parquet(dest / "library.parquet", pa.Table.from_pandas(df, preserve_index=False))
    pages = {}
    for t, g in df.groupby("issue_type", sort=True):
        path = dest / "html" / f"{slug(str(t))}.html"
        atomic_write_text(path, render_page(str(t), cast(list[dict[str, Any]], g.to_dict("records"))))
        pages[str(t)] = str(path)
    atomic_write_text(dest / "html" / "index.html", render_index(pages, df))
    return {"newly_published": len(new), "published": len(df), "parquet": str(dest / "library.parquet"), "pages": pages}
