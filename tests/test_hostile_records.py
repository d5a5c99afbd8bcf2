"""One bad record never stops a night (issue 12, item 3).

Every hostile record sits beside good ones in the same file: the good ones are accepted and
processed, the hostile one is quarantined with the expected reason (or read correctly, for
encodings and BOMs), and read = accepted + duplicates + quarantined.
"""

from __future__ import annotations

import json
from pathlib import Path

import opencc
import pytest

from pipeline.orchestrate import nightly as steps
from pipeline.config import IngestConfig
from pipeline.ingest import read_file
from pipeline.orchestrate.steps import process_batch
from pipeline.storage.store import read_cases

GOOD_TEXT = "你好，我的快递三天了还没到，请帮我查一下物流信息，订单一直显示运输中。"
AGENT_TEXT = "您好，已为您催促物流，请您耐心等待，稍后给您回电。"
PHONE = "13812345678"


def chat(cid: str, text: str = GOOD_TEXT, **kw) -> dict:
    rec = {"conversation_id": cid, "channel": "chat", "started_at": "2025-09-01T10:00:00+08:00",
           "turns": [{"speaker": "customer", "text": text, "ts": "2025-09-01T10:00:00+08:00"},
                     {"speaker": "agent", "text": AGENT_TEXT, "ts": "2025-09-01T10:00:30+08:00"}],
           "metadata": {"region": "华东", "product": "空气净化器"}}
    rec.update(kw)
    return rec


def line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False)


def with_ts(cid: str, literal: str) -> str:
    """A chat line whose first turn's ts is the raw JSON literal given."""
    return line(chat(cid)).replace('"ts": "2025-09-01T10:00:00+08:00"', f'"ts": {literal}', 1)


def hostile_jsonl_lines() -> list[tuple[str, str | None, str]]:
    """(line, expected reason or None when it must be accepted, what the detail must name)."""
    surrogate = line(chat("LONE-SURROGATE")).replace("我的快递", "我的快递\\ud83d", 1)
    return [
        (with_ts("TS-OVERFLOW", "99999999999999999999999"), "bad_timestamp", "turns[0].ts"),
        (with_ts("TS-5000-DIGITS", "9" * 5000), "bad_value", "turns[0].ts"),
        (line(chat("STARTED-NEGATIVE", started_at=-1e18)), "bad_timestamp", "started_at"),
        (line(chat("STARTED-YEAR-1", started_at="0001-01-01T00:00:00+08:00")), "bad_timestamp", "started_at"),
        (line(chat("STARTED-YEAR-9999", started_at="9999-12-31T23:59:59-12:00")), "bad_timestamp", "started_at"),
        (with_ts("TS-NEGATIVE", "-5"), "bad_timestamp", "turns[0].ts"),
        (line(chat("CSAT-HUGE", metadata={"region": "华东", "csat": 10**30})), "bad_value", "metadata.csat"),
        (surrogate, None, ""),
        ("\ufeff" + line(chat("BOM-LINE")), None, ""),
    ]


def good_lines(prefix: str, n: int = 3) -> list[str]:
    return [line(chat(f"{prefix}-{i}")) for i in range(n)]


# -- ingest: JSONL ---------------------------------------------------------------------------


def test_hostile_jsonl_records_are_quarantined_beside_good_ones(tmp_path):
    hostile = hostile_jsonl_lines()
    lines = good_lines("A") + [h for h, _, _ in hostile] + good_lines("B")
    p = tmp_path / "night.jsonl"
    p.write_bytes("\n".join(lines).encode("utf-8") + b"\n")
    res = read_file(p, IngestConfig())
    accepted = {c.conversation_id for c in res.conversations}
    assert {f"A-{i}" for i in range(3)} | {f"B-{i}" for i in range(3)} <= accepted
    assert {"LONE-SURROGATE", "BOM-LINE"} <= accepted
    got = {q.conversation_id: q for q in res.quarantined}
    for text, reason, field in hostile:
        cid = json.loads(text.lstrip("\ufeff").replace("9" * 5000, "0"))["conversation_id"]
        if reason is None:
            continue
        assert got[cid].reason == reason, (cid, got[cid].detail)
        assert field in got[cid].detail, (cid, got[cid].detail)
        assert got[cid].line == lines.index(text) + 1
    assert res.n_read == len(lines) and len(res.quarantined) == sum(r is not None for _, r, _ in hostile)


