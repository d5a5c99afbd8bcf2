"""Property tests: the readers and the normaliser never crash and never lose a record."""

import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.config import IngestConfig
from pipeline.ingest import read_file
from pipeline.text.prepare import get_masker, get_normalizer

speakers = st.sampled_from(["customer", "agent", "system", "bot", "客户", "manager", "", None, 3])
texts = st.one_of(st.text(max_size=60), st.none(), st.integers())
turn = st.one_of(st.fixed_dictionaries({"speaker": speakers, "text": texts}), st.text(max_size=5), st.none())
record = st.one_of(
    st.fixed_dictionaries({"conversation_id": st.one_of(st.text(max_size=8), st.integers(), st.none()),
                           "turns": st.one_of(st.lists(turn, max_size=6), st.none(), st.text(max_size=3)),
                           "started_at": st.one_of(st.none(), st.text(max_size=12), st.integers(), st.just("2025-01-01T00:00:00+08:00"))}),
    st.lists(st.integers(), max_size=3), st.text(max_size=20), st.integers())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(records=st.lists(st.one_of(record.map(lambda r: json.dumps(r, ensure_ascii=False).encode()), st.binary(max_size=40)), max_size=12),
       encoding=st.sampled_from(["utf-8", "gb18030"]))
# A file that opens with a UTF-16 BOM is read as UTF-16, where a line does not end at each 0x0A byte.
@example(records=[b"\xfe\xff", b'{"conversation_id": null, "turns": null, "started_at": null}', b"[]"], encoding="utf-8")
def test_jsonl_reader_accounts_for_every_line(tmp_path_factory, records, encoding):
    lines = [r.replace(b"\n", b" ").replace(b"\r", b" ") for r in records]
    data = b"\n".join(lines)
    p = tmp_path_factory.mktemp("fz") / "f.jsonl"
    p.write_bytes(data)
    res = read_file(p, IngestConfig())
    nonblank = 0
    # The file's own leading BOM marks its encoding, not a record (a BOM-only file has none);
    # a BOM starting a later line is that line's.
    body = data[3:] if res.encoding == "utf-8-sig" and data.startswith(b"\xef\xbb\xbf") else data
    if res.encoding == "utf-16":  # decoded whole, then split into lines (a bad unit reads as U+FFFD)
        body = b""
        nonblank = sum(bool(t.strip()) for t in data.decode("utf-16", errors="replace").split("\n"))
    for raw in body.split(b"\n") if body else []:
        try:
            nonblank += bool(raw.decode(res.encoding if res.encoding != "utf-8-sig" else "utf-8").strip())
        except UnicodeDecodeError:
            nonblank += 1
    assert res.n_read == nonblank
    for q in res.quarantined:
        assert q.reason and q.detail


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4), st.text(max_size=6), st.text(max_size=30)), max_size=10))
def test_csv_reader_never_crashes(tmp_path_factory, rows):
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["conversation_id", "channel_id", "begin_ms", "text"])
    w.writerows(rows)
    p = tmp_path_factory.mktemp("fzc") / "f.csv"
    p.write_text(buf.getvalue(), encoding="utf-8")
    res = read_file(p, IngestConfig())
    ids = {r[0].strip() for r in rows if r[0].strip()}
    grouped = {c.conversation_id for c in res.conversations} | {q.conversation_id for q in res.quarantined if q.conversation_id}
    assert ids <= grouped | {None}


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200), asr=st.booleans())
def test_normaliser_and_masker_total(cfg, text, asr):
    out = get_normalizer(cfg).normalize(text, asr=asr)
    assert isinstance(out, str) and "\u200b" not in out and "\ufeff" not in out
    masked, counts = get_masker(cfg).mask(out)
    assert isinstance(masked, str)
    orig, _ = get_masker(cfg).mask_original(text)
    assert isinstance(orig, str)
