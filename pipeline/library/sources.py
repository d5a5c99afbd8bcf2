"""What the library reads from a run's outputs: the stored cases (with issue types and emotion
curves added in memory when older partitions lack them) and the latest clusters' members."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config


def load_members(out: Path) -> pd.DataFrame | None:
    from pipeline.insights.export import latest_export

    d = latest_export(Path(out))
    return pd.read_parquet(d / "members.parquet") if d is not None and (d / "members.parquet").is_file() else None


def _completed(base: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Issue types and emotion curves added in memory where the stored partitions predate them."""
    from pipeline.insights.export import ensure_classified

    base, _ = ensure_classified(base.reset_index(drop=True), cfg)
    if "emotion_delta" not in base or base["emotion_delta"].isna().all():
        from pipeline.analysis.emotion import add_emotion

        base = add_emotion(base, cfg)
    return base


def load_library_cases(cfg: Config, out: Path, since: str | None = None) -> pd.DataFrame:
    """Stored cases, one per id, with issue types and emotion curves (added in memory when the
    stored partitions predate them)."""
    from pipeline.storage.store import read_cases

    base = read_cases(Path(out))
    if since is not None and len(base):
        base = base[base["date"].astype(str) >= since]
    if not len(base):
        return base
    return _completed(base, cfg)


def iter_library_cases(cfg: Config, out: Path, block_rows: int = 5_000) -> Iterator[pd.DataFrame]:
    """The stored cases of `load_library_cases` (one row per id: the newest run's), in blocks of
    whole part files of about `block_rows` rows: what a nightly build reads without holding every
    stored case and its texts at once. Which run's row is current is decided over all parts first,
    from the ids alone."""
    import pyarrow.parquet as pq

    from pipeline.storage.store import newest_rows, read_parts, stored_parts

    files = stored_parts(Path(out))
    if not files:
        return
    # The row read_cases keeps per id, decided over all parts from the ids alone.
    keys = read_parts(files, ["case_id", "run_id"]).to_pandas()
    keys["_row"] = np.arange(len(keys))
    kept = newest_rows(keys)["_row"]
    wanted = np.zeros(len(keys), dtype=bool)
    wanted[kept.to_numpy()] = True
    block: list[Path] = []
    start = rows = 0
    for i, f in enumerate(files):
        block.append(f)
        rows += pq.ParquetFile(f).metadata.num_rows
        if rows < block_rows and i < len(files) - 1:
            continue
        df = read_parts(block).to_pandas()
        n, block, rows = len(df), [], 0
        df = df[wanted[start : start + n]]
        start += n
        if len(df):
            yield _completed(df, cfg)
