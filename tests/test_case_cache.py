"""The export's copy of the stored cases: the same frame as reading every part, and only the
parts it has not seen are read."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import pipeline.storage.case_cache as cc
from pipeline.insights.export import CASE_CACHE_KEY, case_cache_path, load_cases, shrink_case_part
from pipeline.storage.store import read_cases, stored_parts, write_cases

COLUMNS = ["case_id", "conversation_id", "date", "problem", "customer_text", "metadata_json", "issue_type", "run_id"]


def _cases(ids: range, run_id: str, problem: str = "快递三天没到") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case_id": [f"c{i:04d}" for i in ids],
            "conversation_id": [f"v{i:04d}" for i in ids],
            "date": [f"2026-11-{1 + i % 5:02d}" for i in ids],
            "problem": [f"{problem}{i}" if i % 7 else "  " for i in ids],
            "customer_text": [f"客户原话{i}" for i in ids],
            "metadata_json": ['{"team": "A"}' if i % 3 else None for i in ids],
            "issue_type": ["物流配送" if i % 4 else None for i in ids],
            "run_id": run_id,
        }
    )


def _plain(out: Path) -> pd.DataFrame:
    return read_cases(out, columns=COLUMNS, shrink=shrink_case_part).reset_index(drop=True)


def _cached(out: Path) -> pd.DataFrame:
    return cc.read_cases_cached(out, case_cache_path(out), COLUMNS, CASE_CACHE_KEY, shrink=shrink_case_part)


@pytest.fixture
def out(tmp_path):
    write_cases(tmp_path, _cases(range(0, 40), "20261101T000000-r1"), "20261101T000000-r1", 0)
    write_cases(tmp_path, _cases(range(40, 60), "20261101T000000-r1"), "20261101T000000-r1", 1)
    return tmp_path


def _spy(monkeypatch) -> list[list[Path]]:
    calls: list[list[Path]] = []
    real = cc.read_parts

    def spy(files, *a, **k):
        calls.append(list(files))
        return real(files, *a, **k)

    monkeypatch.setattr(cc, "read_parts", spy)
    return calls


def test_cold_warm_and_after_new_runs_equal_reading_every_part(out, monkeypatch):
    calls = _spy(monkeypatch)
    pd.testing.assert_frame_equal(_cached(out), _plain(out))  # cold: every part, copy written
    assert (case_cache_path(out) / "meta.json").is_file()
    assert len(calls[-1]) == len(stored_parts(out))
    pd.testing.assert_frame_equal(_cached(out), _plain(out))  # warm: no part decoded
    assert len(calls) == 1
    # A newer run re-processes ten cases (their rows must replace the old) and adds ten.
    again = _cases(range(50, 70), "20261102T000000-r2", problem="退款还没到账")
    write_cases(out, again, "20261102T000000-r2", 0)
    before = {str(p) for p in calls[0]}
    got = _cached(out)
    assert calls[-1] and not {str(p) for p in calls[-1]} & before  # only the new run's parts
    pd.testing.assert_frame_equal(got, _plain(out))
    assert got["case_id"].is_unique and len(got) == 70
    assert got.loc[got["case_id"] == "c0055", "problem"].item().startswith("退款还没到账")
    # An older run committing late (run ids order runs) loses to the newer rows the copy holds.
    late = _cases(range(55, 75), "20261101T120000-r3", problem="发票")
    write_cases(out, late, "20261101T120000-r3", 0)
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    pd.testing.assert_frame_equal(_cached(out), _plain(out))


def test_a_removed_or_rewritten_part_makes_it_read_every_part(out, monkeypatch):
    _cached(out)
    parts = stored_parts(out)
    parts[0].unlink()  # what `casemine repair` does to a part it cannot trust
    calls = _spy(monkeypatch)
    got = _cached(out)
    pd.testing.assert_frame_equal(got, _plain(out))
    assert len(calls[-1]) == len(stored_parts(out))
    # The same file written again with other content (same path): the copy is not trusted.
    target = stored_parts(out)[0]
    rows = pd.read_parquet(target)
    rows["problem"] = "改过的问题"
    rows.to_parquet(target, index=False)
    got = _cached(out)
    pd.testing.assert_frame_equal(got, _plain(out))
    assert (got["problem"] == "改过的问题").any()


def test_a_foreign_or_broken_copy_is_ignored_and_rewritten(out):
    path = case_cache_path(out)
    cc.read_cases_cached(out, path, COLUMNS, "another-rule", shrink=None)  # kept without shrinking
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    (path / "meta.json").write_bytes(b"not a meta file")
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    assert json.loads((path / "meta.json").read_text())["key"] == CASE_CACHE_KEY
    # Other columns asked: the copy does not hold them, every part is read.
    fewer = cc.read_cases_cached(out, path, ["case_id", "date", "run_id"], CASE_CACHE_KEY, shrink=shrink_case_part)
    pd.testing.assert_frame_equal(fewer, read_cases(out, columns=["case_id", "date", "run_id"]).reset_index(drop=True))


def test_an_unwritable_copy_costs_speed_not_the_cases(out, caplog):
    (out / "state").mkdir()
    (out / "state" / "cache").write_text("a file where the cache folder would be")
    got = _cached(out)
    pd.testing.assert_frame_equal(got, _plain(out))
    assert "could not write the case cache" in caplog.text


def test_the_export_reads_through_the_copy(out):
    former = case_cache_path(out).parent / "export-cases.arrow"
    former.parent.mkdir(parents=True)
    former.write_bytes(b"ARROW1 the former layout's copy")
    frame = load_cases(out)
    assert not former.exists()  # removed: nothing reads it
    assert (case_cache_path(out) / "meta.json").is_file()
    pd.testing.assert_frame_equal(load_cases(out), frame)
    assert len(frame) == 60


def test_no_parts_no_copy(tmp_path):
    got = _cached(tmp_path)
    assert got.empty and not case_cache_path(tmp_path).exists()


def _gen(out: Path) -> str:
    return json.loads((case_cache_path(out) / "meta.json").read_text())["gen"]


def test_new_cases_are_written_after_the_copy_in_place_until_they_are_many(out, monkeypatch):
    _cached(out)  # 60 cases in the copy
    gen = _gen(out)
    monkeypatch.setattr(cc, "REWRITE_SHARE", 0.1)
    calls = _spy(monkeypatch)
    write_cases(out, _cases(range(100, 103), "20261102T000000-r2"), "20261102T000000-r2", 0)  # 3 parts, 5%
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    assert _gen(out) == gen  # appended, not written whole
    assert len(calls) == 1 and len(calls[-1]) == 3  # only the unseen parts
    copy = cc._load(case_cache_path(out), CASE_CACHE_KEY, _schema())[0]
    assert len(copy) == 63 and all(c.num_chunks == 1 for c in copy.columns)  # one chunk, as mapped
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    assert len(calls) == 1  # nothing left to decode
    write_cases(out, _cases(range(103, 107), "20261103T000000-r3"), "20261103T000000-r3", 0)
    pd.testing.assert_frame_equal(_cached(out), _plain(out))  # 7 appended rows of 67: written whole
    assert _gen(out) != gen and len(list(case_cache_path(out).glob("g*"))) == 1
    # A re-processed case replaces a row of the copy: written whole, read as every part.
    gen = _gen(out)
    write_cases(out, _cases(range(5, 6), "20261104T000000-r4", problem="退款"), "20261104T000000-r4", 0)
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    assert _gen(out) != gen


def _schema():
    import pyarrow as pa

    from pipeline.storage.store import CASE_SCHEMA

    return pa.schema([cc._storage(f) for f in CASE_SCHEMA if f.name in COLUMNS])


def test_an_append_cut_short_or_damaged_is_never_read(out, monkeypatch):
    """Bytes past the recorded sizes (an append killed before its meta) are not the copy's; bytes
    the copy recorded but that changed since (a write lost in a crash) fail the checksum and the
    copy is written again."""
    monkeypatch.setattr(cc, "REWRITE_SHARE", 1.0)
    _cached(out)
    write_cases(out, _cases(range(100, 110), "20261102T000000-r2"), "20261102T000000-r2", 0)
    _cached(out)
    folder = case_cache_path(out) / _gen(out)
    for f in folder.iterdir():  # an append cut short: garbage after every file, meta unchanged
        with open(f, "ab") as fh:
            fh.write(b"\xff" * 13)
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    write_cases(out, _cases(range(110, 112), "20261103T000000-r3"), "20261103T000000-r3", 0)
    pd.testing.assert_frame_equal(_cached(out), _plain(out))  # appended over the garbage
    gen = _gen(out)
    text = next(f for f in folder.iterdir() if f.name == "3.data")  # the problems' text
    data = bytearray(text.read_bytes())
    data[-2] ^= 0x55  # a byte of tonight's rows
    text.write_bytes(bytes(data))
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    assert _gen(out) != gen  # not trusted: written whole again


def test_parts_joined_in_blocks_read_as_one_by_one(tmp_path, monkeypatch):
    """A back-fill stores a part per chunk and day; read_parts joins them a block at a time. The
    rows, their order and their values are those of reading every part on its own and
    concatenating, whether the last block is full or not."""
    import pyarrow as pa

    import pipeline.storage.store as store

    for k, run in enumerate(("20261101T000000-r1", "20261102T000000-r2", "20261103T000000-r3")):
        write_cases(tmp_path, _cases(range(k * 30, k * 30 + 30), run), run, 0)  # five dates: five parts
    files = stored_parts(tmp_path)
    assert len(files) == 15
    schema = pa.schema([f for f in store.CASE_SCHEMA if f.name in COLUMNS])
    one_by_one = pa.concat_tables([shrink_case_part(store._read_part(f, schema)) for f in files])
    for per_block in (2, 4, 15, 32):
        monkeypatch.setattr(store, "_PARTS_PER_BLOCK", per_block)
        got = store.read_parts(files, COLUMNS, shrink_case_part)
        assert got.schema.equals(one_by_one.schema) and got.equals(one_by_one), per_block
    assert _cached(tmp_path).equals(_plain(tmp_path))


def _keys(rng, n: int, ids: int, runs: list[str | None]) -> pd.DataFrame:
    """Random (case_id, run_id, row) rows: repeated ids and runs, some of either missing."""
    case = [None if rng.random() < 0.05 else f"c{rng.integers(ids):03d}" for _ in range(n)]
    run = [runs[rng.integers(len(runs))] for _ in range(n)]
    return pd.DataFrame({"case_id": case, "run_id": run, "row": range(n)})


def _arrow(df: pd.DataFrame):
    import pyarrow as pa

    types = {"case_id": pa.string(), "run_id": pa.string(), "row": pa.int64()}
    return pa.table({c: pa.array(df[c].tolist(), types[c], from_pandas=True) for c in df})


def test_newest_order_is_newest_rows_on_arrow():
    """The Arrow form of the newest-row rule picks and orders rows as the pandas form does:
    by run id (a missing one last), ties in row order, the last row of each case id kept (a
    missing case id counts as one id)."""
    import numpy as np

    from pipeline.storage.store import newest_order, newest_rows

    rng = np.random.default_rng(15)
    for n in (0, 1, 2, 7, 50, 400):
        for runs in (["r1"], ["r1", "r2", "r3"], ["r1", None, "r2"], [None]):
            df = _keys(rng, n, max(1, n // 3), runs)
            got = newest_order(_arrow(df)).tolist()
            assert got == newest_rows(df)["row"].tolist(), (n, runs)


def test_new_rows_met_with_the_copy_as_the_rule_over_all_of_them():
    """`with_new_rows` (the copy as kept, only the new rows ordered) gives the rows and order of
    the rule over the copy and the new rows together: newer runs, a late older run, runs equal
    to the copy's last, missing run and case ids on either side, an empty copy."""
    import numpy as np
    import pyarrow as pa

    from pipeline.storage.store import newest_rows

    rng = np.random.default_rng(16)
    cases = [
        (["r1", "r2"], ["r3", "r4"]),  # the nightly case: newer runs
        (["r1", "r2"], ["r2", "r3"]),  # a run equal to the copy's last
        (["r2", "r3"], ["r1", "r4"]),  # a late older run
        (["r1", "r2"], ["r3", None]),  # a new row without run id
        (["r1", None], ["r2"]),  # the copy ends with a row without run id
        (["r1"], [None]),
    ]
    for copy_runs, new_runs in cases:
        for n_copy, n_new in ((0, 5), (40, 0), (40, 10), (200, 60)):
            copy_df = newest_rows(_keys(rng, n_copy, 80, copy_runs)).reset_index(drop=True)
            new_df = _keys(rng, n_new, 80, new_runs)
            new_df["row"] += 1000
            copy, new = _arrow(copy_df), _arrow(new_df)
            got = cc.with_new_rows(copy, new)
            want = newest_rows(pd.concat([copy_df, new_df], ignore_index=True))
            assert got["row"].to_pylist() == want["row"].tolist(), (copy_runs, new_runs, n_copy, n_new)
            assert got.schema.equals(pa.concat_tables([copy, new]).schema)


