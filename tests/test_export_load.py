"""The nightly export's read of all history: its shortcuts give what the forms they replaced gave.

Each test runs the replaced form beside the new one on data with the awkward values (missing ids
and runs, a case twice, cases no longer selected, re-processed cases) and wants the same result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.insights.export import _is_in, _key, locate_members


def _replaced(membership: pd.DataFrame, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The look-ups as export_all made them: joined (case, run) keys, hashed each time."""
    member_ids = _key(membership["case_id"])
    todo = ~_is_in(_key(frame["case_id"], frame["run_id"]), _key(membership["case_id"], membership["run_id"]))
    alive = _is_in(member_ids, _key(frame["case_id"]))
    todo_frame = frame[todo].reset_index(drop=True)
    return alive, todo, _is_in(member_ids, _key(todo_frame["case_id"]))


def _ids(rng, n: int, k: int, missing: float, prefix: str) -> list[str | None]:
    return [None if rng.random() < missing else f"{prefix}{rng.integers(k)}" for _ in range(n)]


@pytest.mark.parametrize("dtype", [object, "str"])
@pytest.mark.parametrize("unique", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_locate_members_answers_what_the_joined_keys_answered(dtype, unique, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 120))
    if unique:
        ids = [f"c{i}" for i in rng.permutation(200)[:n]]
        ids = [None if rng.random() < 0.05 else i for i in ids]  # missing ids may repeat
    else:
        ids = _ids(rng, n, 60, 0.05, "c")
    frame = pd.DataFrame({"case_id": ids, "run_id": _ids(rng, n, 3, 0.05, "r")}, dtype=dtype)
    m = int(rng.integers(0, 300))
    # Members: mostly the frame's cases, with their run or another, and cases it no longer has.
    member_case = _ids(rng, m, 220, 0.03, "c")
    member_run = [r if rng.random() < 0.7 else None for r in _ids(rng, m, 3, 0.0, "r")]
    membership = pd.DataFrame({"case_id": member_case, "run_id": member_run}, dtype=dtype)
    got = locate_members(membership, frame)[:3]
    want = _replaced(membership, frame)
    for name, g, w in zip(("alive", "todo", "redone"), got, want):
        assert g.dtype == bool and g.tolist() == w.tolist(), name


def test_locate_members_on_the_nightly_shape():
    """Two scopes' rows per case, one case re-processed, one new, one no longer selected."""
    frame = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "run_id": ["r1", "r2", "r1", "r2"]}, dtype="str")
    membership = pd.DataFrame(
        {"case_id": ["a", "a", "b", "b", "c", "c", "x", "x"], "run_id": ["r1", "r1", "r1", "r1"] * 2}, dtype="str"
    )
    alive, todo, redone, _ = locate_members(membership, frame)
    assert alive.tolist() == [True] * 6 + [False] * 2
    assert todo.tolist() == [False, True, False, True]  # b re-processed (r2), d new
    assert redone.tolist() == [False, False, True, True, False, False, False, False]
    empty = locate_members(membership.iloc[:0], frame)[:3]
    assert empty[1].all() and not len(empty[0]) and not len(empty[2])


@pytest.mark.parametrize("min_chars", [-1, 0, 1, 3, 4, 6])
def test_long_enough_is_the_placeholder_count_compared(min_chars):
    """`_long_enough` removes placeholders only where the byte count cannot vouch for a text:
    it must decide what `_counted_chars(...) >= min_chars` decides, on texts of 1- to 4-byte
    characters mixed with placeholders (a text of three 4-byte characters and a placeholder
    has 9 spare bytes and 3 characters left), missing texts included."""
    import random

    import pyarrow as pa

    from pipeline.insights.cluster import _counted_chars, _long_enough

    rng = random.Random(min_chars)
    pieces = ["<", ">", "A", "_", "中", "Ä", "\U0001f600", " ", "<PHONE>", "<ORDER_ID>", "1"]
    texts: list[str | None] = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 9))) for _ in range(20_000)]
    texts += [None, "", "\U0001f600" * 3 + "<PHONE>", "中中中中中中<PHONE>", "ÄÄÄ<PHONE>"]
    arr = pa.chunked_array([pa.array(texts[:700], pa.large_string()), pa.array(texts[700:], pa.large_string())])
    got = _long_enough(arr, min_chars)
    want = _counted_chars(arr) >= min_chars
    assert got.dtype == bool and [t for t, g, w in zip(texts, got.tolist(), want.tolist()) if g != w] == []


@pytest.mark.parametrize("dtype", [object, "str"])
@pytest.mark.parametrize("seed", range(6))
def test_member_positions_are_what_members_view_looked_up(dtype, seed):
    """`locate_members`' positions, and `renewed_positions` after a night's new rows, are the
    frame rows `members_view` found by hashing the frame's ids (`_index_in`)."""
    from pipeline.insights.export import _index_in, locate_members, renewed_positions

    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 120))
    ids = [f"c{i}" for i in rng.permutation(200)[:n]]
    missing = 0.05 if seed % 2 else 0.0  # missing ids on odd seeds only: both kinds of night
    ids = [None if rng.random() < missing else i for i in ids]
    frame = pd.DataFrame({"case_id": ids, "run_id": _ids(rng, n, 3, 0.05, "r")}, dtype=dtype)
    m = int(rng.integers(0, 300))
    membership = pd.DataFrame(
        {"case_id": _ids(rng, m, 220, missing, "c"), "run_id": _ids(rng, m, 3, 0.2, "r")}, dtype=dtype
    )
    alive, todo, redone, pos = locate_members(membership, frame)
    assert pos is not None and pos.tolist() == _index_in(_key(membership["case_id"]), _key(frame["case_id"])).tolist()
    todo_frame = frame[todo].reset_index(drop=True)
    # The new rows as assign_cases writes them: each todo case once per scope, ids as str.
    new_ids = pd.Series(list(todo_frame["case_id"].astype(str)) * 2, dtype=object)
    tonight = pd.concat([membership[alive & ~redone], pd.DataFrame({"case_id": new_ids})], ignore_index=True)
    got = renewed_positions(pos[alive & ~redone], new_ids, todo_frame, todo)
    want = _index_in(_key(tonight["case_id"]), _key(frame["case_id"]))
    assert got is not None  # new rows' keys are their todo cases' (a missing one is nowhere)
    assert got.tolist() == want.tolist()
