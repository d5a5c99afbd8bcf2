import json
import re
from functools import lru_cache

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cases.extract import CaseExtractor, case_id, lcs_length, turn_clauses
from pipeline.analysis.emotion import add_emotion
from pipeline.schema import Conversation, Turn


def conv(turns, **kw):
    return Conversation(conversation_id=kw.pop("cid", "C1"), channel="chat", turns=[Turn(s, t, ts) for s, t, ts in turns],
                        started_at=kw.pop("started_at", "2025-09-01T10:00:00+08:00"), **kw)


def test_problem_handling_outcome_timings(cfg):
    ex = CaseExtractor.from_config(cfg)
    c = conv([
        ("customer", "你好", 0.0),
        ("agent", "您好，很高兴为您服务，请问有什么可以帮您", 20.0),
        ("customer", "我的快递三天了还没到，物流一直不更新", 35.0),
        ("agent", "非常抱歉，已为您催促物流，预计明天送达", 80.0),
        ("customer", "好的谢谢", 95.0),
    ])
    [case] = ex.extract(c, run_id="r1")
    assert case["problem"] == "快递三天了还没到，物流一直不更新"
    assert "已催促物流" in case["handling"] and "很高兴为您服务" not in case["handling"]
    assert (case["outcome"], case["outcome_evidence"]) == ("resolved", "agent: 已为您")
    assert case["first_response_s"] == 20.0 and case["duration_s"] == 95.0 and case["timings_missing"] == []
    assert case["date"] == "2025-09-01" and case["case_id"] == case_id("C1", 0)


def test_escalation_and_threats(cfg):
    ex = CaseExtractor.from_config(cfg)
    c = conv([
        ("customer", "东西坏了三次了，垃圾！！再不处理我就投诉到12315", None),
        ("agent", "非常抱歉，已为您升级给专员处理", None),
    ], started_at=None)
    [case] = ex.extract(c)
    assert case["outcome"] == "escalated"
    # Emotion is the emotion step's alone (one system, one label set): none of it comes from here.
    assert not {"emotion", "emotion_score", "emotion_cues", "escalation_threats"} & set(case)
    table = add_emotion(pd.DataFrame([case]), cfg).iloc[0]
    assert "12315" in table["escalation_threats"] and "投诉" in table["escalation_threats"]
    assert table["emotion"] == "愤怒" and table["emotion_score"] < -0.3 and len(table["emotion_cues"]) >= 1
    assert case["timings_missing"] == ["started_at", "first_response_s", "duration_s"]
    assert case["date_source"] == "ingested"


def test_unresolved_at_the_end(cfg):
    ex = CaseExtractor.from_config(cfg)
    [case] = ex.extract(conv([("customer", "退款怎么还没到账", 0), ("agent", "帮您查询一下", 5),
                              ("customer", "还是不行，算了", 9)]))
    assert case["outcome"] == "unresolved"


def test_separate_issues_become_two_cases(cfg):
    ex = CaseExtractor.from_config(cfg)
    c = conv([
        ("customer", "我买的洗衣机漏水了", 0),
        ("agent", "已为您登记维修工单，师傅明天上门", 10),
        ("customer", "另外还有一个问题，我想开增值税发票", 20),
        ("agent", "好的，已为您开具电子发票", 30),
        ("customer", "谢谢", 40),
    ])
    cases = ex.extract(c)
    assert [x["segment"] for x in cases] == [0, 1]
    assert "漏水" in cases[0]["problem"] and "发票" in cases[1]["problem"]
    assert len({x["case_id"] for x in cases}) == 2


def test_repeat_contact_from_metadata_or_history(cfg):
    ex = CaseExtractor.from_config(cfg)
    c = conv([("customer", "快递还没到", 0)], metadata={"order_id": "JD1"})
    assert ex.extract(c)[0]["repeat_contact"] is False
    assert ex.extract(c, prior_orders=frozenset({"JD1"}))[0]["repeat_contact"] is True
    c2 = conv([("customer", "快递还没到", 0)], metadata={"repeat_consultation": True})
    assert ex.extract(c2)[0]["repeat_contact"] is True


