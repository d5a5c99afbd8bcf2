"""Prepare one free text (a complaint, a query) the way the pipeline prepares transcript turns.

`casemine classify`, `query` and the evaluations read plain text; they must see it exactly as the
stored cases were seen (normalised, then masked), or models trained on one see another.
"""

from __future__ import annotations

from functools import lru_cache

from pipeline.config import Config, load_yaml_resource
from pipeline.text.mask import Masker, load_surnames
from pipeline.text.normalize import Normalizer


@lru_cache(maxsize=8)
def get_normalizer(cfg: Config) -> Normalizer:
    corrections: tuple[tuple[str, str], ...] = ()
    if cfg.normalize.asr_corrections:
        table = load_yaml_resource(cfg, cfg.normalize.asr_corrections) or {}
        # Longest first, so 优惠卷 is fixed before a shorter entry could touch part of it.
        corrections = tuple(sorted(((str(k), str(v)) for k, v in table.items()), key=lambda kv: -len(kv[0])))
    return Normalizer(cfg.normalize, corrections)


@lru_cache(maxsize=8)
def get_masker(cfg: Config) -> Masker:
    m = cfg.mask
    return Masker(
        load_surnames(cfg.resolve(m.surnames)),
        m.mask_order_ids,
        m.mask_addresses,
        m.mask_names,
        given_chars=load_surnames(cfg.resolve(m.given_name_chars)),
        keep_words=load_surnames(cfg.resolve(m.keep_words)),
    )


def prepare_text(text: str, cfg: Config, asr: bool = False) -> str:
    """Normalise then mask one text."""
    return get_masker(cfg).mask(get_normalizer(cfg).normalize(text, asr=asr))[0]
