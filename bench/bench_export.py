"""The nightly export on a stored history: incremental (new cases assigned to the stored clusters)
against a full re-cluster of everything (the former nightly path, measured in the same run), and
both against the embedding-only time of the same new cases.

Cases: a pool of real-shaped cases mined from generated transcripts by the nightly steps
(`casemine run`), replicated into a history of --history cases over eight weeks and nights of
+N new cases dated the day after. Each new case's problem gets two of forty customer phrases
appended, so every new text is distinct and costs a real embedding (an identical text would come
from the cache); history replicas get one of --history-variants suffixes, so preparing the
history embeds pool x variants texts, not --history (history texts repeat, as real problems do;
clustering time does not depend on it). The configured embedder is used throughout, with its
on-disk cache: the history is embedded before timing (as the nightly index step leaves it), the
new cases once by the embedding-only measurement, so both export paths then read every vector
from the cache and their times are the export's own work. A night's cost is that plus the
embedding: incremental + embed vs full + embed.

    python -m bench.bench_export [--history 10000] [--increments 1000,10000] [--pool 600] [--keep DIR]

--keep DIR keeps, under DIR, the history store after its first export (`base`) and each night's
store before its exports (`night<N>`, the new cases stored and embedded), and reuses them on the
next call: two versions of the code then export the very same nights, and a night can be copied
and exported again for profiling or comparing outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

# Sklearn's small fits on one OpenMP thread, as the product's k search runs them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402

from pipeline.config import load_config  # noqa: E402

PHRASES = [
    "麻烦尽快处理", "等了好久了", "已经联系过两次", "能不能加急", "页面显示异常", "客服一直没回复",
    "订单号我发你了", "昨天就该到了", "要给老人用的", "买来送人的", "着急用", "第一次在这买",
    "朋友推荐来的", "上次也是这样", "说好的今天", "换了地址", "没有短信通知", "电话打不通",
    "App里看不到", "能退运费吗", "想换个颜色", "包装破了", "少了个配件", "说明书看不懂",
    "价格比别家贵", "活动时候买的", "用券下的单", "发票要公司的", "周末在家", "工作日不在家",
    "放快递柜了吗", "驿站说没有", "显示已签收", "不是本人签的", "商家不理人", "评价写不了",
    "想取消订单", "要补差价吗", "保修怎么算", "给个说法",
]
DAY = date(2025, 11, 30)


def mined_pool(tmp: Path, n: int) -> pd.DataFrame:
    """Cases mined from `n` generated transcripts by the nightly steps (no export timing here)."""
    import subprocess

    from pipeline.sample.generate import generate
    from pipeline.storage.store import read_cases

    generate(tmp / "pool-in", n=n, seed=11, malformed=False)
    args = [sys.executable, "-m", "pipeline.cli.__main__", "run", "--input", str(tmp / "pool-in"),
            "--out", str(tmp / "pool-out"), "--no-prefect", "--json"]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pool run failed:\n{proc.stderr[-2000:]}")
    df = read_cases(tmp / "pool-out")
    return df[df["problem"].fillna("").str.len() >= 4].reset_index(drop=True)


def replicate(
    pool: pd.DataFrame, n: int, start: int, run_id: str, days: list[str], seed: int, variants: int = 0
) -> pd.DataFrame:
    """`n` cases drawn from the pool with fresh ids and dates from `days`; texts distinct
    (variants=0) or each pool problem with one of `variants` suffixes."""
    rng = random.Random(seed)
    rows = pool.sample(n=n, replace=True, random_state=seed).reset_index(drop=True).copy()
    rows["case_id"] = [f"B{start + i:08d}" for i in range(n)]
    rows["conversation_id"] = [f"BC{start + i:08d}" for i in range(n)]
    if variants:
        rows["problem"] = [f"{p}，{PHRASES[rng.randrange(variants)]}" for p in rows["problem"]]
    else:
        rows["problem"] = [f"{p}，{'，'.join(rng.sample(PHRASES, 2))}" for p in rows["problem"]]
    rows["tokens"] = None  # re-cut from the new text by a re-cluster
    rows["date"] = [days[i % len(days)] for i in range(n)]
    rows["run_id"] = run_id
    return rows


def store(out: Path, df: pd.DataFrame, run_id: str) -> None:
    from pipeline.storage.store import write_cases

    write_cases(out, df, run_id, 0)


def export(cfg, out: Path, embedder, day: date, recluster: bool = False) -> tuple[float, dict]:
    from pipeline.insights.export import export_all

    t = time.perf_counter()
    s = export_all(cfg, out, embedder=embedder, today=day, recluster=recluster)
    return time.perf_counter() - t, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--history", type=int, default=10_000)
    ap.add_argument("--increments", default="1000,10000")
    ap.add_argument("--pool", type=int, default=600, help="generated transcripts mined for case shapes")
    ap.add_argument("--history-variants", type=int, default=3, help="suffixes per pool problem in the history")
    ap.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the prepared stores under this folder")
    a = ap.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "casemine.yaml")
    from pipeline.embed import Embedder

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        keep = a.keep.resolve() if a.keep else None
        info_path = keep / "bench.json" if keep else None
        info = json.loads(info_path.read_text()) if info_path and info_path.is_file() else {}
        nights = [int(x) for x in a.increments.split(",")]
        # A kept history is reused only when it was made with these options.
        wanted = {"history": a.history, "pool": a.pool, "history_variants": a.history_variants}
        reuse = keep is not None and info.get("options") == wanted and (keep / "base").is_dir()
        if not reuse:
            info = {"options": wanted, "nights": {}}
            if keep is not None:
                shutil.rmtree(keep, ignore_errors=True)
                keep.mkdir(parents=True)
            pool = mined_pool(tmp, a.pool)
            hist_days = [(DAY - timedelta(days=d)).isoformat() for d in range(56)]
            base = (keep or tmp) / "base"
            history = replicate(
                pool, a.history, 0, "20251130T000000-hist", hist_days, seed=1, variants=a.history_variants
            )
            store(base, history, "20251130T000000-hist")
            emb = Embedder(cfg, out_root=base)
            t = time.perf_counter()
            emb.encode_passages(history["problem"].tolist())
            t_hist = time.perf_counter() - t
            secs, s0 = export(cfg, base, emb, DAY)
            info.update(
                pool_rows=len(pool), n_texts=int(history["problem"].nunique()), t_hist=t_hist, t_first=secs,
                n_clusters=s0["n_clusters"],
            )
        else:
            base = keep / "base"
            pool = None
        print(f"history: {a.history:,} cases ({info['n_texts']:,} distinct texts) from a pool of "
              f"{info['pool_rows']:,} mined cases; embedding it once {info['t_hist']:.1f} s (untimed below); "
              f"first export (full) {info['t_first']:.1f} s, {info['n_clusters']} clusters"
              + (f" [reused from {keep}]" if reuse else ""))
        print(f"\n{'new cases':>10} {'embed only':>11} {'incremental':>12} {'full':>8} {'incr+embed':>11} "
              f"{'full+embed':>11} {'(incr+embed)/embed':>19} {'full/incr':>10} {'drift':>6}")
        for k, n in enumerate(nights):
            kept = keep / f"night{n}" if keep else None
            out = tmp / f"night{n}"
            if kept is not None and kept.is_dir() and str(n) in info["nights"]:
                shutil.copytree(kept, out)  # copy2: times kept, so the case copy stays valid
                e = Embedder(cfg, out_root=out)
                e.encode_passages(["预热"])
                t_embed = info["nights"][str(n)]  # the new cases are in the kept embedding cache
            else:
                if pool is None:
                    pool = mined_pool(tmp, a.pool)
                shutil.copytree(base, out)
                run_id = f"20251201T0{k}0000-new"
                new = replicate(
                    pool, n, 10_000_000 * (k + 1), run_id, [(DAY + timedelta(days=1)).isoformat()], seed=100 + k
                )
                store(out, new, run_id)
                e = Embedder(cfg, out_root=out)
                e.encode_passages(["预热"])  # model load is not the new cases' cost
                t = time.perf_counter()
                e.encode_passages(new["problem"].tolist())
                t_embed = time.perf_counter() - t
                if kept is not None:
                    shutil.copytree(out, kept)
                    info["nights"][str(n)] = t_embed
            if info_path is not None:
                info_path.write_text(json.dumps(info, indent=2) + "\n")
            t_inc, si = export(cfg, out, e, DAY + timedelta(days=1))
            assert si["mode"] == "incremental", si["mode_reason"]
            t_full, sf = export(cfg, out, e, DAY + timedelta(days=1), recluster=True)
            print(f"{n:>10,} {t_embed:>10.1f}s {t_inc:>11.1f}s {t_full:>7.1f}s {t_inc + t_embed:>10.1f}s "
                  f"{t_full + t_embed:>10.1f}s {(t_inc + t_embed) / t_embed:>18.2f}x {t_full / t_inc:>9.1f}x "
                  f"{si['drift']:>6.3f}")
            print(f"{'':>10} incremental seconds {si['seconds']}; full {sf['seconds']}")
    print(f"\nbench wall {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
