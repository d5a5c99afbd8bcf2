"""The history-bound start of a nightly export, stage by stage: reading every stored case (through
the case copy), classifying and selecting them, reading the membership and finding the new cases.

Why: issue 15 wants a night's export to cost in proportion to its new cases; these stages read all
history each night, so they are what is left to cut. Measured on kept nights (`bench.bench_export
--keep DIR` leaves DIR/night<N>: a 100k-case history and N new cases, stored and embedded), each
in fresh child processes: the first pass in a process (as the nightly run makes it, after the
embedder's warm-up) and warm passes, each on a fresh copy of the night.

    python -m bench.bench_export_load --nights DIR/night1000,DIR/night10000 [--runs 3] [--repeat 3]

The stages are those of the code on PYTHONPATH, so the same file measures an older checkout
(A/B): `PYTHONPATH=OLD python bench/bench_export_load.py --nights ...` (its look-ups and its
case copy as that code made them).

The case copy a kept night holds may be of an older layout (read as no copy: every part would be
decoded). Each night is measured with its copy rebuilt from the very parts the kept copy had seen,
so the night's new parts are still new to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("load", "classify", "select", "drop_texts", "members", "lookups")


def prime(night: Path, dest: Path) -> None:
    """`night` copied to `dest`, its case copy rebuilt in the current layout from the parts the
    kept copy had seen (their paths are in its metadata, whatever its layout)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from pipeline.insights.export import CASE_CACHE_KEY, CASE_COLUMNS, case_cache_path, shrink_case_part
    from pipeline.storage import case_cache as cc
    from pipeline.storage.store import CASE_SCHEMA, cases_dir, read_columns, read_parts

    shutil.copytree(night, dest)  # keeps mtimes: the copy's record of its parts stays valid
    if not hasattr(cc, "_newest"):
        return  # the code before the copy kept its rows in order (A/B runs): the kept copy is its own
    path = case_cache_path(dest)
    former = path.parent / "export-cases.arrow"  # the single Arrow file the kept nights were made with
    if former.is_file():
        with pa.memory_map(str(former)) as src:
            meta = json.loads(ipc.open_file(src).schema.metadata[b"casemine_case_cache"])
        former.unlink()
    else:
        meta = json.loads((path / "meta.json").read_text())
    wanted = [c for c in [*[c for c in CASE_COLUMNS if c != "tokens"], "run_id"] if c in CASE_SCHEMA.names]
    read = read_columns(wanted, latest=True) or wanted
    seen = sorted(meta["files"])
    table = cc._newest(read_parts([cases_dir(dest) / rel for rel in seen], read, shrink_case_part))
    schema = pa.schema([cc._storage(f) for f in table.schema])
    cc._save(path, table.cast(schema), CASE_CACHE_KEY, {rel: tuple(meta["files"][rel]) for rel in seen})


def child(night: Path, repeat: int) -> None:
    """Time the stages `repeat` times on fresh copies of `night`; one JSON line per pass."""
    from pipeline.config import load_config
    from pipeline.embed import Embedder
    from pipeline.insights import export as ex
    from pipeline.insights import membership as mb
    from pipeline.insights.cluster import select_cases

    cfg = load_config(Path(ex.__file__).resolve().parents[2] / "configs" / "casemine.yaml")
    c = cfg.cluster
    for i in range(repeat):
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            out = Path(tmp) / "n"
            shutil.copytree(night, out)
            if i == 0:  # as the nightly process comes to the export: the embedder loaded
                Embedder(cfg, out_root=out).encode_passages(["预热"])
            cpu = time.process_time()
            marks = [time.perf_counter()]
            cases = ex.load_cases(out)
            marks.append(time.perf_counter())
            cases, _ = ex.ensure_classified(cases, cfg)
            marks.append(time.perf_counter())
            frame = select_cases(cases, c.min_problem_chars, c.request_kinds)
            marks.append(time.perf_counter())
            cases, frame = ex.drop_texts(cases, frame)
            marks.append(time.perf_counter())
            membership, _ = mb.load_members(out, mb.load_meta(out))
            marks.append(time.perf_counter())
            if hasattr(ex, "locate_members"):
                alive, todo, redone, _ = ex.locate_members(membership, frame)
                frame[todo].reset_index(drop=True)
            else:  # the look-ups before locate_members (A/B runs against older code)
                member_ids = ex._key(membership["case_id"])
                keys = ex._key(membership["case_id"], membership["run_id"])
                todo = ~ex._is_in(ex._key(frame["case_id"], frame["run_id"]), keys)
                _alive = ex._is_in(member_ids, ex._key(frame["case_id"]))
                _redone = ex._is_in(member_ids, ex._key(frame[todo].reset_index(drop=True)["case_id"]))
            marks.append(time.perf_counter())
            times = {name: b - a for name, a, b in zip(STAGES, marks, marks[1:])}
            times["cpu"] = time.process_time() - cpu
            print(json.dumps({"pass": i, "new": int(todo.sum()), "cases": len(cases), **times}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nights", help="kept nights, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="child processes per night")
    ap.add_argument("--repeat", type=int, default=3, help="passes per child (the first is 'first in process')")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child), args.repeat)
        return
    if not args.nights:
        ap.error("--nights is required")
    for night in [Path(n) for n in args.nights.split(",")]:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            primed = Path(tmp) / night.name
            prime(night, primed)
            copy = primed / "state" / "cache" / "export-cases"
            size = sum(f.stat().st_size for f in copy.rglob("*") if f.is_file())
            rows: list[dict] = []
            for _ in range(args.runs):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    str(primed),
                    "--repeat",
                    str(args.repeat),
                ]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows += [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        print(f"{night.name}: {rows[0]['cases']} cases, {rows[0]['new']} new; case copy {size / 2**20:.1f} MiB")
        for label, sel in (
            ("first in process", [r for r in rows if r["pass"] == 0]),
            ("warm", [r for r in rows if r["pass"]]),
        ):
            if not sel:
                continue
            cells = []
            for k in (*STAGES, "cpu"):
                v = [r[k] * 1000 for r in sel]
                cells.append(f"{k} {min(v):.0f}/{statistics.median(v):.0f}")
            total = [sum(r[k] for k in STAGES) * 1000 for r in sel]
            print(
                f"  {label:17s} ms min/median over {len(sel)}: "
                + ", ".join(cells)
                + f", total {min(total):.0f}/{statistics.median(total):.0f}"
            )


if __name__ == "__main__":
    main()
