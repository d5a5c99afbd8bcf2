"""The case table has one typed schema: every stored part matches it, the README's reads work,
parts written before it still read (upgraded), and the steps declare exactly its columns."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.schema import CASE_SCHEMA, PART_SCHEMA
from pipeline.storage.store import UnknownColumnError, case_table, read_case, read_cases, stored_parts

# The columns that were JSON strings before the schema typed them.
JSON_BEFORE = ("emotion_curve", "emotion_curve_turns", "emotion_labels", "turning_points", "emotion_turn_detail")
CLASSIFY = ("issue_type", "issue_type_confidence", "request_kind", "urgency", "urgency_confidence",
            "urgency_due_hours", "needs_review", "evidence", "classifier")


@pytest.fixture(scope="module")
def run_out(sample, cfg, tmp_path_factory):
    """The flow on the generated sample (a model-free embedder: the index is not what is tested)."""
    from _pytest.monkeypatch import MonkeyPatch

    from pipeline.embed import Embedder
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.orchestrate.nightly import run_pipeline

    mp = MonkeyPatch()
    fake = HashingEmbedder()
    mp.setattr(Embedder, "_load", lambda self: None)
    mp.setattr(Embedder, "_encode_raw", lambda self, texts, kind: fake.encode(texts))
    mp.setattr(Embedder, "encode_queries", lambda self, texts: fake.encode(list(texts)))
    out = tmp_path_factory.mktemp("schema") / "out"
    try:
        summary = run_pipeline(cfg, sample[0], out)
    finally:
        mp.undo()
    return out, summary


def test_every_stored_part_has_the_case_schema(run_out):
    out, summary = run_out
    parts = stored_parts(out)
    assert parts and summary["cases"]["written"] > 100
    assert PART_SCHEMA.names == [c for c in CASE_SCHEMA.names if c != "date"]
    for p in parts:
        schema = pq.read_schema(p)
        assert schema.names == PART_SCHEMA.names, p
        # Arrow type equality (Parquet names a list's item `element`, Arrow `item`: same type).
        assert [f.name for f, want in zip(schema, PART_SCHEMA) if not f.type.equals(want.type)] == [], p
        assert schema.equals(PART_SCHEMA), p


def test_the_readme_reads_give_typed_columns(run_out):
    import duckdb

    out, summary = run_out
    n = summary["cases"]["written"]
    cases = out / "processed" / "cases"
    df = pd.read_parquet(cases)
    assert len(df) == n and df["date"].notna().all()
    assert set(CASE_SCHEMA.names) <= set(df.columns)
    spoke = df[df["n_customer_turns"] > 0].iloc[0]
    assert not isinstance(spoke["emotion_curve"], str) and len(spoke["emotion_curve"]) == spoke["n_customer_turns"]
    assert all(isinstance(x, float) for x in spoke["emotion_curve"])
    assert isinstance(spoke["turning_points"], dict) and spoke["turning_points"]["lowest"] is not None
    assert isinstance(spoke["emotion_turn_detail"][0]["evidence"], (list, type(spoke["emotion_curve"])))
    con = duckdb.connect()
    by_outcome = con.execute(f"SELECT outcome, count(*) FROM read_parquet('{cases}/*/*.parquet', "
                             "hive_partitioning=true) GROUP BY 1").fetchall()
    assert sum(c for _, c in by_outcome) == n
    curve_type = con.execute(f"SELECT typeof(emotion_curve) FROM read_parquet('{cases}/*/*.parquet', "
                             "hive_partitioning=true) LIMIT 1").fetchone()[0]
    assert curve_type == "DOUBLE[]"


def _old_style(table: pa.Table) -> pa.Table:
    """A part as the store wrote it before the schema: curves and structs as JSON strings, no
    classification columns (written before that step existed), emotion_min_turn as int64."""
    rows = table.to_pylist()
    cols = {}
    for name in table.column_names:
        if name in CLASSIFY:
            continue
        values = [r[name] for r in rows]
        if name in JSON_BEFORE:
            if name == "turning_points":  # the JSON had no key where the struct has a null
                values = [{k: v for k, v in (x or {}).items() if v is not None} for x in values]
            cols[name] = pa.array([json.dumps(v, ensure_ascii=False) for v in values], pa.string())
        elif name == "emotion_min_turn":
            cols[name] = pa.array(values, pa.int64())
        else:
            cols[name] = table.column(name)
    return pa.table(cols)


def test_old_parts_read_back_upgraded(run_out, tmp_path):
    out, _ = run_out
    old = tmp_path / "old"
    shutil.copytree(out / "processed", old / "processed")
    rewritten = stored_parts(old)[: max(1, len(stored_parts(old)) // 2)]  # old and new parts side by side
    for p in rewritten:
        pq.write_table(_old_style(pq.read_table(p)), p)
    assert pq.read_schema(rewritten[0]).field("emotion_curve").type == pa.string()

    new_df = read_cases(out).sort_values("case_id").reset_index(drop=True)
    old_df = read_cases(old).sort_values("case_id").reset_index(drop=True)
    assert list(old_df.columns) == list(new_df.columns) == CASE_SCHEMA.names
    assert len(old_df) == len(new_df)
    upgraded = set(pd.concat([pq.read_table(p, columns=["case_id"]).to_pandas() for p in rewritten])["case_id"])
    mask = old_df["case_id"].isin(upgraded)
    assert mask.any() and (~mask).any()
    assert old_df.loc[mask, "issue_type"].isna().all()  # missing columns come back null
    assert old_df.loc[~mask, "issue_type"].notna().all()
    for c in (*JSON_BEFORE, "emotion_min_turn", "problem", "tokens", "turns"):
        a = old_df[c].map(_plain).tolist()
        b = new_df[c].map(_plain).tolist()
        assert a == b, c
    for df in (old_df, new_df):  # structs read as the dicts written: turn indexes stay ints
        rises = [tp["biggest_rise"] for tp in df["turning_points"] if tp and tp["biggest_rise"]]
        assert rises and all(type(r["turn"]) is int and type(r["from_turn"]) is int for r in rises)
    cid = next(iter(upgraded))
    row = read_case(old, cid)
    assert row is not None and isinstance(row["emotion_curve"], list) and isinstance(row["turning_points"], dict)


def _plain(v):
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def test_the_steps_declare_exactly_the_schema_columns():
    from pipeline.analysis.classify.api import OUTPUT_COLUMNS
    from pipeline.analysis.emotion import CASE_EMOTION_COLUMNS, EMOTION_COLUMNS
    from pipeline.orchestrate.steps import BATCH_STEPS, check_declared_columns

    declared = [c for s in BATCH_STEPS for c in s.columns]
    assert sorted(declared) == sorted(CASE_SCHEMA.names) and len(declared) == len(set(declared))
    by_step = {s.name: s.columns for s in BATCH_STEPS}
    assert by_step["emotion"] == CASE_EMOTION_COLUMNS + EMOTION_COLUMNS
    assert by_step["classify"] == OUTPUT_COLUMNS
    broken = [*BATCH_STEPS[:-1], type(BATCH_STEPS[-1])("classify", (), (), BATCH_STEPS[-1].run, "", ("evidence",))]
    with pytest.raises(RuntimeError, match="declared by no step"):
        check_declared_columns(broken)


def test_the_store_null_fills_missing_columns_and_refuses_unknown_ones():
    df = pd.DataFrame({"case_id": ["a-0"], "problem": ["快递没到"], "emotion_curve": [[-0.5, 0.2]], "date": ["2025-01-01"]})
    t = case_table(df)
    assert t.schema == PART_SCHEMA
    assert t.column("emotion_curve").to_pylist() == [[-0.5, 0.2]] and t.column("issue_type").null_count == 1
    with pytest.raises(UnknownColumnError, match="'sentiment_score'"):
        case_table(df.assign(sentiment_score=[0.1]))


def test_compare_script_finds_a_changed_value(run_out, tmp_path):
    from bench.compare_case_tables import compare

    out, _ = run_out
    ok, lines = compare(out, out, [])
    assert ok, lines
    other = tmp_path / "other"
    shutil.copytree(out / "processed", other / "processed")
    p = stored_parts(other)[0]
    t = pq.read_table(p)
    pq.write_table(t.set_column(t.schema.get_field_index("problem"), "problem",
                                pa.array(["改过"] * len(t), pa.string())), p)
    ok, lines = compare(out, other, [])
    assert not ok and any(line.startswith("DIFFERS  problem") for line in lines)
