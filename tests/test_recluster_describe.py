"""A re-cluster's cluster descriptions, computed without per-cluster copies, are the same.

`describe_scope` counts every cluster's mix in one pass over the columns' codes, its causes from
its texts a block at a time, and its centroid in float64 a block of rows at a time (`row_sum`),
where it took copies of each cluster's fields, texts and vectors (and two float64 copies of
those). Each test compares with the replaced form, kept here verbatim, on awkward values:
missing, empty and "未知" values, ties, noise, labels in any order, rows in any order, absent
columns, Arrow and object columns, float32 and float64 vectors, duplicate vectors."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

import pipeline.insights.cluster as cl
from pipeline.insights.cluster import (
    NOISE,
    OUTCOME_KEYS,
    CauseLexicon,
    ScopeResult,
    _mean,
    _ranked,
    centroid_of,
    class_tfidf,
    describe_scope,
    format_shares,
    label_from_terms,
    representatives,
    row_sum,
    share_dict,
)

# -- the replaced forms ---------------------------------------------------------------------------

_DESCRIBED_FIELDS = ("outcome", "region", "product", "emotion_score", "emotion", "channel", "issue_type")
_DESCRIBED_FIELDS += ("cluster_text",)


def _old_centroid_of(X: np.ndarray) -> np.ndarray:
    c = np.asarray(X, dtype=np.float64).mean(axis=0)
    n = np.linalg.norm(c)
    return (c / n if n else c).astype(np.float32)


def _old_representatives(X: np.ndarray, k: int) -> list[int]:
    c = _old_centroid_of(X)
    sims = np.asarray(X, dtype=np.float32) @ c
    return [int(i) for i in np.argsort(-sims, kind="stable")[:k]]


def _old_attribute(lexicon: CauseLexicon, texts: Sequence[str], min_share: float) -> dict:
    n = max(len(texts), 1)
    phrase_hits: Counter = Counter()
    cat_hits: Counter = Counter()
    for t in texts:
        found = lexicon.find(t)
        phrase_hits.update({c.phrase for c in found})
        cat_hits.update({c.category for c in found})
    phrases = [(p, k / n) for p, k in _ranked(phrase_hits) if k / n >= min_share]
    cats = [(c, k / n) for c, k in _ranked(cat_hits) if k / n >= min_share]
    category = cats[0][0] if cats else None
    return {
        "cause_phrases": [p for p, _ in phrases[:3]],
        "cause_phrase_shares": [round(s, 3) for _, s in phrases[:3]],
        "cause_category": category,
        "cause_category_zh": lexicon.category_names.get(category, category) if category else None,
        "cause_category_share": round(cats[0][1], 3) if cats else 0.0,
    }


def _old_describe_scope(scope, frame, X, labels, tokens, lexicon, cfg, stopwords=frozenset(), rows=None):
    c = cfg.cluster
    terms = class_tfidf(tokens, labels, c.top_terms, stopwords, c.label_min_lift)
    out, cents = [], {}
    scope_size = len(labels)
    fields = frame[[col for col in _DESCRIBED_FIELDS if col in frame]]
    for lab in sorted(set(int(v) for v in labels) - {NOISE}):
        idx = np.flatnonzero(labels == lab)
        at = idx if rows is None else rows[idx]
        sub = fields.iloc[at]
        Xc = X[at]
        reps = [int(at[i]) for i in _old_representatives(Xc, c.representatives)]
        top = [t for t, _ in terms.get(lab, [])]
        rep_texts = frame["cluster_text"].iloc[reps].tolist()
        outcome = share_dict(sub["outcome"] if "outcome" in sub else [])
        regions = share_dict(sub["region"] if "region" in sub else [])
        products = share_dict(sub["product"] if "product" in sub else [])
        cents[lab] = _old_centroid_of(Xc)
        out.append(
            {
                "scope": scope,
                "local_label": lab,
                "label": label_from_terms(top, rep_texts[0] if rep_texts else "", c.label_terms),
                "top_terms": top,
                "size": int(len(idx)),
                "scope_size": scope_size,
                "share_of_scope": round(len(idx) / max(scope_size, 1), 4),
                **{f"share_{k}": outcome.get(k, 0.0) for k in OUTCOME_KEYS},
                "mean_emotion": _mean(sub["emotion_score"]) if "emotion_score" in sub else None,
                "top_emotion": next(iter(share_dict(sub["emotion"]).keys()), None) if "emotion" in sub else None,
                "channels": json.dumps(share_dict(sub["channel"] if "channel" in sub else []), ensure_ascii=False),
                "issue_types": json.dumps(share_dict(sub["issue_type"], top=3), ensure_ascii=False),
                "top_regions": format_shares(regions, c.top_breakdown),
                "top_products": format_shares(products, c.top_breakdown),
                "representative_case_ids": frame["case_id"].iloc[reps].astype(str).tolist()
                if "case_id" in frame
                else [],
                "representative_texts": rep_texts,
                **_old_attribute(lexicon, sub["cluster_text"].tolist(), c.cause_min_share),
                "cause_suggested": True,
            }
        )
    return ScopeResult(scope, pd.DataFrame(out), np.asarray(labels, dtype=int), cents)


# -- centroids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_sum_is_numpys_sum_bit_for_bit(monkeypatch, dtype):
    """Rows of very different scales (so any other order of the additions rounds differently),
    several blocks and a short last one, a block exactly full, one row, -0.0 columns."""
    rng = np.random.default_rng(5)
    monkeypatch.setattr(cl, "_SUM_ROWS", 64)
    for n in (1, 2, 63, 64, 65, 128, 1000, 4097):
        for d in (2, 3, 384):
            X = (rng.standard_normal((n, d)) * 10.0 ** rng.integers(-4, 5, size=(n, 1))).astype(dtype)
            X[:, 0] = -0.0
            want = np.asarray(X, dtype=np.float64).sum(axis=0)
            assert row_sum(X).tobytes() == want.tobytes(), (n, d)
            assert centroid_of(X).tobytes() == _old_centroid_of(X).tobytes(), (n, d)


def test_centroid_of_other_layouts_as_before():
    """One column, Fortran order, a strided view, a list: numpy's own mean (pairwise sums) as before."""
    rng = np.random.default_rng(6)
    X = (rng.standard_normal((5000, 4)) * 10.0 ** rng.integers(-4, 5, size=(5000, 1))).astype(np.float32)
    # Cancelling sums: summed row after row or pairwise they point elsewhere.
    cancel = np.stack([np.tile([2.0**60, 1.0, -(2.0**60), 1.0], 1000), np.full(4000, 1e-3)], axis=1).astype(np.float32)
    assert centroid_of(cancel).tobytes() == _old_centroid_of(cancel).tobytes()
    for v in (X[:, :1], np.asfortranarray(X), X[::3], X.tolist(), np.asfortranarray(cancel), cancel[::2]):
        assert centroid_of(v).tobytes() == _old_centroid_of(v).tobytes()
    assert representatives(X, 7) == _old_representatives(X, 7)


