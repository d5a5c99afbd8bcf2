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

import functools
import os
from typing import Any


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
