"""The emotion relations from counts kept between nights (`case_relations`) are the relations
computed from the cases: the same rows, float for float, night after night."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.insights import case_relations as cr
from pipeline.insights.emotion_stats import relations


def _cases(
    rng: np.random.Generator, n: int, rated: float = 0.7, outcomes: tuple = ("resolved", "unresolved")
) -> pd.DataFrame:
    start = np.round(rng.uniform(-1, 1, n), 2)
    end = np.clip(start + np.round(rng.normal(0.2, 0.4, n), 2), -1, 1)
    resolved = rng.random(n) < 1 / (1 + np.exp(-2 * end))
    outcome = np.where(resolved, "resolved", rng.choice(list(outcomes), n)).astype(object)
    outcome[rng.random(n) < 0.1] = None
    csat = np.where(rng.random(n) < rated, np.clip(np.round(3 + 2 * end + rng.normal(0, 1, n)), 1, 5), np.nan)
    frame = pd.DataFrame(
        {
            "outcome": pd.Series(outcome, dtype="str"),
            "emotion_start": np.where(rng.random(n) < 0.05, np.nan, start),
            "emotion_end": np.where(start == 0, -0.0, end),  # -0.0 among the values
            "emotion_delta": np.round(end - start, 2),
            "csat": csat,
        }
    )
    return frame


def _assert_same_counts(a: cr.Counts, b: cr.Counts) -> None:
    for m in cr.MEASURES:
        for x, y in zip(a.triples[m], b.triples[m]):
            assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("seed", range(3))
def test_kept_counts_and_new_rows_are_the_counts_of_all_rows(seed: int):
    cases = _cases(np.random.default_rng(seed), 3000)
    whole = cr.count_rows(cases)
    for cut in (0, 1, 1500, 2999, 3000):
        kept = cr.count_rows(cases.iloc[:cut].reset_index(drop=True))
        _assert_same_counts(cr.merge(kept, cr.count_rows(cases, cut)), whole)


@pytest.mark.parametrize(
    "seed,rated,outcomes",
    [
        (0, 0.7, ("resolved", "unresolved")),
        (1, 0.7, ("unresolved", "escalated", "other")),
        (2, 0.0, ("unresolved",)),  # no rating: too few for the Spearman rows
        (3, 0.002, ("escalated",)),  # a few ratings: too few cases
        (4, 0.3, ("resolved",)),  # every known outcome resolved: the flag does not vary
    ],
)
def test_relations_from_kept_counts_are_the_relations(tmp_path: Path, seed: int, rated: float, outcomes: tuple):
    cases = _cases(np.random.default_rng(seed), 12000, rated, outcomes)
    for n in (9000, 12000):  # counted and kept, then the kept counts and the new rows
        part = cases.iloc[:n].reset_index(drop=True)
        cr.remember(tmp_path, part, ("g1", n), min_rows=0)
        try:
            assert cr.known(part) is not None  # the relations are made from the counts
            got = relations(part)
        finally:
            cr.forget()
        assert cr.known(part) is None
        want = relations(part)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        assert got.to_csv() == want.to_csv()  # -0.0 and 0.0 too, which compare equal
    assert cr.load(tmp_path, "g1", 12000).rows == 12000
    assert cr.load(tmp_path, "g2", 12000) is None  # another generation's copy: counted again


def test_few_cases_and_other_columns_are_the_rows_to_decide(tmp_path: Path):
    cases = _cases(np.random.default_rng(7), 3000)
    counts = cr.count_rows(cases)
    assert cr.relation(counts.triples["emotion_end"], "resolved", 20, 5000) is None  # the bootstrap's
    cr.remember(tmp_path, cases, ("g", len(cases)), min_rows=0)
    try:
        copied = cases.assign(emotion_start=cases["emotion_start"].copy())
        assert cr.known(copied) is None  # not the counted column
        assert cr.known(cases.iloc[:-1]) is None
    finally:
        cr.forget()


def test_shown_only_when_numpys_r_gives_the_same_table():
    far = cr.shown(0.41234, 100_000, "pearson")
    assert far is not None and far["r"] == 0.412 and far["note"] == "moderate"
    assert cr.shown(0.3, 100_000, "pearson") is None  # a threshold of the note
    assert cr.shown(0.4125, 100_000, "pearson") is None  # a rounding step of r
    # Where the interval's low end crosses 0 within the margin.
    lo_zero = np.tanh(1.96 / np.sqrt(100_000 - 3))
    assert cr.shown(float(lo_zero), 100_000, "pearson") is None


def test_shown_never_guesses_the_sign_of_a_zero():
    assert cr.shown(0.0, 100_000, "pearson") is None  # r rounds to -0.0 or 0.0 within the margin
    assert cr.shown(-0.0001, 100_000, "pearson") is not None  # -0.0 whichever numpy's r is
