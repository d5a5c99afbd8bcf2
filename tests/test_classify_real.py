"""Classification on the real data in ../shared/data (skipped with a message when absent).

Thresholds sit well below the measured figures (dev complaints: rules macro-F1 0.48, model CV
macro-F1 ~0.52) so they catch a broken pipeline, not CV noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.analysis.classify import classify_cases

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not present at {path} (../shared/data beside the repo); skipping real-data test")
    return path


def test_dev_complaints_model_beats_rules(cfg, tmp_path):
    from pipeline.evaluate.classification import evaluate_classification

    dev = _need(SHARED / "complaints" / "dev.csv")
    c = cfg.with_overrides(classify={"model_dir": str(tmp_path / "model")})
    rep = evaluate_classification(c, dev)
    assert rep["data"]["rows"] == 413
    assert set(rep["data"]["labels_absent"]) == {"账户/会员", "售前咨询"}
    assert rep["rules"]["macro_f1"] >= 0.35
    assert rep["model"]["macro_f1"] >= 0.42
    assert rep["model"]["accuracy"] > rep["rules"]["accuracy"] + 0.1
    # The rare types must not be written off by the balanced model: most get some F1.
    per = rep["model"]["per_class"]
    assert sum(v["f1"] > 0 for v in per.values()) >= 7, per
    # Abstention helps: what is kept is more accurate than what is sent to review.
    ab = rep["model"]["abstention"]
    assert ab["accuracy_sent_to_review"] is None or ab["accuracy_kept"] > ab["accuracy_sent_to_review"]


def test_jddc_urgency_rises_with_repeat_consultation(cfg, tmp_path):
    from pipeline.ingest import read_file
    from pipeline.orchestrate.steps import process_batch

    path = _need(SHARED / "jddc" / "dev.jsonl")
    c = cfg.with_overrides(classify={"model_dir": str(tmp_path / "model")})
    res = read_file(path, c.ingest)
    raw_flags = [json.loads(line)["metadata"].get("repeat_consultation") for line in path.open(encoding="utf-8")]
    cases = process_batch(res.conversations, c).cases
    out = classify_cases(cases, c)
    assert out["repeat_contact"].sum() >= sum(bool(f) for f in raw_flags)  # ingest mapped the flag
    rank = out["urgency"].map({"一般": 0, "重要": 1, "紧急": 2})
    rep, once = rank[out["repeat_contact"]], rank[~out["repeat_contact"]]
    assert rep.mean() > once.mean() + 0.5
    assert (rep >= 1).mean() > 0.8 and (once >= 1).mean() < 0.2


@pytest.fixture(scope="module")
def jddc_cold_start(cfg, tmp_path_factory):
    """Cold-start figures on the 497 labelled JD chats (no labels used by the classifier)."""
    from pipeline.orchestrate.training import evaluate_conversations

    labels = _need(SHARED / "jddc-labels" / "dev.jsonl")
    transcripts = _need(SHARED / "jddc" / "dev.jsonl")
    c = cfg.with_overrides(classify={"model_dir": str(tmp_path_factory.mktemp("none") / "model")})
    return evaluate_conversations(c, labels, transcripts)


def test_jddc_cold_start_request_kind_beats_the_obvious_guess(jddc_cold_start):
    rk = jddc_cold_start["cold_start"]["request_kind"]
    assert jddc_cold_start["conversations"] == 497
    # Target >= 0.90 (always 咨询 scores 0.93); measured 0.938, both halves >= 0.93.
    assert rk["all"]["accuracy"] >= 0.90
    assert min(rk["half_a"]["accuracy"], rk["half_b"]["accuracy"]) >= 0.88
    # Unlike the constant guess, it does find complaints.
    assert rk["all"]["per_class"]["投诉"]["recall"] >= 0.2


def test_jddc_cold_start_issue_type(jddc_cold_start):
    it = jddc_cold_start["cold_start"]["issue_type"]
    # Targets: accuracy >= 0.70 (met: 0.73) and macro-F1 >= 0.60 (not yet: 0.57; half A 0.67,
    # half B 0.55). The floor below catches a regression, it does not claim the target.
    assert it["all"]["accuracy"] >= 0.70
    assert it["all"]["macro_f1"] >= 0.55
    # 其他 is for what fits nowhere, not the fallback for few keywords.
    assert it["all"]["per_class"]["其他"]["precision"] >= 0.2
    assert it["all"]["per_class"]["售前咨询"]["recall"] >= 0.4
