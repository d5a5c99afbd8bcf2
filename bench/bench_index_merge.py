"""Peak memory of an index compaction (the merge of many segments into one) against its size.

Why: a back-fill appends a segment per chunk, and `segments.plan_merge` merges them in tiers, so
the run's last tiers merge most of the history into one segment. That merge was the largest peak
of a long run that is otherwise flat per chunk. This bench writes --segments segments of
metadata shaped like the product's (`bench_index_update._cases`: texts, tokens, 384-d unit
vectors) holding --rows in all, then merges them in a fresh child process per method, so each
child's peak (VmHWM) is its own:
- `streamed`: `segments.merge_segments`, the product's merge (a segment at a time into the
  Parquet writers and the new exact index);
- `concatenated`: the merge as it was before (every segment read, concatenated, written once),
  kept here as the baseline measured in the same run;
- `pages kept`: the product's merge without its page drops (`heap.drop_mapped_pages`), which
  held every mapped page it read or wrote to its end.
--tiered lays the segments out as a back-fill's last merge finds them: the first holds half the
rows, the others share the rest.
Reported per size and method: RSS after imports, peak, peak above imports, MiB per 1,000 rows
merged, seconds; and the ratio of the two peaks. Outputs are compared (same rows, vectors).

    python -m bench.bench_index_merge [--rows 50000,200000] [--segments 17] [--repeat 1] [--tiered]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
METHODS = ("concatenated", "pages kept", "streamed")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _sizes(rows: int, segments: int, tiered: bool) -> list[int]:
    """Rows per segment: equal, or (`tiered`) half in the first and the rest shared."""
    if tiered and segments > 1:
        first = rows // 2
        return [first] + _sizes(rows - first, segments - 1, False)
    return [rows // segments + (1 if i < rows % segments else 0) for i in range(segments)]


def _write(root: Path, rows: int, segments: int, tiered: bool = False) -> list[str]:
    """`segments` segments of `rows` rows in all, as the nightly writer writes them."""
    import numpy as np

    from bench.bench_index_update import _cases
    from pipeline.retrieval import segments as sg
    from pipeline.retrieval.bm25 import TermStats
    from pipeline.retrieval.index import _table

    rng = np.random.default_rng(0)
    names, start = [], 0
    for i, n in enumerate(_sizes(rows, segments, tiered)):
        meta, vecs = _cases(start, n, rng)
        meta["vid"] = np.arange(start, start + n, dtype=np.int64)
        name = sg.segment_name(i)
        sg.write_segment(root, name, _table(meta), vecs, TermStats.build(meta["tokens"].tolist()))
        names.append(name)
        start += n
    return names


def _child(root: Path, method: str, names: list[str], dst: Path) -> dict:
    """Merge in this process (a fresh child): peak and seconds of the merge alone."""
    import faiss  # noqa: F401  (imports before the baseline RSS, as in the product's process)
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.retrieval import segments as sg
    from pipeline.retrieval.bm25 import TermStats

    tomb = np.zeros(0, dtype=np.int64)
    parts = [(root, n) for n in names]
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if method == "pages kept":
        from pipeline import heap

        heap.drop_mapped_pages = lambda *a, **k: 0  # type: ignore[assignment]
    if method in ("streamed", "pages kept"):
        _, rows = sg.merge_segments(parts, tomb, dst, "merged")
    else:
        read = [sg.read_segment(d, s, tomb) for d, s in parts]
        table = pa.concat_tables([t for t, _, _ in read], promote_options="default")
        vecs = np.concatenate([v for _, v, _ in read])
        sg.write_segment(dst, "merged", table, vecs, TermStats.concat([st for _, _, st in read]))
        rows = table.num_rows
    took = time.perf_counter() - t0
    meta = pq.read_table(dst / "merged" / sg.SEG_META_FILE, columns=["case_id", "vid"])
    return {
        "rows": rows,
        "rss_before_mib": base / 1024,
        "peak_mib": _status_kib("VmHWM") / 1024,
        "seconds": took,
        "digest": hashlib.sha256("\n".join(meta.column("case_id").to_pylist()).encode()).hexdigest(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="50000,200000", help="rows merged, per size")
    ap.add_argument("--segments", type=int, default=17, help="segments merged (the limit is 16)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tiered", action="store_true", help="half the rows in the first segment")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        root, method, names, dst = a.child
        print(json.dumps(_child(Path(root), method, names.split(","), Path(dst))))
        return
    results = []
    for rows in [int(x) for x in a.rows.split(",")]:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            root = Path(tmp) / "v"
            t0 = time.perf_counter()
            names = _write(root, rows, a.segments, a.tiered)
            layout = " (half in the first)" if a.tiered else ""
            print(f"{rows:,} rows in {a.segments} segments{layout} written in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            for r in range(a.repeat):
                row: dict = {"rows": rows}
                for method in METHODS:
                    dst = Path(tmp) / f"{method}-{r}"
                    out = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "bench.bench_index_merge",
                            "--child",
                            str(root),
                            method,
                            ",".join(names),
                            str(dst),
                        ],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    row[method] = json.loads(out.stdout.strip().splitlines()[-1])
                same = len({row[m]["digest"] for m in METHODS}) == 1
                for method in METHODS:
                    m = row[method]
                    above = m["peak_mib"] - m["rss_before_mib"]
                    m["above_mib"] = above
                    print(
                        f"  {method:13s} peak {m['peak_mib']:7.0f} MiB, above imports {above:6.0f} MiB "
                        f"({above / rows * 1000:5.2f} MiB per 1,000 rows), {m['seconds']:5.1f} s",
                        flush=True,
                    )
                ratio = row["streamed"]["above_mib"] / max(row["concatenated"]["above_mib"], 1e-9)
                kept = row["streamed"]["above_mib"] / max(row["pages kept"]["above_mib"], 1e-9)
                print(f"  streamed / concatenated peak above imports: {ratio:.2f}; / pages kept: {kept:.2f}; "
                      f"same rows: {same}", flush=True)
                results.append(row)
    print(json.dumps({"bench": "index_merge", "segments": a.segments, "tiered": a.tiered, "results": results}))


if __name__ == "__main__":
    main()
