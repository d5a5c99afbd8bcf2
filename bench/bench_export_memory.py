"""Peak memory of the nightly (incremental) export, or of a full re-cluster export, against the
size of the stored history.

Why: issue 15 asks for a nightly cost that follows the new cases; the export reads every stored
case and the whole membership each night, so its memory can grow with the history even when its
work does not. For each history size this builds a store (cases mined by the nightly steps,
replicated as `bench.bench_export` does), runs one full export to create the cluster state, adds
--new cases dated the next day, then runs the INCREMENTAL export in a fresh child process with
the hashing embedder (no model: the export's own memory). Reported per size: the child's RSS
after its imports, its peak RSS (VmHWM; not ru_maxrss, which a forked child inherits from its
parent), the largest anonymous RSS sampled (RssAnon: the peak less the pages of the files the
export maps, which the kernel may drop), the peak above the imports per 1,000 stored cases, and
the export's seconds. With --breakdown a second child samples its RSS every few milliseconds
and reports, per export stage, the RSS on entry, the peak sampled inside and VmHWM on exit (a
sample can miss a peak inside one long C call; VmHWM does not), plus the MiB of each column of
the frames it holds.

    python -m bench.bench_export_memory [--sizes 10000,30000,60000] [--new 1000] [--repeat 3] [--keep DIR]
                                        [--mode incremental|full] [--stored-tokens]

--mode full measures the export a back-fill ends with instead: the child's copy of the store has
no cluster state (its state/clusters folder is removed), so the export re-clusters every stored
case (mode "full", reason "no_state"); its --breakdown adds the re-cluster's stages.
--stored-tokens: the cases carry their problem's jieba tokens, as a back-fill's cases do (the
default stores have none, so a re-cluster cuts every case's text).
--after-run: the export as a run's last step rather than alone. The child first runs the chunk
steps of a real run over the bundled sample (`data/sample`: the run's components, the encoder
loaded, the model let go as the runner does), then the run's export step exports the store. The
run's own peak log (CASEMINE_MEMLOG) gives the chunk steps' peak and the export step's, so the
two can be compared at history sizes a whole run could not reach in the bench's time. "after
imports" is then the RSS the export step starts from.

--keep DIR keeps the prepared stores (and reuses them on the next call, so two versions of the
code measure the same stores) and every child's exports folder, for comparing outputs:
    python -m bench.bench_export_memory --compare DIR/run-a-60000 DIR/run-b-60000
(the latest export's files, and every file of the cluster state and membership.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

MIB = 1024 * 1024
DAY = date(2025, 11, 30)


def rss_mib() -> float:
    """Resident set size now, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_mib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: on Linux a child started by fork+exec
    inherits in ru_maxrss the RSS its parent had at the fork (the parent here holds a store)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def anon_mib() -> float:
    """Anonymous resident memory now (RssAnon): the RSS less the mapped files' pages (the case
    copy and the vectors' file are memory-mapped; their clean pages are the kernel's to drop)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class AnonPeak:
    """The largest RssAnon sampled on a thread: says whether a peak's growth is memory the
    export holds or pages of the files it maps (VmHWM counts both; no kernel figure keeps the
    anonymous high-water mark, so it is sampled and can miss a short spike)."""

    def __init__(self, every_s: float = 0.005):
        self.every_s = every_s
        self.peak = anon_mib()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_mib())
            time.sleep(self.every_s)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return max(self.peak, anon_mib())


# -- the child: one incremental export, measured --------------------------------------------------


class Sampler:
    """RSS sampled on a thread; nested stages record their entry RSS and the peak seen inside, and
    the same of the anonymous part (RssAnon): a stage's RSS step may be pages of a mapped file
    (the case copy, the vectors) that the kernel can drop, or memory the export holds."""

    def __init__(self, every_s: float = 0.003):
        self.every_s = every_s
        self.active: list[dict[str, Any]] = []
        self.done: list[dict[str, Any]] = []
        self.seq = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            r, a = rss_mib(), anon_mib()
            for rec in list(self.active):
                rec["peak"] = max(rec["peak"], r)
                rec["anon_peak"] = max(rec["anon_peak"], a)
            time.sleep(self.every_s)

    def start(self) -> None:
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def wrap(self, module: Any, name: str, frames: bool = False) -> None:
        if not hasattr(module, name):
            return  # a stage another version of the code does not have
        fn = getattr(module, name)

        def wrapped(*a, **k):
            r0, a0 = rss_mib(), anon_mib()
            self.seq += 1
            rec = {"stage": name, "seq": self.seq, "depth": len(self.active), "enter": r0, "peak": r0}
            rec.update(anon=a0, anon_peak=a0)
            rec["t"] = time.perf_counter()
            self.active.append(rec)
            try:
                res = fn(*a, **k)
            finally:
                rec["exit"] = rss_mib()
                rec["hwm"] = peak_mib()  # exact: the stage where it jumps holds the peak
                rec["peak"] = max(rec["peak"], rec["exit"])
                rec["anon_exit"] = anon_mib()
                rec["anon_peak"] = max(rec["anon_peak"], rec["anon_exit"])
                rec["t"] = time.perf_counter() - rec["t"]
                self.active.remove(rec)
                self.done.append(rec)
            if frames:
                for i, f in enumerate(res if isinstance(res, tuple) else (res,)):
                    if hasattr(f, "memory_usage") and hasattr(f, "columns"):
                        cols = f.memory_usage(deep=True, index=False)
                        rec.setdefault("frames", []).append(
                            {
                                "part": i,
                                "rows": len(f),
                                "mib": round(float(cols.sum()) / MIB, 1),
                                "columns": {c: round(float(v) / MIB, 1) for c, v in cols.sort_values().items()},
                            }
                        )
            return res

        setattr(module, name, wrapped)


# The full re-cluster's stages (export.py's names unless the module is given), wrapped by --breakdown.
FULL_STAGES = (
    ("_with_tokens", True),  # an older tree's read of every stored case's tokens at once
    ("stored_token_codes", False),
    ("release_unused_memory", False),
    ("full_clustering", False),
    ("spill_vectors", False),  # an older tree's map-then-spill (a stage a tree lacks is skipped)
    ("embed_to_rows", False),
    ("map_of_rows", False),
    ("fit_vectors", False),
    ("recluster_members", False),
    ("token_codes", False),
    ("seeds_from_state", False),
    ("cluster_cases", False),
    ("assign_stable_ids", False),
    ("members_table", True),
    ("member_heads", False),
    ("members_with_fields", True),
    ("fit_models", False),
    ("fit_map", False),
    ("recluster_clustering", False),  # the cross-type rows and the block tally (`recluster_rows`)
    ("part_table", False),
    ("part_groups", False),  # the part's schema; its groups are made as append_groups writes them
)
# case_tokens: the lists token_codes replaced (so an older tree's breakdown shows them).
CLUSTER_STAGES = ("case_tokens", "token_codes", "fit_clusters", "describe_scope", "class_tfidf")


def child(store: Path, day: str, breakdown: bool) -> None:
    import pipeline.insights.cluster as cl
    import pipeline.insights.export as ex
    import pipeline.insights.membership as mb
    import pipeline.insights.report  # noqa: F401
    import pipeline.storage.store  # noqa: F401
    from pipeline.config import load_config
    from pipeline.embed.fake import HashingEmbedder

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "casemine.yaml")
    emb = HashingEmbedder()
    emb.encode_passages(["预热"])
    base = rss_mib()
    sampler = None
    if breakdown:
        sampler = Sampler()
        for name in ("load_cases", "ensure_classified", "select_cases", "members_view"):
            sampler.wrap(ex, name, frames=True)
        for name in (
            "_embed",
            "assign_cases",
            "recount_clusters",
            "finish_export",
            "write_export",
            "map_points",
            "count_table",
            "week_over_week",
            "root_cause_matrix",
            "compute_kpis",
            "case_teams",
            "trajectory_table",
            "relations",
            "worsened_by_team",
            "render_report",
            "save_state",
        ):
            sampler.wrap(ex, name)
        sampler.wrap(mb, "load_members", frames=True)
        sampler.wrap(mb, "append_members")
        sampler.wrap(mb, "append_part")  # a re-cluster's part built in Arrow (`part_table`)
        sampler.wrap(mb, "append_groups")  # ... or made a row group at a time as it is written
        for name, frames in FULL_STAGES:
            sampler.wrap(ex, name, frames=frames)
        for name in CLUSTER_STAGES:
            sampler.wrap(cl, name)
        sampler.start()
    got = measured_export(cfg, store, day, emb)
    if sampler is not None:
        sampler.stop()
    got.update(after_imports_mib=round(base, 1), peak_mib=round(peak_mib(), 1))
    print(json.dumps({**got, "stages": sampler.done if sampler else []}, ensure_ascii=False))


def measured_export(cfg: Any, store: Path, day: str, embedder: Any) -> dict[str, Any]:
    """`export_all` on `store`: its mode, cases, wall and CPU seconds and the largest anonymous
    RSS sampled while it ran."""
    from pipeline.insights.export import export_all

    anon = AnonPeak()
    t, cpu = time.perf_counter(), time.process_time()
    s = export_all(cfg, store, embedder=embedder, today=date.fromisoformat(day))
    secs, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {
        "mode": s["mode"],
        "n_cases": s["n_cases"],
        "peak_anon_mib": round(anon.stop(), 1),
        "seconds": round(secs, 2),
        "cpu_seconds": round(cpu, 2),
    }


def after_run_child(store: Path, day: str) -> None:
    """The export step of a run over the bundled sample, pointed at `store` (see --after-run).

    Why a real run and not a model loaded by hand: what the chunk steps leave resident (torch's
    runtime, jieba's dictionary, the classifiers, the heap they fragmented) is what the export
    grows on top of in a back-fill, and only the runner itself leaves exactly that."""
    from pipeline.config import load_config
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.orchestrate import nightly
    from pipeline.orchestrate.steps import Components

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "casemine.yaml")
    got: dict[str, Any] = {}

    def call(step: Any, night: Any) -> Any:
        if step.name == "export":
            got["after_imports_mib"] = rss_mib()  # what the chunk steps left, the model let go
            got.update(measured_export(cfg, store, day, HashingEmbedder()))
            return {"mode": got["mode"]}
        if step.name == "library":  # the sample's library is not what is measured
            return {}
        return step.run(night)

    with tempfile.TemporaryDirectory(prefix="bench-after-run-") as tmp:
        log = Path(tmp) / "mem.jsonl"
        os.environ["CASEMINE_MEMLOG"] = str(log)
        ctx = nightly.start_run(cfg, repo / "data" / "sample", Path(tmp) / "out")
        try:
            with Components.from_config(cfg) as comp:
                nightly.run_declared(
                    ctx, call, lambda step, chunk, parts: (step.run(chunk, comp, p, n) for n, p in enumerate(parts))
                )
        finally:
            ctx.close()
        steps = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    chunk_steps = {s.name for s in nightly.CHUNK_STEPS}
    got["chunk_steps_peak_mib"] = max(r["peak_mib"] for r in steps if r["step"] in chunk_steps)
    got["peak_mib"] = next(r["peak_mib"] for r in steps if r["step"] == "export")
    print(json.dumps(got, ensure_ascii=False))


def work_copy(store: Path, work: Path, mode: str) -> None:
    """A fresh copy of a prepared store for one child; for --mode full without its cluster state
    (a back-fill's export: nothing to assign to, every stored case re-clustered)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(store, work)
    if mode == "full":
        shutil.rmtree(work / "state" / "clusters")


def run_child(store: Path, day: str, breakdown: bool, after_run: bool = False) -> dict[str, Any]:
    """The child's own report (its peak is its own VmHWM, see `peak_mib`)."""
    args = [sys.executable, "-m", "bench.bench_export_memory", "--child", str(store), "--day", day]
    if breakdown:
        args.append("--breakdown")
    if after_run:
        args.append("--after-run")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


# -- the parent: stores of several sizes -----------------------------------------------------------


def prepare(root: Path, n: int, n_new: int, pool, stored_tokens: bool = False) -> Path:
    """`root/store-<n>`: n history cases, a full export on DAY, n_new cases of DAY+1 (reused if
    there). With `stored_tokens` (`root/store-tok-<n>`) every case carries its problem's jieba
    tokens, as the nightly segment step stores them; otherwise none (a re-cluster cuts them)."""
    from bench.bench_export import replicate, store
    from pipeline.config import load_config
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.insights.export import export_all

    d = root / (f"store-tok-{n}" if stored_tokens else f"store-{n}")
    if (d / ".ready").is_file():
        return d
    shutil.rmtree(d, ignore_errors=True)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "casemine.yaml")

    def cases(*args: Any, **kw: Any):
        rows = replicate(*args, **kw)
        if stored_tokens:
            from pipeline.text.segment import Segmenter

            cut, seen = Segmenter(cfg).cut, {}
            for p in rows["problem"]:  # the replicated problems repeat: each cut once
                if p not in seen:
                    seen[p] = cut(p)
            rows["tokens"] = [seen[p] for p in rows["problem"]]
        return rows

    hist_days = [(DAY - timedelta(days=k)).isoformat() for k in range(56)]
    run_h = "20251130T000000-hist"
    store(d, cases(pool, n, 0, run_h, hist_days, seed=1, variants=3), run_h)
    t = time.perf_counter()
    s = export_all(cfg, d, embedder=HashingEmbedder(), today=DAY)
    print(f"  store {n:,}: full export {time.perf_counter() - t:.1f} s, {s['n_clusters']} clusters", flush=True)
    run_n = "20251201T000000-new"
    store(d, cases(pool, n_new, 10_000_000, run_n, [(DAY + timedelta(days=1)).isoformat()], seed=100), run_n)
    (d / ".ready").write_text("ok\n")
    return d


def load_pool(root: Path, n: int):
    import pandas as pd

    from bench.bench_export import mined_pool

    p = root / f"pool-{n}.pkl"
    if p.is_file():
        return pd.read_pickle(p)
    with tempfile.TemporaryDirectory() as tmp:
        pool = mined_pool(Path(tmp), n)
    pool.to_pickle(p)
    return pool


def _mib_per_k(r: dict[str, Any], n: int) -> float:
    return (r["peak_mib"] - r["after_imports_mib"]) / (n / 1000)


def print_breakdown(r: dict[str, Any]) -> None:
    print(
        f"    {'stage':<22} {'s':>6} {'enter':>7} {'peak':>7} {'exit':>7} {'VmHWM':>7}"
        f" {'anon in':>8} {'peak':>6} {'out':>6}   (MiB)"
    )
    for rec in sorted(r["stages"], key=lambda x: x["seq"]):
        pad = "  " * rec["depth"]
        print(
            f"    {pad + rec['stage']:<22} {rec['t']:>6.2f} {rec['enter']:>7.0f} {rec['peak']:>7.0f} "
            f"{rec['exit']:>7.0f} {rec['hwm']:>7.0f} {rec.get('anon', 0):>8.0f} {rec.get('anon_peak', 0):>6.0f}"
            f" {rec.get('anon_exit', 0):>6.0f}"
        )
        for f in rec.get("frames", []):
            big = sorted(f["columns"].items(), key=lambda kv: -kv[1])[:8]
            print(
                f"    {pad}  frame {f['part']}: {f['rows']:,} rows {f['mib']:.0f} MiB; "
                + ", ".join(f"{c} {v:.1f}" for c, v in big)
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,30000,60000")
    ap.add_argument("--new", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="children per size (the median is reported)")
    ap.add_argument("--pool", type=int, default=600)
    ap.add_argument("--keep", type=Path, default=None, help="keep (and reuse) stores and exports here")
    ap.add_argument("--label", default="run", help="name of this code version in --keep")
    ap.add_argument("--breakdown", action="store_true", help="also a sampled child per size, by stage")
    ap.add_argument("--mode", choices=("incremental", "full"), default="incremental", help="which export to measure")
    ap.add_argument(
        "--stored-tokens", action="store_true", help="stores whose cases carry jieba tokens (store-tok-<n>)"
    )
    ap.add_argument("--after-run", action="store_true", help="the export as the last step of a run over data/sample")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--day", default=(DAY + timedelta(days=1)).isoformat(), help=argparse.SUPPRESS)
    ap.add_argument("--compare", nargs=2, type=Path, default=None, help="compare two kept exports folders")
    a = ap.parse_args()
    if a.child is not None:
        if a.after_run:
            after_run_child(a.child, a.day)
        else:
            child(a.child, a.day, a.breakdown)
        return
    if a.compare is not None:
        sys.exit(compare(*a.compare))
    root = a.keep or Path(tempfile.mkdtemp(prefix="bench-export-mem-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        pool = load_pool(root, a.pool)
        print(f"pool: {len(pool):,} mined cases; --new {a.new:,} cases on the day after", flush=True)
        rows = []
        for n in (int(x) for x in a.sizes.split(",")):
            store = prepare(root, n, a.new, pool, a.stored_tokens)
            work = root / f"{a.label}-{'tok-' if a.stored_tokens else ''}{n}"
            runs = []
            for _ in range(a.repeat):
                work_copy(store, work, a.mode)
                r = run_child(work, a.day, False, a.after_run)
                assert r["mode"] == a.mode, r
                runs.append(r)
                print(
                    f"  {n:>7,} stored: {'export step starts at' if a.after_run else 'after imports'} "
                    f"{r['after_imports_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB "
                    f"({r.get('peak_anon_mib', 0):.0f} anonymous), "
                    f"{_mib_per_k(r, n):.1f} MiB per 1,000 stored cases, {r['seconds']:.2f} s "
                    f"({r.get('cpu_seconds', 0):.2f} s CPU)"
                    + (f"; the run's chunk steps peaked at {r['chunk_steps_peak_mib']:.0f} MiB" if a.after_run else ""),
                    flush=True,
                )
            # The median run by peak, with the median time: allocator reuse makes the peak vary
            # by tens of MiB from run to run.
            r = dict(sorted(runs, key=lambda x: x["peak_mib"])[len(runs) // 2])
            r["seconds"] = sorted(x["seconds"] for x in runs)[len(runs) // 2]
            r["range"] = (min(x["peak_mib"] for x in runs), max(x["peak_mib"] for x in runs))
            rows.append((n, r))
            if a.breakdown:
                work_copy(store, work, a.mode)
                print_breakdown(run_child(work, a.day, True))
            if a.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        where = "as a run's last step" if a.after_run else "alone"
        print(f"\n({a.mode} export {where}, median of {a.repeat} runs per size)")
        start = "starts at" if a.after_run else "imports MiB"
        print(
            f"{'stored':>8} {start:>12} {'peak MiB':>9} {'range':>11} {'anon MiB':>9} {'MiB/1k':>7} "
            f"{'seconds':>8}" + (f" {'chunk steps MiB':>16}" if a.after_run else "")
        )
        for n, r in rows:
            lo, hi = r["range"]
            print(
                f"{n:>8,} {r['after_imports_mib']:>12.0f} {r['peak_mib']:>9.0f} {f'{lo:.0f}-{hi:.0f}':>11} "
                f"{r.get('peak_anon_mib', 0):>9.0f} {_mib_per_k(r, n):>7.1f} {r['seconds']:>8.2f}"
                + (f" {r['chunk_steps_peak_mib']:>16.0f}" if a.after_run else "")
            )
        if len(rows) > 1:
            (n0, r0), (n1, r1) = rows[0], rows[-1]
            slope = (r1["peak_mib"] - r0["peak_mib"]) / ((n1 - n0) / 1000)
            print(f"peak growth {n0:,} -> {n1:,}: {slope:.1f} MiB per 1,000 stored cases")
    finally:
        if a.keep is None:
            shutil.rmtree(root, ignore_errors=True)


# -- comparing two exports --------------------------------------------------------------------------

_PLOTLY_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def compare(a: Path, b: Path) -> int:
    """0 when every exported file of the two stores' latest exports and every file of their
    cluster state and membership (`state/clusters/`) is the same (the report's plotly div ids
    aside), else 1; prints what differs."""
    from pipeline.insights.export import latest_export
    from pipeline.insights.membership import state_dir

    da, db = latest_export(a), latest_export(b)
    if da is None or db is None:
        print("no export in", a if da is None else b)
        return 1
    # Every file under both roots, by its path below them (the members table is a folder of parts).
    pairs: dict[str, tuple[Path, Path]] = {}
    for tag, ra, rb in (("", da, db), ("state/", state_dir(a), state_dir(b))):
        for root, other, first in ((ra, rb, True), (rb, ra, False)):
            for p in root.rglob("*") if root.is_dir() else []:
                if p.is_file():
                    rel = p.relative_to(root)
                    pairs[f"{tag}{rel}"] = (p, other / rel) if first else (other / rel, p)
    names = sorted(pairs)
    bad = 0
    for name in names:
        pa_, pb_ = pairs[name]
        if not (pa_.is_file() and pb_.is_file()):
            print(f"{name}: only in one")
            bad += 1
            continue
        x, y = pa_.read_bytes(), pb_.read_bytes()
        if name.endswith("report.html"):
            x, y = _PLOTLY_ID.sub("ID", x.decode()).encode(), _PLOTLY_ID.sub("ID", y.decode()).encode()
        if x != y:
            print(f"{name}: differs ({len(x)} vs {len(y)} bytes)")
            bad += 1
    print(f"{len(names) - bad} of {len(names)} files identical")
    return 1 if bad else 0


if __name__ == "__main__":
    main()