def test_a_copy_of_another_layout_is_ignored_and_rewritten(out, monkeypatch):
    """A copy whose meta names another layout (the former single Arrow file had none here) is
    read as no copy: every part is read, and the copy written in the current layout."""
    _cached(out)
    meta_path = case_cache_path(out) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": 2}))
    calls = _spy(monkeypatch)
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    assert len(calls) == 1 and len(calls[0]) == len(stored_parts(out))  # every part read
    pd.testing.assert_frame_equal(_cached(out), _plain(out))
    assert len(calls) == 1  # and the copy rewritten in the current layout


@pytest.mark.parametrize("rewrite_share", [0.0, 1.0])
def test_night_after_night_the_copy_reads_as_every_part(tmp_path, monkeypatch, rewrite_share):
    """Runs in random order (newer, late older), re-processing random earlier cases, one run's
    rows without a run id; after each the copy (taken in or not) reads as reading every part
    does, rows and order. (Rows of two parts that tie on the run id, read on different nights,
    keep the order they were read in, where read_cases orders them by path: runs never share an
    id and every stored row has one, so the test does not make such ties; the copy's former
    layout did the same.)"""
    import random

    monkeypatch.setattr(cc, "REWRITE_SHARE", rewrite_share)
    rng = random.Random(int(rewrite_share * 10))
    for night in range(12):
        run = f"202611{rng.choice([night + 1, night + 1, max(1, night - 3)]):02d}T000000-r{night}"
        ids = rng.sample(range(0, 40 + night * 8), rng.randint(1, 12))
        rows = pd.concat([_cases(range(i, i + 1), run, problem=f"第{night}夜") for i in ids], ignore_index=True)
        if night == 4:
            rows["run_id"] = None  # rows without a run id sort after every run
        write_cases(tmp_path, rows, run, night)
        pd.testing.assert_frame_equal(_cached(tmp_path), _plain(tmp_path))
    pd.testing.assert_frame_equal(_cached(tmp_path), _plain(tmp_path))


