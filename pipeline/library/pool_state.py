"""The library build's pools, kept between nights so a night selects over its new cases only.

Why: the typical-case library is a diverse pick of the best cases per issue type and root-cause
cluster, and picking it from scratch reads and assesses every stored case (about 10 s a night at
100k, linear in the history). What the pick needs of the old cases is small: each group's best
distinct texts (`candidates._Pools`, with a reserve of the next ones) and the vectors of those a
pick reads. Kept here with what they were made from, a night adds its new cases to them
(`candidates.extend_selection`) and gets the pick a build over everything would make.

That holds only while the old cases are as they were, so a night checks, and builds over
everything when any check fails (the reason is reported):
- the same key: configuration, the scorer's action words, the trained models' files;
- every stored part the pools have read is there unchanged (size and mtime, as the export's case
  copy checks; `casemine repair`, a rewrite or a removed run changes them);
- no case of the new parts was read before (a re-processed conversation replaces an old row);
- the latest export's members table starts with the files the old cases' clusters were read
  from, the same files (hard links of them: name, size, inode), and its further files hold no old
  case: a full re-cluster, or an export that wrote the members whole, changes old cases' clusters.

The file is a cache (`state/cache/library-pools.npz`): written after a build, never fsynced;
a missing, foreign or unreadable file only costs a build over everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.embed.cache import npy_header
from pipeline.io import write_cache
from pipeline.library.candidates import Candidate, Selection, _Pooled, _Pools
from pipeline.library.spill import Spill, SpilledVectors

log = logging.getLogger(__name__)

VERSION = 2  # 2: pools kept with their reserves, vectors for the heads only
Stat = tuple[int, int]
FileId = tuple[str, int, int]  # name, size, inode: a hard link is the same file


def state_file(out: Path) -> Path:
    return Path(out) / "state" / "cache" / "library-pools.npz"


def build_key(cfg: Config, actions: list[str]) -> str:
    """What the pools' scores, issue types, emotion and vectors depend on beyond the cases: the
    configuration, the scorer's action words, and the trained models' files (a model trained
    since classifies old unclassified partitions anew); and what the id hashes depend on."""
    models = cfg.resolve(cfg.paths.models)
    files = []
    if models.is_dir():
        for p in sorted(models.rglob("*")):
            rel = p.relative_to(models).as_posix()
            # The offline embedder's build folder: its identity is the embed section's model.
            if rel.split("/")[0] != "embedder" and p.is_file():
                st = p.stat()
                files.append((rel, st.st_size, st.st_mtime_ns))
    # pandas' version too: the id hashes are its hash_array's, which a release may change.
    blob = json.dumps([VERSION, pd.__version__, cfg.model_dump_json(), actions, files], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def part_stats(root: Path, files: list[Path]) -> dict[str, Stat]:
    out = {}
    for f in files:
        s = f.stat()
        out[f.relative_to(root).as_posix()] = (s.st_size, s.st_mtime_ns)
    return out


def file_ids(files: list[Path]) -> list[FileId]:
    out = []
    for f in files:
        s = f.stat()
        out.append((f.name, s.st_size, s.st_ino))
    return out


def id_hash(ids: Any) -> np.ndarray:
    """Stable 64-bit hashes of case ids, in their order (pandas' SipHash with a fixed key: the
    same in every process, unlike Python's `hash`); a missing id hashed as the text "None"."""
    values = pd.Series(ids, dtype=object).astype(str).to_numpy(dtype=object)
    return pd.util.hash_array(values, categorize=False)


def id_hashes(ids: Any) -> np.ndarray:
    """`id_hash` of case ids, sorted. A collision only makes a night build over everything."""
    return np.sort(id_hash(ids))


def any_seen(seen: np.ndarray, h: np.ndarray) -> bool:
    """Whether any of the hashes `h` (`id_hashes`) is in the sorted `seen`."""
    if not len(h) or not len(seen):
        return False
    at = np.minimum(np.searchsorted(seen, h), len(seen) - 1)
    return bool((seen[at] == h).any())


@dataclass
class PoolState:
    key: str
    parts: dict[str, Stat]  # stored parts read, relative to the cases folder
    members: list[FileId]  # the members files the clusters were read from
    seen: np.ndarray  # id_hashes of every case read
    selection: Selection


def save(path: Path, state: PoolState) -> None:
    """The state as an .npz of four arrays (`load`): the meta (UTF-8 JSON), the pooled entries
    (UTF-8 JSON lines, one an entry), the vectors of the cases a pick reads, the seen id hashes;
    written a piece at a time.

    Why a piece at a time: the meta's JSON text (entries in it), its UTF-8 bytes and the stacked
    vectors made at once were the library build's peak (+102 MiB at a 129k-case history's 28,885
    pooled entries), and they grew with the pools. The entries are JSON-encoded one at a time
    twice, once to size their array and once to write it; the vectors are copied a block at a
    time. Why lines: `load` parses them one at a time too, where one JSON document of them was
    parsed whole into Python objects first (+149 MiB at the same history)."""
    sel = state.selection
    entries: dict[str, _Pooled] = {e.case_id: e for p in sel.pools.pools.values() for e in p}
    # The cases a pick reads have vectors and come first; the reserves' cases have none yet.
    with_vectors = [i for i in entries if i in sel.vectors]
    order = with_vectors + [i for i in entries if i not in sel.vectors]
    head = {
        "version": VERSION,
        "key": state.key,
        "parts": state.parts,
        "members": state.members,
        "n_cases": sel.pools.n_cases,
        "sizes": sel.pools.sizes,
        "cut": sorted(sel.pools.cut),
        "caps": sel.caps,
        "default_cap": sel.default_cap,
        "depths": sel.depths,
        "n_vectors": len(with_vectors),
        "pools": {g: [e.case_id for e in p] for g, p in sel.pools.pools.items()},
    }

    def entry(i: str) -> bytes:
        e = entries[i]
        cand = e.cand  # made from its packed form: once per entry
        row = {
            "case_id": i,
            "issue_type": cand.issue_type,
            "cluster_id": cand.cluster_id,
            "score": cand.score,
            "reasons": cand.reasons,
            "parts": cand.parts,
            "text": e.text,
            "copies": e.stands_for_copies,
        }
        return json.dumps(row, ensure_ascii=False).encode("utf-8")

    meta = json.dumps({**head, "n_entries": len(order)}, ensure_ascii=False).encode("utf-8")
    # A JSON text holds no raw newline (ensure_ascii or not, one in a string is escaped).
    n_lines = sum(len(entry(i)) + 1 for i in order)

    def lines(f: BinaryIO) -> None:
        for i in order:
            f.write(entry(i) + b"\n")

    dim = next(iter(sel.vectors.values())).shape[0] if sel.vectors else 0

    def vectors(f: BinaryIO) -> None:
        for at in range(0, len(with_vectors), _VECTOR_BLOCK):
            block = np.stack([sel.vectors[i] for i in with_vectors[at : at + _VECTOR_BLOCK]])
            f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())

    seen = np.asarray(state.seen, dtype="<u8")
    write_cache(
        path,
        lambda f: _write_npz(
            f,
            [
                ("meta", np.dtype(np.uint8), (len(meta),), lambda g: g.write(meta)),
                ("entries", np.dtype(np.uint8), (n_lines,), lines),
                ("vectors", np.dtype("<f4"), (len(with_vectors), dim), vectors),
                ("seen", seen.dtype, seen.shape, lambda g: g.write(seen.tobytes())),
            ],
        ),
        "the library pools",
        "the next build reads every case",
    )


