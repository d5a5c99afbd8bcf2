"""Per-stage throughput of the foundation on generated transcripts (2 cores).

Prints transcripts/s for ingest, normalise+mask and case extraction, and chars/s for segmentation:
ours (domain dictionary, placeholders, stop words) vs plain `jieba.lcut` in one process, and ours on
both cores, all measured in the same run so the ratios are fair.

    python -m bench.bench_pipeline [--n 5000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jieba

from pipeline.config import load_config
from pipeline.ingest import discover, read_file
from pipeline.orchestrate.batch import mask_conversation, normalize_conversation
from pipeline.cases.extract import CaseExtractor
from pipeline.sample.generate import generate
from pipeline.text.segment import Segmenter
from pipeline.text.prepare import get_masker, get_normalizer


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(n: int) -> None:
    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        _, t_gen = timed(lambda: generate(root, n=n, seed=1, malformed=False))
        convs, t_ing = timed(lambda: [c for p in discover(root) for c in read_file(p, cfg.ingest, root).conversations])
    norm, masker = get_normalizer(cfg), get_masker(cfg)
    normed, t_norm = timed(lambda: [normalize_conversation(c, norm) for c in convs])
    masked, t_mask = timed(lambda: [mask_conversation(c, masker) for c in normed])
    ex = CaseExtractor.from_config(cfg)
    cases, t_cases = timed(lambda: [r for c in masked for r in ex.extract(c)])
    texts = [r["customer_text"] for r in cases] + [r["agent_text"] for r in cases]
    chars = sum(map(len, texts))
    seg = Segmenter(cfg)
    seg.cut("预热")  # dictionary load is a one-off, not throughput
    jieba.lcut("预热")
    _, t_plain = timed(lambda: [jieba.lcut(t) for t in texts])
    _, t_ours = timed(lambda: [seg.cut(t) for t in texts])
    seg.cfg = cfg.with_overrides(segment={"parallel_min_texts": 1})
    _, t_start = timed(lambda: seg.cut_many(texts[:8], processes=2))  # pool start, reported apart
    _, t_par = timed(lambda: seg.cut_many(texts, processes=2))
    seg.close()
    rows = [
        ("generate sample", n / t_gen, "transcripts/s", ""),
        ("ingest (decode+parse+validate)", len(convs) / t_ing, "transcripts/s", ""),
        ("normalise", len(convs) / t_norm, "transcripts/s", ""),
        ("mask (both texts + metadata)", len(convs) / t_mask, "transcripts/s", ""),
        ("case extraction", len(convs) / t_cases, "transcripts/s", ""),
        ("segment: jieba.lcut, 1 process (baseline)", chars / t_plain, "chars/s", "1.00x"),
        ("segment: ours, 1 process", chars / t_ours, "chars/s", f"{t_plain / t_ours:.2f}x"),
        ("segment: ours, 2 processes (warm pool)", chars / t_par, "chars/s", f"{t_plain / t_par:.2f}x"),
        ("segment: pool start (once per run)", t_start, "seconds", ""),
    ]
    print(f"foundation stages on {len(convs)} generated transcripts ({chars:,} chars to segment)")
    for name, rate, unit, ratio in rows:
        print(f"  {name:<48} {rate:>12,.0f} {unit:<14} {ratio}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    main(ap.parse_args().n)