# -- describe_scope -------------------------------------------------------------------------------

TEXTS = ["快递三天没到", "发票抬头开错了", "退款一直没到账", "页面打不开闪退", "系统故障扣款失败", "耳机没声音"]


def _frame(n: int, rng: np.random.Generator, arrow: bool) -> pd.DataFrame:
    pick = lambda vals: [vals[i] for i in rng.integers(len(vals), size=n)]  # noqa: E731
    scores = rng.random(n).round(2)
    scores[rng.random(n) < 0.2] = np.nan
    frame = pd.DataFrame(
        {
            "case_id": [f"c{i:04d}" for i in range(n)],
            "outcome": pick(["resolved", "unresolved", "escalated", None, "", "未知"]),
            "region": pick(["华东", "华北", None, "未知", ""]),
            "product": pick(["手机", "耳机", "电脑"]),
            "emotion_score": scores,
            "emotion": pick(["平静", "愤怒", "焦虑", None]),
            "channel": pick(["app", "web"]),
            "issue_type": pick(["物流", "票据", "售后", "支付"]),
            "cluster_text": [f"{t}，第{i}次" for i, t in enumerate(pick(TEXTS))],
        }
    )
    text = ["case_id", "outcome", "region", "product", "emotion", "channel", "issue_type", "cluster_text"]
    return frame.astype({c: "str" if arrow else object for c in text})


OPTIONAL = ("outcome", "region", "product", "emotion", "emotion_score", "channel", "case_id")