# -- outcome: how the conversation ends -----------------------------------------------------------

def outcome_of(cfg, turns):
    ex = CaseExtractor.from_config(cfg)
    [case] = ex.extract(conv([(s, t, None) for s, t in turns], started_at=None))
    return case["outcome"], case["outcome_evidence"]


def test_refund_done_is_resolved(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "我要退款，这个订单不想要了"),
        ("agent", "好的亲，已为您提交退款申请，款项3-5个工作日原路退回"),
        ("customer", "好的谢谢"),
        ("agent", "不客气，请问还有其他可以帮您的吗？"),
    ])
    assert out == "resolved" and ev


def test_closing_ritual_without_reply_after_an_action_is_resolved_not_unknown(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "发票抬头开错了，能改成公司吗"),
        ("agent", "已经为您登记修改发票抬头，换开后会发到您的邮箱"),
        ("agent", "请问还有其他可以帮您的吗？"),
    ])
    assert out == "resolved" and "已经为您" in ev


def test_hand_over_to_another_team_is_escalated(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "洗衣机装好就漏水，你们怎么处理"),
        ("agent", "非常抱歉，这边为您升级给售后专员处理，专员会在24小时内联系您"),
        ("customer", "好的"),
        ("agent", "感谢您的理解，祝您生活愉快"),
    ])
    assert out == "escalated" and ev.startswith("agent: ")


def test_promised_call_back_is_escalated(cfg):
    out, _ = outcome_of(cfg, [
        ("customer", "我的账户登录不上了"),
        ("agent", "这边记录下来，明天中午之前给您回电处理"),
        ("customer", "嗯"),
    ])
    assert out == "escalated"


def test_refusal_is_unresolved(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "能不能把收货地址改到外地"),
        ("agent", "亲，订单已经出库了，暂时无法修改地址"),
        ("customer", "好吧"),
    ])
    assert out == "unresolved" and ev == "agent: 无法"


def test_unanswered_last_question_is_unresolved(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "快递到哪了"),
        ("agent", "已经到达您所在城市的站点了"),
        ("customer", "那今天能送到吗？"),
    ])
    assert out == "unresolved" and ev.startswith("customer asked last")


def test_objection_at_the_end_is_unresolved(cfg):
    out, _ = outcome_of(cfg, [
        ("customer", "退款怎么还没到账"),
        ("agent", "已为您催促财务，请耐心等待"),
        ("customer", "等了这么久，太差了，我不满意"),
    ])
    assert out == "unresolved"


def test_an_offer_the_chat_went_past_does_not_decide(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "屏幕有个坏点"),
        ("agent", "需要的话可以为您升级专员处理，您看需要吗"),
        ("customer", "不用了，那我自己怎么申请换货？"),
        ("agent", "您可以在订单详情页点击申请售后，选择换货"),
        ("customer", "好的"),
    ])
    assert out == "resolved", ev


def test_unpunctuated_call_turn_with_an_apology_still_hands_over(cfg):
    # ASR text is one clause per turn: the apology in it must not hide the hand-over.
    out, ev = outcome_of(cfg, [
        ("customer", "我的快递一直没到再不解决我就投诉"),
        ("agent", "非常抱歉已为您升级给专员处理明天中午前会有专人联系您"),
    ])
    assert (out, ev) == ("escalated", "agent: 升级给")


def test_objection_to_the_hand_over_is_unresolved(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "洗衣机一开就报错"),
        ("agent", "已为您催促售后网点，师傅会在七个工作日内联系您"),
        ("customer", "我不满意，你们这样处理不行"),
        ("agent", "非常抱歉没能帮到您"),
    ])
    assert (out, ev) == ("unresolved", "customer: 不满意")


