"""The stored jieba tokens of the cases a re-cluster labels, encoded a block of parts at a time.

Why: a back-fill's export re-clusters every stored case and labels the clusters from their
tokens. Read at once (every part's list<string> tokens, then the newest rows filtered, joined
and taken into the cases' order: a copy each), they raised the export's memory by ~1.1 KiB a
stored case, the re-cluster's second holder after its descriptions. Here only the parts' ids and
runs are read whole (to pick each case's newest row); the tokens are read a block of parts at a
time, the rows the cases need taken and encoded to int32 codes, and the strings let go before
the next block: the codes, 4 bytes a token, are what is held.

The result is the `TokenCodes` of the all-at-once form exactly (`token_codes` of the Arrow column
`_with_tokens` built): the same codes, and the vocabulary numbered by each word's first place
among the cases' tokens in their order, as Arrow's dictionary encoding of them numbered it.

`spilled` then keeps the codes in an unnamed file, mapped: a re-cluster reads them for each
scope's description but held them, about 110 bytes a case, through every per-type scope's fit
as well (the largest thing still growing under the fits at 400k stored cases: 44 MiB).
"""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.heap import release_unused_memory
from pipeline.insights.cluster import TokenCodes
from pipeline.insights.member_rows import index_in
from pipeline.storage.store import newest_row_mask, read_parts, stored_parts

# A block of parts is read at a time up to this many parts or this many rows (one larger part
# is a block of its own): a back-fill stores thousands of parts of a few cases, and each table
# read holds its own buffers, so small parts are read together (as `read_parts` joins them).
# Reading a block's list<string> from Parquet takes ~1.5 KiB a row of working memory, kept by
# Arrow's pool: 32,768 rows a block raised the RSS by 48 MiB, 8,192 by 21 (200k cases, 57 parts).
_BLOCK_PARTS = 32
_BLOCK_ROWS = 8_192
_RENUMBER_TOKENS = 1 << 20  # codes renumbered at a time


def stored_token_codes(out: Path, case_ids: pa.Array) -> TokenCodes:
    """Each case's (`case_ids`, in order) tokens of its newest stored row, as `read_cases` picks
    it, as codes; a case with no stored row, or null or empty tokens there, has none."""
    files = stored_parts(Path(out))
    src = _source_rows(files, case_ids)
    release_unused_memory()  # the ids' and runs' read and sort, before the tokens are read
    blocks = _blocks([pq.read_metadata(f).num_rows for f in files])
    order = np.argsort(src, kind="stable")  # the cases by their stored row, the unmatched (-1) first
    bounds = np.searchsorted(src[order], [start for start, _, _ in blocks] + [blocks[-1][1] if blocks else 0])
    vocab: dict[str, int] = {}
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for (start, _, (f0, f1)), a, b in zip(blocks, bounds[:-1], bounds[1:]):
        if b > a:
            rows = order[a:b]
            lens, codes = _encode_block(files[f0:f1], src[rows] - start, vocab)
            parts.append((rows, lens, codes))
    # What the blocks' reads freed, kept by Arrow's pool and glibc, back before the codes are
    # placed (the assembly's arrays came on top of it).
    release_unused_memory()
    return _assemble(len(src), parts, vocab)


def _source_rows(files: list[Path], case_ids: pa.Array) -> np.ndarray:
    """Each case's newest stored row, numbered across `files` in order (-1: none)."""
    keys = read_parts(files, ["case_id", "run_id"])
    newest = np.flatnonzero(newest_row_mask(keys))
    ids = keys["case_id"].combine_chunks().take(pa.array(newest)).cast(pa.large_string())
    del keys
    pos = index_in(case_ids, ids)
    src = np.full(len(pos), -1, dtype=np.int64)
    found = pos >= 0
    src[found] = newest[pos[found]]
    return src


def _blocks(rows_per_file: list[int]) -> list[tuple[int, int, tuple[int, int]]]:
    """(first row, end row, (first file, end file)) of each block of files read together."""
    out = []
    start = first = rows = 0
    for i, n in enumerate(rows_per_file):
        if i > first and (i - first == _BLOCK_PARTS or rows + n > _BLOCK_ROWS):
            out.append((start, start + rows, (first, i)))
            start, first, rows = start + rows, i, 0
        rows += n
    if rows_per_file:
        out.append((start, start + rows, (first, len(rows_per_file))))
    return out


