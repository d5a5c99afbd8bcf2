"""The timings' codes kept between nights (`case_numbers`) give the KPIs what they gave without
them, night after night."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.insights import case_numbers as cn
from pipeline.insights.kpis import compute_kpis


def _column(rng: np.random.Generator, n: int, zeros: tuple[float, ...] = (0.0,)) -> np.ndarray:
    values = rng.choice([1.5, 2.0, 30.0, 0.25, np.nan, *zeros, 1e9, -3.0], size=n)
    return values.astype(np.float64)


def _sorted(got: cn.ValueCodes) -> tuple[np.ndarray, np.ndarray]:
    """The kept codes renumbered in their values' order: `pd.factorize(column, sort=True)`."""
    rank = np.full(len(got.values) + 1, -1, dtype=np.int64)
    rank[got.order] = np.arange(len(got.values))
    return rank[got.codes], got.values[got.order]


def _want(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, uniques = pd.factorize(values, sort=True)
    return codes, np.asarray(uniques, dtype=np.float64)


@pytest.mark.parametrize("seed", range(6))
def test_kept_codes_over_nights_are_the_columns_factorization(tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    column = _column(rng, 400)
    # Night after night the copy grows at its end; new values appear; the codes are kept.
    for n in (0, 50, 51, 200, 400):
        got = cn.kept_value_codes(tmp_path, column[:n], "g1", "duration_s")
        assert got is not None and not got.signed_zeros
        codes, distinct = _sorted(got)
        want_codes, want_distinct = _want(column[:n])
        assert np.array_equal(codes, want_codes) and distinct.tobytes() == want_distinct.tobytes()
    # Another generation: coded afresh, never read from the kept one.
    other = _column(np.random.default_rng(seed + 100), 300)
    got = cn.kept_value_codes(tmp_path, other, "g2", "duration_s")
    assert got is not None and np.array_equal(_sorted(got)[0], _want(other)[0])
    # Fewer rows than kept (a shorter copy of the same name): coded afresh.
    got = cn.kept_value_codes(tmp_path, column[:10], "g2", "duration_s")
    assert got is not None and np.array_equal(_sorted(got)[0], _want(column[:10])[0])


def test_both_zeros_are_one_value_and_are_told(tmp_path: Path):
    column = np.array([0.0, 1.0, np.nan, 2.0, -0.0, 1.0])
    got = cn.kept_value_codes(tmp_path, column[:3], "g", "x")
    assert got is not None and not got.signed_zeros
    got = cn.kept_value_codes(tmp_path, column, "g", "x")
    assert got is not None and got.signed_zeros
    assert np.array_equal(_sorted(got)[0], _want(column)[0])


def _cases(rng: np.random.Generator, n: int, zeros: tuple[float, ...]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case_id": [f"c{i}" for i in range(n)],
            "channel": pd.Series(rng.choice(["web", "app", "phone"], n), dtype="str"),
            "issue_type": pd.Series(rng.choice(["发票", "物流", "退款", None], n), dtype="str"),
            "outcome": pd.Series(rng.choice(["resolved", "unresolved", "escalated", None], n), dtype="str"),
            "first_response_s": _column(rng, n, zeros),
            "duration_s": np.where(rng.random(n) < 0.2, np.nan, np.round(rng.gamma(2.0, 300.0, n))),
        }
    )


@pytest.mark.parametrize("seed,zeros", [(0, (0.0,)), (1, (0.0,)), (2, (-0.0,)), (3, (0.0, -0.0))])
def test_kpis_with_kept_codes_are_the_kpis_without(tmp_path: Path, seed: int, zeros: tuple[float, ...]):
    rng = np.random.default_rng(seed)
    cases = _cases(rng, 3000, zeros)
    for n in (2000, 2500, 3000):  # the codes kept, then added to, then read as kept
        part = cases.iloc[:n].reset_index(drop=True)
        cn.remember(tmp_path, part, ("g1", n), min_rows=0)
        try:
            assert cn.known_codes(part["duration_s"]) is not None  # the KPIs do read them
            got = compute_kpis(part)
        finally:
            cn.forget()
        pd.testing.assert_frame_equal(got, compute_kpis(part), check_exact=True)
    # Another frame's column (a copy) is not the copy's: nothing is known for it.
    cn.remember(tmp_path, cases, ("g1", len(cases)), min_rows=0)
    try:
        assert cn.known_codes(cases["duration_s"].copy()) is None
        assert cn.known_codes(cases["duration_s"]) is not None
    finally:
        cn.forget()
    assert cn.known_codes(cases["duration_s"]) is None
