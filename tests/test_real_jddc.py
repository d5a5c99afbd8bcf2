"""The flow on real JD.com customer-service chats (../shared/data/jddc; skipped when absent)."""

import pytest

from pipeline.orchestrate import nightly as steps
from pipeline.storage.store import read_cases
from tests.conftest import PII_PATTERNS, all_output_text


@pytest.mark.shared
def test_jddc_cases_read_well(shared_data, cfg, tmp_path):
    s = steps.run_pipeline(cfg, shared_data / "jddc", tmp_path / "out")
    r = s["records"]
    assert r["reconciles"] and r["accepted"] == r["read"] >= 490
    cases = read_cases(tmp_path / "out")
    assert (cases["problem"].str.len() >= 4).mean() > 0.95
    assert (cases["handling"].str.len() >= 4).mean() > 0.9
    share = cases["outcome"].value_counts(normalize=True)
    assert share.get("unknown", 0) < 0.35 and share.get("resolved", 0) > 0.4
    # the corpus has no timestamps: every case says which timings could not be computed
    assert all("started_at" in list(x) for x in cases["timings_missing"])
    assert s["cases"]["timings_missing"]["first_response_s"] == len(cases)
    # transferred conversations are escalations
    transferred = cases["metadata_json"].str.contains('"transferred": true')
    assert (cases.loc[transferred, "outcome"] == "escalated").all()
    assert cases["repeat_contact"].sum() > 0
    text = all_output_text(tmp_path / "out")
    for kind, pat in PII_PATTERNS.items():
        assert not pat.search(text), kind
