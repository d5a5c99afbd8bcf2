"""What the library reads from a run's outputs: the stored cases (with issue types and emotion
curves added in memory when older partitions lack them) and the latest clusters' members."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.config import Config
from pipeline.library.pool_state import id_hash as _id_hash
from pipeline.storage.store import newest_row_mask

# What selection reads of a stored case: `CandidateScorer.may_pass` (outcome, problem, handling,
# customer_text, agent_text, n_turns, emotion_delta), `judge` and `case_parts` (also
# outcome_evidence, the emotion start/end/min/trajectory, channel, product, region, issue_type,
# turns, turning_points), `case_texts` and the pools (case_id), and what `_completed` needs to
# compute a block's curves in memory (`add_emotion`: turns, channel). The newest-row rule reads
# its own keys (case_id, run_id) once, before the blocks.
# Why: a stored row is mostly columns selection never looks at (per-turn emotion detail, evidence,
# tokens, metadata ...), and reading and converting them cost the nightly build half its time.
# A block some of whose kept rows must be classified in memory is read whole instead: the
# classifier reads most of a case (see `_needs_classifying`).
SELECTION_COLUMNS: tuple[str, ...] = (
    "case_id",
    "issue_type",
    "channel",
    "product",
    "region",
    "problem",
    "handling",
    "outcome",
    "outcome_evidence",
    "customer_text",
    "agent_text",
    "n_turns",
    "turns",
    "emotion_start",
    "emotion_end",
    "emotion_min",
    "emotion_delta",
    "emotion_trajectory",
    "turning_points",
)


def load_members(out: Path) -> pd.DataFrame | None:
    from pipeline.insights.export import latest_export
    from pipeline.insights.member_parts import read_members

    d = latest_export(Path(out))
    return read_members(d) if d is not None else None


def load_cluster_lookup(out: Path, members: list[Path] | None = None) -> Callable[[list[str]], list[str | None]]:
    """`ids -> [cluster_id or None]`, the lookup `candidates.cluster_map(load_members(out))` gives,
    from only the four member columns it reads: one row per clustered case, its ids sorted once.
    `members`: read only these files of the latest export's members table (a night's new parts,
    which hold every row of their cases).

    Why: the members table holds a row per case and scope with its texts; the library build needs
    a cluster id per case, and a dict of every case would grow with the history. The ids' hashes,
    sorted once, are answered by binary search (`_HashedLookup`): a per-call `pc.index_in`
    hashed every clustered id again for each block's lookup, a cost that grew with the history
    times the number of blocks."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.insights.export import latest_export
    from pipeline.insights.member_parts import members_files

    if members is None:
        d = latest_export(Path(out))
        files = members_files(d) if d is not None else []
    else:
        files = members
    names = set(pq.read_schema(files[0]).names) if files else set()
    if not {"case_id", "cluster_id"} <= names:
        return lambda ids: [None] * len(ids)
    own_cols = ["scope", "issue_type"] if {"scope", "issue_type"} <= names else []
    # Read a row group at a time and narrowed at once to what the pick per case needs: the id,
    # the cluster as a code, whether the row is its own issue type's scope. Read whole (four
    # text columns of a row per case and scope), cast, filtered and sorted as tables, the members
    # were held four or five times over: +112 MiB at a 129k-case history, twice the 60k one's.
    ids: list[pa.Array] = []
    codes: list[np.ndarray] = []
    own: list[np.ndarray] = []
    clusters: dict[str, int] = {}
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["case_id", "cluster_id", *own_cols])
            # A null id is never asked for (ids are str): left out, as a sort cannot order it.
            t = t.filter(pc.and_(pc.is_valid(t["cluster_id"]), pc.is_valid(t["case_id"])))
            # Parts written on different nights may type a text column string or large_string.
            ids.append(pc.cast(t["case_id"], pa.large_string()).combine_chunks())
            coded = pc.dictionary_encode(t["cluster_id"].combine_chunks())
            remap = np.array([clusters.setdefault(c, len(clusters)) for c in coded.dictionary.to_pylist()], np.int32)
            codes.append(remap[coded.indices.to_numpy(zero_copy_only=False)] if len(remap) else np.zeros(0, np.int32))
            mine = pc.fill_null(pc.equal(t["scope"], t["issue_type"]), False) if own_cols else None
            # A missing type is not its own.
            own.append(
                np.asarray(mine.to_numpy(zero_copy_only=False), dtype=np.int8)
                if mine is not None
                else np.zeros(len(t), np.int8)
            )
            del t, coded, mine
    n = sum(len(i) for i in ids)
    if not n:
        return lambda ids: [None] * len(ids)
    # cluster_map's pick per case: the first row of its own issue type's scope, else its first row.
    keyed = pa.table(
        {
            "case_id": pa.chunked_array(ids, pa.large_string()),
            "own": pa.array(np.concatenate(own)),
            "row": pa.array(np.arange(n, dtype=np.int64)),
        }
    )
    del own
    order = pc.sort_indices(keyed, sort_keys=[("case_id", "ascending"), ("own", "descending"), ("row", "ascending")])
    sorted_ids = keyed["case_id"].take(order).combine_chunks()
    del keyed, ids
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(sorted_ids[1:], sorted_ids[:-1]).to_numpy(zero_copy_only=False)
    rows = order.to_numpy(zero_copy_only=False)[first]
    del order
    picked = sorted_ids.filter(pa.array(first))
    del sorted_ids
    return _HashedLookup.of(picked, np.concatenate(codes)[rows], list(clusters))


