"""Labelled data for training and evaluation: `text` + `label` rows from CSV, JSONL or Parquet.

Why strict validation: a label that is not in the taxonomy (a typo, an old type name) would
train a class the rest of the pipeline cannot route, so it stops the run with the offending
labels and rows named. Rows with an empty label are skipped and counted, because the review
queue exports CSVs with an empty `label` column that people fill in part by part.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.analysis.classify.taxonomy import Taxonomy
from pipeline.io import sha256_file
from pipeline.labelled import LABELED_SUFFIXES, LabeledDataError, labeled_files, read_table

__all__ = ["LABELED_SUFFIXES", "LabeledData", "LabeledDataError", "labeled_files", "load_labeled", "read_table"]


@dataclass
class LabeledData:
    frame: pd.DataFrame  # columns text, label, source_file
    files: list[dict[str, object]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """One hash for the whole training set (the files' hashes, in path order)."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: str(f["path"])):
            h.update(f"{f['path']}:{f['sha256']}\n".encode())
        return h.hexdigest()


def load_labeled(path: Path, taxonomy: Taxonomy) -> LabeledData:
    """All labelled rows under `path`, validated against the taxonomy.

    Raises LabeledDataError on no files, missing columns, no usable rows, or labels the taxonomy
    does not define (listing them and the valid ones).
    """
    files = labeled_files(path)
    if not files:
        raise LabeledDataError(f"no labelled files (*.csv, *.jsonl, *.parquet) in {path}")
    frames, meta = [], []
    skipped = {"empty_text": 0, "empty_label": 0, "duplicate": 0, "conflicting_duplicate": 0}
    for f in files:
        df = read_table(f)
        if df.empty and not len(df.columns):
            meta.append({"path": str(f), "sha256": sha256_file(f), "rows": 0, "used": 0})
            continue  # an empty file: reported below if nothing else has rows
        if "label" not in df.columns and "issue_type" in df.columns:
            # A review queue labelled in a spreadsheet names the column after the task.
            df = df.rename(columns={"issue_type": "label"})
        missing = [c for c in ("text", "label") if c not in df.columns]
        if missing:
            raise LabeledDataError(
                f"{f} has no column(s) {missing}; labelled data needs columns 'text' and "
                f"'label' (found: {list(df.columns)})"
            )
        df = df[["text", "label"]].copy()
        df["text"] = df["text"].fillna("").astype(str).str.strip()
        df["label"] = df["label"].fillna("").astype(str).str.strip()
        n = len(df)
        skipped["empty_text"] += int((df["text"] == "").sum())
        skipped["empty_label"] += int(((df["text"] != "") & (df["label"] == "")).sum())
        df = df[(df["text"] != "") & (df["label"] != "")]
        df["source_file"] = str(f)
        frames.append(df)
        meta.append({"path": str(f), "sha256": sha256_file(f), "rows": n, "used": len(df)})
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["text", "label", "source_file"])
    if frame.empty:
        raise LabeledDataError(f"no labelled rows in {path} (files: {[m['path'] for m in meta]}; skipped: {skipped})")
    unknown = sorted(set(frame["label"]) - set(taxonomy.labels))
    if unknown:
        examples = frame[frame["label"].isin(unknown)].head(3)
        where = "; ".join(f"{r.source_file}: {r.label!r}" for r in examples.itertuples())
        raise LabeledDataError(
            f"labels not in the taxonomy: {unknown} (e.g. {where}). Valid labels: "
            f"{taxonomy.labels}. Fix the data or add the type to the taxonomy file."
        )
    # The same text labelled twice: keep the most frequent label (ties: the first seen) so a
    # duplicated row does not count double in cross-validation.
    before = len(frame)
    conflicts = frame.groupby("text")["label"].nunique()
    skipped["conflicting_duplicate"] = int((conflicts > 1).sum())
    frame["_n"] = frame.groupby(["text", "label"])["label"].transform("size")
    frame = (
        frame.reset_index()
        .sort_values(["_n", "index"], ascending=[False, True])
        .drop_duplicates("text", keep="first")
        .sort_values("index")
        .drop(columns=["_n", "index"])
        .reset_index(drop=True)
    )
    skipped["duplicate"] = before - len(frame)
    return LabeledData(frame, meta, {k: v for k, v in skipped.items() if v})
