"""The `casemine` command: a thin layer over the pipeline's functions.

Each command module registers its commands on `app` (or on `eval_app` for `casemine eval ...`);
`main()` imports them all so `casemine --help` lists them (the search commands alone for
`query`, `show` and `serve`, which agents run often). Exit codes: 0 ok, 1 the work
failed (bad data, nothing to do that was asked for), 2 usage or configuration error.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pipeline.heap import name_system_arrow_pool

# Prefect reads these at import: no telemetry from a machine with no network.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Before anything imports pyarrow: Arrow's C++ code on glibc's heap (see pipeline/heap.py).
name_system_arrow_pool()

_APPS: dict[str, Any] = {}


def _build_apps() -> None:
    # Built on first use, not at import: `casemine query` through a running server must not pay
    # for importing typer (see main()).
    import typer

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
    _APPS.update(app=app, eval_app=eval_app, train_app=train_app)


def __getattr__(name: str) -> Any:
    # `from pipeline.cli import app` (every command module) builds the typer apps.
    if name in ("app", "eval_app", "train_app"):
        if not _APPS:
            _build_apps()
        return _APPS[name]
    raise AttributeError(name)


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


# Commands that need only their own module: importing every command module costs ~0.4 s.
_SEARCH_COMMANDS = ("query", "show", "serve")


def main() -> None:
    """The `casemine` entry point: an unexpected error is one line on stderr (exit 1); `--debug`
    anywhere on the command line, or CASEMINE_DEBUG=1, shows the traceback instead."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("CASEMINE_DEBUG") == "1"
    sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        _dispatch()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence for a person at a terminal
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        sys.stderr.write(
            f"error: {type(e).__name__}: {first}\n(unexpected: rerun with --debug for the traceback and report it)\n"
        )
        sys.exit(1)


def _dispatch() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["query"]:
        # An agent's question: through a running `casemine serve` (standard library only), else a
        # local search; without typer either way. None: options only typer can parse or report.
        from pipeline.query.client import fast_query

        code = fast_query(argv[1:])
        if code is not None:
            sys.exit(code)
    if argv[:1] and argv[0] in _SEARCH_COMMANDS:
        import importlib

        importlib.import_module("pipeline.cli.search_cmds")
    else:
        _register()
    __getattr__("app")()
