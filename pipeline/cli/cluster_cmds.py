"""`casemine clusters export` and `casemine eval clusters`."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import typer

from pipeline.cli import app, eval_app
from pipeline.cli.common import ConfigOption, console, emit_json, fail, get_config

clusters_app = typer.Typer(help="Root-cause clusters, trends, KPIs and the HTML report.", no_args_is_help=True)
app.add_typer(clusters_app, name="clusters")


def _parse_date(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        fail(f"--since {value!r} is not a date; use YYYY-MM-DD, e.g. --since 2025-09-01", code=2)


@clusters_app.command("export")
def export_cmd(
    out: Path | None = typer.Option(None, "--out", "-o", help="Output root holding processed/ (default: paths.out)."),
    since: str | None = typer.Option(None, "--since", help="Only cases dated on or after YYYY-MM-DD."),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    recluster: bool = typer.Option(
        False, "--recluster", help="Re-cluster all cases now instead of assigning only the new ones."
    ),
    wait: float = typer.Option(
        0.0, "--wait", min=0, help="Seconds to wait when a run or another export holds --out (default: refuse at once)."
    ),
) -> None:
    """Cluster the stored cases (new ones assigned to the stored clusters; all re-clustered on
    schedule, on drift or with --recluster); write clusters, members, trends, alerts, matrix, KPIs (Parquet + CSV)
    and report.html under <out>/exports/<today>/, and point exports/LATEST at it."""
    cfg = get_config(config)
    root = Path(out) if out else cfg.resolve(cfg.paths.out)
    start = _parse_date(since)
    if not (root / "processed" / "cases").is_dir():
        fail(f"no case table under {root}/processed/cases; run `casemine run --out {root}` first")
    from pipeline.insights.export import export_all
    from pipeline.orchestrate.lock import LockHeld, run_lock

    # Under the run's lock: the export appends to its case copy in place and to the membership,
    # which a run's own export (or a second export) must not do at the same time.
    try:
        with run_lock(root, wait_s=wait, command="casemine clusters export"):
            summary = export_all(cfg, root, start, recluster=recluster)
    except LockHeld as e:
        fail(str(e))
    if summary["n_cases"] == 0:
        fail(f"no cases{' since ' + since if since else ''} under {root}; nothing to export")
    if json_out:
        emit_json(summary)
        return
    console.print(
        f"exported {summary['n_cases']} cases, {summary['n_clusters']} clusters "
        f"({summary['n_new_clusters']} new), {summary['alerts']} alerts -> {summary['export_dir']}"
    )
    drift = summary.get("drift")
    console.print(
        f"mode: {summary['mode']} ({summary['mode_reason']}), {summary['n_new_cases']} new cases"
        + (f", drift {drift:.1%}" if drift is not None else "")
    )
    console.print(f"report: {summary['report']}")


@eval_app.command("clusters")
def eval_clusters_cmd(
    labels: Path = typer.Option(
        ...,
        "--labels",
        "-l",
        help="CSV or JSONL with `text` and `label`; with --transcripts, JSONL/CSV of conversation_id + issue_type.",
    ),
    transcripts: Path | None = typer.Option(
        None,
        "--transcripts",
        "-t",
        help="Transcript file or folder: mine its cases with the nightly steps and cluster their problems.",
    ),
    halves: bool = typer.Option(True, "--halves/--no-halves", help="Also score two halves of 3 seeded splits."),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print nmi, ari, n_clusters, noise_share as JSON."),
) -> None:
    """Cluster labelled texts (or the cases mined from labelled transcripts) with the product's
    clustering and score it against the labels."""
    cfg = get_config(config)
    from pipeline.evaluate.clusters import evaluate_clusters

    try:
        res = evaluate_clusters(cfg, labels, transcripts=transcripts, halves=halves and not json_out)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if json_out:
        emit_json({k: res[k] for k in ("nmi", "ari", "n_clusters", "noise_share")})
        return
    what = f"cases mined from {transcripts}" if transcripts else "texts"
    console.print(
        f"{res['rows']} {what}, {res['n_labels']} labels: NMI {res['nmi']:.3f}  ARI {res['ari']:.3f}  "
        f"clusters {res['n_clusters']}  noise {res['noise_share']:.1%} (noise counted as one cluster)"
    )
    h = res.get("halves")
    if h:
        console.print(
            f"{h['halves']} halves (seeded splits, each clustered alone): NMI {h['nmi_mean']:.3f} "
            f"± {h['nmi_std']:.3f} (worst {h['nmi_min']:.3f})  ARI {h['ari_mean']:.3f} ± {h['ari_std']:.3f}"
        )
    st = res.get("stability")
    if st:
        u, s = st["unseeded"], st["seeded"]
        console.print(
            f"id stability with {u['grow']:.0%} more cases ({u['splits']} seeded splits): "
            f"re-cluster {u['stability']:.3f} (worst {u['stability_min']:.3f}), started from the stored "
            f"centroids {s['stability']:.3f} (worst {s['stability_min']:.3f}); new cases assigned "
            f"incrementally agree with the re-cluster: PCA space {s['agree_pca']:.3f}, cosine {s['agree_full']:.3f}"
        )
