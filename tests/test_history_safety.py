"""Nothing committed is ever lost: lost or garbled state, a missing index CURRENT, files of
unknown runs, a run cut between its manifest and its commit, two runs on one --out."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import _register, app
from pipeline.retrieval.index import IndexLoadError, IndexStore
from pipeline.retrieval.update import index_root
from pipeline.orchestrate.nightly import repair, run_pipeline
from pipeline.storage.state import State, StateError, key
from pipeline.storage.store import CorruptOutputError, read_cases

_register()
runner = CliRunner()
CASEMINE = [sys.executable, "-c", "from pipeline.cli import main; main()"]


@pytest.fixture(scope="module")
def deliveries(tmp_path_factory) -> tuple[Path, Path]:
    """Two deliveries of different conversations (the generator numbers ids from 1: prefix them)."""
    from pipeline.sample.generate import generate

    root = tmp_path_factory.mktemp("deliveries")
    for name, seed in (("a", 21), ("b", 22)):
        generate(root / "gen" / name, n=20, seed=seed, malformed=False, formats=("chat_jsonl",))
        (root / name).mkdir()
        lines = (root / "gen" / name / "chat.jsonl").read_text(encoding="utf-8").splitlines()
        recs = [json.loads(line) for line in lines if line.strip()]
        for r in recs:
            r["conversation_id"] = f"{name.upper()}-{r['conversation_id']}"
        (root / name / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs),
                                                encoding="utf-8")
    return root / "a", root / "b"


def _history(cfg, out: Path) -> tuple[int, int]:
    """(distinct stored cases, vectors in the live index)."""
    idx = IndexStore(index_root(out), cfg.index).load(verify=False)
    return read_cases(out)["case_id"].nunique(), len(idx)


def _committed(cfg, deliveries, out: Path, fake_embedder) -> tuple[int, int]:
    run_pipeline(cfg, deliveries[0], out)
    before = _history(cfg, out)
    assert before[0] == before[1] > 0
    return before


def test_lost_state_stops_the_run_and_repair_rebuilds_it(cfg, deliveries, tmp_path, fake_embedder):
    out = tmp_path / "o"
    before = _committed(cfg, deliveries, out, fake_embedder)
    for p in (out / "state").glob("state.sqlite*"):
        p.unlink()
    with pytest.raises(StateError, match="casemine repair"):
        run_pipeline(cfg, deliveries[1], out)
    assert _history(cfg, out) == before  # nothing deleted
    rep = repair(out)
    assert rep["state_rebuilt"] is False and len(rep["replayed_runs"]) == 1
    summary = run_pipeline(cfg, deliveries[0], out)  # the same delivery again: all duplicates
    assert summary["records"]["accepted"] == 0 and _history(cfg, out) == before


def test_emptied_state_database_is_not_taken_for_an_empty_history(cfg, deliveries, tmp_path, fake_embedder):
    out = tmp_path / "o"
    before = _committed(cfg, deliveries, out, fake_embedder)
    db = sqlite3.connect(out / "state" / "state.sqlite")
    for table in ("runs", "conversations", "files", "parts", "orders", "quarantined"):
        db.execute(f"DELETE FROM {table}")
    db.commit()
    db.close()
    r = runner.invoke(app, ["run", "--input", str(deliveries[1]), "--out", str(out), "--no-prefect"])
    assert r.exit_code == 1 and "casemine repair" in r.output and "Traceback" not in r.output
    assert _history(cfg, out) == before


def test_garbled_state_gives_one_line_and_repair_moves_it_aside(cfg, deliveries, tmp_path, fake_embedder):
    out = tmp_path / "o"
    before = _committed(cfg, deliveries, out, fake_embedder)
    for p in (out / "state").glob("state.sqlite-*"):
        p.unlink()
    (out / "state" / "state.sqlite").write_bytes(b"this is not a database" * 100)
    r = runner.invoke(app, ["run", "--input", str(deliveries[1]), "--out", str(out), "--no-prefect"])
    assert r.exit_code == 1 and "damaged" in r.output and "casemine repair" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["repair", "--out", str(out), "--json"])
    rep = json.loads(r.stdout)
    assert rep["state_rebuilt"] and len(rep["replayed_runs"]) == 1
    assert list((out / "state").glob("state.sqlite.damaged-*"))
    run_pipeline(cfg, deliveries[1], out)
    after = _history(cfg, out)
    assert after[0] == after[1] > before[0]


def test_missing_index_current_stops_instead_of_shrinking_the_index(cfg, deliveries, tmp_path, fake_embedder):
    out = tmp_path / "o"
    _committed(cfg, deliveries, out, fake_embedder)
    (index_root(out) / "CURRENT").unlink()
    with pytest.raises(IndexLoadError, match="casemine index --rebuild"):
        run_pipeline(cfg, deliveries[1], out)
    versions = IndexStore(index_root(out), cfg.index).versions()
    assert len(versions) == 1  # no new, smaller version was published


def test_case_files_of_an_unknown_run_are_never_deleted(cfg, deliveries, tmp_path, fake_embedder):
    out = tmp_path / "o"
    _committed(cfg, deliveries, out, fake_embedder)
    part = next((out / "processed" / "cases").glob("date=*/part-*.parquet"))
    stray = part.with_name("part-20990101T000000Z-abcdef-00000.parquet")
    stray.write_bytes(part.read_bytes())
    with pytest.raises(CorruptOutputError, match="does not know"):
        run_pipeline(cfg, deliveries[1], out)
    assert stray.exists()
    rep = repair(out)
    assert rep["adopted_runs"] == ["20990101T000000Z-abcdef"]
    run_pipeline(cfg, deliveries[1], out)
    assert stray.exists()


def test_a_run_cut_between_manifest_and_commit_is_finished_by_the_next(cfg, deliveries, tmp_path, fake_embedder,
                                                                      monkeypatch):
    out = tmp_path / "o"

    def dies(self, rec):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(State, "commit_run", dies)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, deliveries[0], out)
    monkeypatch.undo()
    summary = run_pipeline(cfg, deliveries[0], out)
    assert summary["records"]["accepted"] == 0  # the cut run's commit was completed from its manifest
    n_cases, n_index = _history(cfg, out)
    assert n_cases == n_index > 0


def test_state_keeps_no_raw_ids_or_file_names(cfg, tmp_path, fake_embedder):
    phone = "13912345678"
    inp = tmp_path / "in"
    inp.mkdir()
    conv = {"conversation_id": f"CALLBACK-{phone}", "turns": [
        {"speaker": "customer", "text": "快递三天没到"}, {"speaker": "agent", "text": "已为您催促物流"}]}
    (inp / f"export_{phone}.jsonl").write_text(json.dumps(conv, ensure_ascii=False) + "\n", encoding="utf-8")
    run_pipeline(cfg, inp, tmp_path / "o")
    state = State(tmp_path / "o")
    state.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "o" / "state").glob("state.sqlite*"))
    assert phone.encode() not in raw
    # and a re-delivery is still recognised
    assert run_pipeline(cfg, inp, tmp_path / "o")["files"]["skipped_unchanged"] == 1


def test_version_1_state_is_keyed_in_place(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    db = sqlite3.connect(d / "state.sqlite")
    db.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, status TEXT NOT NULL);
        CREATE TABLE conversations (conversation_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, run_id TEXT NOT NULL);
        CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, run_id TEXT NOT NULL);
        INSERT INTO runs VALUES ('r1', 'x', 'y', 'committed');
        INSERT INTO conversations VALUES ('CALL-13912345678', 'h1', 'r1');
        INSERT INTO files VALUES ('calls/13912345678.json', 10, 5, 'abc', 'r1');""")
    db.commit()
    db.close()
    s = State(tmp_path)
    try:
        assert s.seen_hashes(["CALL-13912345678"]) == {"CALL-13912345678": "h1"}
        assert s.file_unchanged("calls/13912345678.json", 10, 5, lambda: "abc")
        rows = s.db.execute("SELECT conversation_id FROM conversations").fetchall()
        assert rows == [(key("CALL-13912345678"),)]
    finally:
        s.close()