def test_refusal_then_a_suggestion_accepted_grudgingly_is_unresolved(cfg):
    # The "no" need not be the agent's very last word: a suggestion after it does not settle it.
    out, ev = outcome_of(cfg, [
        ("customer", "我昨天不小心点了取消订单，能帮我恢复吗"),
        ("agent", "很抱歉，已经取消的订单无法恢复"),
        ("customer", "那怎么办"),
        ("agent", "建议您重新下单购买"),
        ("customer", "好吧"),
        ("agent", "请问还有其他可以帮您的吗？"),
    ])
    assert (out, ev) == ("unresolved", "agent: 无法")


def test_asking_for_a_rating_is_not_a_refusal(cfg):
    # 能不能 asks; it does not say no.
    out, ev = outcome_of(cfg, [
        ("customer", "运费险怎么理赔"),
        ("agent", "退货完成后运费险会自动理赔到您的账户"),
        ("customer", "好吧"),
        ("agent", "能不能麻烦您给我的服务打个分呢"),
    ])
    assert out == "resolved", ev


def test_a_plain_oh_and_thanks_after_a_no_is_answered(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "这个能货到付款吗"),
        ("agent", "这款暂时不支持货到付款，可以用微信支付的"),
        ("customer", "哦，知道了谢谢"),
    ])
    assert out == "resolved", ev


def test_giving_up_before_the_closing_exchange_is_unresolved(cfg):
    # "没了" to the closing question says nothing: the objection before it still counts.
    out, ev = outcome_of(cfg, [
        ("customer", "我要取消订单"),
        ("agent", "这个订单已经发货了，可以拒收后退款"),
        ("customer", "刚说要退你们就发货了，算了算了"),
        ("agent", "那现在不用退了哦"),
        ("customer", "嗯"),
        ("agent", "请问还有其他可以帮您的吗？"),
        ("customer", "没了"),
    ])
    assert (out, ev) == ("unresolved", "customer: 算了")


def test_a_question_the_customer_then_lets_go_of_is_not_unanswered(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "价保申请了吗"),
        ("agent", "已为您申请价保，差价会退回原支付账户"),
        ("customer", "差价什么时候退呢？好的谢谢"),
        ("agent", "请问还有其他可以帮您的吗？"),
        ("customer", "没有了谢谢"),
    ])
    assert out == "resolved", ev


def test_after_sales_will_contact_you_is_escalated(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "手机屏幕碎了能修吗，要多少钱"),
        ("agent", "您先提交售后申请，费用方面售后会联系您确认的"),
        ("customer", "嗯谢谢"),
    ])
    assert (out, ev) == ("escalated", "agent: 会联系您")


def test_a_hand_over_the_agent_then_completes_is_resolved(cfg):
    out, ev = outcome_of(cfg, [
        ("customer", "手机降价了，我要价保"),
        ("agent", "麻烦您提交一个新订单，我们核实后为您处理"),
        ("customer", "新订单提交好了"),
        ("agent", "比价价保成功，差价原路退回"),
        ("customer", "好的"),
    ])
    assert out == "resolved", ev


def test_nothing_to_judge_is_unknown(cfg):
    assert outcome_of(cfg, [("customer", "在吗"), ("agent", "您好，很高兴为您服务")])[0] == "unknown"


def test_transferred_metadata_is_escalated(cfg):
    ex = CaseExtractor.from_config(cfg)
    [case] = ex.extract(conv([("customer", "查一下物流", None), ("agent", "好的", None)], metadata={"transferred": True}))
    assert (case["outcome"], case["outcome_evidence"]) == ("escalated", "metadata.transferred")


# -- problem and handling: clauses that read like a summary ---------------------------------------

GREETING_PASTE_THANKS = [
    ("customer", "你好 在吗", None),
    ("agent", "您好，很高兴为您服务，请问有什么可以帮您", None),
    ("customer", "咨询订单号:<ORDER> 订单金额:<AMOUNT> 下单时间:<DATE>", None),
    ("agent", "亲爱的，正在为您查询，请稍等", None),
    ("customer", "我买的电饭煲少发了电源线", None),
    ("customer", "我买的电饭煲少发了电源线", None),
    ("customer", "能给我补发吗？", None),
    ("agent", "非常抱歉给您带来不便，已为您申请补发电源线，预计明天发出哦", None),
    ("customer", "好的谢谢", None),
    ("agent", "请问还有其他可以帮您的吗？祝您生活愉快", None),
]


