"""A re-cluster's vectors are never all in memory: embedded into a spilled file a block at a
time (`embed_to_rows`, `RowFile.from_blocks`), and the report map fitted from it (`map_of_rows`).
Up to `cluster.fit_max_cases` the map is the one fitted on the whole matrix, bit for bit; past
it, a seeded sample's PCA, its points projected a block at a time."""

from __future__ import annotations

import weakref

import numpy as np
import pandas as pd
import pytest

from pipeline.embed.fake import HashingEmbedder
from pipeline.insights.export import _embed, embed_to_rows, fit_map, fit_map_points, map_of_rows
from pipeline.insights.row_file import RowFile


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 384)).astype(np.float32)
    X[:, 0] *= 8  # a map with two clear axes
    X[:, 1] *= 4
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_row_file_from_blocks_holds_the_stacked_blocks(tmp_path):
    X = _vectors(240)
    cuts = [0, 3, 3, 103, 104, 240]  # an empty block and a one-row block among them
    with RowFile.from_blocks((X[a:b] for a, b in zip(cuts, cuts[1:])), tmp_path) as rows:
        assert rows.shape == X.shape and rows.dtype == X.dtype
        assert np.array_equal(rows[:], X) and np.array_equal(rows[[239, 0, 5]], X[[239, 0, 5]])
    with RowFile.from_blocks(iter(()), tmp_path, width=16) as empty:
        assert empty.shape == (0, 16) and empty[:].shape == (0, 16)
    with pytest.raises(ValueError):
        RowFile.from_blocks([X[:4], X[4:8, :100]], tmp_path)  # another width
    with pytest.raises(ValueError):
        RowFile.from_blocks([X[:4], X[4:8].astype(np.float64)], tmp_path)  # another type
    assert list(tmp_path.iterdir()) == []  # nothing named left behind, refused or not


def test_row_file_lets_each_block_go_before_the_next_is_made(tmp_path):
    """Only the block being written is held: a re-cluster's embedding made each block while the
    last one (96 MiB at 65,536 texts) was still referenced by the writer's loop."""
    refs: list[weakref.ref] = []

    def tracked(block: np.ndarray) -> np.ndarray:
        refs.append(weakref.ref(block))
        return block

    def blocks():
        for i in range(4):
            assert all(r() is None for r in refs)  # every earlier block is gone
            yield tracked(np.full((5, 3), i, dtype=np.float32))

    with RowFile.from_blocks(blocks(), tmp_path, width=3) as rows:
        assert rows[:].tolist() == [[float(i)] * 3 for i in range(4) for _ in range(5)]


def test_embed_to_rows_gives_the_vectors_of_one_call(tmp_path):
    texts = pd.Series([f"快递第{i}天没到" if i % 3 else "发票抬头开错" for i in range(50)])
    embedder = HashingEmbedder()
    with embed_to_rows(embedder, texts, tmp_path, block=7) as rows:
        assert np.array_equal(rows[:], _embed(HashingEmbedder(), texts.tolist()))
    assert embedder.calls == [7] * 7 + [1]  # a block of texts at a time, never all of them
    with embed_to_rows(embedder, texts.iloc[:0], tmp_path) as none:
        assert none.shape == (0, 384)


@pytest.mark.parametrize("n", [0, 2, 150, 400])
def test_map_of_rows_up_to_the_cap_is_the_whole_matrix_map(tmp_path, n):
    X = _vectors(n)
    want = fit_map_points(X.copy(), consume=True)
    with RowFile(X, tmp_path) as rows:
        got = map_of_rows(rows, max_rows=400, block=64)
    assert (got.xy is None) == (want.xy is None) == (n < 3)
    if n >= 3:
        assert got.projection.mean is not None and want.projection.mean is not None
        assert np.array_equal(got.projection.mean, want.projection.mean)
        assert np.array_equal(got.projection.components, want.projection.components)
        assert got.xy is not None and want.xy is not None
        assert all(np.array_equal(a, b) for a, b in zip(got.xy, want.xy))


def test_map_of_rows_holds_one_block_of_rows_at_a_time(tmp_path):
    """Each block read from the spilled file is let go before the next is read: the loop held
    two 96 MiB blocks at once, the peak of a 129,000-case re-cluster."""
    refs: list[weakref.ref] = []

    class Tracked(RowFile):
        def __getitem__(self, key):
            assert all(r() is None for r in refs)  # the sample and every earlier block are gone
            out = super().__getitem__(key)
            refs.append(weakref.ref(out))
            return out

    with Tracked(_vectors(1000, seed=3), tmp_path) as rows:
        got = map_of_rows(rows, max_rows=300, block=64)
    assert len(refs) == 1 + 16 and got.xy is not None and len(got.xy[0]) == 1000


def test_map_of_rows_past_the_cap_fits_a_seeded_sample_and_places_every_row(tmp_path):
    X = _vectors(1000, seed=3)
    with RowFile(X, tmp_path) as rows:
        got = map_of_rows(rows, max_rows=300, block=64)
        again = map_of_rows(rows, max_rows=300, block=64)
    sample = np.sort(np.random.default_rng(0).choice(1000, 300, replace=False))
    want = fit_map(X[sample])
    assert got.projection.mean is not None and want.mean is not None and want.components is not None
    assert np.array_equal(got.projection.mean, want.mean)
    assert np.array_equal(got.projection.components, want.components)
    assert got.xy is not None and again.xy is not None
    pts = (X - want.mean) @ want.components.T
    for axis in (0, 1):
        assert len(got.xy[axis]) == 1000 and np.allclose(got.xy[axis], pts[:, axis], atol=1.5e-4)
        assert np.array_equal(got.xy[axis], again.xy[axis])  # the same map on a re-run
    whole = fit_map(X)  # a sample's axes, not the whole matrix's, yet the same map up to sign
    assert whole.components is not None
    assert all(abs(float(np.dot(whole.components[i], want.components[i]))) > 0.95 for i in (0, 1))
