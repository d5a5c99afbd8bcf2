"""The streamed exact-index file is the file FAISS writes, and FAISS reads it back."""

import faiss
import numpy as np
import pytest

from pipeline.retrieval.flatfile import FlatFileWriter


@pytest.mark.parametrize("blocks", [[], [0], [1], [3, 0, 5], [7, 7, 7]])
def test_blocks_written_equal_faiss_own_file(tmp_path, blocks):
    rng = np.random.default_rng(len(blocks))
    parts = [rng.normal(size=(n, 12)).astype(np.float32) for n in blocks]
    with FlatFileWriter(tmp_path / "streamed.faiss", 12) as w:
        for p in parts:
            w.add(p)
    ref = faiss.IndexFlatIP(12)
    for p in parts:
        if len(p):
            ref.add(p)
    faiss.write_index(ref, str(tmp_path / "ref.faiss"))
    assert (tmp_path / "streamed.faiss").read_bytes() == (tmp_path / "ref.faiss").read_bytes()
    assert w.ntotal == ref.ntotal
    mapped = faiss.read_index(str(tmp_path / "streamed.faiss"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    want = np.concatenate(parts) if parts else np.zeros((0, 12), np.float32)
    assert mapped.ntotal == len(want)
    if len(want):
        assert np.array_equal(mapped.reconstruct_n(0, mapped.ntotal), want)
        q = want[:2]
        assert np.array_equal(mapped.search(q, 3)[1], ref.search(q, 3)[1])


def test_float64_and_strided_blocks_are_written_as_float32_rows(tmp_path):
    v = np.arange(40, dtype=np.float64).reshape(10, 4)
    with FlatFileWriter(tmp_path / "x.faiss", 2) as w:
        w.add(v[:, ::2])  # a strided view
    got = faiss.read_index(str(tmp_path / "x.faiss"))
    assert np.array_equal(got.reconstruct_n(0, 10), v[:, ::2].astype(np.float32))


def test_a_block_of_the_wrong_width_is_refused_and_no_file_is_claimed_complete(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        with FlatFileWriter(tmp_path / "x.faiss", 4) as w:
            w.add(np.ones((2, 4), np.float32))
            w.add(np.ones((2, 5), np.float32))
    # the header still counts no rows: a reader sees an empty index, not a truncated one
    assert faiss.read_index(str(tmp_path / "x.faiss")).ntotal == 0
