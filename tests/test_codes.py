"""The shared column codes give what the pandas calls they replaced give (pipeline.insights.codes)."""

from __future__ import annotations

import gc
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from pipeline.insights import codes as cd
from pipeline.insights.cluster import coded_shares, group_shares, share_dict

VALUES = ["华东", None, "", "华北", "未知", "华东", "b", None, "a", "华北"]


def _column(values: list, dtype: object) -> pd.Series:
    return pd.Series(values, dtype=dtype)


def _same(got: tuple, want: tuple) -> bool:
    """Same codes and same distinct values, in order."""
    return np.asarray(got[0]).tolist() == np.asarray(want[0]).tolist() and list(got[1]) == list(want[1])


@pytest.mark.parametrize("dtype", [object, "str"])
def test_sorted_codes_are_a_sorted_factorize_and_stay_so_when_remembered(dtype):
    s = _column(VALUES, dtype)
    want = pd.factorize(s, sort=True)
    assert _same(cd.sorted_codes(s), want)
    assert _same(cd.sorted_codes(s), want)  # the remembered ones, for an Arrow column
    assert cd.arrow_backed(s) == (dtype == "str")


@pytest.mark.parametrize("dtype", [object, "str"])
@pytest.mark.parametrize("fill", ["未知", "华北", "0", "zz"])
@pytest.mark.parametrize("values", [VALUES, [v for v in VALUES if v is not None], [None, None]])
def test_filled_codes_are_the_factorize_of_the_filled_column(dtype, fill, values):
    s = _column(values, dtype)
    assert _same(cd.filled_codes(s, fill), pd.factorize(s.fillna(fill), sort=True))


@pytest.mark.parametrize("dtype", [object, "str"])
def test_taken_codes_are_the_factorize_of_the_rows(dtype):
    s = _column(VALUES, dtype)
    for rows in ([], [1, 7], [0, 5, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0], [3, 3, 1]):
        idx = np.asarray(rows, dtype=np.int64)
        assert _same(cd.taken_codes(*cd.sorted_codes(s), idx), pd.factorize(s.take(idx), sort=True))


@pytest.mark.parametrize("seed", range(6))
def test_taken_codes_of_random_rows_are_the_factorize_of_the_rows(seed):
    """Rows taking every value, some, none or only missing ones: the same codes (int64, the
    caller's own) and values as factorizing the rows."""
    rng = np.random.default_rng(seed)
    pool = [None, "a", "b", "华东", "", "zz"][: int(rng.integers(1, 7))]
    s = _column([pool[i] for i in rng.integers(0, len(pool), 300)], "str")
    source = cd.sorted_codes(s)
    for n in (0, 1, 5, 50, 600):
        idx = rng.integers(0, len(s), n)
        got = cd.taken_codes(*source, idx)
        assert _same(got, pd.factorize(s.take(idx), sort=True)) and got[0].dtype == np.int64
        got[0][:] = 99  # not the source's codes
    assert _same(cd.sorted_codes(s), source)


def test_remembered_codes_belong_to_their_array_only():
    s = _column(VALUES, "str")
    codes, _ = cd.sorted_codes(s)
    codes[:] = 7  # a caller's copy: the remembered ones stay
    assert _same(cd.sorted_codes(s), pd.factorize(s, sort=True))
    t = s.copy()
    t.iloc[0] = "zzz"  # a new Arrow array: its own codes, not the old ones
    assert _same(cd.sorted_codes(t), pd.factorize(t, sort=True))
    n = len(cd._MEMO)
    del s, t
    gc.collect()
    assert len(cd._MEMO) < n  # forgotten with their arrays


def test_codes_are_kept_narrow_and_handed_out_as_int64():
    s = _column([f"v{i % 300}" if i % 7 else None for i in range(2000)], "str")
    codes, uniques = cd.sorted_codes(s)
    kept = cd._MEMO[id(cd._arrow_of(s))][1]
    assert kept.dtype == np.int16 and codes.dtype == np.int64 and (kept == codes).all()
    assert _same(cd.sorted_codes(s), pd.factorize(s, sort=True))


