"""`casemine train`, `casemine classify`, `casemine review-queue`, `casemine eval classify`."""

from __future__ import annotations

# pandas is imported inside the commands: every `casemine` call (an agent's `query` included)
# imports this module to register its commands, and pandas costs about half a second.
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import app, eval_app, train_app

if TYPE_CHECKING:
    import pandas as pd
from pipeline.cli.common import ConfigOption, console, emit_json, fail, get_config, read_jsonl_objects
from pipeline.config import Config, ConfigError

RESULT_FIELDS = (
    "issue_type",
    "issue_type_confidence",
    "urgency",
    "urgency_confidence",
    "urgency_due_hours",
    "request_kind",
    "needs_review",
    "evidence",
    "classifier",
)


def _errors():
    """Exceptions that are the user's to fix (bad data, stale model), mapped to exit code 1."""
    from pipeline.analysis.classify import LabeledDataError, ModelMismatchError

    return (LabeledDataError, ModelMismatchError)


@train_app.callback(invoke_without_command=True)
def train_cmd(
    ctx: typer.Context,
    labels: Path | None = typer.Option(
        None,
        "--labels",
        "-l",
        help="Labelled CSV/JSONL/Parquet (text, label) or a folder of them "
        "(default: classify.labeled_dir); with --transcripts, a JSONL/CSV "
        "of conversation_id + any of issue_type, request_kind, outcome.",
    ),
    transcripts: Path | None = typer.Option(
        None,
        "--transcripts",
        "-t",
        help="Folder (or file) of the labelled conversations' transcripts: "
        "trains one model per label column from them.",
    ),
    extra_labels: Path | None = typer.Option(
        None,
        "--extra-labels",
        help="With --transcripts: CSV/JSONL (or folder) of text,label issue types from another source "
        "(e.g. complaints): a text model trained on them informs the issue-type model "
        "(default: classify.extra_labels).",
    ),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the model card(s) as JSON."),
) -> None:
    """Train on labelled cases (text, label) or labelled conversations (--transcripts); saves
    model + model card per task."""
    if ctx.invoked_subcommand is not None:
        return  # `casemine train emotion ...`: the subcommand does the work
    cfg = get_config(config)
    if transcripts is not None:
        _train_conversations(cfg, labels, transcripts, json_out, extra_labels)
        return
    if extra_labels is not None:
        fail("--extra-labels needs --transcripts DIR (it informs the models trained on labelled conversations)", code=2)
    from pipeline.analysis.classify import train

    try:
        _, card = train(cfg, labels)
    except ConfigError as e:
        fail(str(e), code=2)
    except (*_errors(), ValueError) as e:
        msg = str(e)
        if "conversation_id" in msg or "no column(s) ['text']" in msg:
            msg += "; a file of conversation_id + issue_type/request_kind/outcome needs --transcripts DIR"
        fail(msg)
    if json_out:
        emit_json(card)
        return
    t = Table(title="cross-validated macro-F1 per variant")
    t.add_column("variant")
    t.add_column("macro-F1", justify="right")
    t.add_column("accuracy", justify="right")
    for c in card["cv"]["candidates"]:
        mark = " *" if c["name"] == card["chosen_variant"]["name"] else ""
        t.add_row(c["name"] + mark, f"{c['macro_f1']:.3f}", f"{c['accuracy']:.3f}")
    console.print(t)
    console.print(
        f"trained {card['model_id']} on {card['training_data']['rows']} rows; saved to "
        f"{cfg.resolve(cfg.classify.model_dir)}"
    )


def _train_conversations(
    cfg: Config, labels: Path | None, transcripts: Path, json_out: bool, extra_labels: Path | None = None
) -> None:
    from pipeline.analysis.classify.store import task_dir
    from pipeline.orchestrate.training import train_from_conversations

    if labels is None:
        fail("--transcripts needs --labels FILE (conversation_id + any of issue_type, request_kind, outcome)", code=2)
    try:
        fits = train_from_conversations(cfg, labels, transcripts, extra_labels=extra_labels)
    except ConfigError as e:
        fail(str(e), code=2)
    except (*_errors(), ValueError) as e:
        fail(str(e))
    if json_out:
        emit_json({"models": [f.card for f in fits]})
        return
    t = Table(title="cross-validated per task (mean ± sd across folds)")
    for col in ("task", "conversations", "macro-F1", "accuracy", "model"):
        t.add_column(col)
    for f in fits:
        cv = f.card["cv"]
        t.add_row(
            f.task,
            str(f.card["training_data"]["conversations"]),
            f"{cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['sd']:.3f}",
            f"{cv['accuracy']['mean']:.3f} ± {cv['accuracy']['sd']:.3f}",
            f.card["model_id"],
        )
    console.print(t)
    for f in fits:
        console.print(f"saved {f.task} to {task_dir(cfg, f.task)}")