def _encode_block(files: list[Path], rows: np.ndarray, vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The tokens at `rows` of these files read together: each list's length (a null list: 0)
    and its tokens as codes of `vocab` (new words added; a null token is the word "", as the
    all-at-once encoding filled it)."""
    col = read_parts(files, ["tokens"])["tokens"]
    lists = (col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).take(pa.array(rows))
    del col
    lens = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    enc = pc.dictionary_encode(pc.fill_null(pc.list_flatten(lists), ""))
    del lists
    words = np.fromiter(
        (vocab.setdefault(w, len(vocab)) for w in enc.dictionary.to_pylist()), dtype=np.int32, count=len(enc.dictionary)
    )
    codes = words[np.asarray(enc.indices.to_numpy(zero_copy_only=False))]
    return lens, codes.astype(np.int32, copy=False)


def _assemble(n: int, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], vocab: dict[str, int]) -> TokenCodes:
    """The blocks' codes placed in the cases' order, the words renumbered by first use."""
    lens = np.zeros(n, dtype=np.int64)
    for rows, block_lens, _ in parts:
        lens[rows] = block_lens
    offsets = _offsets(lens)
    codes = np.empty(int(offsets[-1]), dtype=np.int32)
    while parts:
        rows, block_lens, block_codes = parts.pop()  # each block's codes let go once placed
        # Token j of the block goes to its case's offset plus its place in the case's list.
        at = np.repeat(offsets[rows] - _offsets(block_lens)[:-1], block_lens) + np.arange(len(block_codes))
        codes[at] = block_codes
    words = list(vocab)
    del vocab
    renumber = _first_use(codes, len(words))
    for a in range(0, len(codes), _RENUMBER_TOKENS):
        codes[a : a + _RENUMBER_TOKENS] = renumber[codes[a : a + _RENUMBER_TOKENS]]
    ordered = [""] * len(words)
    for old, new in enumerate(renumber.tolist()):
        ordered[new] = words[old]
    return TokenCodes(ordered, codes, offsets)


def _offsets(lens: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def _first_use(codes: np.ndarray, n_words: int) -> np.ndarray:
    """Each code's rank among the codes by where it first occurs in `codes` (every code
    occurs), found a block at a time: the numbering a dictionary encoding of them gives."""
    renumber = np.full(n_words, -1, dtype=np.int32)
    seen = 0
    for a in range(0, len(codes), _RENUMBER_TOKENS):
        uniq, first = np.unique(codes[a : a + _RENUMBER_TOKENS], return_index=True)
        new = renumber[uniq] < 0
        fresh = uniq[new][np.argsort(first[new])]
        renumber[fresh] = np.arange(seen, seen + len(fresh), dtype=np.int32)
        seen += len(fresh)
    return renumber


def spilled(tokens: TokenCodes, folder: Path) -> TokenCodes:
    """The same `TokenCodes` with its offsets and codes in an unnamed temporary file under
    `folder` (gone when the last array of it goes, or on a crash), mapped read-only.

    Why: between the scopes that read them the codes need not be resident. Inside
    `heap.dropping_mapped_pages(folder)` every release point lets their pages go (the page cache
    keeps them), so a scope's fit no longer runs on top of every case's codes; a scope that reads
    them maps them back. The arrays are read-only: nothing writes the codes after they are made."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    offsets = np.ascontiguousarray(tokens.offsets, dtype=np.int64)
    codes = np.ascontiguousarray(tokens.codes, dtype=np.int32)
    with tempfile.TemporaryFile(dir=folder) as f:
        f.write(offsets.data)  # never empty: the offsets hold at least their leading 0
        if len(codes):
            f.write(codes.data)
        f.flush()
        # The map keeps its own handle on the file: closing ours here leaves it mapped.
        view = mmap.mmap(f.fileno(), offsets.nbytes + codes.nbytes, access=mmap.ACCESS_READ)
    return TokenCodes(
        tokens.vocab,
        np.frombuffer(view, dtype=np.int32, count=len(codes), offset=offsets.nbytes),
        np.frombuffer(view, dtype=np.int64, count=len(offsets)),
        tokens._terms,
    )
