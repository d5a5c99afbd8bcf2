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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_write_parquet, atomic_write_text
from pipeline.schema import CASE_SCHEMA, PART_SCHEMA, PARTITION_KEY, QuarantineRecord


class Masker(Protocol):
    """What storing needs of the masker (pipeline.text.mask.Masker): storage sits below the text
    steps and takes the masker it is given."""

    def mask(self, text: str) -> tuple[str, Any]: ...


def cases_dir(out: Path) -> Path:
    return out / "processed" / "cases"


class UnknownColumnError(ValueError):
    """A step produced a column the case schema does not declare (pipeline.schema.CASE_SCHEMA)."""


def case_table(df: pd.DataFrame) -> pa.Table:
    """The DataFrame as a stored part: exactly PART_SCHEMA (the case schema without the partition
    key `date`), in its order and types. A column a step did not fill (a slice of the steps, a
    step that failed over) is null; a column the schema does not know is an error, so no type is
    ever guessed from one batch's values."""
    unknown = [c for c in df.columns if c not in CASE_SCHEMA.names]
    if unknown:
        raise UnknownColumnError(
            f"case table column(s) {', '.join(map(repr, unknown))} not in pipeline.schema.CASE_SCHEMA: "
            "declare them there (and in the step that adds them, pipeline.orchestrate.steps)"
        )
    present = pa.schema([f for f in PART_SCHEMA if f.name in df.columns])
    t = pa.Table.from_pandas(df[present.names], schema=present, preserve_index=False)
    columns = [t.column(f.name) if f.name in df.columns else pa.nulls(len(df), f.type) for f in PART_SCHEMA]
    return pa.Table.from_arrays(columns, schema=PART_SCHEMA)


def write_cases(out: Path, df: pd.DataFrame, run_id: str, part: int) -> list[Path]:
    """One Parquet file per date partition for this batch; returns the paths written."""
    written = []
    for day, group in df.groupby(PARTITION_KEY, sort=True):
        path = cases_dir(out) / f"{PARTITION_KEY}={day}" / f"part-{run_id}-{part:05d}.parquet"
        atomic_write_parquet(path, case_table(group.reset_index(drop=True)))
        written.append(path)
    return written


def _from_json(values: list[Any]) -> list[Any]:
    return [json.loads(v) if isinstance(v, str) and v else None for v in values]


