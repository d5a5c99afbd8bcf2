"""Reading the tables people label (CSV, JSONL, Parquet): shared by every model that trains on
them (issue types, conversation labels, emotion), with one clear error for what cannot be read."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

LABELED_SUFFIXES = (".csv", ".jsonl", ".parquet")


class LabeledDataError(ValueError):
    """Labelled data is missing, empty or inconsistent with the taxonomy; the message says what."""


def labeled_files(path: Path) -> list[Path]:
    """A file, or every CSV/JSONL/Parquet file directly in a folder."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in LABELED_SUFFIXES and not p.name.startswith("."))
    if path.is_file():
        return [path]
    raise LabeledDataError(
        f"labelled data {path} does not exist; pass a CSV/JSONL/Parquet file or a folder of them (columns text, label)"
    )


def read_table(path: Path) -> pd.DataFrame:
    """Read one CSV / JSONL / Parquet file with a clear error for anything else."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # utf-8-sig: spreadsheets save CSVs with a byte-order mark.
            return pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
        if suffix in (".jsonl", ".json"):
            if path.stat().st_size == 0:
                return pd.DataFrame()
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (ValueError, UnicodeDecodeError) as e:
        raise LabeledDataError(f"{path} could not be read as {suffix[1:].upper()}: {e}") from None
    raise LabeledDataError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .jsonl or .parquet")
