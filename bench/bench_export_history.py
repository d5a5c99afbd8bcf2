"""A night's export against the size of the history it is exported on.

Why: issue 15 wants a night's export to cost what its new cases cost, not what the history
holds. `bench.bench_export` times nights on one history; this one times the same kind of night
(+N new cases) on histories of several sizes, so what the export still pays per stored case shows
beside what it pays per new case: seconds per history, the ratio to the smallest history (the
baseline, measured in the same run) and the slope in ms per 1,000 stored cases.

It reads the stores `python -m bench.bench_export --history H --increments N,... --keep DIR`
leaves (DIR/base: the history after its first export; DIR/night<N>: the night's new cases stored
and embedded). Each night is first primed as a real night finds it: the base exported again on
its day by the code on PYTHONPATH (so every cache a night reads exists, as after any normal
night), then the night's new files added. Each round exports a fresh copy of the primed night in
a child process, the first export in that process: what a nightly run pays.

    python -m bench.bench_export_history --keeps DIR_10k,DIR_100k,DIR_1M [--nights 1000,10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as bench.bench_export ran the exports

DAY = date(2025, 11, 30)  # bench.bench_export's history day; its nights are the day after


def _child(out: Path, day: str) -> None:
    """One export of `out` on `day` in this process, after the embedder's warm-up (the model load
    is not the night's export); prints wall and CPU seconds as JSON."""
    from pipeline.config import load_config
    from pipeline.embed import Embedder
    from pipeline.insights.export import export_all

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "casemine.yaml")
    embedder = Embedder(cfg, out_root=out)
    embedder.encode_passages(["预热"])
    wall, cpu = time.perf_counter(), time.process_time()
    s = export_all(cfg, out, embedder=embedder, today=date.fromisoformat(day))
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "mode": s["mode"]}))


def _export(out: Path, day: date) -> dict:
    got = subprocess.run(
        [sys.executable, "-m", "bench.bench_export_history", "--child", str(out), day.isoformat()],
        capture_output=True,
        text=True,
        check=False,
    )
    if got.returncode != 0:
        raise SystemExit(f"the export of {out} failed:\n{got.stderr[-2000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def prime(keep: Path, night: int, dest: Path) -> None:
    """`keep`'s base exported again on its day into `dest`, then night `night`'s new files added.
    The night's embedding shards go in first: they hold the new cases' vectors (and the warm-up
    text, which would otherwise be a shard of the priming export's own)."""
    shutil.copytree(keep / "base", dest)  # copy2: mtimes kept, so the case copy's record stays valid
    src = keep / f"night{night}"
    shutil.copytree(src / "state" / "embeddings", dest / "state" / "embeddings", dirs_exist_ok=True)
    _export(dest, DAY)
    for f in src.rglob("*"):
        target = dest / f.relative_to(src)
        if f.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(Path(sys.argv[2]), sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", required=True, help="comma-separated `bench.bench_export --keep` folders")
    ap.add_argument("--nights", default="1000,10000", help="new cases per night (each keep's night<N>)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    a = ap.parse_args()
    keeps = [Path(k).resolve() for k in a.keeps.split(",")]
    nights = [int(n) for n in a.nights.split(",")]
    sizes = {}
    for k in keeps:
        info = json.loads((k / "bench.json").read_text())
        sizes[k] = int(info["options"]["history"])
        missing = [n for n in nights if not (k / f"night{n}").is_dir()]
        if missing:
            raise SystemExit(f"{k} has no night{missing[0]}: run bench.bench_export --keep {k} with that increment")
    keeps.sort(key=sizes.__getitem__)
    times: dict[tuple[Path, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp_s:
        tmp = Path(tmp_s)
        for k in keeps:
            for n in nights:
                primed, work = tmp / "primed", tmp / "work"
                print(f"priming {sizes[k]:,} stored cases +{n:,} ...", flush=True)
                prime(k, n, primed)
                runs = []
                for _ in range(a.rounds):
                    shutil.copytree(primed, work)
                    runs.append(_export(work, DAY + timedelta(days=1)))
                    shutil.rmtree(work)
                shutil.rmtree(primed)
                assert all(r["mode"] == "incremental" for r in runs), runs
                times[(k, n)] = runs
    print(f"\n{'stored cases':>13} {'night':>8} {'wall min-max (median)':>24} {'CPU median':>11} {'/ smallest':>11}")
    for n in nights:
        base = statistics.median(r["wall"] for r in times[(keeps[0], n)])
        for k in keeps:
            walls = sorted(r["wall"] for r in times[(k, n)])
            med = statistics.median(walls)
            cpu = statistics.median(r["cpu"] for r in times[(k, n)])
            span = f"{walls[0]:.2f}-{walls[-1]:.2f} ({med:.2f}) s"
            print(f"{sizes[k]:>13,} {'+' + format(n, ','):>8} {span:>24} {cpu:>10.2f}s {med / base:>10.2f}x")
        if len(keeps) > 1:
            lo, hi = keeps[0], keeps[-1]
            slope = (statistics.median(r["wall"] for r in times[(hi, n)]) - base) / (sizes[hi] - sizes[lo]) * 1e6
            print(f"{'':>13} +{n:,}: {slope:.2f} ms per 1,000 stored cases ({sizes[lo]:,} to {sizes[hi]:,})")


if __name__ == "__main__":
    main()