# -- classify ----------------------------------------------------------------------------------


def _is_transcript_jsonl(path: Path) -> bool:
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and "turns" in obj and "text" not in obj
    return False


def read_text_input(path: Path) -> pd.DataFrame:
    """Texts to classify: JSONL objects with `text`, or a CSV with a `text` column. Other fields
    (id, repeat_contact, emotion_score, ...) are kept and passed on."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = read_jsonl_objects(path, ("text",))
        bad = next((n for n, r in enumerate(rows, 1) if not isinstance(r["text"], str)), None)
        if bad is not None:
            raise ValueError(f"{path}: object {bad} has a 'text' that is not a string")
        df = pd.DataFrame(rows)
    elif suffix == ".csv":
        try:
            df = pd.read_csv(path, encoding="utf-8-sig", dtype={"text": str}, keep_default_na=False)
        except pd.errors.EmptyDataError:
            df = pd.DataFrame()
        if len(df.columns) and "text" not in df.columns:
            raise ValueError(f"{path} has no 'text' column (found: {list(df.columns)})")
    else:
        raise ValueError(
            f"{path}: unsupported input {suffix or '(no suffix)'}; use JSONL with a 'text' field "
            "per line, a CSV with a 'text' column, or transcripts (JSONL with 'turns', ASR JSON)"
        )
    if df.empty:
        raise ValueError(f"{path} holds no texts to classify")
    return df.reset_index(drop=True)


def classify_transcripts(path: Path, cfg: Config) -> pd.DataFrame:
    """Transcripts through the nightly run's own steps (ingest, then every batch step through
    classify: the emotion step too, whose lowest sentiment the request kind reads)."""
    from pipeline.ingest import read_file
    from pipeline.orchestrate.steps import process_conversations

    res = read_file(path, cfg.ingest)
    for q in res.quarantined[:5]:
        console.print(f"[yellow]skipped[/] {q.source_file}:{q.line or ''} {q.reason}: {q.detail}", highlight=False)
    if not res.conversations:
        raise ValueError(f"{path}: no readable conversations ({len(res.quarantined)} quarantined)")
    return process_conversations(res.conversations, cfg, "classify").cases


def _result_records(df: pd.DataFrame, id_col: str | None, text_col: str) -> list[dict[str, Any]]:
    out = []
    for r in df.to_dict("records"):
        rec: dict[str, Any] = {}
        if id_col and id_col in r:
            rec[id_col] = r[id_col]
        rec["text"] = r.get(text_col, "")
        for k in RESULT_FIELDS:
            v: Any = r.get(k)
            if k == "evidence":
                v = json.loads(v)
            elif hasattr(v, "item"):
                v = v.item()
            rec[k] = v
        out.append(rec)
    return out


@app.command("classify")
def classify_cmd(
    file: Path = typer.Argument(..., help='JSONL ({"text": ...} per line), CSV with a text column, or transcripts.'),
    json_out: bool = typer.Option(False, "--json", help="One JSON line per input on stdout."),
    config: Path | None = ConfigOption,
) -> None:
    """Classify texts or transcripts: issue type, urgency, request kind, review flag, evidence."""
    cfg = get_config(config)
    if not file.is_file():
        fail(f"{file} does not exist or is not a file")
    from pipeline.analysis.classify import classify_texts, get_model_status

    try:
        status = get_model_status(cfg)
        if status:
            console.print(f"[yellow]{status}[/]", highlight=False)
        if file.suffix.lower() in (".json",) or (file.suffix.lower() == ".jsonl" and _is_transcript_jsonl(file)):
            df = classify_transcripts(file, cfg)
            id_col: str | None = "case_id"
            text_col = "problem"
        else:
            inp = read_text_input(file)
            extra = inp.drop(columns=["text"])
            df = classify_texts(inp["text"].astype(str).tolist(), cfg, extra=extra)
            df["text"] = inp["text"].tolist()
            id_col = next((c for c in ("id", "case_id", "conversation_id") if c in inp.columns), None)
            text_col = "text"
    except ConfigError as e:
        fail(str(e), code=2)
    except (*_errors(), ValueError, UnicodeDecodeError) as e:
        fail(str(e))
    records = _result_records(df, id_col, text_col)
    if json_out:
        for rec in records:
            emit_json(rec)
        return
    t = Table(title=f"{len(records)} classified ({records[0]['classifier'] if records else ''})")
    for col in ("#", "text", "issue_type", "conf", "urgency", "kind", "review"):
        t.add_column(col)
    for i, rec in enumerate(records, 1):
        text = str(rec["text"])
        t.add_row(
            str(rec.get(id_col) if id_col else i),
            text[:40] + ("…" if len(text) > 40 else ""),
            rec["issue_type"],
            f"{rec['issue_type_confidence']:.2f}",
            rec["urgency"],
            rec["request_kind"],
            "待人工" if rec["needs_review"] else "",
        )
    Console().print(t)  # without --json the table is the output: stdout


# -- review queue ------------------------------------------------------------------------------


@app.command("review-queue")
def review_queue_cmd(
    n: int = typer.Option(50, "--n", "-n", min=1, help="How many of the least certain cases."),
    out_file: Path | None = typer.Option(
        None, "--out", help="CSV to write (default: <paths.out>/review/review_queue.csv)."
    ),
    data: Path | None = typer.Option(None, "--data", help="Output root holding processed/cases/ (default: paths.out)."),
    config: Path | None = ConfigOption,
) -> None:
    """Export the least certain cases as a CSV with empty issue_type / request_kind / outcome
    columns to fill in; `casemine train --labels FILE --transcripts DIR` reads it back."""
    cfg = get_config(config)
    from pipeline.analysis.classify.review import review_queue

    root = data or cfg.resolve(cfg.paths.out)
    try:
        path, queue = review_queue(cfg, root, n, out_file)
    except ConfigError as e:
        fail(str(e), code=2)
    except (*_errors(), ValueError) as e:
        fail(str(e))
    console.print(
        f"wrote {len(queue)} cases to {path}; fill any of the issue_type, request_kind and outcome "
        "columns (empty cells are skipped), then run `casemine train --labels FILE --transcripts DIR` "
        "with the transcripts of that run (or `casemine train --labels FILE` for issue types from the text)"
    )


# -- eval --------------------------------------------------------------------------------------


@eval_app.command("classify")
def eval_classify_cmd(
    labels: Path = typer.Option(..., "--labels", "-l", help="Labelled CSV/JSONL/Parquet (text, label)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report folder (default: <paths.out>/reports)."),
    nested: bool = typer.Option(False, "--nested", help="Also nested CV (unbiased, ~6x slower)."),
    transcripts: Path | None = typer.Option(
        None,
        "--transcripts",
        "-t",
        help="Labels are conversation_id + issue_type/request_kind/outcome "
        "for these transcripts: report the cold start (all, two halves).",
    ),
    trained: bool = typer.Option(
        False,
        "--trained",
        help="With --transcripts: also cross-validate the models `casemine train --transcripts` would train.",
    ),
    extra_labels: Path | None = typer.Option(
        None,
        "--extra-labels",
        help="With --trained: the text,label issue types `casemine train --extra-labels` would read "
        "(default: classify.extra_labels).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    config: Path | None = ConfigOption,
) -> None:
    """Cross-validated per-class precision/recall/F1, macro-F1 and confusion matrix, for the
    trained model and for the rules alone on the same data; with --transcripts, the cold start on
    labelled conversations."""
    cfg = get_config(config)
    if transcripts is not None:
        _eval_conversations(cfg, labels, transcripts, trained, json_out, extra_labels)
        return
    if extra_labels is not None:
        fail("--extra-labels needs --transcripts DIR --trained", code=2)
    from pipeline.evaluate.classification import evaluate_classification, summary_line, write_reports

    try:
        report = evaluate_classification(cfg, labels, nested=nested)
    except ConfigError as e:
        fail(str(e), code=2)
    except (*_errors(), ValueError) as e:
        fail(str(e))
    j, md = write_reports(report, out or cfg.resolve(cfg.paths.out) / "reports")
    report["reports"] = {"json": str(j), "markdown": str(md)}
    if json_out:
        emit_json(report)
    else:
        console.print(summary_line(report))
        console.print(f"reports: {j} {md}")


def _eval_conversations(
    cfg: Config, labels: Path, transcripts: Path, trained: bool, json_out: bool, extra_labels: Path | None = None
) -> None:
    from pipeline.orchestrate.training import evaluate_conversations

    try:
        report = evaluate_conversations(cfg, labels, transcripts, trained_cv=trained, extra_labels=extra_labels)
    except ConfigError as e:
        fail(str(e), code=2)
    except (*_errors(), ValueError) as e:
        fail(str(e))
    if json_out:
        emit_json(report)
        return
    for task, res in report["cold_start"].items():
        parts = [
            f"{k} macro-F1 {res[k]['macro_f1']:.3f} acc {res[k]['accuracy']:.3f} (n={res[k]['n']})"
            for k in ("all", "half_a", "half_b")
        ]
        g = res["majority_guess"]
        console.print(
            f"cold start {task}: " + "; ".join(parts) + f"; always {g['label']}: acc {g['accuracy']:.3f}",
            highlight=False,
        )
    for task, cv in report.get("trained_cv", {}).items():
        console.print(
            f"trained {task}: macro-F1 {cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['sd']:.3f}, "
            f"accuracy {cv['accuracy']['mean']:.3f} ± {cv['accuracy']['sd']:.3f} ({cv['folds']} folds)",
            highlight=False,
        )
