"""Case-field quality on labelled chats (`casemine eval cases`).

Why the transcripts go through the nightly steps (ingest, normalise, mask, cases, classify) rather
than a shortcut: the figure must describe what analysts read in the case table. Why every figure
sits beside a baseline computed in the same run: an extractor that cannot beat "always resolved"
or "paste every customer turn" is not worth its rules, and a baseline from another run (other
masking, other normalisation) would not be comparable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.cases.extract import lcs_length
from pipeline.config import Config

LABEL_FIELDS = ("issue_type", "request_kind", "outcome")
SUMMARY_FIELDS = ("user_summary", "summary")
_SUMMARY_SENT_RE = re.compile(r"[^。！？!?]+[。！？!?]?")


class LabelFileError(ValueError):
    """A labels or summaries file the evaluation cannot use (the CLI exits 2 with the message)."""


# -- ROUGE-L ---------------------------------------------------------------------------------------


def rouge_chars(text: str) -> str:
    """The characters ROUGE compares: punctuation, symbols and spaces carry no content here, and
    summaries punctuate differently from chats."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PZSC")


def rouge_l_f(candidate: str, reference: str) -> float:
    """Character-level ROUGE-L F1 (beta 1), punctuation ignored."""
    c, r = rouge_chars(candidate), rouge_chars(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def problem_reference(user_summary: str) -> str:
    """The customer-problem summary without the 用户 that opens its sentences: the summary's
    narrator, never something the customer said. (This is how the tracker's figures were
    measured; the handling reference keeps its 客服, as they were.)"""
    return "".join(
        s.strip()[2:] if s.strip().startswith("用户") else s for s in _SUMMARY_SENT_RE.findall(user_summary or "")
    )


def handling_reference(summary: str) -> str:
    """The handling part of a CSDS-style summary: its sentences that start with 客服."""
    return "".join(s for s in _SUMMARY_SENT_RE.findall(summary or "") if s.strip().startswith("客服"))


def naive_cuts(turns: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The cuts an extractor must beat: everything the customer said, their first three turns,
    everything the agent said."""
    cust = [t["text"] for t in turns if t["speaker"] == "customer"]
    agent = [t["text"] for t in turns if t["speaker"] == "agent"]
    return {
        "all_customer_turns": " ".join(cust),
        "first_three_customer_turns": " ".join(cust[:3]),
        "all_agent_turns": " ".join(agent),
    }


# -- inputs ----------------------------------------------------------------------------------------


def _read_rows(path: Path, kind: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise LabelFileError(f"{kind} file {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelFileError(f"{kind} file {path} cannot be read as UTF-8 ({type(e).__name__})") from None
    if suffix == ".csv":
        return [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]
    if suffix not in (".jsonl", ".json"):
        raise LabelFileError(f"{kind} file {path}: use JSONL (one object per line) or CSV, not {suffix or 'no suffix'}")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LabelFileError(f"{kind} file {path} line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise LabelFileError(f"{kind} file {path} line {n} is not a JSON object")
        rows.append(obj)
    return rows


def _keyed(rows: list[dict[str, Any]], fields: Sequence[str], path: Path, kind: str) -> dict[str, dict[str, str]]:
    if not rows:
        raise LabelFileError(f"{kind} file {path} holds no rows")
    if not any("conversation_id" in r for r in rows):
        raise LabelFileError(f"{kind} file {path} has no conversation_id field")
    present = [f for f in fields if any(f in r for r in rows)]
    if not present:
        raise LabelFileError(f"{kind} file {path} has none of the fields {', '.join(fields)}")
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        cid = r.get("conversation_id")
        if cid in (None, ""):
            continue
        out[str(cid)] = {f: str(r[f]).strip() for f in present if r.get(f) not in (None, "")}
    return out


def load_labels(path: Path) -> dict[str, dict[str, str]]:
    """conversation_id -> {issue_type, request_kind, outcome} (whichever the file has)."""
    return _keyed(_read_rows(Path(path), "labels"), LABEL_FIELDS, Path(path), "labels")


def load_summaries(path: Path) -> dict[str, dict[str, str]]:
    """conversation_id -> {user_summary, summary}."""
    return _keyed(_read_rows(Path(path), "summaries"), SUMMARY_FIELDS, Path(path), "summaries")


def mine_cases(cfg: Config, transcripts: Path) -> tuple[Any, dict[str, int]]:
    """The case table a nightly run would store for these transcripts (every batch step, through
    classify); nothing is written. Returns (cases, counts of read / quarantined / duplicate
    conversations)."""
    from pipeline.ingest import read_all
    from pipeline.orchestrate.steps import process_conversations

    transcripts = Path(transcripts)
    read, quarantined = read_all(transcripts, cfg.ingest)
    convs, seen = [], set()
    counts: Counter = Counter(quarantined=quarantined)
    for c in read:
        if c.conversation_id in seen:  # a re-delivery is a duplicate in a run too
            counts["duplicates"] += 1
            continue
        seen.add(c.conversation_id)
        convs.append(c)
    counts["conversations"] = len(convs)
    if not convs:
        raise ValueError(f"{transcripts}: no readable conversations ({counts['quarantined']} quarantined)")
    batch = process_conversations(convs, cfg, "classify")
    counts["rejected"] = len(batch.rejected)
    return batch.cases, dict(counts)


# -- scoring ---------------------------------------------------------------------------------------


def _majority(values: Iterable[str]) -> str:
    # Ties go to the alphabetically first class, so the baseline does not depend on row order.
    c = Counter(values)
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def score_labels(pred: dict[str, dict[str, str]], gold: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Per field: the pipeline's metrics and the majority-class baseline's, over the labelled
    conversations the pipeline produced a case for."""
    from pipeline.evaluate.classification import classification_metrics

    out: dict[str, Any] = {}
    for field in LABEL_FIELDS:
        ids = [cid for cid, g in gold.items() if field in g and cid in pred]
        if not ids:
            continue
        y_true = [gold[c][field] for c in ids]
        y_pred = [pred[c][field] for c in ids]
        order = sorted(set(y_true) | set(y_pred))
        majority = _majority(y_true)
        out[field] = {
            "n": len(ids),
            "pipeline": classification_metrics(y_true, y_pred, order),
            "baseline": {"name": f"always {majority}", **classification_metrics(y_true, [majority] * len(ids), order)},
        }
    return out


def score_summaries(mined: dict[str, dict[str, Any]], refs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Mean ROUGE-L F of problem vs user_summary and handling vs the 客服 sentences of summary,
    with the naive cuts of the same (normalised, masked) turns beside them."""
    scores: dict[str, dict[str, list[float]]] = {"problem": {}, "handling": {}}
    for cid, ref in refs.items():
        m = mined.get(cid)
        if m is None:
            continue
        cuts = naive_cuts(m["turns"])
        if ref.get("user_summary"):
            for name, text in (
                ("mined", m["problem"]),
                ("all_customer_turns", cuts["all_customer_turns"]),
                ("first_three_customer_turns", cuts["first_three_customer_turns"]),
            ):
                scores["problem"].setdefault(name, []).append(rouge_l_f(text, problem_reference(ref["user_summary"])))
        hand = handling_reference(ref.get("summary", ""))
        if hand:
            for name, text in (("mined", m["handling"]), ("all_agent_turns", cuts["all_agent_turns"])):
                scores["handling"].setdefault(name, []).append(rouge_l_f(text, hand))
    return {
        field: {"n": len(v.get("mined", [])), "rouge_l_f": {k: round(sum(x) / len(x), 4) for k, x in v.items()}}
        for field, v in scores.items()
        if v
    }


def first_segment_labels(cases: Any) -> dict[str, dict[str, str]]:
    """conversation_id -> the labels of its first case (segment 0)."""
    first = cases.sort_values("segment").drop_duplicates("conversation_id")
    return {str(r["conversation_id"]): {f: str(r[f]) for f in LABEL_FIELDS if f in r} for r in first.to_dict("records")}


def whole_conversation_text(cases: Any) -> dict[str, dict[str, Any]]:
    """conversation_id -> problem and handling of all its cases joined in order, and all its turns:
    a summary covers the whole chat, so a chat split into two cases is compared whole."""
    out: dict[str, dict[str, Any]] = {}
    for r in cases.sort_values(["conversation_id", "segment"]).to_dict("records"):
        m = out.setdefault(str(r["conversation_id"]), {"problem": [], "handling": [], "turns": []})
        m["problem"].append(str(r["problem"] or ""))
        m["handling"].append(str(r["handling"] or ""))
        m["turns"].extend({"speaker": t["speaker"], "text": t["text"]} for t in r["turns"])
    return {
        cid: {
            "problem": "，".join(p for p in m["problem"] if p),
            "handling": "，".join(h for h in m["handling"] if h),
            "turns": m["turns"],
        }
        for cid, m in out.items()
    }


def half_of(conversation_id: str) -> str:
    """ "a" or "b": a fixed split by a hash of the id, so a rule chosen on one half can be checked
    on the other by anyone, with no seed to pass around."""
    return "a" if hashlib.sha1(conversation_id.encode("utf-8")).digest()[0] % 2 == 0 else "b"


def evaluate_cases(
    cfg: Config, transcripts: Path, labels: Path | None = None, summaries: Path | None = None, half: str | None = None
) -> dict[str, Any]:
    """The report `casemine eval cases` prints. Label files are checked before any mining."""
    gold = load_labels(labels) if labels else None
    refs = load_summaries(summaries) if summaries else None
    if half:
        gold = {k: v for k, v in gold.items() if half_of(k) == half} if gold is not None else None
        refs = {k: v for k, v in refs.items() if half_of(k) == half} if refs is not None else None
    cases, counts = mine_cases(cfg, transcripts)
    report: dict[str, Any] = {
        "transcripts": str(transcripts),
        "half": half,
        "counts": counts,
        "cases": int(len(cases)),
        "split_conversations": int((cases["segment"] > 0).groupby(cases["conversation_id"]).any().sum()),
        "note": "labels are compared with each conversation's first case (segment 0); "
        "summaries with all its cases' problem/handling joined in order",
    }
    if gold is not None:
        pred = first_segment_labels(cases)
        report["labels"] = {
            "file": str(labels),
            "rows": len(gold),
            "matched": sum(c in pred for c in gold),
            "fields": score_labels(pred, gold),
        }
    if refs is not None:
        mined = whole_conversation_text(cases)
        report["summaries"] = {
            "file": str(summaries),
            "rows": len(refs),
            "matched": sum(c in mined for c in refs),
            "fields": score_summaries(mined, refs),
        }
    return report


# -- presentation ----------------------------------------------------------------------------------


def _label_lines(field: str, r: dict[str, Any]) -> list[str]:
    p, b = r["pipeline"], r["baseline"]
    lines = [
        f"{field} (n={r['n']}): pipeline accuracy {p['accuracy']:.3f} macro-F1 {p['macro_f1']:.3f} | "
        f"baseline {b['name']}: accuracy {b['accuracy']:.3f} macro-F1 {b['macro_f1']:.3f}",
        f"  {'class':<16}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}",
    ]
    for c, m in p["per_class"].items():
        lines.append(f"  {c:<16}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>8.3f}{m['support']:>9}")
    labs = p["confusion"]["labels"]
    lines.append("  confusion (rows true, columns predicted): " + " | ".join(labs))
    for lab, row in zip(labs, p["confusion"]["matrix"]):
        lines.append(f"    {lab:<16}" + " ".join(f"{v:>5}" for v in row))
    return lines


def to_text(report: dict[str, Any]) -> str:
    """The human-readable report."""
    c = report["counts"]
    lines = [
        f"{c['conversations']} conversations -> {report['cases']} cases "
        f"({report['split_conversations']} conversations split into several; {c.get('quarantined', 0)} quarantined, "
        f"{c.get('duplicates', 0)} duplicates)"
        + (f"; half {report['half']} of the labelled ones" if report.get("half") else ""),
        report["note"],
    ]
    if "labels" in report:
        lab = report["labels"]
        lines.append(f"labels: {lab['matched']} of {lab['rows']} labelled conversations mined")
        for field, r in lab["fields"].items():
            lines += _label_lines(field, r)
    if "summaries" in report:
        s = report["summaries"]
        lines.append(
            f"summaries: {s['matched']} of {s['rows']} conversations mined; char ROUGE-L F, punctuation ignored"
        )
        for field, r in s["fields"].items():
            base = ", ".join(f"{k} {v:.3f}" for k, v in r["rouge_l_f"].items() if k != "mined")
            lines.append(f"  {field:<9} mined {r['rouge_l_f'].get('mined', 0):.3f} (n={r['n']}) | baselines: {base}")
    return "\n".join(lines)