def _shares_by_counter(codes: np.ndarray, values: list, top: int | None) -> dict[int, dict[str, float]]:
    rows: dict[int, list] = {}
    for c, v in zip(codes.tolist(), values):
        if c >= 0:
            rows.setdefault(c, []).append(v)
    return {g: share_dict(vs, top) for g, vs in rows.items()}


# Few keys: counted over their span (60 small groups: many ties); many: hashed.
@pytest.mark.parametrize("n_groups,n_values", [(3, 4), (60, 3), (120, 150)])
@pytest.mark.parametrize("top", [None, 2])
def test_group_shares_by_span_or_hash_are_counters_shares(n_groups, n_values, top):
    rng = np.random.default_rng(n_groups)
    n = 300
    codes = rng.integers(-1, n_groups, n)
    pool = [f"v{i}" for i in range(n_values)] + ["", None, "未知"]
    values = [pool[i] for i in rng.integers(0, len(pool), n)]
    want = _shares_by_counter(codes, values, top)
    for dtype in (object, "str"):
        got = group_shares(codes, pd.Series(values, dtype=dtype), top)
        assert got == want
        assert [list(d) for d in got.values()] == [list(d) for d in (want[g] for g in got)]  # order too
    vc, uniques = cd.sorted_codes(pd.Series(values, dtype="str"))
    assert coded_shares(codes, vc, uniques, top) == want
    assert Counter(len(d) for d in want.values())  # the case is not empty


@pytest.mark.parametrize("dtype", [object, "str"])
def test_column_codes_are_shared_for_arrow_text_and_a_plain_factorize_otherwise(dtype):
    s = _column(VALUES, dtype)
    want = pd.factorize(s, sort=True) if dtype == "str" else pd.factorize(s)
    assert _same(cd.column_codes(s), want)
    if dtype == "str":
        assert cd.column_codes(s)[1] is cd.sorted_codes(s)[1]  # the remembered values, not a new hashing


@pytest.mark.parametrize("rows", [[], [1, 7], [0, 5, 2, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]])
def test_a_derived_columns_codes_are_its_own_sorted_factorize(rows):
    """A column declared as another's rows (`derive_codes`) is coded from the source's codes,
    taken: the same as hashing its own values (the form it replaced)."""
    source = _column(VALUES, "str")
    idx = np.asarray(rows, dtype=np.int64)
    taken = pd.Series(source.array.take(idx))
    cd.derive_codes(taken, source, idx)
    assert id(cd._arrow_of(taken)) in cd._DERIVED
    assert _same(cd.sorted_codes(taken), pd.factorize(taken, sort=True))
    assert _same(cd.sorted_codes(taken), pd.factorize(taken, sort=True))  # remembered
    assert id(cd._arrow_of(taken)) not in cd._DERIVED  # computed once, the source let go
    assert _same(cd.sorted_codes(source), pd.factorize(source, sort=True))


def test_a_derived_column_not_arrow_or_of_another_length_is_not_declared():
    source = _column(VALUES, "str")
    n = len(cd._DERIVED)
    cd.derive_codes(_column(VALUES, object), source, np.arange(len(VALUES)))
    cd.derive_codes(_column(VALUES[:3], "str"), source, np.arange(len(VALUES)))
    assert len(cd._DERIVED) == n


def test_an_arrays_finalizer_inside_a_locked_block_does_not_deadlock():
    """The last reference to a remembered array dropped while the memo's lock is held (here by
    hand; in an export, a derived entry letting go of its source) runs its finalizer, which
    takes the lock again in the same thread: a plain Lock hung the export."""
    s = _column(VALUES, "str")
    cd.sorted_codes(s)
    key = id(cd._arrow_of(s))
    with cd._LOCK:
        del s
        gc.collect()
    assert key not in cd._MEMO
