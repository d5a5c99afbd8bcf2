"""A full re-cluster's members kept as their parts (pipeline.insights.recluster_rows) give what
the whole members table gave: the tables counted from the cross-type rows and the tally of every
row counted a block at a time (block sizes of 1 row, a few, and more than all rows), the members
file made only as it is written (its Parquet and CSV bytes), and the membership part (its bytes)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.insights.recluster_rows as rr
from pipeline.embed.fake import HashingEmbedder
from pipeline.insights import member_parts as mp
from pipeline.insights import member_tallies as mt
from pipeline.insights import membership as mb
from pipeline.insights.cluster import ALL_SCOPE, CauseLexicon, ClusterState, scope_member_rows, select_cases
from pipeline.insights.export import (
    finish_export,
    fit_vectors,
    recluster_clustering,
    recluster_table,
    stored_members,
    with_file_texts,
    write_members_pair,
    write_pair,
)
from pipeline.insights.membership import member_part_table
from pipeline.io import atomic_write_parquet

TEXTS = ["快递 三天 没到", "物流 不 更新", "发票 抬头 开错", "退款 一直 没 到账", "耳机 左边 没声音", "快递员 不 送货"]


def _cut(text: str) -> list[str]:
    return text.split()


def _frame(n: int, types: int = 3) -> pd.DataFrame:
    """Selected cases in two Arrow chunks (as read from two store parts), some ids re-run, some
    fields missing."""
    rows = [
        {"case_id": f"c{i % (n - 10) if n > 20 else i:03d}", "run_id": f"r{i // max(n - 10, 1)}",
         "conversation_id": f"v{i}", "issue_type": ["物流", "售后", "票据", "账户"][i % types],
         "region": [None, "华东", "华北"][i % 3], "product": ["耳机", "手表"][i % 2], "channel": "chat",
         "problem": f"{TEXTS[i % len(TEXTS)]} 第{i}次", "outcome": ["resolved", None][i % 5 == 0],
         "emotion": ["平静", "愤怒", ""][i % 3], "date": f"2025-11-{1 + i % 20:02d}",
         "emotion_score": float("nan") if i % 7 == 0 else float(i % 5) / 5}
        for i in range(n)
    ]  # fmt: skip
    half = len(rows) // 2
    return select_cases(pd.concat([pd.DataFrame(rows[:half]), pd.DataFrame(rows[half:])], ignore_index=True))


def _fit(cfg, frame: pd.DataFrame):
    X = HashingEmbedder().encode_passages(frame["cluster_text"].tolist()).astype(np.float32)
    args = (cfg, ClusterState.empty(), "2025-11-21", CauseLexicon.load(cfg))
    return fit_vectors(frame.assign(tokens=pd.Series([None] * len(frame), dtype=object)), X, *args, cut=_cut)


def _no_ids(html: str) -> str:
    return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "ID", html)


def _pair_bytes(tmp, name: str, df: pd.DataFrame) -> tuple[bytes, bytes]:
    write_pair(tmp / f"{name}.parquet", tmp / f"{name}.csv", df, "utf-8-sig")
    return (tmp / f"{name}.parquet").read_bytes(), (tmp / f"{name}.csv").read_bytes()


@pytest.mark.parametrize("block", [1, 7, 64, 10**6])
def test_the_parts_give_the_whole_tables_files_and_membership(cfg, tmp_path, monkeypatch, block):
    frame = _frame(240)
    fitted = _fit(cfg, frame)
    rows = scope_member_rows(fitted.results)
    whole, _ = recluster_table(frame, fitted)  # every field of every row
    bare, _ = recluster_table(frame, fitted, texts=False)  # what the tables read before
    tail = rr.recluster_rows(frame, fitted.heads, rows, fitted.xy)
    assert tail is not None and tail.lead == len(frame) < len(tail.heads)
    monkeypatch.setattr(rr, "BLOCK_ROWS", block)
    got, _ = recluster_clustering(frame, fitted, tail, texts=False)
    assert got.partial and got.tally is not None and mt.makes_tables(got.tally)
    # The cross-type rows are the whole table's leading rows, x/y included.
    pd.testing.assert_frame_equal(got.members, whole.members.iloc[: len(frame)])
    assert got.members["x"].notna().all() and (got.members["scope"] == ALL_SCOPE).all()
    # Every table, the report and the summary as the whole members table made them.
    a = finish_export(frame, frame, got, cfg, "2025-11-21")
    b = finish_export(frame, frame, bare, cfg, "2025-11-21")
    assert got.tally.rows == len(bare.members) == a.summary["rows"]["members"]
    for name, table in b.tables.items():
        if name != "members":
            pd.testing.assert_frame_equal(a.tables[name], table, check_exact=True, obj=name)
    assert _no_ids(a.report_html) == _no_ids(b.report_html) and a.summary == b.summary
    # The members file, made as it is written: the same Parquet and CSV bytes.
    file_rows = with_file_texts(bare.members.drop(columns=["x", "y"]), frame, rows)
    assert _pair_bytes(tmp_path, "got", tail.table()) == _pair_bytes(tmp_path, "want", file_rows)
    # The membership part, built in Arrow or from the parts' pandas rows: the same file.
    _same_part(tmp_path, tail, frame, bare.members)


def _part_table(parts: rr.ReclusterRows) -> pa.Table | None:
    """The whole membership part (`PartGroups` as one group), or None where it cannot be built in
    Arrow (`part_groups`, `NotText`): the reference the group-wise part is checked against."""
    made = rr.part_groups(parts)
    if made is None:
        return None
    try:
        return made.group(0, len(made))
    except rr.NotText:
        return None


def _same_part(tmp_path, tail: rr.ReclusterRows, frame: pd.DataFrame, members: pd.DataFrame, direct: bool = True):
    want = member_part_table(stored_members(members, frame))
    built = _part_table(tail)
    assert (built is not None) == direct
    for name, table in (
        ("want", want),
        ("built", built),
        ("rows", member_part_table(stored_members(tail.stored(), frame))),
    ):
        if table is not None:
            assert table.equals(want, check_metadata=True) and table.schema.metadata == want.schema.metadata, name
            atomic_write_parquet(tmp_path / f"{name}-part.parquet", table)
            assert (tmp_path / f"{name}-part.parquet").read_bytes() == (tmp_path / "want-part.parquet").read_bytes(), (
                name
            )


@pytest.mark.parametrize("case", ["all noise", "no run ids", "no map", "re-run ids"])
def test_the_membership_part_is_the_whole_tables(cfg, tmp_path, case):
    """Where every row is noise (no cluster id: the object form's null type) the part is built
    from pandas rows; a frame without run ids, or without map points, or with a case id twice
    (its last row's run): built in Arrow, the same file."""
    frame = _frame(150)
    if case == "no run ids":
        frame = frame.drop(columns=["run_id"])
    if case == "re-run ids":
        frame = pd.concat([frame, frame.iloc[:9].assign(run_id="r9")], ignore_index=True)
    fitted = _fit(cfg, frame)
    if case == "all noise":
        fitted.heads = fitted.heads.assign(cluster_id=None, is_noise=True, similarity=None)
    if case == "no map":
        fitted.xy = None
    whole, _ = recluster_table(frame, fitted, texts=False)
    tail = rr.recluster_rows(frame, fitted.heads, scope_member_rows(fitted.results), fitted.xy)
    assert tail is not None
    _same_part(tmp_path, tail, frame, whole.members, direct=case != "all noise")


@pytest.mark.parametrize("block", [1, 5, 10**6])
def test_the_block_tally_is_the_tally_of_every_row(cfg, monkeypatch, block):
    """The tally kept for the next night: the same sums as counting the whole table."""
    frame = _frame(150, types=4)
    fitted = _fit(cfg, frame)
    bare, _ = recluster_table(frame, fitted, texts=False)
    tail = rr.recluster_rows(frame, fitted.heads, scope_member_rows(fitted.results), fitted.xy)
    assert tail is not None
    monkeypatch.setattr(rr, "BLOCK_ROWS", block)
    got, want = tail.tally(tail.cross()), mt.count_members(bare.members)
    assert (got.keys, got.sizes.tolist(), got.scopes, got.rows) == (
        want.keys,
        want.sizes.tolist(),
        want.scopes,
        want.rows,
    )
    assert got.scores is not None and want.scores is not None
    assert [s.tolist() for s in got.scores] == [s.tolist() for s in want.scores]
    assert got.typed is not None and want.typed is not None and got.typed_in_scope == want.typed_in_scope
    assert sorted(zip(got.typed.keys, got.typed.sizes.tolist())) == sorted(
        zip(want.typed.keys, want.typed.sizes.tolist())
    )
    for col, (group, names, counts, first) in want.mix.items():
        g = got.mix[col]
        pairs = {(got.keys[k], n): (c, f) for k, n, c, f in zip(g[0].tolist(), g[1], g[2].tolist(), g[3].tolist())}
        assert pairs == {
            (want.keys[k], n): (c, f) for k, n, c, f in zip(group.tolist(), names, counts.tolist(), first.tolist())
        }
    assert got.days is not None and want.days is not None
    by = ["breakdown", "key", "period", "value"]
    pd.testing.assert_frame_equal(
        got.days.astype(object).sort_values(by, ignore_index=True),
        want.days.astype(object).sort_values(by, ignore_index=True),
    )


def test_an_all_noise_first_block_keeps_the_days_text_type(cfg, monkeypatch):
    """A block whose rows have no cluster has no daily counts: the next block's are taken as
    they are, not joined to an empty frame of object columns."""
    frame = _frame(150)
    fitted = _fit(cfg, frame)
    tail = rr.recluster_rows(frame, fitted.heads, scope_member_rows(fitted.results), fitted.xy)
    assert tail is not None
    cross = tail.cross().assign(cluster_id=None, is_noise=True)
    monkeypatch.setattr(rr, "BLOCK_ROWS", 10**6)
    got = tail.tally(cross)
    assert got.days is not None and len(got.days)
    assert (
        got.days["key"].dtype
        == mt.count_members(tail.block(tail.lead, len(tail.heads), tail.fields())).days["key"].dtype
    )


@pytest.mark.parametrize("n", [12, 0])
def test_without_a_tally_that_makes_the_tables_the_whole_table_is_built(cfg, n):
    """Too few cases for a cluster (all noise: no daily counts) or none: the whole table."""
    frame = _frame(n) if n else select_cases(pd.DataFrame(columns=["case_id", "problem"]))
    fitted = _fit(cfg, frame)
    tail = rr.recluster_rows(frame, fitted.heads, scope_member_rows(fitted.results), fitted.xy)
    assert (tail is None) == (n == 0)
    got, _ = recluster_clustering(frame, fitted, tail, texts=False)
    want, _ = recluster_table(frame, fitted, texts=False)
    assert not got.partial
    pd.testing.assert_frame_equal(got.members, want.members)


def test_the_cross_type_rows_hold_no_more_than_their_values(cfg):
    """The tables hold the cross-type rows until the files are written, after the cases are let
    go: their emotion scores are a copy, not a view of the cases' block of float columns (which
    a view keeps whole); their texts are the frame's Arrow buffers and their map points the
    ones the membership part reads, not copies. The rows are the ones `assign` made."""
    frame = _frame(150)
    n = len(frame)
    numbers = np.c_[frame["emotion_score"].to_numpy(), np.arange(n, dtype=float), np.ones(n)]
    block = pd.DataFrame(numbers, columns=["emotion_score", "duration_s", "csat"], copy=False)
    frame = pd.concat([frame.drop(columns="emotion_score"), block], axis=1)
    assert np.shares_memory(frame["emotion_score"].to_numpy(), numbers)  # one block, as read
    fitted = _fit(cfg, frame)
    xy = (np.arange(n) / 7, -np.arange(n) / 3)
    tail = rr.recluster_rows(frame, fitted.heads, scope_member_rows(fitted.results), xy)
    assert tail is not None
    cross = tail.cross()
    scores = cross["emotion_score"].to_numpy()
    assert not np.shares_memory(scores, numbers)
    np.testing.assert_array_equal(scores, frame["emotion_score"].to_numpy())
    # The map's points: the ones the membership part reads, not a second copy of them.
    assert np.shares_memory(cross["x"].to_numpy(), xy[0]) and np.shares_memory(cross["y"].to_numpy(), xy[1])
    old = pd.concat([tail.heads.iloc[:n], tail.fields().rename(columns={"cluster_text": "problem"})], axis=1)
    pd.testing.assert_frame_equal(cross, old.assign(x=xy[0], y=xy[1]))
    shared = cross["problem"].array._pa_array.chunks[0].buffers()[2].address
    assert shared == frame["cluster_text"].array._pa_array.chunks[0].buffers()[2].address


def test_rows_between_is_the_slice_of_the_concatenation():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50, k) for k in (5, 0, 9, 1, 13)]
    whole = np.concatenate(rows)
    for a in range(len(whole) + 1):
        for b in range(a, len(whole) + 2):
            assert np.array_equal(rr.rows_between(rows, a, b), whole[a:b])