_VECTOR_BLOCK = 4_096  # vectors copied per write: 6 MiB at 384 dimensions


def _write_npz(f: BinaryIO, arrays: list[tuple[str, np.dtype, tuple[int, ...], Callable[[BinaryIO], Any]]]) -> None:
    """An uncompressed .npz (what `np.savez` writes and `np.load` reads) of arrays given as
    (name, dtype, shape, write-the-C-order-bytes): no array need be in memory whole."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, dtype, shape, body in arrays:
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(member, header)
                counted = _Counted(member)
                body(cast(BinaryIO, counted))
                if counted.n != int(np.prod(shape)) * dtype.itemsize:
                    raise RuntimeError(f"{name}: wrote {counted.n} bytes for shape {shape} of {dtype}")


class _Counted:
    """A writer that counts what passes through it: an array's bytes must fill its shape."""

    def __init__(self, f: Any):
        self.f, self.n = f, 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return self.f.write(b)


def load(path: Path, key: str, spill: Spill | None = None) -> PoolState | str:
    """The saved state, or why there is none to continue from: missing or unreadable, or made
    under another configuration, other models or another version of this file. With `spill`,
    the entries' Candidates and the vectors are kept there (read a block of vectors at a time),
    as the build that continues from them keeps its own."""
    if not path.is_file():
        return "no saved pools"
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = z["meta"]
            # UTF-8 bytes; a file saved before holds a NumPy string.
            meta = json.loads(raw.tobytes() if raw.dtype == np.uint8 else str(raw))
            del raw
            if meta.get("version") != VERSION or meta.get("key") != key:
                return "configuration or models changed"
            seen = z["seen"]
            # Entries inside the meta: a file saved before they were written as lines.
            rows = meta.pop("entries") if "entries" in meta else _lines(path, int(meta["n_entries"]))
            entries = {}
            for row in rows:
                cand = Candidate(
                    row["case_id"], row["issue_type"], row["cluster_id"], row["score"], row["reasons"], row["parts"]
                )
                entries[row["case_id"]] = _Pooled(
                    (-cand.score, cand.case_id), cand, row["text"], bool(row["copies"]), spill
                )
            del rows
        vecs = _vectors(path, list(entries), int(meta["n_vectors"]), spill)
        pools = _Pools(
            pools={g: [entries[i] for i in ids] for g, ids in meta["pools"].items()},
            sizes={g: int(n) for g, n in meta["sizes"].items()},
            cut=set(meta["cut"]),
            n_cases=int(meta["n_cases"]),
            spill=spill,
        )
        depths = {g: int(d) for g, d in meta["depths"].items()}
        selection = Selection([], {}, pools, dict(meta["caps"]), int(meta["default_cap"]), vecs, True, depths)
        return PoolState(
            key,
            {k: (int(v[0]), int(v[1])) for k, v in meta["parts"].items()},
            [(str(n), int(s), int(i)) for n, s, i in meta["members"]],
            np.asarray(seen, dtype=np.uint64),
            selection,
        )
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
        log.warning("library pools %s not readable (%s): building over every case", path, e)
        return "saved pools unreadable"


