"""The analysts' notebook runs against a fresh export, and is committed without outputs."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import nbformat
import pytest

from pipeline.embed.fake import HashingEmbedder

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analyst.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has code cells"
    for c in code:
        assert c.outputs == [] and c.execution_count is None, "clear outputs before committing the notebook"


def test_notebook_executes_on_a_fresh_export(tmp_path, cfg, monkeypatch):
    from nbclient import NotebookClient

    from pipeline.insights.export import export_all
    from pipeline.orchestrate.nightly import run_pipeline
    from pipeline.sample.generate import generate

    generate(tmp_path / "in", n=120, seed=5, labels_out=tmp_path / "labels.jsonl")
    run_pipeline(cfg, tmp_path / "in", tmp_path / "out")
    export_all(cfg, tmp_path / "out", embedder=HashingEmbedder(), today=date(2025, 11, 1))
    monkeypatch.setenv("CASEMINE_OUT", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Generous cell timeout: a loaded 2-core CI machine is slow; this checks behaviour, not speed.
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                      if o.output_type == "stream")
    assert "export:" in printed and "2025-11-01" in printed
    assert "suggested causes:" in printed  # the drill-down cell reached a cluster
    # What an analyst shares: the executed notebook as HTML (nbconvert, the `analyst` extra).
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    assert "suggested causes:" in body and "Traceback" not in body


def test_notebook_says_what_to_do_without_an_export(tmp_path, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("CASEMINE_OUT", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.raises(CellExecutionError, match="casemine clusters export"):
        NotebookClient(nb, timeout=1800, kernel_name="python3").execute()
