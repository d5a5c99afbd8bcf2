"""A content-addressed store of embeddings, so a nightly run embeds only new or changed texts.

Why content hashes and not case ids: a re-processed case whose problem text did not change needs
no new vector, and two cases with the same text share one. The key covers the model identity and
the prompt, so switching models never serves stale vectors.

Layout: `<dir>/shard-*.npz`, each with sorted `keys` (32-byte sha256 digests) and `vecs`
(float32). New vectors go to a new shard written atomically; many small shards are merged.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import numpy as np

_MAX_SHARDS = 16


def text_key(namespace: str, text: str) -> bytes:
    return hashlib.sha256(f"{namespace}\x00{text}".encode()).digest()


class EmbeddingCache:
    """Look up and store vectors by (namespace, text)."""

    def __init__(self, directory: Path, namespace: str, dim: int | None = None):
        self.dir = Path(directory)
        self.namespace = namespace
        self.dim = dim
        self._keys = np.empty(0, dtype="S32")
        self._vecs: np.ndarray | None = None
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        keys, vecs = [], []
        for shard in sorted(self.dir.glob("shard-*.npz")):
            try:
                with np.load(shard) as z:
                    keys.append(z["keys"])
                    vecs.append(z["vecs"])
            except (OSError, ValueError, KeyError):
                continue  # a damaged shard only costs re-embedding, never a failed run
        if keys:
            k = np.concatenate(keys)
            v = np.concatenate(vecs)
            k, first = np.unique(k, return_index=True)  # sorted, duplicates dropped
            self._keys, self._vecs = k, v[first]
            self.dim = self._vecs.shape[1]
        self._loaded = True

    def lookup(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None, list[bytes]]:
        """(found mask, vectors for found rows in order, keys) for the given texts."""
        self._load()
        keys = [text_key(self.namespace, t) for t in texts]
        if self._vecs is None or not keys:
            return np.zeros(len(keys), dtype=bool), None, keys
        arr = np.array(keys, dtype="S32")
        pos = np.searchsorted(self._keys, arr)
        pos_c = np.minimum(pos, len(self._keys) - 1)
        found = self._keys[pos_c] == arr
        return found, self._vecs[pos_c[found]], keys

    def add(self, keys: list[bytes], vecs: np.ndarray) -> None:
        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        k = np.array(keys, dtype="S32")
        order = np.argsort(k)
        name = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, keys=k[order], vecs=np.asarray(vecs, dtype=np.float32)[order])
        os.replace(tmp, self.dir / name)
        self._loaded = False  # re-read lazily (cheap) so lookups see the new shard
        if len(list(self.dir.glob("shard-*.npz"))) > _MAX_SHARDS:
            self.compact()

    def compact(self) -> None:
        """Merge all shards into one; the old ones are removed only after the merged one exists."""
        shards = sorted(self.dir.glob("shard-*.npz"))
        self._loaded = False
        self._load()
        if self._vecs is None:
            return
        name = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}-merged.npz"
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, keys=self._keys, vecs=self._vecs)
        os.replace(tmp, self.dir / name)
        for s in shards:
            s.unlink(missing_ok=True)

    def __len__(self) -> int:
        self._load()
        return len(self._keys)
