"""The allocator trims (pipeline.heap): the run steps call them after each step, the export
between a re-cluster's stages."""

from __future__ import annotations

import pyarrow as pa


def test_release_unused_memory_returns_arrows_pool_and_glibcs_heap(monkeypatch):
    import pipeline.heap as heap

    calls: list[str] = []

    class Pool:
        def release_unused(self) -> None:
            calls.append("arrow")

    monkeypatch.setattr(pa, "default_memory_pool", lambda: Pool())
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append("glibc"))
    heap.release_unused_memory()
    assert sorted(calls) == ["arrow", "glibc"]


def test_release_unused_memory_runs_for_real():
    from pipeline.heap import release_unused_memory

    freed = pa.array(range(1_000_000))
    del freed
    live = pa.array(range(100_000))
    in_use = pa.default_memory_pool().bytes_allocated()
    release_unused_memory()  # a no-op where there is no malloc_trim; never an error
    # Only free memory goes back: what is still held stays allocated and intact.
    assert pa.default_memory_pool().bytes_allocated() == in_use
    assert live.to_numpy().sum() == sum(range(100_000))


def test_a_run_allocates_arrow_memory_from_the_system_heap(tmp_path, monkeypatch):
    """A run's Arrow buffers come from glibc's heap, which each step's trim returns to the OS
    (mimalloc kept a chunk's freed memory in huge pages); a pool named by the user stays."""
    from pipeline.config import load_config
    from pipeline.orchestrate import nightly
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "casemine.yaml")
    (tmp_path / "in").mkdir()
    before = pa.default_memory_pool()
    try:
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
        pa.set_memory_pool(pa.mimalloc_memory_pool())
        nightly.start_run(cfg, tmp_path / "in", tmp_path / "out").close()
        assert pa.default_memory_pool().backend_name == "mimalloc"
        monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL")
        nightly.start_run(cfg, tmp_path / "in", tmp_path / "out2").close()
        assert pa.default_memory_pool().backend_name == "system"
        assert pa.array(range(1000)).sum().as_py() == sum(range(1000))
    finally:
        pa.set_memory_pool(before)


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's maps of `path` (/proc/self/smaps)."""
    import os

    real, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                inside = len(head) > 5 and head[5] == real
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def _linux_maps() -> bool:
    import mmap
    import os

    from pipeline.heap import _libc

    lib = _libc()
    return os.path.exists("/proc/self/smaps") and hasattr(mmap, "MADV_DONTNEED") and lib is not None


