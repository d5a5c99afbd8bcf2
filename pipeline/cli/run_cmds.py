"""`casemine run`, `casemine ingest`, `casemine sample`, `casemine schedule`."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli import app
from pipeline.cli.common import ConfigOption, console, emit_json, fail, get_config


def _progress():
    """A rich progress callback for long work, silent when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None, lambda *a: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, update


@app.command()
def run(
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Folder of transcripts (default: paths.input)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output root; everything the run writes goes here (default: paths.out)."),
    config: Optional[Path] = ConfigOption,
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Run as a Prefect flow (default) or as plain functions."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Conversations per batch (default: flow.batch_size)."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
) -> None:
    """Run the nightly pipeline: ingest new transcripts, mask, mine cases, classify, index them."""
    cfg = get_config(config)
    overrides = {"flow": {"batch_size": batch_size}} if batch_size else {}
    cfg = cfg.with_overrides(**overrides) if overrides else cfg
    input_dir = input or cfg.resolve(cfg.paths.input)
    out_dir = out or cfg.resolve(cfg.paths.out)
    if not input_dir.exists():
        fail(f"input {input_dir} does not exist; pass --input DIR (or run `casemine sample --out {input_dir}` first)")
    try:
        if prefect:
            from pipeline.flows import flow_for

            summary = flow_for(cfg)(str(input_dir), str(out_dir), str(config) if config else None, overrides or None)
        else:
            from pipeline.run import run_pipeline

            bar, update = _progress()
            if bar:
                with bar:
                    summary = run_pipeline(cfg, input_dir, out_dir, update)
            else:
                summary = run_pipeline(cfg, input_dir, out_dir)
    except FileNotFoundError as e:
        fail(str(e))
    except Exception as e:  # a damaged output is reported, not a traceback
        from pipeline.store import CorruptOutputError

        if isinstance(e, CorruptOutputError):
            fail(str(e))
        raise
    from pipeline.run import summary_text

    sys.stderr.write(summary_text(summary))  # plain text: no markup parsing, no wrapping
    if json_out:
        emit_json(summary)
    if not summary["records"]["reconciles"]:
        fail("record counts do not reconcile (read != accepted + duplicates + quarantined); please report this run")


@app.command()
def ingest(
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Folder or file of transcripts (default: paths.input)."),
    config: Optional[Path] = ConfigOption,
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
    files, reasons, formats = [], Counter(), Counter()
    totals = Counter()
    root = input_dir if input_dir.is_dir() else input_dir.parent
    for p in paths:
        r = read_file(p, cfg.ingest, root=root)
        formats.update(c.source_format for c in r.conversations)
        reasons.update(q.reason for q in r.quarantined)
        totals.update(read=r.n_read, accepted=len(r.conversations), quarantined=len(r.quarantined))
        files.append({"file": r.path, "encoding": r.encoding, "read": r.n_read, "accepted": len(r.conversations),
                      "quarantined": len(r.quarantined)})
    report = {"input": str(input_dir), "files": files, "totals": dict(totals), "formats": dict(formats),
              "reasons": dict(reasons)}
    if json_out:
        emit_json(report)
        return
    for f in files:
        console.print(f"{f['file']:<40} {f['encoding']:<10} read {f['read']:>6}  ok {f['accepted']:>6}  quarantined {f['quarantined']:>4}", highlight=False)
    console.print(f"total: read {totals['read']}, valid {totals['accepted']}, quarantined {totals['quarantined']}"
                  + (f" ({', '.join(f'{k} {v}' for k, v in reasons.items())})" if reasons else ""), highlight=False)


@app.command()
def sample(
    out: Path = typer.Option(Path("data/sample"), "--out", "-o", help="Folder to write the sample transcripts into."),
    n: int = typer.Option(150, "--n", "-n", min=1, help="Number of well-formed conversations."),
    seed: int = typer.Option(7, help="Random seed; the same seed writes the same bytes."),
    labels_out: Optional[Path] = typer.Option(None, "--labels-out", help="Where to write the ground-truth labels (outside --out)."),
    malformed: bool = typer.Option(True, "--malformed/--no-malformed", help="Include deliberately broken records."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Generate realistic synthetic Chinese chat and call transcripts (with noise, PII and errors)."""
    from pipeline.sample import generate

    try:
        rep = generate(out, n=n, seed=seed, labels_out=labels_out, malformed=malformed)
    except ValueError as e:
        fail(str(e), code=2)
    info = {"out": str(out), "files": [str(f) for f in rep.files], "conversations": rep.n_conversations,
            "malformed": rep.n_malformed, "labels": str(rep.labels_path) if rep.labels_path else None}
    if json_out:
        emit_json(info)
    else:
        console.print(f"wrote {rep.n_conversations} conversations (+{rep.n_malformed} malformed records) in "
                      f"{len(rep.files)} files under {out}" + (f"; labels in {rep.labels_path}" if rep.labels_path else ""),
                      highlight=False)


@app.command()
def repair(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output root (default: paths.out)."),
    check: bool = typer.Option(False, "--check", help="Only report damaged files (exit 1 if any)."),
    config: Optional[Path] = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify stored case files against their commit checksums and drop runs whose files are damaged.

    The dropped runs' transcripts are read again by the next `casemine run` (case ids are stable, so
    the index and exports end up as before)."""
    from pipeline.run import repair as do_repair

    cfg = get_config(config)
    out_dir = out or cfg.resolve(cfg.paths.out)
    rep = do_repair(out_dir, check_only=check)
    if json_out:
        emit_json(rep)
    elif not rep["problems"]:
        console.print(f"all committed case files under {out_dir} match their checksums", highlight=False)
    else:
        for p in rep["problems"]:
            console.print(f"{p['path']}: {p['problem']} (run {p['run_id']})", highlight=False, markup=False)
        if rep["repaired"]:
            console.print(f"dropped {len(rep['runs'])} run(s); run `casemine run` to reprocess their transcripts",
                          highlight=False)
    if check and rep["problems"]:
        raise typer.Exit(1)


@app.command()
def schedule(config: Optional[Path] = ConfigOption) -> None:
    """Serve the nightly flow on its cron schedule (flow.schedule_cron); blocks until stopped.

    Needs a Prefect server for the schedule to fire: `prefect server start`, then
    `PREFECT_API_URL=http://127.0.0.1:4200/api casemine schedule`.
    """
    from pipeline.flows import serve_nightly

    get_config(config)
    serve_nightly(str(config) if config else None)
