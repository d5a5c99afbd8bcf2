"""The members view's cluster ids' codes from the stored membership's Arrow text and the night's
new rows (`export.member_cluster_codes`), not a hashing of the view's 2M object cells: they are
the codes hashing the view's column gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.insights.cluster import ALL_SCOPE
from pipeline.insights.codes import sorted_codes
from pipeline.insights.export import member_cluster_codes, members_view_rows


def _membership(rng: np.random.Generator, cases: list[str], ids: list[str | None], arrow: bool) -> pd.DataFrame:
    rows = [
        {
            "case_id": c,
            "run_id": "r",
            "scope": scope,
            "cluster_id": ids[int(rng.integers(len(ids)))],
            "is_noise": False,
            "similarity": 0.5,
            "x": np.nan,
            "y": np.nan,
        }
        for scope in (ALL_SCOPE, "物流")
        for c in cases
    ]
    m = pd.DataFrame(rows)
    m["is_noise"] = m["cluster_id"].isna()
    if arrow:  # as the stored parts are read
        return m.astype({"case_id": "str", "run_id": "str", "scope": "str", "cluster_id": "str"})
    m["cluster_id"] = pd.Series(m["cluster_id"].tolist(), dtype=object)  # as `assign_cases` makes them
    return m


@pytest.mark.parametrize("seed", range(5))
def test_the_views_cluster_codes_are_its_cluster_ids_sorted_codes(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    frame = pd.DataFrame({"case_id": pd.array([f"k{i}" for i in range(n)], dtype="str"), "date": "2025-11-01"})
    stored = [f"k{i}" for i in rng.permutation(n + 5)[: n - 3]]  # some no longer selected
    new = [f"k{i}" for i in range(n) if f"k{i}" not in stored]
    # Stored ids (one missing); tonight's rows may hold stored ids, new ones ("C0" sorts first),
    # and none; "c" sorts after every capital.
    held = _membership(rng, stored, ["C5", "C2", None, "C9", "c1"], arrow=True)
    new_rows = _membership(rng, new, ["C2", "C0", None, "C7"], arrow=False)
    membership = pd.concat([held, new_rows], ignore_index=True)
    codes = member_cluster_codes(held["cluster_id"], new_rows["cluster_id"])
    assert codes is not None
    view, _, got = members_view_rows(frame, membership, texts=False, cluster_codes=codes)
    assert got is not None
    want = sorted_codes(view["cluster_id"])  # the view's object column hashed
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
    assert view["cluster_id"].dtype == object  # (so `sorted_codes` hashed Python objects)
    # Without codes: the view alone, no codes.
    plain, _, none = members_view_rows(frame, membership, texts=False)
    pd.testing.assert_frame_equal(plain, view)
    assert none is None
    # Missing ids are None either way (found from the codes, or by visiting the cells), not NaN.
    assert [v is None for v in view["cluster_id"]] == [v is None for v in plain["cluster_id"]]
    missing = dict(zip(zip(membership["case_id"], membership["scope"]), membership["cluster_id"].isna()))
    assert [v is None for v in view["cluster_id"]] == [missing[k] for k in zip(view["case_id"], view["scope"])]


def test_cluster_ids_that_are_not_all_text_are_hashed_as_before():
    held = pd.Series(["C1", None], dtype="str")
    assert member_cluster_codes(held, pd.Series([3, None], dtype=object)) is None
    assert member_cluster_codes(pd.Series(["C1", None], dtype=object), pd.Series(["C2"], dtype=object)) is None


def test_similarities_kept_as_floats_give_the_view_the_same_cells():
    """The new rows' similarities as floats beside the stored floats (`float_similarity`): the
    view's similarity cells are the same Python floats and None as from the object column."""
    from pipeline.insights.export import float_similarity

    frame = pd.DataFrame({"case_id": pd.array([f"k{i}" for i in range(6)], dtype="str"), "date": "2025-11-01"})
    rng = np.random.default_rng(0)
    held = _membership(rng, ["k0", "k1", "k2", "k3"], ["C1", None], arrow=True)
    held["similarity"] = [0.5, np.nan, 0.1234, 1.0, -0.25, np.nan, 0.3333, 0.0]
    new = _membership(rng, ["k4", "k5"], ["C1", None], arrow=False)
    new["similarity"] = pd.Series([0.9876, None, None, 0.25], dtype=object)
    floats = pd.concat([held, float_similarity(new, held)], ignore_index=True)
    objects = pd.concat([held, new], ignore_index=True)
    assert floats["similarity"].dtype == np.float64 and objects["similarity"].dtype == object
    a, b = (members_view_rows(frame, m)[0]["similarity"].tolist() for m in (floats, objects))
    assert [type(x) for x in a] == [type(y) for y in b] and a == b
    assert a.count(None) == 4 and 0.9876 in a
    # Stored rows not floats: the new rows as they are.
    assert float_similarity(new, objects) is new
