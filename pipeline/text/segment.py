"""Chinese word segmentation with jieba, a domain dictionary, stop words and keywords.

Why our own wrapper: jieba alone splits placeholders (`<PHONE>` -> `<`, `PHONE`, `>`) and does not
know 七天无理由 or 工单; and jieba's own `enable_parallel` forks the whole process and only splits
by lines. Here placeholders pass through whole, the domain dictionary is loaded once per process,
and large batches go to a spawn-based pool (safe when torch is loaded in the parent).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from multiprocessing.pool import Pool
from pathlib import Path

import jieba

from pipeline.config import Config
from pipeline.resources import cached
from pipeline.text.mask import PLACEHOLDER_RE

jieba.setLogLevel(logging.WARNING)

# A token worth keeping has a letter, digit or CJK character; punctuation and spaces are dropped.
_CONTENT_RE = re.compile(r"[0-9A-Za-z\u3400-\u4dbf\u4e00-\u9fff]")
_SPLIT_RE = re.compile(f"({PLACEHOLDER_RE.pattern})")


def read_wordlist(path: Path) -> frozenset[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return frozenset(w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#"))


def _tokenizer(user_dict: str) -> jieba.Tokenizer:
    """jieba with the user dictionary loaded (about 2 s), shared per process until the file changes."""

    def build() -> jieba.Tokenizer:
        tok = jieba.Tokenizer()
        tok.load_userdict(user_dict)
        return tok

    return cached(("jieba_tokenizer", user_dict), [Path(user_dict)], build)


class Segmenter:
    """`cut` one text or `cut_many` a batch into content tokens; `keywords` ranks them by TF-IDF.

    Construction is cheap; the jieba dictionary loads on first use and is shared per process.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.user_dict = str(cfg.resolve(cfg.segment.user_dict))
        stop = cfg.resolve(cfg.segment.stopwords)
        self.stopwords = cached(("stopwords", str(stop)), [stop], lambda: read_wordlist(stop))
        self._pool: Pool | None = None
        self._tok: jieba.Tokenizer | None = None

    def warm(self) -> None:
        """Load the dictionary and IDF table now (a one-off per process, about 2 s), so the time
        spent segmenting measures segmentation."""
        self.tokenizer  # noqa: B018
        _idf_table()

    def close(self) -> None:
        """Stop the worker pool, if one was started."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @property
    def tokenizer(self) -> jieba.Tokenizer:
        # Held once fetched: `cut` asks for it per chunk, and a file check per chunk would cost.
        if self._tok is None:
            self._tok = _tokenizer(self.user_dict)
        return self._tok

    def cut(self, text: str, keep_stopwords: bool = False) -> list[str]:
        out: list[str] = []
        for chunk in _SPLIT_RE.split(text or ""):
            if not chunk:
                continue
            if PLACEHOLDER_RE.fullmatch(chunk):
                out.append(chunk)
                continue
            # HMM off: its guessed "new words" (个单, 货收) are mostly wrong on chat text; unknown
            # words fall back to characters, which TF-IDF char n-grams and keywords handle.
            for w in self.tokenizer.cut(chunk, HMM=False):
                w = w.strip()
                if w and _CONTENT_RE.search(w) and (keep_stopwords or w not in self.stopwords):
                    out.append(w)
        return out

    def cut_many(self, texts: Sequence[str], processes: int | None = None) -> list[list[str]]:
        """Segment a batch; with many texts, spread chunks over `segment.processes` workers."""
        n_proc = processes or self.cfg.segment.processes
        if n_proc <= 1 or len(texts) < self.cfg.segment.parallel_min_texts:
            return [self.cut(t) for t in texts]
        size = math.ceil(len(texts) / (n_proc * 4))
        chunks = [list(texts[i : i + size]) for i in range(0, len(texts), size)]
        if self._pool is None:
            # Started once and reused for every later batch: a worker costs about a second to
            # start (interpreter, jieba dictionary), which only pays off if it stays.
            self._pool = mp.get_context("spawn").Pool(n_proc, initializer=_init_worker, initargs=(self.cfg,))
        parts = self._pool.map(_cut_chunk, chunks)
        return [toks for part in parts for toks in part]

    def keywords(self, tokens: Sequence[str], k: int | None = None) -> list[str]:
        """Top-k tokens by TF-IDF against jieba's bundled IDF table (what `jieba.analyse` uses);
        placeholders and single characters say nothing about the topic and are left out."""
        k = k or self.cfg.segment.keywords_top_k
        idf, median = _idf_table()
        tf = Counter(t for t in tokens if len(t) > 1 and not PLACEHOLDER_RE.fullmatch(t) and not t.isdigit())
        scored = sorted(tf.items(), key=lambda kv: (-kv[1] * idf.get(kv[0], median), kv[0]))
        return [w for w, _ in scored[:k]]


@lru_cache(maxsize=4)
def shared_segmenter(cfg: Config) -> Segmenter:
    """One Segmenter (and its worker pool) per process and config, for callers that run batch
    after batch in the same process (Prefect tasks): the pool starts once, not once per batch."""
    import atexit

    seg = Segmenter(cfg)
    atexit.register(seg.close)
    return seg


def tokenize(cfg: Config, text: str) -> list[str]:
    """BM25 tokens of a text (a query, a case), made as case `tokens` are: the one tokenizer
    of the index, search and evaluation."""
    return list(shared_segmenter(cfg).cut(text or ""))


@lru_cache(maxsize=1)
def _idf_table() -> tuple[dict[str, float], float]:
    # Importing jieba.analyse parses its 270k-word IDF file (~0.8 s): only when keywords are asked.
    import jieba.analyse

    return jieba.analyse.default_tfidf.idf_freq, jieba.analyse.default_tfidf.median_idf


_worker: Segmenter | None = None


def _init_worker(cfg: Config) -> None:
    global _worker
    _worker = Segmenter(cfg)
    _worker.tokenizer  # noqa: B018 - load the dictionary once per worker, not per chunk


def _cut_chunk(texts: list[str]) -> list[list[str]]:
    assert _worker is not None
    return [_worker.cut(t) for t in texts]
