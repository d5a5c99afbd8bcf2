"""`make bench`: every benchmark at quick sizes, figures printed with the baseline measured in the
same run. `make bench-scale` (`python -m bench --scale`): the big sizes (whole runs of 10k and
100k transcripts, the peak RSS of chunked runs of 10k, 60k and 120k and of a back-fill's last
export at 200k and 400k stored cases, alone and as a run's last step, index builds at 100k,
queries at 100k and 1M), which take hours on a 2-core machine and so are kept out of the quick
pass."""

import subprocess
import sys
import time

QUICK = [
    ["bench.bench_pipeline", "--n", "1000"],
    ["bench.bench_mask", "--n", "3000"],
    # Four whole runs (500, +200, 200 plain, 200 through Prefect): with 2,000 transcripts and the
    # peak-memory runs (now in SCALE) this benchmark alone took 16 minutes with both cores busy.
    ["bench.bench_flow", "--sizes", "500", "--increment", "200", "--prefect-size", "200"],
    ["bench.bench_embed_index", "--sizes", "10000"],
    ["bench.bench_index_update", "--history", "10000", "--adds", "100,1000"],
    ["bench.bench_index_merge", "--rows", "20000"],
    ["bench.bench_clusters"],
    ["bench.bench_export", "--history", "3000", "--increments", "300,1000"],
    ["bench.bench_library_night", "--history", "10000", "--increments", "300,1000", "--repeat", "1"],
    ["bench.bench_query"],
]
SCALE = [
    # Peak memory past the caps a run's last steps fill (a re-cluster fits at most
    # `cluster.fit_max_cases`, 50,000 cases a scope; the members file is written 65,536 rows at a
    # time): below them the peak grows by design, so flatness shows from 60,000 on.
    [
        "bench.bench_flow",
        "--sizes",
        "10000,100000",
        "--memory-sizes",
        "10000,60000,120000",
        "--chunk-mb",
        "4",
        "--no-one-chunk",
    ],
    # A back-fill's last export at history sizes no whole run here reaches in hours: alone (its
    # own memory), then as a run's last step beside the same run's chunk steps (which of the two
    # sets a back-fill's peak).
    ["bench.bench_export_memory", "--mode", "full", "--sizes", "200000,400000", "--repeat", "1", "--stored-tokens"],
    [
        "bench.bench_export_memory",
        "--mode",
        "full",
        "--sizes",
        "200000,400000",
        "--repeat",
        "1",
        "--stored-tokens",
        "--after-run",
    ],
    ["bench.bench_embed_index", "--sizes", "100000"],
    ["bench.bench_index_update", "--history", "100000", "--adds", "1000,10000"],
    ["bench.bench_index_merge", "--rows", "200000,1000000", "--tiered"],
    ["bench.bench_query", "--sizes", "100000,1000000"],
    ["bench.bench_export", "--history", "100000", "--increments", "1000,10000"],
    ["bench.bench_library_night", "--history", "100000", "--increments", "1000,10000"],
]

if __name__ == "__main__":
    benches = SCALE if "--scale" in sys.argv[1:] else QUICK
    failed = 0
    took: list[tuple[str, float, int]] = []
    t_all = time.perf_counter()
    for args in benches:
        print(f"\n=== python -m {' '.join(args)}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", *args])
        took.append((" ".join(args), time.perf_counter() - t, rc))
        failed |= rc != 0
    # The pass's own budget (15 minutes for `make bench`, also on a busy machine) is checked here.
    print("\n=== wall time per benchmark")
    for name, secs, rc in took:
        print(f"  {secs:>7.1f} s  {name}{'' if rc == 0 else f'  (exit {rc})'}")
    print(f"  {time.perf_counter() - t_all:>7.1f} s  in all")
    sys.exit(1 if failed else 0)
