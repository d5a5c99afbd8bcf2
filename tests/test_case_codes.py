"""The stored cases' counted columns' codes, kept between nights beside the case copy
(`case_codes`): the kept codes are `pd.factorize(column, sort=True)`, a night codes only the
rows added to the copy since, kept codes of another copy or length are not used, and they are
handed only to the copy's own column (a column replaced after loading is hashed itself). The
exports with and without them are compared in tests/test_case_facts.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import pipeline.insights.case_codes as cc
from pipeline.insights.codes import sorted_codes

VALUES = ["华东", "华北", "", "a", "A", "b", "华东 ", "\u3000", "z9", "西南"]


def _column(rng: np.random.Generator, n: int, values=VALUES) -> pa.Array:
    return pa.array([None if rng.random() < 0.1 else str(rng.choice(values)) for _ in range(n)], pa.large_string())


def _want(column: pa.Array):
    codes, uniques = pd.factorize(pd.Series(pd.arrays.ArrowStringArray(column)), sort=True)
    return codes.tolist(), list(uniques)


def _got(got):
    return got[0].tolist(), list(got[1])


@pytest.fixture()
def spied(monkeypatch):
    """The lengths of the rows `case_codes` codes."""
    coded: list[int] = []
    real = cc.extend_codes
    monkeypatch.setattr(cc, "extend_codes", lambda c, v, new: coded.append(len(new)) or real(c, v, new))
    return coded


@pytest.mark.parametrize("seed", range(4))
def test_kept_codes_are_the_sorted_factorization_and_only_new_rows_are_coded(tmp_path, spied, seed):
    rng = np.random.default_rng(seed)
    # The first rows hold few values, later ones new values too (added to the dictionary).
    column = pa.concat_arrays([_column(rng, 100, VALUES[:3]), _column(rng, 300)])
    sizes = sorted({int(s) for s in rng.integers(1, 400, size=3)}) + [400, 400]
    covered = 0
    for size in sizes:
        part = column.slice(0, size)
        before = len(spied)
        assert _got(cc.kept_column_codes(tmp_path, part, "g1", "region")) == _want(part)
        # The rows past the kept ones coded; kept again once they pass RECODE_SHARE.
        assert spied[before:] == ([size - covered] if size > covered else [])
        if size - covered > cc.RECODE_SHARE * size or not covered:
            covered = size


def test_a_few_new_rows_are_coded_each_night_until_they_are_kept(tmp_path, spied):
    rng = np.random.default_rng(11)
    column = _column(rng, 1000)
    cc.kept_column_codes(tmp_path, column.slice(0, 900), "g1", "region")
    path = cc.cache_dir(tmp_path) / "region.arrow"
    written = path.stat().st_mtime_ns
    for size in (910, 930, 940):  # within 5% of the copy past the kept 900: coded, not kept
        part = column.slice(0, size)
        assert _got(cc.kept_column_codes(tmp_path, part, "g1", "region")) == _want(part)
        assert spied[-1] == size - 900 and path.stat().st_mtime_ns == written
    assert _got(cc.kept_column_codes(tmp_path, column, "g1", "region")) == _want(column)
    assert spied[-1] == 100 and path.stat().st_mtime_ns != written  # past 5%: kept
    assert _got(cc.kept_column_codes(tmp_path, column, "g1", "region")) == _want(column)
    assert spied[-1] == 100  # (nothing new since)


def test_kept_codes_of_another_copy_or_length_are_coded_again(tmp_path, spied, monkeypatch):
    rng = np.random.default_rng(9)
    column = _column(rng, 200)
    cc.kept_column_codes(tmp_path, column, "g1", "region")
    spied.clear()
    moved = column.take(pa.array(np.arange(199, -1, -1)))
    assert _got(cc.kept_column_codes(tmp_path, moved, "g2", "region")) == _want(moved)
    assert spied == [200]  # another generation
    short = moved.slice(0, 120)
    assert _got(cc.kept_column_codes(tmp_path, short, "g2", "region")) == _want(short)
    assert spied == [200, 120]  # fewer rows than kept
    changed = pa.array(["东北" if i == 7 else v for i, v in enumerate(short.to_pylist())], pa.large_string())
    assert _got(cc.kept_column_codes(tmp_path, changed, "g2", "region")) == _want(changed)
    assert spied == [200, 120, 120]  # the same generation and length, other text
    path = cc.cache_dir(tmp_path) / "region.arrow"
    path.write_bytes(path.read_bytes()[:60])
    assert _got(cc.kept_column_codes(tmp_path, changed, "g2", "region")) == _want(changed)
    assert spied == [200, 120, 120, 120]  # a broken file
    monkeypatch.setattr(cc, "MAX_VALUES", 5)  # too many values (beyond int16 codes): not kept
    assert cc.kept_column_codes(tmp_path, column, "g3", "region") is None
    assert not path.exists()


def test_kept_codes_are_handed_to_the_copys_own_columns_only(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    cases = pd.DataFrame(
        {
            "case_id": pd.array([f"c{i}" for i in range(300)], dtype="str"),
            "region": pd.arrays.ArrowStringArray(_column(rng, 300)),
            "issue_type": pd.arrays.ArrowStringArray(_column(rng, 300)),
        }
    )
    want = {c: _want(cc.arrow_text(cases[c]).chunk(0)) for c in ("region", "issue_type")}
    filled = cases.assign(issue_type=cases["issue_type"].fillna("未分类"))
    want_filled = _want(cc.arrow_text(filled["issue_type"]).chunk(0))
    cc.remember_case_codes(tmp_path, cases, ("g1", 300))
    assert sorted(p.name for p in cc.cache_dir(tmp_path).iterdir()) == ["issue_type.arrow", "region.arrow"]
    hashed: list[int] = []
    real = pd.factorize
    monkeypatch.setattr(pd, "factorize", lambda v, *a, **k: hashed.append(len(v)) or real(v, *a, **k))
    # The columns' shared codes are the kept ones, handed over: nothing hashed.
    for c in ("region", "issue_type"):
        assert _got(sorted_codes(cases[c])) == want[c]
    assert hashed == []
    # A column replaced after loading (issue types filled) is another array: hashed itself.
    assert _got(sorted_codes(filled["issue_type"])) == want_filled
    assert hashed == [300]
    # Not the copy's rows (another length, or no generation): nothing handed over.
    other = pd.DataFrame({"region": pd.arrays.ArrowStringArray(pa.array(["x", None, "x"], pa.large_string()))})
    cc.remember_case_codes(tmp_path, other, ("g1", 300))
    cc.remember_case_codes(tmp_path, other, None)
    assert _got(sorted_codes(other["region"])) == ([0, -1, 0], ["x"])
    assert hashed == [300, 3]
