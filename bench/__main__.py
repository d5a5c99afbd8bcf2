"""`make bench`: every benchmark, figures printed with the baseline measured in the same run."""

import subprocess
import sys

BENCHES = [
    ["bench.bench_pipeline", "--n", "5000"],
    ["bench.bench_mask", "--n", "3000"],
    ["bench.bench_flow", "--sizes", "2000,10000"],
    ["bench.bench_embed_index", "--sizes", "10000,100000"],
    ["bench.bench_clusters"],
    ["bench.bench_query"],
]

if __name__ == "__main__":
    failed = 0
    for args in BENCHES:
        print(f"\n=== python -m {' '.join(args)}", flush=True)
        failed |= subprocess.call([sys.executable, "-m", *args]) != 0
    sys.exit(1 if failed else 0)