def test_problem_keeps_the_matter_and_drops_greetings_pastes_repeats_thanks(cfg):
    ex = CaseExtractor.from_config(cfg)
    [case] = ex.extract(conv(GREETING_PASTE_THANKS))
    assert case["problem"] == "买的电饭煲少发了电源线，能给补发？"
    for dropped in ("你好", "在吗", "<ORDER>", "订单金额", "谢谢"):
        assert dropped not in case["problem"]


def test_handling_keeps_what_was_done_and_drops_rituals(cfg):
    ex = CaseExtractor.from_config(cfg)
    [case] = ex.extract(conv(GREETING_PASTE_THANKS))
    assert case["handling"] == "已申请补发电源线，预计明天发出"
    for ritual in ("很高兴为您服务", "正在为您查询", "请问还有其他", "亲爱的", "不便"):
        assert ritual not in case["handling"]


def test_words_pointing_into_the_chat_are_dropped(cfg):
    # A case is read in the third person by someone who does not see the chat: 我, 你们, 您, 这个,
    # 那边 name nothing for them. 因为 is no 为您, 这个月 is a date, 自我 no pronoun.
    ex = CaseExtractor.from_config(cfg)
    [case] = ex.extract(conv([
        ("customer", "我的这个订单你们什么时候发货", None),
        ("customer", "商家那边说要我自己联系快递", None),
        ("customer", "这个月要用，自我感觉很急", None),
        ("agent", "已为您联系站点，因为您的地址偏远会晚一天", None),
    ]))
    assert case["problem"] == "订单什么时候发货？商家说要自己联系快递，这个月要用，自我感觉很急"
    assert case["handling"] == "已联系站点，因为地址偏远会晚一天"


def test_a_question_keeps_a_question_mark_for_its_trimmed_particle(cfg):
    ex = CaseExtractor.from_config(cfg)
    [case] = ex.extract(conv([
        ("customer", "能退款吗", None),
        ("customer", "明天能到对吧", None),
        ("customer", "那尽快退款吧", None),
        ("customer", "怎么还没发货呢", None),
        ("agent", "可以退的呢，预计明天到账", None),
        ("agent", "是这个订单吗", None),
    ]))
    # 吗 and 对吧 ask, a bare 吧 asks for something, a question word asks whatever ends it
    assert case["problem"] == "能退款？明天能到？尽快退款，怎么还没发货？"
    # an agent's 呢 softens, it does not ask
    assert case["handling"] == "可以退，预计明天到账，是订单？"


def test_pasted_instructions_are_named_by_their_opening(cfg):
    ex = CaseExtractor.from_config(cfg)
    steps = "您可以这样申请：第一步，打开我的订单，第二步，点击申请售后，第三步，选择退货，第四步，填写原因，第五步，提交"
    [case] = ex.extract(conv([("customer", "怎么退货", None), ("agent", steps, None)]))
    assert case["handling"] == "可以这样申请，第一步"


def test_spaces_of_the_received_text_separate_clauses(cfg):
    # Normalisation joins Chinese across spaces; the received text still shows where clauses end.
    t = Turn("agent", "可以的呢亲您看这样小妹帮您取消下订单辛苦您再次够买下",
             original="可以的呢亲 您看这样 小妹帮您取消下订单 辛苦您再次够买下")
    assert turn_clauses(t) == ["可以的呢亲", "您看这样", "小妹帮您取消下订单", "辛苦您再次够买下"]
    assert turn_clauses(Turn("agent", "好的，已处理")) == ["好的", "已处理"]


def test_links_do_not_become_fragments(cfg):
    assert turn_clauses(Turn("customer", "http://item.jd.com/5113055.html 支持蓝牙吗")) == ["支持蓝牙吗"]


CUSTOMER_BITS = ["你好", "在吗", "我的快递还没到", "怎么回事", "谢谢", "<ORDER>", "能退款吗", "亲", "好的", "我想换个颜色",
                 "发票开错了", "哦", "那个", "算了吧"]
