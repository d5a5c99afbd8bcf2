"""Typical-case candidates, a pure function of the case table: the four parts a trainer reads,
the hard rules and score of a candidate, and a diverse pick per issue type and root-cause cluster.

Why pure: the reasons a case was picked are shown to the reviewer, and the same table must give
the same candidates (decisions live in the review store, `pipeline.library.store`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config, LibraryConfig
from pipeline.library.spill import Spill, SpilledVectors

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
        ok, score, reasons, _ = self.judge(row)
        return ok, score, reasons

    def judge(self, row: dict[str, Any]) -> tuple[bool, float, list[str], dict[str, str]]:
        """`assess` and the case's parts (`case_parts(row)`), which it reads anyway: a caller
        that makes a Candidate of an eligible row need not compute them twice."""
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
        handling = _text(row.get("handling"))  # once, not once per action
        acts = [a for a in self.actions if a in handling]
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
            return False, 0.0, fails, parts
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
        return True, round(score, 4), reasons, parts

    def may_pass(self, table: pa.Table, emotion_known: bool = True) -> np.ndarray:
        """Which rows of `table` (stored cases in Arrow, at least their plain columns) `assess`
        may find eligible: a superset of the eligible rows, decided on the plain columns so a
        nightly build turns only those rows into Python dicts and assesses only them.

        Why a superset, rule by rule of `assess` (each one a failure there, so a necessary condition;
        `_text` of a null is "", and pc.utf8_length counts code points as `len` does):
        - outcome: `_text(outcome) == "resolved"`;
        - parts: the problem and handling parts are `_text` of their columns, at least 2 characters;
        - actions: some action of `self.actions` is a substring of `_text(handling)`;
        - length: min_chars <= len(customer_text) + len(agent_text) <= max_chars, and
          n_turns <= max_turns (a null n_turns is kept: `assess` decides it, as it always did);
        - emotion, with require_emotion_improved: emotion_delta > 0 (null or NaN count as 0.0).
          Only when `emotion_known`: a block whose emotion curves are computed in memory
          (`sources._completed`) has its stored emotion_delta replaced after this filter.
        The context part (a customer turn) and the score are left to `assess`."""
        lib = self.lib

        def column(name: str, kind: pa.DataType) -> Any:
            return table.column(name) if name in table.column_names else pa.nulls(len(table), kind)

        def text(name: str) -> Any:
            return pc.fill_null(column(name, pa.string()), "")

        handling = text("handling")
        n_chars = pc.add(pc.utf8_length(text("customer_text")), pc.utf8_length(text("agent_text")))
        checks = [
            pc.equal(text("outcome"), "resolved"),
            pc.greater_equal(pc.utf8_length(text("problem")), 2),
            pc.greater_equal(pc.utf8_length(handling), 2),
            pc.greater_equal(n_chars, lib.min_chars),
            pc.less_equal(n_chars, lib.max_chars),
            pc.fill_null(pc.less_equal(column("n_turns", pa.int32()), lib.max_turns), True),
        ]
        if lib.require_emotion_improved and emotion_known:
            checks.append(pc.fill_null(pc.greater(column("emotion_delta", pa.float64()), 0.0), False))
        keep = np.ones(len(table), dtype=bool)
        for c in checks:
            keep &= np.asarray(c.to_numpy(zero_copy_only=False), dtype=bool)
        if keep.any():
            # Actions are looked for only in the rows still kept: most rows fail a cheaper rule.
            rows = np.flatnonzero(keep)
            kept = pc.take(handling, pa.array(rows))
            acted = np.zeros(len(rows), dtype=bool)
            for act in self.actions:
                acted |= np.asarray(pc.match_substring(kept, act).to_numpy(zero_copy_only=False), dtype=bool)
            keep[rows] = acted
        return keep


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
        for g in groups_of(rows[i].get("issue_type"), clusters.get(str(rows[i]["case_id"]))):
            groups.setdefault(g, []).append(i)
    chosen: dict[int, list[str]] = {}
    for g, members in groups.items():
        order = sorted(members, key=lambda i: (-assessed[i][1], str(rows[i]["case_id"])))
        for i in select_diverse(order, vectors, scorer.lib.per_group, scorer.lib.max_similarity):
            chosen.setdefault(i, []).append(g)
    out = []
    for i, gs in sorted(chosen.items(), key=lambda kv: (-assessed[kv[0]][1], str(rows[kv[0]]["case_id"]))):
        r = rows[i]
        out.append(
            Candidate(
                str(r["case_id"]),
                _text(r.get("issue_type")) or "未分类",
                clusters.get(str(r["case_id"])),
                assessed[i][1],
                assessed[i][2],
                case_parts(r),
                group_order(gs),
            )
        )
    return out, {"cases": len(rows), "eligible": len(ok), "groups": len(groups), "candidates": len(out)}


class _Pooled:
    """What selection keeps of one eligible case: its place in a group's order, and what a
    Candidate and the encoder need (not the row, whose turns and texts dominate its size).

    The Candidate is kept packed, as the UTF-8 JSON of its fields, and made again when read
    (`cand`): only the picked cases' and the saved pools' are. Why: the pools hold every distinct
    text of a group whose near-copies make its pick run short, and those grow with the history;
    as Python objects (a parts dict of five strings, a reasons list, the Candidate) an entry took
    3.3 KiB, 92 MiB for a 129k-case history's 28,885 entries; packed it takes about a third.
    With a `Spill` the packed bytes are written there and the entry keeps their handle."""

    __slots__ = ("key", "text", "stands_for_copies", "_packed", "_spill")

    def __init__(
        self,
        key: tuple[float, str],
        cand: Candidate,
        text: str,
        stands_for_copies: bool = False,
        spill: Spill | None = None,
    ):
        self.key = key  # (-score, case_id): the order select_candidates reads a group in
        self.text = text
        self.stands_for_copies = stands_for_copies  # a later case of one of its groups had the same text
        fields = [cand.issue_type, cand.cluster_id, cand.score, cand.reasons, cand.parts]
        # surrogatepass: a text is packed and read back whatever code points it holds.
        packed = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        self._spill = spill
        self._packed: bytes | int = spill.put(packed) if spill is not None else packed

    @property
    def case_id(self) -> str:
        return self.key[1]

    @property
    def cand(self) -> Candidate:
        """The Candidate pooled, its groups empty (they are filled in once it is picked)."""
        packed = self._spill.get(cast(int, self._packed)) if self._spill is not None else cast(bytes, self._packed)
        issue_type, cluster_id, score, reasons, parts = json.loads(packed.decode("utf-8", "surrogatepass"))
        return Candidate(self.key[1], issue_type, cluster_id, score, reasons, parts)


# A pool is kept this many times deeper than the pick reads (its cap): a group whose pick runs
# short while texts lie beyond its cap takes the next 4x from its own pool (`_deepen`) instead of
# reading every stored case again. Why: on a night that adds cases, crowded groups (templated
# complaints, near-copies of one text) fill their top-cap with new near-copies and run short; the
# deeper texts of the old cases are not in the night's parts, so without a reserve the group's
# every stored case had to be read again (most of a +10,000 night's time at 100k).
RESERVE = 4


@dataclass
class _Pools:
    """Per group, in the order select_candidates first meets it: its best cases (at most its depth
    of distinct texts: `RESERVE` x its cap, of which the pick reads the first cap), its size,
    whether a case was ever cut for the depth (if not, the pool holds every distinct text of
    the group, so no pick of it ever needs the cases read again)."""

    pools: dict[str, list[_Pooled]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)
    n_cases: int = 0
    spill: Spill | None = None  # where its entries keep their packed Candidates (None: in memory)


def _trim(pool: list[_Pooled], cap: int, drop_copies: bool) -> tuple[list[_Pooled], bool]:
    """The pool in order, without later copies of a text (when `drop_copies`), cut to `cap`;
    and whether the cap cut anything."""
    pool.sort(key=lambda e: e.key)
    if drop_copies:
        first: dict[str, _Pooled] = {}
        kept = []
        for e in pool:
            if e.text in first:
                first[e.text].stands_for_copies = True
            else:
                first[e.text] = e
                kept.append(e)
        pool = kept
    return pool[:cap], len(pool) > cap


# A block of stored cases: a frame (every row of it read), or (the rows kept, how many were read)
# when the reader already dropped rows `CandidateScorer.may_pass` rules out.
Block = pd.DataFrame | tuple[pd.DataFrame, int]


def _pool_blocks(
    blocks: Iterable[Block],
    scorer: CandidateScorer,
    clusters: Callable[[list[str]], list[str | None]],
    depths: dict[str, int],
    default_depth: int,
    drop_copies: bool,
    got: _Pools | None = None,
    only: set[str] | None = None,
    spill: Spill | None = None,
) -> _Pools:
    """One read of the blocks into per-group pools (see `select_candidates_in_blocks`) cut to
    their depths, added to `got` when given (a previous night's pools: `extend_selection`). With
    `only`, the pools of those groups alone, from the rows of those groups alone (a deeper pass:
    `_deepen`); sizes and the count of cases read are then left to the pass that read everything.
    A new `_Pools` keeps its entries' Candidates in `spill` when given."""
    got = got if got is not None else _Pools(spill=spill)
    for item in blocks:
        block, n_read = item if isinstance(item, tuple) else (item, len(item))
        if only is not None:
            block = _rows_in(block, only, clusters)
        else:
            got.n_cases += n_read
        rows = cast(list[dict[str, Any]], block.to_dict("records"))
        assessed = [scorer.judge(r) for r in rows]
        eligible = [a[0] for a in assessed]
        ok = [(r, a) for r, a in zip(rows, assessed) if a[0]]
        if not ok:
            continue
        texts = case_texts(block[eligible])
        cids = clusters([str(r["case_id"]) for r, _ in ok])
        touched = set()
        for (r, (_, score, reasons, parts)), text, cid in zip(ok, texts, cids):
            issue = _text(r.get("issue_type")) or "未分类"
            cand = Candidate(str(r["case_id"]), issue, cid, score, reasons, parts)
            e = _Pooled((-score, cand.case_id), cand, text, spill=got.spill)
            for g in groups_of(cand.issue_type, cand.cluster_id):
                if only is not None and g not in only:
                    continue
                got.pools.setdefault(g, []).append(e)
                if only is None:
                    got.sizes[g] = got.sizes.get(g, 0) + 1
                touched.add(g)
        for g in touched:
            got.pools[g], cut = _trim(got.pools[g], depths.get(g, default_depth), drop_copies)
            if cut:
                got.cut.add(g)
    return got


def _rows_in(block: pd.DataFrame, groups: set[str], clusters: Callable[[list[str]], list[str | None]]) -> pd.DataFrame:
    """The rows of `block` in any of `groups` (by issue type or cluster, as `groups_of` names
    them), before they are judged: a deeper pass for a few groups judges only their cases."""
    if not len(block):
        return block
    n = len(block)
    types = block["issue_type"].tolist() if "issue_type" in block else [None] * n
    cids = clusters([str(i) for i in block["case_id"]])
    keep = [not groups.isdisjoint(groups_of(t, c)) for t, c in zip(types, cids)]
    return block[keep].reset_index(drop=True)


def rows_in_groups(
    table: pa.Table, groups: set[str], clusters: Callable[[list[str]], list[str | None]], among: np.ndarray
) -> np.ndarray:
    """Which rows of `among` (a bool mask over `table`, stored cases in Arrow) may be in one of
    `groups`: a superset of `_rows_in`'s rows, decided before rows become pandas rows (a case
    with no stored issue type is kept: it is classified in memory later)."""
    keep = np.zeros(len(table), dtype=bool)
    rows = np.flatnonzero(among)
    if not len(rows):
        return keep
    at = pa.array(rows)
    ids = [str(i) for i in table.column("case_id").take(at).to_pylist()]
    types = (
        table.column("issue_type").take(at).to_pylist() if "issue_type" in table.column_names else [None] * len(rows)
    )
    cids = clusters(ids)
    keep[rows] = [t is None or not groups.isdisjoint(groups_of(t, c)) for t, c in zip(types, cids)]
    return keep


def _deepen(
    got: _Pools,
    short: list[str],
    read_again: Callable[[set[str]], tuple[Iterable[Block], Callable[[list[str]], list[str | None]]]],
    scorer: CandidateScorer,
    caps: dict[str, int],
    depths: dict[str, int],
    default_cap: int,
    drop_copies: bool,
) -> list[str]:
    """The `short` groups' caps made four times larger. A group whose pool already holds its
    best texts to the new cap (its reserve, or every text it has) reads them from there; the
    others are read again from `read_again(groups)` (every case's blocks and their cluster
    lookup) with a reserve under the new cap, in place of their pools in `got`; the other
    groups' pools stay as they are. Returns the groups read again."""
    for g in short:
        caps[g] = 4 * caps.get(g, default_cap)
    again = [g for g in short if g in got.cut and caps[g] > depths.get(g, RESERVE * default_cap)]
    for g in short:
        if g not in got.cut:  # every text it has is pooled: any depth holds them, keep a reserve
            depths[g] = max(depths.get(g, RESERVE * default_cap), RESERVE * caps[g])
    if again:
        for g in again:
            depths[g] = RESERVE * caps[g]
        blocks, clusters = read_again(set(again))
        deeper = _pool_blocks(
            blocks, scorer, clusters, depths, RESERVE * default_cap, drop_copies, only=set(again), spill=got.spill
        )
        for g in again:
            got.pools[g] = deeper.pools.get(g, [])
            got.cut.discard(g)
            if g in deeper.cut:
                got.cut.add(g)
    return again


def group_order(groups: list[str]) -> list[str]:
    """A candidate's groups as listed: its issue type first, then clusters by id (not the order
    the groups were met in, which depends on the order cases are read)."""
    return sorted(groups, key=lambda g: (not g.startswith("type:"), g))


def groups_of(issue_type: Any, cluster_id: str | None) -> list[str]:
    """The groups a case competes in: its issue type ("未分类" when it has none), and its
    root-cause cluster if it has one."""
    return [f"type:{_text(issue_type) or '未分类'}", *([f"cluster:{cluster_id}"] if cluster_id else [])]


@dataclass
class Selection:
    """What a block-wise selection ends with: the candidates and counts, and what a later night
    continues from (`extend_selection`): the pools, the caps they were cut to, and the pooled
    cases' vectors (so a night encodes only its own new pooled cases)."""

    candidates: list[Candidate]
    counts: dict[str, int]
    pools: _Pools
    caps: dict[str, int]
    default_cap: int
    vectors: MutableMapping[str, np.ndarray]  # a dict, or `SpilledVectors` with a spill
    copies_dropped: bool
    # The pools' depths where not RESERVE x cap (a group deepened from its reserve keeps the
    # depth it had until it is read again).
    depths: dict[str, int] = field(default_factory=dict)

    def depth(self, group: str) -> int:
        return self.depths.get(group, RESERVE * self.caps.get(group, self.default_cap))


def _heads(got: _Pools, caps: dict[str, int], default_cap: int) -> dict[str, list[_Pooled]]:
    """Each group's pool as far as its pick reads it (its cap; the rest is reserve)."""
    return {g: p[: caps.get(g, default_cap)] for g, p in got.pools.items()}


def _encode_pooled(
    heads: dict[str, list[_Pooled]],
    vectors: MutableMapping[str, np.ndarray],
    encode: Callable[[list[str]], np.ndarray],
) -> dict[str, _Pooled]:
    """Vectors for every case a pick reads (`_heads`: the ones not in `vectors` encoded, the
    others dropped; a reserve is encoded only once a pick reaches it); returns those cases by id."""
    pooled = {e.case_id: e for p in heads.values() for e in p}
    for i in [i for i in vectors if i not in pooled]:
        del vectors[i]
    fresh = [e for i, e in pooled.items() if i not in vectors]
    if fresh:
        vecs = np.asarray(encode([e.text for e in fresh]), dtype=np.float32)
        vectors.update((e.case_id, v) for e, v in zip(fresh, vecs))
    return pooled


def _copy_margin_holds(
    entries: Iterable[_Pooled], vectors: MutableMapping[str, np.ndarray], lib: LibraryConfig
) -> bool:
    """Whether a text's later copies may be left out of these entries' groups: each copy's
    similarity to its twin (v.v) is above max_similarity, with a margin because the greedy
    computes v.v inside a matrix product."""
    return all(float(vectors[e.case_id] @ vectors[e.case_id]) > lib.max_similarity + 1e-3 for e in entries)


def _pick(
    got: _Pools, heads: dict[str, list[_Pooled]], vectors: MutableMapping[str, np.ndarray], lib: LibraryConfig
) -> tuple[list[Candidate], list[str]]:
    """The greedy diverse pick of every pool's head, as candidates (a case picked by two groups
    listed once, best score first), and the groups that ran short of picks while texts lay
    beyond their heads (in the reserve, or cut)."""
    chosen: dict[str, tuple[_Pooled, list[str]]] = {}
    short = []
    for g, members in heads.items():
        mat = np.stack([vectors[e.case_id] for e in members])
        picks = select_diverse(range(len(members)), mat, lib.per_group, lib.max_similarity)
        if len(picks) < lib.per_group and (g in got.cut or len(got.pools[g]) > len(members)):
            short.append(g)
        for i in picks:
            chosen.setdefault(members[i].case_id, (members[i], []))[1].append(g)
    # Ordered by what the cases are, not by the order groups were met in: a night that adds
    # cases to yesterday's pools lists the same candidates as a build over everything.
    ordered = sorted(chosen.values(), key=lambda eg: (-eg[0].cand.score, eg[0].case_id))
    out = [replace(e.cand, groups=group_order(gs)) for e, gs in ordered]
    return out, short


def _counts(got: _Pools, out: list[Candidate]) -> dict[str, int]:
    eligible = sum(n for g, n in got.sizes.items() if g.startswith("type:"))
    return {"cases": got.n_cases, "eligible": eligible, "groups": len(got.pools), "candidates": len(out)}


def select_candidates_in_blocks(
    blocks: Callable[[], Iterable[Block]],
    encode: Callable[[list[str]], np.ndarray],
    scorer: CandidateScorer,
    clusters: Callable[[list[str]], list[str | None]] | None = None,
    pool: int | None = None,
) -> tuple[list[Candidate], dict[str, int]]:
    """`select_candidates` over the concatenated `blocks()`, with the eligible cases' texts
    `encode`d, in memory that does not grow with the number of cases read.

    Why it gives the same pick: `select_diverse` reads a group in (-score, case_id) order and
    stops at `per_group` picks, so it only looks at a prefix of that order, and it never takes a
    later case whose text (so vector) equals an earlier one's: that case is as similar to every
    pick as its twin (which was taken or skipped), and its similarity to the twin, v.v, is above
    max_similarity (checked; else the copies are kept). So each group keeps only its best `pool`
    distinct texts (default 8 x per_group). When the greedy pick fills up inside them it is the
    pick over the whole group; when near-copies make it run out first while cases were cut, the
    blocks are read again with that group's pool four times larger, until it fills or nothing
    is cut. Only pooled cases are encoded, so a text's vector must not depend on what else is
    encoded with it (true of the encoders here, which embed texts one by one or cache them).

    `clusters(ids)` gives each case's root-cause cluster or None; `blocks` is a factory because a
    deeper pass reads them again. A block may come as (kept rows, rows read) when its reader left
    out rows no rule of `scorer.assess` could pass (`CandidateScorer.may_pass`): those rows are
    counted as read and never reach Python. Counts: cases read, eligible, groups, candidates."""
    s = pool_selection(blocks, encode, scorer, clusters, pool)
    return s.candidates, s.counts


def pool_selection(
    blocks: Callable[[], Iterable[Block]],
    encode: Callable[[list[str]], np.ndarray],
    scorer: CandidateScorer,
    clusters: Callable[[list[str]], list[str | None]] | None = None,
    pool: int | None = None,
    caps: dict[str, int] | None = None,
    blocks_of: Callable[[set[str]], Iterable[Block]] | None = None,
    spill: Spill | None = None,
) -> Selection:
    """`select_candidates_in_blocks`, returning also what a later night continues from.
    `caps`: pool sizes to start from for some groups (a group that ran short before keeps its
    deeper pool, so the nights after can extend it); any cap gives the same pick.
    `blocks_of(groups)`: the blocks a deeper pass reads for those groups, when the reader can
    leave out rows of other groups before they become pandas rows (`rows_in_groups`).
    `spill`: where the pools keep their Candidates and vectors while they grow (`pipeline.library.spill`);
    the same selection either way."""
    lib = scorer.lib
    default_cap = pool or 8 * lib.per_group
    lookup = clusters or (lambda ids: [None] * len(ids))
    caps = dict(caps or {})
    depths = {g: RESERVE * c for g, c in caps.items()}
    drop_copies = True
    vectors: MutableMapping[str, np.ndarray] = SpilledVectors(spill) if spill is not None else {}

    def read_again(groups: set[str]):
        return (blocks_of(groups) if blocks_of is not None else blocks()), lookup

    got = _pool_blocks(blocks(), scorer, lookup, depths, RESERVE * default_cap, drop_copies, spill=spill)
    while True:
        heads = _heads(got, caps, default_cap)
        pooled = _encode_pooled(heads, vectors, encode)
        if drop_copies and not _copy_margin_holds((e for e in pooled.values() if e.stands_for_copies), vectors, lib):
            drop_copies = False
            got = _pool_blocks(blocks(), scorer, lookup, depths, RESERVE * default_cap, drop_copies, spill=spill)
            continue
        out, short = _pick(got, heads, vectors, lib)
        if not short:
            break
        _deepen(got, short, read_again, scorer, caps, depths, default_cap, drop_copies)
    depths = {g: d for g, d in depths.items() if d != RESERVE * caps.get(g, default_cap)}
    return Selection(out, _counts(got, out), got, caps, default_cap, vectors, drop_copies, depths)


@dataclass
class Fallback:
    """Why an extension cannot give the exact pick, and the pool caps a read of everything
    should start from (deeper for the groups that ran short)."""

    reason: str
    caps: dict[str, int]


def extend_selection(
    previous: Selection,
    blocks: Iterable[Block],
    encode: Callable[[list[str]], np.ndarray],
    scorer: CandidateScorer,
    clusters: Callable[[list[str]], list[str | None]] | None = None,
    reread: Callable[[set[str]], tuple[Iterable[Block], Callable[[list[str]], list[str | None]]]] | None = None,
) -> Selection | Fallback:
    """`previous` (a selection over some cases) with the cases of `blocks` added: the selection
    `pool_selection` makes over both, or why it cannot be had this way (then select over
    everything again, from the caps given).

    Why it is the same selection: a pool holds its group's best distinct texts up to its cap,
    which does not depend on the order cases are read in, so the new cases are pooled as if read
    after the old ones, and only they are encoded. It needs what the caller checks: no case of
    `blocks` is an old case again, and no old case changed (its row, issue type or cluster).

    A group that runs short of picks takes the next texts from its pool's reserve (or finds it
    holds every text it has: `_deepen`), as a build over everything would (counted in
    `groups_deepened`). Only one whose reserve is used up and whose cases were cut needs its
    cases read again: `reread(groups)` gives every case's blocks (those groups' rows at least)
    and their cluster lookup, and only the rows of the short groups are judged (counted in
    `groups_read_again`); without `reread` the Fallback says "short group". A pooled vector
    whose self-similarity is too low for copies to be left out gives "copy margin" (checked on
    every pooled case: which pooled case stood for left-out copies depends on the read order)."""
    lib = scorer.lib
    if not previous.copies_dropped:
        return Fallback("copies kept", previous.caps)
    lookup = clusters or (lambda ids: [None] * len(ids))
    default_cap = previous.default_cap
    caps = dict(previous.caps)
    depths = {g: previous.depth(g) for g in set(caps) | set(previous.depths)}
    got = _pool_blocks(blocks, scorer, lookup, depths, RESERVE * default_cap, True, previous.pools)
    vectors = previous.vectors

    def no_reread(groups: set[str]):
        raise _NeedsWholeRead(groups)

    deepened = read_again = 0
    while True:
        heads = _heads(got, caps, default_cap)
        pooled = _encode_pooled(heads, vectors, encode)
        if not _copy_margin_holds(pooled.values(), vectors, lib):
            return Fallback("copy margin", caps)
        out, short = _pick(got, heads, vectors, lib)
        if not short:
            break
        try:
            again = _deepen(got, short, reread or no_reread, scorer, caps, depths, default_cap, True)
        except _NeedsWholeRead:
            return Fallback("short group", caps)
        deepened += len(short)
        read_again += len(again)
    counts = {**_counts(got, out), "groups_deepened": deepened, "groups_read_again": read_again}
    depths = {g: d for g, d in depths.items() if d != RESERVE * caps.get(g, default_cap)}
    return Selection(out, counts, got, caps, default_cap, vectors, True, depths)


class _NeedsWholeRead(Exception):
    """A group's reserve is used up and no reader of every case was given."""


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
