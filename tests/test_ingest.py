import json
from pathlib import Path

import opencc
import pytest

from pipeline.config import IngestConfig
from pipeline.ingest import discover, read_file
from pipeline.ingest.decode import detect_encoding
from pipeline.ingest.parse import Parser, RecordError, infer_agent_channel

TEXT = "你好，我的快递三天了还没到，请帮我查一下物流信息。退款什么时候到账？发票也没收到。"


def chat(cid="C1", text=TEXT, **kw):
    return {"conversation_id": cid, "channel": "chat", "started_at": "2025-09-01T10:00:00+08:00",
            "turns": [{"speaker": "customer", "text": text, "ts": "2025-09-01T10:00:00+08:00"},
                      {"speaker": "agent", "text": "您好，已为您催促物流", "ts": "2025-09-01T10:00:30+08:00"}], **kw}


@pytest.mark.parametrize("encoding,traditional", [("utf-8", False), ("utf-8-sig", False), ("gb18030", False),
                                                  ("big5", True), ("utf-16", False)])
def test_encodings_round_trip(tmp_path, encoding, traditional):
    conv = opencc.OpenCC("s2tw").convert if traditional else str
    text = conv(TEXT)
    lines = [conv(json.dumps(chat(f"C{i}", TEXT), ensure_ascii=False)) for i in range(3)]
    p = tmp_path / "x.jsonl"
    p.write_bytes("\n".join(lines).encode(encoding))
    res = read_file(p, IngestConfig())
    assert res.n_read == 3 and not res.quarantined
    assert res.conversations[0].turns[0].text == text  # decoded exactly, not normalised yet
    assert res.conversations[0].turns[1].t == 30.0


def test_detects_gbk_vs_big5_on_short_text():
    assert detect_encoding("退款".encode("gb18030") + b"\n" + "物流没到".encode("gb18030")) == "gb18030"
    assert detect_encoding(opencc.OpenCC("s2t").convert("请问发票怎么开").encode("big5")) == "big5"


def test_quarantine_reasons_each_record_accounted(tmp_path):
    good = json.dumps(chat("OK1"), ensure_ascii=False)
    bad = [
        ('{"conversation_id": "X", "turns": [', "malformed_json"),
        ("[1, 2]", "not_an_object"),
        (json.dumps({"conversation_id": "E", "turns": []}), "no_turns"),
        (json.dumps({"conversation_id": "T", "turns": [{"speaker": "customer", "text": "  "}]}), "empty_text"),
        (json.dumps({"conversation_id": "S", "turns": [{"speaker": "manager", "text": "hi"}]}), "unknown_speaker"),
        (json.dumps({"turns": [{"speaker": "customer", "text": "hi"}]}), "missing_id"),
        (json.dumps({"conversation_id": "B", "started_at": "yesterday", "turns": [{"speaker": "customer", "text": "x"}]}), "bad_timestamp"),
        (json.dumps({"conversation_id": "L", "turns": [{"speaker": "customer", "text": "长" * 100}]}), "oversized_message"),
    ]
    raw = (good + "\n" + "\n".join(b for b, _ in bad) + "\n").encode() + b'{"conversation_id": "U", "turns": [{"speaker": "customer", "text": "\xff\xfe"}]}\n\n'
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(raw)
    res = read_file(p, IngestConfig(max_message_chars=80))
    assert [c.conversation_id for c in res.conversations] == ["OK1"]
    got = [(q.line, q.reason) for q in res.quarantined]
    assert got == [(i + 2, r) for i, (_, r) in enumerate(bad)] + [(len(bad) + 2, "undecodable_bytes")]
    assert res.n_read == len(bad) + 2
    for q in res.quarantined:
        assert q.detail and q.raw_hash and q.byte_offset is not None


def test_speaker_aliases_from_config():
    p = Parser(IngestConfig(speaker_aliases={"买家": "customer", "卖家": "agent"}))
    conv = p.chat({"conversation_id": 1, "turns": [{"speaker": "买家", "text": "在吗"}, {"speaker": "卖家", "text": "在的"}]})
    assert [t.speaker for t in conv.turns] == ["customer", "agent"] and conv.conversation_id == "1"
    with pytest.raises(RecordError) as e:
        p.chat({"conversation_id": 1, "turns": [{"speaker": "老板", "text": "在吗"}]})
    assert e.value.reason == "unknown_speaker" and "speaker_aliases" in e.value.detail


def test_asr_json_agent_inferred_either_channel(tmp_path):
    for agent in (0, 1):
        sents = [
            {"BeginTime": 0, "EndTime": 2000, "Text": "您好这里是客服中心请问有什么可以帮您", "ChannelId": agent},
            {"BeginTime": 2500, "EndTime": 5000, "Text": "嗯我的快递三天了还没到", "ChannelId": 1 - agent},
            {"BeginTime": 5200, "EndTime": 8000, "Text": "好的请您稍等我帮您查一下", "ChannelId": agent},
        ]
        p = tmp_path / f"call{agent}.json"
        p.write_text(json.dumps({"TaskId": "abc", "Result": {"Sentences": sents}}, ensure_ascii=False), encoding="utf-8")
        res = read_file(p, IngestConfig())
        conv = res.conversations[0]
        assert [t.speaker for t in conv.turns] == ["agent", "customer", "agent"]
        assert conv.turns[1].t == 2.5 and conv.channel == "call" and conv.source_format == "asr_json"
    assert infer_agent_channel([(3, "我要退货"), (7, "您好请问您的订单号")]) == 7


def test_asr_agent_channel_from_config(tmp_path):
    sents = [{"BeginTime": 0, "EndTime": 1, "Text": "您好请问", "ChannelId": 0},
             {"BeginTime": 2, "EndTime": 3, "Text": "我的快递", "ChannelId": 1}]
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"Sentences": sents}), encoding="utf-8")
    conv = read_file(p, IngestConfig(agent_channel=1)).conversations[0]
    assert [t.speaker for t in conv.turns] == ["customer", "agent"]
    assert conv.conversation_id == "c"  # no id in the file: its name


def test_asr_csv_grouped_and_bad_rows(tmp_path):
    p = tmp_path / "calls.csv"
    p.write_text(
        "conversation_id,channel_id,begin_ms,end_ms,text,region\n"
        "K1,0,0,1000,您好请问有什么可以帮您,华东\n"
        "K1,1,1500,3000,我要退货,华东\n"
        ",1,0,100,没有编号的行,\n"
        "K2,0,abc,100,您好,华南\n"
        "K2,1,200,300,我的发票,华南\n", encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["K1"]
    assert res.conversations[0].metadata["region"] == "华东"
    assert sorted(q.reason for q in res.quarantined) == ["bad_turn", "missing_id"]
    assert res.n_read == 3


def test_discover_takes_all_formats_recursively(tmp_path):
    for name in ["a.jsonl", "b/c.json", "b/d.CSV", "e.txt", ".hidden/f.jsonl"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in discover(tmp_path)] == ["a.jsonl", "b/c.json", "b/d.CSV"]


def test_content_hash_ignores_encoding(tmp_path):
    line = json.dumps(chat("H1"), ensure_ascii=False)
    (tmp_path / "u.jsonl").write_bytes(line.encode("utf-8"))
    (tmp_path / "g.jsonl").write_bytes(line.encode("gb18030"))
    h = {read_file(tmp_path / f, IngestConfig()).conversations[0].content_hash for f in ("u.jsonl", "g.jsonl")}
    assert len(h) == 1
