"""The `casemine` command: a thin layer over the pipeline's functions.

Each command module registers its commands on `app` (or on `eval_app` for `casemine eval ...`);
they are imported at the bottom so `casemine --help` lists them all. Exit codes: 0 ok, 1 the work
failed (bad data, nothing to do that was asked for), 2 usage or configuration error.
"""

from __future__ import annotations

import os

import typer

# Prefect reads these at import: no telemetry from a machine with no network.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

app = typer.Typer(
    name="casemine",
    help="Mine customer-service cases from Chinese chat logs and call transcripts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Measure quality on labelled data.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
# `casemine train` trains the issue classifier (its callback, in classify_cmds); subcommands train
# other models (`casemine train emotion`, in emotion_cmds).
train_app = typer.Typer(help="Train models: the issue classifier (no subcommand) or `train emotion`.")
app.add_typer(train_app, name="train")

# Command modules, imported for their registrations. Add yours here.
_COMMAND_MODULES = (
    "pipeline.cli.run_cmds",
    "pipeline.cli.search_cmds",
    "pipeline.cli.classify_cmds",
    "pipeline.cli.cluster_cmds",
    "pipeline.cli.emotion_cmds",
    "pipeline.cli.library_cmds",
    "pipeline.cli.pii_cmds",
    "pipeline.cli.cases_cmds",
)


def _register() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name)


def main() -> None:
    _register()
    app()