def _vectors(path: Path, ids: list[str], n: int, spill: Spill | None) -> MutableMapping[str, np.ndarray]:
    """The saved vectors of the first `n` of `ids` (the entries with vectors come first): views
    of the one array read, or, with `spill`, written there a block at a time."""
    if spill is None:
        with np.load(path, allow_pickle=False) as z:
            vectors = z["vectors"]
        if len(vectors) != n or len(ids) < n:
            raise ValueError("entries and vectors differ in length")
        return dict(zip(ids, vectors))
    out = SpilledVectors(spill)
    with zipfile.ZipFile(path) as zf, zf.open("vectors.npy") as f:
        shape, fortran, dtype = npy_header(f)
        if len(shape) != 2 or fortran or shape[0] != n or len(ids) < n:
            raise ValueError("entries and vectors differ in length")
        width = int(shape[1]) * dtype.itemsize
        for at in range(0, n, _VECTOR_BLOCK):
            rows = min(_VECTOR_BLOCK, n - at)
            raw = f.read(rows * width)
            if len(raw) != rows * width:
                raise ValueError("the vectors end early")
            block = np.frombuffer(raw, dtype=dtype).reshape(rows, -1)
            for i, v in zip(ids[at : at + rows], block):
                out[i] = v
    return out


def _lines(path: Path, n: int) -> Iterator[dict[str, Any]]:
    """The `n` entries of the file's JSON lines, read and parsed one at a time from its member:
    the member read whole was 37 MiB at a 129k-case history's 30,805 entries, held until the
    last was parsed, and it grows with the pools."""
    with zipfile.ZipFile(path) as zf, zf.open("entries.npy") as f:
        shape, fortran, dtype = npy_header(f)
        if len(shape) != 1 or dtype != np.uint8:
            raise ValueError(f"entries stored as {dtype} of shape {shape}")
        size, count = 0, 0
        for line in f:
            size += len(line)
            if not line.endswith(b"\n"):
                raise ValueError("the last entry line has no end")
            count += 1
            yield json.loads(line)
        if count != n or size != shape[0]:
            raise ValueError(f"{count} entry lines, not {n}")
