"""`casemine eval cases`: outcome, issue type, request kind, problem and handling against labels."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli import eval_app
from pipeline.cli.common import ConfigOption, emit_json, fail, get_config
from pipeline.config import ConfigError


@eval_app.command("cases")
def eval_cases_cmd(
    transcripts: Path = typer.Option(
        ..., "--transcripts", "-t", help="Folder (or file) of transcripts, any input format."
    ),
    labels: Path | None = typer.Option(
        None, "--labels", "-l", help="JSONL or CSV: conversation_id plus any of issue_type, request_kind, outcome."
    ),
    summaries: Path | None = typer.Option(
        None, "--summaries", "-s", help="JSONL or CSV: conversation_id, user_summary, summary (CSDS style)."
    ),
    half: str | None = typer.Option(
        None,
        "--half",
        help="Only half of the labelled conversations, a or b (split by a "
        "hash of the id): check rules chosen on one half on the other.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    config: Path | None = ConfigOption,
) -> None:
    """Mine the transcripts as a nightly run would (nothing is written) and compare the cases with
    labels and summaries, each figure beside its baseline from the same run."""
    cfg = get_config(config)
    if labels is None and summaries is None:
        fail("give --labels and/or --summaries to compare the mined cases with", code=2)
    if half is not None and half.lower() not in ("a", "b"):
        fail(f"--half must be a or b, not {half!r}", code=2)
    if not transcripts.exists():
        fail(f"{transcripts} does not exist; point --transcripts at a folder of transcripts")
    from pipeline.evaluate.cases import LabelFileError, evaluate_cases, to_text

    try:
        report = evaluate_cases(cfg, transcripts, labels, summaries, half=half.lower() if half else None)
    except (LabelFileError, ConfigError) as e:
        fail(str(e), code=2)
    except (ValueError, UnicodeDecodeError) as e:
        fail(str(e))
    if json_out:
        emit_json(report)
    else:
        typer.echo(to_text(report))
