"""Training, saving and loading the issue-type model, with its model card.

Why a model card next to the model: a nightly job months later must be able to say which data,
which taxonomy and which variant produced today's labels, and refuse a model trained for a
different set of types. The card is written after the model and names the model's id; the
loader checks the two agree, so a crash between the two writes cannot pair a new model with an
old card.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.metrics import classification_report

from pipeline.analysis.classify.data import LabeledData, load_labeled
from pipeline.analysis.classify.model import DEFAULT_CANDIDATES, EMBEDDING_CANDIDATES, TextClassifier, select_model
from pipeline.analysis.classify.taxonomy import Taxonomy, load_taxonomy
from pipeline.analysis.classify.text import CachedTokenizer, get_backend
from pipeline.config import Config
from pipeline.io import atomic_write_bytes, atomic_write_json, sha256_file

MODEL_FILE = "model.joblib"
CARD_FILE = "model_card.json"


class ModelMismatchError(RuntimeError):
    """The saved model does not fit the configured taxonomy (or is damaged); retrain it."""


def _embedder(cfg: Config) -> Any | None:
    """`Embedder(cfg).encode_passages` when classify.use_embeddings is on, else None."""
    if not cfg.classify.use_embeddings:
        return None
    from pipeline.embed import Embedder

    emb = Embedder(cfg)
    return lambda texts: np.asarray(emb.encode_passages(texts))


def config_hash(cfg: Config) -> str:
    blob = cfg.classify.model_dump_json().encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def train(cfg: Config, labels_path: Path | None = None, *, save: bool = True) -> tuple[TextClassifier, dict[str, Any]]:
    """Train on the labelled data (default: classify.labeled_dir), choose the variant by
    cross-validated macro-F1, save model + card under classify.model_dir."""
    taxonomy = load_taxonomy(cfg)
    path = cfg.resolve(labels_path) if labels_path is not None else cfg.resolve(cfg.classify.labeled_dir)
    data = load_labeled(Path(path), taxonomy)
    prepare, cut, tok_name = get_backend(cfg)
    texts = [prepare(t) for t in data.frame["text"]]
    y = data.frame["label"].tolist()
    if len(set(y)) < 2:
        raise ValueError(f"the labelled data has only one label ({y[0]!r}); label at least two types to train")
    embed = _embedder(cfg)
    candidates = (*DEFAULT_CANDIDATES, *(EMBEDDING_CANDIDATES if embed is not None else ()))
    tokenizer = CachedTokenizer(cut, tok_name)
    model, results, splits, skipped = select_model(
        texts,
        y,
        tokenizer=tokenizer,
        taxonomy=taxonomy,
        folds=cfg.classify.cv_folds,
        candidates=candidates,
        embed=embed,
    )
    card = build_card(cfg, taxonomy, data, Path(path), model, results, len(splits), skipped, tok_name)
    if save:
        save_model(cfg, model, card)
    return model, card


def build_card(
    cfg: Config,
    taxonomy: Taxonomy,
    data: LabeledData,
    path: Path,
    model: TextClassifier,
    results: list,
    n_folds: int,
    skipped: list[dict[str, str]],
    tok_name: str,
) -> dict[str, Any]:
    best = max(results, key=lambda r: (round(r.macro_f1, 4), -results.index(r)))
    y = data.frame["label"].tolist()
    now = datetime.now(UTC)
    tax_path = cfg.resolve(cfg.classify.taxonomy)
    model_id = f"tfidf-{best.name.replace('/', '-')}-{now:%Y%m%dT%H%M%S}-{data.sha256[:8]}"
    per_class = classification_report(y, best.y_pred, labels=sorted(set(y)), output_dict=True, zero_division=0)
    return {
        "model_id": model_id,
        "created_at": now.isoformat(timespec="seconds"),
        "task": "issue_type",
        "chosen_variant": {
            "name": best.name,
            "params": best.params,
            "calibration": {
                "method": "temperature scaling on out-of-fold probabilities",
                "temperature": getattr(model, "temperature_", 1.0),
            },
        },
        "classes": [str(c) for c in model.classes_],
        "training_data": {
            "path": str(path),
            "sha256": data.sha256,
            "rows": int(len(data.frame)),
            "files": data.files,
            "skipped_rows": data.skipped,
            "label_counts": {k: int(v) for k, v in data.frame["label"].value_counts().items()},
        },
        "cv": {
            "folds": n_folds,
            "stratified": True,
            "seed": 0,
            "metric": "macro-F1 over the labels present in the training data",
            "candidates": [
                {"name": r.name, "params": r.params, "macro_f1": round(r.macro_f1, 4), "accuracy": round(r.accuracy, 4)}
                for r in results
            ],
            "skipped_candidates": skipped,
            "chosen": {
                "name": best.name,
                "macro_f1": round(best.macro_f1, 4),
                "accuracy": round(best.accuracy, 4),
                "per_class": {
                    k: {m: round(float(v), 4) for m, v in d.items()}
                    for k, d in per_class.items()
                    if isinstance(d, dict)
                },
            },
            "note": "the chosen variant's CV score is optimistic (it won a selection over the candidates); "
            "`casemine eval classify --nested` gives an unbiased estimate",
        },
        "taxonomy": {
            "path": str(tax_path),
            "sha256": sha256_file(tax_path),
            "fingerprint": taxonomy.fingerprint(),
            "labels": taxonomy.labels,
        },
        "config_sha256": config_hash(cfg),
        "text_source": cfg.classify.text_source,
        "tokenizer": tok_name,
        "uses_embeddings": "emb" in best.params.get("features", ""),
        "versions": {"sklearn": sklearn.__version__, "python": platform.python_version()},
    }


def save_model(cfg: Config, model: TextClassifier, card: dict[str, Any]) -> Path:
    """Model first, card second, both atomic: the card is what makes a model visible."""
    out = cfg.resolve(cfg.classify.model_dir)
    buf = io.BytesIO()
    joblib.dump({"model_id": card["model_id"], "model": model}, buf, compress=3)
    atomic_write_bytes(out / MODEL_FILE, buf.getvalue())
    atomic_write_json(out / CARD_FILE, card)
    return out


def read_card(cfg: Config) -> dict[str, Any] | None:
    p = cfg.resolve(cfg.classify.model_dir) / CARD_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelMismatchError(f"model card {p} is not valid JSON ({e}); retrain: casemine train") from None


def check_taxonomy(card: dict[str, Any], taxonomy: Taxonomy, where: Path) -> None:
    """Refuse a model trained for another taxonomy, naming what changed."""
    saved = card.get("taxonomy", {})
    if saved.get("fingerprint") == taxonomy.fingerprint():
        return
    old, new = saved.get("labels", []), taxonomy.labels
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    what = []
    if added:
        what.append(f"types added: {added}")
    if removed:
        what.append(f"types removed: {removed}")
    if not what:
        what.append("type order, keywords or exclusions changed")
    raise ModelMismatchError(
        f"the model in {where} was trained for a different taxonomy ({'; '.join(what)}). "
        "Retrain it on the current taxonomy: casemine train"
    )


def load_model(cfg: Config) -> tuple[TextClassifier, dict[str, Any]] | None:
    """The trained model and its card, or None when none is saved (the caller uses the rules).

    Raises ModelMismatchError when a model exists but does not match the configured taxonomy or
    its files disagree: silently falling back to rules would hide that the model is stale.
    """
    where = cfg.resolve(cfg.classify.model_dir)
    card = read_card(cfg)
    if card is None:
        return None
    taxonomy = load_taxonomy(cfg)
    check_taxonomy(card, taxonomy, where)
    blob = _load_blob(where, card)
    model: TextClassifier = blob["model"]
    _, cut, tok_name = get_backend(cfg)
    model.tokenizer = CachedTokenizer(cut, tok_name)
    model.taxonomy = taxonomy
    if card.get("uses_embeddings"):
        model.embed = _embedder(cfg)
        if model.embed is None:
            raise ModelMismatchError(
                "the saved model uses sentence embeddings but pipeline.embed is unavailable or "
                "classify.use_embeddings is off; retrain: casemine train"
            )
    card = {**card, "_tokenizer_now": tok_name}
    return model, card


def cv_summary(results: list) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(r).items() if k not in ("y_pred", "confidence", "proba")} for r in results]


# -- models trained from labelled conversations (one per task) ---------------------------------


def task_dir(cfg: Config, task: str) -> Path:
    """Where a task's model lives. The issue-type model keeps the folder it always had, so a
    deployment's existing model and tooling stay where they were; the others sit beside it."""
    root = cfg.resolve(cfg.classify.model_dir)
    return root if task == "issue_type" else root / task


