"""A text column's values as integer codes, counted once per night and shared by every table.

Why: the export's tables all count the same few columns (outcome, emotion, channel, issue_type,
region, product, date, scope) of the same all-history frames, and each factorized them again:
~60 hashings of 100-200k Arrow strings a night (0.13 s at 100k cases). A column read from the
store is an immutable Arrow array, so its codes are remembered for as long as that array lives
(keyed by the array, dropped with it) and every later caller gets them without hashing. Kept in
the narrowest integer type that holds them (int16 for every column the export codes: ~5 MB at
100k cases, not 20 MB) and handed out as int64 copies, so no caller can change another's.
Columns that are not Arrow-backed (object columns may change in place) are factorized on each
call, as before. Every function gives what the pandas call in its docstring gives.

A column made by taking another's rows (the members view takes the cases' columns at each
member's case) is declared so (`derive_codes`): its codes are the source's taken at those rows,
renumbered, not a hashing of its own values (2M members' strings each, ~0.7 s a night at 1M
cases, for values whose codes were known).
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

Codes = tuple[np.ndarray, np.ndarray]  # int64 codes (-1: missing), the distinct values (object array)

_MEMO: dict[int, tuple[weakref.ref[Any], np.ndarray, np.ndarray]] = {}
# A derived column's array id -> (its array, the source column, the rows taken): computed on the
# first ask, so that columns no table counts are never coded.
_DERIVED: dict[int, tuple[weakref.ref[Any], pd.Series, np.ndarray]] = {}
# Reentrant: an array's finalizer (`_forget`) may run inside a locked block of the same thread,
# when that block drops the last reference to another remembered array (a derived entry holds
# its source column).
_LOCK = threading.RLock()


def _arrow_of(values: Any) -> pa.ChunkedArray | None:
    """The immutable Arrow array behind a pandas column, or None (anything else)."""
    arr = getattr(values, "array", None) if isinstance(values, pd.Series) else None
    data = getattr(arr, "_pa_array", None)
    return data if isinstance(data, pa.ChunkedArray) else None


def arrow_backed(values: Any) -> bool:
    """Whether `sorted_codes` remembers this column's codes."""
    return _arrow_of(values) is not None


def _forget(key: int) -> None:
    with _LOCK:
        _MEMO.pop(key, None)
        _DERIVED.pop(key, None)


def derive_codes(values: pd.Series, source: pd.Series, rows: np.ndarray) -> None:
    """Declare that `values` holds `source`'s values at `rows` (all valid positions), so that
    `sorted_codes(values)` is `taken_codes` of the source's codes. Only Arrow text columns are
    declared (others are not remembered); `rows` is kept, not copied: the caller must not change it."""
    arr, src = _arrow_of(values), _arrow_of(source)
    # The same array (a take of every row in order keeps it): its own codes already.
    if arr is None or src is None or arr is src or len(arr) != len(rows):
        return
    key = id(arr)
    with _LOCK:
        if key in _MEMO or key in _DERIVED:
            return
        _DERIVED[key] = (weakref.ref(arr), source, rows)
    weakref.finalize(arr, _forget, key)


def remember_codes(values: pd.Series, codes: Codes) -> bool:
    """Hand `sorted_codes(values)` known from elsewhere (codes kept between nights) to every
    later caller, for this Arrow column's array; whether it was taken (not an Arrow column, or
    not its length: not)."""
    arr = _arrow_of(values)
    if arr is None or len(codes[0]) != len(arr):
        return False
    _remember(arr, np.asarray(codes[0]), np.asarray(codes[1], dtype=object))
    return True


def _remember(arr: pa.ChunkedArray, codes: np.ndarray, uniques: np.ndarray) -> None:
    """Keep `arr`'s codes while it lives, in the narrowest type that holds them (and -1)."""
    narrow = np.min_scalar_type(-max(len(uniques), 1))
    uniques.setflags(write=False)  # handed to every caller as is
    key = id(arr)
    with _LOCK:
        _MEMO[key] = (weakref.ref(arr), codes.astype(narrow), uniques)
    weakref.finalize(arr, _forget, key)


def sorted_codes(values: Any) -> Codes:
    """`pd.factorize(values, sort=True)`: each value's rank among the distinct values (-1 for
    missing) as int64, and those values in sorted order as an object array (read-only).
    Remembered for an Arrow column (see the module)."""
    arr = _arrow_of(values)
    if arr is not None:
        with _LOCK:
            hit = _MEMO.get(id(arr))
            derived = _DERIVED.get(id(arr))
        if hit is not None and hit[0]() is arr:
            return hit[1].astype(np.int64), hit[2]
        if derived is not None and derived[0]() is arr:
            out = taken_codes(*sorted_codes(derived[1]), derived[2])
            _remember(arr, *out)
            with _LOCK:
                done = _DERIVED.pop(id(arr), None)
            del done  # the source column let go outside the lock
            return out
    codes, uniques = pd.factorize(values, sort=True)
    out = codes.astype(np.int64, copy=False), np.asarray(uniques, dtype=object)
    if arr is not None:
        _remember(arr, *out)
    return out


