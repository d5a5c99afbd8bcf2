"""Where case records and quarantined records live on disk, under one output root.

Layout (all relative to `--out`):
  processed/cases/date=YYYY-MM-DD/part-<run_id>-<n>.parquet   the case table, hive-partitioned:
      `date` lives in the folder name only (as Hive, Spark and pyarrow expect), so that
      `pandas.read_parquet("<out>/processed/cases")` and DuckDB's hive_partitioning read it
  quarantine/<run_id>.jsonl                                    rejected records, masked excerpts
  runs/<run_id>/summary.json, summary.txt                      what a run did
Each run writes new files only (atomically); a run that did not commit is undone by deleting
its files, so readers never see half a run and a re-run never duplicates one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.io import atomic_write_parquet, atomic_write_text
from pipeline.schema import CASE_SCHEMA, QuarantineRecord


class Masker(Protocol):
    """What storing needs of the masker (pipeline.text.mask.Masker): storage sits below the text
    steps and takes the masker it is given."""

    def mask(self, text: str) -> tuple[str, Any]: ...


def cases_dir(out: Path) -> Path:
    return out / "processed" / "cases"


PARTITION = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


def case_table(df: pd.DataFrame) -> pa.Table:
    """The DataFrame as an Arrow table in the stored schema, without the partition key `date`;
    extra columns (classification...) are appended after the fixed ones with inferred types."""
    fixed = [c for c in CASE_SCHEMA.names if c != "date"]
    extra = [c for c in df.columns if c not in fixed]
    base = pa.Table.from_pandas(
        df[fixed], schema=pa.schema([CASE_SCHEMA.field(c) for c in fixed]), preserve_index=False
    )
    for c in extra:
        if c == "date":
            continue
        base = base.append_column(c, pa.array(df[c].tolist()))
    return base


def write_cases(out: Path, df: pd.DataFrame, run_id: str, part: int) -> list[Path]:
    """One Parquet file per date partition for this batch; returns the paths written."""
    written = []
    for day, group in df.groupby("date", sort=True):
        path = cases_dir(out) / f"date={day}" / f"part-{run_id}-{part:05d}.parquet"
        atomic_write_parquet(path, case_table(group.reset_index(drop=True)))
        written.append(path)
    return written


def read_cases(out: Path, columns: list[str] | None = None, latest: bool = True) -> pd.DataFrame:
    """All stored cases as one DataFrame. With `latest`, one row per case_id, the newest run's:
    a repaired or re-delivered conversation must not count twice downstream."""
    root = cases_dir(out)
    files = sorted(root.glob("date=*/part-*.parquet")) if root.exists() else []
    if not files:
        return pd.DataFrame(columns=columns or list(CASE_SCHEMA.names))
    # Partitions written before a later step added a column lack it: unify by name. `date` comes
    # from the folder (files written before it moved there also hold it: same values).
    schema = pa.unify_schemas([pq.read_schema(f) for f in files])
    if "date" not in schema.names:
        schema = schema.append(pa.field("date", pa.string()))
    wanted = None if columns is None else [c for c in columns if c in schema.names]
    read = wanted if wanted is None or not latest else list(dict.fromkeys(wanted + ["case_id", "run_id"]))
    df = (
        ds.dataset(
            [str(f) for f in files],
            format="parquet",
            schema=schema,
            partitioning=PARTITION,
            partition_base_dir=str(root),
        )
        .to_table(columns=read)
        .to_pandas()
    )
    if latest and len(df):
        # Run ids start with their UTC start time, so their order is the runs' order.
        df = df.sort_values("run_id", kind="stable").drop_duplicates("case_id", keep="last").reset_index(drop=True)
    return df if wanted is None else df[wanted]


def run_parts(out: Path, run_id: str) -> list[Path]:
    return sorted(cases_dir(out).glob(f"date=*/part-{run_id}-*.parquet"))


class CorruptOutputError(RuntimeError):
    """A stored case file is missing or does not match the checksum recorded at its commit."""


def verify_parts(out: Path, recorded: list[tuple[str, str, str]]) -> list[dict[str, str]]:
    """Problems with committed case files: missing, or checksum differs (truncated, overwritten)."""
    from pipeline.io import sha256_file

    problems = []
    for rel, run_id, sha in recorded:
        p = out / rel
        if not p.is_file():
            problems.append({"path": rel, "run_id": run_id, "problem": "missing"})
        elif sha256_file(p) != sha:
            problems.append({"path": rel, "run_id": run_id, "problem": "checksum mismatch (corrupt or truncated)"})
    return problems


def run_of(path: Path) -> str:
    """The run that wrote a case file: part-<run_id>-<n>.parquet (run ids contain dashes)."""
    return path.stem[len("part-") :].rsplit("-", 1)[0]


def stored_parts(out: Path) -> list[Path]:
    root = cases_dir(out)
    return sorted(root.glob("date=*/part-*.parquet")) if root.exists() else []


def remove_orphans(out: Path, known_runs: dict[str, str]) -> list[Path]:
    """Delete the files of runs that the state saw begin and never commit (killed mid-run).

    `known_runs` maps run ids to their status in the state database. Files of a run the state
    does not know are never deleted: that is how a lost state database used to erase history.
    Raises CorruptOutputError naming them instead."""
    uncommitted = {r for r, status in known_runs.items() if status != "committed"}
    parts = stored_parts(out)
    unknown = sorted({run_of(f) for f in parts} - set(known_runs))
    if unknown:
        n = sum(run_of(f) in set(unknown) for f in parts)
        raise CorruptOutputError(
            f"{n} case file(s) under {cases_dir(out)} belong to {len(unknown)} run(s) this output root's state does "
            f"not know (e.g. {unknown[0]}); nothing was deleted. If the state database was replaced or lost, run "
            f"`casemine repair --out {out}`; if the files were copied in from elsewhere, move them away"
        )
    removed: list[Path] = []
    for f in parts:
        if run_of(f) in uncommitted:
            f.unlink()
            removed.append(f)
    for f in sorted((out / "quarantine").glob("*.jsonl")) if (out / "quarantine").exists() else []:
        if f.stem in uncommitted:
            f.unlink()
            removed.append(f)
    for d in sorted((out / "runs").glob("*")) if (out / "runs").exists() else []:
        if d.is_dir() and d.name in uncommitted:
            shutil.rmtree(d)
            removed.append(d)
    # Half-written temporaries: only a crashed writer leaves them, and the caller holds the run lock.
    for f in cases_dir(out).glob("date=*/.*.tmp") if cases_dir(out).exists() else []:
        f.unlink(missing_ok=True)
    return removed


def write_quarantine(out: Path, run_id: str, records: list[QuarantineRecord], masker: Masker) -> Path | None:
    """Quarantine file for the run: where, why, what to do, and a masked excerpt, never raw PII."""
    if not records:
        return None
    lines = []
    for q in records:
        excerpt = masker.mask(q.excerpt)[0] if q.excerpt else ""
        lines.append(
            json.dumps(
                {
                    "file": masker.mask(q.source_file)[0],
                    "line": q.line,
                    "byte_offset": q.byte_offset,
                    "conversation_id": masker.mask(q.conversation_id)[0] if q.conversation_id else None,
                    "reason": q.reason,
                    "detail": masker.mask(q.detail)[0],
                    "excerpt": excerpt,
                    "raw_sha256": q.raw_hash,
                },
                ensure_ascii=False,
            )
        )
    path = out / "quarantine" / f"{run_id}.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_summary(out: Path, run_id: str, summary: dict[str, Any], text: str) -> Path:
    d = out / "runs" / run_id
    atomic_write_text(d / "summary.txt", text)
    atomic_write_text(d / "summary.json", json.dumps(summary, ensure_ascii=False, indent=2, default=str) + "\n")
    return d / "summary.json"
