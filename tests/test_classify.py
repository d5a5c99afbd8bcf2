"""Issue type / urgency classification: rules, abstention, model round trip, model card,
taxonomy refusal, labelled-data validation, CLI output, review queue."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.analysis.classify import (OUTPUT_COLUMNS, LabeledDataError, ModelMismatchError, classify_cases, classify_texts,
                               load_labeled, load_model, load_taxonomy, train)
from pipeline.analysis.classify.rules import KeywordRules, UrgencyScorer, elapsed_days
from pipeline.analysis.classify.taxonomy import parse_taxonomy
from pipeline.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]
URGENCY_RANK = {"一般": 0, "重要": 1, "紧急": 2}

# A small, clearly separable labelled set: enough for a round trip, not a quality claim.
TRAIN_ROWS = (
    [(t, "物流配送") for t in ["快递三天了还没到", "物流太慢了等了一周", "送餐员送得太晚了", "配送超时一个小时", "包裹一直没有派送",
                              "快递员把地址送错了", "发货太慢催了好几次", "外卖送了两个小时", "物流信息一直不更新", "快递丢件了没人管",
                              "送货速度太慢", "到货时间比说的晚很多"]]
    + [(t, "发票") for t in ["发票一直没有开", "开的发票抬头错了", "要求补开发票没人理", "发票税号写错了", "增值税发票开不出来",
                            "买了东西不给发票", "发票寄丢了要重开", "发票金额不对", "说好的发票没寄来", "电子发票下载不了",
                            "申请开票三次都失败", "发票类型开错了"]]
    + [(t, "质量问题") for t in ["质量太差用两天就坏了", "屏幕有坏点", "衣服起球严重", "味道很难吃", "电池不耐用充不进电",
                              "做工粗糙有异味", "开机就死机", "鞋子开胶了", "菜不新鲜有馊味", "耳机没声音", "书的印刷模糊",
                              "房间很脏有霉味"]]
)


def _cfg(base: Config, tmp: Path, **classify: object) -> Config:
    return base.with_overrides(classify={"model_dir": str(tmp / "model"), **classify})


@pytest.fixture(scope="module")
def labels_csv(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("labels") / "train.csv"
    pd.DataFrame(TRAIN_ROWS, columns=["text", "label"]).to_csv(p, index=False)
    return p


@pytest.fixture(scope="module")
def trained(cfg, labels_csv, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    c = _cfg(cfg, tmp)
    model, card = train(c, labels_csv)
    return c, model, card


def _cases(texts: list[str], **cols: list) -> pd.DataFrame:
    df = pd.DataFrame({"problem": texts, "customer_text": texts})
    for k, v in cols.items():
        df[k] = v
    return df


# -- taxonomy ----------------------------------------------------------------------------------

def test_taxonomy_loads_default_types(cfg):
    tax = load_taxonomy(cfg)
    assert tax.labels == ["物流配送", "商品破损", "退换货/退款", "质量问题", "使用咨询/操作指导", "售后维修", "发票",
                          "支付/价格/优惠", "账户/会员", "服务态度", "售前咨询", "其他"]
    assert [lv.name for lv in tax.urgency.ordered_levels()] == ["紧急", "重要", "一般"]
    assert {lv.name: lv.due_hours for lv in tax.urgency.levels} == {"紧急": 24, "重要": 72, "一般": None}
    assert [k.name for k in tax.request_kinds.kinds] == ["咨询", "投诉", "建议"]


def test_taxonomy_bad_key_is_named():
    raw = yaml.safe_load((REPO / "configs" / "taxonomy.yaml").read_text(encoding="utf-8"))
    raw["issue_types"][2]["keyword"] = ["退"]  # misspelt
    with pytest.raises(ConfigError, match=r"issue_types\.2\.keyword: unknown key"):
        parse_taxonomy(raw, "t.yaml")
    raw = yaml.safe_load((REPO / "configs" / "taxonomy.yaml").read_text(encoding="utf-8"))
    raw["fallback"] = "不存在"
    with pytest.raises(ConfigError, match="fallback"):
        parse_taxonomy(raw, "t.yaml")
    raw = yaml.safe_load((REPO / "configs" / "taxonomy.yaml").read_text(encoding="utf-8"))
    del raw["urgency"]
    with pytest.raises(ConfigError, match="urgency: required key is missing"):
        parse_taxonomy(raw, "t.yaml")


# -- rules: issue type -------------------------------------------------------------------------

def test_keyword_rules_pick_type_with_evidence(cfg):
    rules = KeywordRules(load_taxonomy(cfg))
    label, conf, ev = rules.predict_one("发票一直没开")
    assert label == "发票" and conf > 0.5 and "发票" in ev["matched"]["发票"]
    # An exclusion phrase cancels the praise ("物流很快") so the real complaint wins.
    label, _, ev = rules.predict_one("物流很快，但是质量太差了")
    assert label == "质量问题" and "物流配送" not in ev["matched"]
    label, conf, _ = rules.predict_one("嗯嗯好的")
    assert label == "其他" and conf < 0.45


def test_jd_service_words_route_to_their_type(cfg):
    rules = KeywordRules(load_taxonomy(cfg))
    assert rules.predict_one("我的订单到哪了，今天能送到吗")[0] == "物流配送"
    # JD's 上门取件 is the pick-up of a return, not an after-sales visit.
    label, _, ev = rules.predict_one("帮我改成上门取件")
    assert label == "退换货/退款" and "售后维修" not in ev["matched"]
    # 客服 turns up in chats of every type: naming the agent is no complaint about attitude.
    assert "服务态度" not in rules.predict_one("客服你好，发票什么时候开")[2]["matched"]


def test_embed_text_drops_courtesy_only_segments():
    from pipeline.analysis.classify.coldstart import embed_text

    assert embed_text("你好 在吗 我的快递到哪了? 好的,谢谢 没有了", 128) == "我的快递到哪了"
    assert embed_text("[订单编号:<ORDER>,订单金额:<AMOUNT>] 嗯嗯 好的谢谢 没有了", 128) == ""
    assert embed_text("好的 发票抬头开错了", 5) == "发票抬头开"


def test_cold_start_courtesies_only_is_fallback_and_texts_embed_once(cfg):
    import numpy as np

    from pipeline.analysis.classify.coldstart import ColdStartIssueClassifier

    seen: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        seen.append(list(texts))
        # A toy encoder: one axis for delivery words, one for invoice words.
        vecs = np.array([[sum(t.count(w) for w in ("快递", "送", "到")) + 0.1,
                          sum(t.count(w) for w in ("发票", "开票", "抬头")) + 0.1, 0.3] for t in texts])
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)

    cold = ColdStartIssueClassifier(load_taxonomy(cfg), encode)
    res = cold.predict(["你好 在吗 好的 谢谢 没有了", "快递三天了还没到", "快递三天了还没到", "发票一直没开"])
    assert res.labels[0] == "其他" and res.confidence[0] <= 0.2
    assert res.labels[1:] == ["物流配送", "物流配送", "发票"]
    cases = seen[-1]  # the last call embeds the cases (earlier ones built the prototypes)
    assert sorted(cases) == sorted({"快递三天了还没到", "发票一直没开"})  # each text once, courtesies never


def test_rules_output_is_marked_as_rules(cfg, tmp_path):
    out = classify_cases(_cases(["快递丢件了"]), _cfg(cfg, tmp_path))
    assert out.loc[0, "classifier"] == "rules"
    ev = json.loads(out.loc[0, "evidence"])
    assert ev["issue_type"]["method"] == "rules" and "丢件" in ev["issue_type"]["matched"]["物流配送"]


# -- rules: urgency ----------------------------------------------------------------------------

def test_safety_is_urgent_and_negation_is_not(cfg, tmp_path):
    out = classify_cases(_cases(["充电器插上就冒烟了，差点起火", "用了很久没有冒烟也没有漏电，就是有点慢"]), _cfg(cfg, tmp_path))
    assert out.loc[0, "urgency"] == "紧急" and out.loc[0, "urgency_due_hours"] == 24
    signals = json.loads(out.loc[0, "evidence"])["urgency"]["signals"]
    assert any(s["signal"] == "safety" and "冒烟" in s["cues"] for s in signals)
    assert out.loc[1, "urgency"] == "一般" and out.loc[1, "urgency_due_hours"] is None


def test_12315_threat_is_urgent_from_text_or_case_column(cfg, tmp_path):
    c = _cfg(cfg, tmp_path)
    out = classify_cases(_cases(["再不给我处理我就投诉到12315", "东西不太好"], escalation_threats=[[], ["曝光"]]), c)
    assert out["urgency"].tolist() == ["紧急", "紧急"]
    assert out.loc[0, "request_kind"] == "投诉"


def test_repeat_contact_raises_urgency(cfg, tmp_path):
    c = _cfg(cfg, tmp_path)
    text = "上次说的退款还没到账"
    out = classify_cases(_cases([text, text], repeat_contact=[False, True]), c)
    assert URGENCY_RANK[out.loc[1, "urgency"]] > URGENCY_RANK[out.loc[0, "urgency"]]
    assert any(s["signal"] == "repeat_contact" for s in json.loads(out.loc[1, "evidence"])["urgency"]["signals"])


def test_elapsed_time_and_emotion_add_up(cfg, tmp_path):
    c = _cfg(cfg, tmp_path)
    assert elapsed_days("等了一个星期了还没发货")[0] == 7
    assert elapsed_days("三天了还没到")[0] == 3
    assert elapsed_days("用了一天就坏了")[0] == 0  # a duration of use, not waiting
    scorer = UrgencyScorer(load_taxonomy(c))
    calm = scorer.score_one("还没发货")
    waited = scorer.score_one("等了一个星期了还没发货")
    angry = scorer.score_one("等了一个星期了还没发货", emotion_score=-0.9, emotion_cues=["气死了", "太差"])
    assert calm.score < waited.score < angry.score
    assert URGENCY_RANK[angry.level] > URGENCY_RANK[calm.level]
    # Weights come from config: doubling one changes the score accordingly.
    heavy = UrgencyScorer(load_taxonomy(c), {"elapsed_max": 3.0, "elapsed_per_day": 0.5})
    assert heavy.score_one("等了一个星期了还没发货").score == pytest.approx(3.0)
    with pytest.raises(ValueError):
        UrgencyScorer(load_taxonomy(c), {"no_such_weight": 1.0})


def test_money_signals(cfg):
    scorer = UrgencyScorer(load_taxonomy(cfg))
    r = scorer.score_one("花了2999元买的电视，要求退款")
    names = {s["signal"] for s in r.signals}
    assert {"money", "large_amount", "refund"} <= names


# -- abstention --------------------------------------------------------------------------------

def test_low_confidence_needs_review_but_keeps_best_guess(cfg, tmp_path):
    texts = ["物流太慢，质量也一般，客服态度还差", "快递丢件了"]
    low = classify_cases(_cases(texts), _cfg(cfg, tmp_path, review_threshold=0.99))
    free = classify_cases(_cases(texts), _cfg(cfg, tmp_path, review_threshold=0.0))
    assert low["needs_review"].tolist() == [True, True]
    assert free["needs_review"].tolist() == [False, False]
    assert low["issue_type"].tolist() == free["issue_type"].tolist()
    assert "其他" not in low["issue_type"].tolist()
    assert "待人工" in json.loads(low.loc[0, "evidence"])["review"]


def test_output_columns_and_types(cfg, tmp_path):
    out = classify_cases(_cases(["快递丢件了", ""], customer_text=["快递丢件了", "发票没开"]), _cfg(cfg, tmp_path))
    for col in OUTPUT_COLUMNS:
        assert col in out.columns
    assert out.loc[1, "issue_type"] == "发票"  # empty problem falls back to customer_text
    assert out["needs_review"].dtype == bool and out["issue_type_confidence"].between(0, 1).all()
    empty = classify_cases(_cases([]), _cfg(cfg, tmp_path))
    assert list(empty.columns)[-len(OUTPUT_COLUMNS):] == list(OUTPUT_COLUMNS) and empty.empty
    with pytest.raises(ValueError, match="problem"):
        classify_cases(pd.DataFrame({"x": [1]}), _cfg(cfg, tmp_path))


# -- model: round trip, card, refusal ----------------------------------------------------------

def test_train_predict_round_trip(trained):
    c, _, card = trained
    out = classify_texts(["快递五天了还没送到", "发票抬头开错了要重开", "刚买的耳机就坏了没声音"], c)
    assert out["issue_type"].tolist() == ["物流配送", "发票", "质量问题"]
    assert (out["classifier"] == card["model_id"]).all()
    ev = json.loads(out.loc[1, "evidence"])["issue_type"]
    assert ev["method"] == "model" and ev["top_terms"] and all(t["weight"] > 0 for t in ev["top_terms"])
    assert any("发票" in t["term"] for t in ev["top_terms"])


def test_model_card_contents(trained, labels_csv):
    c, model, card = trained
    saved = json.loads((c.resolve(c.classify.model_dir) / "model_card.json").read_text(encoding="utf-8"))
    assert saved["model_id"] == card["model_id"]
    from pipeline.io import sha256_file

    td = saved["training_data"]
    assert td["rows"] == len(TRAIN_ROWS) and td["files"][0]["sha256"] == sha256_file(labels_csv)
    assert td["label_counts"] == {"物流配送": 12, "发票": 12, "质量问题": 12}
    assert saved["taxonomy"]["fingerprint"] == load_taxonomy(c).fingerprint()
    assert saved["chosen_variant"]["name"] in {x["name"] for x in saved["cv"]["candidates"]}
    chosen = next(x for x in saved["cv"]["candidates"] if x["name"] == saved["chosen_variant"]["name"])
    assert chosen["macro_f1"] == max(x["macro_f1"] for x in saved["cv"]["candidates"])
    assert saved["created_at"] and saved["config_sha256"] and saved["versions"]["sklearn"]
    assert set(saved["classes"]) == {"物流配送", "发票", "质量问题"}
    assert saved["chosen_variant"]["calibration"]["temperature"] > 0
    proba = model.predict_proba(["发票没开", "快递慢"])
    assert proba.shape == (2, 3) and abs(proba.sum(axis=1) - 1).max() < 1e-9


def test_model_for_other_taxonomy_is_refused(trained, tmp_path):
    c, _, _ = trained
    raw = yaml.safe_load(c.resolve(c.classify.taxonomy).read_text(encoding="utf-8"))
    raw["issue_types"].insert(0, {"name": "物流延误", "keywords": ["延误"]})
    tax = tmp_path / "taxonomy.yaml"
    tax.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    other = c.with_overrides(classify={"taxonomy": str(tax)})
    with pytest.raises(ModelMismatchError, match=r"物流延误.*casemine train"):
        load_model(other)
    # The nightly API keeps working on the rules instead of using a stale model.
    out = classify_cases(_cases(["快递丢件了"]), other)
    assert out.loc[0, "classifier"] == "rules"


def test_damaged_model_files_are_refused(trained, tmp_path):
    c, _, _ = trained
    copy = tmp_path / "model"
    shutil.copytree(c.resolve(c.classify.model_dir), copy)
    card = json.loads((copy / "model_card.json").read_text(encoding="utf-8"))
    card["model_id"] = "something-else"
    (copy / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelMismatchError, match="retrain"):
        load_model(c.with_overrides(classify={"model_dir": str(copy)}))


# -- labelled data validation ------------------------------------------------------------------

def test_labeled_data_errors(cfg, tmp_path):
    tax = load_taxonomy(cfg)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["快递慢"], "label": ["快递"]}).to_csv(bad, index=False)
    with pytest.raises(LabeledDataError, match=r"not in the taxonomy: \['快递'\]"):
        load_labeled(bad, tax)
    nocol = tmp_path / "nocol.csv"
    pd.DataFrame({"content": ["快递慢"], "label": ["物流配送"]}).to_csv(nocol, index=False)
    with pytest.raises(LabeledDataError, match="'text'"):
        load_labeled(nocol, tax)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(LabeledDataError, match="no labelled rows"):
        load_labeled(empty, tax)
    # Review-queue CSVs come back partly filled: empty labels are skipped, duplicates collapsed.
    part = tmp_path / "part.csv"
    pd.DataFrame({"text": ["快递慢", "发票没开", "快递慢", "屏幕坏"], "label": ["物流配送", "", "物流配送", "质量问题"]}).to_csv(part, index=False)
    data = load_labeled(part, tax)
    assert data.frame["text"].tolist() == ["快递慢", "屏幕坏"]
    assert data.skipped == {"empty_label": 1, "duplicate": 1}


# -- CLI ---------------------------------------------------------------------------------------

@pytest.fixture()
def cli(tmp_path):
    from pipeline.cli import _register, app

    _register()
    conf = tmp_path / "configs" / "casemine.yaml"
    conf.parent.mkdir()
    conf.write_text(yaml.safe_dump({
        "paths": {"out": str(tmp_path / "out")},
        "classify": {"taxonomy": str(REPO / "configs" / "taxonomy.yaml"), "model_dir": str(tmp_path / "model"),
                     "labeled_dir": str(tmp_path / "labeled")},
        "segment": {"user_dict": str(REPO / "configs" / "userdict.txt"), "stopwords": str(REPO / "configs" / "stopwords.txt")},
        "mask": {"surnames": str(REPO / "configs" / "surnames.txt")},
        "normalize": {"asr_corrections": str(REPO / "configs" / "asr_corrections.yaml")},
        "cases": {"lexicon": str(REPO / "configs" / "case_lexicon.yaml")},
    }, allow_unicode=True), encoding="utf-8")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [*args, "--config", str(conf)])


def test_cli_classify_json(cli, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "text": "手机充电冒烟了"}\n\n{"id": "b", "text": "快递丢件了"}\n', encoding="utf-8")
    res = cli("classify", str(inp), "--json")
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert [x["id"] for x in lines] == ["a", "b"]
    for x in lines:
        assert {"issue_type", "issue_type_confidence", "urgency", "urgency_confidence", "request_kind", "needs_review",
                "evidence"} <= set(x)
        assert isinstance(x["evidence"], dict) and isinstance(x["needs_review"], bool)
    assert lines[0]["urgency"] == "紧急" and lines[1]["issue_type"] == "物流配送"


def test_cli_classify_csv_and_bad_input(cli, tmp_path):
    good = tmp_path / "in.csv"
    pd.DataFrame({"text": ["发票没开"]}).to_csv(good, index=False)
    res = cli("classify", str(good), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["issue_type"] == "发票"
    nocol = tmp_path / "nocol.csv"
    pd.DataFrame({"content": ["发票没开"]}).to_csv(nocol, index=False)
    res = cli("classify", str(nocol))
    assert res.exit_code == 1 and "no 'text' column" in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert cli("classify", str(empty)).exit_code == 1
    assert cli("classify", str(tmp_path / "missing.jsonl")).exit_code == 1
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    res = cli("classify", str(broken))
    assert res.exit_code == 1 and "line 2" in res.output


def test_cli_classify_transcripts(cli, tmp_path):
    conv = {"conversation_id": "t1", "channel": "chat", "started_at": None, "metadata": {"repeat_consultation": True},
            "turns": [{"speaker": "customer", "text": "我上周买的热水器漏电了，手一碰就电到"},
                      {"speaker": "agent", "text": "非常抱歉，马上为您安排师傅上门检测"}]}
    inp = tmp_path / "chats.jsonl"
    inp.write_text(json.dumps(conv, ensure_ascii=False) + "\n", encoding="utf-8")
    res = cli("classify", str(inp), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.splitlines()[0])
    assert out["case_id"] and out["urgency"] == "紧急"
    signals = {s["signal"] for s in out["evidence"]["urgency"]["signals"]}
    assert {"safety", "repeat_contact"} <= signals


def test_cli_train_then_classify_uses_model(cli, tmp_path, labels_csv):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["快递慢", "发票"], "label": ["快递", "发票"]}).to_csv(bad, index=False)
    res = cli("train", "--labels", str(bad))
    assert res.exit_code == 1 and "快递" in res.output and not (tmp_path / "model").exists()
    res = cli("train", "--labels", str(labels_csv), "--json")
    assert res.exit_code == 0, res.output
    card = json.loads(res.stdout)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "发票抬头开错了"}\n', encoding="utf-8")
    out = json.loads(cli("classify", str(inp), "--json").stdout)
    assert out["classifier"] == card["model_id"] and out["issue_type"] == "发票"


def test_cli_eval_classify_writes_reports(cli, tmp_path, labels_csv):
    res = cli("eval", "classify", "--labels", str(labels_csv), "--out", str(tmp_path / "rep"), "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert set(rep["rules"]["per_class"]) == {"物流配送", "发票", "质量问题"}
    assert rep["model"]["macro_f1"] >= 0.8  # separable toy data: a trained model must get it
    assert len(rep["model"]["confusion"]["matrix"]) == len(rep["model"]["confusion"]["labels"])
    md = (tmp_path / "rep" / "classification.md").read_text(encoding="utf-8")
    assert "Rules only" in md and "Confusion matrix" in md
    assert cli("eval", "classify", "--labels", str(tmp_path / "nope.csv")).exit_code == 1


def test_review_queue_exports_least_certain(cli, cfg, tmp_path):
    from pipeline.orchestrate.steps import process_batch
    from pipeline.schema import Conversation, Turn
    from pipeline.storage.store import write_cases

    texts = ["快递丢件了，物流一直不更新，快递员也不接电话", "我想问一下这个东西", "发票没有开", "屏幕坏了质量太差"]
    convs = [Conversation(f"c{i}", "chat", [Turn("customer", t), Turn("agent", "您好，马上为您处理")],
                          started_at="2026-01-05T10:00:00+08:00") for i, t in enumerate(texts)]
    cases = process_batch(convs, cfg, run_id="r1").cases
    write_cases(tmp_path / "out", cases, "r1", 0)
    dest = tmp_path / "queue.csv"
    res = cli("review-queue", "--n", "2", "--out", str(dest))
    assert res.exit_code == 0, res.output
    q = pd.read_csv(dest, encoding="utf-8-sig", keep_default_na=False)
    assert len(q) == 2 and {"text", "conversation_id", "predicted_issue_type", "issue_type_confidence"} <= set(q.columns)
    # Label columns start empty: a prediction must never be read back as a label.
    assert all((q[c] == "").all() for c in ("issue_type", "request_kind", "outcome"))
    assert q["issue_type_confidence"].is_monotonic_increasing
    assert "c1" in q["conversation_id"].tolist()  # "我想问一下这个东西": nothing matched, the least certain