def test_dropping_mapped_pages_lets_read_pages_go_and_keeps_the_data(tmp_path):
    """Pages read from a file the export maps (its case copy) leave this process's RSS at each
    release point inside the block, and read back the same; outside the block they stay."""
    import numpy as np
    import pytest

    from pipeline.heap import dropping_mapped_pages, release_mapped_pages, release_unused_memory

    if not _linux_maps():
        pytest.skip("needs /proc/self/smaps, madvise and glibc (Linux)")
    folder = tmp_path / "copy"
    folder.mkdir()
    data = np.arange(2 * 1024 * 1024, dtype=np.int32)  # 8 MiB
    path = folder / "col.data"
    data.tofile(path)
    with pa.memory_map(str(path), "r") as mm:
        view = np.frombuffer(mm.read_buffer(), dtype=np.int32)
        assert int(view.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page read
        assert _mapped_rss_kib(path) >= 8 * 1024 - 64
        release_unused_memory()  # no block: the pages stay
        assert _mapped_rss_kib(path) >= 8 * 1024 - 64
        with dropping_mapped_pages(folder):
            release_unused_memory()
            assert _mapped_rss_kib(path) < 1024
            assert np.array_equal(view, data)  # mapped back from the page cache, the same bytes
            assert _mapped_rss_kib(path) >= 8 * 1024 - 64
            release_mapped_pages()  # the maps alone (a loop's turn), no trim
            assert _mapped_rss_kib(path) < 1024
        view.sum()
        release_mapped_pages()  # outside the block: nothing named, nothing dropped
        assert _mapped_rss_kib(path) >= 8 * 1024 - 64
        del view


def test_drop_mapped_pages_leaves_writable_maps_and_other_folders(tmp_path):
    """A written private page would be lost if dropped: writable maps are never advised, nor a
    file outside the folders named."""
    import mmap

    import pytest

    from pipeline.heap import drop_mapped_pages

    if not _linux_maps():
        pytest.skip("needs /proc/self/smaps, madvise and glibc (Linux)")
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "w.bin").write_bytes(b"\0" * 65536)
    (outside / "r.bin").write_bytes(b"\1" * 65536)
    with open(inside / "w.bin", "r+b") as fw, open(outside / "r.bin", "rb") as fr:
        w = mmap.mmap(fw.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        r = mmap.mmap(fr.fileno(), 0, prot=mmap.PROT_READ)
        w[:5] = b"hello"  # a private copy of the page, in memory only
        assert r[:1] == b"\1"
        assert drop_mapped_pages([str(inside.resolve())]) == 0
        assert w[:5] == b"hello"
        assert _mapped_rss_kib(outside / "r.bin") > 0
        w.close()
        r.close()


def test_shared_written_pages_are_dropped_only_when_asked_and_keep_what_was_written(tmp_path):
    """Pages written through a shared map (`np.memmap(mode="w+")`, the index merge's postings)
    are the page cache's: with `shared_writes` they leave this process and read back as written;
    a private written page is never dropped."""
    import mmap

    import numpy as np
    import pytest

    from pipeline.heap import drop_mapped_pages

    if not _linux_maps():
        pytest.skip("needs /proc/self/smaps, madvise and glibc (Linux)")
    folder = str(tmp_path.resolve())
    path = tmp_path / "postings.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(1024 * 1024,))  # 4 MiB
    out[:] = np.arange(len(out), dtype=np.int32)
    (tmp_path / "p.bin").write_bytes(b"\0" * 65536)
    with open(tmp_path / "p.bin", "r+b") as fp:
        private = mmap.mmap(fp.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        private[:5] = b"hello"
        assert drop_mapped_pages([folder]) == 0  # no read-only map here: nothing advised
        assert _mapped_rss_kib(path) >= 4 * 1024 - 64
        assert drop_mapped_pages([folder], shared_writes=True) >= 4 * 1024 * 1024
        assert _mapped_rss_kib(path) == 0
        assert private[:5] == b"hello" and _mapped_rss_kib(tmp_path / "p.bin") > 0
        assert np.array_equal(out, np.arange(len(out), dtype=np.int32))  # mapped back as written
        out.flush()
        del out
        assert np.array_equal(np.load(path), np.arange(1024 * 1024, dtype=np.int32))
        private.close()


_MMAP_PROBE = """
import ctypes, json, sys
from pipeline.heap import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else None
mapped = []
for size in (8 << 20, 4 << 20, 2 << 20):  # each freed before the next, as a batch's buffers are
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    mapped.append(libc.mallinfo2().hblkhd - before >= size)
    libc.free(block)
print(json.dumps({"fixed": fixed, "mapped": mapped}))
"""


def _mmap_probe(mode: str, **env) -> dict:
    import json
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", _MMAP_PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_fix_mmap_threshold_keeps_mapping_large_blocks_after_frees():
    """glibc's own threshold rises to a freed mapped block's size, so the next smaller large block
    comes from the heap; once fixed, every block from 1 MiB up is mapped and unmapped."""
    import pytest

    from pipeline.heap import _libc

    lib = _libc()
    if lib is None or not hasattr(lib, "mallinfo2"):
        pytest.skip("needs glibc 2.33+ (mallinfo2)")
    assert _mmap_probe("default")["mapped"] == [True, False, False]
    assert _mmap_probe("fix") == {"fixed": True, "mapped": [True, True, True]}
    # A threshold the user set stands: the call changes nothing and says so.
    assert _mmap_probe("fix", MALLOC_MMAP_THRESHOLD_="16777216") == {"fixed": False, "mapped": [False, False, False]}
