"""Every cache kept per case copy row takes its rows through one rule (`case_cache.accepts`):
after the copy is written whole only because the rows appended in place passed
`REWRITE_SHARE` (its rows first, in order: `copy_prefix`), each is taken, not computed again,
saves itself under the new generation, and the night exports what a night with no cache
exports; a copy written whole from anything else (a re-processed case) takes none."""

from __future__ import annotations

import json
import random
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

import pipeline.insights.export as ex
from pipeline.embed.fake import HashingEmbedder
from pipeline.insights import (
    case_codes,
    case_facts,
    case_kept,
    case_kpis,
    case_numbers,
    case_relations,
    case_trajectories,
    member_rows,
)
from pipeline.insights import member_cross as mc
from pipeline.insights.cluster import problem_facts
from pipeline.insights.emotion_stats import case_team_codes
from pipeline.insights.export import export_all
from pipeline.storage import case_cache
from pipeline.storage.case_cache import accepts
from tests.test_member_tallies import DAY0, _files, _store
from tests.test_member_tallies import _cases as _topic_cases


def test_the_rule():
    assert accepts("g1", 5, "g1", 5) and accepts("g1", 0, "g1", 5)
    assert not accepts("g1", 6, "g1", 5)  # more rows than the copy holds
    assert not accepts("g0", 5, "g1", 9)  # another generation, no prefix
    assert accepts("g0", 5, "g1", 9, ("g0", 7)) and accepts("g0", 7, "g1", 9, ("g0", 7))
    assert not accepts("g0", 8, "g1", 9, ("g0", 7))  # rows the former copy grew by after it led this one
    assert not accepts("g0", 5, "g1", 4, ("g0", 7))  # more rows than this copy holds
    assert not accepts("gx", 5, "g1", 9, ("g0", 7))  # not the generation that leads it
    assert not accepts("g1", None, "g1", 5) and not accepts("g1", -1, "g1", 5) and not accepts("g1", True, "g1", 5)


def _cases(n_per: dict[str, int], start: int, seed: int) -> pd.DataFrame:
    """The topic cases with what the kept counts read (timings, CSAT, emotion measures and
    trajectory, agents), so every cache keeps something."""
    df = _topic_cases(n_per, start, seed)
    rng = random.Random(seed + 100)
    n = len(df)
    start_ = [round(rng.uniform(-1, 1), 2) for _ in range(n)]
    end = [round(rng.uniform(-1, 1), 2) for _ in range(n)]
    return df.assign(
        first_response_s=[float(rng.choice([5, 10, 30, 60])) for _ in range(n)],
        duration_s=[float(rng.randint(60, 90)) for _ in range(n)],
        csat=[float(rng.randint(1, 5)) for _ in range(n)],
        emotion_start=start_,
        emotion_end=end,
        emotion_delta=[round(b - a, 2) for a, b in zip(start_, end)],
        emotion_trajectory=[rng.choice(["improved", "worsened", "stable"]) for _ in range(n)],
        agent_id=[rng.choice(["a1", "a2", "a3"]) for _ in range(n)],
        metadata_json=[json.dumps({"team": rng.choice(["A", "B"])}) for _ in range(n)],
    )


# Each cache's loader (module, name): what it returned is whether the night took it.
LOADERS = [
    (case_codes, "_load"),
    (case_numbers, "_load"),
    (case_facts, "_load"),
    (member_rows, "_load"),
    (case_relations, "load"),
    (case_kpis, "load"),
    (case_trajectories, "load"),
    (mc, "load"),
]


def _spy_loaders(monkeypatch) -> dict[str, list[bool]]:
    took: dict[str, list[bool]] = {}
    for module, name in LOADERS:
        real = getattr(module, name)

        def spy(*a: Any, _real: Any = real, _key: str = module.__name__.rsplit(".", 1)[1], **k: Any) -> Any:
            got = _real(*a, **k)
            took.setdefault(_key, []).append(got is not None)
            return got

        monkeypatch.setattr(module, name, spy)
    return took


def _copy_meta(out: Path) -> dict[str, Any]:
    return json.loads((ex.case_cache_path(out) / "meta.json").read_text(encoding="utf-8"))


def _kept_gens(out: Path) -> dict[str, Any]:
    """Each cache file's copy generation (its metadata's `gen`), by path."""
    gens = {}
    for path in sorted((out / "state" / "cache").rglob("*.arrow")):
        with pa.memory_map(str(path)) as src:
            meta = ipc.open_file(src).schema.metadata or {}
        for value in meta.values():
            got = json.loads(value)
            if isinstance(got, dict) and "gen" in got:
                gens[str(path.relative_to(out / "state" / "cache"))] = got["gen"]
    return gens


