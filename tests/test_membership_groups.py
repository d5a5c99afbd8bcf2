"""Every membership part in row groups of `GROUP_ROWS` rows (pipeline.insights.
membership): a part within one group keeps the bytes it had written whole, the same rows give
the same bytes in any chunks, and the readers (`read_members` from the part's Arrow copy or
from the part itself, `first_row`) and a whole night after a re-cluster give what they gave
from a part of one row group."""

from __future__ import annotations

import re
import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline.insights.membership as mb
from pipeline.embed.fake import HashingEmbedder
from pipeline.insights.export import export_all
from pipeline.io import atomic_write_parquet
from pipeline.storage.store import write_cases


def _rows(n: int, start: int = 0, run: str = "r1") -> pd.DataFrame:
    """Membership rows as a night's or a compaction's (Arrow text, some missing ids and runs)."""
    i = np.arange(start, start + n)
    text = pd.StringDtype("pyarrow")
    return pd.DataFrame(
        {
            "case_id": pd.Series([f"c{k:06d}" for k in i], dtype=text),
            "run_id": pd.Series([run if k % 9 else "" for k in i], dtype=text),
            "scope": pd.Series(["__all__" if k % 2 else "物流" for k in i], dtype=text),
            "cluster_id": pd.Series([None if k % 5 == 0 else f"k{k % 13}" for k in i], dtype=text),
            "is_noise": i % 5 == 0,
            "similarity": np.where(i % 5 == 0, np.nan, (i % 97) / 97),
            "x": np.where(i % 2 == 1, (i % 31) / 7.0, np.nan),
            "y": np.where(i % 2 == 1, (i % 17) / 3.0, np.nan),
        }
    )


def _part(out: Path, seq: int = 1) -> Path:
    return mb.members_dir(out) / f"part-{seq:06d}.parquet"


