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
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from pipeline.config import Config
from pipeline.resources import Resource, load_resource, parse_resource


class Keyword(Resource):
    term: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)


def _as_keywords(v: object) -> object:
    # Plain strings are the common case in hand-written YAML; weight 1.
    if isinstance(v, list):
        return [{"term": str(x)} if isinstance(x, (str, int, float)) else x for x in v]
    return v


class IssueType(Resource):
    name: str = Field(min_length=1)
    definition: str = ""
    keywords: list[Keyword] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    # Short, general customer utterances of this type: the cold start's sentence-embedding
    # prototypes (with the definition). Written for the type, never copied from labelled chats.
    examples: list[str] = Field(default_factory=list)

    _norm_kw = field_validator("keywords", mode="before")(_as_keywords)


class RequestKind(Resource):
    name: str = Field(min_length=1)
    definition: str = ""
    keywords: list[str] = Field(default_factory=list)

    @field_validator("keywords", mode="before")
    @classmethod
    def _str_keywords(cls, v: object) -> object:
        return [str(x) for x in v] if isinstance(v, list) else v


class RequestKinds(Resource):
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


class ColdStart(Resource):
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


class UrgencyLevel(Resource):
    name: str = Field(min_length=1)
    # None marks the catch-all lowest level.
    min_score: float | None = None
    due_hours: float | None = Field(None, gt=0)


class UrgencyWeights(Resource):
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


class UrgencyCues(Resource):
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


class Urgency(Resource):
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


class Taxonomy(Resource):
    resource_kind: ClassVar[str] = "taxonomy"
    resource_reference: ClassVar[str] = "configs/taxonomy.yaml in the repo"

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


def parse_taxonomy(raw: object, source: Path | str = "<taxonomy>") -> Taxonomy:
    """Validate an already-parsed YAML mapping; ConfigError names every bad key."""
    return parse_resource(raw, Taxonomy, source)


def load_taxonomy(cfg: Config) -> Taxonomy:
    """The configured taxonomy, validated; cached until the file changes (it is read for every batch)."""
    return load_resource(cfg, cfg.classify.taxonomy, Taxonomy)
