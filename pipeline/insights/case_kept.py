"""What the tables kept between nights beside the case copy (`case_kpis`, `case_relations`,
`case_trajectories`, `case_numbers`) share: when they are kept, how a kept float is shown as the
rows would show it, and how a column is known to be the one counted.

Why a module of its own: the tables (`kpis`, `emotion_stats`) call the kept counts, and the
kept counts need the tables' own float steps; both import these, neither the other.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import pandas as pd
import pyarrow as pa

from pipeline.io import read_cache_table, write_cache_table
from pipeline.storage.case_cache import CopyRows, accepts

# Below this many stored cases the tables are computed from the rows and nothing is kept:
# loading, counting, merging and keeping the counts costs ~25 ms a night, what the tables
# themselves cost at ~100k cases.
KEEP_FROM_ROWS = 200_000
_UNIT = 2.0**-53


def keep_from(min_rows: int | None) -> int:
    """The stored cases from which counts are kept: `min_rows`, else `KEEP_FROM_ROWS` as it is
    now (read at each call, so that a check can lower it for a whole export)."""
    return KEEP_FROM_ROWS if min_rows is None else min_rows


def counted_generation(cases: pd.DataFrame, copy_rows: CopyRows | None, min_rows: int | None) -> str | None:
    """The case copy generation whose counts of `cases` are kept, or None where none are: they
    must be every row of the copy (`copy_rows`: `load_cases_copy`'s) and at least
    `keep_from(min_rows)` of them."""
    if copy_rows is None or not len(cases) or copy_rows[1] != len(cases) or len(cases) < keep_from(min_rows):
        return None
    return copy_rows[0]


def same_float(a: float, b: float) -> bool:
    """Whether two floats print alike: equal, and of one sign (-0.0 == 0.0, but prints "-0")."""
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def rounded_mean(total: float, magnitude: float, n: int, digits: int) -> float | None:
    """`round(mean, digits)` of n values whose float sum (any order) is within
    2 * 2^-53 * n * `magnitude` of `total`'s true sum, or None when means within that bound of
    `total / n` round differently (a zero of either sign included). Values that are all zero
    (`magnitude` 0) sum to 0.0 in both callers' kernels (pandas' starts at 0.0; numpy's meets
    no -0.0: the KPIs read the rows when a timing holds one)."""
    if magnitude == 0:
        return 0.0
    mean = total / n
    slack = 4 * _UNIT * magnitude + 8 * _UNIT * abs(mean) + 1e-300
    if not math.isfinite(mean) or not math.isfinite(slack):
        return None
    lo, hi = round(mean - slack, digits), round(mean + slack, digits)
    return lo if same_float(lo, hi) else None


def linear_quantile(kth: Callable[[int], float], n: int, q: float) -> float:
    """`np.quantile(values, q)` (its default "linear" method) from the n values' order statistics,
    `kth(i)` the i-th smallest (0-based): numpy's own steps (virtual index, its neighbours, gamma
    from the clamped one, the two-sided lerp) in the same float operations, so the same float
    without partitioning the values."""
    v = (n - 1) * q
    if v >= n - 1:
        i = j = n - 1
        gamma = v + 1  # numpy's clamped neighbour is index -1
    else:
        i = math.floor(v)
        j, gamma = i + 1, v - i
    a, b = kth(i), kth(j)
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def round_q(value: float) -> float:
    return round(float(value), 1)


def rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def fisher_ci(r: float, n: int, method: str = "pearson", z: float = 1.96) -> tuple[float, float]:
    """95% interval of a correlation on Fisher's z scale; Spearman with Bonett and Wright's
    standard error sqrt((1 + r^2 / 2) / (n - 3))."""
    rr = min(max(r, -0.999999), 0.999999)
    se = math.sqrt((1 + rr * rr / 2) / (n - 3)) if method == "spearman" else 1 / math.sqrt(n - 3)
    return math.tanh(math.atanh(rr) - z * se), math.tanh(math.atanh(rr) + z * se)


def column_key(col: pd.Series) -> Any:
    """What names a column's values: its Arrow array, or its numpy memory (address, length, stride)."""
    from pipeline.insights.codes import _arrow_of

    arr = _arrow_of(col)
    if arr is not None:
        return arr
    values = col.to_numpy()
    return (int(values.__array_interface__["data"][0]), len(values), values.strides)


def same_column(a: Any, b: Any) -> bool:
    return a is b if not isinstance(a, tuple) else a == b


T = TypeVar("T")


class Held(Generic[T]):
    """The current export's counts of the case copy's columns, found again by the table that reads
    them from the frame it is handed (`finish_export` passes frames; the tables keep their
    signatures). An entry holds its columns, so their memory cannot be reused by other columns
    while it lives: `clear` at the export's end."""

    def __init__(self, read: tuple[str, ...]) -> None:
        self.read = read
        self._entries: list[tuple[dict[str, Any], int, T]] = []
        self._lock = threading.Lock()

    def hold(self, cases: pd.DataFrame, counts: T, rows: int) -> None:
        cols = {c: (column_key(cases[c]), cases[c]) for c in self.read if c in cases}
        with self._lock:
            self._entries.append((cols, rows, counts))

    def find(self, cases: pd.DataFrame) -> T | None:
        """The counts held of `cases` when its read columns are the very ones counted."""
        with self._lock:
            entries = list(self._entries)
        present = {c for c in self.read if c in cases}
        for cols, rows, counts in entries:
            if set(cols) == present and all(
                len(cases[c]) == rows and same_column(cols[c][0], column_key(cases[c])) for c in cols
            ):
                return counts
        return None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def read_tables(
    folder: Path,
    tables: dict[str, list[str]],
    tag: bytes,
    gen: str,
    rule: int,
    n_rows: int,
    prefix: CopyRows | None = None,
) -> tuple[dict[str, Any], dict[str, pa.Table]] | None:
    """Kept counts saved as several tables of one save (`write_tables`): their metadata and each
    table, when every one was kept by this `rule` of rows that still lead copy generation `gen`
    of `n_rows` rows (`case_cache.accepts`, `prefix`: `case_cache.copy_prefix`), and all of one
    save; else None (then every case is counted again)."""
    got: dict[str, pa.Table] = {}
    metas = []
    for name, cols in tables.items():
        found = read_cache_table(
            folder / f"{name}.arrow",
            tag,
            cols,
            lambda m: m.get("rule") == rule and accepts(m.get("gen"), m.get("n"), gen, n_rows, prefix),
        )
        if found is None:
            return None
        metas.append(found[0])
        got[name] = found[1]
    if any(m != metas[0] for m in metas):
        return None  # files of two saves
    return metas[0], got


def write_tables(folder: Path, tables: dict[str, pa.Table], tag: bytes, meta: dict[str, Any], what: str) -> None:
    """Keep `tables` with one `meta` (see `read_tables`)."""
    for name, table in tables.items():
        write_cache_table(folder / f"{name}.arrow", table, tag, meta, what, "the next night counts every case")
