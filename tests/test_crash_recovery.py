"""Kill the nightly run with SIGKILL during each stage, re-run, and get what an uninterrupted run
gets: the same cases, the same index, nothing duplicated, nothing lost."""

import json
import os
import signal
import subprocess
import sys

import pytest

from pipeline.index import IndexStore, index_root
from pipeline.store import read_cases

STAGES = ["ingest", "store", "index", "commit"]


def casemine(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli.__main__", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def snapshot(cfg, out):
    cases = read_cases(out)
    idx = IndexStore(index_root(out), cfg.index).load()
    return (sorted(zip(cases["case_id"], cases["problem"], cases["outcome"], cases["issue_type"])),
            sorted(idx.meta["case_id"]), len(idx))


@pytest.fixture(scope="module")
def reference(sample, cfg, tmp_path_factory):
    input_dir, _ = sample
    out = tmp_path_factory.mktemp("ref")
    r = casemine(["run", "--no-prefect", "--input", str(input_dir), "--out", str(out), "--batch-size", "50"])
    assert r.returncode == 0, r.stderr
    return snapshot(cfg, out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_then_rerun_equals_uninterrupted(stage, sample, cfg, reference, tmp_path):
    input_dir, _ = sample
    args = ["run", "--no-prefect", "--input", str(input_dir), "--out", str(tmp_path), "--batch-size", "50", "--json"]
    killed = casemine(args, {"CASEMINE_KILL_AT": stage})
    assert killed.returncode == -signal.SIGKILL
    again = casemine(args)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["records"]["reconciles"]
    cases, index_ids, n_vectors = snapshot(cfg, tmp_path)
    assert cases == reference[0]
    assert index_ids == reference[1] and n_vectors == reference[2] == len(set(index_ids))
