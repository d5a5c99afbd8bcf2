"""Text preparation and tokenisation for the classifier: the pipeline's own.

Why: training texts (labelled CSVs, unmasked) and prediction texts (case `problem`, already
normalised and masked) must go through the same normalisation and the same segmenter, or the
model sees different features at train and predict time. The model card records the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import Config


def text_backend(cfg: Config) -> tuple[Callable[[str], str], Callable[[str], list[str]], str]:
    """(prepare, cut, name): the pipeline's normaliser+masker and segmenter."""
    from pipeline.text.prepare import prepare_text
    from pipeline.text.segment import Segmenter

    seg = Segmenter(cfg)
    return (lambda t: prepare_text(t or "", cfg)), seg.cut, "pipeline.text.segment"


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