@pytest.fixture()
def store(tmp_path, cfg, monkeypatch):
    """A store whose nights keep every cache (the kept counts' threshold at 0), its copy grown in
    place by a night (every cache then kept of that generation)."""
    monkeypatch.setattr(case_kept, "KEEP_FROM_ROWS", 0)
    monkeypatch.setattr(case_cache, "REWRITE_SHARE", 1.0)
    out = tmp_path / "out"
    _store(out, _cases({"物流": 30, "发票": 30, "退款": 30, "蓝牙": 30}, 0, seed=1), "20251103T000000-aaaa")
    export_all(cfg, out, embedder=HashingEmbedder(), today=DAY0)  # the first: a full re-cluster
    _store(out, _cases({"物流": 5, "蓝牙": 4}, 1000, seed=2), "20251104T000000-bbbb")
    export_all(cfg, out, embedder=HashingEmbedder(), today=DAY0 + timedelta(days=1))
    return out


def _night_and_cold(out: Path, cfg, day, monkeypatch, fast: bool) -> dict[str, list[bool]]:
    """The night on the store (the loaders spied; `fast`: the kept cross-type entry may be taken,
    else the membership is read and located) and on a copy without any cache; their files equal."""
    cold = out.parent / f"cold-{day}"
    shutil.copytree(out, cold)
    shutil.rmtree(cold / "state" / "cache")
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(ex, "kept_night", lambda *a, **k: None)
        export_all(cfg, cold, embedder=HashingEmbedder(), today=day)
        took = _spy_loaders(m)
        export_all(cfg, out, embedder=HashingEmbedder(), today=day)
    a, b = _files(out, day.isoformat()), _files(cold, day.isoformat())
    assert a.keys() == b.keys()
    assert [f for f in a if a[f] != b[f]] == []
    shutil.rmtree(cold)
    return took


@pytest.mark.parametrize("fast", [True, False])
def test_a_copy_rewritten_after_its_rows_keeps_every_cache(store, cfg, monkeypatch, fast):
    out = store
    before = _copy_meta(out)
    assert set(_kept_gens(out).values()) == {before["gen"]}
    # The membership parts located by a night (last night's new part is not yet).
    located = len(list((member_rows.cache_dir(out)).glob("part-*.arrow")))
    assert located
    monkeypatch.setattr(case_cache, "REWRITE_SHARE", 0.0)
    _store(out, _cases({"发票": 6, "退款": 3}, 2000, seed=3), "20251105T000000-cccc")
    took = _night_and_cold(out, cfg, DAY0 + timedelta(days=2), monkeypatch, fast)
    after = _copy_meta(out)
    assert after["gen"] != before["gen"] and after["prefix"] == [before["gen"], before["rows"]]
    # Taken through the prefix, every one (member_rows only on a night that reads the membership;
    # member_cross's entry only on one that may take it).
    want = {"case_codes", "case_numbers", "case_facts", "case_relations", "case_kpis", "case_trajectories"}
    want |= {"member_cross"} if fast else set()
    assert {k for k, v in took.items() if v and all(v)} >= want, took
    assert fast or took["member_rows"].count(True) == located, took
    # ... and saved again under the new generation (member_cross is saved by the night itself).
    # (On a night that takes the entry the membership's rows are not located: their cache waits.)
    gens = _kept_gens(out)
    stale = {p for p, g in gens.items() if g != after["gen"] and not (fast and p.startswith("member-rows"))}
    assert stale == set(), gens


def test_a_copy_rewritten_for_a_re_processed_case_keeps_none(store, cfg, monkeypatch):
    out = store
    _store(out, _cases({"蓝牙": 2}, 0, seed=5), "20251105T000000-dddd")  # re-processed cases
    took = _night_and_cold(out, cfg, DAY0 + timedelta(days=2), monkeypatch, fast=False)
    assert "prefix" not in _copy_meta(out)
    assert {k for k, v in took.items() if any(v)} == set(), took
    assert set(_kept_gens(out).values()) == {_copy_meta(out)["gen"]}


# -- each cache on its own: taken through the prefix, the same answer as computed afresh --------


