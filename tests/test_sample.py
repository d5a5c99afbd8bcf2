"""The synthetic sample generator: determinism, encodings, ground truth that matches the bytes.

Checksums are re-implemented here (not imported from the generator) so a bug in the generator's
own check-digit code cannot make its output pass.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
import unicodedata
from collections import Counter
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.sample.generate import ALL_FORMATS, CSV_HEADER, MALFORMED_FILE, generate
from pipeline.sample.templates import HOMOPHONES, ISSUES

CHAT_FILES = {"chat.jsonl": "utf-8", "chat_gb18030.jsonl": "gb18030", "chat_big5.jsonl": "big5",
              "chat_bom.jsonl": "utf-8-sig"}
OUTCOMES = {"resolved", "unresolved", "escalated"}
URGENCIES = {"紧急", "重要", "一般"}
KINDS = {"咨询", "投诉", "建议"}
EMOTIONS = {"angry", "anxious", "neutral", "satisfied"}
PII_KINDS = {"phone", "landline", "id", "card", "email", "address", "name"}


# ---------------------------------------------------------------------------------------------
# Independent validators


def id_number_valid(value: str) -> bool:
    """GB 11643-1999: 17 digits, then a mod-11 check character; digits 7-14 are a birth date."""
    if not re.fullmatch(r"\d{17}[\dX]", value):
        return False
    weights = [2 ** (17 - i) % 11 for i in range(17)]
    check = (12 - sum(int(d) * w for d, w in zip(value[:17], weights)) % 11) % 11
    if value[17] != ("X" if check == 10 else str(check)):
        return False
    try:
        born = datetime.strptime(value[6:14], "%Y%m%d").date()
    except ValueError:
        return False
    return date(1900, 1, 1) <= born <= date(2025, 1, 1)


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number][::-1]
    total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
    return total % 10 == 0


def canonical(value: str) -> str:
    """Full-width digits back to ASCII, separators out."""
    return re.sub(r"[\s\-]", "", unicodedata.normalize("NFKC", value))


# ---------------------------------------------------------------------------------------------
# Reading what the generator wrote


def read_labels(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if not r.get("malformed")], [r for r in rows if r.get("malformed")]


def read_texts(out_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """conversation id -> [(speaker or channel id, text)] for every well-formed conversation."""
    convs: dict[str, list[tuple[str, str]]] = {}
    for name, enc in CHAT_FILES.items():
        path = out_dir / name
        if not path.exists():
            continue
        for line in path.read_bytes().decode(enc).splitlines():
            rec = json.loads(line)
            convs[rec["conversation_id"]] = [(t["speaker"], t["text"]) for t in rec["turns"]]
    for path in sorted((out_dir / "calls").glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        convs[doc["conversation_id"]] = [(str(s["ChannelId"]), s["Text"]) for s in doc["Result"]["Sentences"]]
    csv_path = out_dir / "calls_asr.csv"
    if csv_path.exists():
        with open(csv_path, encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                convs.setdefault(row["conversation_id"], []).append((row["channel_id"], row["text"]))
    return convs


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    root = tmp_path_factory.mktemp("sample")
    out, labels = root / "out", root / "labels.jsonl"
    report = generate(out, n=300, seed=11, labels_out=labels)
    return out, labels, report


# ---------------------------------------------------------------------------------------------
# Determinism and files


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a" / "out", n=120, seed=3, labels_out=tmp_path / "a" / "labels.jsonl")
    generate(tmp_path / "b" / "out", n=120, seed=3, labels_out=tmp_path / "b" / "labels.jsonl")
    generate(tmp_path / "c" / "out", n=120, seed=4, labels_out=tmp_path / "c" / "labels.jsonl")
    a, b, c = (_snapshot(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["out/chat.jsonl"] != c["out/chat.jsonl"]
    assert a["labels.jsonl"] != c["labels.jsonl"]


def test_report_counts_and_files(sample: tuple[Path, Path, Any]) -> None:
    out, labels, report = sample
    good, bad = read_labels(labels)
    assert report.n_conversations == 300 == len(good)
    assert report.n_malformed == len(bad) == 9
    assert report.labels_path == labels
    on_disk = sorted(p for p in out.rglob("*") if p.is_file())
    assert sorted(report.files) == on_disk
    assert {p.name for p in on_disk if p.parent == out} == {*CHAT_FILES, "calls_asr.csv", MALFORMED_FILE}
    variants = Counter(label["variant"] for label in good)
    assert set(variants) == set(ALL_FORMATS)
    assert variants["chat_jsonl"] == 165 and variants["asr_json"] == 36  # 55% and 12% of 300
    assert len(list((out / "calls").glob("CALL-*.json"))) == variants["asr_json"]
    assert len({label["conversation_id"] for label in good}) == 300


def test_every_label_matches_a_conversation(sample: tuple[Path, Path, Any]) -> None:
    out, labels, _ = sample
    good, _ = read_labels(labels)
    texts = read_texts(out)
    assert set(texts) == {label["conversation_id"] for label in good}
    for label in good:
        turns = texts[label["conversation_id"]]
        assert len(turns) == label["n_turns"]
        assert 4 <= label["n_turns"] <= 30
        starts = [issue["start_turn"] for issue in label["issues"]]
        assert starts == sorted(set(starts)) and starts[-1] < len(turns)


def test_labels_inside_out_dir_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for inside in (out / "labels.jsonl", out / "sub" / "labels.jsonl", out):
        with pytest.raises(ValueError, match="inside out_dir"):
            generate(out, n=10, labels_out=inside)
    assert not out.exists() or not any(out.rglob("*"))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path / "o", n=5, formats=("chat_utf16",))
    with pytest.raises(ValueError):
        generate(tmp_path / "o", n=-1)


def test_rerun_removes_stale_outputs_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(out, n=200, seed=1)
    keep = out / "notes.txt"
    keep.write_text("not ours")
    report = generate(out, n=20, seed=1, formats=("asr_json",), malformed=False)
    assert keep.exists()
    assert sorted(p for p in out.rglob("*") if p.is_file() and p != keep) == sorted(report.files)
    assert len(report.files) == 20


def test_format_subset_without_chat_skips_duplicate_records(tmp_path: Path) -> None:
    report = generate(tmp_path / "out", n=10, formats=("asr_csv",), labels_out=tmp_path / "l.jsonl")
    _, bad = read_labels(tmp_path / "l.jsonl")
    assert report.n_malformed == 7
    assert {b["expect_reason"] for b in bad}.isdisjoint({"duplicate", "conflicting_id"})


# ---------------------------------------------------------------------------------------------
# Encodings


def test_encodings_are_what_they_claim(sample: tuple[Path, Path, Any]) -> None:
    out, _, _ = sample
    gb = (out / "chat_gb18030.jsonl").read_bytes()
    gb.decode("gb18030")  # strict
    with pytest.raises(UnicodeDecodeError):
        gb.decode("utf-8")

    big5 = (out / "chat_big5.jsonl").read_bytes()
    text = big5.decode("big5")  # strict
    with pytest.raises(UnicodeDecodeError):
        big5.decode("utf-8")
    assert "請" in text and "请" not in text  # Traditional, not Simplified

    bom = (out / "chat_bom.jsonl").read_bytes()
    assert bom.startswith(b"\xef\xbb\xbf") and bom.count(b"\xef\xbb\xbf") == 1
    bom.decode("utf-8-sig")

    plain = (out / "chat.jsonl").read_bytes()
    assert not plain.startswith(b"\xef\xbb\xbf")
    plain.decode("utf-8")


def test_chat_extras_are_present(tmp_path: Path) -> None:
    generate(tmp_path / "out", n=1000, seed=5, labels_out=tmp_path / "l.jsonl", formats=("chat_jsonl",))
    text = (tmp_path / "out" / "chat.jsonl").read_text(encoding="utf-8")
    assert re.search(r"[０-９]", text) and re.search(r"[Ａ-Ｚ]", text)
    assert any(e in text for e in "😡😭🙏")
    assert re.search(r"(😡|😭|🙏|？|！)\1{7,}", text)  # a flood
    assert "会话已转接人工客服" in text and '"speaker": "bot"' in text and '"speaker": "system"' in text
    channels = {json.loads(line)["channel"] for line in text.splitlines()}
    assert channels == {"chat", "email", "social", "app"}


# ---------------------------------------------------------------------------------------------
# Ground truth


def test_pii_values_are_valid_and_written_exactly(sample: tuple[Path, Path, Any]) -> None:
    out, labels, _ = sample
    good, _ = read_labels(labels)
    texts = read_texts(out)
    seen = Counter()
    for label in good:
        turns = texts[label["conversation_id"]]
        for p in label["pii"]:
            seen[p["kind"]] += 1
            assert p["value"] in turns[p["turn"]][1], (label["conversation_id"], p)
            value = canonical(p["value"])
            if p["kind"] == "id":
                assert id_number_valid(value), value
            elif p["kind"] == "card":
                assert re.fullmatch(r"\d{16,19}", value) and luhn_valid(value), value
            elif p["kind"] == "phone":
                assert re.fullmatch(r"(\+86)?1[3-9]\d{9}", value), value
            elif p["kind"] == "landline":
                assert re.fullmatch(r"0\d{2,3}\d{7,8}", value), value
            elif p["kind"] == "email":
                assert re.fullmatch(r"[\w.]+@[\w.]+\.[a-z]+", value), value
    assert set(seen) == PII_KINDS
    share = sum(bool(label["pii"]) for label in good) / len(good)
    assert 0.3 < share < 0.5
    assert any(p["speaker"] == "agent" for label in good for p in label["pii"])


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**31))
def test_pii_checksums_hold_for_any_seed(seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "out", n=60, seed=seed, labels_out=root / "l.jsonl", malformed=False)
        good, _ = read_labels(root / "l.jsonl")
        texts = read_texts(root / "out")
        for label in good:
            for p in label["pii"]:
                assert p["value"] in texts[label["conversation_id"]][p["turn"]][1]
                if p["kind"] == "id":
                    assert id_number_valid(canonical(p["value"]))
                if p["kind"] == "card":
                    assert luhn_valid(canonical(p["value"]))


def test_order_ids_are_in_text_and_do_not_look_like_pii(sample: tuple[Path, Path, Any]) -> None:
    out, labels, _ = sample
    good, _ = read_labels(labels)
    texts = read_texts(out)
    with_orders = [label for label in good if label["order_ids"]]
    assert len(with_orders) > 150
    for label in with_orders:
        joined = "".join(text for _, text in texts[label["conversation_id"]])
        for order in label["order_ids"]:
            assert order in joined
            plain = canonical(order)
            assert not re.fullmatch(r"1\d{10}|\d{15,19}", plain), order
            assert all(plain not in canonical(p["value"]) for p in label["pii"])


def test_all_issue_types_and_outcomes_in_300(sample: tuple[Path, Path, Any]) -> None:
    _, labels, _ = sample
    good, _ = read_labels(labels)
    issues = [issue for label in good for issue in label["issues"]]
    assert {i["issue_type"] for i in issues} == set(ISSUES)
    assert {i["outcome"] for i in issues} == OUTCOMES
    assert {i["urgency"] for i in issues} == URGENCIES
    assert {i["request_kind"] for i in issues} == KINDS
    assert {i["emotion"] for i in issues} == EMOTIONS
    two = sum(len(label["issues"]) == 2 for label in good)
    assert 0.03 * len(good) < two < 0.15 * len(good)
    for label in good:
        if len(label["issues"]) == 2:
            assert label["issues"][0]["issue_type"] != label["issues"][1]["issue_type"]


def test_text_carries_what_the_labels_claim(sample: tuple[Path, Path, Any]) -> None:
    """Cues the pipeline is expected to find really are there."""
    out, labels, _ = sample
    good, _ = read_labels(labels)
    texts = read_texts(out)
    from opencc import OpenCC

    t2s = OpenCC("t2s")
    for label in good:
        turns = [t2s.convert(text) for _, text in texts[label["conversation_id"]]]
        joined = "".join(turns)
        for k, issue in enumerate(label["issues"]):
            if k == 1:
                assert any(m in turns[issue["start_turn"]] for m in ("另外", "还有", "对了"))
            if issue["outcome"] == "escalated":
                assert re.search("12315|曝光|律师|主管|投诉", joined)
                assert re.search("专员|主管", joined)
    repeat = [label for label in good if any("第三次" in text for _, text in texts[label["conversation_id"]])]
    assert repeat


def test_repeat_contact_metadata(sample: tuple[Path, Path, Any]) -> None:
    out, _, _ = sample
    records = [json.loads(line) for line in (out / "chat.jsonl").read_text(encoding="utf-8").splitlines()]
    flagged = [r for r in records if r["metadata"].get("repeat_contact")]
    assert flagged
    assert all(any("第三次" in t["text"] for t in r["turns"]) for r in flagged)


def test_timestamps_present_or_absent_together(sample: tuple[Path, Path, Any]) -> None:
    out, labels, _ = sample
    good, _ = read_labels(labels)
    by_id = {label["conversation_id"]: label for label in good}
    missing = 0
    for name, enc in CHAT_FILES.items():
        for line in (out / name).read_bytes().decode(enc).splitlines():
            rec = json.loads(line)
            has = rec["started_at"] is not None
            assert by_id[rec["conversation_id"]]["has_timestamps"] == has
            assert all(("ts" in t) == has for t in rec["turns"])
            if has:
                stamps = [datetime.fromisoformat(t["ts"]) for t in rec["turns"]]
                assert stamps == sorted(stamps) and stamps[0] == datetime.fromisoformat(rec["started_at"])
                assert rec["started_at"].endswith("+08:00")
            else:
                missing += 1
    assert 0 < missing < 0.25 * sum(1 for label in good if label["format"] == "chat_jsonl")


# ---------------------------------------------------------------------------------------------
# Calls


def test_asr_json_shape_and_no_punctuation(sample: tuple[Path, Path, Any]) -> None:
    out, labels, _ = sample
    good, _ = read_labels(labels)
    by_id = {label["conversation_id"]: label for label in good}
    channels = Counter()
    for path in sorted((out / "calls").glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        label = by_id[doc["conversation_id"]]
        assert re.fullmatch(r"[0-9a-f]{32}", doc["TaskId"])
        sentences = doc["Result"]["Sentences"]
        ends = 0
        for s in sentences:
            assert not any(unicodedata.category(c).startswith("P") or c.isspace() for c in s["Text"]), s["Text"]
            assert s["Text"] and ends <= s["BeginTime"] < s["EndTime"]
            ends = s["EndTime"]
            assert s["ChannelId"] in (0, 1)
        # The agent greets first.
        assert sentences[0]["ChannelId"] == label["agent_channel"]
        assert re.search("您好|请问|为您|帮您|工号", sentences[0]["Text"])
        channels[label["agent_channel"]] += 1
        for h in label["homophones"]:
            assert (h["meant"], h["heard"]) in HOMOPHONES
            assert h["heard"] in sentences[h["turn"]]["Text"]
    assert set(channels) == {0, 1}
    assert any(label["homophones"] for label in good if label["format"] == "asr_json")


def test_asr_csv_shape(sample: tuple[Path, Path, Any]) -> None:
    out, labels, _ = sample
    good, _ = read_labels(labels)
    with open(out / "calls_asr.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_HEADER
    csv_labels = [label for label in good if label["format"] == "asr_csv"]
    assert len({row[0] for row in rows[1:]}) == len(csv_labels) == 30
    for label in csv_labels:
        first = rows[label["line"] - 1]
        assert first[0] == label["conversation_id"]
        assert int(first[1]) == label["agent_channel"]
        assert not re.search(r"[，。！？、,.!?]", first[4])


# ---------------------------------------------------------------------------------------------
# Malformed records


def test_malformed_records_break_as_labelled(sample: tuple[Path, Path, Any]) -> None:
    out, labels, _ = sample
    good, bad = read_labels(labels)
    lines = (out / MALFORMED_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == len(bad)
    reasons = {b["expect_reason"]: lines[b["line"] - 1] for b in bad}
    assert set(reasons) == {"malformed_json", "not_an_object", "no_turns", "empty_text", "unknown_speaker",
                            "undecodable_bytes", "missing_id", "duplicate", "conflicting_id"}

    with pytest.raises(json.JSONDecodeError):
        json.loads(reasons["malformed_json"])
    assert isinstance(json.loads(reasons["not_an_object"]), list)
    assert json.loads(reasons["no_turns"])["turns"] == []
    assert all(t["text"] == "" for t in json.loads(reasons["empty_text"])["turns"])
    assert "manager" in {t["speaker"] for t in json.loads(reasons["unknown_speaker"])["turns"]}
    with pytest.raises(UnicodeDecodeError):
        reasons["undecodable_bytes"].decode("utf-8")
    json.loads(reasons["undecodable_bytes"].decode("utf-8", errors="replace"))  # only the bytes are bad
    assert "conversation_id" not in json.loads(reasons["missing_id"])

    originals = (out / "chat.jsonl").read_bytes().split(b"\n")
    assert reasons["duplicate"] in originals
    conflict = json.loads(reasons["conflicting_id"])
    same_id = [json.loads(line) for line in originals if line and json.loads(line)["conversation_id"]
               == conflict["conversation_id"]]
    assert len(same_id) == 1 and same_id[0] != conflict
    assert {conflict["conversation_id"]} <= {label["conversation_id"] for label in good}


def test_malformed_off(tmp_path: Path) -> None:
    report = generate(tmp_path / "out", n=20, malformed=False)
    assert report.n_malformed == 0 and not (tmp_path / "out" / MALFORMED_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Scale


def test_ten_thousand(tmp_path: Path) -> None:
    labels = tmp_path / "labels.jsonl"
    report = generate(tmp_path / "out", n=10_000, seed=2, labels_out=labels)
    good, bad = read_labels(labels)
    assert report.n_conversations == len(good) == 10_000
    assert len(bad) == report.n_malformed == 9
    lines = {name: len((tmp_path / "out" / name).read_bytes().splitlines()) for name in CHAT_FILES}
    assert lines == {"chat.jsonl": 5500, "chat_gb18030.jsonl": 1000, "chat_big5.jsonl": 800, "chat_bom.jsonl": 500}
    assert len(list((tmp_path / "out" / "calls").glob("*.json"))) == 1200
    csv_ids = {row.split(",", 1)[0] for row in
               io.StringIO((tmp_path / "out" / "calls_asr.csv").read_text(encoding="utf-8")).read().splitlines()[1:]}
    assert len(csv_ids) == 1000
