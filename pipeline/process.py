"""The pure per-batch steps: normalise -> mask -> cases -> segment, conversations in, cases out.

No I/O and no Prefect here: the flow calls `process_batch` once per batch, tests call it directly,
and `casemine classify` uses it for transcripts. The steps run in the documented order so that no
text reaches case extraction, segmentation or storage before it is masked.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Callable, Sequence, TypeVar

import pandas as pd
import pyarrow as pa

from pipeline.cases import CaseExtractor
from pipeline.config import Config
from pipeline.ingest.parse import scrub_surrogates
from pipeline.mask import Masker
from pipeline.normalize import Normalizer
from pipeline.schema import CASE_COLUMNS, CASE_SCHEMA, Conversation, QuarantineRecord, Turn
from pipeline.segment import Segmenter
from pipeline.textprep import get_masker, get_normalizer

ASR_FORMATS = ("asr_json", "asr_csv")
T = TypeVar("T")


def normalize_conversation(conv: Conversation, normalizer: Normalizer) -> Conversation:
    """Each turn's text normalised; the received text kept in `original`."""
    asr = conv.source_format in ASR_FORMATS
    turns = [replace(t, original=t.text, text=normalizer.normalize(t.text, asr=asr)) for t in conv.turns]
    # Metadata values are grouped on (region, product): 華東 from a Big5 file must count as 华东.
    metadata = {k: normalizer.normalize(v) if isinstance(v, str) else v for k, v in conv.metadata.items()}
    return replace(conv, turns=[t for t in turns if t.text], metadata=metadata)


def mask_conversation(conv: Conversation, masker: Masker) -> Conversation:
    """Mask every text the conversation carries: turns (normalised and received), metadata values,
    and identifiers derived from file names (a call file named by the caller's number)."""
    counts: Counter = Counter()
    turns: list[Turn] = []
    for t in conv.turns:
        text, c1 = masker.mask(t.text)
        # Received text equal to the normalised one needs no second pass.
        original = text if t.original == t.text else masker.mask_original(t.original or "")[0]
        counts.update(c1)
        turns.append(replace(t, text=text, original=original))
    metadata, c2 = _mask_values(conv.metadata, masker)
    counts.update(c2)
    cid = conv.conversation_id
    masked_cid, _ = masker.mask(cid)
    if masked_cid != cid:
        cid = "masked-" + hashlib.sha1(cid.encode("utf-8")).hexdigest()[:16]
    return replace(conv, turns=turns, metadata=metadata, conversation_id=cid,
                   source_file=masker.mask(conv.source_file)[0], pii_counts=dict(counts))


def _mask_values(obj: Any, masker: Masker) -> tuple[Any, Counter]:
    counts: Counter = Counter()
    if isinstance(obj, str):
        text, c = masker.mask(obj)
        return text, c
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k], c = _mask_values(v, masker)
            counts.update(c)
        return out, counts
    if isinstance(obj, list):
        items = []
        for v in obj:
            m, c = _mask_values(v, masker)
            items.append(m)
            counts.update(c)
        return items, counts
    return obj, counts


@dataclass
class BatchResult:
    cases: pd.DataFrame
    # Conversations that parsed but cannot become cases: nothing left after normalisation (only
    # emoji, control characters) is `empty_text`; a step that raised on one conversation is
    # `bad_value`. Quarantined by the caller, so counts still reconcile.
    rejected: list[QuarantineRecord] = field(default_factory=list)
    pii_counts: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    chars_segmented: int = 0


# (conversation as received, the step that failed, the exception)
Failure = tuple[Conversation, str, BaseException]
EXCERPT_CHARS = 120


