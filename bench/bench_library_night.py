"""The nightly library build on a stored history: continuing from the saved pools (the night's
new parts only) against a build over every stored case, on the same night, in the same process.

Why: the library step ran after every night's export and read every stored case (about 10 s at
100k, linear in the history); issue 15 wants a night's cost to follow its new cases. A history of
--history cases (bench.bench_library_memory's: real-shaped cases mined from generated transcripts,
replicated over eight weeks, exported once with the hashing embedder) gets, per --increments, a
night of +N new cases dated the day after: yesterday's build (which saves the pools), the new
cases stored and exported incrementally, then tonight's build both ways, alternating which runs
first. Both print a digest of their candidates, which must be equal. The hashing embedder stands
in for the encoder: "encoded" is how many texts the product's encoder would embed (the new cases'
pooled texts only, against every pooled text for a build from scratch without its cache).

    python -m bench.bench_library_night [--history 100000] [--increments 1000,10000] [--keep DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def digest(cands) -> str:
    return hashlib.sha256(json.dumps([asdict(c) for c in cands], ensure_ascii=False).encode()).hexdigest()[:16]


def build(cfg, out: Path, full: bool) -> tuple[float, dict, str, int]:
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.library.typical_cases import select_from_store

    emb = HashingEmbedder()
    t = time.perf_counter()
    cands, counts = select_from_store(cfg, out, emb, full=full)
    return time.perf_counter() - t, counts, digest(cands), sum(emb.calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=int, default=100_000)
    ap.add_argument("--increments", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=3, help="builds of each kind per night (alternating)")
    ap.add_argument("--pool", type=int, default=400, help="generated transcripts mined for case shapes")
    ap.add_argument("--keep", type=Path, help="keep the history here and reuse it (building one costs an export)")
    a = ap.parse_args()

    import pandas as pd

    from bench.bench_export import DAY, mined_pool, replicate, store
    from bench.bench_library_memory import make_history
    from pipeline.config import load_config
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.insights.export import export_all
    from pipeline.library.pool_state import state_file

    cfg = load_config(REPO / "configs" / "casemine.yaml")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        root = a.keep or tmp
        root.mkdir(parents=True, exist_ok=True)
        cached = root / "pool.parquet"
        pool = pd.read_parquet(cached) if cached.is_file() else mined_pool(tmp, a.pool)
        if a.keep and not cached.is_file():
            pool.to_parquet(cached)
        base = make_history(root, a.history, pool)
        print(f"history: {a.history:,} stored cases ({base})\n", flush=True)
        print(
            f"{'new cases':>10} {'build':>12} {'secs (median, range)':>24} {'encoded':>8} {'cases':>8} "
            f"{'eligible':>9} {'cands':>6}  digest"
        )
        for k, n in enumerate(int(x) for x in a.increments.split(",")):
            out = tmp / f"night{n}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(base, out)
            build(cfg, out, full=True)  # yesterday's build: saves the pools
            saved = tmp / f"pools-{n}.npz"
            shutil.copy2(state_file(out), saved)
            run_id = f"20251201T0{k}0000-new"
            day = DAY + timedelta(days=1)
            store(out, replicate(pool, n, 10_000_000 * (k + 1), run_id, [day.isoformat()], seed=100 + k), run_id)
            s = export_all(cfg, out, embedder=HashingEmbedder(), today=day)
            assert s["mode"] == "incremental", s.get("mode_reason")
            got: dict[str, list] = {"incremental": [], "full": []}
            for r in range(a.repeat):
                for kind in ("incremental", "full") if r % 2 == 0 else ("full", "incremental"):
                    if kind == "incremental":  # each from yesterday's pools (every build saves its own)
                        shutil.copy2(saved, state_file(out))
                    got[kind].append(build(cfg, out, full=kind == "full"))
            for kind, runs in got.items():
                secs = [x[0] for x in runs]
                c = runs[0][1]
                assert c["build"] == kind, c
                print(
                    f"{n:>10,} {kind:>12} {statistics.median(secs):>8.2f} s ({min(secs):.2f}-{max(secs):.2f})"
                    f"{'':>4} {runs[0][3]:>8,} {c['cases']:>8,} {c['eligible']:>9,} {c['candidates']:>6}  "
                    f"{runs[0][2]}"
                )
            same = {x[2] for runs in got.values() for x in runs}
            print(f"{'':>10} same candidates both ways: {len(same) == 1}", flush=True)
    print(f"\nbench wall {time.perf_counter() - t_all:.0f} s; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