def task_fingerprint(task: str, taxonomy: Taxonomy, uses_prototypes: bool = False) -> str:
    """What a task's model depends on in the taxonomy: editing anything else must not force a
    retrain (a new urgency weight does not change what an outcome model learnt)."""
    from pipeline.analysis.classify.tasks import task_labels

    if task == "issue_type":
        payload: Any = [taxonomy.fingerprint()]
        if uses_prototypes:
            payload.append([[t.definition, list(t.examples)] for t in taxonomy.issue_types])
    elif task == "request_kind":
        payload = [[k.name, list(k.keywords)] for k in taxonomy.request_kinds.kinds]
    else:
        payload = task_labels(task, taxonomy)
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def save_task_model(cfg: Config, task: str, model: Any, card: dict[str, Any]) -> Path:
    """Model first, card second, both atomic (as save_model)."""
    taxonomy = load_taxonomy(cfg)
    card["task_fingerprint"] = task_fingerprint(task, taxonomy, bool(card.get("uses_prototypes")))
    out = task_dir(cfg, task)
    buf = io.BytesIO()
    joblib.dump({"model_id": card["model_id"], "model": model}, buf, compress=3)
    atomic_write_bytes(out / MODEL_FILE, buf.getvalue())
    atomic_write_json(out / CARD_FILE, card)
    return out