def process_batch(convs: Sequence[Conversation], cfg: Config, run_id: str = "", ingest_date: date | None = None,
                  prior_orders: frozenset[str] = frozenset(), segmenter: Segmenter | None = None) -> BatchResult:
    """Conversations (as parsed) -> the case table for them, plus per-step counts and timings.

    A conversation that makes any step raise is set aside with the step and the exception's kind
    and the batch goes on without it: one record nobody anticipated must not cost the others
    (nor, since the same delivery comes back, every night after)."""
    seconds: dict[str, float] = {}
    failures: list[Failure] = []
    empty: list[Conversation] = []
    t0 = time.perf_counter()
    normalizer = get_normalizer(cfg)
    normed: list[tuple[Conversation, Conversation]] = []  # (as received, normalised)
    for c in convs:
        n = _guarded(failures, c, "normalize", normalize_conversation, c, normalizer)
        if n is not None and n.turns:
            normed.append((c, n))
        elif n is not None:
            empty.append(c)
    t1 = time.perf_counter()
    masker = get_masker(cfg)
    masked = [(c, m) for c, n in normed
              if (m := _guarded(failures, c, "mask", mask_conversation, n, masker)) is not None]
    t2 = time.perf_counter()
    extractor = CaseExtractor.from_config(cfg)
    per_conv = [(c, m, recs) for c, m in masked
                if (recs := _guarded(failures, c, "cases", extractor.extract, m, run_id, ingest_date, prior_orders)) is not None]
    seg = segmenter or Segmenter(cfg)
    t_setup = time.perf_counter()
    seg.warm()
    t3 = time.perf_counter()
    per_conv = _segment(per_conv, seg, failures)
    t4 = time.perf_counter()
    per_conv, df = _case_table(per_conv, failures)
    t5 = time.perf_counter()
    seconds.update(normalize=t1 - t0, mask=t2 - t1, cases=(t_setup - t2) + (t5 - t4), segment_setup=t3 - t_setup,
                   segment=t4 - t3)
    records = [r for _, _, recs in per_conv for r in recs]
    pii: Counter = Counter()
    for _, m, _ in per_conv:
        pii.update(m.pii_counts)
    rejected = [_empty_record(c) for c in empty] + [_failure_record(f, masker) for f in failures]
    chars = sum(len(r["problem"]) + len(r["customer_text"]) for r in records)
    return BatchResult(df, rejected, pii, seconds, chars)


def _guarded(failures: list[Failure], conv: Conversation, step: str, fn: Callable[..., T], *args: Any) -> T | None:
    """fn(*args), or None with the failure noted against `conv`."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - see process_batch
        failures.append((conv, step, e))
        return None


PerConv = list[tuple[Conversation, Conversation, list[dict[str, Any]]]]


def _segment(per_conv: PerConv, seg: Segmenter, failures: list[Failure]) -> PerConv:
    """Tokens and keywords for every record: the whole batch at once (parallel when large), and
    only if that raises, conversation by conversation in this process to find the culprits."""
    records = [r for _, _, recs in per_conv for r in recs]
    try:
        _tokenize(records, seg, seg.cut_many)
        return per_conv
    except Exception:  # noqa: BLE001 - retried one by one below, where the failure is attributed
        pass
    one_by_one = functools.partial(_cut_here, seg)  # in this process: the pool may be what broke
    kept = []
    for c, m, recs in per_conv:
        if _guarded(failures, c, "segment", _tokenize, recs, seg, one_by_one) is not None:
            kept.append((c, m, recs))
    return kept


def _cut_here(seg: Segmenter, texts: Sequence[str]) -> list[list[str]]:
    return [seg.cut(t) for t in texts]


def _tokenize(records: list[dict[str, Any]], seg: Segmenter, cut: Callable[[Sequence[str]], list[list[str]]]) -> bool:
    """Tokens of each record's problem, keywords of its customer text (set on the records)."""
    toks = cut([r["problem"] for r in records] + [r["customer_text"] for r in records])
    for r, p_tok, c_tok in zip(records, toks[:len(records)], toks[len(records):]):
        r["tokens"] = p_tok
        r["keywords"] = seg.keywords(c_tok)
    return True


