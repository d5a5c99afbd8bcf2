"""The stored cases' counted text columns as codes, kept between nights beside the case copy.

Why: the export's tables count the cases by date, channel, region, product, issue type, outcome,
emotion, trajectory and agent, and each of those columns was hashed once a night over every
stored case (`codes.sorted_codes`): ~0.02 s a column at 1M cases, 0.18 s a night, for values
that did not change. The case copy (`pipeline.storage.case_cache`) only grows at its end between
its whole writes, so a row of one copy generation always holds the same values: each column's
codes are kept per row of a generation (into a dictionary in order of first appearance), a night
codes only the rows added since, and the sorted codes (`sorted_codes`' answer) are handed to the
shared codes (`codes.remember_codes`) for the copy's own column array, so every table finds them.
A column replaced after loading (e.g. issue types filled) is another array and is hashed as
before.

Layout: `state/cache/case-codes/<column>.arrow` (column `code`), its metadata naming the copy
generation, the rows covered, their text's byte size and the dictionary. It is a cache: written
by a rename, never synced; an entry of another generation (but the one whose rows lead this one,
`case_cache.accepts`), covering more rows than the copy holds, or whose rows' text size differs
from the copy's, is ignored and written again. Columns of more than `MAX_VALUES` distinct
values are not kept (their dictionary would be the cost).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.insights.case_facts import text_bytes
from pipeline.insights.case_kept import counted_generation
from pipeline.insights.cluster import arrow_text
from pipeline.insights.codes import Codes, remember_codes
from pipeline.io import read_cache_table, write_cache_table
from pipeline.storage.case_cache import CopyRows, accepts

_META = b"casemine_case_codes"
# The columns every night's tables hash over all stored cases.
KEPT_COLUMNS = (
    "date",
    "channel",
    "region",
    "product",
    "issue_type",
    "outcome",
    "emotion",
    "emotion_trajectory",
    "agent_id",
)
MAX_VALUES = (1 << 15) - 1  # the codes are kept as int16 (-1: missing)
# Rows past the kept ones are coded each night until they are this share of the copy.
RECODE_SHARE = 0.05
_RULE = 2  # bump when what is kept changes (2: int16 codes)


def cache_dir(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "case-codes"


def _load(
    path: Path, gen: str, column: pa.Array, prefix: CopyRows | None = None
) -> tuple[np.ndarray, list[str], bool] | None:
    """The kept codes of the first rows of `column` and their dictionary, and whether they were
    kept of generation `gen` itself (not through `prefix`), or None."""

    def accept(meta: dict[str, Any]) -> bool:
        n = meta.get("n", -1)  # -1: none, which `accepts` refuses
        return (
            meta.get("rule") == _RULE
            and accepts(meta.get("gen"), n, gen, len(column), prefix)
            and meta.get("bytes") == text_bytes(column, n)
            and isinstance(meta.get("values"), list)
        )

    got = read_cache_table(path, _META, ["code"], accept)
    if got is None or len(got[1]) != int(got[0]["n"]):
        return None
    values = [str(v) for v in got[0]["values"]]
    codes = np.asarray(got[1]["code"].to_numpy(), dtype=np.int16)
    if len(codes) and (codes.max(initial=-1) >= len(values) or codes.min(initial=0) < -1):
        return None
    return codes, values, got[0]["gen"] == gen


def _save(path: Path, gen: str, codes: np.ndarray, values: list[str], column: pa.Array) -> None:
    n = len(codes)
    meta = {"gen": gen, "rule": _RULE, "n": n, "bytes": text_bytes(column, n), "values": values}
    write_cache_table(
        path, pa.table({"code": codes}), _META, meta, "the case column codes", "the next night hashes the column again"
    )


def extend_codes(codes: np.ndarray, values: list[str], new: pa.Array) -> tuple[np.ndarray, list[str]]:
    """`codes` (into `values`, -1: missing) followed by the codes of the `new` rows, values not
    yet among `values` added in order of first appearance."""
    among = pa.array(values, new.type)
    unseen = pc.unique(new.filter(pc.and_(pc.is_valid(new), pc.invert(pc.is_in(new, value_set=among)))))
    values = values + [str(v) for v in unseen.to_pylist()]
    found = pc.index_in(new, value_set=pa.array(values, new.type), skip_nulls=True)
    added = np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    if len(values) > MAX_VALUES:
        return np.concatenate([codes.astype(np.int64), added]), values  # not kept: any width
    return np.concatenate([codes.astype(np.int16, copy=False), added.astype(np.int16)]), values


def sorted_from(codes: np.ndarray, values: list[str]) -> Codes:
    """`pd.factorize(column, sort=True)` of the column these codes describe, when every value is
    used (true of kept codes: a value is added only when a row holds it). Python orders str by
    code point, as Arrow orders the column's text."""
    used = np.zeros(len(values) + 1, dtype=bool)
    used[codes] = True  # a missing value's -1 marks the spare last slot
    order = [i for i in sorted(range(len(values)), key=values.__getitem__) if used[i]]
    # In the codes' own width: the shared codes keep them narrow (`codes._remember`).
    rank = np.full(len(values) + 1, -1, dtype=np.min_scalar_type(-(len(values) + 1)))
    rank[order] = np.arange(len(order))  # the spare slot (and unused values) stay -1
    return rank[codes], np.asarray([values[i] for i in order], dtype=object)


def kept_column_codes(out: Path, column: pa.Array, gen: str, name: str, prefix: CopyRows | None = None) -> Codes | None:
    """`sorted_codes` of `column` (column `name` of the case copy generation `gen`, its rows in
    order; `prefix`: its `case_cache.copy_prefix`), from the codes kept for its first rows and the
    new rows coded; None for a column of more than `MAX_VALUES` values."""
    path = cache_dir(out) / f"{name}.arrow"
    kept = _load(path, gen, column, prefix)
    codes, values, same_gen = kept if kept is not None else (np.zeros(0, dtype=np.int16), [], False)
    if len(codes) < len(column):
        covered = len(codes)
        codes, values = extend_codes(codes, values, column.slice(covered))
        if len(values) > MAX_VALUES:
            path.unlink(missing_ok=True)
            return None
        # Written again only when the rows coded each night would grow past a share of the copy:
        # rewriting every column's codes for a night's few rows cost more than coding them (0.07
        # s a night at 1M cases). The copy itself is written whole (a new generation, led by the
        # former's rows: only the rows after them coded) once the rows appended to it reach
        # `case_cache.REWRITE_SHARE`.
        # Codes kept through the prefix are saved under `gen`: a later rewrite names only `gen`.
        if not same_gen or len(codes) - covered > RECODE_SHARE * len(codes):
            _save(path, gen, codes, values, column)
    return sorted_from(codes, values)


def remember_case_codes(
    out: Path, cases: pd.DataFrame, copy_rows: CopyRows | None, prefix: CopyRows | None = None
) -> None:
    """The kept columns' sorted codes handed to the shared codes for `cases`' own column arrays,
    when `cases` are the case copy's rows (`load_cases_copy`; `prefix`: its `copy_prefix`)."""
    gen = counted_generation(cases, copy_rows, 0)  # kept at every size
    if gen is None:
        return
    for name in KEPT_COLUMNS:
        arr = arrow_text(cases[name]) if name in cases else None
        if arr is None or arr.num_chunks != 1:
            continue
        got = kept_column_codes(out, arr.chunk(0), gen, name, prefix)
        if got is not None:
            remember_codes(cases[name], got)