def test_codes_facts_and_numbers_through_the_prefix(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    text = pa.array([str(v) for v in rng.choice(["华东", "华北", "西南", "东北"], 400)], pa.large_string())
    numbers = rng.choice([1.0, 2.5, np.nan, 7.0, -0.0], 400)
    case_codes.kept_column_codes(tmp_path, text.slice(0, 390), "g1", "region")
    case_numbers.kept_value_codes(tmp_path, numbers[:390], "g1", "duration_s")
    case_facts.kept_problem_facts(tmp_path, text.slice(0, 390), "g1", 2)
    coded: list[int] = []
    for module in (case_codes, case_numbers):
        real = module.extend_codes

        def spy(*a: Any, _real: Any = real) -> Any:
            coded.append(len(a[-1]))
            return _real(*a)

        monkeypatch.setattr(module, "extend_codes", spy)
    tested: list[int] = []
    monkeypatch.setattr(case_facts, "problem_facts", lambda p, m: tested.append(len(p)) or problem_facts(p, m))
    prefix = ("g1", 390)  # 10 rows after it: fewer than the share that codes are saved again for
    got = case_codes.kept_column_codes(tmp_path, text, "g2", "region", prefix)
    fresh = case_codes.kept_column_codes(tmp_path / "fresh", text, "g2", "region")
    assert got is not None and fresh is not None
    assert np.array_equal(got[0], fresh[0]) and list(got[1]) == list(fresh[1])
    value = case_numbers.kept_value_codes(tmp_path, numbers, "g2", "duration_s", prefix)
    value_fresh = case_numbers.kept_value_codes(tmp_path / "fresh", numbers, "g2", "duration_s")
    assert value is not None and value_fresh is not None
    assert np.array_equal(value.values[value.codes], value_fresh.values[value_fresh.codes], equal_nan=True)
    facts = case_facts.kept_problem_facts(tmp_path, text, "g2", 2, prefix)
    assert all(np.array_equal(a, b) for a, b in zip(facts, problem_facts(text, 2)))
    # Only the 10 rows after the kept 390 were coded and tested (the fresh codes: all 400).
    assert coded == [10, 400, 10, 400] and tested == [10]
    assert set(_kept_gens(tmp_path).values()) == {"g2"}  # saved under the new generation
    # Not through another generation's prefix, nor past the rows it handed on.
    coded.clear()
    case_codes.kept_column_codes(tmp_path, text, "g3", "region", ("g1", 390))
    case_numbers.kept_value_codes(tmp_path, numbers, "g3", "duration_s", ("g2", 399))
    assert coded == [400, 400]


@pytest.mark.parametrize("module", [case_relations, case_kpis, case_trajectories])
def test_kept_counts_through_the_prefix(tmp_path, module, monkeypatch):
    cases = _cases({"物流": 40, "发票": 40, "退款": 40, "蓝牙": 40}, 0, seed=7).reset_index(drop=True)
    for c in ("first_response_s", "duration_s", "csat", "emotion_start", "emotion_end", "emotion_delta"):
        cases[c] = cases[c].astype(np.float64)

    def remember(out: Path, part: pd.DataFrame, rows: Any, prefix: Any = None) -> None:
        if module is case_trajectories:
            module.remember(out, part, rows, case_team_codes, min_rows=0, prefix=prefix)
        else:
            module.remember(out, part, rows, min_rows=0, prefix=prefix)

    head = cases.iloc[:120].reset_index(drop=True)
    remember(tmp_path, head, ("g1", 120))
    kept = module.load(tmp_path, "g1", 120)
    assert kept is not None and kept.rows == 120
    assert module.load(tmp_path, "g2", 160) is None
    assert module.load(tmp_path, "g2", 160, ("g1", 119)) is None  # past the rows it handed on
    assert module.load(tmp_path, "g2", 160, ("g1", 120)) is not None
    starts: list[int] = []
    real = module.count_rows

    def spy(*a: Any) -> Any:
        starts.append(a[-1] if isinstance(a[-1], int) else 0)  # relations' first count: no start
        return real(*a)

    monkeypatch.setattr(module, "count_rows", spy)
    remember(tmp_path, cases, ("g2", 160), ("g1", 120))
    got = module.load(tmp_path, "g2", 160)  # saved under the new generation, all rows
    remember(tmp_path / "fresh", cases, ("g2", 160))
    fresh = module.load(tmp_path / "fresh", "g2", 160)
    assert starts == [120, 0]  # the kept rows not counted again
    assert got is not None and fresh is not None and got.rows == 160
    assert _norm(got) == _norm(fresh)


def _norm(x: Any) -> Any:
    """Counts as plain values to compare: floats to 9 places (sums merged in another order)."""
    if hasattr(x, "__dataclass_fields__"):
        return _norm(vars(x))
    if isinstance(x, dict):
        return sorted((repr(k), _norm(v)) for k, v in x.items())
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_norm(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, float):
        return round(x, 9) if np.isfinite(x) else repr(x)
    return x
