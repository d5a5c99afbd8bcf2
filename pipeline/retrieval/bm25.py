"""BM25 over the cases' tokens (bm25s), stored with each index version."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _bm25s():
    import logging

    import bm25s

    # bm25s sets its own logger to DEBUG at import, so its "Building index" lines reach any
    # handler the process has (a piped run printed them); warnings still pass.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class Bm25:
    """BM25 (Lucene variant, bm25s) over pre-tokenised documents, one per metadata row.

    Stored with each index version, so a cold query process loads it in milliseconds instead
    of re-indexing every case (about 4 s per 100k cases on two cores).
    """

    def __init__(self, docs: Sequence[Sequence[str]], k1: float = 1.2, b: float = 0.75):
        bm25s = _bm25s()
        self.n = len(docs)
        self._r = bm25s.BM25(k1=k1, b=b)
        # bm25s rejects an empty corpus and empty docs score 0 anyway.
        self._r.index([list(d) if len(d) else [""] for d in docs] or [[""]], show_progress=False)

    def save(self, d: Path) -> None:
        self._r.save(str(d))

    @classmethod
    def load(cls, d: Path, n: int) -> Bm25:
        bm25s = _bm25s()
        self = cls.__new__(cls)
        self.n = n
        self._r = bm25s.BM25.load(str(d))
        return self

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        toks = [t for t in query_tokens if t in self._r.vocab_dict]
        if not toks or self.n == 0:
            return np.zeros(self.n, dtype=np.float32)
        return np.asarray(self._r.get_scores(toks), dtype=np.float32)[: self.n]
