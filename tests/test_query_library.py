"""`casemine query --library` searches only published typical cases and counts their use."""

import json
import sqlite3

from typer.testing import CliRunner

from pipeline.orchestrate import nightly as steps
from pipeline.cli import _register, app

_register()
runner = CliRunner()


def test_query_library_only_returns_published_cases(sample, cfg, tmp_path):
    input_dir, _ = sample
    out = tmp_path / "out"
    steps.run_pipeline(cfg, input_dir, out)
    r = runner.invoke(app, ["query", "快递没到", "--library", "--out", str(out), "--local", "--json"])
    assert r.exit_code == 1 and "library publish" in r.output  # nothing published yet
    listed = json.loads(runner.invoke(app, ["library", "list", "--out", str(out), "--json"]).stdout.splitlines()[0])
    cid = listed["case_id"]
    assert runner.invoke(app, ["library", "approve", cid, "--by", "tester", "--out", str(out)]).exit_code == 0
    assert runner.invoke(app, ["library", "publish", "--out", str(out)]).exit_code == 0
    r = runner.invoke(app, ["query", "快递没到", "-k", "5", "--library", "--out", str(out), "--local", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["results"]
    assert [h["case_id"] for h in hits] == [cid]
    db = sqlite3.connect(out / "library" / "library.sqlite")
    assert db.execute("SELECT count FROM usage WHERE case_id = ?", (cid,)).fetchone()[0] == 1
    # the query text is never stored
    dump = "\n".join(db.iterdump())
    assert "快递没到" not in dump