def column_codes(values: Any) -> Codes:
    """A column's codes where any numbering serves: its shared `sorted_codes` when it is Arrow
    text, else `pd.factorize` unsorted (mixed values may not sort), as the callers did before
    codes were shared."""
    if arrow_backed(values):
        return sorted_codes(values)
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    return codes.astype(np.int64, copy=False), np.asarray(uniques, dtype=object)


def filled_codes(values: pd.Series, fill: str) -> Codes:
    """`pd.factorize(values.fillna(fill), sort=True)`, from the column's `sorted_codes`."""
    if _arrow_of(values) is None:
        return sorted_codes(values.fillna(fill))
    return fill_codes(*sorted_codes(values), fill)


def fill_codes(codes: np.ndarray, uniques: np.ndarray, fill: str) -> Codes:
    """Sorted codes of a column (all text) with its missing values filled with `fill`: they
    take `fill`'s rank, inserted among the values where it sorts (Arrow sorts text by code
    point, as Python compares str)."""
    missing = codes < 0
    if not missing.any():
        return codes, uniques
    at = int(np.searchsorted(uniques, fill)) if len(uniques) else 0
    if at < len(uniques) and uniques[at] == fill:
        return np.where(missing, at, codes), uniques
    shifted = codes + (codes >= at)
    return np.where(missing, at, shifted), np.insert(uniques, at, fill)


def taken_codes(codes: np.ndarray, uniques: np.ndarray, rows: np.ndarray) -> Codes:
    """`pd.factorize(values.take(rows), sort=True)` from `values`' sorted codes: the rows' codes
    renumbered among the values they hold."""
    sub = np.asarray(codes, dtype=np.int64)[rows]
    # Missing (-1) marks a spare last slot, and reads it back as -1 below: no filter of the rows
    # and no second pass to put -1 back (the members' 2M rows per column, 0.25 s a night at 1M).
    used = np.zeros(len(uniques) + 1, dtype=bool)
    used[sub] = True
    used = used[:-1]
    if used.all():  # every value taken (nearly always): the codes as they are
        return sub, uniques[used]
    rank = np.append(np.cumsum(used) - 1, -1)
    return rank[sub], uniques[used]


def cross_counts(a: np.ndarray, n_a: int, b: np.ndarray, n_b: int) -> np.ndarray:
    """Rows counted per (a, b) pair of codes, an (n_a, n_b) array; a row with -1 in either is
    counted nowhere. One bincount of every row, missing ones in a spare bin: filtering the rows
    first copied both columns (most of the cost, at 1M rows)."""
    a = np.where(a < 0, n_a, a) if len(a) and a.min() < 0 else a
    b = np.where(b < 0, n_b, b) if len(b) and b.min() < 0 else b
    counts = np.bincount(a * (n_b + 1) + b, minlength=(n_a + 1) * (n_b + 1))
    return counts.reshape(n_a + 1, n_b + 1)[:n_a, :n_b]


def marginal_counts(groupings: list[tuple[np.ndarray, int]], b: np.ndarray, n_b: int) -> list[np.ndarray]:
    """`cross_counts(a, n_a, b, n_b)` for each grouping (a, n_a), from one bincount of the rows'
    joint cells (every grouping's code, a missing one in a spare slot) summed along the other
    groupings: a few groupings of few groups, so the cells are few; one pass over 1M rows, not
    one per grouping. Per grouping when the cells would outnumber the rows."""
    shape = tuple(n + 1 for _, n in groupings) + (n_b + 1,)
    if not groupings or math.prod(shape) > max(4 * len(b), 1 << 16):
        return [cross_counts(a, n_a, b, n_b) for a, n_a in groupings]
    cell = np.zeros(len(b), dtype=np.int64)
    for (a, n_a), width in zip([*groupings, (b, n_b)], shape):
        cell = cell * width + (np.where(a < 0, n_a, a) if len(a) and a.min() < 0 else a)
    joint = np.bincount(cell, minlength=math.prod(shape)).reshape(shape)[..., :n_b]
    out = []
    for axis, (_, n_a) in enumerate(groupings):
        others = tuple(i for i in range(len(groupings)) if i != axis)
        out.append((joint.sum(axis=others) if others else joint)[:n_a])
    return out