def upgrade_part(table: pa.Table, schema: pa.Schema = PART_SCHEMA) -> pa.Table:
    """A part as read, in `schema`'s columns and types. Parts written before the schema typed every
    column hold the curve, labels, turning points and turn detail as JSON strings, may lack the
    columns of steps added later, and have types inferred per file (int64, or null where one batch
    had no value): decoded, null-filled and cast here. Columns the schema no longer has are dropped."""
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(len(table), f.type))
            continue
        col = table.column(f.name)
        if col.type == f.type:
            columns.append(col)
        elif pa.types.is_string(col.type) and (pa.types.is_nested(f.type)):
            columns.append(pa.array(_from_json(col.to_pylist()), type=f.type))
        else:
            columns.append(col.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _read_part(path: Path, schema: pa.Schema, filters: list[tuple[str, str, Any]] | None = None) -> pa.Table:
    """One part in `schema` (a selection of the case schema's columns), `date` from its folder."""
    stored = pa.schema([f for f in schema if f.name != PARTITION_KEY])
    if filters is None:
        # One open of the file for schema and columns, without the dataset layer read_table goes
        # through: the nightly export reads every stored part, and that per-file cost adds up.
        with pq.ParquetFile(path) as pf:
            present = set(pf.schema_arrow.names)
            raw = pf.read(columns=[c for c in stored.names if c in present])
    else:
        present = set(pq.read_schema(path).names)
        raw = pq.read_table(path, columns=[c for c in stored.names if c in present], filters=filters)
    t = upgrade_part(raw, stored)
    if PARTITION_KEY in schema.names:
        day = path.parent.name.removeprefix(f"{PARTITION_KEY}=")
        t = t.append_column(PARTITION_KEY, pa.array([day] * len(t), pa.string()))
    return t.select(schema.names)


# Parts read are joined into one table this many at a time. A back-fill stores a part per chunk
# and day (2,224 parts of about ten cases for 20,000 transcripts), and every small table kept
# on its own holds its own buffers per column: reading them one by one raised the RSS by 106 MiB
# for 9 MiB of data there, 48 MiB when joined by 32 (a block is copied once, when it is joined).
_PARTS_PER_BLOCK = 32


def read_parts(
    files: list[Path], columns: list[str] | None = None, shrink: Callable[[pa.Table], pa.Table] | None = None
) -> pa.Table:
    """Stored parts as one table in the case schema (older parts upgraded, see `upgrade_part`),
    `date` taken from each part's folder. `columns`: only these (names the schema lacks are left out).
    `shrink`: applied to each part as it is read (same columns and types, values it does not
    need nulled), so a column needed for a few rows only never sits in memory for all of them."""
    keep = None if columns is None else set(columns)
    schema = pa.schema([f for f in CASE_SCHEMA if keep is None or f.name in keep])
    blocks: list[pa.Table] = []
    pending: list[pa.Table] = []
    for f in files:
        # Each part shrunk as soon as it is read: all parts read first would hold every value again.
        pending.append(_read_part(f, schema) if shrink is None else shrink(_read_part(f, schema)))
        if len(pending) == _PARTS_PER_BLOCK:
            blocks.append(pa.concat_tables(pending).combine_chunks())
            pending = []
    if pending:
        blocks.append(pa.concat_tables(pending).combine_chunks() if blocks else pa.concat_tables(pending))
    return pa.concat_tables(blocks) if blocks else schema.empty_table()


def read_cases(
    out: Path,
    columns: list[str] | None = None,
    latest: bool = True,
    shrink: Callable[[pa.Table], pa.Table] | None = None,
) -> pd.DataFrame:
    """All stored cases as one DataFrame, typed by the case schema (lists are arrays, structs are
    dicts), whatever version of the store wrote them. With `latest`, one row per case_id, the
    newest run's: a repaired or re-delivered conversation must not count twice downstream.
    `shrink` is applied to each stored part as read (see `read_parts`).
    The one reader of the case table: every other reads through it (or `read_case`)."""
    files = stored_parts(out)
    wanted = None if columns is None else [c for c in columns if c in CASE_SCHEMA.names]
    if not files:
        return pd.DataFrame(columns=columns or list(CASE_SCHEMA.names))
    return cases_frame(read_parts(files, read_columns(wanted, latest), shrink), wanted, latest)


def read_columns(wanted: list[str] | None, latest: bool) -> list[str] | None:
    """The columns to read for `wanted`: the newest-row rule also needs case_id and run_id."""
    return wanted if wanted is None or not latest else list(dict.fromkeys(wanted + ["case_id", "run_id"]))


def cases_frame(table: pa.Table, wanted: list[str] | None, latest: bool) -> pd.DataFrame:
    """Stored parts read as one table (`read_parts`) as the DataFrame `read_cases` returns."""
    # One chunk per column, not one per stored part: pandas keeps Arrow strings as they come, and
    # every later take (a filter, a sort, each group of a groupby) on a column of ~60 chunks cost
    # ~30x a take on one; at 100k stored cases that was seconds per export.
    table = table.combine_chunks()
    df = table.to_pandas()
    for f in table.schema:
        if pa.types.is_struct(f.type):
            # pandas makes a struct's integer fields floats wherever one row is null (turn 3.0):
            # structs come back as the plain dicts they were written from.
            df[f.name] = pd.Series(table.column(f.name).to_pylist(), index=df.index, dtype=object)
    if latest and len(df):
        df = newest_rows(df).reset_index(drop=True)
    return df if wanted is None else df[wanted]


def newest_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per case_id: the newest run's, and within a run the last in file order. Run ids
    start with their UTC start time, so their order is the runs' order."""
    return df.sort_values("run_id", kind="stable").drop_duplicates("case_id", keep="last")


def newest_row_mask(keys: pa.Table) -> np.ndarray:
    """Which rows of `keys` (case_id, run_id) `newest_rows` keeps: per case_id the
    newest run's row (a missing run id sorts last, as pandas sorts it), within a run the last.
    Computed on the Arrow columns, for readers that pick rows before reading them (the library
    build): a pandas frame of every stored id costs several times more. Kept beside
    `newest_rows` so the rule lives in one module."""
    import pyarrow.compute as pc

    n = len(keys)
    wanted = np.zeros(n, dtype=bool)
    if not n:
        return wanted
    t = pa.table({"case_id": keys["case_id"], "run_id": keys["run_id"], "row": pa.array(np.arange(n))})
    order = pc.sort_indices(
        t, sort_keys=[("case_id", "ascending", "at_end"), ("run_id", "ascending", "at_end"), ("row", "ascending")]
    )
    ids = t["case_id"].combine_chunks().take(order)
    later, earlier = ids[1:], ids[:-1]
    # A null id is one more id (pandas' drop_duplicates groups missing values together).
    differs = pc.if_else(
        pc.is_null(pc.not_equal(later, earlier)),
        pc.not_equal(pc.is_valid(later), pc.is_valid(earlier)),
        pc.not_equal(later, earlier),
    )
    last = np.ones(n, dtype=bool)
    last[:-1] = differs.to_numpy(zero_copy_only=False)
    wanted[order.to_numpy()[last]] = True
    return wanted


def newest_order(keys: pa.Table) -> np.ndarray:
    """The rows of `keys` (case_id, run_id) that `newest_rows` returns, in the order it returns
    them (by run id, a missing one last, ties in row order): `newest_rows` on Arrow, so a reader
    can pick and order rows without a pandas frame of them (the export's case copy keeps its
    rows in this order, so a night orders only its new rows)."""
    import pyarrow.compute as pc

    n = len(keys)
    t = pa.table({"run_id": keys["run_id"], "row": pa.array(np.arange(n))})
    order = pc.sort_indices(t, sort_keys=[("run_id", "ascending", "at_end"), ("row", "ascending")]).to_numpy()
    return order[newest_row_mask(keys)[order]]


def read_case(out: Path, case_id: str) -> dict[str, Any] | None:
    """The newest stored row of one case (a re-run may have written it again), or None."""
    rows = [r for f in stored_parts(out) for r in _read_part(f, CASE_SCHEMA, [("case_id", "==", case_id)]).to_pylist()]
    return max(rows, key=lambda r: r.get("run_id") or "") if rows else None


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
