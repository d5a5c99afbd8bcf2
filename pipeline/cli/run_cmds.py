"""`casemine run`, `casemine ingest`, `casemine sample`, `casemine schedule`."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import typer

from pipeline.cli import app
from pipeline.cli.common import ConfigOption, console, emit_json, fail, get_config


@app.command()
def run(
    input: Path | None = typer.Option(None, "--input", "-i", help="Folder of transcripts (default: paths.input)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output root; everything the run writes goes here (default: paths.out)."
    ),
    config: Path | None = ConfigOption,
    prefect: bool = typer.Option(
        True, "--prefect/--no-prefect", help="Run as a Prefect flow (default) or as plain functions."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Conversations per batch (default: flow.batch_size)."
    ),
    chunk_mb: float | None = typer.Option(
        None,
        "--chunk-mb",
        min=0.001,
        help="Input megabytes read, processed and committed at a time; bounds memory (default: flow.chunk_mb).",
    ),
    allow_empty: bool = typer.Option(
        False,
        "--allow-empty",
        help="Exit 0 when the input holds no transcripts (default: exit 1, an empty delivery is an error).",
    ),
    wait: float = typer.Option(
        0.0, "--wait", min=0, help="Seconds to wait when another run holds --out (default: refuse at once)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
) -> None:
    """Run the nightly pipeline: ingest new transcripts, mask, mine cases, classify, index them.

    Exit codes: 0 done (or nothing new), 1 bad or missing input / another run holds --out /
    counts that do not reconcile, 2 usage or configuration error."""
    from pipeline.orchestrate.lock import LockHeld, run_lock
    from pipeline.orchestrate.preflight import PreflightError, check_run

    cfg = get_config(config)
    flow = {k: v for k, v in (("batch_size", batch_size), ("chunk_mb", chunk_mb)) if v}
    overrides = {"flow": flow} if flow else {}
    cfg = cfg.with_overrides(**overrides) if overrides else cfg
    input_dir = input or cfg.resolve(cfg.paths.input)
    out_dir = out or cfg.resolve(cfg.paths.out)
    try:
        delivery = check_run(cfg, input_dir, out_dir, allow_empty)
        with run_lock(out_dir, wait_s=wait):
            if delivery.new_files == 0 and _derived_current(out_dir):
                _nothing_new(input_dir, out_dir, len(delivery.files), json_out)
                return
            summary = _run_steps(cfg, input_dir, out_dir, config, overrides, prefect)
    except (PreflightError, LockHeld) as e:
        fail(str(e), getattr(e, "code", 1))
    except FileNotFoundError as e:
        fail(str(e))
    except Exception as e:  # damaged or inconsistent outputs are reported in one line, not a traceback
        from pipeline.retrieval.index import IndexLoadError
        from pipeline.storage.state import StateError
        from pipeline.storage.store import CorruptOutputError

        if isinstance(e, (CorruptOutputError, StateError, IndexLoadError)):
            fail(str(e))
        raise
    from pipeline.orchestrate.nightly import summary_text

    sys.stderr.write(summary_text(summary))  # plain text: no markup parsing, no wrapping
    if json_out:
        emit_json(summary)
    if not summary["records"]["reconciles"]:
        fail("record counts do not reconcile (read != accepted + duplicates + quarantined); please report this run")


def _derived_current(out_dir: Path) -> bool:
    from pipeline.orchestrate.nightly import derived_outputs_current

    return derived_outputs_current(out_dir)


def _nothing_new(input_dir: Path, out_dir: Path, n_files: int, json_out: bool) -> None:
    what = (
        f"nothing new: all {n_files} file(s) under {input_dir} were processed by earlier runs"
        if n_files
        else f"nothing new: no transcripts under {input_dir} (allowed by --allow-empty)"
    )
    console.print(f"{what}; outputs under {out_dir} are unchanged", highlight=False, markup=False)
    if json_out:
        emit_json({"status": "nothing_new", "input": str(input_dir), "out": str(out_dir), "files": n_files})


def _run_steps(cfg, input_dir: Path, out_dir: Path, config: Path | None, overrides: dict, prefect: bool) -> dict:
    """The run under Prefect when its API can be reached or started, else the same steps without
    it (the night is not lost for Prefect's sake; the summary's `runner` line says why)."""
    from pipeline.progress import reporting, rich_display

    runner = "plain (--no-prefect)"
    if prefect:
        from pipeline.orchestrate.prefect_api import PrefectUnavailable, ensure_api

        try:
            with console.status("starting Prefect's API", spinner="dots"):
                ensure_api(cfg.flow)
        except PrefectUnavailable as e:
            prefect = False
            runner = f"plain: Prefect was unavailable ({e}); the same steps ran without it"
            console.print(f"warning: {e}; running the same steps without Prefect", highlight=False, markup=False)
    display = rich_display(console) if console.is_terminal else contextlib.nullcontext(None)
    with display as update, reporting(update):
        if prefect:
            from pipeline.orchestrate.prefect_flow import flow_for

            return flow_for(cfg)(str(input_dir), str(out_dir), str(config) if config else None, overrides or None)
        from pipeline.orchestrate.nightly import run_pipeline

        return run_pipeline(cfg, input_dir, out_dir, runner)


@app.command()
def ingest(
    input: Path | None = typer.Option(
        None, "--input", "-i", help="Folder or file of transcripts (default: paths.input)."
    ),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Validate transcripts without processing them: formats, encodings, counts, quarantine reasons.

    Writes nothing; use it to check a delivery before the nightly run picks it up.
    """
    from pipeline.ingest import discover, read_file

    cfg = get_config(config)
    input_dir = input or cfg.resolve(cfg.paths.input)
    if not input_dir.exists():
        fail(f"input {input_dir} does not exist")
    paths = discover(input_dir)
    if not paths:
        fail(f"no *.jsonl, *.json or *.csv files under {input_dir}")
    files: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    root = input_dir if input_dir.is_dir() else input_dir.parent
    for p in paths:
        r = read_file(p, cfg.ingest, root=root)
        formats.update(c.source_format for c in r.conversations)
        reasons.update(q.reason for q in r.quarantined)
        totals.update(read=r.n_read, accepted=len(r.conversations), quarantined=len(r.quarantined))
        files.append(
            {
                "file": r.path,
                "encoding": r.encoding,
                "read": r.n_read,
                "accepted": len(r.conversations),
                "quarantined": len(r.quarantined),
            }
        )
    report = {
        "input": str(input_dir),
        "files": files,
        "totals": dict(totals),
        "formats": dict(formats),
        "reasons": dict(reasons),
    }
    if json_out:
        emit_json(report)
        return
    for f in files:
        console.print(
            f"{f['file']:<40} {f['encoding']:<10} read {f['read']:>6}  ok {f['accepted']:>6}  "
            f"quarantined {f['quarantined']:>4}",
            highlight=False,
        )
    console.print(
        f"total: read {totals['read']}, valid {totals['accepted']}, quarantined {totals['quarantined']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in reasons.items())})" if reasons else ""),
        highlight=False,
    )


