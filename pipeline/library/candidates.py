"""Typical-case candidates, a pure function of the case table: the four parts a trainer reads,
the hard rules and score of a candidate, and a diverse pick per issue type and root-cause cluster.

Why pure: the reasons a case was picked are shown to the reviewer, and the same table must give
the same candidates (decisions live in the review store, `pipeline.library.store`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pandas as pd

from pipeline.config import Config, LibraryConfig

PARTS = ("context", "problem", "handling", "outcome")
PART_NAMES = {"context": "客户背景", "problem": "问题", "handling": "处理", "outcome": "结果"}


@dataclass
class Candidate:
    case_id: str
    issue_type: str
    cluster_id: str | None
    score: float
    reasons: list[str]
    parts: dict[str, str]
    groups: list[str] = field(default_factory=list)


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def case_parts(row: dict[str, Any]) -> dict[str, str]:
    """The four parts a trainer reads, from a (masked) case row: who and what context, the
    problem, what the agent did, how it ended, plus the agent turn at the biggest emotional rise."""
    raw_turns = row.get("turns")
    turns = [dict(t) for t in (raw_turns if raw_turns is not None else [])]
    first = next((_text(t.get("text")) for t in turns if t.get("speaker") == "customer"), "")
    ctx = [f"渠道:{_text(row.get('channel'))}"] + [
        f"{k}:{_text(row.get(c))}"
        for c, k in (("product", "商品"), ("region", "地区"), ("issue_type", "类型"))
        if _text(row.get(c))
    ]
    context = " ".join(ctx) + (f"；客户开场:{first[:120]}" if first else "")
    outcome = _text(row.get("outcome"))
    ev = _text(row.get("outcome_evidence"))
    traj = _text(row.get("emotion_trajectory"))
    out_text = outcome + (f"（{ev}）" if ev else "")
    if traj:
        out_text += f"；情绪{traj} {row.get('emotion_start', 0):+.2f}→{row.get('emotion_end', 0):+.2f}"
    parts = {
        "context": context if first else "",
        "problem": _text(row.get("problem")),
        "handling": _text(row.get("handling")),
        "outcome": out_text if outcome else "",
    }
    # The store reads turning_points back as the struct written (storage.store.read_cases).
    tp = row.get("turning_points")
    rise = (tp if isinstance(tp, dict) else {}).get("biggest_rise") or {}
    if rise.get("agent_before"):
        parts["turning_point"] = f"客服:{rise['agent_before']['text'][:160]} → 客户:{rise.get('customer', '')[:80]}"
    return parts


class CandidateScorer:
    """`assess(row)` -> (eligible, score, reasons). Hard rules make a case eligible; the score
    orders eligible cases (a bigger emotional recovery, concrete actions, a readable length)."""

    def __init__(self, lib: LibraryConfig, actions: Sequence[str]):
        self.lib = lib
        self.actions = [a for a in actions if a and a not in set(lib.generic_actions)]

    @classmethod
    def from_config(cls, cfg: Config) -> CandidateScorer:
        from pipeline.cases.extract import load_lexicon

        return cls(cfg.library, load_lexicon(cfg).agent_actions)

    def assess(self, row: dict[str, Any]) -> tuple[bool, float, list[str]]:
        lib = self.lib
        reasons: list[str] = []
        fails: list[str] = []
        parts = case_parts(row)
        if _text(row.get("outcome")) == "resolved":
            reasons.append(f"已解决（{_text(row.get('outcome_evidence')) or '结果词'}）")
        else:
            fails.append(f"outcome={_text(row.get('outcome')) or '?'}")
        missing = [PART_NAMES[p] for p in PARTS if len(parts.get(p, "")) < 2]
        (fails.append("缺少:" + "、".join(missing)) if missing else reasons.append("四部分齐全"))
        acts = [a for a in self.actions if a in _text(row.get("handling"))]
        (reasons.append("具体处理:" + "、".join(acts[:3])) if acts else fails.append("处理无具体动作"))
        n_chars = len(_text(row.get("customer_text"))) + len(_text(row.get("agent_text")))
        n_turns = int(row.get("n_turns") or 0)
        if lib.min_chars <= n_chars <= lib.max_chars and n_turns <= lib.max_turns:
            reasons.append(f"长度适中（{n_chars}字,{n_turns}轮）")
        else:
            fails.append(f"长度{n_chars}字/{n_turns}轮")
        delta = row.get("emotion_delta")
        delta = float(delta) if delta is not None and not pd.isna(delta) else 0.0
        if delta > 0:
            reasons.append(f"情绪改善 {float(row['emotion_start']):+.2f}→{float(row['emotion_end']):+.2f}")
        elif lib.require_emotion_improved:
            fails.append("情绪未改善")
        if fails:
            return False, 0.0, fails
        low = row.get("emotion_min")
        recovery = float(row["emotion_end"]) - float(low) if low is not None and not pd.isna(low) else 0.0
        length_fit = 1.0 - min(1.0, abs(n_chars - 300) / 600)
        score = (
            0.4
            + 0.25 * min(delta, 1.0)
            + 0.15 * min(max(recovery, 0.0), 1.0)
            + 0.1 * min(len(acts), 2) / 2
            + 0.1 * length_fit
        )
        if recovery > delta + 0.1 and low is not None:
            reasons.append(f"从低点 {float(low):+.2f} 回升")
        return True, round(score, 4), reasons


def select_diverse(order: Sequence[int], vectors: np.ndarray, k: int, max_similarity: float) -> list[int]:
    """Greedy: take rows in score order, skipping any too similar to one already taken, so a type's
    examples are not five near-copies."""
    picked: list[int] = []
    for i in order:
        if len(picked) >= k:
            break
        if picked and float(np.max(vectors[picked] @ vectors[i])) > max_similarity:
            continue
        picked.append(i)
    return picked


def select_candidates(
    cases: pd.DataFrame, vectors: np.ndarray, scorer: CandidateScorer, clusters: dict[str, str] | None = None
) -> tuple[list[Candidate], dict[str, int]]:
    """Candidates per issue type and per root-cause cluster (case_id -> cluster_id), diverse within
    each group. Returns the union (a case picked by two groups is listed once) and counts."""
    clusters = clusters or {}
    rows = cast(list[dict[str, Any]], cases.to_dict("records"))
    assessed = [scorer.assess(r) for r in rows]
    ok = [i for i, (e, _, _) in enumerate(assessed) if e]
    groups: dict[str, list[int]] = {}
    for i in ok:
        groups.setdefault(f"type:{_text(rows[i].get('issue_type')) or '未分类'}", []).append(i)
        cid = clusters.get(str(rows[i]["case_id"]))
        if cid:
            groups.setdefault(f"cluster:{cid}", []).append(i)
    chosen: dict[int, list[str]] = {}
    for g, members in groups.items():
        order = sorted(members, key=lambda i: (-assessed[i][1], str(rows[i]["case_id"])))
        for i in select_diverse(order, vectors, scorer.lib.per_group, scorer.lib.max_similarity):
            chosen.setdefault(i, []).append(g)
    out = []
    for i, gs in sorted(chosen.items(), key=lambda kv: -assessed[kv[0]][1]):
        r = rows[i]
        out.append(
            Candidate(
                str(r["case_id"]),
                _text(r.get("issue_type")) or "未分类",
                clusters.get(str(r["case_id"])),
                assessed[i][1],
                assessed[i][2],
                case_parts(r),
                gs,
            )
        )
    return out, {"cases": len(rows), "eligible": len(ok), "groups": len(groups), "candidates": len(out)}


def cluster_map(members: pd.DataFrame | None) -> dict[str, str]:
    """case_id -> cluster_id, preferring the within-issue-type clustering over the all-cases one."""
    if members is None or not len(members) or "cluster_id" not in members:
        return {}
    m = members[members["cluster_id"].notna()].copy()
    if "scope" in m and "issue_type" in m:
        m["_own"] = (m["scope"] == m["issue_type"]).astype(int)
        m = m.sort_values("_own", ascending=False, kind="stable")
    return {str(k): str(v) for k, v in m.drop_duplicates("case_id")[["case_id", "cluster_id"]].itertuples(index=False)}


def case_texts(cases: pd.DataFrame) -> list[str]:
    """What a case is embedded on: its problem, else what the customer said."""
    prob = cases["problem"].fillna("").astype(str) if "problem" in cases else pd.Series([""] * len(cases))
    cust = cases["customer_text"].fillna("").astype(str) if "customer_text" in cases else pd.Series([""] * len(cases))
    return [p if len(p) >= 4 else c[:200] for p, c in zip(prob, cust)]
