"""Compare two runs' case tables: same rows (by case_id), same values, and which columns differ.

Why: a change to how cases are stored (types, the schema) must not change what is stored. Run the
same input through the old and the new code into two output roots, then:

    python -m bench.compare_case_tables OLD_OUT NEW_OUT --changed emotion_curve,turning_points

Each root is read as stored, part by part with pyarrow (never through pipeline.storage, which
would upgrade the old parts and hide the difference). Columns named in `--changed` changed type
on purpose: their old JSON strings are decoded before comparing, and a struct's null field counts
as the absent key it was in the JSON. Floats compare with NaN equal to null (pandas reads both as
NaN). `run_id` is not compared (each run has its own). Exit code 0 when rows and values agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


def read_table(out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, set[str]]]:
    """(case_id -> row of its newest run, column -> the Arrow types it has across the parts)."""
    rows: dict[str, dict[str, Any]] = {}
    types: dict[str, set[str]] = {}
    for f in sorted((out / "processed" / "cases").glob("date=*/part-*.parquet")):
        t = pq.read_table(f, partitioning=None)
        for field in t.schema:
            types.setdefault(field.name, set()).add(str(field.type))
        for r in t.to_pylist():
            r.setdefault("date", f.parent.name.removeprefix("date="))
            old = rows.get(r["case_id"])
            if old is None or str(r.get("run_id") or "") >= str(old.get("run_id") or ""):
                rows[r["case_id"]] = r
    return rows, types


def normal(v: Any) -> Any:
    """A value in the form both runs can agree on: NaN as None, dicts without their None values."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: normal(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [normal(x) for x in v]
    return v


def decoded(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) and v[:1] in ("[", "{") else v


def compare(
    old_out: Path, new_out: Path, changed: Sequence[str], ignore: Sequence[str] = ("run_id",)
) -> tuple[bool, list[str]]:
    old, old_types = read_table(old_out)
    new, new_types = read_table(new_out)
    lines = [f"rows: old {len(old)}, new {len(new)}"]
    only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    ok = not only_old and not only_new
    if not ok:
        lines.append(
            f"case_ids only in old: {len(only_old)} {only_old[:5]}; only in new: {len(only_new)} {only_new[:5]}"
        )
    else:
        lines.append("same case_ids")
    cols = sorted(set(old_types) | set(new_types))
    common = sorted(set(old) & set(new))
    for c in cols:
        if c in ignore:
            lines.append(f"ignored  {c}")
            continue
        ot, nt = sorted(old_types.get(c, {"(absent)"})), sorted(new_types.get(c, {"(absent)"}))
        decode = c in changed
        differ = 0
        for cid in common:
            a, b = old[cid].get(c), new[cid].get(c)
            if decode:
                a, b = decoded(a), decoded(b)
            if normal(a) != normal(b):
                differ += 1
        typed = "" if ot == nt else f" type {' | '.join(ot)} -> {' | '.join(nt)}"
        if differ:
            ok = False
            lines.append(f"DIFFERS  {c}: {differ} of {len(common)} rows{typed}")
        elif typed:
            how = "decoded equal" if decode else "values equal"
            lines.append(f"changed  {c}:{typed} ({how})")
    if ok:
        lines.append("same rows, same values; only the types listed above changed")
    return ok, lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--changed", default="", help="columns whose type changed on purpose: old JSON strings decoded")
    ap.add_argument("--ignore", default="run_id", help="columns not compared (run_id: each run has its own)")
    args = ap.parse_args(argv)
    ok, lines = compare(
        args.old, args.new, [c for c in args.changed.split(",") if c], [c for c in args.ignore.split(",") if c]
    )
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