@app.command()
def sample(
    out: Path = typer.Option(Path("data/sample"), "--out", "-o", help="Folder to write the sample transcripts into."),
    n: int = typer.Option(150, "--n", "-n", min=1, help="Number of well-formed conversations."),
    seed: int = typer.Option(7, help="Random seed; the same seed writes the same bytes."),
    labels_out: Path | None = typer.Option(
        None, "--labels-out", help="Where to write the ground-truth labels (outside --out)."
    ),
    malformed: bool = typer.Option(True, "--malformed/--no-malformed", help="Include deliberately broken records."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Generate realistic synthetic Chinese chat and call transcripts (with noise, PII and errors)."""
    from pipeline.sample.generate import generate

    try:
        rep = generate(out, n=n, seed=seed, labels_out=labels_out, malformed=malformed)
    except ValueError as e:
        fail(str(e), code=2)
    info = {
        "out": str(out),
        "files": [str(f) for f in rep.files],
        "conversations": rep.n_conversations,
        "malformed": rep.n_malformed,
        "labels": str(rep.labels_path) if rep.labels_path else None,
    }
    if json_out:
        emit_json(info)
    else:
        console.print(
            f"wrote {rep.n_conversations} conversations (+{rep.n_malformed} malformed records) in "
            f"{len(rep.files)} files under {out}" + (f"; labels in {rep.labels_path}" if rep.labels_path else ""),
            highlight=False,
        )


@app.command()
def repair(
    out: Path | None = typer.Option(None, "--out", "-o", help="Output root (default: paths.out)."),
    check: bool = typer.Option(False, "--check", help="Only report problems (exit 1 if any); change nothing."),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Make an output root consistent again without dropping history it can keep.

    Rebuilds a lost or damaged state database from the runs' manifests, adopts case files of
    unknown runs, and drops runs whose case files are damaged (the next `casemine run` reads their
    transcripts again; case ids are stable, so the index and exports end up as before)."""
    from pipeline.orchestrate.lock import LockHeld, run_lock
    from pipeline.orchestrate.nightly import repair as do_repair

    cfg = get_config(config)
    out_dir = out or cfg.resolve(cfg.paths.out)
    if not out_dir.is_dir():
        fail(f"--out {out_dir} is not a folder; pass the output root of earlier runs", code=2)
    try:
        with run_lock(out_dir, command="casemine repair"):
            rep = do_repair(out_dir, check_only=check)
    except LockHeld as e:
        fail(str(e))
    if json_out:
        emit_json(rep)
    elif not rep["problems"] and not rep["state_rebuilt"]:
        console.print(f"{out_dir}: the state, the run manifests and every committed case file agree", highlight=False)
    else:
        if rep["state_rebuilt"]:
            console.print("the damaged state database was moved aside and rebuilt", highlight=False)
        for p in rep["problems"]:
            console.print(f"{p['path']}: {p['problem']} (run {p['run_id'] or '-'})", highlight=False, markup=False)
        if rep["replayed_runs"] or rep["adopted_runs"]:
            console.print(
                f"restored {len(rep['replayed_runs'])} run(s) from their manifests; adopted the case files of "
                f"{len(rep['adopted_runs'])} run(s) without one",
                highlight=False,
            )
        if rep["runs"] and rep["repaired"]:
            console.print(
                f"dropped {len(rep['runs'])} run(s) with damaged files; run `casemine run` to reprocess "
                "their transcripts",
                highlight=False,
            )
    if check and rep["problems"]:
        raise typer.Exit(1)


@app.command()
def schedule(config: Path | None = ConfigOption) -> None:
    """Serve the nightly flow on its cron schedule (flow.schedule_cron); blocks until stopped.

    Needs a running Prefect server, which keeps the schedule: `prefect server start`, then
    `PREFECT_API_URL=http://127.0.0.1:4200/api casemine schedule`. Without one it exits 2.
    """
    from pipeline.orchestrate.prefect_api import PrefectUnavailable, check_server, configured_api_url

    get_config(config)
    url = configured_api_url()
    if not url:
        fail(
            "no Prefect server is configured, and a temporary one cannot keep a schedule: start one with "
            "`prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api` and rerun",
            code=2,
        )
    try:
        check_server(url)
    except PrefectUnavailable as e:
        fail(f"{e}; start it with `prefect server start` (or fix PREFECT_API_URL) and rerun", code=2)
    from pipeline.orchestrate.prefect_flow import serve_nightly

    console.print(f"serving the nightly deployment on {url}; stop with Ctrl-C", highlight=False, markup=False)
    serve_nightly(str(config) if config else None)
