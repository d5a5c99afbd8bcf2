"""Hostile input is processed or quarantined, never crashes the run or disappears."""

import json

from pipeline.orchestrate import nightly as steps
from pipeline.storage.store import read_cases


def conv(cid, turns):
    return json.dumps({"conversation_id": cid, "channel": "chat", "turns": turns}, ensure_ascii=False)


def test_adversarial_records(cfg, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    c, a = "customer", "agent"
    lines = [
        conv("huge-message", [{"speaker": c, "text": "快递没到" * 250_000}]),  # 1M characters
        conv("many-turns", [{"speaker": c if i % 2 else a, "text": f"第{i}句"} for i in range(10_000)]),
        conv("control", [{"speaker": c, "text": "快递\x00\x07没\x1b[31m到\x7f了"}, {"speaker": a, "text": "已为您催促"}]),
        conv("mixed", [{"speaker": c, "text": "Мой заказ 我的订单 طلب 注文 ❤ still not here"}, {"speaker": a, "text": "帮您查询"}]),
        conv("emoji-flood", [{"speaker": c, "text": "😡" * 5000 + "退款呢" + "！" * 3000}, {"speaker": a, "text": "已为您退款"}]),
        conv("rtl", [{"speaker": c, "text": "\u202e快递\u200f没到\u200e\u2066为什么\u2069"}, {"speaker": a, "text": "已为您催促"}]),
        conv("only-emoji", [{"speaker": c, "text": "😡😡😡"}]),
        conv("deep", [{"speaker": c, "text": "x", "ts": {"a": [[[[[]]]]]}}]),
    ]
    (inp / "bad.jsonl").write_text("\n".join(lines) + "\n" + "[" * 100_000 + "\n", encoding="utf-8")
    s = steps.run_pipeline(cfg, inp, tmp_path / "out")
    r = s["records"]
    assert r["read"] == 9 and r["reconciles"]
    cases = read_cases(tmp_path / "out")
    assert set(cases["conversation_id"]) == {"control", "mixed", "emoji-flood", "rtl"}
    assert s["reasons"]["oversized_record"] >= 1 and s["reasons"]["empty_text"] == 1
    assert s["reasons"].get("oversized_message", 0) + s["reasons"]["oversized_record"] == 2
    assert s["reasons"]["malformed_json"] == 1 and s["reasons"]["bad_timestamp"] == 1
    flood = cases.set_index("conversation_id").loc["emoji-flood"]
    assert len(flood["customer_text"]) < 50 and "退款" in flood["customer_text"]
    rtl = cases.set_index("conversation_id").loc["rtl"]
    assert "\u202e" not in rtl["customer_text"] and "快递没到" in rtl["customer_text"]
