"""End-to-end nightly run on generated transcripts: throughput, where the time goes, peak memory,
how cost grows with size, and what an incremental night costs.

Each run is a fresh process (`casemine run`), so peak RSS and model loading are counted as a real
nightly job would see them. The 'prefect' row runs the same input through the Prefect flow to show
the orchestration overhead measured against the plain run in the same session.

    python -m bench.bench_flow [--sizes 10000,100000] [--increment 1000] [--prefect-size 1000]
                               [--memory-sizes 2000,8000 --chunk-mb 1] [--memory-only] [--no-one-chunk]

Peak memory per step, flat in the number of transcripts (issue 15): the same chunk size, more
chunks; each step's peak is the kernel's high-water mark reset when the step starts
(`CASEMINE_MEMLOG`, `pipeline.orchestrate.memtrace`):

    python -m bench.bench_flow --memory-only --memory-sizes 500,1000,2000 --chunk-mb 0.25 --no-one-chunk
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.sample.generate import generate

# The run's steps as `pipeline.orchestrate.nightly.NIGHTLY` and `pipeline.orchestrate.steps.BATCH_STEPS` name them.
STAGES = ["ingest", "normalize", "mask", "cases", "segment", "table", "emotion", "classify", "store",
          "index", "commit", "export", "library"]


def run(
    input_dir: Path, out: Path, prefect: bool = False, chunk_mb: float | None = None, memlog: Path | None = None
) -> tuple[dict, float, float]:
    """(summary, wall seconds, peak RSS MiB of this child alone). With `memlog`, the run appends
    each step's peak RSS there (`pipeline.orchestrate.memtrace`)."""
    t = time.perf_counter()
    args = [sys.executable, "-m", "pipeline.cli.__main__", "run", "--input", str(input_dir), "--out", str(out), "--json"]
    if not prefect:
        args.append("--no-prefect")
    if chunk_mb:
        args += ["--chunk-mb", str(chunk_mb)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    if memlog is not None:
        env["CASEMINE_MEMLOG"] = str(memlog)
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        proc = subprocess.Popen(args, stdout=so, stderr=se, env=env)
        # wait4, not getrusage(RUSAGE_CHILDREN): the latter is the maximum over every child so
        # far, which hides whether a later, bigger run needed more memory.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        so.seek(0)
        se.seek(0)
        out_text, err_text = so.read().decode(), se.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{err_text[-2000:]}")
    return json.loads(out_text), wall, usage.ru_maxrss / 1024


def input_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


# Rows of the per-step memory table: what ran before the first step (imports, models), the
# chunk steps (max over chunks), the run's final steps.
MEM_STEPS = ["start", "ingest", "process", "index", "commit", "export", "library", "summary"]


def step_peaks(memlog: Path) -> dict[str, float]:
    """Peak RSS MiB per step over the whole run (chunk steps: the largest chunk); `total`, the
    run's peak (every logged peak, the runner's work between steps included: resetting the
    high-water mark per step also resets what wait4 reports); `rss_after_chunk_1` and
    `rss_after_chunks`, the RSS left after the first and the last chunk's commit (what chunks keep: the first chunk loads the
    models, later ones should add nothing; run-to-run noise of a few hundred MiB in the models'
    loading makes this within-run difference the sharper test of flatness)."""
    peaks: dict[str, float] = {}
    commits: list[dict] = []
    for line in memlog.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        peaks[r["step"]] = max(peaks.get(r["step"], 0.0), r["peak_mib"])
        peaks["total"] = max(peaks.get("total", 0.0), r["peak_mib"])
        if r["step"] == "commit":
            commits.append(r)
    # What the commits leave, and of it the run's own memory and the pages of files it maps.
    for key, name in (("rss_mib", "rss"), ("anon_mib", "anon"), ("file_mib", "file")):
        if commits and key in commits[0] and key in commits[-1]:
            peaks[f"{name}_after_chunk_1"], peaks[f"{name}_after_chunks"] = commits[0][key], commits[-1][key]
    return peaks


def memory_flatness(tmp: Path, sizes: list[int], chunk_mb: float, one_chunk: bool = True) -> None:
    """Peak RSS of whole runs of growing size, chunked (`--chunk-mb`), per step (the kernel's
    high-water mark reset at each step start) and in total; and, as the baseline measured in the
    same session, the same input read as one chunk (its peak from wait4: no per-step log)."""
    print(f"\n== peak memory against input size (chunks of {chunk_mb:g} MB{' vs one chunk' if one_chunk else ''})")
    print(f"  {'transcripts':>11} {'input MB':>9} {'chunks':>6} {'chunked MiB':>12} {'one-chunk MiB':>14} "
          f"{'chunked s':>10} {'one-chunk s':>12}")
    rows = []
    for n in sizes:
        inp = tmp / f"mem{n}"
        generate(inp, n=n, seed=n + 1, malformed=False)
        log = tmp / f"mem-log{n}.jsonl"
        s, wall, _ = run(inp, tmp / f"mem-out{n}", chunk_mb=chunk_mb, memlog=log)
        peaks = step_peaks(log)
        wall1 = peak1 = float("nan")
        if one_chunk:
            _, wall1, peak1 = run(inp, tmp / f"mem-one{n}", chunk_mb=1e6)
        rows.append((n, peak1, peaks))
        print(f"  {n:>11,} {input_mb(inp):>9.1f} {len(s['chunks']):>6} {peaks['total']:>12,.0f} {peak1:>14,.0f} "
              f"{wall:>10.1f} {wall1:>12.1f}", flush=True)
    print(f"\n  peak RSS MiB per step of the chunked runs (chunk steps: the largest chunk; 'start': imports "
          f"before the first step), growth {sizes[0]:,} -> {sizes[-1]:,}:")
    print(f"  {'step':<19}" + "".join(f"{n:>10,}" for n in sizes) + f"{'growth':>9}")
    after = [f"{k}_after_chunk{s}" for k in ("rss", "anon", "file") for s in ("_1", "s")]
    for step in [*MEM_STEPS, "total", *after]:
        vals = [r[2].get(step) for r in rows]
        if all(v is None for v in vals):
            continue
        cells = "".join(f"{v:>10,.0f}" if v is not None else f"{'-':>10}" for v in vals)
        growth = f"{vals[-1] / vals[0]:>8.2f}x" if vals[0] and vals[-1] else ""
        print(f"  {step:<19}{cells}{growth}")
    if len(rows) > 1 and one_chunk:
        (a, pa1, _), (b, pb1, _) = rows[0], rows[-1]
        print(f"  one chunk {a:,} -> {b:,} transcripts: {pb1 / pa1:.2f}x peak memory")


def stage_table(label: str, s: dict, wall: float, peak: float) -> None:
    secs = s["seconds"]
    n = s["records"]["accepted"]
    total = secs["total"]
    idx = s.get("index", {})
    print(f"\n{label}: {n:,} transcripts, {s['cases']['written']:,} cases, wall {wall:.1f} s "
          f"(process start to exit), {n / wall:.1f} transcripts/s, peak RSS {peak:,.0f} MiB; "
          f"embedded {idx.get('embedded_new', 0):,} texts, {idx.get('embedded_cached', 0):,} from the cache "
          f"(identical problem texts are embedded once)")
    embed = secs.get("index", 0.0)
    for k in STAGES:
        if k in secs:
            print(f"  {k:<14} {secs[k]:>9.2f} s  {100 * secs[k] / total:>5.1f}%  "
                  f"{'' if k == 'index' or not embed else f'{secs[k] / embed:.3f}x embed'}")
    rest = sum(v for k, v in secs.items() if k not in ("total", "index"))
    print(f"  {'all but embed':<14} {rest:>9.2f} s  = {rest / embed:.2f}x the embedding step" if embed else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="10000")
    ap.add_argument("--increment", type=int, default=1000, help="new transcripts for the incremental night")
    ap.add_argument("--prefect-size", type=int, default=1000)
    ap.add_argument("--memory-sizes", default="", help="run sizes for the peak-memory check, e.g. 2000,8000")
    ap.add_argument("--chunk-mb", type=float, default=1.0, help="chunk size of the peak-memory check")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory check (no throughput runs)")
    ap.add_argument("--no-one-chunk", action="store_true", help="peak-memory check without the one-chunk baseline")
    ap.add_argument(
        "--keep",
        default="",
        help="keep the peak-memory runs' inputs, outputs and memory logs in this folder (to probe a run's "
        "stores afterwards: an hour's run at 120k is not made twice)",
    )
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mem_root = Path(a.keep) if a.keep else tmp
        if a.keep and mem_root.exists() and any(mem_root.iterdir()):
            # A run into an existing output would be a night on top of it, not the measured back-fill.
            raise SystemExit(f"--keep {mem_root}: the folder is not empty; name a new one")
        mem_root.mkdir(parents=True, exist_ok=True)
        if a.memory_only:
            memory_flatness(mem_root, [int(x) for x in a.memory_sizes.split(",")], a.chunk_mb, not a.no_one_chunk)
            return
        results = {}
        for n in sizes:
            inp = tmp / f"in{n}"
            generate(inp, n=n, seed=n, malformed=False)
            s, wall, peak = run(inp, tmp / f"out{n}")
            results[n] = (s, wall)
            stage_table(f"full run, n={n}", s, wall, peak)
        if len(sizes) > 1:
            a_, b_ = sizes[0], sizes[-1]
            print(f"\ncost growth {a_:,} -> {b_:,} ({b_ / a_:.0f}x data):")
            sa, sb = results[a_][0]["seconds"], results[b_][0]["seconds"]
            for k in STAGES + ["total"]:
                if sa.get(k) and sb.get(k):
                    print(f"  {k:<14} {sb[k] / sa[k]:>6.1f}x")
        # Incremental night: the largest history plus `increment` new conversations in a new file.
        n = sizes[0]
        extra = tmp / f"extra{n}"
        generate(extra, n=a.increment, seed=999_999, malformed=False, formats=("chat_jsonl",))
        inc = tmp / f"in{n}" / "night2"
        inc.mkdir()
        # The generator numbers conversations from 1 in every run: give the new night its own ids.
        lines = [json.loads(x) for x in (extra / "chat.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        for rec in lines:
            rec["conversation_id"] = "NIGHT2-" + rec["conversation_id"]
        (inc / "chat.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n", encoding="utf-8")
        s, wall, peak = run(tmp / f"in{n}", tmp / f"out{n}")
        stage_table(f"incremental night on the n={n} history (+{len(lines)} new conversations)", s, wall, peak)
        # Prefect overhead on the same small input, plain vs flow, both fresh outputs.
        inp = tmp / "pf"
        generate(inp, n=a.prefect_size, seed=5, malformed=False)
        _, plain, _ = run(inp, tmp / "pf-plain")
        sp, flow, _ = run(inp, tmp / "pf-flow", prefect=True)
        print(f"\nPrefect overhead, n={a.prefect_size}: plain {plain:.1f} s, flow {flow:.1f} s, "
              f"+{flow - plain:.1f} s per run ({flow / plain:.2f}x), {len(STAGES)} stages in 6 task kinds "
              f"(one process-batch task per {2000} conversations)")
        if a.memory_sizes:
            memory_flatness(mem_root, [int(x) for x in a.memory_sizes.split(",")], a.chunk_mb, not a.no_one_chunk)


if __name__ == "__main__":
    main()