def test_cause_attribution_does_not_depend_on_hash_seed():
    code = ("from pipeline.insights.cluster import CauseLexicon\n"
            "lex = CauseLexicon.from_dict({'causes': [{'phrase': '延迟', 'category': 'logistics_partner'},\n"
            "                                         {'phrase': '破损', 'category': 'product'}]})\n"
            "print(lex.attribute(['延迟 破损', '破损 延迟'], 0.1))")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in (1, 2, 3, 4)}
    assert len(outs) == 1


@pytest.mark.slow
def test_two_runs_on_one_out_never_lose_or_duplicate_a_case(deliveries, tmp_path):
    """Two `casemine run` at once on one --out: different deliveries, then the same one."""
    out = tmp_path / "o"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}

    def both(a: Path, b: Path) -> list[subprocess.CompletedProcess]:
        procs = [subprocess.Popen([*CASEMINE, "run", "--no-prefect", "--wait", "1200", "--input", str(d), "--out",
                                   str(out), "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for d in (a, b)]
        return [subprocess.CompletedProcess(p.args, p.wait(), *p.communicate()) for p in procs]

    first = both(*deliveries)
    assert [r.returncode for r in first] == [0, 0], [r.stderr[-2000:] for r in first]
    written = sum(json.loads(r.stdout)["cases"]["written"] for r in first)
    from pipeline.config import load_config

    cfg = load_config()
    assert _history(cfg, out) == (written, written)
    again = both(deliveries[0], deliveries[0])  # the same delivery twice at once
    assert all(r.returncode == 0 for r in again)
    assert _history(cfg, out) == (written, written)
    # and a run that does not wait is refused with the holder named
    holder = subprocess.Popen([*CASEMINE, "run", "--no-prefect", "--input", str(deliveries[1]), "--out", str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        lock = out / "state" / "run.lock"
        for _ in range(600):  # until the holder has written its name into the lock file
            if lock.is_file() and lock.read_text():
                break
            time.sleep(0.5)
        r = subprocess.run([*CASEMINE, "run", "--no-prefect", "--input", str(deliveries[1]), "--out", str(out)],
                           env=env, capture_output=True, text=True)
        assert r.returncode in (0, 1)
        if r.returncode == 1:  # refused while the holder ran (it may already have finished)
            assert "in use by" in r.stderr
    finally:
        holder.wait()