@pytest.mark.parametrize("arrow", [True, False])
@pytest.mark.parametrize("drop", [(), OPTIONAL])
@pytest.mark.parametrize("at_rows", [False, True])
def test_describe_scope_matches_the_copying_form(cfg, monkeypatch, arrow, drop, at_rows):
    monkeypatch.setattr(cl, "_SUM_ROWS", 16)  # a cluster's centroid summed over several blocks
    monkeypatch.setattr(cl, "_TEXT_BLOCK", 7)  # and its causes counted over several
    rng = np.random.default_rng(3)
    n = 400
    frame = _frame(n, rng, arrow).drop(columns=list(drop))
    # Few distinct vectors: many exact ties in the representatives' similarities.
    X = rng.standard_normal((40, 24)).astype(np.float32)[rng.integers(40, size=n)]
    lexicon = CauseLexicon.load(cfg)
    rows = None
    size = n
    if at_rows:
        rows = rng.permutation(n)[:300]  # a scope's rows, in any order
        size = len(rows)
    # Labels not numbered 0..k-1, noise among them, a cluster of one case.
    labels = rng.choice(np.array([5, 0, 9, 2, NOISE]), size=size)
    labels[rng.integers(size)] = 7
    tokens = [list(t) for t in (frame["cluster_text"].iloc[rows] if at_rows else frame["cluster_text"]).tolist()]
    for vectors in (X, X.astype(np.float64)):
        got = describe_scope("s", frame, vectors, labels, tokens, lexicon, cfg, rows=rows)
        want = _old_describe_scope("s", frame, vectors, labels, tokens, lexicon, cfg, rows=rows)
        assert len(got.clusters) == 5
        assert any(got.clusters["cause_phrases"].map(len))  # causes found, so they are compared
        pd.testing.assert_frame_equal(got.clusters, want.clusters)
        assert np.array_equal(got.labels, want.labels) and got.labels.dtype == want.labels.dtype
        assert got.centroids.keys() == want.centroids.keys()
        assert all(got.centroids[k].tobytes() == want.centroids[k].tobytes() for k in want.centroids)


def test_describe_scope_without_issue_types_fails_as_before(cfg):
    frame = _frame(20, np.random.default_rng(1), True).drop(columns="issue_type")
    X = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
    lexicon = CauseLexicon.load(cfg)
    with pytest.raises(KeyError):
        describe_scope("s", frame, X, np.zeros(20, dtype=int), [[]] * 20, lexicon, cfg)
    # A scope of noise alone reads no cluster's issue types: no error, no clusters.
    noise = np.full(20, NOISE)
    assert describe_scope("s", frame, X, noise, [[]] * 20, lexicon, cfg).clusters.empty
    assert _old_describe_scope("s", frame, X, noise, [[]] * 20, lexicon, cfg).clusters.empty


def test_fit_models_radii_from_the_descriptions_products(cfg):
    """The radii `fit_models` cuts from the similarities `describe_scope` kept are those of its
    own product of each cluster's rows (float32 vectors; float64 ones are not kept)."""
    from pipeline.insights.cluster import ClusterParams, ClusterState, assign_stable_ids, cluster_cases
    from pipeline.insights.incremental import fit_models

    rng = np.random.default_rng(8)
    frame = _frame(360, rng, True)
    centers = rng.standard_normal((5, 32))
    X = (centers[rng.integers(5, size=len(frame))] + rng.normal(0, 0.3, (len(frame), 32))).astype(np.float32)
    params = ClusterParams(pca_components=4, max_clusters=6, min_cluster_size=3, min_scope_cases=10)
    lexicon = CauseLexicon.load(cfg)
    results = cluster_cases(frame, X, cfg, lexicon, params=params, tokens=cl.TokenCodes.from_lists([[]] * len(frame)))
    assert sum(len(r.sims) for r in results) > 5
    for res in results:
        assert res.sims.keys() == res.centroids.keys()
        for lab, sims in res.sims.items():
            own = X[res.row_index[res.labels == lab]] @ res.centroids[lab]
            assert sims.dtype == own.dtype and sims.tobytes() == own.tobytes()
    clusters, _ = assign_stable_ids(results, ClusterState.empty(), "2025-11-02", 0.8)
    q = cfg.cluster.noise_quantile
    _, kept = fit_models(results, clusters, X, q)
    for res in results:
        res.sims = {}
    _, again = fit_models(results, clusters, X, q)
    assert len(kept) > 5
    pd.testing.assert_frame_equal(kept, again)
    wide = cluster_cases(
        frame, X.astype(np.float64), cfg, lexicon, params=params, tokens=cl.TokenCodes.from_lists([[]] * len(frame))
    )
    assert all(not r.sims for r in wide)
