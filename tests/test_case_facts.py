"""Each stored case's selection facts, kept between nights beside the case copy (`case_facts`):
the kept facts are the ones the problems give (`cluster.problem_facts`), a night computes only
the rows added to the copy since, and kept facts of another copy, rule or length are not used.
An export reading them selects what an export computing every fact selects."""

from __future__ import annotations

import shutil
from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import pipeline.insights.case_facts as cf
from pipeline.insights.cluster import problem_facts
from pipeline.storage.store import stored_parts
from tests.test_export_incremental import DAY0, _cases, _export, _store

PIECES = ["", " ", "\u3000", "\t", "<PHONE>", "<NAME>", "退款", "物流信息没更新", "a", "怎么办", "x<y", "\x85"]


def _problems(rng: np.random.Generator, n: int) -> pa.Array:
    texts = [
        None if rng.random() < 0.05 else "".join(rng.choice(PIECES, size=int(rng.integers(0, 5)))) for _ in range(n)
    ]
    return pa.array(texts, pa.large_string())


def _equal(got, want) -> None:
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


@pytest.fixture()
def spied(monkeypatch):
    """The lengths of the problems `case_facts` computes facts of."""
    computed: list[int] = []
    real = cf.problem_facts
    monkeypatch.setattr(cf, "problem_facts", lambda p, k: computed.append(len(p)) or real(p, k))
    return computed


@pytest.mark.parametrize("seed", range(4))
def test_kept_facts_are_the_problems_facts_and_only_new_rows_are_computed(tmp_path, spied, seed):
    rng = np.random.default_rng(seed)
    problems = _problems(rng, 300)
    sizes = [int(s) for s in sorted(rng.integers(0, 300, size=3))] + [300]
    for size in sizes:  # the copy grows at its end (the same generation)
        before = len(spied)
        _equal(
            cf.kept_problem_facts(tmp_path, problems.slice(0, size), "g1", 4), problem_facts(problems.slice(0, size), 4)
        )
        kept_before = sizes[sizes.index(size) - 1] if sizes.index(size) else 0
        assert spied[before:] == ([] if size == kept_before else [size - kept_before])
    spied.clear()
    _equal(cf.kept_problem_facts(tmp_path, problems, "g1", 4), problem_facts(problems, 4))
    assert spied == []  # nothing new: nothing computed


def test_kept_facts_of_another_copy_rule_or_length_are_computed_again(tmp_path, spied, monkeypatch):
    rng = np.random.default_rng(7)
    problems = _problems(rng, 200)
    cf.kept_problem_facts(tmp_path, problems, "g1", 4)
    spied.clear()
    # Another generation (the copy written whole: rows may have moved).
    moved = problems.take(pa.array(np.arange(199, -1, -1)))
    _equal(cf.kept_problem_facts(tmp_path, moved, "g2", 4), problem_facts(moved, 4))
    assert spied == [200]
    # Another min_chars.
    _equal(cf.kept_problem_facts(tmp_path, moved, "g2", 9), problem_facts(moved, 9))
    assert spied == [200, 200]
    # Fewer rows than kept (not a copy that grew from the kept one).
    _equal(cf.kept_problem_facts(tmp_path, moved.slice(0, 150), "g2", 9), problem_facts(moved.slice(0, 150), 9))
    assert spied == [200, 200, 150]
    # The same generation and length, but other texts (the kept facts' copy is not this one).
    changed = pa.array(["退款没到账了" if i == 3 else v for i, v in enumerate(moved.slice(0, 150).to_pylist())])
    _equal(cf.kept_problem_facts(tmp_path, changed, "g2", 9), problem_facts(changed, 9))
    assert spied[-1] == 150
    # Another rule.
    spied.clear()
    monkeypatch.setattr(cf, "PROBLEM_FACTS_RULE", "another")
    cf.kept_problem_facts(tmp_path, changed, "g2", 9)
    assert spied == [150]
    # A broken file.
    path = cf.cache_path(tmp_path)
    path.write_bytes(path.read_bytes()[:50])
    _equal(cf.kept_problem_facts(tmp_path, changed, "g2", 9), problem_facts(changed, 9))
    assert spied == [150, 150]
    # No copy generation: computed, nothing kept.
    path.unlink()
    cf.kept_problem_facts(tmp_path, changed, None, 9)
    assert not path.exists()


@pytest.mark.parametrize("kept", ["case-facts.arrow", "case-codes"])
def test_nights_with_kept_facts_export_what_computing_every_fact_exports(tmp_path, cfg, monkeypatch, kept):
    """New cases (the copy grows in place), a re-processed case whose problem became too short to
    cluster and one whose blank problem became long enough (the copy written whole), cases removed
    by repair, a night of nothing new: each night's export is the one without the kept selection
    facts (`case_facts`) or column codes (`case_codes`), new values (a region, a date) included."""
    import pipeline.storage.case_cache as cc

    monkeypatch.setattr(cc, "REWRITE_SHARE", 1.0)  # the copy grows in place, as on a big history
    out = tmp_path / "out"
    first = _cases({"物流": 20, "退款": 20}, 0, "20251103T000000-aaaa", seed=1)
    first.loc[5, "problem"] = "   "  # blank: not selected (no customer text)
    _store(out, first, "20251103T000000-aaaa")
    _export(cfg, out, DAY0)
    short = _cases({"物流": 1}, 3, "20251106T000000-n3", seed=7).assign(problem="怎么办")
    worded = _cases({"退款": 1}, 5, "20251106T000000-n3", seed=8).assign(region="东北", outcome="escalated")
    grown = _cases({"物流": 4, "退款": 3}, 3000, "20251104T000000-n1", seed=5)
    grown.loc[[0, 4], "problem"] = ["怎么办", " 退款一直没有到账 "]  # too short; not its own cluster text
    grown.loc[[1, 2], "region"] = ["西南", None]  # a new value; a missing one
    grown.loc[3, "date"] = "2025-11-04"
    nights = [
        grown,
        _cases({"发票": 5}, 3100, "20251105T000000-n2", seed=6, topics={"发票": ("发票抬头开错了", ["税号", "开票"])}),
        pd.concat([short, worded], ignore_index=True),
        "repair",
        None,
    ]
    for k, rows in enumerate(nights):
        if isinstance(rows, pd.DataFrame):
            _store(out, rows, str(rows["run_id"].iloc[0]))
        elif rows == "repair":
            [p for p in stored_parts(out) if "n2" in p.as_posix()][0].unlink()  # the 发票 cases
        plain = tmp_path / f"plain{k}"
        shutil.copytree(out, plain)
        cache = plain / "state" / "cache" / kept
        shutil.rmtree(cache) if cache.is_dir() else cache.unlink()
        day = DAY0 + timedelta(days=k + 1)
        got = _export(cfg, out, day)
        want = _export(cfg, plain, day)
        assert (out / "state" / "cache" / kept).exists()
        for name in ("members.parquet", "clusters.parquet", "trends.parquet", "alerts.parquet", "emotion.parquet"):
            a, b = (pd.read_parquet(f"{s['export_dir']}/{name}") for s in (got, want))
            pd.testing.assert_frame_equal(a, b)
        assert (got["n_clustered_cases"], got["n_new_cases"]) == (want["n_clustered_cases"], want["n_new_cases"])
        if k == 2:
            members = pd.read_parquet(f"{got['export_dir']}/members.parquet")
            assert "c00003" not in set(members["case_id"]) and "c00005" in set(members["case_id"])
