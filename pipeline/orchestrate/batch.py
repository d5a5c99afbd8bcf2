"""What the batch steps do to one conversation or one batch, pure: normalise, mask, segment, build
the case table, and set aside what a step raised on. The steps' order is declared in
`pipeline.orchestrate.steps`; no I/O and no Prefect here.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import pandas as pd
import pyarrow as pa

from pipeline.ingest.parse import scrub_surrogates
from pipeline.schema import RECORD_COLUMNS, RECORD_SCHEMA, Conversation, QuarantineRecord, Turn
from pipeline.text.mask import Masker
from pipeline.text.normalize import Normalizer
from pipeline.text.segment import Segmenter

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
    return replace(
        conv,
        turns=turns,
        metadata=metadata,
        conversation_id=cid,
        source_file=masker.mask(conv.source_file)[0],
        pii_counts=dict(counts),
    )


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


def guarded(failures: list[Failure], conv: Conversation, step: str, fn: Callable[..., T], *args: Any) -> T | None:
    """fn(*args), or None with the failure noted against `conv`."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one conversation must not cost the batch
        failures.append((conv, step, e))
        return None


class HasRecords(Protocol):
    received: Conversation
    records: list[dict[str, Any]]


ItemT = TypeVar("ItemT", bound=HasRecords)


def segment_records(items: list[ItemT], seg: Segmenter, failures: list[Failure]) -> list[ItemT]:
    """Tokens and keywords for every record: the whole batch at once (parallel when large), and
    only if that raises, conversation by conversation in this process to find the culprits."""
    try:
        _tokenize([r for it in items for r in it.records], seg, seg.cut_many)
        return items
    except Exception:  # noqa: BLE001 - retried one by one below, where the failure is attributed
        pass
    one_by_one = functools.partial(_cut_here, seg)  # in this process: the pool may be what broke
    return [
        it
        for it in items
        if guarded(failures, it.received, "segment", _tokenize, it.records, seg, one_by_one) is not None
    ]


def _cut_here(seg: Segmenter, texts: Sequence[str]) -> list[list[str]]:
    return [seg.cut(t) for t in texts]


def _tokenize(records: list[dict[str, Any]], seg: Segmenter, cut: Callable[[Sequence[str]], list[list[str]]]) -> bool:
    """Tokens of each record's problem, keywords of its customer text (set on the records)."""
    toks = cut([r["problem"] for r in records] + [r["customer_text"] for r in records])
    for r, p_tok, c_tok in zip(records, toks[: len(records)], toks[len(records) :]):
        r["tokens"] = p_tok
        r["keywords"] = seg.keywords(c_tok)
    return True


def case_table(items: list[ItemT], failures: list[Failure]) -> tuple[list[ItemT], pd.DataFrame]:
    """The batch's case table, holding only records the Parquet writer will accept: a value it
    cannot encode (a lone surrogate that got this far, a number out of range) would otherwise fail
    the whole batch's write, past the point where one conversation can still be set aside. One
    conversion for the batch; one per conversation only when that fails."""
    try:
        return items, _checked_frame([r for it in items for r in it.records])
    except Exception:  # noqa: BLE001 - attributed per conversation below
        pass
    kept = [it for it in items if guarded(failures, it.received, "store", _checked_frame, it.records) is not None]
    return kept, _checked_frame([r for it in kept for r in it.records])


def _checked_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The records as a DataFrame, after converting them as the writer will (which raises where
    the writer would)."""
    # Columns a later step fills (emotion) are None until it runs: null in Arrow whatever the type.
    df = pd.DataFrame.from_records(
        [{c: r.get(c) for c in RECORD_COLUMNS} for r in records], columns=list(RECORD_COLUMNS)
    )
    pa.Table.from_pandas(df, schema=RECORD_SCHEMA, preserve_index=False)
    return df


def empty_record(c: Conversation) -> QuarantineRecord:
    return QuarantineRecord(
        c.source_file,
        "empty_text",
        "no text left after normalisation (only emoji, marks or control characters)",
        c.source_line,
        None,
        scrub_surrogates(c.conversation_id),
        scrub_surrogates(" ".join(t.text for t in c.turns)[:EXCERPT_CHARS]),
        c.content_hash,
    )


def failure_record(f: Failure, masker: Masker) -> QuarantineRecord:
    # Only the exception's kind: its message may quote the text, and details are not masked
    # everywhere they are shown.
    # Lone surrogates are replaced: the culprit may carry them, and the quarantine file is UTF-8.
    c, step, e = f
    return QuarantineRecord(
        scrub_surrogates(c.source_file),
        "bad_value",
        f"the {step} step raised {type(e).__name__} on this conversation; "
        "the rest of its batch was processed. Report it with the conversation id",
        c.source_line,
        None,
        scrub_surrogates(c.conversation_id),
        _masked_excerpt(c, masker),
        c.content_hash,
    )


def _masked_excerpt(c: Conversation, masker: Masker) -> str:
    """The start of the conversation, masked here already: the masker may be the step that
    failed on this text, and the quarantine writer masks excerpts again without a guard."""
    text = scrub_surrogates(" ".join(t.text for t in c.turns)[: EXCERPT_CHARS * 2])
    try:
        return masker.mask(text)[0][:EXCERPT_CHARS]
    except Exception:  # noqa: BLE001 - better no excerpt than an unmasked one
        return ""


def guard_case_step(
    cases: pd.DataFrame, fn: Callable[[pd.DataFrame], pd.DataFrame], step: str
) -> tuple[pd.DataFrame, list[QuarantineRecord]]:
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
    return QuarantineRecord(
        str(row["source_file"]),
        "bad_value",
        f"the {step} step raised {type(e).__name__} on this conversation; "
        "the rest of its batch was processed. Report it with the conversation id",
        None,
        None,
        str(row["conversation_id"]),
        str(row["customer_text"])[:EXCERPT_CHARS],
        str(row["content_hash"]),
    )
