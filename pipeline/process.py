"""The pure per-batch steps: normalise -> mask -> cases -> segment, conversations in, cases out.

No I/O and no Prefect here: the flow calls `process_batch` once per batch, tests call it directly,
and `casemine classify` uses it for transcripts. The steps run in the documented order so that no
text reaches case extraction, segmentation or storage before it is masked.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Sequence

import pandas as pd

from pipeline.cases import CaseExtractor
from pipeline.config import Config
from pipeline.mask import Masker
from pipeline.normalize import Normalizer
from pipeline.schema import CASE_COLUMNS, Conversation, QuarantineRecord, Turn
from pipeline.segment import Segmenter
from pipeline.textprep import get_masker, get_normalizer

ASR_FORMATS = ("asr_json", "asr_csv")


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
    # Conversations that parsed but had nothing left after normalisation (only emoji, control
    # characters): quarantined by the caller, so counts still reconcile.
    rejected: list[QuarantineRecord] = field(default_factory=list)
    pii_counts: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    chars_segmented: int = 0


def process_batch(convs: Sequence[Conversation], cfg: Config, run_id: str = "", ingest_date: date | None = None,
                  prior_orders: frozenset[str] = frozenset(), segmenter: Segmenter | None = None) -> BatchResult:
    """Conversations (as parsed) -> the case table for them, plus per-step counts and timings."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    normalizer = get_normalizer(cfg)
    normed, rejected = [], []
    for c in convs:
        n = normalize_conversation(c, normalizer)
        if n.turns:
            normed.append(n)
        else:
            rejected.append(QuarantineRecord(c.source_file, "empty_text", "no text left after normalisation (only emoji, "
                                             "marks or control characters)", c.source_line, None, c.conversation_id,
                                             " ".join(t.text for t in c.turns)[:120], c.content_hash))
    t1 = time.perf_counter()
    masker = get_masker(cfg)
    masked = [mask_conversation(c, masker) for c in normed]
    t2 = time.perf_counter()
    extractor = CaseExtractor.from_config(cfg)
    records = [r for c in masked for r in extractor.extract(c, run_id, ingest_date, prior_orders)]
    seg = segmenter or Segmenter(cfg)
    t_setup = time.perf_counter()
    seg.warm()
    t3 = time.perf_counter()
    problems = [r["problem"] for r in records]
    customer = [r["customer_text"] for r in records]
    toks = seg.cut_many(problems + customer)
    for r, p_tok, c_tok in zip(records, toks[:len(records)], toks[len(records):]):
        r["tokens"] = p_tok
        r["keywords"] = seg.keywords(c_tok)
    t4 = time.perf_counter()
    seconds.update(normalize=t1 - t0, mask=t2 - t1, cases=t_setup - t2, segment_setup=t3 - t_setup, segment=t4 - t3)
    pii: Counter = Counter()
    for c in masked:
        pii.update(c.pii_counts)
    df = pd.DataFrame.from_records(records, columns=list(CASE_COLUMNS))
    return BatchResult(df, rejected, pii, seconds, sum(map(len, problems)) + sum(map(len, customer)))
