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
