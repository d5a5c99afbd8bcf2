"""Agents keep querying while the nightly run updates the index: every query succeeds."""

import json
import os
import subprocess
import sys
import time

import pytest

from pipeline.orchestrate import nightly as steps
from pipeline.sample.generate import generate


def cli(*args):
    return [sys.executable, "-m", "pipeline.cli.__main__", *args]


@pytest.mark.slow
def test_queries_during_a_nightly_update(sample, cfg, tmp_path):
    input_dir, _ = sample
    out = tmp_path / "out"
    steps.run_pipeline(cfg, input_dir, out)  # yesterday's index
    night = tmp_path / "night2"
    generate(night, n=300, seed=99, malformed=False, formats=("chat_jsonl",))
    lines = [json.loads(x) for x in (night / "chat.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    for r in lines:
        r["conversation_id"] = "N2-" + r["conversation_id"]
    (night / "chat.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n", encoding="utf-8")
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    nightly = subprocess.Popen(cli("run", "--no-prefect", "--input", str(night), "--out", str(out)), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    answers, versions = 0, set()
    deadline = time.time() + 600
    while nightly.poll() is None and time.time() < deadline:
        q = subprocess.run(cli("query", "快递三天没到", "-k", "3", "--out", str(out), "--local", "--json"),
                           capture_output=True, text=True, env=env, timeout=300)
        assert q.returncode == 0, q.stderr
        res = json.loads(q.stdout)
        assert len(res["results"]) == 3
        versions.add(res["index_version"])
        answers += 1
    assert nightly.wait(timeout=600) == 0, nightly.stderr.read()
    assert answers >= 1
    # every answer came from a whole index, the old (v1) or the new (v2); afterwards the new one is live
    assert versions <= {1, 2}
    q = subprocess.run(cli("query", "快递三天没到", "--out", str(out), "--local", "--json"), capture_output=True, text=True, env=env)
    assert q.returncode == 0 and json.loads(q.stdout)["index_version"] == 2
