"""The export's memory savings change nothing it computes.

The nightly export reads every stored case; to keep its memory from growing with big free text it
nulls customer_text and metadata_json where no step reads them (`shrink_case_part`), drops the
free text once the cluster text is built (`drop_texts`), shrinks each stored part as it is read
(`read_cases`) and streams its CSVs to disk (`write_table`). Each test compares with
the plain form on awkward values: blank problems made of the whitespace Python strips (ideographic
space, U+001C, U+0085), missing issue types, metadata with and without a team key."""

from __future__ import annotations

import codecs
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.insights.cluster import select_cases
from pipeline.insights.emotion_stats import case_teams
from pipeline.insights.export import drop_texts, shrink_case_part, to_csv_frame, write_table
from pipeline.storage.store import read_cases, write_cases

BLANKS = ["", " ", "\u3000", "\x1c\x1d", "\u0085 ", "\t\n", "\u2028", "\xa0"]
WORDED = ["快递没到", " 退款 ", "<PHONE>", "a", "\u3000发票", "\u200b"]  # U+200B: not stripped


def _cases(n: int = 80, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    problems = BLANKS + WORDED + [None]
    metas = [
        None,
        "",
        "not json but team",
        json.dumps({"team": "售后二组"}, ensure_ascii=False),
        json.dumps({"skill_group": 7}),
        json.dumps({"order_id": "JD1", "region": "东北"}, ensure_ascii=False),
        json.dumps({"agent_team": ""}),
    ]
    return pd.DataFrame(
        {
            "case_id": [f"C{i:04d}" for i in range(n)],
            "problem": [problems[int(k)] for k in rng.integers(0, len(problems), n)],
            "customer_text": [f"顾客说了第{i}件事，很长的一段话" if i % 5 else None for i in range(n)],
            "metadata_json": [metas[int(k)] for k in rng.integers(0, len(metas), n)],
            "agent_id": [f"A{int(k)}" if k else None for k in rng.integers(0, 4, n)],
            "issue_type": [None if k == 0 else f"类型{int(k)}" for k in rng.integers(0, 4, n)],
        }
    )


def _shrunk(df: pd.DataFrame) -> pd.DataFrame:
    return shrink_case_part(pa.Table.from_pandas(df, preserve_index=False)).to_pandas()


def test_shrink_keeps_every_value_a_step_reads():
    df = _cases()
    small = _shrunk(df)
    assert small["customer_text"].notna().sum() < df["customer_text"].notna().sum()
    assert small["metadata_json"].notna().sum() < df["metadata_json"].notna().sum()
    # The cluster texts and the selection, the teams: the same from the shrunk part.
    for min_chars in (1, 4):
        a, b = select_cases(df, min_chars), select_cases(small, min_chars)
        assert a["case_id"].tolist() == b["case_id"].tolist()
        assert a["cluster_text"].tolist() == b["cluster_text"].tolist()
    assert case_teams(df) == case_teams(small)
    # The classifier reads both texts of a case without an issue type: kept whole.
    todo = df["issue_type"].isna()
    for col in ("customer_text", "metadata_json"):
        assert small.loc[todo, col].equals(df.loc[todo, col])


def test_shrink_keeps_customer_text_of_every_blank_problem():
    df = pd.DataFrame(
        {
            "problem": [*BLANKS, *WORDED, None],
            "customer_text": ["原话"] * (len(BLANKS) + len(WORDED) + 1),
            "issue_type": ["类型"] * (len(BLANKS) + len(WORDED) + 1),
        }
    )
    small = _shrunk(df)
    blank = [not (p if isinstance(p, str) else "").strip() for p in df["problem"].tolist()]
    assert small["customer_text"].notna().tolist() == blank


def test_shrunk_columns_hold_only_the_kept_text():
    n = 400
    df = pd.DataFrame(
        {
            "problem": ["" if i % 10 == 0 else "快递没到" for i in range(n)],
            "customer_text": ["顾客说了很长的一段话" * 20] * n,
            "metadata_json": ['{"team": "一组"}' if i % 10 == 0 else '{"order_id": "JD1"}' for i in range(n)],
            "issue_type": ["类型"] * n,
        }
    )
    t = pa.Table.from_pandas(df, preserve_index=False)
    small = shrink_case_part(t)
    for col in ("customer_text", "metadata_json"):
        kept = sum(len(v.encode()) for v in small[col].to_pylist() if v is not None)
        assert small[col].null_count == n - n // 10
        assert small[col].nbytes <= kept + 8 * (n + 1) + n // 8 + 1  # values, offsets, validity


def test_drop_texts_leaves_the_columns_later_steps_read():
    df = _cases()
    frame = select_cases(df, 1)
    cases, slim = drop_texts(df, frame)
    assert "metadata_json" in cases and "problem" not in cases and "customer_text" not in cases
    assert not {"problem", "customer_text", "metadata_json"} & set(slim.columns)
    assert slim["cluster_text"].tolist() == frame["cluster_text"].tolist()


def test_read_cases_shrinks_each_part_and_keeps_the_newest_row(tmp_path):
    base = pd.DataFrame(
        {
            "case_id": ["a", "b", "c"],
            "conversation_id": ["ca", "cb", "cc"],
            "date": ["2025-11-01", "2025-11-02", "2025-11-01"],
            "problem": ["", "二", "三"],
            "customer_text": ["原话一", "原话二", "原话三"],
            "issue_type": ["物流", "物流", "退款"],
        }
    )
    write_cases(tmp_path, base, "20251101T000000-r1", 0)
    again = base.iloc[[1, 2]].assign(problem=["二改", " "], date=["2025-11-03", "2025-11-01"])
    write_cases(tmp_path, again, "20251102T000000-r2", 0)
    cols = ["case_id", "problem", "customer_text", "issue_type", "run_id", "date"]
    got = read_cases(tmp_path, columns=cols, shrink=shrink_case_part)
    plain = read_cases(tmp_path, columns=cols)
    assert got["case_id"].tolist() == plain["case_id"].tolist() == ["a", "c", "b"]
    assert got["problem"].tolist() == plain["problem"].tolist() == ["", " ", "二改"]
    # Blank problems keep the customer's words (the cluster text falls back on them), others not.
    assert got["customer_text"].tolist()[:2] == ["原话一", "原话三"]
    assert pd.isna(got["customer_text"].iloc[2])
    assert select_cases(got, 1)["cluster_text"].tolist() == select_cases(plain, 1)["cluster_text"].tolist()


@pytest.mark.parametrize("encoding", ["utf-8-sig", "gb18030"])
def test_streamed_csv_is_the_text_it_replaced(tmp_path, encoding):
    df = pd.DataFrame(
        {
            "label": ["快递、物流", "退款", None, 'a,b\n"c"'],
            "terms": [["快递", "物流"], [], None, ["x"]],
            "n": [1, 2, 3, 4],
            "share": [0.5, None, 1 / 3, 0.0],
        }
    )
    write_table(tmp_path, "t", df, encoding)
    raw = (tmp_path / "t.csv").read_bytes()
    plain = to_csv_frame(df).to_csv(index=False).encode(encoding)
    if encoding == "gb18030":
        assert raw == plain  # Arrow writes UTF-8 only: other encodings keep pandas' text
        return
    # Arrow's writer: same values in another form (strings quoted, 0.0 as 0), BOM first for Excel.
    assert raw.startswith(codecs.BOM_UTF8) and raw != plain
    got = pd.read_csv(io.BytesIO(raw), encoding=encoding)
    want = pd.read_csv(io.BytesIO(plain), encoding=encoding)
    pd.testing.assert_frame_equal(got, want)
    assert got["label"].tolist()[3] == 'a,b\n"c"' and got["terms"].tolist()[0] == '["快递", "物流"]'


def test_csv_of_one_column_keeps_its_missing_rows(tmp_path):
    """Arrow writes a missing value of a one-column table as an empty line, which readers skip:
    such a table goes through pandas, which writes it as \"\"."""
    df = pd.DataFrame({"only": ["a", None, "b"]})
    write_table(tmp_path, "t", df, "utf-8-sig")
    assert len(pd.read_csv(tmp_path / "t.csv", encoding="utf-8-sig")) == 3