AGENT_BITS = ["您好", "很高兴为您服务", "已为您催促", "请稍等", "亲爱的", "可以的哦", "正在为您查询", "帮您申请退款",
              "请问还有其他可以帮您的吗", "预计明天送达", "非常抱歉", "第一步", "点击我的订单"]


@given(st.lists(st.tuples(st.sampled_from(["customer", "agent"]),
                          st.lists(st.sampled_from(CUSTOMER_BITS + AGENT_BITS), min_size=1, max_size=5),
                          st.sampled_from(["，", " ", "。", "？", ""])), min_size=1, max_size=8))
def test_problem_and_handling_are_words_that_were_said(cfg, spec):
    ex = CaseExtractor.from_config(cfg)
    turns = [(who, sep.join(bits), None) for who, bits, sep in spec]
    [case] = ex.extract(conv(turns))[:1]
    said = {"customer": [t for w, t, _ in turns if w == "customer"], "agent": [t for w, t, _ in turns if w == "agent"]}
    for field, who in (("problem", "customer"), ("handling", "agent")):
        for piece in filter(None, re.split("[，？]", case[field])):
            assert any(_said_in(piece, t) for t in said[who]), (field, piece, said[who])


# Inside a clause only the words that point into the chat may be left out (我, 您的, 这个, 为您).
_DEIXIS_CHARS = set("我你您们的咱为这那个边")


def _said_in(piece, text):
    """piece is text's characters in order, with only deixis characters left out between them."""
    @lru_cache(maxsize=None)
    def from_(i, j):
        if i == len(piece):
            return True
        if j == len(text):
            return False
        return (piece[i] == text[j] and from_(i + 1, j + 1)) or (text[j] in _DEIXIS_CHARS and from_(i, j + 1))
    return any(from_(0, j) for j in range(len(text)))


@given(st.text(alphabet="abcd", max_size=30), st.text(alphabet="abcd", max_size=30))
def test_bit_parallel_lcs_matches_the_table(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    assert lcs_length(a, b) == table[len(a)][len(b)]


# -- real data (../shared/data; skipped when absent) ----------------------------------------------

def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.shared
def test_outcome_accuracy_on_real_jd_chats(shared_data, cfg):
    from pipeline.evaluate.cases import evaluate_cases

    report = evaluate_cases(cfg, shared_data / "jddc", labels=shared_data / "jddc-labels" / "dev.jsonl")
    outcome = report["labels"]["fields"]["outcome"]
    assert outcome["n"] >= 490
    assert outcome["pipeline"]["accuracy"] >= 0.80
    assert outcome["pipeline"]["accuracy"] > outcome["baseline"]["accuracy"]
    # no guessing "unknown": the readers found 1 in 994
    assert sum(row[outcome["pipeline"]["confusion"]["labels"].index("unknown")]
               for row in outcome["pipeline"]["confusion"]["matrix"]) <= 5 \
        if "unknown" in outcome["pipeline"]["confusion"]["labels"] else True


@pytest.mark.shared
def test_problem_and_handling_read_like_the_human_summaries(shared_data, cfg):
    from pipeline.evaluate.cases import evaluate_cases

    report = evaluate_cases(cfg, shared_data / "csds", summaries=shared_data / "csds-summaries" / "dev.jsonl")
    problem, handling = (report["summaries"]["fields"][f]["rouge_l_f"] for f in ("problem", "handling"))
    # Targets of issue 13 (the extractive ceiling is about 0.50). Measured 0.457 (problem) and 0.448
    # (handling); 17 of the 300 chats lost their customer side in conversion, so every method
    # scores 0 on them.
    assert problem["mined"] >= 0.45 and problem["mined"] >= problem["all_customer_turns"] + 0.03
    assert problem["mined"] >= problem["first_three_customer_turns"] + 0.05
    assert handling["mined"] >= 0.44 and handling["mined"] >= handling["all_agent_turns"] + 0.03
