"""The KPI table from counts kept between nights (`case_kpis`) is the table computed from the
cases: the same rows, float for float, night after night."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.insights import case_kpis as ck
from pipeline.insights.case_kept import rounded_mean
from pipeline.insights.kpis import compute_kpis


def _cases(rng: np.random.Generator, n: int, zero: float = 0.0) -> pd.DataFrame:
    channel = rng.choice(["chat", "call", "email", None], n, p=[0.5, 0.3, 0.15, 0.05]).astype(object)
    issue = rng.choice(["发票", "物流", "退款", "", None], n).astype(object)
    # A channel and an issue type first seen late: new groups on a later night.
    channel[int(n * 0.9) :: 7] = "social"
    issue[int(n * 0.95) :: 5] = "新问题"
    first = np.where(rng.random(n) < 0.1, np.nan, np.round(rng.gamma(2.0, 20.0, n), 1))
    first[rng.random(n) < 0.02] = zero
    return pd.DataFrame(
        {
            "case_id": [f"c{i}" for i in range(n)],
            "channel": pd.Series(channel, dtype="str"),
            "issue_type": pd.Series(issue, dtype="str"),
            "outcome": pd.Series(rng.choice(["resolved", "escalated", "unresolved", "other", None], n), dtype="str"),
            "first_response_s": first,
            "duration_s": np.where(rng.random(n) < 0.1, np.nan, np.round(rng.gamma(2.0, 300.0, n), 3)),
        }
    )


@pytest.mark.parametrize("seed", range(3))
def test_kept_counts_and_new_rows_are_the_counts_of_all_rows(seed: int):
    cases = _cases(np.random.default_rng(seed), 4000)
    whole = ck.count_rows(cases)
    assert whole is not None
    for cut in (1, 2000, 3999, 4000):
        kept = ck.count_rows(cases.iloc[:cut].reset_index(drop=True))
        new = ck.count_rows(cases, cut)
        assert kept is not None and new is not None
        both = ck.merge(kept, new)
        assert both.groups.keys() == whole.groups.keys()
        for g, row in both.groups.items():
            assert row[:6] == whole.groups[g][:6]  # counts
            np.testing.assert_allclose(row[6:], whole.groups[g][6:], rtol=1e-12)  # sums
        assert both.hist == whole.hist
        assert both.rows == whole.rows == len(cases)


@pytest.mark.parametrize("seed", range(4))
def test_kpis_from_kept_counts_are_the_kpis(tmp_path: Path, seed: int):
    cases = _cases(np.random.default_rng(seed), 6000)
    for n in (3000, 5900, 6000):  # counted and kept, then the kept counts and each night's rows
        part = cases.iloc[:n].reset_index(drop=True)
        ck.remember(tmp_path, part, ("g1", n), min_rows=0)
        try:
            counts = ck.known(part)
            assert counts is not None and counts.rows == n
            assert ck.kpi_rows(counts, ["all", "channel", "issue_type"]) is not None  # not the rows' path
            got = compute_kpis(part)
        finally:
            ck.forget()
        assert ck.known(part) is None
        want = compute_kpis(part)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        assert got.to_csv() == want.to_csv()  # -0.0 and 0.0 too, which compare equal
    kept = ck.load(tmp_path, "g1", 6000)
    assert kept is not None and kept.rows == 6000
    assert ck.load(tmp_path, "g2", 6000) is None and ck.load(tmp_path, "g1", 5999) is None


def test_negative_zero_and_other_columns_are_the_rows_to_decide(tmp_path: Path):
    cases = _cases(np.random.default_rng(9), 2000, zero=-0.0)
    ck.remember(tmp_path, cases, ("g", len(cases)), min_rows=0)
    try:
        counts = ck.known(cases)
        assert counts is not None and counts.negative_zero
        assert ck.kpi_rows(counts, ["all"]) is None
        pd.testing.assert_frame_equal(compute_kpis(cases), compute_kpis(cases.copy()), check_exact=True)
        assert ck.known(cases.assign(duration_s=cases["duration_s"].copy())) is None
        assert ck.known(cases.drop(columns=["channel"])) is None
    finally:
        ck.forget()


def test_rounded_mean_only_when_every_mean_in_the_bound_rounds_alike():
    assert rounded_mean(1234.5678 * 10, 1234.5678 * 10, 10, 1) == 1234.6
    assert rounded_mean(0.25 * 4, 1.0, 4, 1) is None  # exactly on a step: numpy's may fall either side
    assert rounded_mean(float("inf"), float("inf"), 3, 1) is None


def test_a_zero_of_either_sign_is_not_guessed():
    # A mean whose bound straddles 0 rounds to -0.0 or 0.0, which print differently.
    assert rounded_mean(1e-20, 1.0, 2, 4) is None
    assert rounded_mean(-0.00002 * 3, 0.00006, 3, 4) is not None  # -0.0 on both ends: numpy's too
    got = rounded_mean(0.0, 0.0, 5, 4)  # all zeros: both kernels sum to 0.0
    assert got == 0.0 and str(got) == "0.0"


def test_below_the_threshold_nothing_is_kept(tmp_path: Path):
    cases = _cases(np.random.default_rng(1), 500)
    ck.remember(tmp_path, cases, ("g", len(cases)), min_rows=501)
    try:
        assert ck.known(cases) is None and ck.load(tmp_path, "g", len(cases)) is None
    finally:
        ck.forget()


def test_the_threshold_is_read_when_counting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pipeline.insights import case_kept

    cases = _cases(np.random.default_rng(2), 500)
    monkeypatch.setattr(case_kept, "KEEP_FROM_ROWS", 501)
    ck.remember(tmp_path, cases, ("g", len(cases)))
    assert ck.known(cases) is None
    monkeypatch.setattr(case_kept, "KEEP_FROM_ROWS", 500)
    ck.remember(tmp_path, cases, ("g", len(cases)))
    try:
        assert ck.known(cases) is not None
    finally:
        ck.forget()
