"""What the library reads from a run's outputs: the stored cases (with issue types and emotion
curves added in memory when older partitions lack them) and the latest clusters' members."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.config import Config


def load_members(out: Path) -> pd.DataFrame | None:
    from pipeline.insights.export import latest_export

    d = latest_export(Path(out))
    return pd.read_parquet(d / "members.parquet") if d is not None and (d / "members.parquet").is_file() else None


def load_library_cases(cfg: Config, out: Path, since: str | None = None) -> pd.DataFrame:
    """Stored cases, one per id, with issue types and emotion curves (added in memory when the
    stored partitions predate them)."""
    from pipeline.insights.export import ensure_classified
    from pipeline.storage.store import read_cases

    base = read_cases(Path(out))
    if since is not None and len(base):
        base = base[base["date"].astype(str) >= since]
    if not len(base):
        return base
    base, _ = ensure_classified(base.reset_index(drop=True), cfg)
    if "emotion_delta" not in base or base["emotion_delta"].isna().all():
        from pipeline.analysis.emotion import add_emotion

        base = add_emotion(base, cfg)
    return base
