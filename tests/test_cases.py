from pipeline.cases import CaseExtractor, case_id
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
    assert case["problem"] == "我的快递三天了还没到，物流一直不更新"
    assert "已为您催促物流" in case["handling"] and "很高兴为您服务" not in case["handling"]
    assert (case["outcome"], case["outcome_evidence"]) == ("resolved", "customer: 谢谢")
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
    assert "12315" in case["escalation_threats"] and case["emotion"] == "angry" and case["emotion_score"] < -0.3
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
