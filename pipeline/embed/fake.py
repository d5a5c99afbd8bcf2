"""A deterministic, model-free embedder with the `Embedder` interface, for tests and dry runs.

Why: index, search and CLI behaviour do not depend on which model made the vectors, and loading
a real model costs seconds per test. Vectors are hashed character bigrams, L2-normalised, so
texts sharing characters are close (enough to make ranking tests meaningful).
"""

from __future__ import annotations

import hashlib

import numpy as np


class HashingEmbedder:
    def __init__(self, dim: int = 384, model_name: str = "hashing-test", backend: str = "torch"):
        self.dim = dim
        self.model_name = model_name
        self.backend = backend
        self.calls: list[int] = []  # how many texts each encode call embedded
        self.last_stats = {"embedded_new": 0, "embedded_cached": 0}

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        grams = [text[i : i + 2] for i in range(max(1, len(text) - 1))] + list(text)
        for g in grams:
            h = int.from_bytes(hashlib.md5(g.encode("utf-8")).digest()[:4], "little")
            v[h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        n = np.linalg.norm(v)
        return v / n if n else v

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        # Filled row by row, not stacked from a list of rows: the list and the stacked copy held
        # the vectors twice over, which set the peak of the memory bench's back-fill export.
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self._vec(t)
        return out

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(list(texts))

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        self.last_stats = {"embedded_new": len(texts), "embedded_cached": 0}
        return self.encode(texts)
