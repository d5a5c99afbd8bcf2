"""Shared CLI plumbing: config loading, errors with exit codes, JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from pipeline.config import Config, ConfigError, load_config

# Human output goes to stderr so stdout stays clean for --json consumers.
console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="Config YAML (default: configs/casemine.yaml).")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error a person can act on and exit non-zero."""
    console.print("[bold red]error:[/] ", end="")
    console.print(message, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)


def get_config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        fail(str(e), code=2)


def emit_json(obj: Any) -> None:
    """One JSON document (or line) on stdout, UTF-8, Chinese unescaped."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def read_jsonl_objects(path: Path, require: tuple[str, ...]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL input file, each holding at least one of `require`; a bad line
    stops the command with its line number (CLI inputs are small and hand-made: fail fast)."""
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path} line {n} is not valid JSON ({e.msg}); each line must be one JSON object")
            if not isinstance(obj, dict) or not any(k in obj for k in require):
                fail(f"{path} line {n} has none of the fields {', '.join(require)}")
            out.append(obj)
    return out
