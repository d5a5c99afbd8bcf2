"""`casemine emotion FILE`, `casemine train emotion --labels PATH`, `casemine eval emotion`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline.cli import app, eval_app, train_app
from pipeline.cli.common import ConfigOption, console, emit_json, fail, get_config, read_jsonl_objects
from pipeline.config import ConfigError


def _emotion_errors():
    from pipeline.analysis.emotion import EmotionDataError

    return (EmotionDataError, ConfigError)


# -- casemine emotion ---------------------------------------------------------------------------


def _records(path: Path) -> list[dict[str, Any]]:
    return read_jsonl_objects(path, ("text", "turns"))


@app.command("emotion")
def emotion_cmd(
    file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help='JSONL: {"text": ...} lines or transcripts with `turns`.'
    ),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="One JSON line per input on stdout."),
) -> None:
    """Customer emotion per text, or per conversation with its emotion curve."""
    cfg = get_config(config)
    from pipeline.analysis.emotion import EmotionAnalyzer, analyze_texts

    try:
        analyzer = EmotionAnalyzer.from_config(cfg)
    except ConfigError as e:
        fail(str(e), code=2)
    recs = _records(file)
    results: list[dict[str, Any]] = []
    texts = [r for r in recs if "turns" not in r]
    if texts:
        for r, em in zip(texts, analyze_texts([str(r.get("text") or "") for r in texts], cfg, analyzer)):
            results.append({**({"id": r["id"]} if "id" in r else {}), **em.as_dict()})
    if len(texts) < len(recs):
        from pipeline.ingest import read_file
        from pipeline.orchestrate.steps import Components, run_batch, through

        res = read_file(file, cfg.ingest)
        convs = getattr(res, "conversations", None) or []
        if not convs:
            fail(f"{file}: no transcript could be read (see `casemine run` quarantine for why)")
        with Components.from_config(cfg, analyzer=analyzer) as comp:
            cases = run_batch(convs, comp, through("emotion")).cases
        for row in cases.to_dict("records"):
            detail = row["emotion_turn_detail"]
            results.append(
                {
                    "conversation_id": row["conversation_id"],
                    "case_id": row["case_id"],
                    "sentiment": row["emotion_end"],
                    "emotion": row["emotion"],
                    "intensity": max((d["intensity"] for d in detail), default=0.0),
                    "evidence": sorted({e for d in detail for e in d["evidence"]}),
                    "curve": row["emotion_curve"],
                    "curve_turns": row["emotion_curve_turns"],
                    "start": row["emotion_start"],
                    "end": row["emotion_end"],
                    "min": row["emotion_min"],
                    "min_turn": row["emotion_min_turn"],
                    "delta": row["emotion_delta"],
                    "trajectory": row["emotion_trajectory"],
                    "turning_points": row["turning_points"],
                    "turns": detail,
                }
            )
    for r in results:
        if json_out:
            emit_json(r)
        else:
            head = r.get("conversation_id") or r.get("id") or ""
            curve = f" curve={r['curve']} {r['trajectory']}" if "curve" in r else ""
            console.print(
                f"{head} {r['emotion']} sentiment={r['sentiment']:+.2f} intensity={r['intensity']:.2f}{curve} "
                f"evidence={'、'.join(r['evidence'][:6])}",
                highlight=False,
                markup=False,
            )


# -- casemine train emotion ---------------------------------------------------------------------


@train_app.command("emotion")
def train_emotion_cmd(
    labels: Path = typer.Option(
        ...,
        "--labels",
        "-l",
        help="CSV/JSONL/Parquet (or folder): a text column (text/review/content) and a 1/0 polarity or emotion label.",
    ),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the model card as JSON."),
) -> None:
    """Train the emotion model (scikit-learn) that joins or replaces the default rules."""
    cfg = get_config(config)
    from pipeline.analysis.emotion import train_emotion

    try:
        _, card = train_emotion(cfg, labels)
    except _emotion_errors() as e:
        fail(str(e))
    if json_out:
        emit_json(card)
        return
    console.print(
        f"trained {card['model_id']} ({card['kind']}) on {card['training_data']['rows']} texts; "
        f"cv {card['cv']}; saved to {cfg.resolve(cfg.emotion.model_dir)}",
        highlight=False,
    )


# -- casemine eval emotion ----------------------------------------------------------------------


@eval_app.command("emotion")
def eval_emotion_cmd(
    reviews: Path = typer.Option(
        Path("../shared/data/reviews"), "--reviews", help="Folder with waimai_10k.csv and online_shopping_10_cats.csv."
    ),
    per_corpus: int = typer.Option(4000, "--per-corpus", help="Texts sampled per corpus (0 = all)."),
    folds: int = typer.Option(5, "--folds"),
    domain_shift: bool = typer.Option(
        False,
        "--domain-shift",
        help="Instead: AUC on domains the model never saw "
        "(train on one corpus, test on the other; leave one shopping category out), "
        "the trained model's recipe against a plain char n-gram TF-IDF logistic "
        "regression in the same run.",
    ),
    per_domain: int = typer.Option(
        1500,
        "--per-domain",
        help="With --domain-shift: texts sampled per domain "
        "(the food-delivery corpus and each shopping category; 0 = all).",
    ),
    config: Path | None = ConfigOption,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Cross-validated AUC/accuracy: default rules, trained model, cnsenti and snownlp on the same folds."""
    cfg = get_config(config)
    from pipeline.evaluate.emotion import CORPORA, evaluate_sentiment

    missing = [c for c in CORPORA if not (reviews / c).is_file()]
    if missing:
        fail(f"{reviews} lacks {', '.join(missing)}; pass --reviews DIR")
    if domain_shift:
        _eval_domain_shift(cfg, reviews, per_domain, json_out)
        return
    res = evaluate_sentiment(cfg, reviews, per_corpus or None, folds)
    if json_out:
        emit_json(res)
        return
    console.print(res["data"], highlight=False)
    for m, r in res["results"].items():
        console.print(
            f"{m:16s} AUC {r['auc']:.3f}±{r['auc_sd']:.3f}  acc {r['accuracy']:.3f}±{r['accuracy_sd']:.3f}",
            highlight=False,
        )


def _eval_domain_shift(cfg, reviews: Path, per_domain: int, json_out: bool) -> None:
    from pipeline.analysis.emotion import evaluate_domain_shift

    res = evaluate_domain_shift(cfg, reviews, per_domain)
    if json_out:
        emit_json(res)
        return
    for r in res["splits"]:
        aucs = "  ".join(f"{m} {a:.3f}" for m, a in r["auc"].items())
        console.print(f"{r['split']:40s} {aucs}", highlight=False)
    for group, s in res["summary"].items():
        d = s.get("trained_minus_baseline", {})
        console.print(
            f"{group}: trained {s['trained']:.3f} vs baseline {s['baseline']:.3f} (mean difference "
            f"{d.get('mean', 0):+.3f}, trained >= baseline in {d.get('wins')} of {d.get('of')})",
            highlight=False,
        )
