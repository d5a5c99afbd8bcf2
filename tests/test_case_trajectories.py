"""The trajectory table's issue type, channel, outcome and team parts from counts kept between
nights (`case_trajectories`) are the parts computed from the cases, float for float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.insights import case_trajectories as ctr
from pipeline.insights.cluster import ALL_SCOPE
from pipeline.insights.emotion_stats import case_team_codes, case_teams, trajectory_table


def _cases(rng: np.random.Generator, n: int, places: int = 12) -> pd.DataFrame:
    """Cases whose emotions have `places` decimals (with few, a group's mean can land on the
    table's rounding step: then the rows decide, the same table)."""
    issue = rng.choice(["发票", "物流", "退款", None], n).astype(object)
    issue[int(n * 0.9) :: 6] = "新问题"  # a group first seen late
    traj = rng.choice(["改善", "平稳", "恶化", None], n, p=[0.4, 0.3, 0.2, 0.1]).astype(object)
    agent = rng.choice(["a1", "a2", "a3", None], n).astype(object)
    agent[int(n * 0.95) :: 9] = "a9"  # a team first seen late
    start = np.round(rng.uniform(-1, 1, n), places)
    start[agent == "a3"] = 0.0  # a team whose start is always 0: its mean prints 0, not -0
    return pd.DataFrame(
        {
            "case_id": pd.Series([f"c{i}" for i in range(n)], dtype="str"),
            "issue_type": pd.Series(issue, dtype="str"),
            "channel": pd.Series(rng.choice(["chat", "call", None], n), dtype="str"),
            "outcome": pd.Series(rng.choice(["resolved", "unresolved"], n), dtype="str"),
            "emotion_trajectory": pd.Series(traj, dtype="str"),
            "emotion_start": np.where(rng.random(n) < 0.1, np.nan, start),
            "emotion_end": np.round(rng.uniform(-1, 1, n), places),
            "emotion_delta": np.where(rng.random(n) < 0.2, np.nan, np.round(rng.normal(0, 0.5, n), places)),
            "agent_id": pd.Series(agent, dtype="str"),
            "metadata_json": pd.Series([None] * n, dtype="str"),
        }
    )


def _same_table(got: pd.DataFrame, want: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert got.to_csv() == want.to_csv()  # -0.0 and 0.0 too, which compare equal


def _sorted(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return frame.sort_values(by, kind="stable").reset_index(drop=True)


def _members(cases: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "scope": ALL_SCOPE,
            "case_id": cases["case_id"].astype(object),
            "cluster_id": rng.choice(["C1", "C2", None], len(cases)).astype(object),
        }
    )


@pytest.mark.parametrize("seed,places", [(0, 12), (1, 12), (2, 12), (3, 4), (4, 2)])
def test_trajectory_table_from_kept_counts_is_the_tables(tmp_path: Path, seed: int, places: int):
    rng = np.random.default_rng(seed)
    cases = _cases(rng, 5000, places)
    for n in (3000, 4900, 5000):  # counted and kept, then the kept counts and each night's rows
        part = cases.iloc[:n].reset_index(drop=True)
        members = _members(part, rng)
        ctr.remember(tmp_path, part, ("g1", n), case_team_codes, min_rows=0)
        try:
            counted = ctr.known(part)
            assert counted is not None and counted.rows == n
            made = ctr.parts(counted, ("改善", "平稳", "恶化"))
            assert made is not None or places < 12  # not the rows' path, but on a rounding step
            got = trajectory_table(part, members, case_teams(part))
            got_alone = trajectory_table(part, None, case_teams(part))
        finally:
            ctr.forget()
        assert ctr.known(part) is None
        _same_table(got, trajectory_table(part, members, case_teams(part)))
        _same_table(got_alone, trajectory_table(part, None))
        assert set(got["dimension"]) == {"issue_type", "cluster_id", "channel", "outcome", "team"}
    kept = ctr.load(tmp_path, "g1", 5000)
    assert kept is not None and kept.rows == 5000 and ctr.load(tmp_path, "g2", 5000) is None


def test_kept_counts_and_new_rows_are_the_counts_of_all_rows():
    cases = _cases(np.random.default_rng(3), 3000)
    whole = ctr.count_rows(cases, case_team_codes)
    assert whole is not None
    for cut in (1, 1500, 2999):
        kept, new = (
            ctr.count_rows(cases.iloc[:cut].reset_index(drop=True), case_team_codes),
            ctr.count_rows(cases, case_team_codes, cut),
        )
        assert kept is not None and new is not None
        both = ctr.merge(kept, new)
        assert both.counts == whole.counts
        assert both.sums.keys() == whole.sums.keys()
        for cell, row in both.sums.items():
            assert row[0] == whole.sums[cell][0]  # known values
            np.testing.assert_allclose(row[1:], whole.sums[cell][1:], rtol=1e-12, atol=1e-12)  # sums


def test_other_columns_are_the_rows_to_decide(tmp_path: Path):
    cases = _cases(np.random.default_rng(5), 2000)
    ctr.remember(tmp_path, cases, ("g", len(cases)), case_team_codes, min_rows=0)
    try:
        assert ctr.known(cases) is not None
        assert ctr.known(cases.assign(emotion_end=cases["emotion_end"].copy())) is None
        assert ctr.known(cases.iloc[:-1]) is None
    finally:
        ctr.forget()
    # Object (not Arrow) text: not counted, the rows decide.
    assert ctr.count_rows(cases.assign(channel=cases["channel"].astype(object)), case_team_codes) is None