def test_scope_and_cluster_ids_are_arrow_text_only_when_every_value_is_text():
    ids = pd.Series(["a", None, "b"], dtype=object)
    assert isinstance(rr._arrow_text(ids).dtype, pd.StringDtype) and rr._arrow_text(ids).isna().tolist() == [
        False,
        True,
        False,
    ]
    for odd in ([None, None], [1, "a"]):
        col = pd.Series(odd, dtype=object)
        assert rr._arrow_text(col) is col
    assert pa.array(rr._arrow_text(ids).array).to_pylist() == ["a", None, "b"]


def _file_bytes(tmp_path, name: str, rows, encoding: str = "utf-8-sig") -> tuple[bytes, bytes]:
    write_members_pair(tmp_path / f"{name}.parquet", tmp_path / f"{name}.csv", rows, encoding)
    return (tmp_path / f"{name}.parquet").read_bytes(), (tmp_path / f"{name}.csv").read_bytes()


@pytest.mark.parametrize("group", [1, 7, 10**6])
def test_the_members_file_written_a_block_at_a_time_is_the_whole_tables(cfg, tmp_path, monkeypatch, group):
    """A re-cluster's members file made a row group at a time: the bytes the one-rule writer
    gives the whole table (row groups of `GROUP_ROWS`), the content (schema and pandas metadata
    included) and the CSV bytes `write_pair` gave it whole; within one group, its bytes too. A
    text column of a few labels is missing in whole blocks (its type is the whole column's)."""
    frame = _frame(240)
    kinds = [None] * len(frame)
    kinds[200] = "咨询"  # one label, in a late cross-type row: the first blocks have none
    frame = frame.assign(request_kind=pd.Series(kinds, dtype=object))
    fitted = _fit(cfg, frame)
    tail = rr.recluster_rows(frame, fitted.heads, scope_member_rows(fitted.results), fitted.xy)
    assert tail is not None
    whole = tail.table()
    monkeypatch.setattr(mp, "GROUP_ROWS", group)
    want = _file_bytes(tmp_path, "whole", whole)
    monkeypatch.setattr(rr.FileBlocks, "whole", lambda self: pytest.fail("built whole"))
    assert _file_bytes(tmp_path, "blocks", tail.file()) == want
    old_parquet, old_csv = _pair_bytes(tmp_path, "old", whole)
    assert want[1] == old_csv
    got, old = pq.read_table(tmp_path / "blocks.parquet"), pq.read_table(tmp_path / "old.parquet")
    assert got.equals(old) and got.schema.equals(old.schema, check_metadata=True)
    assert got.schema.field("request_kind").type == pa.string()
    n = len(whole)
    assert pq.ParquetFile(tmp_path / "blocks.parquet").metadata.num_row_groups == -(-n // group)
    assert (want[0] == old_parquet) == (group >= n)


def test_a_members_file_the_blocks_cannot_make_is_made_whole(cfg, tmp_path):
    """Another CSV encoding than UTF-8 is pandas' writer, of the whole table: the same files."""
    frame = _frame(60)
    fitted = _fit(cfg, frame)
    tail = rr.recluster_rows(frame, fitted.heads, scope_member_rows(fitted.results), fitted.xy)
    assert tail is not None
    assert _file_bytes(tmp_path, "blocks", tail.file(), "gb18030") == _file_bytes(
        tmp_path, "whole", tail.table(), "gb18030"
    )


def test_a_members_parts_bytes_follow_its_rows_not_its_chunks(tmp_path, monkeypatch):
    """The same rows in other Arrow chunks (a long text column's pages and its dictionary's
    fallback are bound by them): the same file."""
    monkeypatch.setattr(mp, "GROUP_ROWS", 10_000)
    n = 20_000
    values = [f"问题{i}" * (i % 60) if i % 7 else None for i in range(n)]
    text = pa.array(values, pa.large_string())
    chunked = pa.chunked_array([text.slice(a, 777) for a in range(0, n, 777)])
    one = pd.DataFrame({"problem": pd.arrays.ArrowExtensionArray(pa.chunked_array([text])), "n": np.arange(n)})
    many = one.assign(problem=pd.arrays.ArrowExtensionArray(chunked))
    assert pa.Table.from_pandas(many)["problem"].num_chunks > 1
    assert _file_bytes(tmp_path, "one", one) == _file_bytes(tmp_path, "many", many)


def _tail(cfg, n: int = 240) -> tuple[pd.DataFrame, rr.ReclusterRows]:
    frame = _frame(n)
    fitted = _fit(cfg, frame)
    tail = rr.recluster_rows(frame, fitted.heads, scope_member_rows(fitted.results), fitted.xy)
    assert tail is not None
    return frame, tail


def _one_part(out) -> pa.Table:
    (path,) = mb.members_dir(out).glob("part-*.parquet")
    return pq.read_table(path)


@pytest.mark.parametrize("group", [1, 7, 10**6])
def test_the_membership_part_written_a_group_at_a_time_is_the_whole_parts(cfg, tmp_path, monkeypatch, group):
    """A re-cluster's membership part made a row group at a time (`PartGroups`, no group past
    `membership.GROUP_ROWS` rows, the cross-type rows' map points straddling groups): the content, schema and
    pandas metadata included, of the whole part (`part_table`) and of the object form
    (`member_part_table(stored_members(...))`); the bytes the one rule gives the whole part
    (`append_part`); within one group, the bytes of the part written whole as before."""
    frame, tail = _tail(cfg)
    whole = _part_table(tail)
    want = member_part_table(stored_members(tail.stored(), frame))
    assert whole is not None and whole.equals(want) and whole.schema.metadata == want.schema.metadata
    monkeypatch.setattr(mb, "GROUP_ROWS", group)
    made = rr.part_groups(tail)
    assert made is not None and len(made) == whole.num_rows
    sizes: list[int] = []
    real = rr.PartGroups.group
    monkeypatch.setattr(rr.PartGroups, "group", lambda self, a, b: sizes.append(b - a) or real(self, a, b))
    mb.append_groups(tmp_path / "groups", made.schema, len(made), made.group)
    n = whole.num_rows
    assert max(sizes) <= group and sum(sizes) == n
    got = _one_part(tmp_path / "groups")
    assert got.equals(whole) and got.schema.equals(whole.schema, check_metadata=True)
    (path,) = mb.members_dir(tmp_path / "groups").glob("part-*.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-n // group)
    mb.append_part(tmp_path / "whole", whole)
    (whole_path,) = mb.members_dir(tmp_path / "whole").glob("part-*.parquet")
    assert path.read_bytes() == whole_path.read_bytes()
    atomic_write_parquet(tmp_path / "old.parquet", whole)  # how every part was written before
    assert (path.read_bytes() == (tmp_path / "old.parquet").read_bytes()) == (group >= n)


def test_a_value_that_is_not_text_in_a_late_group_leaves_the_part_to_the_pandas_rows(cfg, tmp_path, monkeypatch):
    """Cluster ids that are not text, the first after a few row groups of noise (found after
    those groups are written): no part is left of them, and the re-cluster's state writes the
    part of the pandas rows (`stored_members`), as when the whole part could not be built in
    Arrow."""
    from types import SimpleNamespace

    import pipeline.insights.export as ex

    frame, tail = _tail(cfg)
    ids = pd.Series([None] * 30 + list(range(len(tail.heads) - 30)), dtype=object)
    tail.heads = tail.heads.assign(cluster_id=ids)
    assert _part_table(tail) is None
    monkeypatch.setattr(mb, "GROUP_ROWS", 7)
    made = rr.part_groups(tail)
    assert made is not None
    with pytest.raises(rr.NotText):
        mb.append_groups(tmp_path / "bad", made.schema, len(made), made.group)
    assert not list(mb.members_dir(tmp_path / "bad").iterdir())  # not even the temporary file
    clustering = SimpleNamespace(clusters=pd.DataFrame({"cluster_id": ["a"]}), state=ClusterState.empty(), members=None)
    rc = SimpleNamespace(tail=tail, clustering=clustering, projections={})
    out = tmp_path / "out"
    ex._save_recluster(out, rc, frame, {}, "2025-11-21", "hashing")  # type: ignore[arg-type]
    assert mb.load_meta(out)["members_from"] == 1
    want = member_part_table(stored_members(tail.stored(), frame))
    got = _one_part(out)
    assert got.equals(want) and got.schema.equals(want.schema, check_metadata=True)
    assert got.schema.field("cluster_id").type == pa.int64()


def test_take_by_windows_is_iloc_with_the_same_order_index_and_dtypes():
    """The windowed take gives exactly `frame.iloc[rows]`: rows in the order asked (repeats
    too), the frame's index labels, every column's dtype (Arrow text, object, float, bool,
    categorical), with and without windows."""
    rng = np.random.default_rng(1)
    n = 5_000
    frame = pd.DataFrame(
        {
            "text": pd.Series([f"问题{i}" if i % 7 else None for i in range(n)], dtype=pd.StringDtype("pyarrow")),
            "obj": pd.Series([i if i % 3 else None for i in range(n)], dtype=object),
            "score": rng.normal(size=n),
            "flag": rng.random(n) < 0.5,
            "kind": pd.Categorical(rng.choice(["a", "b", "c"], n)),
        },
        index=pd.RangeIndex(n) * 3 + 11,
    )
    for rows in (rng.integers(0, n, 3_000), np.arange(40, 90), np.array([n - 1, 0, n - 1, 5]), np.zeros(0, int)):
        for window in (1, 64, 1_000, n * 2):
            pd.testing.assert_frame_equal(rr.take_by_windows(frame, rows, window), frame.iloc[rows])


def test_take_by_windows_keeps_only_a_window_of_the_mapped_copy_resident(tmp_path, monkeypatch):
    """A per-type block of member rows picks cases across the whole history: inside the
    export's `dropping_mapped_pages` the windowed take holds at most about a window's pages of
    the mapped case copy resident at any time, where one take held every page it touched."""
    import pyarrow.feather as feather
    import pytest

    from pipeline.heap import dropping_mapped_pages, release_mapped_pages
    from tests.test_heap import _linux_maps, _mapped_rss_kib

    if not _linux_maps():
        pytest.skip("needs /proc/self/smaps, madvise and glibc (Linux)")
    folder = tmp_path / "export-cases"
    folder.mkdir()
    n = 200_000
    path = folder / "problem.arrow"
    feather.write_feather(pa.table({"problem": [f"{i:08d}" * 16 for i in range(n)]}), path, compression="uncompressed")
    frame = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all().to_pandas(types_mapper=pd.ArrowDtype)
    frame["problem"] = frame["problem"].astype(pd.StringDtype("pyarrow"))
    rows = np.random.default_rng(0).choice(n, 20_000, replace=False)  # across the whole column
    size_kib = path.stat().st_size // 1024
    resident: list[int] = []  # the copy's resident KiB at each drop, before it

    def measured() -> None:
        resident.append(_mapped_rss_kib(path))
        release_mapped_pages()

    monkeypatch.setattr(rr, "release_mapped_pages", measured)
    with dropping_mapped_pages(folder):
        release_mapped_pages()
        once = frame.iloc[rows]
        touched = _mapped_rss_kib(path)
        release_mapped_pages()
        windowed = rr.take_by_windows(frame, rows, window=2_048)
        left = _mapped_rss_kib(path)
    assert touched > size_kib * 0.8  # one take touched nearly every page
    # A window's pages at a time (a fault maps a whole folio of the page cache, up to 2 MiB).
    assert len(resident) >= n // 2_048 and max(resident) < size_kib * 0.3
    assert left < size_kib * 0.1
    pd.testing.assert_frame_equal(windowed, once)
