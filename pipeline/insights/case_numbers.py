"""The stored cases' timings as codes into their distinct values, kept between nights beside
the case copy.

Why: the KPIs' quantiles come from per-group histograms of each timing's distinct values, so
every stored case's timings were factorized each night (~20 ms a column at 1M cases) for values
that did not change. The case copy (`pipeline.storage.case_cache`) only grows at its end between
its whole writes, so a row of one copy generation always holds the same values: each column's
codes are kept per row of a generation (into a dictionary in order of first appearance), a
night codes only the rows added since, and the codes are handed to the KPIs for the copy's own
column (`known_codes`), found by its memory: a column replaced after loading is another array.
Means are not kept: numpy's pairwise sum of a group's values depends on all of them and their
order, so the KPIs still read the values for those. (The emotion relations' Spearman ranks gain
little from kept codes: factorizing their few hundred distinct values costs about what reading
kept codes does.)

As `pd.factorize`, 0.0 and -0.0 are one value (the first seen); `signed_zeros` says whether both
occur (the KPIs then read the values, as before). Layout: `state/cache/case-numbers/<column>.arrow`
(column `code`, int16, -1: missing), its metadata naming the copy generation, the rows covered,
the dictionary and the signs of zero seen. A cache: an entry of another generation (but the one
whose rows lead this one, `case_cache.accepts`) or covering more rows than the copy holds is
ignored and written again; a column of more than `MAX_VALUES` distinct values is not kept.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.insights.case_kept import counted_generation
from pipeline.io import read_cache_table, write_cache_table
from pipeline.storage.case_cache import CopyRows, accepts

_META = b"casemine_case_numbers"
KEPT_COLUMNS = ("first_response_s", "duration_s")
MAX_VALUES = (1 << 15) - 1
RECODE_SHARE = 0.05  # as `case_codes`: rows past the kept ones are coded each night up to this share
_RULE = 1


@dataclass(frozen=True)
class ValueCodes:
    """A float column's codes (-1: NaN) into its distinct values in order of first appearance,
    those values' sorted order (`np.argsort`, stable), and whether the column holds both 0.0
    and -0.0 (one value here, as `pd.factorize` has them). Not renumbered in sorted order: that
    was a take of every row a column each night, for counts whose columns a few hundred values
    put in order as well."""

    codes: np.ndarray
    values: np.ndarray
    order: np.ndarray
    signed_zeros: bool


def cache_dir(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "case-numbers"


def _load(
    path: Path, gen: str, n_rows: int, prefix: CopyRows | None = None
) -> tuple[np.ndarray, list[float], list[bool], bool] | None:
    """The kept codes of the first rows, their values and signs of zero, and whether they were
    kept of generation `gen` itself (not through `prefix`), or None."""

    def accept(meta: dict[str, Any]) -> bool:
        return (
            meta.get("rule") == _RULE
            and accepts(meta.get("gen"), meta.get("n"), gen, n_rows, prefix)
            and isinstance(meta.get("values"), list)
        )

    got = read_cache_table(path, _META, ["code"], accept)
    if got is None or len(got[1]) != int(got[0]["n"]):
        return None
    values = [float(v) for v in got[0]["values"]]
    codes = np.asarray(got[1]["code"].to_numpy(), dtype=np.int16)
    if len(codes) and (int(codes.max(initial=-1)) >= len(values) or int(codes.min(initial=0)) < -1):
        return None
    return codes, values, [bool(z) for z in got[0].get("zero_signs", [])], got[0]["gen"] == gen


def _save(path: Path, gen: str, codes: np.ndarray, values: list[float], zero_signs: list[bool]) -> None:
    import pyarrow as pa

    meta = {"gen": gen, "rule": _RULE, "n": len(codes), "values": values, "zero_signs": zero_signs}
    write_cache_table(
        path, pa.table({"code": codes}), _META, meta, "the case value codes", "the next night codes the column again"
    )


def extend_codes(
    codes: np.ndarray, values: list[float], zero_signs: list[bool], new: np.ndarray
) -> tuple[np.ndarray, list[float], list[bool]]:
    """`codes` (into `values`) followed by the `new` rows' codes (NaN: -1), values not yet among
    `values` added in order of first appearance; 0.0 and -0.0 one value, as a Python dict and
    `pd.factorize` both hold them (`zero_signs`: the signs of zero seen, signbit as bool)."""
    found, uniques = pd.factorize(new)
    index = {v: i for i, v in enumerate(values)}
    where = np.empty(len(uniques) + 1, dtype=np.int64)
    where[-1] = -1  # NaN's -1 reads the spare slot
    for i, v in enumerate(np.asarray(uniques, dtype=np.float64).tolist()):
        if v not in index:
            index[v] = len(values)
            values = [*values, v]
        where[i] = index[v]
    zeros = new[new == 0]
    zero_signs = sorted(set(zero_signs) | {bool(s) for s in np.unique(np.signbit(zeros)).tolist()})
    wide = len(values) > MAX_VALUES
    added = where[found].astype(np.int64 if wide else np.int16)
    return np.concatenate([codes.astype(added.dtype, copy=False), added]), values, zero_signs


def value_codes(codes: np.ndarray, values: list[float], zero_signs: list[bool]) -> ValueCodes:
    """The `ValueCodes` of kept codes into `values`."""
    found = np.asarray(values, dtype=np.float64)
    return ValueCodes(codes, found, np.argsort(found, kind="stable"), len(zero_signs) > 1)


def kept_value_codes(
    out: Path, column: np.ndarray, gen: str, name: str, prefix: CopyRows | None = None
) -> ValueCodes | None:
    """The `ValueCodes` of `column` (column `name` of the case copy generation `gen`,
    its rows in order; `prefix`: its `case_cache.copy_prefix`): the kept codes of its first rows
    and the new rows coded; None for a column of more than `MAX_VALUES` values."""
    path = cache_dir(out) / f"{name}.arrow"
    kept = _load(path, gen, len(column), prefix)
    empty: tuple[np.ndarray, list[float], list[bool], bool] = (np.zeros(0, dtype=np.int16), [], [], False)
    codes, values, signed, same_gen = kept if kept is not None else empty
    if len(codes) < len(column):
        covered = len(codes)
        codes, values, signed = extend_codes(codes, values, signed, column[covered:])
        if len(values) > MAX_VALUES:
            path.unlink(missing_ok=True)
            return None
        # Codes kept through the prefix are saved under `gen`: a later rewrite names only `gen`.
        if not same_gen or len(codes) - covered > RECODE_SHARE * len(codes):
            _save(path, gen, codes, values, signed)
    return value_codes(codes, values, signed)


# The current export's columns' codes, by the column's memory (its first value's address, length
# and stride) with the array itself, held so that its memory cannot be another array's meanwhile.
_KNOWN: dict[tuple[int, int, int], tuple[np.ndarray, ValueCodes]] = {}
_LOCK = threading.Lock()


def _where(values: np.ndarray) -> tuple[int, int, int]:
    return (int(values.__array_interface__["data"][0]), len(values), int(values.strides[0]) if values.ndim else 0)


def known_codes(column: pd.Series) -> ValueCodes | None:
    """The kept codes of this float column when it is the case copy's own (`remember`), else None."""
    if column.dtype != np.float64 or not len(column):
        return None
    values = column.to_numpy()
    with _LOCK:
        hit = _KNOWN.get(_where(values))
    return hit[1] if hit is not None else None


def remember(
    out: Path,
    cases: pd.DataFrame,
    copy_rows: CopyRows | None,
    min_rows: int | None = None,
    prefix: CopyRows | None = None,
) -> None:
    """The kept columns' codes made known for `cases`' own columns when `cases` are the case
    copy's rows (`load_cases_copy`; `prefix`: its `copy_prefix`); what an earlier export made
    known is forgotten."""
    forget()
    gen = counted_generation(cases, copy_rows, min_rows)
    if gen is None:
        return
    for name in KEPT_COLUMNS:
        if name not in cases or cases[name].dtype != np.float64:
            continue
        values = cases[name].to_numpy()
        got = kept_value_codes(out, values, gen, name, prefix)
        if got is not None:
            with _LOCK:
                _KNOWN[_where(values)] = (values, got)


def forget() -> None:
    with _LOCK:
        _KNOWN.clear()