def load_task_model(cfg: Config, task: str) -> tuple[Any, dict[str, Any]] | None:
    """(model, card) for a task, or None when none was trained. The issue-type folder may hold a
    text model (`casemine train --labels` of text,label) or a case model; `card["input"]` says which.
    Raises ModelMismatchError when the model no longer fits the taxonomy or its files disagree."""
    if task == "issue_type":
        card = read_card(cfg)
        if card is None:
            return None
        if card.get("input") != "case":
            return load_model(cfg)
    where = task_dir(cfg, task)
    p = where / CARD_FILE
    if not p.is_file():
        return None
    try:
        card = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelMismatchError(f"model card {p} is not valid JSON ({e}); retrain: casemine train") from None
    taxonomy = load_taxonomy(cfg)
    if card.get("task_fingerprint") != task_fingerprint(task, taxonomy, bool(card.get("uses_prototypes"))):
        raise ModelMismatchError(
            f"the {task} model in {where} was trained for a different taxonomy (its types, "
            "keywords or prototypes changed). Retrain it: casemine train --labels FILE "
            "--transcripts DIR"
        )
    blob = _load_blob(where, card)
    return blob["model"], card


def _load_blob(where: Path, card: dict[str, Any]) -> dict[str, Any]:
    """The saved model next to its card; a missing file or one from another save is refused."""
    try:
        blob = joblib.load(where / MODEL_FILE)
    except FileNotFoundError:
        raise ModelMismatchError(
            f"{where / MODEL_FILE} is missing but its model card exists; retrain: casemine train"
        ) from None
    if not isinstance(blob, dict) or blob.get("model_id") != card.get("model_id"):
        raise ModelMismatchError(
            f"{where / MODEL_FILE} does not belong to {CARD_FILE} (an interrupted save?); retrain: casemine train"
        )
    return blob
