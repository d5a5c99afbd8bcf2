"""Shared fixtures: the project config, a generated sample with its ground truth, ../shared data."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Prefect logs "Stopping temporary server" at interpreter exit, after pytest closed the streams.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Tests that call the flow directly let Prefect start its temporary server itself: give it the
# start-up time a loaded 2-core CI machine needs (Prefect's default of 20 s failed there).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")

from hypothesis import HealthCheck, settings  # noqa: E402

# No test may depend on how fast the machine is: no per-example deadline, no "too slow" check.
settings.register_profile("casemine", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("casemine")

from pipeline.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Patterns that must never appear in any output (issue: personal data never leaves masking).
PII_PATTERNS = {
    # (a digit run after a decimal point is a fraction: the report's embedded plotly.js has some)
    "phone": re.compile(r"(?<![0-9A-Za-z.])1[3-9]\d(?:[ -]?\d{4}){2}(?![0-9A-Za-z])"),
    "id": re.compile(r"(?<![0-9A-Za-z.])\d{17}[\dXx](?![0-9A-Za-z])"),
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+\.[A-Za-z]{2,}"),
}


@pytest.fixture(scope="session")
def cfg() -> Config:
    return load_config(REPO / "configs" / "casemine.yaml")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA} (../shared/data beside the repo); skipping real-data test")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A generated sample (150 conversations + malformed records) and its labels."""
    from pipeline.sample.generate import generate

    root = tmp_path_factory.mktemp("sample")
    rep = generate(root / "in", n=150, seed=11, labels_out=root / "labels.jsonl")
    labels = [json.loads(line) for line in rep.labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return root / "in", labels


def all_output_text(out: Path) -> str:
    """Every string the run wrote: Parquet cells (decoded), JSON, text and logs."""
    parts: list[str] = []
    for p in out.rglob("*"):
        if not p.is_file():
            continue
        if p.suffix == ".parquet":
            df = pd.read_parquet(p)
            parts.extend(str(v) for col in df.columns for v in df[col].tolist())
        elif p.suffix == ".html":
            # The report inlines the plotly.js library (numbers in its code look like IDs); every
            # other script, which carries the charts' data, is scanned.
            html = p.read_text(encoding="utf-8", errors="replace")
            parts.append(re.sub(r"<script[^>]*>(?:(?!</script>).)*?plotly\.js v.*?</script>", "", html, flags=re.S))
        elif p.suffix in (".json", ".jsonl", ".txt", ".csv", ".md", ".log"):
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


@pytest.fixture()
def fake_embedder(monkeypatch):
    """The Embedder with a model-free hashing encoder: index and search tests stay fast."""
    from pipeline.embed import Embedder
    from pipeline.embed.fake import HashingEmbedder

    fake = HashingEmbedder()
    monkeypatch.setattr(Embedder, "_load", lambda self: None)
    monkeypatch.setattr(Embedder, "_encode_raw", lambda self, texts, kind: fake.encode(texts))
    monkeypatch.setattr(Embedder, "encode_queries", lambda self, texts: fake.encode(list(texts)))
    return fake
