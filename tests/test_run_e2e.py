"""End to end on a generated sample: reconciliation, quarantine reasons, idempotency, crash
recovery, and no personal data in any output."""

import json
import shutil
from collections import Counter

import pandas as pd
import pytest

from pipeline.orchestrate import nightly as steps
from pipeline.text.segment import Segmenter
from pipeline.storage.store import read_cases
from tests.conftest import PII_PATTERNS, all_output_text


@pytest.fixture(scope="module")
def first_run(sample, cfg, tmp_path_factory):
    input_dir, labels = sample
    out = tmp_path_factory.mktemp("out")
    summary = steps.run_pipeline(cfg, input_dir, out)
    return input_dir, labels, out, summary


def test_counts_reconcile_and_reasons_match_the_labels(first_run):
    _, labels, out, s = first_run
    r = s["records"]
    assert r["reconciles"] and r["read"] == r["accepted"] + r["duplicates"] + r["quarantined"]
    good = [x for x in labels if not x.get("malformed")]
    bad = [x for x in labels if x.get("malformed")]
    assert r["accepted"] == len(good)
    expected = Counter(x["expect_reason"] for x in bad if x["expect_reason"] != "duplicate")
    got = Counter({k: v for k, v in s["reasons"].items() if not k.startswith("duplicate")})
    assert got == expected
    assert r["duplicates"] == sum(x["expect_reason"] == "duplicate" for x in bad)
    q = [json.loads(line) for line in (out / "quarantine").glob("*.jsonl").__next__().read_text().splitlines()]
    assert len(q) == r["quarantined"] and all(x["reason"] and x["detail"] and x["file"] for x in q)


def test_cases_cover_every_accepted_conversation(first_run):
    _, labels, out, s = first_run
    cases = read_cases(out)
    good = {x["conversation_id"] for x in labels if not x.get("malformed")}
    assert set(cases["conversation_id"]) == good
    assert cases["case_id"].is_unique
    assert s["cases"]["written"] == len(cases)
    assert (cases["problem"].str.len() > 0).mean() > 0.95
    # conversations that raise a second issue were split into two cases
    two = {x["conversation_id"] for x in labels if len(x.get("issues", [])) == 2}
    per_conv = cases.groupby("conversation_id").size()
    assert (per_conv[list(two)] >= 2).mean() >= 0.7


def test_no_personal_data_in_any_output(first_run):
    _, labels, out, _ = first_run
    text = all_output_text(out)
    leaked = [(p["kind"], p["value"]) for x in labels for p in x.get("pii", []) if p["value"] in text]
    assert not leaked
    for kind, pat in PII_PATTERNS.items():
        assert not pat.search(text), (kind, pat.search(text).group(0))
    orders = [o for x in labels for o in x.get("order_ids", [])]
    assert sum(o in text for o in orders) == len(orders)  # order numbers are kept on purpose


def test_rerun_is_idempotent(first_run, cfg):
    input_dir, _, out, _ = first_run
    before = read_cases(out)
    s2 = steps.run_pipeline(cfg, input_dir, out)
    assert s2["records"]["read"] == 0 and s2["files"]["skipped_unchanged"] == s2["files"]["read"] + s2["files"]["skipped_unchanged"]
    after = read_cases(out)
    assert len(after) == len(before)


def test_redelivery_in_a_new_file_counts_as_duplicates(first_run, cfg, tmp_path):
    input_dir, _, out, _ = first_run
    work = tmp_path / "out"
    shutil.copytree(out, work)
    redelivered = tmp_path / "in"
    shutil.copytree(input_dir, redelivered)
    chat = next(p for p in sorted(redelivered.glob("*.jsonl")) if "malformed" not in p.name)
    (redelivered / "again.jsonl").write_bytes(chat.read_bytes())
    s = steps.run_pipeline(cfg, redelivered, work)
    n = sum(1 for line in chat.read_bytes().splitlines() if line.strip())
    assert s["records"]["read"] == n and s["records"]["duplicates"] == n and s["cases"]["written"] == 0
    assert len(read_cases(work)) == len(read_cases(out))


def test_killed_run_is_undone_and_redone(sample, cfg, tmp_path):
    """A run that wrote Parquet but died before its commit leaves orphans; the next run deletes
    them and processes the same conversations again, ending equal to an uninterrupted run."""
    input_dir, _ = sample
    ref = tmp_path / "ref"
    steps.run_pipeline(cfg, input_dir, ref)
    out = tmp_path / "crash"
    ctx = steps.start_run(cfg, input_dir, out)
    ing = steps.ingest(ctx)
    res = steps.process(ctx, ing.accepted[:40], Segmenter(cfg))
    steps.store(ctx, res.cases, 0)  # ... and the process dies here, before commit
    assert len(read_cases(out)) > 0
    s = steps.run_pipeline(cfg, input_dir, out)
    assert s["orphans_removed"] >= 1
    cols = ["case_id", "problem", "handling", "outcome"]
    a = read_cases(out)[cols].sort_values("case_id").reset_index(drop=True)
    b = read_cases(ref)[cols].sort_values("case_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_two_outputs_never_touch(sample, cfg, tmp_path):
    input_dir, _ = sample
    steps.run_pipeline(cfg, input_dir, tmp_path / "a")
    s = steps.run_pipeline(cfg, input_dir, tmp_path / "b")
    assert s["records"]["accepted"] > 0  # b did not see a's state


def test_committed_sample_is_the_generators_output(tmp_path):
    """data/sample (what `make run` reads) must be exactly what `make sample` writes today."""
    from pipeline.sample.generate import generate
    from tests.conftest import REPO

    generate(tmp_path / "s", n=150, seed=7, labels_out=tmp_path / "labels.jsonl")
    fresh = {p.relative_to(tmp_path / "s"): p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    committed = {p.relative_to(REPO / "data" / "sample"): p.read_bytes() for p in (REPO / "data" / "sample").rglob("*") if p.is_file()}
    assert fresh == committed, "data/sample is stale: run `make sample` and commit it"
