"""Resource files named in the config (taxonomy, lexicons, corrections, word lists): read,
validated and cached one way.

Why one way: the files are edited by hand by the people who route and read cases, so a misspelt
key must stop the run with the file and the key named, in the same words whichever file it is;
and a resource is read once per process, yet an edit on disk is seen at once (tests and long-lived
servers edit files under a running process). Before this module each file had its own loader,
error text and memo.

Where the models live: a model that carries behaviour its consumer uses (the taxonomy's
fingerprint and urgency order, the case lexicon's cue groups) stays beside that consumer; models
that only describe a file's shape live here (ASR corrections, cause lexicon, emotion lexicon),
so that every file has a validated form even where its consumer is a plain dict or dataclass.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, model_validator

from pipeline.config import Config, ConfigError, format_errors, load_yaml_resource

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class Resource(BaseModel):
    """Base of every resource file's model: an unknown key is an error (a typo must not fall back
    to a default), and a loaded resource is shared between callers, so it cannot be changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # How error messages name the file's kind, and where a reader finds the valid keys.
    resource_kind: ClassVar[str] = "resource file"
    resource_reference: ClassVar[str] = "the file's copy under configs/ in the repo"


class CueResource(Resource):
    """A resource of cue lists: YAML reads 12315 as a number; cues are text whatever YAML thinks."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


# -- the one cache ------------------------------------------------------------------------------

# kind -> (the files it was built from, their stamps then, the value).
_CACHE: dict[Hashable, tuple[tuple[str, ...], tuple[tuple[int, int] | None, ...], Any]] = {}
_LOCK = threading.Lock()


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # a missing file is a state too: it appearing later is a change
    return st.st_mtime_ns, st.st_size


def cached(kind: Hashable, files: Sequence[Path] | Callable[[], Sequence[Path]], build: Callable[[], T]) -> T:
    """`build()`, memoised per process under `kind` until one of the `files` it read changes
    (mtime or size).

    The one memo for everything derived from files: a resource model, a word list, an object
    built from them (a normaliser, a masker, a jieba dictionary). `kind` names what is built and
    from what (the model and its path, or a name and the config). `files` may be a function: it is
    called only when building, and the files it gave are the ones checked on later calls, so a hit
    costs a dictionary lookup and a stat per file (the masker is fetched once per prepared text).
    Nothing is cached when `build` raises."""
    with _LOCK:
        hit = _CACHE.get(kind)
    if hit is not None and tuple(_stamp(f) for f in hit[0]) == hit[1]:
        return hit[2]
    paths = tuple(os.fspath(p) for p in (files() if callable(files) else files))
    stamps = tuple(_stamp(f) for f in paths)
    value = build()
    with _LOCK:
        _CACHE[kind] = (paths, stamps, value)
    return value


def clear_cache() -> None:
    """Forget every cached resource (a test that swaps files within one mtime tick)."""
    with _LOCK:
        _CACHE.clear()


# -- loading and validation ---------------------------------------------------------------------


def parse_resource(raw: object, model: type[M], source: Path | str) -> M:
    """Validate an already-parsed YAML document; ConfigError names the file and every bad key."""
    kind = getattr(model, "resource_kind", "resource file")
    reference = getattr(model, "resource_reference", "the file's copy under configs/ in the repo")
    if raw is None:
        raw = {}  # an empty file: the model says which keys it lacks
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid {kind} {source}: it must hold a mapping of keys, not a {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, kind, reference)) from None


def load_resource(cfg: Config, path: Path | str, model: type[M]) -> M:
    """The resource file `path` (relative paths resolve as the config's do), read, validated
    against `model` and cached until the file changes."""
    p = cfg.resolve(path)
    return cached((model, str(p)), [p], lambda: parse_resource(load_yaml_resource(cfg, p), model, p))


# -- models of files whose consumers keep no model of their own ---------------------------------


class AsrCorrections(RootModel[dict[str, str]]):
    """configs/asr_corrections.yaml: wrong form -> right form, fixed in call transcripts."""

    model_config = ConfigDict(frozen=True, coerce_numbers_to_str=True)
    resource_kind: ClassVar[str] = "ASR corrections file"
    resource_reference: ClassVar[str] = "configs/asr_corrections.yaml (a mapping wrong form: right form)"

    def longest_first(self) -> tuple[tuple[str, str], ...]:
        # Longest first, so 优惠卷 is fixed before a shorter entry could touch part of it.
        return tuple(sorted(self.root.items(), key=lambda kv: -len(kv[0])))


class CauseEntry(CueResource):
    phrase: str = Field(min_length=1)
    category: str
    patterns: list[str] = Field(default_factory=list)


class CauseLexiconFile(CueResource):
    """configs/cause_lexicon.yaml. Which categories exist is the clusterer's to check
    (`pipeline.insights.cluster.CAUSE_CATEGORIES`); this is the file's shape."""

    resource_kind: ClassVar[str] = "cause lexicon"
    resource_reference: ClassVar[str] = "configs/cause_lexicon.yaml in the repo"

    categories: dict[str, str] = Field(default_factory=dict)
    causes: list[CauseEntry] = Field(default_factory=list)
    label_stopwords: list[str] = Field(default_factory=list)


class CueWeights(CueResource):
    repeated_punct_weight: float
    repeated_punct_max: int
    repeated_message_weight: float
    repeated_message_label: str
    caps_weight: float
    caps_allow: list[str]
    question_pressure: list[str]
    question_pressure_weight: float


class EmotionLexicon(CueResource):
    """configs/emotion.yaml (pipeline.analysis.emotion), validated: a typo stops the run with the
    key named, and every label the file uses must be one of its `labels`."""

    resource_kind: ClassVar[str] = "emotion lexicon"
    resource_reference: ClassVar[str] = "configs/emotion.yaml in the repo"

    labels: list[str]
    neutral_label: str
    positive_label: str
    dutir_map: dict[str, str | None]
    dutir_weight: dict[str, float]
    hownet_weight: float
    neutral_tokens: list[str]
    phrases: dict[str, dict[float, list[str]]]
    threats: list[str]
    threat_weight: float
    threat_label: str
    profanity: list[str]
    profanity_weight: float
    angry_emoji: list[str]
    angry_emoji_weight: float
    negators: list[str]
    negation_window: int
    negated_positive_weight: float
    negated_negative_weight: float
    intensifiers: list[str]
    intensifier_factor: float
    cues: CueWeights
    scale: float
    neutral_band: float

    @model_validator(mode="after")
    def _labels_known(self) -> EmotionLexicon:
        used = [
            *self.phrases,
            self.threat_label,
            self.neutral_label,
            self.positive_label,
            self.cues.repeated_message_label,
            *(v for v in self.dutir_map.values() if v),
        ]
        unknown = sorted({lab for lab in used if lab not in self.labels})
        if unknown:
            raise ValueError(f"labels {unknown} are not in `labels` {self.labels}")
        return self
