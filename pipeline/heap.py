"""Give the heap's freed memory back to the operating system after each step of a run, and
between the stages of a full re-cluster.

Why: glibc keeps what the encoder frees (buffers for each batch's padded shape) in its arenas
instead of returning it, so a chunked run's RSS rose by about 20 MiB per chunk of 150
transcripts with nothing live behind it; `malloc_trim(0)` returned all of it (measured: 12
batches of 150 texts took RSS from 1,117 to 1,372 MiB, one trim brought it to 960). A no-op
where the C library has no `malloc_trim` (musl, macOS).

A back-fill's export (a full re-cluster) frees far more than it keeps between its stages: the
vectors' encoding, the Arrow reads of the tokens. Kept by the allocators, that memory grew with
the stored cases and sat under the re-cluster's own peak; `release_unused_memory` returns
both glibc's and Arrow's (Arrow allocates from its own pool, which `malloc_trim` does not see).
In `pipeline/` rather than `pipeline/orchestrate/`: the export (a lower layer) calls it too.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Folders whose files' read-only mapped pages `release_unused_memory` drops (`dropping_mapped_pages`).
_DROPPED_UNDER: list[str] = []


@functools.cache
def _libc() -> Any:
    # Imported here: the `casemine` command imports this module on start-up (for the Arrow pool),
    # and ctypes.util alone cost 9 ms of a cold query's start.
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc's `malloc_trim(0)`); costs milliseconds."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def release_unused_memory() -> None:
    """`release_free_heap`, and the free memory Arrow's default pool keeps (jemalloc or
    mimalloc: its own arenas)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    release_free_heap()
    release_mapped_pages()


def release_mapped_pages() -> None:
    """The pages mapped from the folders `dropping_mapped_pages` names, out of this process: for
    a loop that reads a mapped column through (a cluster's texts at a time), where a whole
    `release_unused_memory` each turn would cost a trim. A no-op outside such a block."""
    if _DROPPED_UNDER:
        drop_mapped_pages(_DROPPED_UNDER)


@contextlib.contextmanager
def dropping_mapped_pages(folder: Path) -> Iterator[None]:
    """Inside the block, `release_unused_memory` also drops from this process the pages it maps
    read-only from files under `folder`: they stay in the page cache, and a later read maps them
    back without touching the disk.

    Why: the export maps its copy of the stored cases (`state/cache/export-cases`), and pandas
    holds its text columns zero-copy in that map, so every page a step had read stayed in the
    process's resident memory: 45 MiB of the copy at a 129k-case history by the re-cluster's
    peak, and it grew with the history. The kernel could take such pages back under pressure,
    but a run's peak RSS (and a container's view of it) counted them."""
    key = os.path.realpath(folder)
    _DROPPED_UNDER.append(key)
    try:
        yield
    finally:
        _DROPPED_UNDER.remove(key)


def drop_mapped_pages(folders: list[str], shared_writes: bool = False) -> int:
    """`madvise(MADV_DONTNEED)` every read-only mapping of a file under one of `folders`
    (real paths); the bytes advised. A written private page would be lost, so writable maps are
    left, except, with `shared_writes`, shared ones (`np.memmap(mode="w+")`): what is written
    through them is the page cache's, and a later touch maps it back. Where there is no
    /proc/self/maps or no `madvise` (not Linux) nothing is dropped."""
    import mmap

    lib = _libc()
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if lib is None or advice is None or not hasattr(lib, "madvise"):
        return 0
    prefixes = tuple(f.rstrip("/") + "/" for f in folders)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return 0
    import ctypes

    done = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith(prefixes):
            continue
        if "w" in parts[1] and not (shared_writes and parts[1].endswith("s")):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if lib.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(advice)) == 0:
            done += end - start
    return done


# glibc's `mallopt` parameter for the size from which a block is mapped on its own (malloc.h).
_M_MMAP_THRESHOLD = -3
# Blocks from this size up are mapped fresh and unmapped when freed (`fix_mmap_threshold`).
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """From here on glibc maps every block of `size` bytes or more on its own and unmaps it when
    it is freed; True if set. A threshold the user chose (`MALLOC_MMAP_THRESHOLD_`, or
    `glibc.malloc.mmap_threshold` in `GLIBC_TUNABLES`) stands; a no-op without glibc.

    Why: glibc raises its threshold each time a mapped block is freed (up to 32 MiB), and from
    then on the encoder's per-batch buffers (hidden states and attention scores, a few MiB to tens
    of MiB, of a different size each batch) come from the heap, between the run's longer-lived
    objects, where a later batch's rarely fits the holes an earlier one left. Each step's peak
    then rose chunk after chunk on a level that stayed flat: 4,000 transcripts in 0.5 MB chunks
    (torch, 2 cores) peaked at 1,222 -> 1,462 MiB in the process step and 1,236 -> 1,553 in the
    index step over 14 chunks, at 1,163 -> 1,219 after each commit. With the threshold fixed at
    1 MiB: 1,180 -> 1,269 and 1,201 -> 1,279, the same level. What glibc then maps and unmaps is
    zero-filled afresh at every batch: about a tenth more of the torch encoder's CPU time, and
    10% on that run's wall time (the speed log, 2026-12-07 night)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in tunables:
        return False
    lib = _libc()
    if lib is None or not hasattr(lib, "mallopt"):
        return False
    return bool(lib.mallopt(_M_MMAP_THRESHOLD, int(size)))


def name_system_arrow_pool() -> None:
    """Have Arrow's C++ code allocate from glibc's heap too; call it before anything imports
    pyarrow (the `casemine` command and the benches do, on import), since Arrow reads
    ARROW_DEFAULT_MEMORY_POOL once, when it loads. A value the user set stands.

    Why: mimalloc, Arrow's default, kept what a back-fill's Parquet and IPC reads freed in its own
    reserved region, which no trim returns: 5 -> 38 MiB over a 10,000-transcript run, and the
    level a run's chunks leave stepped up by 25-50 MiB at a time."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


def use_system_arrow_pool() -> None:
    """Arrow allocates from the C library's heap from here on, unless ARROW_DEFAULT_MEMORY_POOL
    names a pool.

    Why: pyarrow's default pool (mimalloc) kept what a chunk freed in its own reserved region, in
    huge pages it could not hand back: 84 MiB resident there while Arrow held 4 MiB, growing
    chunk by chunk. Through the system pool that memory is glibc's, which `release_free_heap`
    returns: a 10,000-transcript run's memory after its last commit rose 11 MiB over 18 chunks
    instead of 35. Buffers made before keep their own pool and are freed to it.

    This sets only pyarrow's Python-side pool: Arrow's C++ code keeps the pool it chose when it
    loaded, from ARROW_DEFAULT_MEMORY_POOL (`name_system_arrow_pool`)."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
