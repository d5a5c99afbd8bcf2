"""`casemine eval cases`: mined case fields against conversation labels and human summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.evaluate.cases import (LabelFileError, half_of, handling_reference, load_labels, naive_cuts,
                                     problem_reference, rouge_l_f)

CHATS = [
    {"conversation_id": "T-1", "turns": [
        {"speaker": "customer", "text": "你好"},
        {"speaker": "customer", "text": "我要退款，这个订单不想要了"},
        {"speaker": "agent", "text": "您好，很高兴为您服务。已为您提交退款申请，三到五个工作日原路退回"},
        {"speaker": "customer", "text": "好的谢谢"}]},
    {"conversation_id": "T-2", "turns": [
        {"speaker": "customer", "text": "洗衣机装好就漏水了"},
        {"speaker": "agent", "text": "非常抱歉，这边为您升级给售后专员处理，专员会在24小时内给您回电"},
        {"speaker": "customer", "text": "嗯"}]},
    {"conversation_id": "T-3", "turns": [
        {"speaker": "customer", "text": "能不能把收货地址改到外地"},
        {"speaker": "agent", "text": "亲，订单已经出库了，暂时无法修改地址"},
        {"speaker": "customer", "text": "好吧"}]},
    # two matters: the labels are compared with the first case (segment 0) only
    {"conversation_id": "T-4", "turns": [
        {"speaker": "customer", "text": "我买的洗衣机漏水了"},
        {"speaker": "agent", "text": "已为您登记维修工单，师傅明天上门"},
        {"speaker": "customer", "text": "另外还有一个问题，我想开增值税发票"},
        {"speaker": "agent", "text": "这个无法开具增值税发票"},
        {"speaker": "customer", "text": "好吧"}]},
]
LABELS = [
    {"conversation_id": "T-1", "issue_type": "退换货/退款", "request_kind": "咨询", "outcome": "resolved"},
    {"conversation_id": "T-2", "issue_type": "质量问题", "request_kind": "投诉", "outcome": "escalated"},
    {"conversation_id": "T-3", "issue_type": "物流配送", "request_kind": "咨询", "outcome": "unresolved"},
    {"conversation_id": "T-4", "issue_type": "售后维修", "request_kind": "咨询", "outcome": "escalated"},
    {"conversation_id": "T-unknown", "outcome": "resolved"},
]
SUMMARIES = [
    {"conversation_id": "T-1", "user_summary": "用户要求退款。", "summary": "用户要求退款。客服已提交退款申请，三到五个工作日原路退回。"},
    {"conversation_id": "T-3", "user_summary": "用户询问能否修改收货地址到外地。",
     "summary": "用户询问能否修改收货地址到外地。客服表示订单已出库，无法修改地址。"},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def data(tmp_path):
    (tmp_path / "in").mkdir()
    _jsonl(tmp_path / "in" / "chats.jsonl", [{"channel": "chat", **c} for c in CHATS])
    return {"transcripts": tmp_path / "in", "labels": _jsonl(tmp_path / "labels.jsonl", LABELS),
            "summaries": _jsonl(tmp_path / "summaries.jsonl", SUMMARIES), "root": tmp_path}


@pytest.fixture()
def cli():
    from pipeline.cli import _register, app

    _register()
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(map(str, args)))


def test_eval_cases_json_reports_fields_beside_baselines(cli, data):
    res = cli("eval", "cases", "--transcripts", data["transcripts"], "--labels", data["labels"],
              "--summaries", data["summaries"], "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["counts"]["conversations"] == 4 and report["split_conversations"] == 1
    assert "segment 0" in report["note"]
    lab = report["labels"]
    assert (lab["rows"], lab["matched"]) == (5, 4)
    outcome = lab["fields"]["outcome"]
    assert outcome["n"] == 4 and outcome["pipeline"]["accuracy"] == 1.0
    assert outcome["baseline"]["name"] == "always escalated" and outcome["baseline"]["accuracy"] == 0.5
    assert set(outcome["pipeline"]["per_class"]) == {"resolved", "escalated", "unresolved"}
    assert outcome["pipeline"]["confusion"]["labels"] and outcome["pipeline"]["macro_f1"] == 1.0
    for field in ("issue_type", "request_kind"):  # whatever the pipeline's classifier assigns
        assert lab["fields"][field]["n"] == 4 and 0 <= lab["fields"][field]["pipeline"]["accuracy"] <= 1
    summ = report["summaries"]["fields"]
    assert summ["problem"]["n"] == 2 and summ["handling"]["n"] == 2
    assert set(summ["problem"]["rouge_l_f"]) == {"mined", "all_customer_turns", "first_three_customer_turns"}
    assert set(summ["handling"]["rouge_l_f"]) == {"mined", "all_agent_turns"}
    assert summ["problem"]["rouge_l_f"]["mined"] > summ["problem"]["rouge_l_f"]["all_customer_turns"]
    assert summ["handling"]["rouge_l_f"]["mined"] > summ["handling"]["rouge_l_f"]["all_agent_turns"]


def test_eval_cases_table_and_csv_labels(cli, data):
    csv = data["root"] / "labels.csv"
    csv.write_text("conversation_id,outcome\nT-1,resolved\nT-2,escalated\nT-3,resolved\n", encoding="utf-8")
    res = cli("eval", "cases", "--transcripts", data["transcripts"], "--labels", csv)
    assert res.exit_code == 0, res.output
    assert "outcome (n=3): pipeline accuracy 0.667" in res.stdout and "baseline always resolved" in res.stdout
    assert "confusion (rows true, columns predicted)" in res.stdout


def test_eval_cases_half_keeps_one_side_of_the_split(cli, data):
    res = cli("eval", "cases", "--transcripts", data["transcripts"], "--labels", data["labels"], "--half", "a", "--json")
    assert res.exit_code == 0, res.output
    want = sum(half_of(r["conversation_id"]) == "a" for r in LABELS)
    assert json.loads(res.stdout)["labels"]["rows"] == want


@pytest.mark.parametrize("content, suffix, message", [
    ('{"conversation_id": "T-1", "outcome": "resolved"}\nnot json\n', ".jsonl", "line 2 is not valid JSON"),
    ('{"id": "T-1", "outcome": "resolved"}\n', ".jsonl", "no conversation_id"),
    ('{"conversation_id": "T-1", "label": "x"}\n', ".jsonl", "none of the fields"),
    ("", ".jsonl", "holds no rows"),
    ("conversation_id\tx\n", ".tsv", "use JSONL"),
])
def test_unusable_label_files_exit_2_with_one_line(cli, data, content, suffix, message):
    bad = data["root"] / f"bad{suffix}"
    bad.write_text(content, encoding="utf-8")
    res = cli("eval", "cases", "--transcripts", data["transcripts"], "--labels", bad)
    assert res.exit_code == 2 and message in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_missing_inputs_and_usage(cli, data):
    res = cli("eval", "cases", "--transcripts", data["transcripts"], "--labels", data["root"] / "nope.jsonl")
    assert res.exit_code == 2 and "does not exist" in res.output
    assert cli("eval", "cases", "--transcripts", data["transcripts"]).exit_code == 2
    res = cli("eval", "cases", "--transcripts", data["root"] / "missing", "--labels", data["labels"])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_rouge_ignores_punctuation_and_the_summary_narrator():
    assert rouge_l_f("能退款吗？", "能退款吗") == 1.0
    assert rouge_l_f("", "x") == 0.0 and rouge_l_f("abc", "xyz") == 0.0
    assert problem_reference("用户询问能否退款。用户表示不满。") == "询问能否退款。表示不满。"
    assert handling_reference("用户询问能否退款。客服表示可以。用户表示感谢。客服已提交。") == "客服表示可以。客服已提交。"


def test_naive_cuts():
    turns = [{"speaker": s, "text": t} for s, t in
             [("customer", "a"), ("agent", "x"), ("customer", "b"), ("customer", "c"), ("customer", "d")]]
    cuts = naive_cuts(turns)
    assert cuts == {"all_customer_turns": "a b c d", "first_three_customer_turns": "a b c", "all_agent_turns": "x"}


def test_load_labels_reads_csv_and_skips_rows_without_id(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("conversation_id,outcome,issue_type\nA,resolved,发票\n,resolved,发票\nB,,物流配送\n", encoding="utf-8")
    assert load_labels(p) == {"A": {"outcome": "resolved", "issue_type": "发票"}, "B": {"issue_type": "物流配送"}}
    with pytest.raises(LabelFileError):
        load_labels(tmp_path / "none.csv")


@pytest.mark.shared
def test_eval_cases_on_real_chats_halves(shared_data, cfg):
    """Both halves of the fixed split, as the report quotes them (skipped without ../shared/data)."""
    from pipeline.evaluate.cases import evaluate_cases

    for half in ("a", "b"):
        rep = evaluate_cases(cfg, shared_data / "jddc", labels=shared_data / "jddc-labels" / "dev.jsonl", half=half)
        outcome = rep["labels"]["fields"]["outcome"]
        assert outcome["pipeline"]["accuracy"] >= 0.80 > outcome["baseline"]["accuracy"] - 0.05
