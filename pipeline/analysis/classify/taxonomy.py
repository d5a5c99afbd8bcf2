"""The issue-type / request-kind / urgency taxonomy (`configs/taxonomy.yaml`), validated at load.

Why pydantic with `extra="forbid"`: the taxonomy is edited by hand by the people who route
cases; a misspelt key (`keyword:` for `keywords:`) must stop the run with the key named rather
than silently yield a type that never matches. Why a fingerprint: a trained model only knows
the labels (and keyword features) it was trained with, so loading it against a different
taxonomy must be refused, not produce labels that no longer exist.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config import Config, ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Keyword(_Strict):
    term: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)


def _as_keywords(v: object) -> object:
    # Plain strings are the common case in hand-written YAML; weight 1.
    if isinstance(v, list):
        return [{"term": str(x)} if isinstance(x, (str, int, float)) else x for x in v]
    return v


class IssueType(_Strict):
    name: str = Field(min_length=1)
    definition: str = ""
    keywords: list[Keyword] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    # Short, general customer utterances of this type: the cold start's sentence-embedding
    # prototypes (with the definition). Written for the type, never copied from labelled chats.
    examples: list[str] = Field(default_factory=list)

    _norm_kw = field_validator("keywords", mode="before")(_as_keywords)


class RequestKind(_Strict):
    name: str = Field(min_length=1)
    definition: str = ""
    keywords: list[str] = Field(default_factory=list)

    @field_validator("keywords", mode="before")
    @classmethod
    def _str_keywords(cls, v: object) -> object:
        return [str(x) for x in v] if isinstance(v, list) else v


class RequestKinds(_Strict):
    default: str
    kinds: list[RequestKind] = Field(min_length=1)
    # The kind a dissatisfied customer's contact is, and how low the lowest turn sentiment of the
    # emotion step (-1..1) must fall to count as dissatisfaction without any complaint cue.
    complaint: str = "投诉"
    complaint_emotion_below: float | None = Field(-0.6, ge=-1, le=1)

    @model_validator(mode="after")
    def _default_known(self) -> RequestKinds:
        names = [k.name for k in self.kinds]
        if self.default not in names:
            raise ValueError(f"request_kinds.default {self.default!r} is not one of the kinds {names}")
        if self.complaint not in names:
            raise ValueError(f"request_kinds.complaint {self.complaint!r} is not one of the kinds {names}")
        return self


class ColdStart(_Strict):
    """How issue types are decided before any model is trained."""

    # Sentence-embedding prototypes (each type's definition + examples) next to the keywords.
    # Off: keywords alone (no embedding model is loaded).
    embeddings: bool = True
    # Weight of the keyword share (a type's keyword score / (all scores + 1), 0..1) against the
    # embedding similarity (standardised across types, scaled so the best type scores 1).
    keyword_weight: float = Field(2.0, ge=0)
    # Characters of the customer's text embedded: enough to state the matter, and it bounds the
    # cost per case.
    embed_chars: int = Field(128, ge=16)


class UrgencyLevel(_Strict):
    name: str = Field(min_length=1)
    # None marks the catch-all lowest level.
    min_score: float | None = None
    due_hours: float | None = Field(None, gt=0)


class UrgencyWeights(_Strict):
    safety: float = 4.0
    escalation: float = 4.0
    repeat_contact: float = 1.5
    negative_emotion: float = 1.5
    emotion_cue: float = 0.25
    money: float = 0.5
    large_amount: float = 0.5
    refund: float = 0.5
    elapsed_per_day: float = 0.25
    elapsed_max: float = 1.5
    urgent_words: float = 0.5
    long_contact: float = 0.25


class UrgencyCues(_Strict):
    safety: list[str] = Field(default_factory=list)
    escalation: list[str] = Field(default_factory=list)
    refund: list[str] = Field(default_factory=list)
    urgent_words: list[str] = Field(default_factory=list)
    negation: list[str] = Field(default_factory=list)

    @field_validator("*", mode="before")
    @classmethod
    def _strs(cls, v: object) -> object:
        # YAML reads 12315 as an int; cues are always matched as text.
        return [str(x) for x in v] if isinstance(v, list) else v


class Urgency(_Strict):
    levels: list[UrgencyLevel] = Field(min_length=1)
    weights: UrgencyWeights = UrgencyWeights()
    large_amount: float = Field(500, ge=0)
    long_contact_s: float = Field(1800, gt=0)
    cues: UrgencyCues = UrgencyCues()

    @model_validator(mode="after")
    def _one_catch_all(self) -> Urgency:
        catch_all = [lv.name for lv in self.levels if lv.min_score is None or math.isnan(lv.min_score)]
        if len(catch_all) != 1:
            raise ValueError(
                "urgency.levels needs exactly one level with min_score: null (the lowest, "
                f"catch-all level); found {catch_all or 'none'}"
            )
        names = [lv.name for lv in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"urgency.levels has duplicate names: {names}")
        return self

    def ordered_levels(self) -> list[UrgencyLevel]:
        """Levels from the highest threshold down, catch-all last (the order they are tested in)."""
        scored = [lv for lv in self.levels if lv.min_score is not None and not math.isnan(lv.min_score)]
        rest = [lv for lv in self.levels if lv not in scored]
        return sorted(scored, key=lambda lv: -lv.min_score) + rest  # type: ignore[operator]


class Taxonomy(_Strict):
    version: int = 1
    fallback: str
    issue_types: list[IssueType] = Field(min_length=2)
    request_kinds: RequestKinds
    urgency: Urgency
    cold_start: ColdStart = ColdStart()

    @model_validator(mode="after")
    def _consistent(self) -> Taxonomy:
        names = [t.name for t in self.issue_types]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"issue_types has duplicate names: {dupes}")
        if self.fallback not in names:
            raise ValueError(f"fallback {self.fallback!r} is not one of the issue_types {names}")
        return self

    @property
    def labels(self) -> list[str]:
        return [t.name for t in self.issue_types]

    def fingerprint(self) -> str:
        """Hash of what a trained model depends on: the issue-type names (in order) and their
        keywords/exclusions (used as features by the rule-feature variant). Urgency and
        request-kind settings are left out: editing them must not force a retrain."""
        payload = [
            {"name": t.name, "keywords": [[k.term, k.weight] for k in t.keywords], "exclude": list(t.exclude)}
            for t in self.issue_types
        ]
        payload.append({"fallback": self.fallback})
        blob = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()


def _format(err: ValidationError, source: Path) -> str:
    lines = [f"invalid taxonomy {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check its spelling; see configs/taxonomy.yaml in the repo)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def parse_taxonomy(raw: object, source: Path | str = "<taxonomy>") -> Taxonomy:
    """Validate an already-parsed YAML mapping; ConfigError names every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping (fallback, issue_types, ...), not {type(raw).__name__}")
    try:
        return Taxonomy.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, Path(str(source)))) from None


_CACHE: dict[tuple[str, float], Taxonomy] = {}


def load_taxonomy(cfg: Config) -> Taxonomy:
    """The configured taxonomy, validated; cached per file and mtime (it is read for every batch)."""
    path = cfg.resolve(cfg.classify.taxonomy)
    try:
        key = (str(path), path.stat().st_mtime)
    except FileNotFoundError:
        raise ConfigError(
            f"taxonomy file {path} is missing; restore configs/taxonomy.yaml or fix classify.taxonomy in the config"
        ) from None
    if key not in _CACHE:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        _CACHE[key] = parse_taxonomy(raw, path)
    return _CACHE[key]
