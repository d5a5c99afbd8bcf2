"""Kill the nightly run with SIGKILL during each stage, re-run, and get what an uninterrupted run
gets: the same cases, the same index, nothing duplicated, nothing lost."""

import json
import os
import signal
import subprocess
import sys

import pytest

from pipeline.retrieval.index import IndexStore
from pipeline.retrieval.update import index_root
from pipeline.storage.store import read_cases

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


def test_damaged_case_file_is_detected_and_repaired(sample, cfg, tmp_path):
    from pipeline.orchestrate import nightly as steps
    from pipeline.storage.store import CorruptOutputError

    input_dir, _ = sample
    out = tmp_path / "out"
    steps.run_pipeline(cfg.with_overrides(flow={"batch_size": 60}), input_dir, out)
    before = sorted(read_cases(out)["case_id"])
    part = sorted((out / "processed" / "cases").rglob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated
    with pytest.raises(CorruptOutputError, match="casemine repair"):
        steps.run_pipeline(cfg, input_dir, out)
    rep = steps.repair(out, check_only=True)
    assert rep["problems"] and not rep["repaired"] and part.exists()
    rep = steps.repair(out)
    assert rep["repaired"] and not part.exists()
    s = steps.run_pipeline(cfg, input_dir, out)
    assert s["records"]["accepted"] > 0
    assert sorted(read_cases(out)["case_id"]) == before
    idx = IndexStore(index_root(out), cfg.index).load()
    assert sorted(idx.meta["case_id"]) == before


@pytest.mark.slow
def test_sigkill_in_a_later_chunk_then_rerun_equals_uninterrupted(sample, cfg, reference, tmp_path):
    """A run of several chunks killed after its second chunk indexed but before it committed: the
    first chunk stays committed, the re-run does the rest, and the end equals one uninterrupted run."""
    input_dir, _ = sample
    args = ["run", "--no-prefect", "--input", str(input_dir), "--out", str(tmp_path), "--batch-size", "50",
            "--chunk-mb", "0.05", "--json"]
    killed = casemine(args, {"CASEMINE_KILL_AT": "index#2"})
    assert killed.returncode == -signal.SIGKILL
    assert len(read_cases(tmp_path)) > 0  # the first chunk's cases are committed
    again = casemine(args)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["records"]["reconciles"] and summary["records"]["duplicates"] > 0
    assert summary["orphans_removed"] >= 1 and len(summary["chunks"]) > 1
    cases, index_ids, n_vectors = snapshot(cfg, tmp_path)
    assert cases == reference[0]
    assert index_ids == reference[1] and n_vectors == reference[2] == len(set(index_ids))
