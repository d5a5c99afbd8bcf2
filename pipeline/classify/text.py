"""Text preparation and tokenisation for the classifier: the one place that touches the
lead's `pipeline.textprep` / `pipeline.segment`.

Why one switch point: training texts (labelled CSVs, unmasked) and prediction texts (case
`problem`, already normalised and masked) must go through the same normalisation and the same
segmenter, or the model sees different features at train and predict time. While the shared
modules are missing a small fallback (NFKC + jieba) keeps the classifier usable; which one was
used is recorded in the model card (`tokenizer`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from pipeline.config import Config

# Placeholders from masking (<PHONE>) and from the JDDC corpus ([订单x]) are single tokens.
_PLACEHOLDER_RE = re.compile(r"(<[A-Z_]+>|\[[^\[\]\s]{1,8}x\])")
_KEEP_RE = re.compile(r"[\w\u3400-\u4dbf\u4e00-\u9fff]")
_FALLBACK_STOP = frozenset("的 了 是 我 你 他 她 它 们 吗 呢 吧 啊 呀 哦 和 与 就 都 也 还 又 在 有 这 那 个 着 被 把 给".split())


def _fallback_prepare(text: str, cfg: Config) -> str:
    text = unicodedata.normalize("NFKC", text or "").replace("\ufeff", "")
    return re.sub(r"\s+", " ", text).strip()


def _fallback_cut(text: str) -> list[str]:
    import jieba

    out: list[str] = []
    for part in _PLACEHOLDER_RE.split(text):
        if not part:
            continue
        if _PLACEHOLDER_RE.fullmatch(part):
            out.append(part)
            continue
        out.extend(t for t in jieba.lcut(part) if _KEEP_RE.search(t) and t not in _FALLBACK_STOP)
    return out


def text_backend(cfg: Config) -> tuple[Callable[[str], str], Callable[[str], list[str]], str]:
    """(prepare, cut, name): the lead's normaliser+masker and segmenter if present, else the
    fallback. THE switch point: nothing else in pipeline.classify imports textprep/segment."""
    try:
        from pipeline.segment import Segmenter
        from pipeline.textprep import prepare_text
    except ModuleNotFoundError as e:
        if e.name not in ("pipeline.segment", "pipeline.textprep"):
            raise  # a broken dependency inside them must not silently downgrade tokenisation
        return (lambda t: _fallback_prepare(t, cfg)), _fallback_cut, "fallback-jieba"
    seg = Segmenter(cfg)
    return (lambda t: prepare_text(t or "", cfg)), seg.cut, "pipeline.segment"


_BACKENDS: dict[str, tuple[Callable[[str], str], Callable[[str], list[str]], str]] = {}


def get_backend(cfg: Config) -> tuple[Callable[[str], str], Callable[[str], list[str]], str]:
    """Cached per config: building a Segmenter loads dictionaries, too slow to do per batch."""
    key = cfg.model_dump_json()
    if key not in _BACKENDS:
        _BACKENDS[key] = text_backend(cfg)
    return _BACKENDS[key]


class CachedTokenizer:
    """A picklable-by-omission tokeniser with a memo: cross-validation tokenises each text once
    instead of once per fold and candidate."""

    def __init__(self, cut: Callable[[str], list[str]], name: str = "") -> None:
        self.cut = cut
        self.name = name
        self._memo: dict[str, list[str]] = {}

    def __call__(self, text: str) -> list[str]:
        toks = self._memo.get(text)
        if toks is None:
            toks = self.cut(text)
            if len(self._memo) < 50_000:
                self._memo[text] = toks
        return toks
