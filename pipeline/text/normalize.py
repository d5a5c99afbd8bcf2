"""Normalise text: width folding, Traditional to Simplified, clean-up, ASR filler removal.

Why each step: NFKC folds full-width digits and letters (１３８ -> 138) so masking and keywords see
one form; OpenCC's t2s maps Traditional to Simplified so a Big5 file and a GBK file about the same
parcel segment alike; invisible format characters (zero-width, bidi marks) would otherwise split
words; ASR fillers (嗯, 那个...) are noise to every later step. The received text is kept next to
the normalised one by the caller.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

from pipeline.config import NormalizeConfig

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff"
# Format and control characters are never content: zero-width spaces, bidi marks, BOMs, C0/C1.
_INVISIBLE_RE = re.compile(
    r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u00ad\u200b-\u200f"
    r"\u202a-\u202e\u2060-\u206f\ufeff\ufe00-\ufe0f\U000e0000-\U000e007f]"
)
_EMOJI_RE = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff\U0001f1e6-\U0001f1ff\u200d\u20e3]+")
_SPACE_RE = re.compile(r"\s+")
_CJK_GAP_RE = re.compile(rf"(?<=[{_CJK}])\s+(?=[{_CJK}])")


@lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    return _t2s().convert(text) if text else text


def strip_invisible(text: str) -> str:
    return _INVISIBLE_RE.sub("", text)


def collapse_repeats(text: str, max_repeat: int) -> str:
    """Cap runs of one repeated non-word character (！！！！！！, emoji floods) at max_repeat.

    The run length still tells an emotion reader something, but a 5,000-emoji message should not
    cost 5,000 tokens downstream.
    """
    return re.sub(r"([^\w\s])\1{%d,}" % max_repeat, lambda m: m.group(1) * max_repeat, text)


def count_emoji(text: str) -> int:
    return sum(len(m.group(0)) for m in _EMOJI_RE.finditer(text))


@dataclass(frozen=True)
class Normalizer:
    """Turns received text into the form every later step reads. Pure: same input, same output."""

    cfg: NormalizeConfig
    asr_corrections: tuple[tuple[str, str], ...] = ()
    # Compiled from cfg in __post_init__: not arguments, and not part of equality or repr.
    _filler_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _lead_phrase_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _stammer_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        anywhere = "|".join(sorted(map(re.escape, self.cfg.fillers), key=len, reverse=True)) or "(?!)"
        phrases = "|".join(sorted(map(re.escape, self.cfg.phrase_fillers), key=len, reverse=True)) or "(?!)"
        object.__setattr__(self, "_filler_re", re.compile(f"(?:{anywhere})+"))
        # Discourse fillers are only dropped where they cannot carry meaning: at the start of an
        # utterance or clause, or stammered twice ("那个那个"); "那个订单" mid-sentence stays.
        object.__setattr__(self, "_lead_phrase_re", re.compile(rf"(^|[\s,.!?;:，。！？；：])(?:(?:{phrases})\s*)+"))
        object.__setattr__(self, "_stammer_re", re.compile(rf"({phrases})(?:\s*\1)+"))

    def normalize(self, text: str, asr: bool = False) -> str:
        if not text:
            return ""
        t = strip_invisible(text)
        t = unicodedata.normalize("NFKC", t)
        if self.cfg.traditional_to_simplified:
            t = to_simplified(t)
        t = _EMOJI_RE.sub(" ", t)
        t = collapse_repeats(t, self.cfg.max_repeat)
        if asr:
            t = self.clean_asr(t)
        t = _SPACE_RE.sub(" ", t).strip()
        return _CJK_GAP_RE.sub("", t)

    def clean_asr(self, text: str) -> str:
        """Fix known homophone errors, then drop fillers. Corrections first: a filler can sit
        inside a misrecognised word."""
        for wrong, right in self.asr_corrections:
            text = text.replace(wrong, right)
        if not self.cfg.remove_asr_fillers:
            return text
        text = self._stammer_re.sub(r"\1", text)
        text = self._filler_re.sub(" ", text)
        prev = None
        while prev != text:  # "那个就是说我的快递" has two leading fillers
            prev, text = text, self._lead_phrase_re.sub(r"\1", text.strip())
        return text
