"""Each stored case's selection facts (`cluster.problem_facts`), kept between nights beside the
case copy.

Why: a night selects the cases to cluster from every stored problem text, and two of its tests
(whether a problem is its own cluster text, and whether it is long enough) ran a regex and two
length counts over all of them: ~0.15 s a night at 1M stored cases, the same answer each night
for every row but the new ones. The case copy (`pipeline.storage.case_cache`) only grows at its
end between its whole writes, so a row of one copy generation always holds the same case and
problem: the facts are kept per row of a generation and a night computes only the rows added
since (as `member_rows` keeps each member's case row).

Layout: `state/cache/case-facts.arrow` (columns `plain`, `long`), its metadata naming the copy
generation, the rule (`PROBLEM_FACTS_RULE`), `min_chars`, the rows covered and their problem
texts' byte size. It is a cache: written by a rename, never synced; an entry of another
generation (but the one whose rows lead this one, `case_cache.accepts`), rule or `min_chars`,
covering more rows than the copy holds, or whose rows' text size differs from the copy's, is
ignored and written again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.insights.cluster import PROBLEM_FACTS_RULE, ProblemFacts, problem_facts
from pipeline.io import read_cache_table, write_cache_table
from pipeline.storage.case_cache import CopyRows, accepts

_META = b"casemine_case_facts"


def cache_path(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "case-facts.arrow"


def text_bytes(problem: pa.Array, n: int) -> int:
    """The bytes of text the first `n` problems hold: a changed row among them (a copy that is
    not the one the facts were kept for) shows here without reading the texts."""
    if not n:
        return 0
    width = np.int64 if pa.types.is_large_string(problem.type) else np.int32
    offsets = np.frombuffer(problem.buffers()[1], dtype=width)
    return int(offsets[problem.offset + n] - offsets[problem.offset])


def _key(gen: str, min_chars: int) -> dict[str, Any]:
    return {"gen": gen, "rule": PROBLEM_FACTS_RULE, "min_chars": int(min_chars)}


def _load(path: Path, key: dict[str, Any], problem: pa.Array, prefix: CopyRows | None = None) -> ProblemFacts | None:
    """The kept facts of the first rows of `problem` (of generation `key["gen"]`, `prefix`: its
    `case_cache.copy_prefix`), or None when there are none for it."""

    def accept(meta: dict[str, Any]) -> bool:
        n = meta.get("n", -1)  # -1: none, which `accepts` refuses
        return (
            all(meta.get(k) == v for k, v in key.items() if k != "gen")
            and accepts(meta.get("gen"), n, key["gen"], len(problem), prefix)
            and meta.get("bytes") == text_bytes(problem, n)
        )

    got = read_cache_table(path, _META, ["plain", "long"], accept)
    if got is None or len(got[1]) != int(got[0]["n"]):
        return None
    t = got[1]
    return np.asarray(t["plain"].to_numpy(), dtype=bool), np.asarray(t["long"].to_numpy(), dtype=bool)


def _save(path: Path, key: dict[str, Any], facts: ProblemFacts, problem: pa.Array) -> None:
    n = len(facts[0])
    write_cache_table(
        path,
        pa.table({"plain": facts[0], "long": facts[1]}),
        _META,
        {**key, "n": n, "bytes": text_bytes(problem, n)},
        "the case selection facts",
        "the next night tests every problem again",
    )


def kept_problem_facts(
    out: Path, problem: pa.Array, gen: str | None, min_chars: int, prefix: CopyRows | None = None
) -> ProblemFacts:
    """`problem_facts(problem, min_chars)` for `problem`, the problems of the case copy
    generation `gen` (its rows, in order; None: no copy; `prefix`: its `copy_prefix`), computed
    for the rows the kept facts do not cover and kept again (under `gen`: facts kept through the
    prefix cover fewer rows than the rewritten copy, so they are saved again)."""
    if gen is None:
        return problem_facts(problem, min_chars)
    path, key = cache_path(out), _key(gen, min_chars)
    kept = _load(path, key, problem, prefix)
    if kept is not None and len(kept[0]) == len(problem):
        return kept
    if kept is None:
        facts = problem_facts(problem, min_chars)
    else:
        new = problem_facts(problem.slice(len(kept[0])), min_chars)
        facts = (np.concatenate([kept[0], new[0]]), np.concatenate([kept[1], new[1]]))
    _save(path, key, facts, problem)
    return facts
