"""Peak memory of `casemine library build` against the size of the stored history.

Why: a 50,000-transcript run peaked in its library step (issue 15, point 1); the build must read
a history of any length in bounded memory. Histories of each --sizes are replicated from a pool of
real-shaped cases mined by the nightly steps (bench.bench_export), stored, and exported once with
the hashing embedder (pipeline.embed.fake) so the clusters' members exist. Each build then runs in
a FRESH child process: its peak RSS (its own VmHWM, read at its end) minus its RSS after imports
and the scorer's load is the build's own memory. `--impl legacy` runs the former build (every eligible
row kept and embedded at once, then `select_candidates`), `--impl current` the product's build;
both print a digest of their candidates, which must be equal.

    python -m bench.bench_library_memory [--sizes 10000,30000,60000] [--impl legacy,current]
        [--keep DIR] [--pool 400]

--keep DIR stores the histories there and reuses them on the next call (building one costs an
export); without it they live in a temporary folder.
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
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def _rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set now (VmRSS) or its high-water mark (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def legacy_candidates(cfg, out: Path, embedder):
    """The build's selection as it was before the bounded per-group pools: every eligible case kept
    as a full row, all of them embedded in one call, `select_candidates` over the whole frame."""
    import numpy as np
    import pandas as pd

    from pipeline.library.candidates import CandidateScorer, case_texts, cluster_map, select_candidates
    from pipeline.library.sources import iter_library_cases, load_members

    scorer = CandidateScorer.from_config(cfg)
    kept = []
    for block in iter_library_cases(cfg, out):
        kept.append(block[[scorer.assess(r)[0] for r in block.to_dict("records")]])
    cases = pd.concat(kept, ignore_index=True)
    vectors = np.asarray(embedder.encode_passages(case_texts(cases)), dtype=np.float32)
    return select_candidates(cases, vectors, scorer, cluster_map(load_members(out)))


def child(impl: str, out: Path) -> None:
    """One build in this (fresh) process; prints its figures as JSON on the last line."""
    # What the run has loaded before its library step: the stages the build calls into, the lexicon.
    import pipeline.analysis.classify  # noqa: F401
    import pipeline.analysis.emotion  # noqa: F401
    import pipeline.insights.export  # noqa: F401
    from pipeline.config import load_config
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.library import typical_cases
    from pipeline.library.candidates import CandidateScorer

    cfg = load_config(REPO / "configs" / "casemine.yaml")
    CandidateScorer.from_config(cfg)
    emb = HashingEmbedder()
    base = _rss_mib()
    t = time.perf_counter()
    if impl == "legacy":
        cands, counts = legacy_candidates(cfg, out, emb)
    else:
        # full: a build over every case (a saved pools file would make it a night of no new cases).
        cands, counts = typical_cases.select_from_store(cfg, out, emb, full=True)
    secs = time.perf_counter() - t
    digest = hashlib.sha256(
        json.dumps([asdict(c) for c in cands], ensure_ascii=False, sort_keys=True).encode()
    ).hexdigest()[:16]
    order = hashlib.sha256("|".join(c.case_id for c in cands).encode()).hexdigest()[:8]
    print(
        json.dumps(
            {
                "base_mib": base,
                "hwm_mib": _rss_mib("VmHWM"),
                "secs": secs,
                "counts": counts,
                "digest": digest,
                "order": order,
                "embedded": sum(emb.calls),
            }
        )
    )


def run_child(impl: str, out: Path) -> dict:
    """The child's JSON plus its peak RSS: its own VmHWM (the memory it mapped after exec).
    wait4's ru_maxrss is kept for reference only: Linux carries the parent's peak into a spawned
    child's ru_maxrss, so after the parent built a history (an export) it reports that peak."""
    with tempfile.TemporaryFile("w+") as so:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        p = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_library_memory", "--child", impl, "--out", str(out)],
            stdout=so,
            cwd=REPO,
            env=env,
        )
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        text = so.read()
    if p.returncode != 0:
        raise SystemExit(f"{impl} build failed ({p.returncode}):\n{text[-2000:]}")
    res = json.loads(text.strip().splitlines()[-1])
    res["peak_mib"] = res["hwm_mib"]
    res["ru_maxrss_mib"] = ru.ru_maxrss / 1024  # KiB on Linux
    return res


def make_history(root: Path, n: int, pool) -> Path:
    """A stored history of `n` cases over eight weeks, exported once (members exist)."""
    from bench.bench_export import DAY, replicate, store
    from pipeline.config import load_config
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.insights.export import export_all

    out = root / f"h{n}"
    if (out / "exports" / "LATEST").is_file():
        return out
    cfg = load_config(REPO / "configs" / "casemine.yaml")
    days = [(DAY - timedelta(days=d)).isoformat() for d in range(56)]
    # Written in nightly-sized runs, as a real history is: many part files, not one.
    per_run = 5_000
    for k, start in enumerate(range(0, n, per_run)):
        run_id = f"202510{1 + k // 24:02d}T{k % 24:02d}0000-h"
        store(out, replicate(pool, min(per_run, n - start), start, run_id, days, seed=k, variants=3), run_id)
    t = time.perf_counter()
    export_all(cfg, out, embedder=HashingEmbedder(), today=DAY)
    print(f"  history {n:,}: stored and exported in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,30000,60000")
    ap.add_argument("--impl", default="legacy,current", help="comma list of legacy,current (run in this order)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the impls this many times per size")
    ap.add_argument("--pool", type=int, default=400, help="generated transcripts mined for case shapes")
    ap.add_argument("--keep", type=Path, help="store histories here and reuse them")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.out)
        return
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_s:
        root = a.keep or Path(tmp_s)
        root.mkdir(parents=True, exist_ok=True)
        pool = None
        print(
            f"{'cases':>7} {'impl':>8} {'eligible':>9} {'embedded':>9} {'cands':>6} {'base MiB':>9} "
            f"{'peak MiB':>9} {'build MiB':>10} {'secs':>6} {'ru_maxrss':>9}  digest",
            flush=True,
        )
        for n in (int(x) for x in a.sizes.split(",")):
            if not (root / f"h{n}" / "exports" / "LATEST").is_file() and pool is None:
                import pandas as pd

                from bench.bench_export import mined_pool

                cached = root / "pool.parquet"
                if cached.is_file():
                    pool = pd.read_parquet(cached)
                else:
                    pool = mined_pool(Path(tmp_s), a.pool)
                    if a.keep:
                        pool.to_parquet(cached)
            out = make_history(root, n, pool)
            for _ in range(a.rounds):
                for impl in a.impl.split(","):
                    r = run_child(impl, out)
                    c = r["counts"]
                    print(
                        f"{n:>7,} {impl:>8} {c['eligible']:>9,} {r['embedded']:>9,} {c['candidates']:>6} "
                        f"{r['base_mib']:>9.0f} {r['peak_mib']:>9.0f} {r['peak_mib'] - r['base_mib']:>10.0f} "
                        f"{r['secs']:>6.1f} {r['ru_maxrss_mib']:>9.0f}  {r['digest']}/{r['order']}",
                        flush=True,
                    )
    print(f"\nbench wall {time.perf_counter() - t_all:.0f} s; uptime: {os.getloadavg()}")


if __name__ == "__main__":
    main()
