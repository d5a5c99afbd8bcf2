"""The nightly flow on a Dask LocalCluster with two workers gives the local run's result."""

import pytest

from pipeline.orchestrate import nightly as steps
from pipeline.storage.store import read_cases


@pytest.mark.slow
def test_dask_flow_equals_local_run(sample, cfg, tmp_path):
    from pipeline.orchestrate.prefect_flow import flow_for

    input_dir, _ = sample
    overrides = {"flow": {"task_runner": "dask", "dask_workers": 2, "batch_size": 40}}
    dask_cfg = cfg.with_overrides(**overrides)
    s = flow_for(dask_cfg)(str(input_dir), str(tmp_path / "dask"), None, overrides)
    local = steps.run_pipeline(cfg, input_dir, tmp_path / "local")
    assert s["records"] == local["records"] and s["reasons"] == local["reasons"]
    cols = ["case_id", "problem", "handling", "outcome", "issue_type", "urgency"]
    a = read_cases(tmp_path / "dask")[cols].sort_values("case_id").reset_index(drop=True)
    b = read_cases(tmp_path / "local")[cols].sort_values("case_id").reset_index(drop=True)
    assert a.equals(b)
    assert s["index"]["total"] == local["index"]["total"] == len(b)
