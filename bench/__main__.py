"""`make bench`: every benchmark at quick sizes, figures printed with the baseline measured in the
same run. `make bench-scale` (`python -m bench --scale`): the big sizes (whole runs of 10k and
100k transcripts with their peak RSS, index builds at 100k, queries at 100k and 1M), which take
hours on a 2-core machine and so are kept out of the quick pass."""

import subprocess
import sys

QUICK = [
    ["bench.bench_pipeline", "--n", "2000"],
    ["bench.bench_mask", "--n", "3000"],
    ["bench.bench_flow", "--sizes", "2000", "--memory-sizes", "500,1000,2000", "--chunk-mb", "0.25", "--no-one-chunk"],
    ["bench.bench_embed_index", "--sizes", "10000"],
    ["bench.bench_index_update", "--history", "10000", "--adds", "100,1000"],
    ["bench.bench_clusters"],
    ["bench.bench_export", "--history", "3000", "--increments", "300,1000"],
    ["bench.bench_query"],
]
SCALE = [
    ["bench.bench_flow", "--sizes", "10000,100000", "--memory-sizes", "10000,50000", "--chunk-mb", "4"],
    ["bench.bench_embed_index", "--sizes", "100000"],
    ["bench.bench_index_update", "--history", "100000", "--adds", "1000,10000"],
    ["bench.bench_query", "--sizes", "100000,1000000"],
    ["bench.bench_export", "--history", "100000", "--increments", "1000,10000"],
]

if __name__ == "__main__":
    benches = SCALE if "--scale" in sys.argv[1:] else QUICK
    failed = 0
    for args in benches:
        print(f"\n=== python -m {' '.join(args)}", flush=True)
        failed |= subprocess.call([sys.executable, "-m", *args]) != 0
    sys.exit(1 if failed else 0)