class _HashedLookup:
    """case id -> cluster id over the distinct `case_ids` (Arrow text) and their `cluster_ids`,
    in memory of a few bytes a case: their hashes sorted (searched), the ids in that order as
    Arrow text (every hit compared exactly), the clusters as codes into their distinct ids.

    Why not the ids as a NumPy array of Python strings searched directly: one object a case was
    28 MiB held through the build at a 129k-case history, and building it left 53 MiB more the
    heap kept. Two distinct ids with one hash (about 1 in 10^8 at 1M cases) would make the
    search miss one of them: the lookup then searches the Python strings, as before."""

    def __init__(self, hashes: np.ndarray, ids: pa.Array, codes: np.ndarray, names: list[str | None]):
        self.hashes, self.ids, self.codes, self.names = hashes, ids, codes, names

    @classmethod
    def of(cls, case_ids: pa.Array, codes: np.ndarray, names: list[str]) -> Callable[[list[str]], list[str | None]]:
        """The lookup of distinct `case_ids`, sorted (the fallback searches them), each in
        cluster `names[codes[i]]`."""
        if not len(case_ids):
            return lambda ids: [None] * len(ids)
        hashes = np.concatenate(
            [
                _id_hash(case_ids.slice(a, _HASH_ROWS).to_numpy(zero_copy_only=False))
                for a in range(0, len(case_ids), _HASH_ROWS)
            ]
        )
        order = np.argsort(hashes, kind="stable")
        hashes = hashes[order]
        if bool((hashes[1:] == hashes[:-1]).any()):
            return _sorted_lookup(case_ids, pa.array(names, pa.large_string()).take(pa.array(codes)))
        return cls(hashes, case_ids.take(pa.array(order)), np.asarray(codes, np.int32)[order], list(names))

    def __call__(self, wanted: list[str]) -> list[str | None]:
        import pyarrow.compute as pc

        if not len(wanted):
            return []
        at = np.minimum(np.searchsorted(self.hashes, _id_hash(wanted)), len(self.hashes) - 1)
        same = pc.equal(self.ids.take(pa.array(at)), pa.array(wanted, type=self.ids.type))
        found = np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
        names = self.names
        return [names[c] if f else None for c, f in zip(self.codes[at].tolist(), found.tolist())]


# Ids hashed at a time (made Python strings for it): at 16,384 a slice is about 1.5 MiB of them.
_HASH_ROWS = 16_384


def _sorted_lookup(case_ids: pa.Array, cluster_ids: pa.Array) -> Callable[[list[str]], list[str | None]]:
    """The lookup by binary search over the sorted ids as Python strings: Arrow sorts text by its
    UTF-8 bytes, which is code-point order, the order Python's str comparisons use."""
    ids = case_ids.to_numpy(zero_copy_only=False)

    def lookup(wanted: list[str]) -> list[str | None]:
        asked = np.asarray(wanted, dtype=object)
        at = np.minimum(np.searchsorted(ids, asked), len(ids) - 1)
        found = ids[at] == asked
        return cast(list[str | None], cluster_ids.take(pa.array(at, mask=~found)).to_pylist())

    return lookup


def _completed(
    base: pd.DataFrame, cfg: Config, analyzer: Callable[[], Any] | None = None, emotion: bool | None = None
) -> pd.DataFrame:
    """Issue types and emotion curves added in memory where the stored partitions predate them.
    `analyzer()`: the EmotionAnalyzer to use (a block reader loads it once, not per block).
    `emotion`: whether to compute the curves; None decides from `base` (no emotion_delta at all).
    A reader that drops rows first decides on the rows it read (`_lacks_emotion`): the rows it
    kept may all lack a delta where the block did not."""
    from pipeline.insights.export import ensure_classified

    base, _ = ensure_classified(base.reset_index(drop=True), cfg)
    if emotion is None:
        emotion = bool("emotion_delta" not in base or base["emotion_delta"].isna().all())
    if emotion:
        from pipeline.analysis.emotion import add_emotion

        base = add_emotion(base, cfg, analyzer() if analyzer is not None else None)
    return base


def _lacks_emotion(table: pa.Table) -> bool:
    """`_completed`'s test on a block read as Arrow: no row has an emotion_delta (null or NaN)."""
    if "emotion_delta" not in table.column_names:
        return True
    delta = table.column("emotion_delta").to_numpy(zero_copy_only=False).astype(np.float64)
    return bool(np.isnan(delta).all())


def load_library_cases(cfg: Config, out: Path, since: str | None = None) -> pd.DataFrame:
    """Stored cases, one per id, with issue types and emotion curves (added in memory when the
    stored partitions predate them)."""
    from pipeline.storage.store import read_cases

    base = read_cases(Path(out))
    if since is not None and len(base):
        base = base[base["date"].astype(str) >= since]
    if not len(base):
        return base
    return _completed(base, cfg)