def _case_table(per_conv: PerConv, failures: list[Failure]) -> tuple[PerConv, pd.DataFrame]:
    """The batch's case table, holding only records the Parquet writer will accept: a value it
    cannot encode (a lone surrogate that got this far, a number out of range) would otherwise fail
    the whole batch's write, past the point where one conversation can still be set aside. One
    conversion for the batch; one per conversation only when that fails."""
    try:
        return per_conv, _checked_frame([r for _, _, recs in per_conv for r in recs])
    except Exception:  # noqa: BLE001 - attributed per conversation below
        pass
    kept = [(c, m, recs) for c, m, recs in per_conv if _guarded(failures, c, "store", _checked_frame, recs) is not None]
    return kept, _checked_frame([r for _, _, recs in kept for r in recs])


def _checked_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The records as a DataFrame, after converting them as the writer will (which raises where
    the writer would)."""
    df = pd.DataFrame.from_records(records, columns=list(CASE_COLUMNS))
    pa.Table.from_pandas(df, schema=CASE_SCHEMA, preserve_index=False)
    return df


def _empty_record(c: Conversation) -> QuarantineRecord:
    return QuarantineRecord(c.source_file, "empty_text", "no text left after normalisation (only emoji, marks or "
                            "control characters)", c.source_line, None, scrub_surrogates(c.conversation_id),
                            scrub_surrogates(" ".join(t.text for t in c.turns)[:EXCERPT_CHARS]), c.content_hash)


def _failure_record(f: Failure, masker: Masker) -> QuarantineRecord:
    # Only the exception's kind: its message may quote the text, and details are not masked
    # everywhere they are shown.
    # Lone surrogates are replaced: the culprit may carry them, and the quarantine file is UTF-8.
    c, step, e = f
    return QuarantineRecord(scrub_surrogates(c.source_file), "bad_value",
                            f"the {step} step raised {type(e).__name__} on this conversation; "
                            "the rest of its batch was processed. Report it with the conversation id",
                            c.source_line, None, scrub_surrogates(c.conversation_id), _masked_excerpt(c, masker),
                            c.content_hash)


def _masked_excerpt(c: Conversation, masker: Masker) -> str:
    """The start of the conversation, masked here already: the masker may be the step that
    failed on this text, and the quarantine writer masks excerpts again without a guard."""
    text = scrub_surrogates(" ".join(t.text for t in c.turns)[:EXCERPT_CHARS * 2])
    try:
        return masker.mask(text)[0][:EXCERPT_CHARS]
    except Exception:  # noqa: BLE001 - better no excerpt than an unmasked one
        return ""


def guard_case_step(cases: pd.DataFrame, fn: Callable[[pd.DataFrame], pd.DataFrame],
                    step: str) -> tuple[pd.DataFrame, list[QuarantineRecord]]:
    """fn over a batch's case table (emotion, classification), isolated like the steps above: if
    it raises, it runs conversation by conversation and the ones it raises on are returned as
    `bad_value` records (their cases dropped) for the caller to add to `BatchResult.rejected`."""
    try:
        return fn(cases), []
    except Exception:  # noqa: BLE001 - retried per conversation below
        pass
    kept: list[pd.DataFrame] = []
    rejected: list[QuarantineRecord] = []
    for _, group in cases.groupby("conversation_id", sort=False):
        try:
            kept.append(fn(group.reset_index(drop=True)))
        except Exception as e:  # noqa: BLE001 - see process_batch
            rejected.append(_case_failure(group.iloc[0], step, e))
    return (pd.concat(kept, ignore_index=True) if kept else cases.iloc[:0]), rejected


def _case_failure(row: pd.Series, step: str, e: BaseException) -> QuarantineRecord:
    # The row's texts, ids and file name are masked already (cases are built after masking).
    return QuarantineRecord(str(row["source_file"]), "bad_value",
                            f"the {step} step raised {type(e).__name__} on this conversation; "
                            "the rest of its batch was processed. Report it with the conversation id",
                            None, None, str(row["conversation_id"]), str(row["customer_text"])[:EXCERPT_CHARS],
                            str(row["content_hash"]))
