"""Benchmark: one night's index update (+1,000 and +10,000 cases) on a history of N cases, the old
layout (format 1: load everything, add, rewrite every file incl. a bm25s index from all tokens,
hash all) against the segmented one (format 2: read ids, write the new segment, link the rest),
both measured in this run on the same data, split into load / add / write. Also: opening the
version in a query process (`StoredIndex`, what a cold `casemine query` pays before searching).

No embedding: random unit vectors and generated tokens and texts (the embedding cost is the same
for both layouts and is measured by bench_embed_index / bench_flow).

Run: `python -m bench.bench_index_update [--history 100000] [--adds 1000,10000] [--kind flat|hnsw]`.
Figures are single runs on a shared 2-core machine: expect 10-20 % noise on the small ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_embed_index import _table

REPO = Path(__file__).resolve().parents[1]
DIM = 384


def _cases(start: int, n: int, rng: np.random.Generator):
    """Metadata rows shaped like the product's (`meta_from_cases` output) with Zipf-distributed
    tokens over a 30k-word vocabulary, plus unit vectors."""
    import pandas as pd

    from pipeline.retrieval.meta import META_COLUMNS

    words = np.array([f"词{i}" for i in range(30_000)])
    lens = rng.integers(6, 40, n)
    ids = np.minimum(rng.zipf(1.3, int(lens.sum())), 30_000) - 1
    toks, pos = [], 0
    for k in lens:
        toks.append(words[ids[pos : pos + k]].tolist())
        pos += k
    types = ["物流配送", "退换货/退款", "商品破损", "发票", "质量问题", "售后维修"]
    df = pd.DataFrame(
        {
            "case_id": [f"case-{start + i:08d}" for i in range(n)],
            "vid": np.zeros(n, dtype=np.int64),
            "conversation_id": [f"conv-{start + i:08d}" for i in range(n)],
            "problem": ["".join(t[:12]) for t in toks],
            "handling": ["已登记并转交相关部门处理，预计三个工作日内回复客户" for _ in range(n)],
            "outcome": ["resolved"] * n,
            "outcome_evidence": ["客服：已为您处理完毕，请留意短信通知" for _ in range(n)],
            "issue_type": [types[i % len(types)] for i in range(n)],
            "urgency": ["一般"] * n,
            "channel": ["chat" if i % 3 else "call" for i in range(n)],
            "date": [f"2025-09-{1 + i % 28:02d}" for i in range(n)],
            "product": ["手机"] * n,
            "region": ["华东"] * n,
            "emotion": ["neutral"] * n,
            "tokens": toks,
            "text_hash": [f"{start + i:032x}" for i in range(n)],
        }
    )[list(META_COLUMNS)]
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return df, x


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _old_update(root: Path, icfg, meta, vecs) -> dict:
    """Format 1, as every update worked before segments: load all, add, rewrite all, hash all."""
    from pipeline.retrieval.index import MANIFEST, CaseIndex

    t0 = time.perf_counter()
    idx = CaseIndex.read_dir(root / "v1", icfg)
    t1 = time.perf_counter()
    idx.update(meta, vecs)
    t2 = time.perf_counter()
    d = root / "v2"
    man = idx.write_dir_v1(d)
    (d / MANIFEST).write_text(json.dumps(man), "utf-8")
    t3 = time.perf_counter()
    return {"load": t1 - t0, "add": t2 - t1, "write": t3 - t2, "total": t3 - t0, "mb": _dir_bytes(d) / 2**20}


def _new_update(root: Path, icfg, meta, vecs) -> dict:
    """Format 2: `IndexStore.append`, the nightly path (for a graph index with `icfg`'s
    `graph_pending_max`: 0 grows the graph every night, as before that setting)."""
    from pipeline.retrieval.index import IndexStore

    store = IndexStore(root, icfg)
    t0 = time.perf_counter()
    with store.writer():
        v, got = store.append(meta, vecs, model="bench", backend="torch", dim=DIM)
    total = time.perf_counter() - t0
    t = got["timings"]
    d = root / f"v{v}"
    new_bytes = sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.stat().st_nlink == 1)
    return {
        "load": t["read"],
        "add": t["graph"],
        "write": total - t["read"] - t["graph"],
        "total": total,
        "mb": new_bytes / 2**20,
        "detail": t,
        "segments": got["segments"],
    }


def _open_query(root: Path, icfg) -> float:  # noqa: ARG001 - the default index settings
    """Seconds a fresh process takes to open the current version as the query path does (checksums
    verified, filter columns read), after its imports."""
    import subprocess

    code = (
        "import sys, time; from pathlib import Path; import faiss, pyarrow.parquet;"
        "from pipeline.config import Config; from pipeline.retrieval.search import StoredIndex;"
        f"t=time.perf_counter(); i=StoredIndex.load(Path({str(root)!r}), Config().index, None);"
        "i.allowed({'channel': ['call']}); print(time.perf_counter()-t)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return float(r.stdout.strip().splitlines()[-1])


def _query_latency(root: Path, queries: list[list[str]], qvecs: np.ndarray) -> dict:
    """Warm per-query milliseconds (p50, p95) of BM25 scoring and dense top-50, one thread."""
    import faiss

    from pipeline.config import Config
    from pipeline.retrieval.search import StoredIndex

    idx = StoredIndex.load(root, Config().index, None)
    idx.bm25_scores(queries[0])
    idx.search_vectors(qvecs[:1], 50)
    out = {}
    for name, fn in (("bm25", lambda i: idx.bm25_scores(queries[i])), ("dense", lambda i: idx.search_vectors(qvecs[i : i + 1], 50))):
        lat = []
        for i in range(len(queries)):
            t0 = time.perf_counter()
            fn(i)
            lat.append((time.perf_counter() - t0) * 1000)
        out[name] = (round(float(np.percentile(lat, 50)), 2), round(float(np.percentile(lat, 95)), 2))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return out


def bench(history: int, adds: list[int], kind: str) -> dict:
    import faiss

    from pipeline.config import Config
    from pipeline.retrieval.index import MANIFEST, CaseIndex, IndexStore

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    exact_max = history * 10 if kind == "flat" else 1
    icfg = Config().index.model_copy(update={"exact_max": exact_max, "keep_versions": 2})
    grow_cfg = icfg.model_copy(update={"graph_pending_max": 0})
    rng = np.random.default_rng(0)
    meta, vecs = _cases(0, history, rng)
    base = Path(tempfile.mkdtemp(prefix="bench-index-update-"))
    out: dict = {"history": history, "kind": kind, "adds": {}}
    try:
        t0 = time.perf_counter()
        idx = CaseIndex(DIM, "bench", icfg)
        idx.update(meta, vecs)
        build = time.perf_counter() - t0
        old_root, new_root = base / "old", base / "new"
        man = idx.write_dir_v1(old_root / "v1")
        (old_root / "v1" / MANIFEST).write_text(json.dumps({**man, "version": 1}), "utf-8")
        (old_root / "CURRENT").write_text("v1\n")
        store = IndexStore(new_root, icfg)
        with store.writer():
            store.commit(idx)
        del idx
        out["history_build_s"] = round(build, 1)
        # First open after the writer: format 1 hashes every file once (its writer records no
        # checksums as verified); later opens (each a new process) skip unchanged files.
        out["query_open_s"] = {
            name: [round(_open_query(r, icfg), 3) for _ in range(2)] for name, r in (("old", old_root), ("new", new_root))
        }
        rows = []
        for i, n in enumerate(adds):
            # New cases, a tenth of them replacing existing ones (edited or re-mined cases).
            add_meta, add_vecs = _cases(history + 10_000_000 * (i + 1), n, rng)
            k = n // 10
            add_meta.loc[: k - 1, "case_id"] = [f"case-{j:08d}" for j in rng.choice(history, k, replace=False)]
            runs = {}
            plans = [("old", _old_update, old_root, icfg), ("new", _new_update, new_root, icfg)]
            if kind != "flat":  # the same append with the graph taking the night's vectors in at once
                plans.append(("grow", _new_update, new_root, grow_cfg))
            for name, fn, src, cfg_i in plans:
                work = base / f"{name}-{n}"
                shutil.copytree(src, work)
                runs[name] = fn(work, cfg_i, add_meta, add_vecs)
                shutil.rmtree(work)
            o, w = runs["old"], runs["new"]
            out["adds"][n] = runs
            named = [("old layout (rewrite all)", o)]
            if "grow" in runs:
                named.append(("segmented, graph grown nightly", runs["grow"]))
            named.append(("segmented (append)" if kind == "flat" else "segmented, new vectors wait", w))
            for name, r in named:
                rows.append([f"+{n:,}", name, f"{r['load']:.2f}", f"{r['add']:.2f}", f"{r['write']:.2f}",
                             f"{r['total']:.2f}", f"{r['mb']:.0f}"])
            rows.append([f"+{n:,}", "speed-up", f"{o['load'] / max(w['load'], 1e-4):.0f}x", "",
                         f"{o['write'] / max(w['write'], 1e-4):.1f}x", f"{o['total'] / w['total']:.1f}x", ""])
            print(f"  done +{n:,}: segmented detail {w['detail']}", file=sys.stderr, flush=True)
        _table(
            f"index update on a {history:,}-case history ({kind}, dim {DIM}, random vectors, generated tokens; "
            "a tenth of the new cases replace old ones)",
            ["new cases", "layout", "load s", "add s", "write s", "total s", "MB written"],
            rows,
        )
        if len(adds) >= 2:
            a, b = adds[0], adds[-1]
            print(f"  growth +{a:,} -> +{b:,} ({b / a:.0f}x the cases): old "
                  f"{out['adds'][b]['old']['total'] / out['adds'][a]['old']['total']:.2f}x, segmented "
                  f"{out['adds'][b]['new']['total'] / out['adds'][a]['new']['total']:.2f}x the time")
        # Warm query cost over the format-1 version vs the segmented one after 10 more nights of
        # +1% each (11 segments, a tenth of each night replacing old cases): BM25 is now scored
        # from term statistics at query time and dense search runs per segment.
        # For a graph index the same ten nights also run with the graph grown every night, on a copy:
        # the nights' total time (a wait's cost includes the night the graph takes them in) and
        # the query cost of the rows still waiting.
        series = {"new": (new_root, icfg)}
        if kind != "flat":
            shutil.copytree(new_root, base / "grow")
            series["grow"] = (base / "grow", grow_cfg)
        nights: dict[str, list[float]] = {name: [] for name in series}
        for night in range(10):
            m, x = _cases(history + 1_000_000 * (night + 1), max(1, history // 100), rng)
            k = len(m) // 10
            m.loc[: k - 1, "case_id"] = [f"case-{j:08d}" for j in rng.choice(history, k, replace=False)]
            for name, (root_i, cfg_i) in series.items():
                store = IndexStore(root_i, cfg_i)
                t0 = time.perf_counter()
                with store.writer():
                    _, got = store.append(m, x, model="bench", backend="torch", dim=DIM)
                nights[name].append(time.perf_counter() - t0)
        qm, qx = _cases(0, 200, np.random.default_rng(1))
        queries = [t[:6] for t in qm["tokens"]]
        lat = {"old": _query_latency(old_root, queries, qx)}
        lat.update({name: _query_latency(root_i, queries, qx) for name, (root_i, _) in series.items()})
        out["query_ms"] = {**lat, "segments": got["segments"]}
        out["ten_nights_s"] = {name: [round(t, 3) for t in ts] for name, ts in nights.items()}
        if kind != "flat":
            waiting = json.loads((new_root / f"v{IndexStore(new_root, icfg).current_version()}" / MANIFEST).read_text())
            left = waiting["next_id"] - waiting["graph_upto"]
            for name, ts in nights.items():
                how = "graph grown nightly" if name == "grow" else "new vectors wait"
                print(f"  ten nights of +{max(1, history // 100):,} ({how}): "
                      f"total {sum(ts):.2f} s, median night {float(np.median(ts)):.2f} s, slowest {max(ts):.2f} s")
            print(f"  after them {left:,} vectors wait beside the graph (limit {icfg.graph_pending_max:,})")
        _table(
            f"warm query cost, {len(queries)} queries of 6 tokens, one thread (p50 / p95 ms): format 1 vs "
            f"segmented after 10 more nights ({got['segments']} segments)",
            ["layout", "BM25 scores", "dense top-50"],
            [[{"old": "format 1", "new": "segmented", "grow": "segmented, graph grown nightly"}[name],
              f"{r['bm25'][0]} / {r['bm25'][1]}", f"{r['dense'][0]} / {r['dense'][1]}"] for name, r in lat.items()],
        )
        q = out["query_open_s"]
        print(f"  a query process opening the {history:,}-case version (checksums, filter columns): first after the "
              f"write old {q['old'][0]:.3f} s / segmented {q['new'][0]:.3f} s; later old {q['old'][1]:.3f} s / "
              f"segmented {q['new'][1]:.3f} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=100_000)
    ap.add_argument("--adds", default="1000,10000")
    ap.add_argument("--kind", choices=("flat", "hnsw"), default="flat")
    a = ap.parse_args()
    res = bench(a.history, [int(x) for x in a.adds.split(",") if x], a.kind)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"index_update_{time.strftime('%Y%m%dT%H%M%S')}.json"
    f.write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
    print(f"\nsaved {f}")


if __name__ == "__main__":
    main()
