"""Benchmark: what an agent waits for per `casemine query` at 10k (quick) or 100k and 1M cases
(`--sizes 100000,1000000`, `make bench-scale`): cold (a fresh process, with and without a running
`casemine serve`) and warm (p50/p95 through the server), beside the baselines measured in the same
run: a bare interpreter start, the serve engine's own encode time, and exact search against the
HNSW index the product uses above `index.exact_max`, with HNSW's recall@10 against exact.

Why synthetic vectors: embedding real texts runs at 20-50 texts/s here, so a 1M index of real
embeddings is out of reach. The index is built by the product's own classes (`CaseIndex`,
`IndexStore`) from a few hundred real complaint texts (embedded, so queries find sensible hits)
plus structured synthetic unit vectors (a 48-d latent space in 384 dims, see
bench.bench_embed_index); the synthetic rows copy real problems and tokens so BM25 carries a
realistic load. Built indexes are kept under bench/results/query-index-<N>/ and reused.

Run: `python -m bench.bench_query [--sizes 10000] [--rounds 10] [--warm 200]`, or `--out DIR` to
bench an existing output root's index (a bench-built one, e.g. bench/results/query-index-1000000,
reports its build figures and recall too); `--no-encode` skips the encoders' own timings to
re-measure query latency only; `--ef-sweep --sizes 1000000` measures, on an index it built, HNSW's
recall@10 against exact search and its search time for several efSearch values. Timings on a shared
2-core machine vary; compare within one run.

`python -m bench.bench_query --calibrate DIR` instead reproduces how the "close match" cosine
(pipeline.retrieval.search.CLOSE_MATCH_COSINE) was chosen: DIR is an output root built from the real CSDS
dialogues (`casemine run --no-prefect --input ../shared/data/csds --out DIR`); each CSDS summary
is encoded as agents' questions are and compared with the indexed case of its own dialogue (true
pairs) and with random other cases (non-pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
QUESTIONS = ["客户说快递三天没到", "退款一直没到账怎么办", "发票抬头开错了能重开吗", "手机屏幕碎了要换新",
             "会员积分不能用", "贷款额度怎么提高"]
N_REAL = 300
N_RECALL = 200


def _real_texts() -> list[str]:
    p = SHARED / "complaints" / "dev.csv"
    if not p.is_file():
        print(f"({p} is absent: the real-text cases are the {len(QUESTIONS)} built-in questions)")
        return QUESTIONS
    import pandas as pd

    texts = list(dict.fromkeys(pd.read_csv(p)["text"].astype(str).tolist()))
    return texts[:N_REAL]


def build_index(out: Path, n: int, seed: int = 0) -> dict:
    """A stored index of `n` cases under `out/index` (real-text cases first, then synthetic), made
    with the product's CaseIndex/IndexStore; returns the build figures and HNSW's recall@10."""
    import pandas as pd

    from bench.bench_embed_index import _vectors
    from pipeline.config import load_config
    from pipeline.embed import Embedder, model_identity
    from pipeline.retrieval.index import CaseIndex, IndexStore, meta_from_cases
    from pipeline.retrieval.update import index_root
    from pipeline.text.segment import tokenize

    cfg = load_config()
    t0 = time.perf_counter()
    texts = _real_texts()
    real = pd.DataFrame({"case_id": [f"real-{i}" for i in range(len(texts))], "problem": texts})
    real["outcome"], real["date"], real["issue_type"] = "resolved", "2025-09-01", "其他"
    real_meta = meta_from_cases(real, cfg.embed.include_handling, lambda t: tokenize(cfg, t))
    real_vecs = Embedder(cfg, out_root=out).encode_passages(texts)
    t_embed = time.perf_counter() - t0
    m = n - len(texts)
    rng = np.random.default_rng(seed)
    syn_vecs = _vectors(m + N_RECALL, real_vecs.shape[1], rng, structured=True)
    held_out, syn_vecs = syn_vecs[:N_RECALL], syn_vecs[N_RECALL:]
    src = rng.integers(0, len(texts), m)
    syn_meta = pd.DataFrame({c: real_meta[c].to_numpy()[src] for c in real_meta.columns})
    syn_meta["case_id"] = [f"syn-{i}" for i in range(m)]
    syn_meta["problem"] = [f"{texts[j]}（合成{i}）" for i, j in enumerate(src)]
    meta = pd.concat([real_meta, syn_meta], ignore_index=True)
    vecs = np.vstack([real_vecs, syn_vecs])
    del syn_vecs
    t1 = time.perf_counter()
    idx = CaseIndex(vecs.shape[1], model_identity(cfg), cfg.index, backend=cfg.embed.backend)
    idx.update(meta, vecs)  # above index.exact_max this builds the HNSW graph, as a nightly run would
    t_struct = time.perf_counter() - t1
    store = IndexStore(index_root(out), cfg.index)
    with store.writer():
        store.commit(idx)
    t_commit = time.perf_counter() - t1 - t_struct
    del idx
    info = {"cases": n, "real_cases": len(texts), "embed_real_s": round(t_embed, 1),
            "structure_s": round(t_struct, 1), "commit_s": round(t_commit, 1)}
    info.update(_recall(cfg, out, vecs, held_out))
    (out / "bench_info.json").write_text(json.dumps(info, indent=1), "utf-8")
    return info


def _recall(cfg, out: Path, vecs: np.ndarray, queries: np.ndarray, k: int = 10) -> dict:
    """The stored index (the product's StoredIndex, its kind and efSearch) against exact search
    over the same vectors: recall@10 and per-query search times (one thread, one query a time)."""
    import faiss

    from pipeline.embed import model_identity
    from pipeline.retrieval.update import index_root
    from pipeline.retrieval.search import StoredIndex

    t0 = time.perf_counter()
    stored = StoredIndex.load(index_root(out), cfg.index, model_identity(cfg))
    load_s = time.perf_counter() - t0
    exact = faiss.IndexFlatIP(vecs.shape[1])
    exact.add(np.ascontiguousarray(vecs))
    faiss.omp_set_num_threads(1)
    ex_ms, st_ms, hits = [], [], []
    for q in queries:
        t = time.perf_counter()
        _, want = exact.search(q[None, :], k)
        ex_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        _, rows = stored.search_vectors(q[None, :], k)
        st_ms.append((time.perf_counter() - t) * 1000)
        hits.append(len(set(want[0].tolist()) & set(stored.vids[rows[0]].tolist())) / k)
    return {"index_kind": stored.kind, "ef_search": cfg.index.hnsw_ef_search, "stored_load_s": round(load_s, 2),
            f"recall@{k}_vs_exact": round(float(np.mean(hits)), 4),
            "exact_search_ms_p50": round(float(np.percentile(ex_ms, 50)), 2),
            "exact_search_ms_p95": round(float(np.percentile(ex_ms, 95)), 2),
            "index_search_ms_p50": round(float(np.percentile(st_ms, 50)), 2),
            "index_search_ms_p95": round(float(np.percentile(st_ms, 95)), 2)}


def ef_sweep(out: Path, n: int, efs: tuple[int, ...] = (64, 128, 192, 256), k: int = 10, seed: int = 0) -> dict:
    """HNSW's recall@10 against exact search and its search time per efSearch, on the index the
    bench built in `out` for `n` cases: what a lower default would trade. The held-out query
    vectors are drawn again from the build's seed (they come first in its first draw of 100k) and
    the exact answers are searched in the stored segments' vectors (the build's matrix is gone)."""
    import faiss

    from bench.bench_embed_index import _vectors
    from pipeline.config import load_config
    from pipeline.embed import model_identity
    from pipeline.retrieval.search import StoredIndex
    from pipeline.retrieval.update import index_root

    cfg = load_config()
    stored = StoredIndex.load(index_root(out), cfg.index, model_identity(cfg))
    if stored.kind != "hnsw":
        return {"index_kind": stored.kind}
    m = n - len(_real_texts())
    assert m + N_RECALL >= 100_000, "the held-out vectors are drawn again from a first draw of 100k"
    queries = _vectors(100_000, stored.dim, np.random.default_rng(seed), structured=True)[:N_RECALL]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    Ds, Vs = [], []
    for i, row_of in enumerate(stored._row_of):  # exact: every segment's vectors, batched
        D, I = stored._seg_index(i).search(queries, k)
        Ds.append(D)
        Vs.append(stored.vids[row_of[I]])
    order = np.argsort(-np.concatenate(Ds, axis=1), axis=1)[:, :k]
    want = np.take_along_axis(np.concatenate(Vs, axis=1), order, axis=1)
    faiss.omp_set_num_threads(1)
    res: dict = {"cases": len(stored), "queries": N_RECALL}
    warm = faiss.SearchParametersHNSW(efSearch=max(efs))
    for q in queries:  # untimed: the first pass faults the mapped graph in, whichever ef runs first
        stored.index.search(q[None, :], k, params=warm)
    for ef in efs:
        ms, hits = [], []
        params = faiss.SearchParametersHNSW(efSearch=ef)
        for q, w in zip(queries, want):
            t = time.perf_counter()
            _, got = stored.index.search(q[None, :], k, params=params)
            ms.append((time.perf_counter() - t) * 1000)
            hits.append(len(set(w.tolist()) & set(got[0].tolist())) / k)
        res[f"ef {ef}"] = {f"recall@{k}_vs_exact": round(float(np.mean(hits)), 4), **_pct(ms)}
    return res


def _run(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "80"})
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{args} failed: {p.stderr[-500:]}")
    return dt, p.stdout


def _casemine(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("casemine")
    return [str(exe), *args] if exe.is_file() else [sys.executable, "-m", "pipeline.cli", *args]


def _pct(ms: list[float]) -> dict:
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
            "max": round(float(max(ms)), 1), "n": len(ms)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode_times(questions: list[str]) -> dict:
    """The query engines' own encode time, one question at a time, in this process: the serve
    engine configured as `casemine serve` has it, and the one-shot CLI engine."""
    from pipeline.config import load_config
    from pipeline.embed import Embedder, prepare_query_engine
    from pipeline.query.service import _serve_embedder

    cfg = load_config()
    out = {}
    t0 = time.perf_counter()
    serve_engine = prepare_query_engine(cfg)
    out["serve_engine"] = serve_engine
    out["serve_engine_prepare_s"] = round(time.perf_counter() - t0, 1)
    engines = {f"encode_{serve_engine} (as serve has it)": _serve_embedder(cfg),
               f"encode_{cfg.embed.query_engine} (as a CLI query has it)": Embedder(cfg, use_cache=False)}
    for name, e in engines.items():
        t0 = time.perf_counter()
        e.encode_queries(["预热"])
        load = time.perf_counter() - t0
        for label, pool in (("short", QUESTIONS), ("excerpts", questions)):
            ms = []
            for i in range(len(questions)):
                t = time.perf_counter()
                e.encode_queries([pool[i % len(pool)]])
                ms.append((time.perf_counter() - t) * 1000)
            out[f"{name}, {label}"] = {"load_s": round(load, 2), **_pct(ms)}
    return out


def bench_size(n: int, rounds: int, warm_n: int, out: Path | None = None, encode: bool = True) -> dict:
    """Every figure for one index: the bench's own of `n` cases, or an existing output root `out`
    (with its build figures and recall when the bench built it). `encode=False` leaves out the
    encoders' own timings (about two minutes here) to re-measure query latency only."""
    own = out is None
    out = RESULTS / f"query-index-{n}" if out is None else out
    info_file = out / "bench_info.json"
    if not own:
        info: dict = {"out": str(out)}
        if info_file.is_file():
            info.update(json.loads(info_file.read_text("utf-8")))
    elif info_file.is_file() and (out / "index" / "CURRENT").is_file():
        info = json.loads(info_file.read_text("utf-8"))
        print(f"reusing the {n}-case index in {out} (built earlier: delete it to rebuild)", flush=True)
    else:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        print(f"building an index of {n} cases in {out} ...", flush=True)
        info = build_index(out, n)
    res: dict = {"index": info}
    texts = _real_texts()
    questions = [*QUESTIONS, *(t[:60] for t in texts)]
    cold_qs = [questions[i % len(questions)] for i in range(rounds)]
    res["baseline: python -c pass"] = _pct([_run([sys.executable, "-c", "pass"])[0] * 1000 for _ in range(rounds)])
    _run(_casemine("query", "预热", "--out", str(out), "--local", "--json"))  # word table, OS caches
    res["cold: casemine query --local (no server)"] = _pct(
        [_run(_casemine("query", q, "--out", str(out), "--local", "--json"))[0] * 1000 for q in cold_qs])
    if encode:
        res.update(_encode_times(questions[:warm_n]))
    port = _free_port()
    t0 = time.perf_counter()
    srv = subprocess.Popen(_casemine("serve", "--out", str(out), "--port", str(port)), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from pipeline.query import client as query_client

        deadline = time.time() + 600
        while query_client.server_port(out) != port and time.time() < deadline and srv.poll() is None:
            time.sleep(0.1)
        if query_client.server_port(out) != port:
            raise RuntimeError("the server did not come up")
        res["serve start-up s"] = round(time.perf_counter() - t0, 1)
        # Agents' questions are short; complaint excerpts (up to 60 characters) cost the encoder more.
        for label, pool in (("short agent questions", QUESTIONS), ("complaint excerpts <=60 chars", questions)):
            warm = []
            for i in range(warm_n):
                q = pool[i % len(pool)]
                t = time.perf_counter()
                assert query_client.query_remote(out, [q], 5, None, None, port=port) is not None
                warm.append((time.perf_counter() - t) * 1000)
            res[f"warm: through serve, {label}"] = _pct(warm)
        cold = []
        for q in cold_qs:
            dt, stdout = _run(_casemine("query", q, "--out", str(out), "--json"))
            assert json.loads(stdout)["served_by"] == "server"
            cold.append(dt * 1000)
        res["cold: casemine query, server running"] = _pct(cold)
    finally:
        srv.terminate()
        srv.wait(30)
    return res


def _print(n: int, res: dict) -> None:
    print(f"\n== query latency at {f'{n:,} cases' if n else res['index']['out']} (k=5, hybrid)")
    # Recall and search times come from the build (the vectors are not kept), so from that moment's load.
    print("  index (recall and search times measured at build): " + json.dumps(res["index"], ensure_ascii=False))
    for name, v in res.items():
        if name == "index":
            continue
        if isinstance(v, dict) and "p50" in v:
            extra = f"   load {v['load_s']} s" if "load_s" in v else ""
            print(f"  {name:<62} p50 {v['p50']:8.1f} ms  p95 {v['p95']:8.1f} ms  max {v['max']:8.1f}  "
                  f"(n={v['n']}){extra}")
        else:
            print(f"  {name:<62} {v}")


def calibrate(out: Path, seed: int = 0) -> None:
    """Cosine of true CSDS pairs vs random non-pairs, and the share of each above candidate cuts."""
    import numpy as np

    from pipeline.config import load_config
    from pipeline.embed import Embedder, model_identity
    from pipeline.retrieval.search import StoredIndex

    cfg = load_config()
    idx = StoredIndex.load(out / "index", cfg.index, model_identity(cfg))
    conv = idx._list("conversation_id")
    vecs = idx.vectors(range(len(idx)))
    pairs = [json.loads(line) for line in (SHARED / "pairs" / "csds_dev300.jsonl").open(encoding="utf-8")]
    q = Embedder(cfg, use_cache=False).encode_queries([p["query"] for p in pairs])
    sims = q @ vecs.T
    rng = np.random.default_rng(seed)
    true, rand = [], []
    for i, p in enumerate(pairs):
        own = np.array([c == p["id"] for c in conv])
        if own.any():  # a dialogue may give several cases: its best one is the match
            true.append(sims[i, own].max())
            rand.extend(sims[i, rng.choice(np.flatnonzero(~own), 5, replace=False)])
    true_a, rand_a = np.array(true), np.array(rand)
    print(f"{len(true_a)} true pairs: median cosine {np.median(true_a):.3f}; {len(rand_a)} random non-pairs: "
          f"median {np.median(rand_a):.3f}, p95 {np.percentile(rand_a, 95):.3f}")
    cuts = [round(0.86 + 0.005 * i, 3) for i in range(13)]
    youden = {t: float((true_a >= t).mean() - (rand_a >= t).mean()) for t in cuts}
    for t in cuts:
        tp, fp = (true_a >= t).mean(), (rand_a >= t).mean()
        mark = "  <- best J" if t == max(youden, key=youden.get) else ""
        print(f"  cut {t:.3f}: true pairs above {tp:.3f}, non-pairs above {fp:.3f}, Youden J {youden[t]:.3f}{mark}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000", help="comma-separated index sizes (default 10000: quick)")
    ap.add_argument("--out", type=Path, help="bench this output root's index instead of building one")
    ap.add_argument("--rounds", type=int, default=10, help="fresh processes per cold figure")
    ap.add_argument("--warm", type=int, default=200, help="queries through the server for the warm figure")
    ap.add_argument("--calibrate", type=Path, metavar="DIR", help="output root built from ../shared/data/csds")
    ap.add_argument("--no-encode", action="store_true", help="skip the encoders' own timings (query latency only)")
    ap.add_argument("--ef-sweep", action="store_true",
                    help="instead: HNSW recall@10 vs exact and search time per efSearch on the built --sizes indexes")
    a = ap.parse_args()
    if a.calibrate:
        return calibrate(a.calibrate)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.ef_sweep:
        for n in (int(s) for s in a.sizes.split(",") if s):
            print(f"== efSearch at {n:,} cases: " + json.dumps(ef_sweep(RESULTS / f"query-index-{n}", n)), flush=True)
        return None
    if a.out:
        res = bench_size(0, a.rounds, a.warm, a.out, encode=not a.no_encode)
        return _print(0, res)
    for n in (int(s) for s in a.sizes.split(",") if s):
        res = bench_size(n, a.rounds, a.warm, encode=not a.no_encode)
        _print(n, res)
        (RESULTS / f"bench_query_{n}.json").write_text(json.dumps(res, indent=1, ensure_ascii=False), "utf-8")


if __name__ == "__main__":
    main()