def test_lone_surrogate_is_replaced_not_carried(tmp_path):
    raw = line(chat("X\\udc00Y", metadata={"region\\ud800": "华\\udfff东"})).replace("我的快递", "我的快递\\ud83d", 1)
    p = tmp_path / "s.jsonl"
    p.write_text(raw.replace("\\\\", "\\") + "\n", encoding="utf-8")
    conv = read_file(p, IngestConfig()).conversations[0]
    texts = [conv.conversation_id, conv.turns[0].text, *conv.metadata, *map(str, conv.metadata.values())]
    for t in texts:
        t.encode("utf-8")  # would raise on a surrogate
    assert conv.conversation_id == "X\ufffdY" and "我的快递\ufffd" in conv.turns[0].text


def test_valid_surrogate_pairs_stay_emoji(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text(json.dumps(chat("EMOJI", text="快递没到\U0001F621"), ensure_ascii=True) + "\n", encoding="utf-8")
    assert read_file(p, IngestConfig()).conversations[0].turns[0].text == "快递没到\U0001F621"


def test_bom_lines_inside_a_concatenated_file(tmp_path):
    # Three exports pasted together, each with its own BOM: only the first is at the file start.
    parts = [("\ufeff" + line(chat(f"BOM-{i}"))).encode("utf-8") for i in range(3)]
    p = tmp_path / "cat.jsonl"
    p.write_bytes(b"\n".join(parts) + b"\n")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["BOM-0", "BOM-1", "BOM-2"] and not res.quarantined
    # in a GB18030 file too
    gb = [line(chat(f"GB-{i}")).encode("gb18030") for i in range(3)]
    p2 = tmp_path / "cat_gb.jsonl"
    p2.write_bytes(b"\n".join(gb[:1] + [b"\xef\xbb\xbf" + line(chat("U8-BOM")).encode("utf-8")] + gb[1:]) + b"\n")
    res2 = read_file(p2, IngestConfig())
    assert [c.conversation_id for c in res2.conversations] == ["GB-0", "U8-BOM", "GB-1", "GB-2"] and not res2.quarantined
    assert res2.conversations[1].turns[0].text == GOOD_TEXT


def test_json_array_with_a_hostile_item(tmp_path):
    items = [chat("J-1"), json.loads(with_ts("J-BAD", "99999999999999999999999")), chat("J-2")]
    p = tmp_path / "list.json"
    p.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["J-1", "J-2"]
    assert [(q.conversation_id, q.reason, q.line) for q in res.quarantined] == [("J-BAD", "bad_timestamp", 2)]


def test_json_file_with_a_5000_digit_number(tmp_path):
    p = tmp_path / "call.json"
    p.write_text('{"conversation_id": "C9", "Sentences": [{"BeginTime": ' + "9" * 5000 +
                 ', "EndTime": 1, "Text": "您好", "ChannelId": 0}]}', encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [(q.reason, "Sentences[0].BeginTime" in q.detail) for q in res.quarantined] == [("bad_value", True)]


def test_json_array_with_a_5000_digit_number_in_one_item(tmp_path):
    items = [line(chat("J-1")), with_ts("J-LONG", "9" * 5000), line(chat("J-2"))]
    p = tmp_path / "list.json"
    p.write_text("[" + ",\n".join(items) + "]", encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["J-1", "J-2"]
    assert [(q.conversation_id, q.reason, q.line) for q in res.quarantined] == [("J-LONG", "bad_value", 2)]
    assert "turns[0].ts" in res.quarantined[0].detail and len(res.quarantined[0].raw_hash) == 64


def test_asr_times_out_of_range_are_reasons(tmp_path):
    sents = [{"BeginTime": 0, "EndTime": 2000, "Text": "您好请问有什么可以帮您", "ChannelId": 0},
             {"BeginTime": 10**22, "EndTime": 10**400, "Text": "我要退货", "ChannelId": 1}]
    p = tmp_path / "c.json"
    p.write_text(json.dumps([{"conversation_id": "OK", "Sentences": sents[:1]},
                             {"conversation_id": "BIG", "Sentences": sents}]), encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["OK"]
    assert [(q.conversation_id, q.reason) for q in res.quarantined] == [("BIG", "bad_timestamp")]


def test_unexpected_exception_is_bad_value_naming_the_field(tmp_path, monkeypatch):
    from pipeline.ingest import parse

    real = parse.Parser.speaker

    def speaker(self, raw):
        if raw == "boom":
            raise ZeroDivisionError("secret 13812345678")
        return real(self, raw)

    monkeypatch.setattr(parse.Parser, "speaker", speaker)
    bad = chat("BOOM")
    bad["turns"][1]["speaker"] = "boom"
    p = tmp_path / "u.jsonl"
    p.write_text("\n".join([line(chat("U-1")), line(bad), line(chat("U-2"))]) + "\n", encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["U-1", "U-2"]
    q = res.quarantined[0]
    assert (q.reason, q.line) == ("bad_value", 2)
    assert "turns[1]" in q.detail and "ZeroDivisionError" in q.detail and PHONE not in q.detail


def test_file_name_that_is_not_utf8(tmp_path):
    name = b"calls-\xff\xfe.jsonl"
    path = Path((bytes(tmp_path) + b"/" + name).decode("utf-8", "surrogateescape"))
    path.write_text(line(chat("FN-1")) + "\n", encoding="utf-8")
    res = read_file(path, IngestConfig(), root=tmp_path)
    res.path.encode("utf-8")
    assert res.conversations[0].source_file == res.path == "calls-\\xff\\xfe.jsonl"


# -- ingest: encodings decided per line -------------------------------------------------------


def test_utf8_lines_in_a_gb18030_file_are_read_as_utf8(tmp_path):
    gb = [line(chat(f"GB-{i}")).encode("gb18030") for i in range(6)]
    u8 = [line(chat(f"U8-{i}", text=f"第{i}行：退款什么时候到账？发票也没收到。")).encode("utf-8") for i in range(3)]
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join(gb[:2] + u8[:1] + gb[2:4] + u8[1:] + gb[4:]) + b"\n")
    res = read_file(p, IngestConfig())
    assert not res.quarantined and res.encoding == "gb18030"
    by_id = {c.conversation_id: c for c in res.conversations}
    assert len(by_id) == 9
    assert by_id["U8-1"].turns[0].text == "第1行：退款什么时候到账？发票也没收到。" and by_id["U8-1"].encoding == "utf-8"
    assert by_id["GB-3"].turns[0].text == GOOD_TEXT and by_id["GB-3"].encoding == "gb18030"


def test_short_gbk_line_that_is_also_valid_utf8(tmp_path):
    # 专业 in GBK (D7A8 D2B5) is valid UTF-8 too, reading "רҵ": the Chinese reading wins.
    gb = [line(chat(f"GB-{i}")).encode("gb18030") for i in range(3)]
    short = line({"conversation_id": "SHORT", "turns": [{"speaker": "customer", "text": "专业"}]}).encode("gbk")
    short.decode("utf-8")
    p = tmp_path / "gb.jsonl"
    p.write_bytes(b"\n".join(gb + [short]) + b"\n")
    res = read_file(p, IngestConfig())
    assert res.conversations[-1].turns[0].text == "专业" and not res.quarantined


def test_gbk_line_in_a_big5_file_is_not_read_as_big5_garbage(tmp_path):
    s2t = opencc.OpenCC("s2tw").convert
    big5 = [s2t(line(chat(f"B5-{i}"))).encode("big5") for i in range(5)]
    gbk_text = "您好，我买的洗衣机漏水了，师傅什么时候上门？"
    gbk = line(chat("GBK-1", text=gbk_text)).encode("gbk")
    p = tmp_path / "big5.jsonl"
    p.write_bytes(b"\n".join(big5[:3] + [gbk] + big5[3:]) + b"\n")
    res = read_file(p, IngestConfig())
    assert res.encoding == "big5" and not res.quarantined
    by_id = {c.conversation_id: c for c in res.conversations}
    assert by_id["GBK-1"].turns[0].text == gbk_text and by_id["GBK-1"].encoding == "gb18030"
    assert by_id["B5-0"].turns[0].text == s2t(GOOD_TEXT)


def test_garbled_line_is_quarantined_not_accepted(tmp_path):
    # A Big5 line with one byte pair Big5 lacks decodes only as GB18030, into rare characters.
    s2t = opencc.OpenCC("s2tw").convert
    rec = line(chat("GARBLED", text=s2t(GOOD_TEXT) + "X" + s2t(AGENT_TEXT)))
    broken = s2t(rec).encode("big5").replace(b"X", b"\x81\x40")
    good = [s2t(line(chat(f"B5-{i}"))).encode("big5") for i in range(3)]
    p = tmp_path / "garbled.jsonl"
    p.write_bytes(b"\n".join(good[:1] + [broken] + good[1:]) + b"\n")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["B5-0", "B5-1", "B5-2"]
    assert [(q.reason, q.line) for q in res.quarantined] == [("undecodable_bytes", 2)]
    assert "rare characters" in res.quarantined[0].detail


def test_all_utf8_file_keeps_one_encoding(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text("\n".join(good_lines("U")) + "\n", encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert res.encoding == "utf-8" and {c.encoding for c in res.conversations} == {"utf-8"}


# -- ingest: CSV quoting ----------------------------------------------------------------------

CSV_HEADER = "conversation_id,channel_id,begin_ms,end_ms,text,region\n"


def csv_rows(cid: str) -> str:
    return (f"{cid},0,0,1000,您好请问有什么可以帮您,华东\n"
            f"{cid},1,1500,3000,我的洗衣机漏水了,华东\n"
            f"{cid},0,3500,5000,好的请您稍等我帮您查一下,华东\n")


def test_unterminated_quote_does_not_swallow_the_next_conversation(tmp_path):
    broken = 'K2,1,1500,3000,"我要退货,华东\n'
    p = tmp_path / "calls.csv"
    p.write_text(CSV_HEADER + csv_rows("K1") + "K2,0,0,1000,您好请问有什么可以帮您,华东\n" + broken
                 + 'K2,0,3500,5000,"好的,稍等",华东\n' + csv_rows("K3"), encoding="utf-8")
    res = read_file(p, IngestConfig())
    by_id = {c.conversation_id: c for c in res.conversations}
    assert set(by_id) == {"K1", "K3"}
    assert [t.text for t in by_id["K3"].turns] == ["您好请问有什么可以帮您", "我的洗衣机漏水了", "好的请您稍等我帮您查一下"]
    assert all("K3" not in t.text and "K2" not in t.text for c in by_id.values() for t in c.turns)
    [q] = res.quarantined
    assert (q.reason, q.conversation_id, q.line) == ("malformed_csv", "K2", 6) and "held back" in q.detail
    assert res.n_read == 3


def test_unterminated_quote_on_the_last_line(tmp_path):
    p = tmp_path / "calls.csv"
    p.write_text(CSV_HEADER + csv_rows("K1") + 'K9,1,1500,3000,"我要退货,华东', encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["K1"]
    assert [(q.reason, q.conversation_id) for q in res.quarantined] == [("malformed_csv", "K9")]


def test_unterminated_quote_before_a_real_multiline_field(tmp_path):
    p = tmp_path / "calls.csv"
    p.write_text(CSV_HEADER + 'K1,1,0,100,"我要退货,华东\n'
                 + 'K2,0,0,1000,"第一行\n第二行",华南\nK2,1,1500,3000,我的发票,华南\n', encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [(c.conversation_id, [t.text for t in c.turns]) for c in res.conversations] == [
        ("K2", ["第一行\n第二行", "我的发票"])]
    assert [(q.reason, q.conversation_id, q.line) for q in res.quarantined] == [("malformed_csv", "K1", 2)]


def test_csv_quoting_that_is_valid_stays_accepted(tmp_path):
    p = tmp_path / "calls.csv"
    p.write_text(CSV_HEADER + 'K1,0,0,1000,"您好，请问有什么可以帮您,稍等",华东\n'
                 + 'K1,1,1500,3000,"他说""好的""\n然后挂了",华东\n'
                 + 'K1,0,3500,5000,我说"好的,华东\n', encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert not res.quarantined
    assert [t.text for t in res.conversations[0].turns] == ["您好，请问有什么可以帮您,稍等", '他说"好的"\n然后挂了', '我说"好的']


def test_csv_row_with_extra_fields_is_malformed(tmp_path):
    p = tmp_path / "calls.csv"
    p.write_text(CSV_HEADER + csv_rows("K1") + "K2,0,0,1000,您好,请问有什么可以帮您,华东\n" + csv_rows("K3"), encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["K1", "K3"]
    assert [(q.reason, q.conversation_id) for q in res.quarantined] == [("malformed_csv", "K2")]


def test_csv_undecodable_row_holds_back_its_conversation(tmp_path):
    p = tmp_path / "calls.csv"
    body = (CSV_HEADER + csv_rows("K1")).encode("utf-8") + b"K2,0,0,1000,\xff\xfe\xc3,\xe5\n" + csv_rows("K2").encode("utf-8")
    p.write_bytes(body + csv_rows("K3").encode("utf-8"))
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["K1", "K3"]
    assert [(q.reason, q.conversation_id, q.line) for q in res.quarantined] == [("undecodable_bytes", "K2", 5)]


def test_csv_mixing_encodings_is_read_line_by_line(tmp_path):
    body = (CSV_HEADER + csv_rows("K1")).encode("gb18030") + csv_rows("K2").encode("utf-8") + csv_rows("K3").encode("gb18030")
    p = tmp_path / "calls.csv"
    p.write_bytes(body)
    res = read_file(p, IngestConfig())
    assert not res.quarantined and [c.conversation_id for c in res.conversations] == ["K1", "K2", "K3"]
    assert {c.turns[1].text for c in res.conversations} == {"我的洗衣机漏水了"}
    assert [c.encoding for c in res.conversations] == ["gb18030", "utf-8", "gb18030"]


def test_csv_files_pasted_together_with_their_bom_and_header(tmp_path):
    part = lambda cid: ("\ufeff" + CSV_HEADER + csv_rows(cid)).encode("utf-8")  # noqa: E731
    p = tmp_path / "calls.csv"
    p.write_bytes(part("K1") + part("K2"))
    res = read_file(p, IngestConfig())
    assert not res.quarantined and [c.conversation_id for c in res.conversations] == ["K1", "K2"]


def test_csv_hostile_values(tmp_path):
    p = tmp_path / "chat.csv"
    rows = ["conversation_id,speaker,text,ts",
            "C1,customer,我的快递没到,2025-09-01T10:00:00+08:00", "C1,agent,已为您催促,2025-09-01T10:00:30+08:00",
            "C2,customer,我的快递没到,99999999999999999999999", "C2,agent,已为您催促,2025-09-01T10:00:30+08:00",
            "C3,customer,我的快递没到,2025-09-01T10:00:00+08:00", "C3,agent,已为您催促,2025-09-01T10:00:30+08:00"]
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    res = read_file(p, IngestConfig())
    assert [c.conversation_id for c in res.conversations] == ["C1", "C3"]
    assert [(q.reason, q.conversation_id) for q in res.quarantined] == [("bad_timestamp", "C2")]


# -- processing: a step that raises on one conversation ---------------------------------------


def _convs(tmp_path: Path, cids: list[str], text_for: dict[str, str] | None = None):
    p = tmp_path / "b.jsonl"
    p.write_text("\n".join(line(chat(c, text=(text_for or {}).get(c, GOOD_TEXT))) for c in cids) + "\n", encoding="utf-8")
    return read_file(p, IngestConfig()).conversations


@pytest.mark.parametrize("step", ["cases", "mask", "segment"])
def test_process_batch_sets_aside_the_culprit(cfg, tmp_path, monkeypatch, step):
    from pipeline.cases.extract import CaseExtractor
    from pipeline.text.mask import Masker
    from pipeline.text.segment import Segmenter

    poison = "毒丸"
    convs = _convs(tmp_path, ["P-1", "P-BAD", "P-2"], {"P-BAD": f"{poison}我的电话是{PHONE}，{GOOD_TEXT}"})
    target = {"cases": (CaseExtractor, "extract"), "mask": (Masker, "mask"), "segment": (Segmenter, "cut")}[step]
    real = getattr(*target)

    def poisoned(self, arg, *a, **kw):
        text = arg if isinstance(arg, str) else " ".join(t.text for t in arg.turns)
        if poison in text and not (step == "mask" and "<PHONE>" in text):
            raise OverflowError(f"cannot handle {text}")
        return real(self, arg, *a, **kw)

    monkeypatch.setattr(*target, poisoned)
    if step == "mask":
        # Masking the excerpt fails too on this text: the excerpt must then be empty, not raw.
        pass
    res = process_batch(convs, cfg, "r1")
    assert sorted(res.cases["conversation_id"]) == ["P-1", "P-2"]
    [q] = res.rejected
    assert (q.reason, q.conversation_id, q.line) == ("bad_value", "P-BAD", 2)
    assert step in q.detail and "OverflowError" in q.detail and poison not in q.detail
    assert PHONE not in q.excerpt and PHONE not in q.detail
    assert res.cases["tokens"].map(len).gt(0).all()


def test_process_batch_sets_aside_unstorable_records(cfg, tmp_path):
    convs = _convs(tmp_path, ["S-1", "S-BAD", "S-2"])
    # Got past ingest somehow: every step copes, only the Parquet writer would raise.
    convs[1].source_file = "calls-\udcff.jsonl"
    res = process_batch(convs, cfg, "r1")
    assert sorted(res.cases["conversation_id"]) == ["S-1", "S-2"]
    [q] = res.rejected
    assert (q.reason, q.conversation_id) == ("bad_value", "S-BAD")
    assert "store" in q.detail and "UnicodeEncodeError" in q.detail
    q.source_file.encode("utf-8")  # the quarantine writer must be able to write it


def test_process_rejection_carries_no_surrogate(cfg, tmp_path):
    convs = _convs(tmp_path, ["S-1", "S-BAD"])
    convs[1].turns[0].text = "快递\ud83d没到"
    convs[1].conversation_id = "S-\udc00BAD"
    res = process_batch(convs, cfg, "r1")
    assert list(res.cases["conversation_id"]) == ["S-1"]
    [q] = res.rejected
    assert q.reason == "bad_value"
    for text in (q.excerpt, q.conversation_id, q.detail, q.source_file):
        text.encode("utf-8")


def test_guard_case_step_drops_only_the_culprit(cfg, tmp_path):
    from pipeline.orchestrate.batch import guard_case_step

    cases = process_batch(_convs(tmp_path, ["G-1", "G-BAD", "G-2"]), cfg, "r1").cases

    def step(df):
        if (df["conversation_id"] == "G-BAD").any():
            raise ValueError("boom")
        return df.assign(extra=1)

    out, rejected = guard_case_step(cases, step, "classify")
    assert sorted(out["conversation_id"]) == ["G-1", "G-2"] and (out["extra"] == 1).all()
    assert [(q.reason, q.conversation_id) for q in rejected] == [("bad_value", "G-BAD")]
    assert "classify" in rejected[0].detail and "ValueError" in rejected[0].detail
    same, none = guard_case_step(cases, lambda df: df, "emotion")
    assert same is cases and none == []


# -- the whole night, without Prefect ---------------------------------------------------------


def test_hostile_delivery_end_to_end(cfg, tmp_path, fake_embedder, monkeypatch):
    from pipeline.cases.extract import CaseExtractor

    inp = tmp_path / "in"
    inp.mkdir()
    hostile = hostile_jsonl_lines()
    (inp / "chat.jsonl").write_bytes(("\n".join(good_lines("A") + [h for h, _, _ in hostile]) + "\n").encode("utf-8"))
    (inp / "calls.csv").write_text(CSV_HEADER + csv_rows("K1") + 'K2,1,1500,3000,"我要退货,华东\n' + csv_rows("K3"),
                                   encoding="utf-8")
    gb = [line(chat(f"GB-{i}")).encode("gb18030") for i in range(4)]
    u8 = [line(chat(f"U8-{i}", text=f"第{i}单：退款什么时候到账？发票也没收到。")).encode("utf-8") for i in range(3)]
    (inp / "mixed.jsonl").write_bytes(b"\n".join(gb[:2] + u8 + [b"\xef\xbb\xbf" + gb[2]] + gb[3:]) + b"\n")
    # One conversation that makes case extraction raise: found and set aside, the batch goes on.
    poison = line(chat("PROC-BAD", text=f"我的手机号{PHONE}，快递毒丸还没到"))
    (inp / "poison.jsonl").write_text(poison + "\n" + line(chat("PROC-OK")) + "\n", encoding="utf-8")
    real = CaseExtractor.extract

    def extract(self, conv, *a, **kw):
        if "毒丸" in conv.turns[0].text:
            raise KeyError("毒丸")
        return real(self, conv, *a, **kw)

    monkeypatch.setattr(CaseExtractor, "extract", extract)
    out = tmp_path / "out"
    s = steps.run_pipeline(cfg, inp, out)

    r = s["records"]
    n_hostile_bad = sum(reason is not None for _, reason, _ in hostile)
    # chat.jsonl 3 + 9, calls.csv 3 conversations, mixed.jsonl 7, poison.jsonl 2
    assert r["read"] == 12 + 3 + 7 + 2 and r["reconciles"]
    assert r["quarantined"] == n_hostile_bad + 1 + 1 and r["duplicates"] == 0
    assert s["reasons"] == {"bad_timestamp": 5, "bad_value": 2 + 1, "malformed_csv": 1}
    cases = read_cases(out)
    stored = set(cases["conversation_id"])
    expected = ({f"A-{i}" for i in range(3)} | {"LONE-SURROGATE", "BOM-LINE", "K1", "K3", "PROC-OK"}
                | {f"GB-{i}" for i in range(4)} | {f"U8-{i}" for i in range(3)})
    assert stored == expected
    u8 = cases.set_index("conversation_id").loc["U8-1"]
    assert "退款什么时候到账" in u8["customer_text"]
    assert "\ufffd" in cases.set_index("conversation_id").loc["LONE-SURROGATE"]["customer_text"]

    quarantine = [json.loads(x) for x in Path(s["outputs"]["quarantine"]).read_text(encoding="utf-8").splitlines()]
    assert len(quarantine) == r["quarantined"]
    proc = next(q for q in quarantine if q["conversation_id"] == "PROC-BAD")
    assert proc["reason"] == "bad_value" and "cases" in proc["detail"] and "KeyError" in proc["detail"]
    assert PHONE not in json.dumps(quarantine, ensure_ascii=False) and "<PHONE>" in proc["excerpt"]


@pytest.mark.parametrize("step", ["emotion", "classify"])
def test_a_step_after_cases_fails_one_conversation_only_and_a_fix_reprocesses_it(cfg, tmp_path, fake_embedder,
                                                                                 monkeypatch, step):
    """Emotion and classification run on case tables: one conversation that makes them raise is
    quarantined alone; it is not recorded as seen, so its next delivery (after a fix) is processed."""
    import pipeline.analysis.classify as classify_mod
    import pipeline.analysis.emotion as emotion_mod
    from pipeline.orchestrate import nightly as steps

    inp = tmp_path / "in"
    inp.mkdir()
    recs = [{"conversation_id": cid, "turns": [{"speaker": "customer", "text": f"{cid} 的快递三天没到"},
                                                {"speaker": "agent", "text": "已为您催促物流"}]}
            for cid in ("OK-1", "POISON", "OK-2")]
    (inp / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    # The classify step calls its CaseClassifiers component's transform (built once per process).
    module, name = (emotion_mod, "add_emotion") if step == "emotion" else (classify_mod.CaseClassifiers, "transform")
    real = getattr(module, name)

    def poisoned(*a, **k):
        cases = a[1] if step == "classify" else a[0]
        if cases["customer_text"].str.contains("POISON").any():
            raise ValueError("boom")
        return real(*a, **k)

    monkeypatch.setattr(module, name, poisoned)
    out = tmp_path / "out"
    s = steps.run_pipeline(cfg, inp, out)
    assert s["records"]["reconciles"] and s["reasons"] == {"bad_value": 1}
    assert set(read_cases(out)["conversation_id"]) == {"OK-1", "OK-2"}
    monkeypatch.setattr(module, name, real)  # the fix
    (inp / "redelivery.jsonl").write_text(json.dumps(recs[1], ensure_ascii=False) + "\n", encoding="utf-8")
    s = steps.run_pipeline(cfg, inp, out)
    assert s["records"]["accepted"] == 1 and s["records"]["duplicates"] == 0
    assert set(read_cases(out)["conversation_id"]) == {"OK-1", "POISON", "OK-2"}
