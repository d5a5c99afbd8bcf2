"""`casemine library build|list|approve|reject|publish|coverage`: the typical-case library."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli import app
from pipeline.cli.common import ConfigOption, console, emit_json, fail, get_config
from pipeline.config import Config, ConfigError

library_app = typer.Typer(
    help="Typical-case library (典型案例库): candidates, review, publish, coverage.", no_args_is_help=True
)
app.add_typer(library_app, name="library")

OutOption = typer.Option(None, "--out", "-o", help="Output root (default: paths.out from the config).")


def _setup(config: Path | None, out: Path | None) -> tuple[Config, Path]:
    cfg = get_config(config)
    return cfg, Path(out) if out else cfg.resolve(cfg.paths.out)


def _run(fn, *args, **kwargs):
    from pipeline.library.typical_cases import LibraryError

    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        fail(str(e), code=2)
    except LibraryError as e:
        fail(str(e))


@library_app.command("build")
def build_cmd(
    out: Path | None = OutOption,
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json"),
    full: bool = typer.Option(
        False, "--full", help="Read every stored case, not only those added since the last build's saved pools."
    ),
) -> None:
    """Pick candidates per issue type and root-cause cluster; decisions already made are kept.

    A build continues from the pools the last one saved and reads only the cases added since,
    when nothing it read has changed; otherwise it reads every stored case (the JSON says which,
    in `build` and `full_because`)."""
    cfg, out = _setup(config, out)
    from pipeline.library.typical_cases import build

    res = _run(build, cfg, out, full=full)
    if json_out:
        emit_json(res)
    else:
        console.print(
            f"{res['eligible']} of {res['cases']} cases eligible; {res['candidates']} candidates in "
            f"{res['groups']} groups: {res['new']} new, {res['decisions_kept']} decisions kept, "
            f"{res['retired']} retired ({res['build']} build"
            + (f": {res['full_because']})" if res.get("full_because") else ")"),
            highlight=False,
        )


@library_app.command("list")
def list_cmd(
    status: str | None = typer.Option(None, "--status", help="candidate | approved | rejected | published"),
    issue_type: str | None = typer.Option(None, "--type", help="Only this issue type."),
    out: Path | None = OutOption,
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="One JSON line per entry."),
) -> None:
    """Library entries with their status, score and why they were picked."""
    cfg, out = _setup(config, out)
    from pipeline.library.typical_cases import LibraryStore

    rows = _run(lambda: LibraryStore(out).entries(status, issue_type))
    for r in rows:
        if json_out:
            emit_json(r)
        else:
            who = f" {r['decided_by']} {r['decided_at']}" if r.get("decided_by") else ""
            console.print(
                f"{r['case_id']}  {r['status']:9s} {r['issue_type']:10s} {r['score']:.2f}{who}  "
                f"{(r['parts'] or {}).get('problem', '')[:50]}",
                highlight=False,
                markup=False,
            )
    if not json_out:
        console.print(f"{len(rows)} entries", highlight=False)


def _decided(d, json_out: bool) -> None:
    if json_out:
        from dataclasses import asdict

        emit_json(asdict(d))
    else:
        console.print(f"{d.case_id}: {d.message}", highlight=False, markup=False)


@library_app.command("approve")
def approve_cmd(
    case_id: str = typer.Argument(...),
    by: str = typer.Option(..., "--by", help="Who approves."),
    note: str | None = typer.Option(None, "--note"),
    force: bool = typer.Option(False, "--force", help="Approve a case that was rejected."),
    out: Path | None = OutOption,
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Approve a candidate for the library (a rejected one needs --force)."""
    cfg, out = _setup(config, out)
    from pipeline.library.typical_cases import LibraryStore

    _decided(_run(lambda: LibraryStore(out).approve(case_id, by, note, force)), json_out)


@library_app.command("reject")
def reject_cmd(
    case_id: str = typer.Argument(...),
    by: str = typer.Option(..., "--by"),
    note: str = typer.Option(..., "--note", help="Why (required)."),
    out: Path | None = OutOption,
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Reject a candidate, approved or published case (it leaves the next publish)."""
    cfg, out = _setup(config, out)
    from pipeline.library.typical_cases import LibraryStore

    _decided(_run(lambda: LibraryStore(out).reject(case_id, by, note)), json_out)


@library_app.command("publish")
def publish_cmd(
    by: str = typer.Option("publish", "--by"),
    out: Path | None = OutOption,
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Publish approved cases: Parquet + one HTML page per issue type under <out>/library/published/."""
    cfg, out = _setup(config, out)
    from pipeline.library.typical_cases import publish

    res = _run(publish, cfg, out, by)
    if json_out:
        emit_json(res)
    else:
        console.print(
            f"published {res['published']} cases ({res['newly_published']} new) -> {res['parquet']}", highlight=False
        )


@library_app.command("coverage")
def coverage_cmd(
    since: str | None = typer.Option(None, "--since", help="YYYY-MM-DD: only cases from this date."),
    out: Path | None = OutOption,
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Share of cases whose nearest published case is similar enough, per issue type, and the gaps."""
    cfg, out = _setup(config, out)
    if since:
        from datetime import date

        try:
            date.fromisoformat(since)
        except ValueError:
            fail(f"--since {since!r} is not a date; use YYYY-MM-DD", code=2)
    from pipeline.library.typical_cases import coverage

    res = _run(coverage, cfg, out, since)
    if json_out:
        emit_json(res.as_dict())
        return
    console.print(
        f"coverage {res.coverage:.1%} ({res.n_covered}/{res.n_cases}, cosine >= {res.threshold})", highlight=False
    )
    for t, v in sorted(res.by_type.items(), key=lambda kv: -kv[1]["cases"]):
        console.print(f"  {t:12s} {v['coverage']:.1%} of {v['cases']} (published {v['published']})", highlight=False)
    for g in res.gaps[:15]:
        console.print(f"  gap {g['kind']} {g['id']}: {g['cases']} cases, {g['uncovered']} uncovered", highlight=False)
