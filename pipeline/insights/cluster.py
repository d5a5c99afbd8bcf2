"""Root-cause clusters: group problem cases by meaning, label them, suggest causes, keep stable ids.

Why this shape: analysts read clusters as "the reasons customers call", so a cluster is only
useful if (1) its label reads like a cause, (2) it keeps its id from one night to the next (so
its trend and the notes people attach to it survive), and (3) its cause attribution is visibly a
suggestion. Everything here is pure (frames and arrays in, frames out); reading cases, embedding
and writing state happen in `pipeline.insights.export`.

Flow: `select_cases` -> per scope (each issue type, and all cases) `cluster_vectors` (PCA, then
KMeans with k chosen by silhouette; clusters too small to matter are noise)
-> `describe_scope` (c-TF-IDF terms, representatives, mix, causes)
-> `assign_stable_ids` (Hungarian matching of centroids against the stored state).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config
from pipeline.heap import release_mapped_pages, release_unused_memory
from pipeline.insights.codes import arrow_backed, column_codes, derive_codes
from pipeline.insights.row_file import RowFile
from pipeline.text.mask import PLACEHOLDER_RE

NOISE = -1
# The cases' vectors: in memory, or spilled (`RowFile`) once the map's PCA has read them whole.
Vectors = np.ndarray | RowFile
UNCLASSIFIED = "未分类"
ALL_SCOPE = "全部"
OUTCOME_KEYS = ("resolved", "unresolved", "escalated", "unknown")
# Low-cardinality case columns the tables count over both the cases and the selected frame (and
# the members, taken from the frame); free text is never declared (it would be held alive).
CODED_COLUMNS = ("date", "channel", "region", "product", "issue_type", "outcome", "emotion")
CAUSE_CATEGORIES = ("system", "process", "people", "product", "logistics_partner", "external")
_TERM_OK = re.compile(r"[\u4e00-\u9fffA-Za-z]")
# JDDC-style bracket tokens ([订单x]) survive some segmentations as pieces; never show them as terms.
_MASK_PIECE = re.compile(r"^(订单|金额|数字|地址|姓名|日期|时间|电话|站点|链接|组织机构|邮箱|身份证号|x)$")
# An RE2 class for a character Python's str.strip() never removes: every character it strips is
# an ASCII control in \t-\r or \x1c-\x1f, U+0085, or in Unicode's Z categories (the test checks
# every code point). Lets Arrow compute tell which texts str.strip() would leave as they are.
NOT_SPACE = r"[^\t-\r\x{1c}-\x{1f}\x{85}\p{Z}]"

Cutter = Callable[[str], list[str]]


# -- parameters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterParams:
    """The knobs of one clustering run (taken from `cfg.cluster`, overridable in tests/bench)."""

    pca_components: int = 10
    max_clusters: int = 30
    min_cluster_size: int = 5
    min_scope_cases: int = 10
    seed: int = 0
    # With stored centroids to start from, keep their k unless another k's silhouette is higher
    # by more than this (see `kmeans_by_silhouette`).
    keep_k_within: float = 0.01
    # Rows the projection and KMeans are fitted on; the rest are assigned to the nearest centre.
    fit_max_cases: int = 50_000

    @classmethod
    def from_config(cls, cfg: Config) -> ClusterParams:
        c = cfg.cluster
        return cls(
            c.pca_components,
            c.max_clusters,
            c.min_cluster_size,
            c.min_scope_cases,
            keep_k_within=c.keep_k_within,
            fit_max_cases=c.fit_max_cases,
        )


# -- selecting and preparing cases --------------------------------------------------------------


def _text(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _as_list(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    return []


def fill_classification(cases: pd.DataFrame) -> pd.DataFrame:
    """Older partitions lack the classifier's columns: add them as "未分类"/null so every later
    step can group by issue type without special cases."""
    # Shallow (copy-on-write): columns are replaced, never written into, and a deep copy of every
    # stored case's columns cost the export a frame's worth of memory, twice a night.
    out = cases.copy(deep=False)
    if "issue_type" not in out:
        out["issue_type"] = UNCLASSIFIED
    out["issue_type"] = pd.Series(_issue_types(out["issue_type"]), index=out.index)
    for col, default in (
        ("request_kind", None),
        ("urgency", None),
        ("issue_type_confidence", None),
        ("needs_review", None),
    ):
        if col not in out:
            out[col] = default
    return out


def _issue_types(col: pd.Series) -> Any:
    """Each case's issue type, "未分类" where it is missing or empty. Decided in Arrow when the
    column is Arrow-backed text (each night's stored cases): a Python pass cost more than the rest."""
    arr = arrow_text(col) if len(col) else None
    dtype = list_str_dtype()
    if arr is None or dtype is None:
        # A list, not Series.map: mapping an Arrow-backed column visits it cell by cell.
        return [v if isinstance(v, str) and v else UNCLASSIFIED for v in col.tolist()]
    named = pc.fill_null(pc.greater(pc.binary_length(arr), 0), False)
    if col.dtype == dtype and pc.all(named).as_py():
        # Nothing to fill (the export's cases were filled on loading): the column itself, so
        # that its codes stay the ones the tables share, not a copy's hashed again.
        return col.array
    return pd.array(pc.if_else(named, arr, pa.scalar(UNCLASSIFIED, type=arr.type)), dtype=dtype)


def select_cases(cases: pd.DataFrame, min_chars: int = 4, request_kinds: Sequence[str] = ()) -> pd.DataFrame:
    """The cases worth clustering: a problem statement long enough to carry a cause ("怎么办" does
    not), optionally only some request kinds. Adds `cluster_text` (problem, else customer text)."""
    return select_cases_at(cases, min_chars, request_kinds)[0]


def select_cases_at(
    cases: pd.DataFrame, min_chars: int = 4, request_kinds: Sequence[str] = (), facts: ProblemFacts | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """`select_cases`, and the `cases` row each selected row is (kept facts about the stored
    cases' rows then find their selected row without a look-up). `facts`: `problem_facts` of
    the cases' problems with `min_chars`, where the caller keeps them between nights."""
    df = fill_classification(cases)
    texts, long_enough = _cluster_texts(df, min_chars, facts)
    df["cluster_text"] = texts
    keep = pd.Series(long_enough, index=df.index, dtype=bool)
    if request_kinds:
        keep &= df["request_kind"].isin(list(request_kinds))
    frame, rows = df[keep].reset_index(drop=True), np.flatnonzero(keep.to_numpy(dtype=bool))
    # The columns both the cases' and the members' tables count: the frame's codes are the
    # cases' taken at its rows, not the filtered copy hashed again (a column of 1M cases each).
    for col in CODED_COLUMNS:
        if col in frame:
            derive_codes(frame[col], df[col], rows)
    return frame, rows


def _texts_in_python(problem: list, customer: list, min_chars: int) -> tuple[list[str], list[bool]]:
    """Each case's cluster text (problem stripped, else customer text stripped and cut to 200) and
    whether it is long enough. The rule itself; `_cluster_texts` applies it in Arrow where it can."""
    texts = [_text(p).strip() or _text(c).strip()[:200] for p, c in zip(problem, customer)]
    # Placeholders (<PHONE>) do not count as characters; only a text with a "<" can hold one.
    return texts, [len(PLACEHOLDER_RE.sub("", t) if "<" in t else t) >= min_chars for t in texts]


def list_str_dtype() -> Any:
    """The dtype pandas gives a column made from a list of str if it is Arrow-backed (pandas 3's
    `str`), else None: only then can an Arrow array stand for that list, dtype included."""
    dtype = pd.Series(["-"]).dtype
    return dtype if isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow" else None


def arrow_text(col: pd.Series) -> Any:
    """The Arrow strings behind an Arrow-backed text column (no copy), else None: object columns
    (frames built in tests) may hold any value and take the Python path."""
    dtype = col.dtype
    arrow_str = isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"
    if isinstance(dtype, pd.ArrowDtype):
        arrow_str = pa.types.is_string(dtype.pyarrow_dtype) or pa.types.is_large_string(dtype.pyarrow_dtype)
    if not arrow_str:
        return None
    arr = pa.array(col.array)
    return arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])


# Per case: whether its problem is its own cluster text (`_plain_problems`), and whether it is
# that and long enough (`_long_enough`). Both follow from the problem text alone.
ProblemFacts = tuple[np.ndarray, np.ndarray]
# Names the rule `problem_facts` applies: facts kept under another name are not used.
PROBLEM_FACTS_RULE = f"plain:{NOT_SPACE}|long:{PLACEHOLDER_RE.pattern}|1"


def problem_facts(problem: Any, min_chars: int) -> ProblemFacts:
    """Of each Arrow problem text: plain (`_plain_problems`), and plain and long enough. The
    all-history part of the selection (a regex and two lengths over every stored problem, 0.15 s
    a night at 1M cases): a caller can keep them per stored row and compute the new rows only."""
    plain = _plain_problems(problem)
    return plain, plain & _long_enough(problem, min_chars)


