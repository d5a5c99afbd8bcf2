"""Prepare one free text (a complaint, a query) the way the pipeline prepares transcript turns.

`casemine classify`, `query` and the evaluations read plain text; they must see it exactly as the
stored cases were seen (normalised, then masked), or models trained on one see another.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.resources import AsrCorrections, cached, load_resource
from pipeline.text.mask import Masker, load_surnames
from pipeline.text.normalize import Normalizer


def get_normalizer(cfg: Config) -> Normalizer:
    """The config's normaliser, shared per process until its corrections file changes."""
    n = cfg.normalize

    def build() -> Normalizer:
        table = load_resource(cfg, n.asr_corrections, AsrCorrections).longest_first() if n.asr_corrections else ()
        return Normalizer(n, table)

    return cached(("normalizer", cfg), lambda: [cfg.resolve(n.asr_corrections)] if n.asr_corrections else [], build)


def get_masker(cfg: Config) -> Masker:
    """The config's masker, shared per process until one of its word lists changes."""
    m = cfg.mask

    def files() -> list[Path]:
        return [cfg.resolve(p) for p in (m.surnames, m.given_name_chars, m.keep_words)]

    def build() -> Masker:
        surnames, given, keep = files()
        return Masker(
            load_surnames(surnames),
            m.mask_order_ids,
            m.mask_addresses,
            m.mask_names,
            given_chars=load_surnames(given),
            keep_words=load_surnames(keep),
        )

    return cached(("masker", cfg), files, build)


def prepare_text(text: str, cfg: Config, asr: bool = False) -> str:
    """Normalise then mask one text."""
    return get_masker(cfg).mask(get_normalizer(cfg).normalize(text, asr=asr))[0]
