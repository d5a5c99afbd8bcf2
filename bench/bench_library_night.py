"""The nightly library build on a stored history: continuing from the saved pools (the night's
new parts only) against a build over every stored case, on the same night, in the same process.

Why: the library step ran after every night's export and read every stored case (about 10 s at
100k, linear in the history); issue 15 wants a night's cost to follow its new cases. A history of
--history cases (bench.bench_library_memory's: real-shaped cases mined from generated transcripts,
replicated over eight weeks, exported once with the hashing embedder) gets, per --increments,
--nights consecutive nights of +N new cases: a build before them (which saves the pools), then
each night the new cases stored and exported incrementally, and tonight's build as the product
runs it (from the pools: incremental, or full with the reason) against a build over every case
(`--full`), alternating which runs first, each from the pools saved the night before. "same":
every build of the night gave the same candidates (a digest). "deep/again": groups whose pick ran
short tonight, and how many of them read every stored part again (the rest took more texts from
their pools' reserves). The hashing embedder stands in
for the encoder: "encoded" is how many texts tonight's build asked it for (the product's encoder
finds most in its cache: the export embedded the same problem texts).

    python -m bench.bench_library_night [--history 100000] [--increments 1000,10000] [--nights 3]
        [--repeat 3] [--keep DIR]
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
    ap.add_argument("--nights", type=int, default=3, help="consecutive nights per increment")
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
            f"{'new cases':>10} {'night':>5} {'tonight':>24} {'secs (median, range)':>22} {'full build':>22} "
            f"{'encoded':>8} {'cases':>8} {'eligible':>9} {'cands':>6} {'deep/again':>10}  same"
        )
        for k, n in enumerate(int(x) for x in a.increments.split(",")):
            out = tmp / f"night{n}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(base, out)
            build(cfg, out, full=False)  # the build before these nights: saves the pools
            for night in range(1, a.nights + 1):
                run_id = f"2025120{night}T0{k}0000-new"
                day = DAY + timedelta(days=night)
                first_id = 10_000_000 * (k + 1) + 100_000 * night
                store(out, replicate(pool, n, first_id, run_id, [day.isoformat()], seed=100 * night + k), run_id)
                s = export_all(cfg, out, embedder=HashingEmbedder(), today=day)
                assert s["mode"] == "incremental", s.get("mode_reason")
                before, after = tmp / "before.npz", tmp / "after.npz"
                shutil.copy2(state_file(out), before)
                got: dict[str, list] = {"night": [], "full": []}
                for r in range(a.repeat):
                    for kind in ("night", "full") if r % 2 == 0 else ("full", "night"):
                        shutil.copy2(before, state_file(out))  # each from the pools before tonight
                        got[kind].append(build(cfg, out, full=kind == "full"))
                        if kind == "night":
                            shutil.copy2(state_file(out), after)
                shutil.copy2(after, state_file(out))  # the next night continues from tonight's build
                c = got["night"][0][1]
                mode = c["build"] + (f" ({c['full_because']})" if c["build"] == "full" else "")
                # Short groups deepened tonight, and how many of them read every stored part again.
                deep = f"{c.get('groups_deepened', '-')}/{c.get('groups_read_again', '-')}"
                same = len({x[2] for runs in got.values() for x in runs}) == 1
                med = {}
                for kind, runs in got.items():
                    v = [x[0] for x in runs]
                    med[kind] = f"{statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})"
                print(
                    f"{n:>10,} {night:>5} {mode:>24} {med['night']:>22} {med['full']:>22} {got['night'][0][3]:>8,} "
                    f"{c['cases']:>8,} {c['eligible']:>9,} {c['candidates']:>6} {deep:>10}  {same}",
                    flush=True,
                )
    print(f"\nbench wall {time.perf_counter() - t_all:.0f} s; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