def _plain_problems(problem: Any) -> np.ndarray:
    """Where a problem is its own cluster text: a string with no character str.strip() removes at
    either end (so not blank either). Nearly every stored case."""
    plain = pc.and_(
        pc.match_substring_regex(problem, "^" + NOT_SPACE), pc.match_substring_regex(problem, NOT_SPACE + "$")
    )
    return np.asarray(pc.fill_null(plain, False).to_numpy(zero_copy_only=False), dtype=bool)


def _counted_chars(texts: Any) -> np.ndarray:
    """`len` of each text without its placeholders, as `_texts_in_python` counts (nulls: 0).
    `pc.utf8_length` counts code points, as `len` does; PLACEHOLDER_RE's pattern matches the same
    in RE2 (the tests check), and is removed only from the texts with a "<" (a third of them)."""
    lengths = np.array(pc.fill_null(pc.utf8_length(texts), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    marked = np.flatnonzero(pc.fill_null(pc.match_substring_regex(texts, "<"), False).to_numpy(zero_copy_only=False))
    if len(marked):
        unmasked = pc.replace_substring_regex(texts.take(pa.array(marked)), PLACEHOLDER_RE.pattern, "")
        lengths[marked] = pc.utf8_length(unmasked).to_numpy(zero_copy_only=False)
    return lengths


def _long_enough(texts: Any, min_chars: int) -> np.ndarray:
    """`_counted_chars(texts) >= min_chars`, with the placeholders removed only from the texts it
    is not sure of: placeholders are ASCII, so a text keeps at least its non-ASCII characters,
    and UTF-8 spends 2-4 bytes on each of those, so there are at least (bytes - code points) / 3.
    Nearly every stored problem has six CJK characters or more; the removal over a third of them
    was two thirds of the selection's cost each night."""
    chars = np.asarray(pc.fill_null(pc.utf8_length(texts), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    nbytes = np.asarray(pc.fill_null(pc.binary_length(texts), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    enough = nbytes - chars >= 3 * min_chars
    # A text shorter than min_chars in all is too short whatever it holds.
    unsure = np.flatnonzero(~enough & (chars >= min_chars))
    if len(unsure):
        enough[unsure] = _counted_chars(texts.take(pa.array(unsure))) >= min_chars
    return enough


def _cluster_texts(df: pd.DataFrame, min_chars: int, facts: ProblemFacts | None = None) -> tuple[Any, Any]:
    """`cluster_text` for every case and whether it is long enough, by `_texts_in_python`'s rule.
    On an Arrow-backed problem column, Python sees only the cases whose problem is not plainly
    their cluster text (missing, blank, spaces at an end): a Python pass over every stored case
    each night cost more than the rest of the selection. Same values and dtype either way.
    `facts`: `problem_facts(problem, min_chars)`, when the caller has them (the Arrow path)."""
    n = len(df)
    problem = arrow_text(df["problem"]) if n and "problem" in df else None
    dtype = list_str_dtype()
    if problem is None or dtype is None:
        # Lists, not Series.map: mapping an Arrow-backed column visits it cell by cell.
        problems = df["problem"].tolist() if "problem" in df else [""] * n
        customer = df["customer_text"].tolist() if "customer_text" in df else [""] * n
        return _texts_in_python(problems, customer, min_chars)
    if facts is not None and len(facts[0]) == len(facts[1]) == n:
        plain, long_enough = facts[0], facts[1].copy()  # written into below: the caller's kept
    else:
        plain, long_enough = problem_facts(problem, min_chars)
    rest = np.flatnonzero(~plain)
    if not len(rest):
        return pd.array(problem, dtype=dtype), long_enough
    customer = df["customer_text"].iloc[rest].tolist() if "customer_text" in df else [""] * len(rest)
    rest_texts, long_enough[rest] = _texts_in_python(df["problem"].iloc[rest].tolist(), customer, min_chars)
    texts = pc.replace_with_mask(problem, pa.array(~plain), pa.array(rest_texts, type=problem.type))
    return pd.array(texts, dtype=dtype), long_enough


@dataclass
class TokenCodes:
    """Each case's tokens as int32 codes into one vocabulary (case i: `codes[offsets[i]:offsets[i + 1]]`).

    Why: a re-cluster labels clusters from every selected case's tokens, and as Python lists of
    str they were the largest thing it held (~3.6 KB a case at 30k cases, kept through every
    scope); codes are 4 bytes a token, and a term's tests (`is_term`) run once per distinct word."""

    vocab: list[str]
    codes: np.ndarray
    offsets: np.ndarray
    # `is_term` of each vocabulary entry per stop-word set, shared by the cases `take` picks.
    _terms: dict[frozenset[str], np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_lists(cls, token_lists: Iterable[Sequence[str]]) -> TokenCodes:
        vocab: dict[str, int] = {}
        lens, codes = _encode(token_lists, vocab)
        return cls(list(vocab), codes, _offsets(lens))

    def take(self, idx: np.ndarray) -> TokenCodes:
        """The cases at positions `idx`, in that order (same vocabulary)."""
        idx = np.asarray(idx, dtype=np.int64)
        starts, lens = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        offsets = _offsets(lens)
        # Token j of the new layout comes from old position starts[case] + (j - offsets[case]).
        pos = np.repeat(starts - offsets[:-1], lens) + np.arange(int(offsets[-1]), dtype=np.int64)
        return TokenCodes(self.vocab, self.codes[pos], offsets, self._terms)

    def lists(self) -> list[list[str]]:
        """Back to one list of str per case (tests and small callers)."""
        words = self.vocab
        return [[words[c] for c in self.codes[a:b]] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def term_mask(self, stopwords: frozenset[str]) -> np.ndarray:
        """`is_term` of each vocabulary entry (computed once per stop-word set)."""
        mask = self._terms.get(stopwords)
        if mask is None or len(mask) != len(self.vocab):
            mask = np.fromiter((is_term(w, stopwords) for w in self.vocab), dtype=bool, count=len(self.vocab))
            self._terms[stopwords] = mask
        return mask


def _offsets(lens: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def _encode(token_lists: Iterable[Sequence[str]], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Each list's length and all their tokens as codes, new words added to `vocab`; no list is
    kept (cut tokens are encoded as they come)."""
    lens: list[int] = []
    chunk: list[int] = []
    parts = []
    for toks in token_lists:
        lens.append(len(toks))
        chunk.extend(vocab.setdefault(t, len(vocab)) for t in toks)
        if len(chunk) >= 1 << 20:  # a Python int list is 36 bytes a token: flushed to int32 often
            parts.append(np.asarray(chunk, dtype=np.int32))
            chunk = []
    parts.append(np.asarray(chunk, dtype=np.int32))
    codes = np.concatenate(parts)
    return np.asarray(lens, dtype=np.int64), codes


def _arrow_lists(col: pd.Series) -> pa.ChunkedArray | None:
    """The Arrow list<string> behind an Arrow-backed tokens column (`_with_tokens`), else None."""
    dtype = col.dtype
    if not (isinstance(dtype, pd.ArrowDtype) and pa.types.is_list(dtype.pyarrow_dtype)):
        return None
    arr = pa.array(col.array)
    return arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])


def token_codes(frame: pd.DataFrame, cut: Cutter | None, stored: TokenCodes | None = None) -> TokenCodes:
    """Stored jieba tokens of each case's problem as codes; the cluster text cut where they are
    missing or empty (when `cut` is given). An Arrow-backed tokens column is encoded in Arrow.
    `stored`: the frame's stored tokens already encoded (`stored_tokens.stored_token_codes`, read
    a block of parts at a time), in place of a tokens column."""
    n = len(frame)
    vocab: dict[str, int] = {}
    col = frame["tokens"] if "tokens" in frame and stored is None else None
    arr = _arrow_lists(col) if col is not None and n else None
    if stored is not None:
        if len(stored) != n:
            raise ValueError(f"stored tokens of {len(stored)} cases for {n} cases")
        vocab = {w: i for i, w in enumerate(stored.vocab)}
        lens, codes = np.diff(stored.offsets), stored.codes
    elif arr is not None:
        lists = arr.combine_chunks()
        lens = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
        enc = pc.dictionary_encode(pc.fill_null(pc.list_flatten(lists), ""))
        enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
        vocab = {w: i for i, w in enumerate(enc.dictionary.to_pylist())}
        codes = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int32)
    elif col is not None:
        lens, codes = _encode((_as_list(v) for v in col.tolist()), vocab)
    else:
        lens, codes = np.zeros(n, dtype=np.int64), np.zeros(0, dtype=np.int32)
    need = np.flatnonzero(lens == 0)
    if cut is None or not len(need):
        return TokenCodes(list(vocab), codes, _offsets(lens))
    texts, cutter = frame["cluster_text"].iloc[need].tolist(), cut
    cut_lens, cut_codes = _encode((cutter(t) for t in texts), vocab)
    # Each case has stored tokens or cut ones: both sets placed at the case's new offset.
    all_lens = lens.copy()
    all_lens[need] = cut_lens
    offsets = _offsets(all_lens)
    out = np.empty(int(offsets[-1]), dtype=np.int32)
    stored_at = np.repeat(offsets[:-1] - _offsets(lens)[:-1], lens) + np.arange(len(codes), dtype=np.int64)
    out[stored_at] = codes
    cut_starts = offsets[need]
    out[np.repeat(cut_starts - _offsets(cut_lens)[:-1], cut_lens) + np.arange(len(cut_codes), dtype=np.int64)] = (
        cut_codes
    )
    return TokenCodes(list(vocab), out, offsets)


def is_term(token: str, stopwords: frozenset[str] = frozenset()) -> bool:
    """A token that can name a cause: has a letter or CJK, 2+ characters, not a placeholder or
    stop word."""
    return (
        len(token) >= 2
        and bool(_TERM_OK.search(token))
        and not PLACEHOLDER_RE.search(token)
        and not _MASK_PIECE.match(token)
        and token not in stopwords
    )


# -- clustering ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """The PCA a scope was clustered in (mean and components), kept so later nights can put new
    vectors in the same space without refitting. None components = the raw (normalised) vectors."""

    mean: np.ndarray | None = None
    components: np.ndarray | None = None

    def apply(self, X: np.ndarray, overwrite: bool = False) -> np.ndarray:
        """Rows projected and re-normalised, so Euclidean distance tracks cosine. `overwrite`: X
        is the caller's scratch copy, centred in place (the same values, the same product)."""
        X = np.asarray(X, dtype=np.float32)
        if self.components is None:
            Z = X
        elif overwrite and X.flags.writeable and X.flags.c_contiguous and self.mean is not None:
            Z = np.subtract(X, self.mean, out=X) @ self.components.T
        else:
            Z = (X - self.mean) @ self.components.T
        norms = np.linalg.norm(Z, axis=1, keepdims=True)
        return (Z / np.where(norms == 0, 1, norms)).astype(np.float32)


def fit_projection(X: np.ndarray, n_components: int, seed: int = 0) -> Projection:
    """PCA to a few dimensions. In 384 dimensions distances crowd together (silhouette picked 3 to
    6 clusters and swung between halves of the data); 10 components gave the steadier, higher NMI
    (bench/bench_clusters.py)."""
    X = np.asarray(X, dtype=np.float32)
    k = min(n_components, X.shape[0] - 1, X.shape[1])
    if n_components <= 0 or k < 2:
        return Projection()
    from sklearn.decomposition import PCA

    pca = PCA(n_components=k, random_state=seed).fit(X)
    return Projection(pca.mean_.astype(np.float32), pca.components_.astype(np.float32))


def reduce_vectors(X: np.ndarray, n_components: int, seed: int = 0) -> np.ndarray:
    """PCA to a few dimensions, re-normalised (see `fit_projection`)."""
    return fit_projection(X, n_components, seed).apply(X)


# k is chosen on at most this many rows (silhouette is quadratic in rows); the final partition
# of all rows uses that k. 5,000 keeps the choice under a few seconds at any history size.
_K_SELECT_ROWS = 5_000
_N_INIT = 10  # KMeans restarts: fewer made the chosen k and the NMI wander by a few points


def kmeans_by_silhouette(
    Z: np.ndarray, k_max: int, seed: int = 0, init: np.ndarray | None = None, keep_k_within: float = 0.0
) -> np.ndarray:
    """KMeans labels with k in 2..k_max chosen by the highest silhouette: the number of groups
    comes from the geometry of the cases, never from a label count.

    `init`: yesterday's centres in this space. The fit with k = len(init) then starts from them
    (one run, not `_N_INIT` random ones), and that k is kept unless another k beats its
    silhouette by more than `keep_k_within`: silhouette often moves k by one between two nights,
    which renumbers every cluster it touches."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no stubs; sklearn ships it

    # One thread: the search is dozens of small fits on 10-d vectors, where OpenMP's threads cost
    # more than they save, and on a busy shared host their spin-waits made the 499 JD cases take
    # 84 s instead of 1.6 s (10k cases: 162 s instead of 11 s).
    with threadpool_limits(limits=1, user_api="openmp"):
        return _kmeans_by_silhouette(Z, k_max, seed, init, keep_k_within)


def _kmeans_by_silhouette(
    Z: np.ndarray, k_max: int, seed: int, init: np.ndarray | None, keep_k_within: float
) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(Z)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, _K_SELECT_ROWS, replace=False)) if n > _K_SELECT_ROWS else np.arange(n)
    S = Z[sample]
    seeded_k = len(init) if init is not None and 2 <= len(init) <= min(k_max, len(S) - 1) else None

    def fit(k: int, rows: np.ndarray) -> np.ndarray:
        if k == seeded_k:
            return KMeans(k, init=init, n_init=1, random_state=seed).fit_predict(rows)
        return KMeans(k, n_init=_N_INIT, random_state=seed).fit_predict(rows)

    scores: dict[int, tuple[float, np.ndarray]] = {}
    for k in range(2, min(k_max, len(S) - 1) + 1):
        lab = fit(k, S)
        if len(set(lab.tolist())) < 2:
            continue
        scores[k] = (float(silhouette_score(S, lab)), lab)
    if not scores:
        return np.zeros(n, dtype=int)
    best_k = max(scores, key=lambda k: (scores[k][0], -k))
    if seeded_k in scores and scores[seeded_k][0] >= scores[best_k][0] - keep_k_within:
        best_k = seeded_k
    if len(sample) == n:
        return scores[best_k][1].astype(int)
    return fit(best_k, Z).astype(int)


@dataclass
class ClusterFit:
    """One scope's clustering: labels per row, the space it was made in and each kept cluster's
    KMeans centre there (what tomorrow's new cases are assigned to)."""

    labels: np.ndarray
    projection: Projection
    centers: dict[int, np.ndarray]


def fit_clusters(
    X: Vectors, params: ClusterParams, seeds: np.ndarray | None = None, rows: np.ndarray | None = None
) -> ClusterFit:
    """Cluster labels 0..k-1 per row (largest cluster first), NOISE (-1) for cases whose group is
    too small to be more than an anecdote; `seeds` are stored centroids (full embedding space)
    the KMeans search starts from (see `kmeans_by_silhouette`). `rows`: the scope's rows of `X`
    (None: every row, in order), so a scope's vectors are gathered only for its PCA and a block
    at a time for its projection, not held as a copy through the KMeans search, which holds the
    re-cluster's peak (its silhouette's distance matrix).

    Why KMeans with a silhouette-chosen k on PCA'd vectors (bench/bench_clusters.py, on both
    real labelled sets and on the halves of 3 seeded splits): PCA + HDBSCAN left 13% (complaints)
    to 41% (JD chats) of the cases as noise; with that noise re-assigned to the nearest cluster it
    still fell below KMeans-with-silhouette-k on the raw vectors on the JD chats. Of the label-free
    methods this one had the best mean and worst half on both sets. Every case therefore belongs
    to its nearest centroid, except members of clusters under `min_cluster_size`, which are
    reported as noise (`is_noise`, counted as one extra cluster by `casemine eval clusters`).
    Fewer rows than `min_scope_cases` are all noise: a "cluster" of three calls is an anecdote."""
    n = len(X) if rows is None else len(rows)
    if n < max(params.min_scope_cases, params.min_cluster_size, 3):
        return ClusterFit(np.full(n, NOISE, dtype=int), Projection(), {})
    # Past `fit_max_cases`, fit on a seeded sample and give every row its nearest KMeans centre
    # (what KMeans itself does with a row): fewer rows in the fit, same kind of partition.
    capped = n > params.fit_max_cases
    fit_rows = (
        np.sort(np.random.default_rng(params.seed).choice(n, params.fit_max_cases, replace=False)) if capped else None
    )
    if capped:
        sample = X[fit_rows] if rows is None else X[rows[fit_rows]]
        proj = fit_projection(sample, params.pca_components, params.seed)
        del sample
        Z = project_blocks(proj, X, rows)
    else:
        # An uncapped scope's PCA needs its vectors whole: gathered once and let go before they
        # are projected (a block at a time, gathered again: the same rows, the same products).
        scope_X = X[:] if rows is None else X[rows]  # a view of an array in memory
        proj = fit_projection(scope_X, params.pca_components, params.seed)
        del scope_X
        Z = project_blocks(proj, X, rows)
    k_max = min(params.max_clusters, math.isqrt(n))
    init = proj.apply(seeds) if seeds is not None and len(seeds) else None
    keep = params.keep_k_within if init is not None else 0.0
    from sklearn import config_context

    # The silhouette's distances a block of rows at a time, not the whole matrix of the search's
    # sample at once (sklearn's default 1 GiB of working memory: 5,000 rows, about 100-190 MiB,
    # the re-cluster's peak on top of everything it holds). Each row's distances and its
    # silhouette are computed alike in any block, so the scores and the chosen k are the same.
    with config_context(working_memory=_SILHOUETTE_MIB):
        if capped:
            sample_labels = kmeans_by_silhouette(Z[fit_rows], k_max, params.seed, init, keep)
            raw = nearest_center(Z, label_means(Z[fit_rows], sample_labels))
        else:
            raw = kmeans_by_silhouette(Z, k_max, params.seed, init, keep)
    sizes = np.bincount(raw)
    # Renumber by size (ties by first row), so label 0 is the biggest group and runs agree.
    first = {int(v): int(i) for v, i in zip(*np.unique(raw, return_index=True))}
    order = sorted(
        (k for k in range(len(sizes)) if sizes[k] >= params.min_cluster_size), key=lambda k: (-sizes[k], first[k])
    )
    mapping = np.full(len(sizes), NOISE, dtype=int)
    mapping[order] = np.arange(len(order))
    labels = mapping[raw]
    centers = {int(lab): Z[labels == lab].mean(axis=0).astype(np.float32) for lab in range(len(order))}
    return ClusterFit(labels, proj, centers)


_BLOCK = 65_536  # rows projected or assigned at a time
_SILHOUETTE_MIB = 32  # sklearn working memory for the silhouette's distance blocks


def project_blocks(proj: Projection, X: Vectors, rows: np.ndarray | None = None) -> np.ndarray:
    """`proj.apply(X)` (of `X[rows]` when given) a block at a time: the centred copy of the
    vectors, and the gathered rows, stay one block. Each block is the same rows either way, so
    the same products. Gathered rows (and a spilled matrix's blocks) are the block's own copy:
    centred in place (`overwrite`), not copied again (a second 1.5 KiB a row of the block)."""
    n = len(X) if rows is None else len(rows)
    own = isinstance(X, RowFile)  # its slices are copies, not views of the caller's matrix

    def block(i: int) -> np.ndarray:
        if rows is None:
            return proj.apply(X[i : i + _BLOCK], overwrite=own)
        return proj.apply(X[rows[i : i + _BLOCK]], overwrite=True)

    first = block(0)
    if n <= _BLOCK:
        return first
    # Each block written into its place: the list of blocks and their concatenation held the
    # projected rows twice at the end (40 bytes a case each, at the cross-type fit's peak).
    out = np.empty((n, *first.shape[1:]), dtype=first.dtype)
    out[: len(first)] = first
    del first
    for i in range(_BLOCK, n, _BLOCK):
        out[i : i + _BLOCK] = block(i)
    return out


def label_means(Z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean row per label 0..max (KMeans centres from its labels)."""
    k = int(labels.max()) + 1
    sums = np.zeros((k, Z.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, Z)
    return (sums / np.maximum(np.bincount(labels, minlength=k), 1)[:, None]).astype(np.float32)


def nearest_center(Z: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Position of each row's nearest centre (Euclidean), a block of rows at a time."""
    out = np.empty(len(Z), dtype=int)
    c2 = (centers.astype(np.float64) ** 2).sum(axis=1)
    for i in range(0, len(Z), _BLOCK):
        z = Z[i : i + _BLOCK].astype(np.float64)
        out[i : i + _BLOCK] = np.argmin(c2[None, :] - 2 * z @ centers.T.astype(np.float64), axis=1)
    return out


def cluster_vectors(X: np.ndarray, params: ClusterParams, seeds: np.ndarray | None = None) -> np.ndarray:
    """The labels of `fit_clusters`: what evaluation and the benches score."""
    return fit_clusters(X, params, seeds).labels


def centroid_of(X: np.ndarray) -> np.ndarray:
    """Normalised mean vector: compared by cosine across nights, so scale must not matter."""
    X = np.asarray(X)
    # Summed in blocks only where numpy's own sum runs row after row: a C-ordered matrix of
    # several columns (one column, or Fortran order, is summed pairwise along the rows).
    by_rows = X.ndim == 2 and len(X) > 0 and X.shape[1] > 1 and X.flags.c_contiguous
    c = row_sum(X) / len(X) if by_rows else np.asarray(X, dtype=np.float64).mean(axis=0)
    n = np.linalg.norm(c)
    return (c / n if n else c).astype(np.float32)


_SUM_ROWS = 2048  # rows `row_sum` converts to float64 at a time


def row_sum(X: np.ndarray | _RowsAt) -> np.ndarray:
    """`np.asarray(X, dtype=np.float64).sum(axis=0)` of a C-ordered matrix of two or more
    columns, bit for bit, without a float64 copy of X: numpy sums such a matrix along axis 0 row
    after row (pairwise summation runs along the fast axis only), so each block is summed after
    the running total, put as its first row. Why: the float64 copy of a cluster's vectors (3 KiB
    a case), made twice per cluster, was most of the cross-type scope's description peak."""
    acc = np.add.reduce(np.asarray(X[:_SUM_ROWS], dtype=np.float64), axis=0)
    if len(X) <= _SUM_ROWS:
        return acc
    buf = np.empty((_SUM_ROWS + 1, X.shape[1]), dtype=np.float64)
    for a in range(_SUM_ROWS, len(X), _SUM_ROWS):
        block = X[a : a + _SUM_ROWS]
        buf[0] = acc
        buf[1 : len(block) + 1] = block
        acc = np.add.reduce(buf[: len(block) + 1], axis=0)
    return acc


_VECTOR_BLOCK = 8192  # a cluster's vectors gathered at a time (12 MiB of 384-d float32)


@functools.cache
def _blas_threads() -> Any:
    """The thread pools' controller, made once: making one lists every loaded library (1.4 ms,
    once a cluster of every scope); limiting through it costs microseconds."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class _RowsAt:
    """`X[at]` for `row_sum`, gathered a slice at a time and never whole."""

    def __init__(self, X: Vectors, at: np.ndarray):
        self.X, self.at = X, at
        self.shape = (len(at), *X.shape[1:])

    def __len__(self) -> int:
        return len(self.at)

    def __getitem__(self, key: slice) -> np.ndarray:
        return np.asarray(self.X[self.at[key]])


def centroid_and_sims(X: Vectors, at: np.ndarray, block: int = _VECTOR_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """`centroid_of(X[at])` and each of those rows' similarity to it (float32), the rows gathered
    `block` at a time: the same centroid bit for bit (`row_sum` sums a block after the running
    total), and each similarity a one-thread product of its own row.

    Why: the biggest cross-type cluster holds a share of every case, and its vectors gathered
    whole (1.5 KiB a case: 76 MiB for 51,691 of 129,353 cases) were the re-cluster's peak once the
    members file was written a window at a time, and grew with the history. OpenBLAS splits a
    large product between its threads, and a row at the split rounds differently (~1e-9) than
    in a block; on one thread a row's product is the same in any block, so the similarities no
    longer depend on the machine's cores."""
    rows = _RowsAt(X, at)
    head = rows[:block]
    if len(at) <= block or head.shape[1] < 2:  # one column: numpy sums it pairwise, whole
        cent = centroid_of(head if len(at) <= block else X[at])
    else:
        c = row_sum(rows) / len(at)
        norm = np.linalg.norm(c)
        cent = (c / norm if norm else c).astype(np.float32)
    sims = np.empty(len(at), dtype=np.float32)
    # A last block of one row would be numpy's dot, not the matrix product, and round as no row
    # of the whole product does: it goes with the block before it.
    starts = [a for a in range(0, len(at), block) if not (a and a == len(at) - 1)]
    ends = [*starts[1:], len(at)]
    with _blas_threads().limit(limits=1, user_api="blas"):
        sims[: ends[0]] = np.asarray(head if ends[0] == len(head) else rows[: ends[0]], dtype=np.float32) @ cent
        del head  # not held past its block
        for a, b in zip(starts[1:], ends[1:]):
            sims[a:b] = np.asarray(rows[a:b], dtype=np.float32) @ cent
    return cent, sims


def representatives(X: np.ndarray, k: int) -> list[int]:
    """Row positions of the k cases closest to the centroid: what a reader should see first."""
    c = centroid_of(X)
    sims = np.asarray(X, dtype=np.float32) @ c
    return [int(i) for i in np.argsort(-sims, kind="stable")[:k]]


def class_tfidf(
    token_lists: Sequence[Sequence[str]] | TokenCodes,
    labels: Sequence[int] | np.ndarray,
    top_k: int,
    stopwords: frozenset[str] = frozenset(),
    min_lift: float = 1.5,
    min_docs: int = 2,
) -> dict[int, list[tuple[str, float]]]:
    """Top terms per cluster by class-based TF-IDF (BERTopic's c-TF-IDF): a term's frequency in
    the cluster times log(1 + mean tokens per class / its frequency over all classes).

    Only distinctive terms qualify: said in at least `min_docs` of the cluster's cases (one chatty
    customer's 妹子/结婚 is an anecdote, not the matter) and in a share of them at least `min_lift`
    times its share among the scope's other cases (京东, 快递 or 客服 said everywhere name no
    cluster). c-TF-IDF alone let such words through: its idf is computed over a handful of
    classes, so a word common everywhere is discounted only mildly. A scope with one class has
    nothing to compare against, so there only `min_docs` applies.

    Counted on integer codes (`TokenCodes`), not with a Counter per class and per case: the same
    counts, thresholds and float arithmetic, so the same terms and scores."""
    tokens = token_lists if isinstance(token_lists, TokenCodes) else TokenCodes.from_lists(token_lists)
    labs = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = min(len(tokens), len(labs))  # as zip() pairs them
    if not n:
        return {}
    kcode, classes = pd.factorize(labs[:n])  # classes in order of first appearance
    k = len(classes)
    n_docs = np.bincount(kcode, minlength=k)
    words, cnt, din = _class_word_counts(tokens, n, kcode, k, tokens.term_mask(stopwords))
    docs_all, total = din.sum(axis=0), cnt.sum(axis=0)
    avg = int(total.sum()) / max(k, 1)
    vocab = tokens.vocab
    out: dict[int, list[tuple[str, float]]] = {}
    for ki, lab in enumerate(classes.tolist()):
        if lab == NOISE:
            continue
        n_in = int(n_docs[ki])
        n_out = n - n_in
        size = int(cnt[ki].sum()) or 1
        cand = np.flatnonzero(cnt[ki] > 0)
        d_in = din[ki, cand]
        ok = d_in >= min(min_docs, n_in)
        if n_out:
            ok &= d_in / n_in >= min_lift * (docs_all[cand] - d_in) / n_out
        scored = [
            (vocab[words[j]], (int(cnt[ki, j]) / size) * math.log(1 + avg / int(total[j]))) for j in cand[ok].tolist()
        ]
        scored.sort(key=lambda kv: (-kv[1], kv[0]))
        out[int(lab)] = [(t, round(sc, 5)) for t, sc in scored[:top_k]]
    return out


_TFIDF_CASES = 65_536  # cases whose tokens `class_tfidf` counts at a time


def _case_blocks(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + _TFIDF_CASES, n)) for a in range(0, n, _TFIDF_CASES)]


def _class_word_counts(
    tokens: TokenCodes, n: int, kcode: np.ndarray, k: int, term: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The words the first `n` cases use as terms (`term`: per vocabulary entry), and per class
    (`kcode`: each case's) and word the tokens (`cnt`) and the cases (`din`), k x words.

    Counted a block of cases at a time and summed (integer counts: the same tables): each token's
    case, code, key and the sort of the (case, word) pairs, 8-byte arrays of every token of the
    scope at once, were ~0.8 KiB a case at the cross-type scope, the top of a re-cluster's memory."""
    offsets = tokens.offsets
    used = np.zeros(len(tokens.vocab), dtype=bool)
    for a, b in _case_blocks(n):
        codes = tokens.codes[int(offsets[a]) : int(offsets[b])]
        used[codes[term[codes]]] = True
    # The scope's own words, numbered 0..w-1, so the per-class tables are classes x words used.
    words = np.flatnonzero(used)
    w = len(words)
    local_of = np.cumsum(used) - 1
    cnt = np.zeros(k * w, dtype=np.int64)
    din = np.zeros(k * w, dtype=np.int64)
    for a, b in _case_blocks(n):
        codes = tokens.codes[int(offsets[a]) : int(offsets[b])]
        doc = np.repeat(np.arange(a, b, dtype=np.int64), np.diff(offsets[a : b + 1]))
        kept = term[codes]
        codes, doc = codes[kept], doc[kept]
        local = local_of[codes]
        cnt += np.bincount(kcode[doc] * w + local, minlength=k * w)  # tokens per class and word
        pairs = np.unique(doc * w + local)  # each word once per case (a case is in one block)
        din += np.bincount(kcode[pairs // w] * w + pairs % w, minlength=k * w)  # cases per class and word
    return words, cnt.reshape(k, w), din.reshape(k, w)


def label_from_terms(terms: Sequence[str], example: str, n: int) -> str:
    """A readable label: the top terms in the order they occur in the most typical case, so
    "签收 / 没收到 / 物流" reads as "物流、签收、没收到" like the customer said it."""
    chosen = list(terms[:n])
    if not chosen:
        return "（无明显关键词）"
    pos = {t: (example.find(t) if t in example else 10_000 + i) for i, t in enumerate(chosen)}
    return "、".join(sorted(chosen, key=lambda t: pos[t]))


def label_stopwords(cfg: Config) -> frozenset[str]:
    """The words `cluster.label_stopwords` keeps out of cluster labels (one per line, # comments).
    Read here rather than by the caller so every path that labels clusters drops them."""
    path = cfg.resolve(cfg.cluster.label_stopwords)
    if not path.is_file():
        raise FileNotFoundError(f"cluster.label_stopwords: {path} does not exist (one word per line)")
    return _read_words(str(path))


@lru_cache(maxsize=4)
def _read_words(path: str) -> frozenset[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return frozenset(w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#"))


# -- cause attribution --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cause:
    phrase: str
    category: str
    patterns: tuple[str, ...]


@dataclass
class CauseLexicon:
    """Configurable cause phrases and their surface patterns (configs/cause_lexicon.yaml).

    Why a lexicon and not a model: causes are a team's own vocabulary ("配送延误" vs "物流慢"),
    there are no labels for them, and a rule a person can read and edit is the honest form of a
    suggestion."""

    causes: list[Cause]
    category_names: dict[str, str] = field(default_factory=dict)
    label_stopwords: frozenset[str] = frozenset()  # never shown as cluster terms

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CauseLexicon:
        names = dict(data.get("categories") or {})
        causes = []
        for i, c in enumerate(data.get("causes") or []):
            cat = c.get("category")
            if cat not in CAUSE_CATEGORIES:
                raise ValueError(f"cause #{i} ({c.get('phrase')!r}): category {cat!r} is not one of {CAUSE_CATEGORIES}")
            pats = tuple(str(p).lower() for p in c.get("patterns") or [] if str(p).strip())
            causes.append(Cause(str(c["phrase"]), cat, pats or (str(c["phrase"]).lower(),)))
        return cls(causes, names, frozenset(str(w) for w in data.get("label_stopwords") or []))

    @classmethod
    def load(cls, cfg: Config) -> CauseLexicon:
        """The configured lexicon: its shape checked by the shared resource loader (cached until
        the file changes), its categories here; either error names the file."""
        from pipeline.config import ConfigError
        from pipeline.resources import CauseLexiconFile, load_resource

        checked = load_resource(cfg, cfg.cluster.cause_lexicon, CauseLexiconFile)
        try:
            return cls.from_dict(checked.model_dump())
        except ValueError as e:
            raise ConfigError(f"invalid cause lexicon {cfg.resolve(cfg.cluster.cause_lexicon)}: {e}") from None

    def find(self, text: str) -> list[Cause]:
        low = (text or "").lower()
        return [c for c in self.causes if any(p in low for p in c.patterns)]

    def attribute(self, texts: Sequence[str], min_share: float) -> dict[str, Any]:
        """Cause phrases found in at least `min_share` of the texts (most frequent first) and the
        category with the most matching texts; None when nothing matches often enough."""
        phrase_hits: Counter = Counter()
        cat_hits: Counter = Counter()
        self.count_hits(texts, phrase_hits, cat_hits)
        return self.attribution(phrase_hits, cat_hits, len(texts), min_share)

    def count_hits(self, texts: Iterable[str], phrase_hits: Counter, cat_hits: Counter) -> None:
        """Add to the counts the texts matching each phrase and each category: a caller may
        count a cluster's texts a block at a time (`attribution` then reads the sums)."""
        for t in texts:
            found = self.find(t)
            phrase_hits.update({c.phrase for c in found})
            cat_hits.update({c.category for c in found})

    def attribution(self, phrase_hits: Counter, cat_hits: Counter, n_texts: int, min_share: float) -> dict[str, Any]:
        """`attribute` from the counts of `count_hits` over `n_texts` texts."""
        n = max(n_texts, 1)
        # Ties broken by name, not by Counter's insertion order: that follows set iteration, which
        # differs between processes (string hashing is salted), and two identical runs disagreed.
        phrases = [(p, k / n) for p, k in _ranked(phrase_hits) if k / n >= min_share]
        cats = [(c, k / n) for c, k in _ranked(cat_hits) if k / n >= min_share]
        category = cats[0][0] if cats else None
        return {
            "cause_phrases": [p for p, _ in phrases[:3]],
            "cause_phrase_shares": [round(s, 3) for _, s in phrases[:3]],
            "cause_category": category,
            "cause_category_zh": self.category_names.get(category, category) if category else None,
            "cause_category_share": round(cats[0][1], 3) if cats else 0.0,
        }


def _ranked(counts: Counter) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


# -- describing clusters ------------------------------------------------------------------------


def share_dict(values: Iterable[Any], top: int | None = None) -> dict[str, float]:
    if isinstance(values, pd.Series):
        values = values.tolist()  # one C conversion: iterating Arrow-backed strings is per-cell slow
    vals = [v if isinstance(v, str) and v else "未知" for v in values]
    n = max(len(vals), 1)
    return {k: round(c / n, 3) for k, c in Counter(vals).most_common(top)}


def group_shares(codes: np.ndarray, values: pd.Series, top: int | None = None) -> dict[int, dict[str, float]]:
    """`share_dict` of each group's values (row i is in group `codes[i]`), for all groups in one
    pass: the same shares in the same order (most common first, ties in order of first
    appearance, as Counter.most_common). Why: one Counter per group and column visited every
    stored member in Python, most of a second a night at 100k cases. The values' codes are the
    column's shared ones (`codes.sorted_codes`): a column is hashed once a night, not per table.
    Another column is factorized unsorted, as before (any numbering serves; mixed values may not
    sort)."""
    return coded_shares(codes, *column_codes(values), top)


def coded_shares(
    codes: np.ndarray, vcodes: np.ndarray, uniques: np.ndarray, top: int | None = None
) -> dict[int, dict[str, float]]:
    """`group_shares` of a column given as codes (-1: missing) among its distinct `uniques`, so
    that a caller counting some rows of a coded column takes their codes, not their text."""
    codes = np.asarray(codes, dtype=np.int64)
    vcodes = np.asarray(vcodes, dtype=np.int64)
    grouped = codes >= 0  # -1: a row in no group (a groupby leaves out missing keys)
    if not grouped.all():
        codes, vcodes = codes[grouped], vcodes[grouped]
    if not len(vcodes):
        return {}
    # share_dict counts missing and empty values as one "未知" (with any literal "未知").
    names, merged = _unique_names([u if isinstance(u, str) and u else "未知" for u in uniques] + ["未知"])
    vcodes = merged[vcodes]  # -1 (missing) takes the last entry: "未知"
    key = codes * len(names) + vcodes
    span = (int(codes.max()) + 1) * len(names)
    # Each (group, value) pair's count and first row, by key: the pairs in order of first
    # appearance broke the ties as Counter did. A bincount and a minimum.at over the keys' span
    # (groups x values, small beside the rows), not a hash of every key (4 ms a column at 200k
    # members) nor np.unique's sort of them.
    if span <= 4 * len(key) + 1024:
        binned = np.bincount(key, minlength=span)
        ukey = np.flatnonzero(binned)
        counts = binned[ukey]
        at = np.full(span, len(key), dtype=np.int64)
        np.minimum.at(at, key, np.arange(len(key), dtype=np.int64))
        first = at[ukey]
        # Every row is in one (group, value) cell: a group's size is its cells' sum, not a
        # bincount of the rows again.
        sizes = binned.reshape(-1, len(names)).sum(axis=1)
    else:
        kcodes, ukey = pd.factorize(key)
        seen = np.maximum.accumulate(kcodes)
        first = np.flatnonzero(np.concatenate(([True], seen[1:] > seen[:-1])))
        counts = np.bincount(kcodes, minlength=len(ukey))
        sizes = np.bincount(codes)
    group, value = ukey // len(names), ukey % len(names)
    return _ranked_shares(group, value, counts, first, sizes, names, top)


def _ranked_shares(
    group: np.ndarray,
    value: np.ndarray,
    counts: np.ndarray,
    first: np.ndarray,
    sizes: np.ndarray,
    names: list[str],
    top: int | None,
) -> dict[int, dict[str, float]]:
    """Each group's {name: share} from its (group, value) pairs' counts, most common first, ties
    by first row, its `top` kept. Ranked, cut and divided as arrays: a Python step per pair cost
    0.13 s for a column of 40 values over ~370 clusters (15k pairs). The shares are the Python
    ones: int / int and float64 division round alike below 2**53, and round() is Python's."""
    order = np.lexsort((first, -counts, group))
    ranked = group[order]
    if top is not None:
        # A pair's rank in its group: its position past the group's first in `order`.
        kept = np.arange(len(order)) - np.searchsorted(ranked, ranked, side="left") < top
        order, ranked = order[kept], ranked[kept]
    shares = [round(x, 3) for x in (counts[order] / np.maximum(sizes[ranked], 1)).tolist()]
    labels = [names[v] for v in value[order].tolist()]
    cuts = np.flatnonzero(ranked[1:] != ranked[:-1]) + 1
    starts, ends = [0, *cuts.tolist()], [*cuts.tolist(), len(order)]
    return {int(ranked[a]): dict(zip(labels[a:b], shares[a:b])) for a, b in zip(starts, ends) if b > a}


def _unique_names(names: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct names in first-seen order, and each input's position among them."""
    pos: dict[str, int] = {}
    merged = np.array([pos.setdefault(n, len(pos)) for n in names], dtype=np.int64)
    return list(pos), merged


def group_codes(positions: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Each of `n` rows' group number (its place in `positions`, e.g. a groupby's `.indices`
    values), -1 for a row in no group: the codes `group_shares` counts by."""
    codes = np.full(n, -1, dtype=np.int64)
    for code, idx in enumerate(positions):
        codes[idx] = code
    return codes


def group_rows(codes: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Each group's row positions in row order (what a groupby's `.indices` holds), from the
    rows' group numbers (-1: in no group); the inverse of `group_codes`. One stable sort of the
    codes, not a groupby whose groups are copies."""
    codes = np.asarray(codes, dtype=np.int64)
    # Narrowed where the groups fit: numpy sorts 16-bit integers by radix, stably, in a quarter
    # of the int64 merge sort's time (2M members' codes: 0.09 s -> 0.02 s a night at 1M cases);
    # a stable sort's order is the same whatever the type.
    fits = n_groups < 2**15 and (not len(codes) or int(codes.max()) < 2**15)
    small = codes.astype(np.int16) if fits else codes
    order = np.argsort(small, kind="stable")
    start = int(np.count_nonzero(codes < 0))  # the rows in no group sort first
    ends = start + np.cumsum(np.bincount(codes[codes >= 0], minlength=n_groups))
    return np.split(order, [start, *ends[:-1].tolist()])[1:] if n_groups else []


def format_shares(shares: dict[str, float], top: int) -> str:
    """ "华东 43%, 华北 20%": how analysts quote impact."""
    known = [(k, v) for k, v in shares.items() if k != "未知"]  # sources without region say nothing
    return ", ".join(f"{k} {round(v * 100)}%" for k, v in known[:top])


def _mean(values: Iterable[Any]) -> float | None:
    arr = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(float(np.mean(arr)), 3) if arr else None


@dataclass
class ScopeResult:
    """One scope's clusters (rows keyed by local label), member labels and centroids."""

    scope: str
    clusters: pd.DataFrame
    labels: np.ndarray
    centroids: dict[int, np.ndarray]
    row_index: np.ndarray | None = None  # positions of the scope's rows in the selected frame
    fit: ClusterFit | None = None  # the space and centres new cases are assigned in until the next re-cluster
    # Per cluster its rows' similarity to its centroid (float32 vectors), in row order: the product
    # its representatives were picked by, which the assignment radii (`fit_models`) are cut from,
    # so the cluster's rows are gathered once, not again there.
    sims: dict[int, np.ndarray] = field(default_factory=dict)


# The case columns whose mix `describe_scope` reports per cluster, and how many values each keeps.
_MIX_FIELDS = {"outcome": None, "region": None, "product": None, "emotion": None, "channel": None, "issue_type": 3}
_TEXT_BLOCK = 4096  # a cluster's texts read for its causes at a time


def describe_scope(
    scope: str,
    frame: pd.DataFrame,
    X: Vectors,
    labels: np.ndarray,
    tokens: Sequence[Sequence[str]] | TokenCodes,
    lexicon: CauseLexicon,
    cfg: Config,
    stopwords: frozenset[str] = frozenset(),
    rows: np.ndarray | None = None,
) -> ScopeResult:
    """One row per cluster of a scope: label, terms, representatives, size, shares, mix, causes.
    `labels` and `tokens` are the scope's; `frame` and `X` are the scope's rows, or, with `rows`
    (the scope's positions in them), every case's: a cluster's rows are then read where they
    are, with no copy of the scope's fields and vectors held through the scope.

    Per cluster only its vectors are copied (the representatives' similarities are the product
    of that very matrix: BLAS rounds a row's dot product by its place in the matrix); the mix of
    every cluster is counted in one pass over the columns' codes, and the causes from its texts a
    block at a time. The per-cluster copies of the fields, texts and float64 vectors these
    replaced were the cross-type scope's peak (~0.7 KiB a case) and stayed in glibc's heap."""
    c = cfg.cluster
    terms = class_tfidf(tokens, labels, c.top_terms, stopwords, c.label_min_lift)
    release_unused_memory()  # the term counts' arrays, before the clusters' rows are read
    labs = np.asarray(labels, dtype=int)
    found = sorted(set(labs.tolist()) - {NOISE})
    group = np.full(len(labs), -1, dtype=np.int64)  # each scope row's place in `found`, -1: noise
    kept = labs != NOISE
    group[kept] = np.searchsorted(np.asarray(found, dtype=labs.dtype), labs[kept])
    at_rows = np.asarray(rows) if rows is not None else None
    mix = _cluster_mix(frame, group, at_rows)
    scores = frame["emotion_score"].to_numpy() if "emotion_score" in frame else None
    out, cents, sims = [], {}, {}
    scope_size = len(labels)  # the scope frame's length when it was a copy of the scope's rows
    for g, (lab, idx) in enumerate(zip(found, group_rows(group, len(found)))):
        at = idx if at_rows is None else at_rows[idx]  # the cluster's rows of `frame` and `X`
        cents[lab], cluster_sims = centroid_and_sims(X, at)
        if X.dtype == np.float32:  # the product `fit_models` would make of these rows
            sims[lab] = cluster_sims
        reps = [int(at[i]) for i in np.argsort(-cluster_sims, kind="stable")[: c.representatives]]
        top = [t for t, _ in terms.get(lab, [])]
        rep_texts = frame["cluster_text"].iloc[reps].tolist()
        shares = {col: mix[col].get(g, {}) for col in mix}
        outcome, regions, products = shares.get("outcome", {}), shares.get("region", {}), shares.get("product", {})
        out.append(
            {
                "scope": scope,
                "local_label": lab,
                "label": label_from_terms(top, rep_texts[0] if rep_texts else "", c.label_terms),
                "top_terms": top,
                "size": int(len(idx)),
                "scope_size": scope_size,
                "share_of_scope": round(len(idx) / max(scope_size, 1), 4),
                **{f"share_{k}": outcome.get(k, 0.0) for k in OUTCOME_KEYS},
                "mean_emotion": _mean(scores[at]) if scores is not None else None,
                "top_emotion": next(iter(shares["emotion"].keys()), None) if "emotion" in shares else None,
                "channels": json.dumps(shares.get("channel", {}), ensure_ascii=False),
                "issue_types": json.dumps(shares["issue_type"], ensure_ascii=False),  # KeyError without, as before
                "top_regions": format_shares(regions, c.top_breakdown),
                "top_products": format_shares(products, c.top_breakdown),
                "representative_case_ids": frame["case_id"].iloc[reps].astype(str).tolist()
                if "case_id" in frame
                else [],
                "representative_texts": rep_texts,
                **_causes(lexicon, frame["cluster_text"], at, c.cause_min_share),
                "cause_suggested": True,
            }
        )
        # The texts just read, where the export maps them: not held until the scope is done
        # (the cross-type scope reads every case's text, and that grew with the history).
        release_mapped_pages()
    return ScopeResult(scope, pd.DataFrame(out), labs, cents, sims=sims)


def _cluster_mix(
    frame: pd.DataFrame, group: np.ndarray, rows: np.ndarray | None
) -> dict[str, dict[int, dict[str, float]]]:
    """Per `_MIX_FIELDS` column of `frame`: each cluster's `share_dict` of its rows' values (by
    its place in `group`; `rows`: the scope's rows of `frame`, None for all), all clusters
    counted in one pass over the column's codes (`coded_shares`: the same shares and order)."""
    out = {}
    for col, top in _MIX_FIELDS.items():
        if col in frame:
            vcodes, uniques = column_codes(frame[col])
            out[col] = coded_shares(group, vcodes if rows is None else vcodes[rows], uniques, top)
    return out


def _causes(lexicon: CauseLexicon, texts: pd.Series, at: np.ndarray, min_share: float) -> dict[str, Any]:
    """`lexicon.attribute` of the texts at rows `at`, read a block at a time: a list of every
    text of a large cluster was Python strings by the tens of thousands."""
    phrase_hits: Counter = Counter()
    cat_hits: Counter = Counter()
    for a in range(0, len(at), _TEXT_BLOCK):
        lexicon.count_hits(texts.iloc[at[a : a + _TEXT_BLOCK]].tolist(), phrase_hits, cat_hits)
    return lexicon.attribution(phrase_hits, cat_hits, len(at), min_share)


def cluster_cases(
    frame: pd.DataFrame,
    X: Vectors,
    cfg: Config,
    lexicon: CauseLexicon,
    cut: Cutter | None = None,
    stopwords: frozenset[str] = frozenset(),
    params: ClusterParams | None = None,
    seeds: dict[str, np.ndarray] | None = None,
    tokens: TokenCodes | Callable[[], TokenCodes] | None = None,
) -> list[ScopeResult]:
    """Cluster the selected cases within each issue type and across all of them. Returns one
    ScopeResult per scope; `labels` are aligned with the scope's rows of `frame` (in order).
    `seeds`: per scope, the stored centroids its KMeans starts from (stable ids). `tokens`: the
    cases' `token_codes` when the caller made them (and let the frame's token lists go), or what
    makes them: called after the first scope's fit, so the cross-type KMeans search (a
    re-cluster's peak) runs without every case's codes (4 bytes a token) held."""
    params = params or ClusterParams.from_config(cfg)
    stopwords = stopwords | lexicon.label_stopwords | label_stopwords(cfg)
    if tokens is None:
        tokens = token_codes(frame, cut)
    # The tokens are read from `tokens` only; the scopes' frames leave them out.
    cases = frame.drop(columns=["tokens"]) if "tokens" in frame else frame
    if isinstance(X, np.ndarray):
        X = np.ascontiguousarray(X)  # what X[idx] gave each scope: a C-ordered array
    results = []
    scopes: list[tuple[str, np.ndarray]] = []
    if cfg.cluster.cluster_across_all:
        scopes.append((ALL_SCOPE, np.arange(len(frame))))
    if cfg.cluster.cluster_within_issue_types:
        for it, idx in frame.groupby("issue_type", sort=True).indices.items():
            scopes.append((str(it), np.asarray(idx)))
    for scope, idx in scopes:
        # Every scope reads the whole frame and vectors at its rows: copies of a scope's fields
        # and vectors (X[idx]) were held through its KMeans search and its description, and
        # grew with the history. The cross-type scope is every row in order: no rows at all.
        whole = len(idx) == len(frame) and bool((idx == np.arange(len(frame))).all())
        rows = None if whole else idx
        fit = fit_clusters(X, params, (seeds or {}).get(scope), rows=rows)
        if not isinstance(tokens, TokenCodes):
            tokens = tokens()
        scope_tokens = tokens if whole else tokens.take(idx)
        res = describe_scope(scope, cases, X, fit.labels, scope_tokens, lexicon, cfg, stopwords, rows=rows)
        res.row_index = idx
        res.fit = fit
        results.append(res)
        # What the scope freed (its clusters' rows, its KMeans fits) back to the OS: kept by
        # glibc it grew with the history, and the next scope's silhouette matrix (mapped afresh,
        # never from that free memory) came on top of it.
        release_unused_memory()
    return results


# -- stable ids ---------------------------------------------------------------------------------


def match_centroids(prev: np.ndarray, new: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(prev_row, new_row, cosine) pairs from a Hungarian assignment maximising total cosine,
    keeping only pairs at or above `threshold`: each old cluster passes its id to at most one
    new cluster, and a new cluster unlike every old one gets a new id."""
    if len(prev) == 0 or len(new) == 0:
        return []
    from scipy.optimize import linear_sum_assignment

    sim = np.asarray(new, dtype=np.float64) @ np.asarray(prev, dtype=np.float64).T
    rows, cols = linear_sum_assignment(-sim)
    return [(int(c), int(r), round(float(sim[r, c]), 4)) for r, c in zip(rows, cols) if sim[r, c] >= threshold]


@dataclass
class ClusterState:
    """What survives between nightly exports: each cluster's id, scope, centroid, history."""

    table: pd.DataFrame  # cluster_id, scope, centroid, first_seen, last_seen, label_history, size_history

    COLUMNS = ("cluster_id", "scope", "centroid", "first_seen", "last_seen", "label_history", "size_history")

    @classmethod
    def empty(cls) -> ClusterState:
        return cls(pd.DataFrame({c: pd.Series(dtype=object) for c in cls.COLUMNS}))

    def next_number(self) -> int:
        nums = [int(m.group(1)) for v in self.table["cluster_id"] if (m := re.fullmatch(r"C(\d+)", str(v)))]
        return max(nums, default=0) + 1

    def in_scope(self, scope: str, dim: int) -> pd.DataFrame:
        t = self.table[self.table["scope"] == scope]
        return t[t["centroid"].map(lambda v: len(_as_list(v)) == dim)]


def _history(raw: Any) -> list[dict[str, Any]]:
    try:
        return json.loads(raw) if isinstance(raw, str) and raw else []
    except json.JSONDecodeError:
        return []


def _with_entry(history: list[dict[str, Any]], day: str, key: str, value: Any, dedupe: bool) -> list[dict[str, Any]]:
    """History with today's value: a same-day re-export replaces today's entry, and a label that
    did not change is not repeated (so label history lists real renames only)."""
    h = [e for e in history if e.get("date") != day]
    if dedupe and h and h[-1].get(key) == value:
        return h
    return h + [{"date": day, key: value}]


def assign_stable_ids(
    results: list[ScopeResult], state: ClusterState, day: str, threshold: float
) -> tuple[pd.DataFrame, ClusterState]:
    """Give every cluster of today an id: the stored id it matches (cosine >= threshold), else
    a new one (flagged `is_new`). Returns today's cluster table and the updated state."""
    rows: list[dict[str, Any]] = []
    updated: list[dict[str, Any]] = []
    next_no = state.next_number()
    for res in results:
        if res.clusters.empty:
            continue
        labs = res.clusters["local_label"].tolist()
        new_c = np.stack([res.centroids[int(lab)] for lab in labs])
        prev = state.in_scope(res.scope, new_c.shape[1])
        prev_c = (
            np.stack([np.asarray(_as_list(v), dtype=np.float32) for v in prev["centroid"]])
            if len(prev)
            else np.zeros((0, new_c.shape[1]))
        )
        matches = {n: (p, s) for p, n, s in match_centroids(prev_c, new_c, threshold)}
        for j, row in enumerate(cast(list[dict[str, Any]], res.clusters.to_dict("records"))):
            if j in matches:
                p, sim = matches[j]
                old = prev.iloc[p]
                cid, first_seen, is_new = old["cluster_id"], old["first_seen"], False
                labels_h, sizes_h = _history(old["label_history"]), _history(old["size_history"])
            else:
                cid, first_seen, is_new, sim = f"C{next_no:04d}", day, True, None
                next_no += 1
                labels_h, sizes_h = [], []
            before = [e for e in sizes_h if e.get("date") != day]
            prev_size = int(before[-1]["size"]) if before else None
            labels_h = _with_entry(labels_h, day, "label", row["label"], dedupe=True)
            sizes_h = _with_entry(sizes_h, day, "size", int(row["size"]), dedupe=False)
            rows.append(
                {
                    "cluster_id": cid,
                    **row,
                    "is_new": is_new,
                    "match_similarity": sim,
                    "first_seen": first_seen,
                    "previous_size": prev_size,
                    "growth": (int(row["size"]) - prev_size) if prev_size is not None else None,
                    "label_history": json.dumps(labels_h, ensure_ascii=False),
                }
            )
            updated.append(
                {
                    "cluster_id": cid,
                    "scope": res.scope,
                    "centroid": new_c[j].astype(float).tolist(),
                    "first_seen": first_seen,
                    "last_seen": day,
                    "label_history": json.dumps(labels_h, ensure_ascii=False),
                    "size_history": json.dumps(sizes_h, ensure_ascii=False),
                }
            )
    clusters = pd.DataFrame(rows)
    if not clusters.empty:
        # Cross-type clusters first, then each issue type's, largest first.
        clusters = (
            clusters.assign(_all=clusters["scope"] != ALL_SCOPE)
            .sort_values(["_all", "scope", "size"], ascending=[True, True, False], kind="stable")
            .drop(columns="_all")
            .reset_index(drop=True)
        )
    seen = {u["cluster_id"] for u in updated}
    # Clusters not seen today stay in the state (a cause can come back after a quiet week).
    kept = state.table[~state.table["cluster_id"].isin(seen)]
    new_table = (
        pd.concat([kept, pd.DataFrame(updated, columns=list(ClusterState.COLUMNS))], ignore_index=True)
        if len(kept)
        else pd.DataFrame(updated, columns=list(ClusterState.COLUMNS))
    )
    return clusters, ClusterState(new_table)


# The case fields a members row carries (cluster_text is shown as `problem`); the incremental
# export builds the same rows from stored membership.
MEMBER_FIELDS = (
    "case_id",
    "conversation_id",
    "date",
    "channel",
    "region",
    "product",
    "issue_type",
    "request_kind",
    "urgency",
    "outcome",
    "emotion",
    "emotion_score",
    "cluster_text",
)


def members_table(
    frame: pd.DataFrame, results: list[ScopeResult], clusters: pd.DataFrame, X: np.ndarray
) -> pd.DataFrame:
    """One row per (case, scope): its stable cluster id (None for noise) and cosine to the
    cluster's centroid, with the case fields an analyst filters on."""
    return members_with_fields(frame, results, member_heads(results, clusters, X))


def member_heads(results: list[ScopeResult], clusters: pd.DataFrame, X: Vectors) -> pd.DataFrame | None:
    """The members table's own columns (scope, cluster id, noise, similarity), every scope's rows
    in `members_table`'s order; None without results. Apart from `members_with_fields` so a
    re-cluster can let the vectors go before the case fields are copied for 2 rows a case: the
    two were held together at its peak. Each column is built as one array: Python lists of
    every member's id, flag and similarity (about 70 bytes a row) were held beside them."""
    ids = (
        {(r["scope"], int(r["local_label"])): r["cluster_id"] for r in clusters.to_dict("records")}
        if len(clusters)
        else {}
    )
    if not results:
        return None
    heads = []
    for res in results:
        idx = res.row_index if res.row_index is not None else np.arange(len(res.labels))
        labels = np.asarray(res.labels)
        noise = labels == NOISE
        head = pd.DataFrame(index=pd.RangeIndex(len(idx)))
        head.insert(0, "scope", res.scope)
        head.insert(1, "cluster_id", _head_ids(ids, res.scope, labels, noise))
        head.insert(2, "is_noise", noise)
        head.insert(3, "similarity", _head_similarities(X, np.asarray(idx), labels, noise, res.centroids))
        heads.append(head)
    return pd.concat(heads, ignore_index=True)


def _head_ids(ids: dict[tuple[str, int], Any], scope: str, labels: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Each row's stable cluster id, None for noise: an object array of the few id strings (the
    column pandas infers from it is the one it inferred from the list of them)."""
    uniq, inv = np.unique(labels, return_inverse=True)
    names = np.empty(len(uniq), dtype=object)
    names[:] = [ids.get((scope, int(lab))) if lab != NOISE else None for lab in uniq]
    return names[inv.reshape(-1)] if len(labels) else np.empty(0, dtype=object)


_HEAD_ROWS = 4096  # vectors `_head_similarities` gathers at a time


def _head_similarities(
    X: Vectors, idx: np.ndarray, labels: np.ndarray, noise: np.ndarray, centroids: dict[int, np.ndarray]
) -> np.ndarray:
    """Each row's cosine to its cluster's centroid rounded to 4 places, NaN for noise (None
    throughout when every row is noise: the object column a list of Nones made). Still one dot
    product per row (a matrix product rounds a row by its place in the matrix) of rows gathered a
    block at a time, and Python's `round` (numpy's rounds some halves the other way)."""
    if noise.all():
        return np.full(len(labels), None, dtype=object)
    out = np.full(len(labels), np.nan)
    for a in range(0, len(idx), _HEAD_ROWS):
        block = X[idx[a : a + _HEAD_ROWS]]
        for j in np.flatnonzero(~noise[a : a + _HEAD_ROWS]).tolist():
            out[a + j] = round(float(block[j] @ centroids[int(labels[a + j])]), 4)
    return out


def members_with_fields(
    frame: pd.DataFrame,
    results: list[ScopeResult],
    heads: pd.DataFrame | None,
    blank: Sequence[str] = (),
) -> pd.DataFrame:
    """`heads` (`member_heads`) beside the case fields of each row's case: no vectors read.
    `blank`: fields left null in the rows after the leading cross-type scope's (`_fields_at`)."""
    if heads is None:
        return pd.DataFrame(columns=["scope", "cluster_id", "is_noise"])
    fields = frame[[c for c in MEMBER_FIELDS if c in frame]].reset_index(drop=True)
    body = _fields_at(fields, scope_member_rows(results), blank).rename(columns={"cluster_text": "problem"})
    return pd.concat([heads, body], axis=1)


def scope_member_rows(results: list[ScopeResult]) -> list[np.ndarray]:
    """Each scope's members' frame rows, in the members table's order."""
    return [
        np.asarray(res.row_index if res.row_index is not None else np.arange(len(res.labels)), dtype=np.int64)
        for res in results
    ]


def leads_in_order(rows: list[np.ndarray], n: int) -> bool:
    """Whether the first scope's rows are every one of `n` cases in order (the cross-type scope)."""
    return bool(rows) and len(rows[0]) == n and bool(np.array_equal(rows[0], np.arange(n)))


def _fields_at(fields: pd.DataFrame, rows: list[np.ndarray], blank: Sequence[str] = ()) -> pd.DataFrame:
    """The case fields of every scope's rows, in order. A leading scope of every row in order
    (the cross-type scope) is the frame's own columns (Arrow's shared, not copied: a copy of
    every case's text and fields, about half the members table, was held through the tables),
    the other scopes' rows picked in one take: copying the fields per scope and concatenating
    the copies held every member's fields twice. `blank` (Arrow columns only; with a leading
    scope only): null in the other scopes' rows, not copied, for a table only the counts read
    (the per-type rows' texts, the members file's alone, were held through every table)."""
    n = len(fields)
    if not leads_in_order(rows, n):
        return fields.iloc[np.concatenate(rows)].reset_index(drop=True)
    if len(rows) == 1:
        return fields
    taken = np.concatenate(rows[1:])
    nulls = [c for c in blank if c in fields and arrow_backed(fields[c])]
    rest = fields.drop(columns=nulls).iloc[taken]
    if nulls:
        none = np.full(len(taken), -1, dtype=np.int64)
        rest = rest.assign(**{c: fields[c].array.take(none, allow_fill=True) for c in nulls})[fields.columns]
    return pd.concat([fields, rest], ignore_index=True)
