import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import _register, app
from pipeline.config import ConfigError, load_config
from pipeline.storage.store import read_cases

_register()
runner = CliRunner()


def test_config_errors_name_the_key(tmp_path):
    (tmp_path / "configs").mkdir()
    bad = tmp_path / "configs" / "casemine.yaml"
    bad.write_text("segment:\n  procesess: 2\nflow:\n  batch_size: -1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "segment.procesess: unknown key" in str(e.value) and "flow.batch_size" in str(e.value)


def test_bad_config_exits_2_with_message(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("paths: [1, 2]\n", encoding="utf-8")
    r = runner.invoke(app, ["run", "--config", str(bad), "--no-prefect"])
    assert r.exit_code == 2 and "paths" in r.output


def test_help_everywhere():
    for args in (["--help"], ["run", "--help"], ["ingest", "--help"], ["sample", "--help"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage" in r.output


def test_missing_input_fails_clearly(tmp_path):
    r = runner.invoke(app, ["run", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-prefect"])
    assert r.exit_code == 1 and "does not exist" in r.output


def test_sample_ingest_run_json(tmp_path):
    r = runner.invoke(app, ["sample", "--out", str(tmp_path / "in"), "--n", "40", "--labels-out", str(tmp_path / "l.jsonl"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["conversations"] == 40
    r = runner.invoke(app, ["ingest", "--input", str(tmp_path / "in"), "--json"])
    rep = json.loads(r.stdout)
    assert rep["totals"]["read"] == rep["totals"]["accepted"] + rep["totals"]["quarantined"]
    assert not (tmp_path / "in" / "processed").exists()  # ingest writes nothing
    r = runner.invoke(app, ["run", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--no-prefect", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["records"]["reconciles"] and summary["cases"]["written"] == len(read_cases(tmp_path / "out"))


def test_labels_inside_input_refused(tmp_path):
    r = runner.invoke(app, ["sample", "--out", str(tmp_path / "in"), "--labels-out", str(tmp_path / "in" / "l.jsonl")])
    assert r.exit_code == 2


@pytest.mark.slow
def test_prefect_flow_equals_plain_run(sample, cfg, tmp_path):
    from pipeline.orchestrate import nightly as steps
    from pipeline.orchestrate.prefect_flow import nightly

    input_dir, _ = sample
    s = nightly(str(input_dir), str(tmp_path / "flow"))
    steps.run_pipeline(cfg, input_dir, tmp_path / "plain")
    assert s["records"]["reconciles"]
    cols = ["case_id", "problem", "handling", "outcome", "tokens"]
    a = read_cases(tmp_path / "flow")[cols].sort_values("case_id").reset_index(drop=True)
    b = read_cases(tmp_path / "plain")[cols].sort_values("case_id").reset_index(drop=True)
    assert a.drop(columns="tokens").equals(b.drop(columns="tokens"))
    assert [list(x) for x in a["tokens"]] == [list(x) for x in b["tokens"]]


def test_a_run_opens_the_state_database_once(sample, cfg, tmp_path, monkeypatch, fake_embedder):
    """The run's steps share the connection start_run opens (ingest, commit, the derived-output
    marker each opened their own before); a batch sent to another process does not carry it."""
    import pickle

    from pipeline.orchestrate import nightly as steps
    from pipeline.storage.state import State

    opened: list[State] = []
    real_init = State.__init__

    def counting_init(self, out):
        real_init(self, out)
        opened.append(self)

    monkeypatch.setattr(State, "__init__", counting_init)
    input_dir, _ = sample
    s = steps.run_pipeline(cfg, input_dir, tmp_path / "o")
    assert s["cases"]["written"] > 0 and s["records"]["reconciles"]
    assert len(opened) == 1
    with pytest.raises(Exception, match="closed"):  # closed when the run ended
        opened[0].db.execute("SELECT 1")

    ctx = steps.start_run(cfg, input_dir, tmp_path / "o2")
    try:
        assert ctx.state is not None
        shipped = pickle.loads(pickle.dumps(ctx))
        assert shipped.state is None and shipped.run_id == ctx.run_id
        assert ctx.db.known_runs()[ctx.run_id] == "running"  # the original keeps its connection
    finally:
        ctx.close()
    assert ctx.state is None


def test_an_order_an_earlier_run_committed_makes_a_repeat_contact(cfg, tmp_path, fake_embedder):
    """Prior orders are looked up once at ingest and handed to the batches: a conversation about
    an order a committed run saw is a repeat contact, one about a new order is not."""
    from pipeline.orchestrate import nightly as steps

    src = (cfg.resolve(cfg.paths.input) / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [json.loads(x) for x in src[:3]]
    for n, r in enumerate(recs):
        r["metadata"]["order_id"] = f"JD-TEST-{n}"
    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    day1.mkdir()
    day2.mkdir()
    (day1 / "a.jsonl").write_text(json.dumps(recs[0], ensure_ascii=False) + "\n", encoding="utf-8")
    again = {**recs[1], "conversation_id": "AGAIN-1", "metadata": {**recs[1]["metadata"], "order_id": "JD-TEST-0"}}
    lines = [json.dumps(r, ensure_ascii=False) for r in (again, recs[2])]
    (day2 / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    steps.run_pipeline(cfg, day1, out)
    steps.run_pipeline(cfg, day2, out)
    cases = read_cases(out).drop_duplicates("conversation_id").set_index("conversation_id")
    assert not cases.loc[recs[0]["conversation_id"], "repeat_contact"]
    assert cases.loc["AGAIN-1", "repeat_contact"]
    assert not cases.loc[recs[2]["conversation_id"], "repeat_contact"]


@pytest.mark.parametrize("given", [None, "jemalloc"])
def test_the_command_gives_arrows_cpp_code_the_system_pool(given):
    """Arrow's C++ reads allocate from the pool named when pyarrow loads; the command names the
    system pool first (its memory is glibc's, which a trim returns), unless the user named one."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if given:
        env["ARROW_DEFAULT_MEMORY_POOL"] = given
    code = (
        "import pipeline.cli, pandas, pyarrow as pa, pyarrow.parquet, os;"
        "print(pa.default_memory_pool().backend_name, os.environ['ARROW_DEFAULT_MEMORY_POOL'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ([given] * 2 if given else ["system", "system"])
