"""A new user's first commands: pre-flight errors in one line, the path rule for a config kept
elsewhere, the documented reads, nothing-new nights, the run lock, Prefect on a busy machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import _register, app
from pipeline.config import PACKAGE_ROOT, load_config
from pipeline.orchestrate.nightly import run_pipeline, summary_text
from pipeline.progress import reporting

_register()
runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
CASEMINE = [sys.executable, "-c", "from pipeline.cli import main; main()"]


@pytest.fixture(scope="module")
def small_input(tmp_path_factory) -> Path:
    from pipeline.sample.generate import generate

    root = tmp_path_factory.mktemp("small")
    generate(root / "in", n=24, seed=5, malformed=False)
    return root / "in"


def _one_line_error(r) -> str:
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    return errors[0]


# -- pre-flight ---------------------------------------------------------------------------------

def test_out_that_is_a_file_is_refused_before_any_work(small_input, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "below"):
        r = runner.invoke(app, ["run", "--input", str(small_input), "--out", str(out), "--no-prefect"])
        assert r.exit_code == 2
        assert "--out" in _one_line_error(r)


def test_empty_delivery_fails_unless_allowed(tmp_path):
    empty = tmp_path / "in"
    empty.mkdir()
    r = runner.invoke(app, ["run", "--input", str(empty), "--out", str(tmp_path / "o"), "--no-prefect"])
    assert r.exit_code == 1 and "--allow-empty" in _one_line_error(r)
    assert not (tmp_path / "o" / "runs").exists()
    r = runner.invoke(app, ["run", "--input", str(empty), "--out", str(tmp_path / "o"), "--no-prefect",
                            "--allow-empty", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "nothing_new"


def test_missing_resource_named_with_its_key_before_any_work(small_input, tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("segment:\n  stopwords: configs/no-such-stopwords.txt\n", encoding="utf-8")
    r = runner.invoke(app, ["run", "--config", str(conf), "--input", str(small_input), "--out",
                            str(tmp_path / "o"), "--no-prefect"])
    assert r.exit_code == 2
    assert "segment.stopwords" in _one_line_error(r)
    assert not (tmp_path / "o").exists()


def test_config_outside_configs_resolves_by_the_documented_rule(small_input, tmp_path, fake_embedder):
    """A copy of casemine.yaml elsewhere: its relative data paths hang off its own folder, and the
    `configs/...` resources it names come from casemine's bundled copies."""
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    shutil.copy(PACKAGE_ROOT / "configs" / "casemine.yaml", deploy / "casemine.yaml")
    cfg = load_config(deploy / "casemine.yaml")
    assert cfg.resolve(cfg.paths.out) == deploy / "data"
    assert cfg.resolve(cfg.segment.stopwords) == PACKAGE_ROOT / "configs" / "stopwords.txt"
    (deploy / "configs").mkdir()
    (deploy / "configs" / "stopwords.txt").write_text("的\n", encoding="utf-8")
    assert cfg.resolve(cfg.segment.stopwords) == deploy / "configs" / "stopwords.txt"  # a local copy wins
    r = runner.invoke(app, ["run", "--config", str(deploy / "casemine.yaml"), "--input", str(small_input),
                            "--no-prefect", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["out"] == str(deploy / "data")
    assert (deploy / "data" / "processed" / "cases").is_dir()


# -- the documented reads, nothing new, the lock --------------------------------------------------

@pytest.fixture(scope="module")
def run_out(small_input, tmp_path_factory):
    """One plain run over the small input (module scope: several tests read it)."""
    from _pytest.monkeypatch import MonkeyPatch

    from pipeline.embed import Embedder
    from pipeline.embed.fake import HashingEmbedder

    mp = MonkeyPatch()
    fake = HashingEmbedder()
    mp.setattr(Embedder, "_load", lambda self: None)
    mp.setattr(Embedder, "_encode_raw", lambda self, texts, kind: fake.encode(texts))
    mp.setattr(Embedder, "encode_queries", lambda self, texts: fake.encode(list(texts)))
    out = tmp_path_factory.mktemp("run") / "out"
    stages: dict[str, tuple[int, int]] = {}
    try:
        with reporting(lambda stage, done, total: stages.__setitem__(stage, (done, total))):
            summary = run_pipeline(load_config(REPO / "configs" / "casemine.yaml"), small_input, out)
    finally:
        mp.undo()
    return out, summary, stages


def test_readme_reads_of_the_case_table_work(run_out):
    import duckdb
    import pyarrow.parquet as pq

    out, summary, _ = run_out
    n = summary["cases"]["written"]
    cases = out / "processed" / "cases"
    df = pd.read_parquet(cases)  # the README's pandas read
    assert len(df) == n and df["date"].notna().all()
    con = duckdb.connect()
    by_outcome = con.execute(f"SELECT outcome, count(*) FROM read_parquet('{cases}/*/*.parquet', "
                             "hive_partitioning=true) GROUP BY 1").fetchall()
    assert sum(c for _, c in by_outcome) == n
    assert pq.read_table(cases).num_rows == n


def test_every_stage_reports_progress(run_out):
    _, summary, stages = run_out
    assert {"ingest", "process", "index", "commit", "export", "library"} <= set(stages)
    assert stages["process"] == (summary["records"]["accepted"], summary["records"]["accepted"])


def test_second_run_with_nothing_new_says_so_and_writes_nothing(run_out, small_input):
    out, _, _ = run_out
    runs_before = sorted(p.name for p in (out / "runs").iterdir())
    r = runner.invoke(app, ["run", "--input", str(small_input), "--out", str(out), "--json"])  # default: Prefect
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["status"] == "nothing_new" and "nothing new" in r.output
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs_before


def test_summary_has_no_empty_or_none_lines(run_out):
    _, summary, _ = run_out
    quiet = {**summary, "classification": {}, "records": {**summary["records"], "accepted": 0},
             "throughput": {"transcripts_per_s": 0.0, "segment_chars_per_s": None}}
    text = summary_text(quiet)
    assert "None" not in text and "classification" not in text and "0.0 transcripts/s" not in text
    assert all(line.split() for line in text.splitlines())


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding `out`'s run lock (kill it to let go)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from pipeline.orchestrate.lock import run_lock\n"
        f"with run_lock(Path({str(out)!r}), command='holder-test'):\n"
        "    print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("command", ["run", "clusters export"])
def test_a_second_command_on_a_held_out_root_is_refused_naming_the_holder(command, small_input, tmp_path):
    # The export too: it appends to its case copy and membership in place, never beside a run's.
    out = tmp_path / "o"
    if command == "run":
        args = ["run", "--input", str(small_input), "--out", str(out), "--no-prefect"]
    else:
        (out / "processed" / "cases").mkdir(parents=True)
        args = ["clusters", "export", "--out", str(out)]
    holder = _hold_lock(out)
    try:
        r = runner.invoke(app, args)
        assert r.exit_code == 1
        line = _one_line_error(r)
        assert "in use by" in line and f"pid {holder.pid}" in line and "holder-test" in line
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the killed holder's lock: the stale lock file does not block
    from pipeline.orchestrate.lock import run_lock

    with run_lock(out):
        pass


# -- Prefect ------------------------------------------------------------------------------------

def test_schedule_without_a_server_refuses_with_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile with an API URL
    r = subprocess.run([*CASEMINE, "schedule"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "prefect server start" in r.stderr and "Traceback" not in r.stderr
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # nothing listens on the discard port
    r = subprocess.run([*CASEMINE, "schedule"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not answer" in r.stderr and "Traceback" not in r.stderr


def _config_with(tmp_path: Path, flow: dict) -> Path:
    raw = yaml.safe_load((PACKAGE_ROOT / "configs" / "casemine.yaml").read_text(encoding="utf-8"))
    raw["flow"] = {**raw.get("flow", {}), **flow}
    (tmp_path / "configs").mkdir(exist_ok=True)
    p = tmp_path / "configs" / "casemine.yaml"  # inside a configs/ folder: resources resolve beside it, else bundled
    p.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return p


@pytest.mark.slow
def test_prefect_that_cannot_start_does_not_lose_the_night(small_input, tmp_path):
    """A server start that keeps timing out: the same steps run without Prefect, exit 0."""
    conf = _config_with(tmp_path, {"prefect_startup_timeout_s": 1, "prefect_start_attempts": 2})
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    r = subprocess.run([*CASEMINE, "run", "--config", str(conf), "--input", str(small_input), "--out",
                        str(tmp_path / "o"), "--json"], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["runner"].startswith("plain: Prefect was unavailable") and "2 attempt(s)" in summary["runner"]
    assert summary["records"]["reconciles"] and summary["cases"]["written"] > 0
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_run_succeeds_with_both_cores_busy(small_input, tmp_path):
    """`casemine run` (Prefect by default) while two processes keep both cores at 100%."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",
                                                                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
        env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
        r = subprocess.run([*CASEMINE, "run", "--input", str(small_input), "--out", str(tmp_path / "o"), "--json"],
                           env=env, capture_output=True, text=True, timeout=3000, cwd=REPO)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["records"]["reconciles"] and summary["cases"]["written"] > 0
    assert "Prefect" in summary["runner"]  # as a flow, or said why not


def test_unexpected_errors_are_one_line_unless_debug(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "state").write_text("a file where a folder belongs")
    r = subprocess.run([*CASEMINE, "repair", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--debug" in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
    r = subprocess.run([*CASEMINE, "repair", "--out", str(out), "--debug"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" in r.stderr
