"""Benchmark: what an agent waits for per `casemine query`, cold (no server) and warm (through a
running `casemine serve`), against the baselines measured in the same run: a bare interpreter
start (the floor of any command) and the server's own answer time (HTTP from a warm process).

Run: `python -m bench.bench_query [--out DIR] [--rounds 10] [--cases 1000]`. Without --out it
builds an index of --cases real complaint texts (synthetic ones when ../shared/data is absent)
in a temporary folder. Timings on a shared 2-core machine vary; compare within one run.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
QUESTIONS = ["客户说快递三天没到", "退款一直没到账怎么办", "发票抬头开错了能重开吗", "手机屏幕碎了要换新",
             "会员积分不能用", "贷款额度怎么提高"]


def _build_index(out: Path, n: int) -> None:
    import pandas as pd

    from pipeline.config import load_config
    from pipeline.retrieval.index import update_from_cases
    from pipeline.schema import CASE_COLUMNS

    p = SHARED / "complaints" / "dev.csv"
    texts = pd.read_csv(p)["text"].astype(str).tolist() if p.is_file() else QUESTIONS
    texts = [f"{texts[i % len(texts)]}" + ("" if i < len(texts) else f"（{i}）") for i in range(n)]
    df = pd.DataFrame({c: [None] * n for c in CASE_COLUMNS})
    df["case_id"] = [f"bench-{i}-0" for i in range(n)]
    df["problem"] = texts
    df["outcome"] = "resolved"
    df["date"] = "2025-09-01"
    df["issue_type"] = "其他"
    update_from_cases(load_config(), out, df)


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


def _stats(ms: list[float]) -> str:
    ms = sorted(ms)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return f"median {statistics.median(ms):7.1f} ms   p90 {p90:7.1f} ms   (n={len(ms)})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    ap.add_argument("--out", type=Path, help="an output root with an index (default: build one)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--calibrate", type=Path, metavar="DIR", help="output root built from ../shared/data/csds")
    a = ap.parse_args()
    if a.calibrate:
        return calibrate(a.calibrate)
    tmp = None
    out = a.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-query-")
        out = Path(tmp.name)
        print(f"building an index of {a.cases} cases in {out} ...", flush=True)
        _build_index(out, a.cases)
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(a.rounds)]
    rows: dict[str, list[float]] = {}
    rows["baseline: python -c pass"] = [_run([sys.executable, "-c", "pass"])[0] * 1000 for _ in qs]
    _run(_casemine("query", "预热", "--out", str(out), "--local", "--json"))  # word table, OS caches
    rows["cold: casemine query --local"] = [_run(_casemine("query", q, "--out", str(out), "--local", "--json"))[0] * 1000
                                            for q in qs]
    port = _free_port()
    srv = subprocess.Popen(_casemine("serve", "--out", str(out), "--port", str(port)), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from pipeline.query import client as query_client

        deadline = time.time() + 180
        while query_client.server_port(out) != port and time.time() < deadline:
            time.sleep(0.2)
        if query_client.server_port(out) != port:
            raise RuntimeError("the server did not come up")
        http = []
        for q in qs:
            t0 = time.perf_counter()
            assert query_client.query_remote(out, [q], 5, None, None, port=port) is not None
            http.append((time.perf_counter() - t0) * 1000)
        rows["baseline: server alone (HTTP from a warm process)"] = http
        warm = []
        for q in qs:
            dt, stdout = _run(_casemine("query", q, "--out", str(out), "--json"))
            assert json.loads(stdout)["served_by"] == "server"
            warm.append(dt * 1000)
        rows["warm: casemine query, server running"] = warm
        rows["warm: casemine query (text, 80 columns)"] = [_run(_casemine("query", q, "--out", str(out)))[0] * 1000
                                                           for q in qs]
    finally:
        srv.terminate()
        srv.wait(30)
    print(f"\nquery latency, {out}, k=5, hybrid ({a.rounds} questions each)")
    for name, ms in rows.items():
        print(f"  {name:<50} {_stats(ms)}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