@pytest.mark.parametrize("n", [1, 499, 500])
def test_a_part_within_one_group_keeps_the_bytes_it_had_written_whole(tmp_path, monkeypatch, n):
    """A night's part of at most `GROUP_ROWS` rows: the bytes of the part written whole as before
    (`atomic_write_parquet`), its rows in one chunk or in several (read from parts)."""
    monkeypatch.setattr(mb, "GROUP_ROWS", 500)
    rows = _rows(n)
    chunked = pd.concat([rows.iloc[: n // 2], rows.iloc[n // 2 :]], ignore_index=True)
    mb.append_members(tmp_path / "a", rows)
    mb.append_members(tmp_path / "b", chunked)
    atomic_write_parquet(tmp_path / "old.parquet", mb.member_part_table(rows))
    assert _part(tmp_path / "a").read_bytes() == (tmp_path / "old.parquet").read_bytes()
    assert _part(tmp_path / "b").read_bytes() == (tmp_path / "old.parquet").read_bytes()


def test_a_longer_part_is_its_rows_in_groups_of_the_one_rule(tmp_path, monkeypatch):
    """Past `GROUP_ROWS` rows: row groups of that many rows (the last fewer), the same content as
    written whole, and the same bytes whatever the rows' chunks."""
    monkeypatch.setattr(mb, "GROUP_ROWS", 500)
    rows = _rows(1_234)
    chunked = pd.concat([rows.iloc[i : i + 333] for i in range(0, len(rows), 333)], ignore_index=True)
    mb.append_members(tmp_path / "a", rows)
    mb.append_members(tmp_path / "b", chunked)
    meta = pq.ParquetFile(_part(tmp_path / "a")).metadata
    assert [meta.row_group(k).num_rows for k in range(meta.num_row_groups)] == [500, 500, 234]
    assert _part(tmp_path / "a").read_bytes() == _part(tmp_path / "b").read_bytes()
    want = mb.member_part_table(rows)
    got = pq.read_table(_part(tmp_path / "a"))
    assert got.equals(want) and got.schema.equals(want.schema, check_metadata=True)


def _written(out: Path, rows: list[pd.DataFrame], group: int, monkeypatch) -> dict:
    """Parts of `rows` (one each) written in groups of `group` rows, and what the readers give."""
    with monkeypatch.context() as m:
        m.setattr(mb, "GROUP_ROWS", group)
        for r in rows:
            mb.append_members(out, r)
    meta = {"members_from": 1}
    first = mb.read_members(out, meta)  # from the parts, each copy written
    again = mb.read_members(out, meta)  # from the copies
    assert mb.copies_dir(out).is_dir() and len(list(mb.copies_dir(out).glob("*.arrow"))) == len(rows)
    return {"first": first, "again": again, "head": mb.first_row(len(rows), _part(out, len(rows)))}


def _same_members(a: mb.Members, b: mb.Members) -> None:
    pd.testing.assert_frame_equal(a.frame, b.frame, check_exact=True)
    pd.testing.assert_frame_equal(a.rows, b.rows, check_exact=True)
    assert np.array_equal(a.kept, b.kept) and [(s, n) for s, _, n in a.parts] == [(s, n) for s, _, n in b.parts]
    for c in a.frame:  # the same Arrow chunks where the columns are Arrow text
        arr_a, arr_b = a.frame[c].array, b.frame[c].array
        if hasattr(arr_a, "_pa_array"):
            assert [len(x) for x in arr_a._pa_array.chunks] == [len(x) for x in arr_b._pa_array.chunks], c


def test_the_readers_give_the_same_frame_from_a_part_of_many_groups(tmp_path, monkeypatch):
    """A re-cluster's part in many row groups and a night's after it (one of its cases again):
    `read_members` gives the frame, rows and kept rows of the same part in one group, from the
    parts (copies written) and from their copies; without a copy (one that cannot be written)
    the same frame too; `first_row` the same row."""
    import pipeline.insights.membership as membership

    parts = [_rows(1_000), _rows(40, 990, run="r2")]
    one = _written(tmp_path / "one", parts, 10**6, monkeypatch)
    many = _written(tmp_path / "many", parts, 7, monkeypatch)
    assert pq.ParquetFile(_part(tmp_path / "many")).metadata.num_row_groups == -(-1_000 // 7)
    for k in ("first", "again"):
        _same_members(many[k], one[k])
    assert not many["first"].kept.all()  # the night's cases replace their rows of the first part
    pd.testing.assert_frame_equal(many["head"], one["head"], check_exact=True)
    monkeypatch.setattr(membership, "write_cache", lambda *a, **k: False)
    shutil.rmtree(mb.copies_dir(tmp_path / "many"))
    shutil.rmtree(mb.copies_dir(tmp_path / "one"))
    meta = {"members_from": 1}
    pd.testing.assert_frame_equal(
        mb.read_members(tmp_path / "many", meta).frame, mb.read_members(tmp_path / "one", meta).frame, check_exact=True
    )


def _store(out: Path, n: int, start: int, run_id: str, day: date) -> None:
    topics = ["快递三天了还没收到包裹", "发票抬头开错了需要重开", "申请退款好几天了没到账", "蓝牙耳机连接不上"]
    rows = [
        {
            "case_id": f"c{i:05d}",
            "conversation_id": f"v{i:05d}",
            "channel": "chat",
            "date": (day - timedelta(days=i % 9)).isoformat(),
            "date_source": "started_at",
            "problem": f"{topics[i % 4]}，第{i % 7}次",
            "outcome": ["resolved", "unresolved"][i % 2],
            "issue_type": ["售后", "物流与票据"][i % 2],
            "region": ["华东", "华北"][i % 3 % 2],
            "emotion": "平静",
            "emotion_score": 0.0,
        }
        for i in range(start, start + n)
    ]
    write_cases(out, pd.DataFrame(rows).assign(run_id=run_id), run_id, 0)


_CHART_ID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _files(out: Path) -> dict[str, bytes]:
    """Every file of the exports and of the state but its cache and membership parts (the
    report's random chart ids left out)."""
    found = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith(("state/cache/", "state/clusters/members/")):
            found[rel] = _CHART_ID.sub(b"ID", p.read_bytes()) if rel.endswith(".html") else p.read_bytes()
    return found


def test_a_night_after_a_recluster_of_many_groups_exports_what_one_group_exports(tmp_path, cfg, monkeypatch):
    """A re-cluster's part and a compaction's in row groups of 7 rows: the re-cluster, the night
    after it (the membership read from the part) and a compacting night export the files the same
    parts in one group give, byte for byte; the parts hold the same rows."""
    day = date(2025, 11, 3)
    base = tmp_path / "base"
    _store(base, 120, 0, "20251103T000000-aaaa", day)
    runs = {}
    for group in (10**6, 7):
        out = tmp_path / f"g{group}"
        shutil.copytree(base, out)
        with monkeypatch.context() as m:
            m.setattr(mb, "GROUP_ROWS", group)
            export_all(cfg, out, embedder=HashingEmbedder(), today=day)
            _store(out, 12, 500, "20251104T000000-bbbb", day)
            export_all(cfg, out, embedder=HashingEmbedder(), today=day + timedelta(days=1))
            m.setattr(mb, "COMPACT_PARTS", 1)
            _store(out, 5, 600, "20251105T000000-cccc", day)
            export_all(cfg, out, embedder=HashingEmbedder(), today=day + timedelta(days=2))
        runs[group] = out
    a, b = runs[10**6], runs[7]
    assert pq.ParquetFile(mb.current_parts(b, mb.load_meta(b))[0][1]).metadata.num_row_groups > 1
    assert _files(a).keys() == _files(b).keys() and _files(a) == _files(b)
    pa_parts = [pq.read_table(p) for _, p in mb.current_parts(a, mb.load_meta(a))]
    pb_parts = [pq.read_table(p) for _, p in mb.current_parts(b, mb.load_meta(b))]
    assert len(pa_parts) == len(pb_parts) == 1 and mb.load_meta(b)["members_from"] == 3  # compacted
    assert pa_parts[0].equals(pb_parts[0]) and pa_parts[0].schema.equals(pb_parts[0].schema, check_metadata=True)