def test_the_frame_names_the_copy_generation_its_rows_are(out, monkeypatch, caplog):
    """`read_cases_copy` says which copy generation the frame's rows are (what kept facts about
    the copy's rows are keyed on): after a whole write, an append, and none when unwritten."""
    monkeypatch.setattr(cc, "REWRITE_SHARE", 1.0)
    path = case_cache_path(out)
    frame, rows = cc.read_cases_copy(out, path, COLUMNS, CASE_CACHE_KEY, shrink=shrink_case_part)
    assert rows == (_gen(out), 60)
    write_cases(out, _cases(range(100, 103), "20261102T000000-r2"), "20261102T000000-r2", 0)
    frame, rows = cc.read_cases_copy(out, path, COLUMNS, CASE_CACHE_KEY, shrink=shrink_case_part)
    assert rows == (_gen(out), 63) and len(frame) == 63
    pd.testing.assert_frame_equal(frame, _plain(out))
    other = out.parent / "readonly-cache"
    other.write_text("a file where the copy's folder would be")
    frame, rows = cc.read_cases_copy(out, other, COLUMNS, CASE_CACHE_KEY, shrink=shrink_case_part)
    assert rows is None
    pd.testing.assert_frame_equal(frame, _plain(out))


def test_a_copy_made_from_the_parts_a_column_at_a_time_is_the_copy_made_whole(out, tmp_path, monkeypatch):
    """The first copy of a history is cast, ordered and written a column at a time, each let go
    once written (`_written_from_parts`): the same files, byte for byte, and the same meta as
    writing the ordered table whole; the parts of two runs interleave in the rule's order. Where
    the copy cannot be written, the frame is still every part's newest rows."""
    import pyarrow as pa

    from pipeline.storage.store import cases_dir, read_columns

    write_cases(out, _cases(range(30, 50), "20261101T000000-r0", problem="退款"), "20261101T000000-r0", 0)
    files = stored_parts(out)
    read = read_columns(COLUMNS, latest=True)
    schema = pa.schema([cc._storage(f) for f in cc.CASE_SCHEMA if f.name in read])
    root = cases_dir(out)
    stats = {f.relative_to(root).as_posix(): cc._stat(f) for f in files}
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    table = cc._newest(cc.read_parts(files, read, shrink_case_part).cast(schema))
    cc._written(whole, table, CASE_CACHE_KEY, stats, schema)
    got, rows = cc._written_from_parts(streamed, files, read, shrink_case_part, CASE_CACHE_KEY, stats, schema)
    assert got.equals(table) and rows is not None and rows[1] == len(table) == 60
    m1, m2 = (json.loads((d / "meta.json").read_text()) for d in (whole, streamed))
    g1, g2 = m1.pop("gen"), m2.pop("gen")
    assert m1 == m2
    names = sorted(p.name for p in (whole / g1).iterdir())
    assert names == sorted(p.name for p in (streamed / g2).iterdir()) and names
    for name in names:
        assert (whole / g1 / name).read_bytes() == (streamed / g2 / name).read_bytes(), name
    monkeypatch.setattr(cc, "_save_meta", lambda *a: False)
    got, rows = cc._written_from_parts(
        tmp_path / "unwritable", files, read, shrink_case_part, CASE_CACHE_KEY, stats, schema
    )
    assert rows is None and got.equals(table)
