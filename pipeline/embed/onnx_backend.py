"""ONNX Runtime int8 backend: export, fuse, quantise once; encode without torch.

Why do it by hand: sentence-transformers' own `backend="onnx"` needs optimum-onnx, which is not
installed. The recipe (eager attention so the graph fuses, opset 17, the BERT fusion optimiser,
dynamic int8) is the one measured in shared/notes/offline-embedding.md: on these AVX2 CPUs it
cuts single-query latency about 3.7x and the file 4x at 0.997 mean cosine to fp32; batch
throughput is about 1.2x of PyTorch.

The encoder here uses only `tokenizers`, `onnxruntime` and numpy, so a query process that uses it
never imports torch (about 2 s of a cold start).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

ONNX_SUBDIR = "onnx"


def _has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_vnni|avx_vnni)\b", text) is not None


def int8_recipe(vnni: bool | None = None) -> tuple[str, bool]:
    """(file name, signed weights) of the int8 export for this CPU. The name encodes the recipe,
    so a changed recipe rebuilds instead of reusing an old file.

    Signed int8 weights where the CPU has VNNI: ONNX Runtime's u8s8 kernels use its int8 dot
    products there: a short question's session.run took 2.8 ms against 6.9 ms with unsigned weights
    (one thread; 400 complaints in batches 5.3 s against 9.8 s), at the same cosine to fp32 (0.9968).
    Unsigned elsewhere: without VNNI the u8s8 path can saturate (optimum's "avx2" recipe is u8u8)."""
    signed = _has_vnni() if vnni is None else vnni
    return ("model_qint8_perchannel.onnx" if signed else "model_quint8_perchannel.onnx"), signed


INT8_NAME, _SIGNED = int8_recipe()


def _pooling_mode(model_dir: Path) -> str:
    cfg = model_dir / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return "mean"
    c = json.loads(cfg.read_text("utf-8"))
    if c.get("pooling_mode_cls_token"):
        return "cls"
    if c.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ValueError(f"{model_dir}: only mean or CLS pooling is supported by the ONNX backend")


def _export(model_dir: Path, out_dir: Path, log=print) -> None:
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager").eval()
    fp32 = out_dir / "model_fp32.onnx"
    dummy = {
        "input_ids": torch.ones(2, 16, dtype=torch.long),
        "attention_mask": torch.ones(2, 16, dtype=torch.long),
        "token_type_ids": torch.zeros(2, 16, dtype=torch.long),
    }
    axes = {k: {0: "batch", 1: "seq"} for k in dummy}
    axes["last_hidden_state"] = {0: "batch", 1: "seq"}
    log("exporting to ONNX (opset 17)")
    with torch.no_grad():
        torch.onnx.export(
            model,
            (dummy,),
            str(fp32),
            input_names=list(dummy),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    src = fp32
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        log("fusing attention/layer-norm (onnxruntime BERT optimiser)")
        opt = optimize_model(
            str(fp32),
            "bert",
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
            opt_level=2,
            use_gpu=False,
        )
        fused = out_dir / "model_fused.onnx"
        opt.save_model_to_file(str(fused))
        src = fused
    except Exception as e:  # the unfused graph still works, only slower
        log(f"optimiser failed ({e}); quantising the unfused graph")
    log("dynamic int8 quantisation")
    # Per-channel weights: per-tensor measured 0.989 mean cosine to fp32 on the shared complaints,
    # per-channel 0.997. Signed or unsigned by the CPU (`int8_recipe`).
    quantize_dynamic(
        str(src),
        str(out_dir / INT8_NAME),
        weight_type=QuantType.QInt8 if _SIGNED else QuantType.QUInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    for f in out_dir.glob("model_f*.onnx*"):
        f.unlink()


def ensure_onnx_int8(model_dir: Path, log=print) -> Path:
    """Path to `<model_dir>/onnx/model_int8.onnx`, building it once under a lock."""
    final = model_dir / ONNX_SUBDIR / INT8_NAME
    if final.is_file():
        return final
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"the ONNX backend needs a local model folder with config.json; {model_dir} has none "
            "(use embed.backend: torch for hub models)"
        )
    lock_path = model_dir / f".{ONNX_SUBDIR}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final.is_file():
                return final
            tmp = model_dir / f".{ONNX_SUBDIR}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _export(model_dir, tmp, log=log)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp / INT8_NAME, final)
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def without_word_cache(tokenizer: Any) -> Any:
    """`tokenizer` (a `tokenizers.Tokenizer`) with its model's word cache turned off; returned.

    Why: the model caches each pre-tokenised "word" with its tokens (up to 10,000 of them), and
    this model's pre-tokeniser (Metaspace, split=False) makes the whole text one word. So the
    cache held the last 10,000 passages a process embedded, each once: a hit needs the same
    text again, which the embedding cache and `encode_passages` already prevent. In a chunked
    run it grew by about 1.5 KB per text embedded (glibc in-use heap +0.45 MiB per 300 distinct
    texts, flat with the cache off and with the same texts repeated). Tokenizers without the
    (private) resize method are left as they are.
    """
    model = getattr(tokenizer, "model", None)
    resize = getattr(model, "_resize_cache", None)
    if resize is not None:
        resize(0)
    return tokenizer


class OnnxEncoder:
    """Sentence embeddings from an ONNX transformer: tokenise, run, pool, normalise."""

    def __init__(self, model_dir: Path, onnx_path: Path, threads: int | None = None, max_length: int = 512):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tokenizer = without_word_cache(Tokenizer.from_file(str(model_dir / "tokenizer.json")))
        pad_id = self.tokenizer.token_to_id("<pad>")
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0)
        # One intra-op thread per call and `workers` texts at once (`encode`).
        self.workers = threads or (os.cpu_count() or 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        # The first listed provider may be Azure; only the CPU one is wanted here.
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.pooling = _pooling_mode(model_dir)
        self.dim = (
            int(self.session.get_outputs()[0].shape[-1])
            if isinstance(self.session.get_outputs()[0].shape[-1], int)
            else None
        )

    def _batch(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feed)[0]
        if self.pooling == "cls":
            v = hidden[:, 0]
        else:
            m = mask[..., None].astype(np.float32)
            v = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def _one(self, text: str) -> np.ndarray:
        return self._batch([text])[0]

    def encode(self, texts: list[str], batch_size: int = 32, progress=None) -> np.ndarray:
        """Each text run on its own, `workers` at a time, returned in input order.

        Why not padded batches: dynamic int8 quantises activations per tensor, so in a batch a
        text's vector depends on its neighbours and their padding (cosine 0.998 to the same text
        alone), and a re-run that batched the same cases differently would not equal the first
        (the crash and idempotence tests caught it). One text per call on one thread, two calls at
        once, also measured faster here than batches of 32 on two threads: 157-168 against 79-84
        texts/s with both cores busy. `batch_size` only sets how often `progress` is called."""
        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        out: list[np.ndarray] = []
        step = max(1, batch_size)
        pool = None
        if self.workers > 1 and len(texts) > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(min(self.workers, len(texts)), thread_name_prefix="casemine-onnx")
        try:
            for s in range(0, len(texts), step):
                chunk = texts[s : s + step]
                out.extend(pool.map(self._one, chunk) if pool is not None else map(self._one, chunk))
                if progress:
                    progress(len(chunk))
        finally:
            if pool is not None:
                pool.shutdown()
        return np.stack(out).astype(np.float32)
