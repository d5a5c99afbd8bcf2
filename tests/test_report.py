"""The HTML report: self-contained (no network), and its charts really render in a browser."""

from __future__ import annotations

import re
import subprocess
from datetime import date
from pathlib import Path

import pytest

from pipeline.embed.fake import HashingEmbedder

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def report(tmp_path_factory, cfg) -> Path:
    from pipeline.insights.export import export_all
    from pipeline.orchestrate.nightly import run_pipeline
    from pipeline.sample.generate import generate

    root = tmp_path_factory.mktemp("report")
    generate(root / "in", n=150, seed=3, labels_out=root / "labels.jsonl")
    run_pipeline(cfg, root / "in", root / "out")
    summary = export_all(cfg, root / "out", embedder=HashingEmbedder(), today=date(2025, 11, 1))
    return Path(summary["report"])


def test_report_is_self_contained(report):
    html = report.read_text(encoding="utf-8")
    assert html.count("plotly.js v") >= 1, "plotly.js must be inlined"
    # no script, stylesheet or image fetched from anywhere: it must open offline
    assert not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"<link[^>]+href=\"https?:", html)
    # plotly.js mentions its CDN in its own source (topojson defaults); our markup must not
    outside_lib = re.sub(r"<script>/\*\*\s*\* plotly\.js.*?</script>", "", html, flags=re.S)
    assert "cdn.plot.ly" not in outside_lib and "https://" not in outside_lib
    assert html.count("Plotly.newPlot") == 6  # clusters, issue types, two trends, map, emotion
    assert '<meta charset="utf-8">' in html
    for heading in ("预警与新兴问题", "根因矩阵", "服务指标"):
        assert heading in html


def test_report_charts_render_in_headless_chromium(report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed at /usr/bin/chromium (apt-get install -y chromium); "
                    "cannot check that the report's charts render")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
           report.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    # plotly draws each chart as svg.main-svg elements (two per chart) only when its JS ran
    charts = re.findall(r'<div id="[^"]+" class="plotly-graph-div js-plotly-plot"', dom)
    assert len(charts) == 6, "every chart div was initialised by plotly.js"
    assert dom.count('class="main-svg"') >= 12
    # the scatter map drew its points, the bar chart its bars
    assert 'class="point"' in dom and 'class="trace bars"' in dom
