"""`casemine eval pii`: how much personal data the masker finds, and what it wrongly hides."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli import eval_app
from pipeline.cli.common import ConfigOption, console, emit_json, fail, get_config


@eval_app.command("pii")
def eval_pii_cmd(
    n: int = typer.Option(3000, "--n", min=1, help="Generated sentences."),
    seed: int = typer.Option(12, "--seed", help="Seed of the generated set (same seed, same set)."),
    show: int = typer.Option(8, "--show", min=0, help="Missed / over-masked examples to print per set."),
    check: bool = typer.Option(False, "--check", help="Exit 1 when the generated set is below the targets."),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Recall per PII kind and must-keep precision (order and tracking numbers, amounts, dates,
    models, brands, everyday words) on a generated set with known positions and a hand-written set."""
    cfg = get_config(config)
    from pipeline.evaluate.pii import evaluate_pii, to_text

    report = evaluate_pii(cfg, n=n, seed=seed)
    if json_out:
        emit_json(report)
    else:
        console.print(to_text(report, show=show), highlight=False, markup=False, soft_wrap=True)
    if check and not report["generated"]["meets_targets"]:
        fail("the generated PII set is below the targets (recall 0.95, names 0.90, must-keep 0.98)")