def iter_library_cases(cfg: Config, out: Path, block_rows: int = 5_000) -> Iterator[pd.DataFrame]:
    """The stored cases of `load_library_cases` (one row per id: the newest run's), in blocks of
    whole part files of about `block_rows` rows: what a nightly build reads without holding every
    stored case and its texts at once. Which run's row is current is decided over all parts first,
    from the ids alone."""
    for cases, _ in _blocks(cfg, out, block_rows, None, None):
        yield cases


def iter_library_blocks(
    cfg: Config,
    out: Path,
    block_rows: int = 5_000,
    keep: Callable[[pa.Table, bool], np.ndarray] | None = None,
    parts: list[Path] | None = None,
    keys: list[pa.Table] | None = None,
) -> Iterator[tuple[pd.DataFrame, int]]:
    """`iter_library_cases` as (cases, how many were read), with only the columns selection reads
    (`SELECTION_COLUMNS`, all of them for a block classified in memory), where
    `keep(table, emotion_known)` (e.g. `CandidateScorer.may_pass`) picks, from the plain (not
    nested) columns of each block's rows still in Arrow, the rows that become pandas rows and are
    completed; `emotion_known` is False where the block's emotion curves are computed in memory
    (its stored emotion_delta is not the one its rows will carry).

    Why: converting every stored case (nested turns included) to pandas and then to Python rows
    cost the nightly build most of its time, for the majority of cases no rule could pass.
    `parts`: read only these stored parts, and decide the newest row per id among them (a night's
    new parts, when none of their cases is in the other parts). `keys`: `part_keys(parts)`, when
    the caller read them already (a build reads the stored parts more than once)."""
    return _blocks(cfg, out, block_rows, keep, SELECTION_COLUMNS, parts, keys)


def part_keys(files: list[Path]) -> list[pa.Table]:
    """Each stored part's (case_id, run_id): what the newest-row rule reads, and its row count."""
    from pipeline.storage.store import read_parts

    return [read_parts([f], ["case_id", "run_id"]) for f in files]


def _needs_classifying(plain: pa.Table, cfg: Config) -> bool:
    """Whether `_completed` classifies some of these rows in memory (`ensure_classified`'s test):
    then the classifier reads columns selection does not, and the block is read whole."""
    return bool(cfg.cluster.classify_if_missing and len(plain) and plain.column("issue_type").null_count)


def _blocks(
    cfg: Config,
    out: Path,
    block_rows: int,
    keep: Callable[[pa.Table, bool], np.ndarray] | None,
    columns: tuple[str, ...] | None,
    parts: list[Path] | None = None,
    keys: list[pa.Table] | None = None,
) -> Iterator[tuple[pd.DataFrame, int]]:
    """`iter_library_blocks` reading `columns` (None: every column) of each block, from `parts`
    (None: every stored part), whose `part_keys` are `keys` when given."""
    from pipeline.storage.store import read_parts, stored_parts

    files = stored_parts(Path(out)) if parts is None else list(parts)
    assert keys is None or len(keys) == len(files), "keys must be part_keys(parts)"
    if not files:
        return
    # The row read_cases keeps per id, decided over all parts from the ids alone; each part's
    # row count comes with its ids (no second open of each file for its metadata).
    keys = part_keys(files) if keys is None else keys
    wanted = newest_row_mask(pa.concat_tables(keys))
    sizes = [len(k) for k in keys]
    del keys
    analyzer: list[Any] = []

    def emotion_analyzer() -> Any:
        # Loaded on first need and kept: the emotion model is read from disk by each from_config.
        if not analyzer:
            from pipeline.analysis.emotion import EmotionAnalyzer

            analyzer.append(EmotionAnalyzer.from_config(cfg))
        return analyzer[0]

    block: list[Path] = []
    start = rows = 0
    for i, f in enumerate(files):
        block.append(f)
        rows += sizes[i]
        if rows < block_rows and i < len(files) - 1:
            continue
        table = read_parts(block, None if columns is None else list(columns))
        n = len(table)
        take = wanted[start : start + n].copy()
        start += n
        n_read = int(take.sum())
        if not n_read:
            block, rows = [], 0
            continue
        # The tests run on the plain columns of the rows read: the nested ones (turns, per-turn
        # emotion), which most of a row's bytes are, are filtered once, by the final mask.
        plain = table.select([f.name for f in table.schema if not pa.types.is_nested(f.type)]).filter(take)
        # Decided on every row read, before any is dropped, as `_completed` decides on a whole block.
        emotion = _lacks_emotion(plain)
        if keep is not None:
            kept = keep(plain, not emotion)
            plain = plain.filter(pa.array(kept))
            take[take] = kept
        if columns is not None and _needs_classifying(plain, cfg):
            table = read_parts(block)  # rare: a block stored before classification ran
        block, rows = [], 0
        table = table.filter(pa.array(take))
        if len(table):
            yield _completed(table.to_pandas(), cfg, emotion_analyzer, emotion), n_read
        else:
            yield pd.DataFrame(columns=table.column_names), n_read
