"""A full re-cluster's memory savings change nothing it computes.

The full re-cluster (a back-fill's export) labels clusters from every selected case's jieba
tokens. They are kept as codes into one vocabulary (`TokenCodes`), read from the store and
encoded a block of parts at a time (`stored_token_codes`; before, as Arrow all at once,
`_with_tokens`) and counted on the codes (`class_tfidf`), where they were Python lists per case,
a merge of `read_cases` and a Counter per class; the cross-type scope uses the whole frame and
vectors, not copies; the members' run ids come from an Arrow look-up; the map's centring may
overwrite the vectors. Each test compares with the replaced form, kept here verbatim, on awkward
values: empty and missing token lists, placeholders, stop words, ties, noise, labels in any
order, re-processed cases."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.insights.cluster import NOISE, TokenCodes, _as_list, class_tfidf, is_term, token_codes
from pipeline.insights.export import _key
from pipeline.insights.member_rows import index_in
from pipeline.insights.stored_tokens import stored_token_codes
from pipeline.storage.store import newest_row_mask, read_cases, read_parts, stored_parts, write_cases

WORDS = ["快递", "没收到", "发票", "抬头", "京东", "问题", "<PHONE>", "订单", "x", "好", "a1", "退款", "客服", "签收"]


# -- the replaced forms ---------------------------------------------------------------------------


def _case_tokens(frame: pd.DataFrame, cut) -> list[list[str]]:
    stored = frame["tokens"].map(_as_list).tolist() if "tokens" in frame else [[] for _ in range(len(frame))]
    texts = frame["cluster_text"].tolist()
    return [toks if toks or cut is None else cut(t) for toks, t in zip(stored, texts)]


def _class_tfidf_lists(
    token_lists: Sequence[Sequence[str]],
    labels,
    top_k: int,
    stopwords: frozenset[str] = frozenset(),
    min_lift: float = 1.5,
    min_docs: int = 2,
) -> dict[int, list[tuple[str, float]]]:
    per_class: dict[int, Counter] = {}
    docs_in: dict[int, Counter] = {}
    n_docs: Counter[int] = Counter()
    docs_all: Counter[str] = Counter()
    for toks, lab in zip(token_lists, labels):
        key = int(lab)
        kept = [t for t in toks if is_term(t, stopwords)]
        per_class.setdefault(key, Counter()).update(kept)
        docs_in.setdefault(key, Counter()).update(set(kept))
        docs_all.update(set(kept))
        n_docs[key] += 1
    if not per_class:
        return {}
    total: Counter[str] = Counter()
    for c in per_class.values():
        total.update(c)
    avg = sum(total.values()) / max(len(per_class), 1)
    n_all = sum(n_docs.values())
    out: dict[int, list[tuple[str, float]]] = {}
    for lab, cnt in per_class.items():
        if lab == NOISE:
            continue
        n_in, n_out, din = n_docs[lab], n_all - n_docs[lab], docs_in[lab]
        size = sum(cnt.values()) or 1
        scored = [
            (t, (f / size) * math.log(1 + avg / total[t]))
            for t, f in cnt.items()
            if din[t] >= min(min_docs, n_in)
            and (n_out == 0 or din[t] / n_in >= min_lift * (docs_all[t] - din[t]) / n_out)
        ]
        scored.sort(key=lambda kv: (-kv[1], kv[0]))
        out[lab] = [(t, round(s, 5)) for t, s in scored[:top_k]]
    return out


# -- helpers --------------------------------------------------------------------------------------


def _random_docs(rng: np.random.Generator, n: int, words: list[str]) -> list[list[str]]:
    # Skewed word choice: frequent words in many cases, rare ones in few (ties of counts too).
    p = 1 / np.arange(1, len(words) + 1)
    p /= p.sum()
    return [[words[int(i)] for i in rng.choice(len(words), int(rng.integers(0, 9)), p=p)] for _ in range(n)]


def _cut(text: str) -> list[str]:
    return text.split()


# -- class_tfidf ----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [65_536, 7, 1])
@pytest.mark.parametrize("seed", range(40))
def test_class_tfidf_on_codes_matches_the_counter_form(monkeypatch, seed, block):
    # block: cases counted at a time (several blocks, the last one short; one case a block).
    import pipeline.insights.cluster as cl

    monkeypatch.setattr(cl, "_TFIDF_CASES", block)
    rng = np.random.default_rng(seed)
    words = WORDS + [f"词{i}" for i in range(int(rng.integers(0, 40)))]
    n = int(rng.integers(0, 120))
    docs = _random_docs(rng, n, words)
    labels = [int(v) for v in rng.integers(-1, int(rng.integers(1, 7)), n)]
    stop = frozenset(rng.choice(words, 3, replace=False).tolist())
    for top_k, min_lift, min_docs in ((3, 1.5, 2), (10, 0.0, 1), (5, 3.0, 3), (1, 1.0, 2)):
        want = _class_tfidf_lists(docs, labels, top_k, stop, min_lift, min_docs)
        for form in (docs, TokenCodes.from_lists(docs)):
            got = class_tfidf(form, labels, top_k, stop, min_lift, min_docs)
            assert list(got.items()) == list(want.items())  # same classes in the same order, same terms


def test_class_tfidf_pairs_tokens_and_labels_as_zip_does():
    docs = [["快递", "没收到"]] * 4 + [["发票", "抬头"]] * 4
    assert class_tfidf(docs, [0] * 4 + [1] * 2, 3) == _class_tfidf_lists(docs, [0] * 4 + [1] * 2, 3)
    assert class_tfidf(docs[:5], [0] * 4 + [1] * 4, 3) == _class_tfidf_lists(docs[:5], [0] * 4 + [1] * 4, 3)
    assert class_tfidf([], [], 3) == {} == class_tfidf(docs, np.zeros(0, dtype=int), 3)
    assert class_tfidf([["x", "<PHONE>"]] * 3, [NOISE, 0, 0], 3) == {0: []}


# -- token_codes and TokenCodes -------------------------------------------------------------------


def _token_frame(seed: int, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    docs = _random_docs(rng, n, WORDS)
    stored: list = []
    for i, d in enumerate(docs):
        kind = i % 5
        stored.append(None if kind == 0 else [] if kind == 1 else np.array(d, dtype=object) if kind == 2 else d)
    texts = [" ".join(reversed(d)) + (" 切出来" if i % 3 else "") for i, d in enumerate(docs)]
    return pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "cluster_text": texts, "tokens": stored})


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cut", [_cut, None])
def test_token_codes_match_the_lists_they_replaced(seed, cut):
    frame = _token_frame(seed)
    want = _case_tokens(frame, cut)
    assert token_codes(frame, cut).lists() == want
    # The Arrow-backed column `_with_tokens` makes: encoded in Arrow, the same tokens.
    lists = pa.array([None if v is None else list(v) for v in frame["tokens"]], type=pa.list_(pa.string()))
    arrow = frame.assign(tokens=pd.Series(pd.arrays.ArrowExtensionArray(lists)))
    assert token_codes(arrow, cut).lists() == want
    assert token_codes(frame.drop(columns="tokens"), cut).lists() == _case_tokens(frame.drop(columns="tokens"), cut)


def test_token_codes_vocabulary_names_each_word_once():
    frame = _token_frame(1)
    for form in (frame, frame.assign(tokens=None)):
        tc = token_codes(form, _cut)
        assert len(set(tc.vocab)) == len(tc.vocab)
        assert tc.codes.dtype == np.int32 and len(tc) == len(frame)


def test_token_codes_take_picks_cases_in_order():
    docs = _random_docs(np.random.default_rng(5), 50, WORDS)
    tc = TokenCodes.from_lists(docs)
    for idx in (np.arange(50), np.array([49, 0, 7, 7, 3]), np.array([], dtype=int), np.flatnonzero(np.arange(50) % 3)):
        assert tc.take(idx).lists() == [docs[i] for i in idx]
    stop = frozenset({"快递"})
    assert (tc.take(np.array([1, 2])).term_mask(stop) == [is_term(w, stop) for w in tc.vocab]).all()


# -- _with_tokens ---------------------------------------------------------------------------------


def _old_with_tokens(out, frame: pd.DataFrame) -> pd.DataFrame:
    toks = read_cases(out, columns=["case_id", "tokens"])
    return frame.merge(toks, on="case_id", how="left", sort=False)


def _with_tokens(out, frame: pd.DataFrame) -> pd.DataFrame:
    """Every stored case's tokens read at once, as Arrow (replaced by `stored_token_codes`)."""
    if frame.empty:
        return frame.assign(tokens=pd.Series(dtype=object))
    t = read_parts(stored_parts(out), ["case_id", "run_id", "tokens"])
    t = t.filter(pa.array(newest_row_mask(t.select(["case_id", "run_id"]))))
    ids = t["case_id"].combine_chunks().cast(pa.large_string())
    pos = index_in(_key(frame["case_id"]), ids)
    tokens = t["tokens"].combine_chunks().take(pa.array(pos, mask=pos < 0))
    return frame.assign(tokens=pd.Series(pd.arrays.ArrowExtensionArray(tokens), index=frame.index))


def _stored(out, frame: pd.DataFrame) -> pd.DataFrame:
    """The tokens `stored_token_codes` reads, as the column the replaced form gave."""
    lists = stored_token_codes(out, _key(frame["case_id"])).lists()
    return frame.assign(tokens=lists)


def test_with_tokens_reads_the_newest_row_of_each_case(tmp_path):
    base = pd.DataFrame(
        {
            "case_id": ["a", "b", "c", "d"],
            "conversation_id": ["ca", "cb", "cc", "cd"],
            "date": ["2025-11-01", "2025-11-02", "2025-11-01", "2025-11-03"],
            "problem": ["一", "二", "三", "四"],
            "tokens": [["快递", "没收到"], ["发票"], None, []],
        }
    )
    write_cases(tmp_path, base, "20251101T000000-r1", 0)
    # b and c re-processed (newer tokens win), d re-delivered without tokens.
    again = base.iloc[[1, 2, 3]].assign(tokens=[["发票", "抬头"], ["退款"], None])
    write_cases(tmp_path, again, "20251102T000000-r2", 0)
    frame = pd.DataFrame({"case_id": ["d", "b", "zz", "a", "c"], "cluster_text": ["四", "二", "无", "一", "三"]})
    got, old = _with_tokens(tmp_path, frame), _old_with_tokens(tmp_path, frame)
    assert got.drop(columns="tokens").equals(frame)
    assert _stored(tmp_path, frame)["tokens"].tolist() == [_as_list(v) for v in got["tokens"].tolist()]
    assert [_as_list(v) for v in got["tokens"].tolist()] == [_as_list(v) for v in old["tokens"]]
    assert [_as_list(v) for v in got["tokens"].tolist()] == [[], ["发票", "抬头"], [], ["快递", "没收到"], ["退款"]]
    assert token_codes(got, _cut).lists() == _case_tokens(old, _cut)


def _backfill_store(out, rng: np.random.Generator) -> list[str]:
    """Parts of 1 to 9 cases over several days and runs; some cases re-processed (several runs of
    one id, a later run without tokens, two rows of one id in one run), tokens null, empty, with
    a null token or repeated words. Returns the stored ids."""
    ids = [f"k{i:03d}" for i in range(90)]
    words = WORDS + [f"词{i}" for i in range(30)]
    runs = [f"2025110{r}T000000-r{r}" for r in range(1, 5)]
    for r, run in enumerate(runs):
        chosen = ids if r == 0 else sorted(rng.choice(ids, 25, replace=False).tolist())
        if r == 2:
            chosen = chosen + chosen[:3]  # two rows of an id in one run: the last one counts
        tokens: list = []
        for _ in chosen:
            kind = int(rng.integers(6))
            toks = [str(w) for w in rng.choice(words, int(rng.integers(1, 8)))]
            tokens.append(None if kind == 0 else [] if kind == 1 else [*toks, None] if kind == 2 else toks)
        cases = pd.DataFrame(
            {
                "case_id": chosen,
                "conversation_id": [f"conv-{i}" for i in chosen],
                "date": [f"2025-11-0{1 + int(d)}" for d in rng.integers(0, 4, len(chosen))],
                "problem": ["问题"] * len(chosen),
                "tokens": tokens,
            }
        )
        for part, a in enumerate(range(0, len(cases), 9)):
            write_cases(out, cases.iloc[a : a + int(rng.integers(1, 10))], run, part)
    return ids


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("parts, rows, renumber", [(32, 8_192, 1 << 20), (1, 4, 3), (3, 1, 1)])
def test_stored_token_codes_match_the_all_at_once_read(tmp_path, monkeypatch, seed, parts, rows, renumber):
    """Read a block of parts at a time (one part a block; one larger part past the rows limit;
    the codes renumbered a few at a time): the codes and vocabulary of the Arrow column read at
    once, for cases in any order, repeated, unknown, with a null id; and the cut fills the same."""
    import pipeline.insights.stored_tokens as st

    monkeypatch.setattr(st, "_BLOCK_PARTS", parts)
    monkeypatch.setattr(st, "_BLOCK_ROWS", rows)
    monkeypatch.setattr(st, "_RENUMBER_TOKENS", renumber)
    rng = np.random.default_rng(seed)
    ids = _backfill_store(tmp_path, rng)
    picked = [str(i) for i in rng.choice(ids + ["nope"], 120)] + [ids[0], ids[0]]
    frame = pd.DataFrame({"case_id": picked + [None], "cluster_text": [f"{i} 切出来" for i in range(len(picked) + 1)]})
    frame["case_id"] = frame["case_id"].astype("str")
    want = token_codes(_with_tokens(tmp_path, frame), None)
    got = stored_token_codes(tmp_path, _key(frame["case_id"]))
    assert got.vocab == want.vocab
    assert np.array_equal(got.codes, want.codes) and got.codes.dtype == want.codes.dtype
    assert np.array_equal(got.offsets, want.offsets)
    assert any(len(t) == 0 for t in got.lists()) and any("" in t for t in got.lists())
    cut_want = token_codes(_with_tokens(tmp_path, frame), _cut)
    cut_got = token_codes(frame, _cut, got)
    assert cut_got.vocab == cut_want.vocab
    assert np.array_equal(cut_got.codes, cut_want.codes) and np.array_equal(cut_got.offsets, cut_want.offsets)


def test_stored_token_codes_of_no_parts_or_no_cases(tmp_path):
    frame = pd.DataFrame({"case_id": ["a", "b"], "cluster_text": ["一", "二"]})
    none = stored_token_codes(tmp_path, _key(frame["case_id"]))
    assert none.lists() == [[], []] and none.vocab == []
    _backfill_store(tmp_path, np.random.default_rng(0))
    assert len(stored_token_codes(tmp_path, _key(frame["case_id"].iloc[:0]))) == 0
    with pytest.raises(ValueError):
        token_codes(frame.iloc[:1], None, none)


# -- cluster_cases and members_table --------------------------------------------------------------


def _old_cluster_cases(frame, X, cfg, lexicon, cut, stopwords, params):
    """cluster_cases as it was: token lists, and copies of the frame and X for every scope."""
    from pipeline.insights.cluster import ALL_SCOPE, describe_scope, fit_clusters, label_stopwords

    stopwords = stopwords | lexicon.label_stopwords | label_stopwords(cfg)
    tokens = _case_tokens(frame, cut)
    scopes = [(ALL_SCOPE, np.arange(len(frame)))]
    scopes += [(str(it), np.asarray(idx)) for it, idx in frame.groupby("issue_type", sort=True).indices.items()]
    results = []
    for scope, idx in scopes:
        sub = frame.iloc[idx].reset_index(drop=True)
        fit = fit_clusters(X[idx], params)
        res = describe_scope(scope, sub, X[idx], fit.labels, [tokens[i] for i in idx], lexicon, cfg, stopwords)
        res.row_index, res.fit = idx, fit
        results.append(res)
    return results


def _old_members_table(frame, results, clusters, X):
    from pipeline.insights.cluster import MEMBER_FIELDS

    ids = {(r["scope"], int(r["local_label"])): r["cluster_id"] for r in clusters.to_dict("records")}
    keep = [c for c in MEMBER_FIELDS if c in frame]
    parts = []
    for res in results:
        idx = res.row_index
        sub = frame.iloc[idx][keep].reset_index(drop=True).rename(columns={"cluster_text": "problem"})
        sub.insert(0, "scope", res.scope)
        cid = [ids.get((res.scope, int(lab))) if lab != NOISE else None for lab in res.labels]
        sims = [float(X[i] @ res.centroids[int(lab)]) if lab != NOISE else None for i, lab in zip(idx, res.labels)]
        sub.insert(1, "cluster_id", cid)
        sub.insert(2, "is_noise", [lab == NOISE for lab in res.labels])
        sub.insert(3, "similarity", [round(s, 4) if s is not None else None for s in sims])
        parts.append(sub)
    return pd.concat(parts, ignore_index=True)


@pytest.mark.parametrize("fit_max_cases, block", [(50_000, 65_536), (30, 16)])
def test_cluster_cases_and_members_match_the_copying_form(cfg, monkeypatch, fit_max_cases, block):
    # (30, 16): every scope past the fit cap, projected in blocks of 16 rows gathered at its rows.
    import pipeline.insights.cluster as cl
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.insights.cluster import (
        CauseLexicon,
        ClusterParams,
        ClusterState,
        assign_stable_ids,
        cluster_cases,
        members_table,
        select_cases,
    )
    from pipeline.text.segment import Segmenter

    rng = np.random.default_rng(7)
    topics = {
        "物流": ["快递三天没到", "物流不更新", "快递员不送货上门"],
        "票据": ["发票抬头开错", "电子发票下载不了"],
        "售后": ["退款一直没到账", "蓝牙耳机连不上", "耳机左边没声音"],
    }
    rows = []
    for i in range(150):
        it = list(topics)[i % 3]
        rows.append(
            {
                "case_id": f"c{i:03d}",
                "run_id": "r1",
                "issue_type": it,
                "region": ["华东", "华北"][i % 2],
                "problem": f"{topics[it][int(rng.integers(len(topics[it])))]}，第{i}次，{'很急' if i % 4 else '谢谢'}",
                "outcome": "resolved",
                "date": "2025-11-01",
                "emotion_score": float(i % 5) / 5,
            }
        )
    frame = select_cases(pd.DataFrame(rows))
    # Some cases with stored tokens (Arrow, as `_with_tokens` gives them), the rest cut.
    stored = [["快递", "没到"] if i % 3 == 0 else None for i in range(len(frame))]
    frame = frame.assign(tokens=pd.Series(pd.arrays.ArrowExtensionArray(pa.array(stored, pa.list_(pa.string())))))
    X = HashingEmbedder().encode_passages(frame["cluster_text"].tolist()).astype(np.float32)
    lexicon, cut = CauseLexicon.load(cfg), Segmenter(cfg).cut
    params = ClusterParams(
        pca_components=5, max_clusters=6, min_cluster_size=3, min_scope_cases=10, fit_max_cases=fit_max_cases
    )
    monkeypatch.setattr(cl, "_BLOCK", block)
    old_frame = frame.assign(tokens=pd.Series([s for s in stored], dtype=object))
    want = _old_cluster_cases(old_frame, X, cfg, lexicon, cut, frozenset(), params)
    got = cluster_cases(frame, X, cfg, lexicon, cut=cut, params=params)
    assert [r.scope for r in got] == [r.scope for r in want] and len(got) == 4
    assert any(len(r.clusters) > 1 for r in got)
    for g, w in zip(got, want):
        pd.testing.assert_frame_equal(g.clusters, w.clusters)
        assert np.array_equal(g.labels, w.labels) and np.array_equal(g.row_index, w.row_index)
        assert g.centroids.keys() == w.centroids.keys()
        assert all(np.array_equal(g.centroids[k], w.centroids[k]) for k in w.centroids)
        assert all(np.array_equal(g.fit.centers[k], w.fit.centers[k]) for k in w.fit.centers)
    # The codes made by the caller (`full_clustering`), the frame's token lists let go: the same.
    given = cluster_cases(frame.drop(columns="tokens"), X, cfg, lexicon, params=params, tokens=token_codes(frame, cut))
    for g, w in zip(given, want):
        pd.testing.assert_frame_equal(g.clusters, w.clusters)
        assert np.array_equal(g.labels, w.labels)
    # ... or made when first needed (a re-cluster's stored tokens): after the cross-type fit,
    # read once, the same clusters.
    calls: list[str] = []
    real_fit = cl.fit_clusters

    def fit(*a, **k):
        calls.append("fit")
        return real_fit(*a, **k)

    def make():
        calls.append("tokens")
        return token_codes(frame, cut)

    monkeypatch.setattr(cl, "fit_clusters", fit)
    late = cluster_cases(frame.drop(columns="tokens"), X, cfg, lexicon, params=params, tokens=make)
    assert calls == ["fit", "tokens", "fit", "fit", "fit"]
    for g, w in zip(late, want):
        pd.testing.assert_frame_equal(g.clusters, w.clusters)
        assert np.array_equal(g.labels, w.labels)
    monkeypatch.setattr(cl, "fit_clusters", real_fit)
    clusters, _ = assign_stable_ids(got, ClusterState.empty(), "2025-11-02", 0.8)
    pd.testing.assert_frame_equal(
        members_table(frame, got, clusters, X), _old_members_table(old_frame, want, clusters, X)
    )


@pytest.mark.parametrize("fit_max_cases", [10_000, 150])
@pytest.mark.parametrize("order", ["sorted", "any"])
def test_fit_clusters_at_rows_matches_the_copy_of_the_rows(monkeypatch, fit_max_cases, order):
    """A scope's rows read where they are give the partition, space and centres of a copy of them
    (the same PCA input, the same blocks projected), seeded or not, capped or not."""
    import pipeline.insights.cluster as cl
    from pipeline.insights.cluster import ClusterParams, fit_clusters

    monkeypatch.setattr(cl, "_BLOCK", 64)  # several blocks, the last one short
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(4, 24))
    X = np.concatenate([c + rng.normal(0, 0.4, (150, 24)) for c in centers]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rows = np.flatnonzero(rng.random(len(X)) < 0.6)
    if order == "any":
        rows = rng.permutation(rows)
    params = ClusterParams(pca_components=5, max_clusters=6, min_cluster_size=5, fit_max_cases=fit_max_cases)
    for seeds in (None, centers[:3].astype(np.float32)):
        want = fit_clusters(X[rows], params, seeds)
        got = fit_clusters(X, params, seeds, rows=rows)
        assert len(set(want.labels.tolist())) > 2
        assert np.array_equal(got.labels, want.labels)
        assert np.array_equal(got.projection.mean, want.projection.mean)
        assert np.array_equal(got.projection.components, want.projection.components)
        assert got.centers.keys() == want.centers.keys()
        assert all(np.array_equal(got.centers[k], want.centers[k]) for k in want.centers)
    small = fit_clusters(X, ClusterParams(min_scope_cases=50), rows=rows[:20]).labels
    assert len(small) == 20 and (small == NOISE).all()


def test_project_blocks_at_rows_matches_the_copy(monkeypatch):
    import pipeline.insights.cluster as cl
    from pipeline.insights.cluster import fit_projection, project_blocks

    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    proj = fit_projection(X, 4)
    for block in (7, 64, 1000):
        monkeypatch.setattr(cl, "_BLOCK", block)
        for rows in (np.arange(300), rng.permutation(300)[:130], np.array([5, 5, 0]), np.zeros(0, dtype=int)):
            assert np.array_equal(project_blocks(proj, X, rows), project_blocks(proj, X[rows]))


def _block_apply(proj, X, rows, block):
    """project_blocks as it was: one `apply` per block of rows, gathered whole."""
    n = len(X) if rows is None else len(rows)
    parts = [proj.apply(X[i : i + block] if rows is None else X[rows[i : i + block]]) for i in range(0, n, block)]
    return proj.apply(X[:0]) if not parts else parts[0] if len(parts) == 1 else np.concatenate(parts)


@pytest.mark.parametrize("block", [65_536, 64, 7, 1])
def test_project_blocks_centre_gathered_rows_in_place_alike(monkeypatch, block):
    """Gathered rows centred in place give the bytes of the centred copy, for sizes around the
    block; the vectors read in place (no rows) are never changed."""
    import pipeline.insights.cluster as cl
    from pipeline.insights.cluster import fit_projection, project_blocks

    monkeypatch.setattr(cl, "_BLOCK", block)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 48)).astype(np.float32)
    before = X.copy()
    proj = fit_projection(X, 6)
    for n in sorted({0, 1, 2, block - 1, block, block + 1, 3 * block + 2, 300} & set(range(301))):
        for rows in (None, rng.permutation(len(X))[:n], np.repeat(np.arange(3), n)[:n]):
            data = X[:n] if rows is None else X
            want = _block_apply(proj, data, rows, block)
            got = project_blocks(proj, data, rows)
            assert got.shape == want.shape and got.dtype == want.dtype and got.tobytes() == want.tobytes(), n
            assert np.array_equal(X, before)
    gathered = X[[3, 1, 2]]
    assert proj.apply(gathered.copy(), overwrite=True).tobytes() == proj.apply(gathered).tobytes()
    assert proj.apply(X[::2], overwrite=True).tobytes() == proj.apply(X[::2].copy()).tobytes()
    assert np.array_equal(X, before)  # a strided view is not centred in place


def test_run_ids_of_members_match_the_dict_form():
    from pipeline.insights.export import _run_ids

    frame = pd.DataFrame({"case_id": ["a", "b", "a", "c", "d"], "run_id": ["r1", "r1", "r2", None, "r3"]}).astype(
        {"case_id": "str"}
    )
    members = pd.DataFrame({"case_id": ["b", "a", "zz", "c", "a", "d"]}, index=[5, 4, 3, 2, 1, 0])

    def old(members, frame):
        run_ids = dict(zip(frame["case_id"].astype(str), frame["run_id"].astype(str))) if "run_id" in frame else {}
        return members["case_id"].astype(str).map(run_ids).fillna("")

    for f in (frame, frame.drop(columns="run_id"), frame.iloc[:0], frame.assign(run_id=["r1", "r1", "r2", "r0", "r3"])):
        got, want = _run_ids(members, f), old(members, f)
        assert got.tolist() == want.tolist() and got.index.equals(want.index)
    assert _run_ids(members, frame).tolist() == ["r1", "r2", "", "", "r2", "r3"]


def test_full_clustering_consuming_the_vectors_gives_the_same_export(cfg):
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.insights.cluster import CauseLexicon, ClusterState, select_cases
    from pipeline.insights.export import full_clustering

    texts = ["快递三天没到", "物流不更新", "发票抬头开错", "退款一直没到账", "耳机左边没声音", "快递员不送货上门"]
    rows = [
        {"case_id": f"c{i:03d}", "run_id": f"r{i % 2}", "issue_type": ["物流", "售后"][i % 2], "region": "华东",
         "problem": f"{texts[i % len(texts)]}，第{i}次", "outcome": "resolved", "date": "2025-11-01"}
        for i in range(90)
    ]  # fmt: skip
    frame = select_cases(pd.DataFrame(rows))
    X = HashingEmbedder().encode_passages(frame["cluster_text"].tolist()).astype(np.float32)
    args = (cfg, ClusterState.empty(), "2025-11-02", CauseLexicon.load(cfg))
    kept = X.copy()
    a, proj_a, stored_a = full_clustering(frame, X, *args, cut=_cut)
    assert np.array_equal(X, kept)  # not consumed: untouched
    b, proj_b, stored_b = full_clustering(frame, X, *args, cut=_cut, consume_vectors=True)
    assert not np.array_equal(X, kept)  # consumed: centred in place
    assert a.members["x"].notna().sum() == len(frame)
    pd.testing.assert_frame_equal(a.members, b.members)
    pd.testing.assert_frame_equal(a.clusters, b.clusters)
    pd.testing.assert_frame_equal(stored_a, stored_b)
    assert proj_a.keys() == proj_b.keys()
    assert all(np.array_equal(proj_a[k].components, proj_b[k].components) for k in proj_a)


def test_members_table_in_one_take_matches_the_concatenated_copies():
    from pipeline.insights.cluster import ScopeResult, members_table

    rng = np.random.default_rng(3)
    n = 40
    frame = pd.DataFrame(
        {
            "case_id": pd.array([f"c{i}" for i in range(n)], dtype="str"),
            "date": [f"2025-11-{1 + i % 9:02d}" for i in range(n)],
            "region": [None if i % 4 == 0 else "华东" for i in range(n)],  # object with None
            "emotion_score": [float(i) / n for i in range(n)],
            "cluster_text": pd.array([f"问题{i}" for i in range(n)], dtype="str"),
            "issue_type": ["物流" if i % 3 else "售后" for i in range(n)],
        }
    )
    X = rng.normal(size=(n, 8)).astype(np.float32)
    idx_all, idx_a, idx_b = np.arange(n), np.flatnonzero(np.arange(n) % 3), np.flatnonzero(np.arange(n) % 3 == 0)
    lab_all = rng.integers(-1, 3, n)
    results = [
        ScopeResult(
            "全部", pd.DataFrame(), lab_all, {k: rng.normal(size=8).astype(np.float32) for k in range(3)}, idx_all
        ),
        ScopeResult("物流", pd.DataFrame(), np.zeros(len(idx_a), int), {0: np.ones(8, np.float32)}, idx_a),
        ScopeResult("售后", pd.DataFrame(), np.full(len(idx_b), NOISE), {}, idx_b),  # all noise
    ]
    clusters = pd.DataFrame(
        {"scope": ["全部", "全部", "全部", "物流"], "local_label": [0, 1, 2, 0], "cluster_id": ["C1", "C2", "C3", "C4"]}
    )
    got = members_table(frame, results, clusters, X)
    pd.testing.assert_frame_equal(got, _old_members_table(frame, results, clusters, X))
    assert len(got) == n + len(idx_a) + len(idx_b) and got["cluster_id"].iloc[-1] is None
    assert members_table(frame, [], clusters, X).columns.tolist() == ["scope", "cluster_id", "is_noise"]


@pytest.mark.parametrize("scopes", ["all+types", "all", "types", "all-shuffled"])
def test_members_fields_share_the_frame_where_they_are_its_rows(scopes):
    """The members' case fields equal the one take of every scope's rows (values, dtypes, order)
    whichever scopes there are; where the leading scope is every case in order, its Arrow
    columns are the frame's own buffers, not a copy."""
    from pipeline.insights.cluster import MEMBER_FIELDS, ScopeResult, members_with_fields

    n = 50
    frame = pd.DataFrame(
        {
            "case_id": pd.array([f"c{i}" for i in range(n)], dtype="str"),
            "date": [f"2025-11-{1 + i % 9:02d}" for i in range(n)],
            "region": [None if i % 4 == 0 else "华东" for i in range(n)],
            "emotion_score": [float(i) / n for i in range(n)],
            "cluster_text": pd.array([None if i == 7 else f"问题{i}" for i in range(n)], dtype="str"),
            "issue_type": pd.array(["物流" if i % 3 else "售后" for i in range(n)], dtype="str"),
        },
        index=pd.RangeIndex(100, 100 + n),  # a frame cut from a longer one
    )
    everyone = np.random.default_rng(1).permutation(n) if scopes == "all-shuffled" else np.arange(n)
    parts = {"all": [everyone], "types": [np.flatnonzero(np.arange(n) % 3), np.flatnonzero(np.arange(n) % 3 == 0)]}
    idx = parts["all"] + parts["types"] if scopes == "all+types" else parts[scopes.split("-")[0]]
    results = [ScopeResult(f"s{k}", pd.DataFrame(), np.zeros(len(i), int), {}, i) for k, i in enumerate(idx)]
    heads = pd.DataFrame({"scope": np.concatenate([[r.scope] * len(r.labels) for r in results])})
    got = members_with_fields(frame, results, heads)
    fields = frame[[c for c in MEMBER_FIELDS if c in frame]]
    body = fields.iloc[np.concatenate(idx)].reset_index(drop=True).rename(columns={"cluster_text": "problem"})
    pd.testing.assert_frame_equal(got, pd.concat([heads, body], axis=1))
    shared = got["problem"].array._pa_array.chunks[0].buffers()[2].address
    mine = frame["cluster_text"].array._pa_array.chunks[0].buffers()[2].address
    assert (shared == mine) == (scopes in ("all+types", "all"))


def _old_member_heads(results, clusters, X):
    """member_heads as it was: Python lists of every row's id, flag and similarity."""
    ids = {(r["scope"], int(r["local_label"])): r["cluster_id"] for r in clusters.to_dict("records")}
    heads = []
    for res in results:
        idx = res.row_index
        head = pd.DataFrame(index=pd.RangeIndex(len(idx)))
        head.insert(0, "scope", res.scope)
        cid = [ids.get((res.scope, int(lab))) if lab != NOISE else None for lab in res.labels]
        sims = [float(X[i] @ res.centroids[int(lab)]) if lab != NOISE else None for i, lab in zip(idx, res.labels)]
        head.insert(1, "cluster_id", cid)
        head.insert(2, "is_noise", [lab == NOISE for lab in res.labels])
        head.insert(3, "similarity", [round(s, 4) if s is not None else None for s in sims])
        heads.append(head)
    return pd.concat(heads, ignore_index=True)


@pytest.mark.parametrize("block", [4096, 7])
@pytest.mark.parametrize("all_noise", [False, True])
def test_member_heads_as_arrays_match_the_lists(monkeypatch, block, all_noise):
    """The heads built as arrays (vectors gathered a block at a time, short last block) are the
    lists' frame: values, NaN/None for noise, dtypes, and a label without an id (None)."""
    import pipeline.insights.cluster as cl
    from pipeline.insights.cluster import ScopeResult, member_heads

    monkeypatch.setattr(cl, "_HEAD_ROWS", block)
    rng = np.random.default_rng(5)
    n, d = 300, 384
    X = rng.normal(size=(n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    cents = {k: rng.normal(size=d).astype(np.float32) for k in range(4)}
    idx_b = np.flatnonzero(rng.random(n) < 0.4)
    lab_b = np.full(len(idx_b), NOISE) if all_noise else rng.integers(-1, 4, len(idx_b))
    results = [
        ScopeResult("全部", pd.DataFrame(), rng.integers(-1, 4, n), cents, np.arange(n)),
        ScopeResult("物流", pd.DataFrame(), lab_b, cents, idx_b),
        ScopeResult("售后", pd.DataFrame(), np.full(5, NOISE), {}, np.arange(5)),
    ]
    # Label 3 of the cross-type scope has no id (not in the table): None, as a noise row.
    clusters = pd.DataFrame(
        {"scope": ["全部"] * 3 + ["物流"] * 4, "local_label": [0, 1, 2, 0, 1, 2, 3], "cluster_id": list("ABCDEFG")}
    )
    got, want = member_heads(results, clusters, X), _old_member_heads(results, clusters, X)
    pd.testing.assert_frame_equal(got, want)
    assert got.dtypes.tolist() == want.dtypes.tolist()
    sim = got["similarity"].to_numpy(dtype=np.float64, na_value=np.nan)
    ref = want["similarity"].to_numpy(dtype=np.float64, na_value=np.nan)
    assert np.array_equal(sim, ref, equal_nan=True) and np.isfinite(sim).sum() > 200
    no_id = (results[0].labels >= 3) | (results[0].labels < 0)
    assert got["cluster_id"].iloc[:n].isna().sum() == int(no_id.sum()) > 0


def test_row_file_gathers_what_the_matrix_gives(tmp_path, monkeypatch):
    """Rows read back from the spilled file, a few per window (the last one short), equal the
    matrix's: one row, negative rows, slices with steps, any order, repeats, none; C-ordered."""
    import pipeline.insights.row_file as rf
    from pipeline.insights.row_file import RowFile

    monkeypatch.setattr(rf, "_WRITE_ROWS", 7)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(1000, 384)).astype(np.float32)
    monkeypatch.setattr(rf, "_WINDOW_BYTES", 5 * X.shape[1] * 4 + 3)  # 5 rows, not page-aligned
    with RowFile(X, tmp_path) as rows:
        assert len(rows) == 1000 and rows.shape == X.shape and rows.dtype == X.dtype
        picks = [rng.permutation(1000)[:300], np.sort(rng.choice(1000, 200)), np.array([5, 5, 999, 0, -1])]
        picks += [np.zeros(0, np.int64), np.arange(1000)]
        for p in picks:
            got = rows[p]
            assert got.flags.c_contiguous and np.array_equal(got, X[p])
        for key in (slice(None), slice(3, 70), slice(10, None, 3), slice(990, 2000)):
            assert np.array_equal(rows[key], X[key])
        assert np.array_equal(rows[17], X[17]) and np.array_equal(rows[-1], X[-1])
        with pytest.raises(IndexError):
            rows[np.array([1000])]
        with pytest.raises(TypeError):
            rows[np.ones(1000, bool)]
    with RowFile(np.zeros((0, 384), np.float32)) as empty:
        assert len(empty) == 0 and empty[np.zeros(0, np.int64)].shape == (0, 384)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_row_file_gathers_without_keeping_the_file_mapped(tmp_path):
    """A gather of rows spread over the whole file leaves this process about the rows it asked
    for, not the file: each window's mapped pages are dropped once its rows are copied (without
    that, the kernel's fault-around maps most of the file's 128 MiB)."""
    from pipeline.insights.row_file import RowFile

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    X = np.random.default_rng(0).random((65_536, 512), dtype=np.float32)  # 128 MiB
    rows = RowFile(X, tmp_path)
    want = X[::40].copy()  # 3.2 MiB
    del X
    before = rss_mib()
    got = rows[np.arange(0, 65_536, 40)]
    grown = rss_mib() - before
    rows.close()
    assert np.array_equal(got, want) and grown < 24


@pytest.mark.parametrize("fit_max_cases, block", [(50_000, 65_536), (30, 16)])
def test_cluster_cases_on_spilled_vectors_match_the_matrix(cfg, tmp_path, monkeypatch, fit_max_cases, block):
    """Every stage that reads vectors after the map (scopes' fits, capped and projected in blocks
    or not, descriptions, members' similarities, models) gives the same from the spilled file."""
    import pipeline.insights.cluster as cl
    import pipeline.insights.row_file as rf
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.insights.cluster import (
        CauseLexicon,
        ClusterParams,
        ClusterState,
        assign_stable_ids,
        cluster_cases,
        member_heads,
        select_cases,
    )
    from pipeline.insights.incremental import fit_models
    from pipeline.insights.row_file import RowFile

    monkeypatch.setattr(cl, "_BLOCK", block)
    monkeypatch.setattr(cl, "_HEAD_ROWS", 13)
    monkeypatch.setattr(rf, "_WINDOW_BYTES", 4096 * 3)  # 8 rows of 384 floats a window
    texts = ["快递三天没到", "物流不更新", "发票抬头开错", "退款一直没到账", "耳机左边没声音", "快递员不送货上门"]
    rows = [
        {"case_id": f"c{i:03d}", "issue_type": ["物流", "售后", "票据"][i % 3], "region": ["华北", "华东"][i % 2],
         "problem": f"{texts[i % len(texts)]}，第{i}次", "outcome": "resolved", "date": "2025-11-01",
         "emotion_score": float(i % 5) / 5}
        for i in range(150)
    ]  # fmt: skip
    frame = select_cases(pd.DataFrame(rows))
    X = HashingEmbedder().encode_passages(frame["cluster_text"].tolist()).astype(np.float32)
    params = ClusterParams(
        pca_components=5, max_clusters=6, min_cluster_size=3, min_scope_cases=10, fit_max_cases=fit_max_cases
    )
    lexicon = CauseLexicon.load(cfg)
    want = cluster_cases(frame, X, cfg, lexicon, cut=_cut, params=params)
    with RowFile(X, tmp_path) as spilled:
        got = cluster_cases(frame, spilled, cfg, lexicon, cut=_cut, params=params)
        assert any(len(r.clusters) > 1 for r in got) and len(got) == 4
        for g, w in zip(got, want):
            pd.testing.assert_frame_equal(g.clusters, w.clusters)
            assert np.array_equal(g.labels, w.labels)
            assert all(np.array_equal(g.centroids[k], w.centroids[k]) for k in w.centroids)
            assert all(np.array_equal(g.sims[k], w.sims[k]) for k in w.sims)
            assert np.array_equal(g.fit.projection.components, w.fit.projection.components)
            assert all(np.array_equal(g.fit.centers[k], w.fit.centers[k]) for k in w.fit.centers)
        clusters, _ = assign_stable_ids(want, ClusterState.empty(), "2025-11-02", 0.8)
        pd.testing.assert_frame_equal(member_heads(got, clusters, spilled), member_heads(want, clusters, X))
        for g in got:
            g.sims = {}  # the models' radii from the gathered rows, not the descriptions' products
        pg, mg = fit_models(got, clusters, spilled, 0.1)
        pw, mw = fit_models(want, clusters, X, 0.1)
        pd.testing.assert_frame_equal(mg, mw)


def test_silhouette_in_blocks_scores_and_clusters_as_the_whole_matrix(monkeypatch):
    """The k search's silhouette under a small working memory (distances a block of rows at a
    time) gives the scores, and so the clusters, of the whole distance matrix at once."""
    import sklearn
    from sklearn.metrics import silhouette_score

    import pipeline.insights.cluster as cl
    from pipeline.insights.cluster import ClusterParams, fit_clusters

    rng = np.random.default_rng(4)
    centers = rng.normal(size=(6, 20))
    X = np.concatenate([c + rng.normal(0, 0.8, (250, 20)) for c in centers]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Z = cl.fit_projection(X, 5).apply(X)
    for k in (2, 5, 7):
        lab = rng.integers(0, k, len(Z))
        whole = silhouette_score(Z, lab)
        with sklearn.config_context(working_memory=1):  # blocks of about 90 rows
            assert silhouette_score(Z, lab) == whole
    seen = []
    real = cl.kmeans_by_silhouette
    monkeypatch.setattr(
        cl, "kmeans_by_silhouette", lambda *a, **k: seen.append(sklearn.get_config()["working_memory"]) or real(*a, **k)
    )
    params = ClusterParams(pca_components=5, max_clusters=9, min_cluster_size=5)
    monkeypatch.setattr(cl, "_SILHOUETTE_MIB", 1024)
    want = fit_clusters(X, params)
    monkeypatch.setattr(cl, "_SILHOUETTE_MIB", 1)
    got = fit_clusters(X, params)
    assert seen == [1024, 1]
    assert len(set(want.labels.tolist())) > 2 and np.array_equal(got.labels, want.labels)
    assert all(np.array_equal(got.centers[k], want.centers[k]) for k in want.centers)


def _old_full_clustering(frame, X, cfg, state, day, lexicon, cut=None, consume_vectors=False):
    """full_clustering as it was: the members table built from the frame while `X` was held."""
    from pipeline.insights.cluster import ALL_SCOPE, assign_stable_ids, cluster_cases, members_table
    from pipeline.insights.export import _run_ids, fit_map
    from pipeline.insights.incremental import MAP_SCOPE, MEMBER_COLUMNS, MODEL_COLUMNS, fit_models

    c = cfg.cluster
    results = cluster_cases(frame, X, cfg, lexicon, cut=cut) if len(frame) else []
    frame = frame.drop(columns=["tokens"]) if "tokens" in frame else frame
    clusters, new_state = assign_stable_ids(results, state, day, c.match_threshold)
    members = members_table(frame, results, clusters, X)
    projections, model = fit_models(results, clusters, X, c.noise_quantile)
    projections[MAP_SCOPE] = fit_map(X)
    t = new_state.table.drop(columns=[m for m in MODEL_COLUMNS if m in new_state.table])
    t = t.merge(model.assign(model_day=day), on="cluster_id", how="left") if len(t) else t
    for m in MODEL_COLUMNS:
        if m not in t:
            t[m] = None
    members["x"], members["y"] = np.nan, np.nan
    all_rows = np.flatnonzero((members["scope"] == ALL_SCOPE).to_numpy()) if len(members) else np.zeros(0, int)
    mp = projections[MAP_SCOPE]
    if len(all_rows) == len(X) > 0 and mp.components is not None and mp.mean is not None:
        xy = (X - mp.mean) @ mp.components.T
        members.loc[all_rows, "x"] = np.round(xy[:, 0].astype(np.float64), 4)
        members.loc[all_rows, "y"] = np.round(xy[:, 1].astype(np.float64), 4)
    stored = members.assign(run_id=_run_ids(members, frame)) if len(members) else members
    return clusters, members, t, projections, stored.reindex(columns=MEMBER_COLUMNS)


@pytest.mark.parametrize("n", [90, 2, 0])
def test_members_built_after_the_vectors_are_gone_match_the_old_full_clustering(cfg, tmp_path, n):
    """`fit_vectors` then `recluster_members` (the vectors overwritten in between, as the export
    lets them go) give the clusters, members, state, projections and stored rows the re-cluster
    gave building its members table while it held the vectors; `full_clustering` too; and so do
    the vectors spilled to a file and the map fitted from it (`map_of_rows`, as the export does).
    n=2: too few cases for a cluster or a map (all noise, no x/y); n=0: nothing selected."""
    from pipeline.embed.fake import HashingEmbedder
    from pipeline.insights.cluster import CauseLexicon, ClusterState, select_cases
    from pipeline.insights.export import fit_vectors, full_clustering, map_of_rows, recluster_members
    from pipeline.insights.row_file import RowFile

    texts = ["快递三天没到", "物流不更新", "发票抬头开错", "退款一直没到账", "耳机左边没声音", "快递员不送货上门"]
    rows = [
        {"case_id": f"c{i % 80:03d}", "run_id": f"r{i // 80}", "issue_type": ["物流", "售后", "票据"][i % 3],
         "region": [None, "华东"][i % 2], "problem": f"{texts[i % len(texts)]}，第{i}次", "outcome": "resolved",
         "date": f"2025-11-{1 + i % 9:02d}", "emotion_score": float(i % 5) / 5}
        for i in range(n)
    ]  # fmt: skip
    frame = select_cases(pd.DataFrame(rows)) if rows else select_cases(pd.DataFrame(rows, columns=["case_id"]))

    def vectors() -> np.ndarray:
        texts = frame["cluster_text"].tolist()
        return HashingEmbedder().encode_passages(texts).astype(np.float32) if texts else np.zeros((0, 384), np.float32)

    X = vectors()
    args = (cfg, ClusterState.empty(), "2025-11-02", CauseLexicon.load(cfg))
    clusters, members, table, projections, stored = _old_full_clustering(frame, X.copy(), *args, cut=_cut)
    with_tokens = frame.assign(tokens=pd.Series([None] * len(frame), dtype=object))
    fitted = fit_vectors(with_tokens, X, *args, cut=_cut, consume_vectors=True)
    X[:] = np.nan  # read no more
    got = [recluster_members(frame, fitted)]
    got.append(full_clustering(frame, vectors(), *args, _cut))
    spilled = RowFile(vectors(), tmp_path / "cache")
    mapped = map_of_rows(spilled, cfg.cluster.fit_max_cases)
    with spilled:
        got.append(recluster_members(frame, fit_vectors(with_tokens, spilled, *args, cut=_cut, mapped=mapped)))
    assert list((tmp_path / "cache").iterdir()) == []  # the spilled file has no name
    # The export's form: the stored tokens read when first needed, their codes kept mapped.
    no_stored = lambda: TokenCodes.from_lists([[] for _ in range(len(frame))])  # noqa: E731
    tok = tmp_path / "tokens"
    fitted = fit_vectors(with_tokens, vectors(), *args, cut=_cut, stored_tokens=no_stored, token_folder=tok)
    got.append(recluster_members(frame, fitted))
    assert n == 0 or list(tok.iterdir()) == []
    for clustering, proj, st in got:
        pd.testing.assert_frame_equal(clustering.clusters, clusters)
        pd.testing.assert_frame_equal(clustering.members, members)
        pd.testing.assert_frame_equal(clustering.state.table, table)
        pd.testing.assert_frame_equal(st, stored)
        assert proj.keys() == projections.keys()
        for k in proj:
            for a, b in ((proj[k].mean, projections[k].mean), (proj[k].components, projections[k].components)):
                assert (a is None and b is None) or np.array_equal(a, b)
    if n == 90:
        assert members["x"].notna().sum() == len(frame) and members["cluster_id"].notna().any()
        assert stored["run_id"].eq("r1").sum() == 40  # 10 ids re-run: both their rows, both scopes
    # The tables' form (per-type texts left null), and the members file made from it.
    from pipeline.insights.cluster import scope_member_rows
    from pipeline.insights.export import _FILE_ONLY, with_file_texts

    fitted = fit_vectors(with_tokens, vectors(), *args, cut=_cut)
    bare, _, st = recluster_members(frame, fitted, texts=False)
    pd.testing.assert_frame_equal(st, stored)
    pd.testing.assert_frame_equal(with_file_texts(bare.members, frame, scope_member_rows(fitted.results)), members)
    per_type = (members["scope"] != "全部").to_numpy()
    blank = [c for c in _FILE_ONLY if c in members]
    assert (len(blank) > 0) == (n > 0) and bare.members.loc[per_type, blank].isna().all().all()
    rest = [c for c in members.columns if c not in blank]
    pd.testing.assert_frame_equal(bare.members[rest], members[rest])
    pd.testing.assert_frame_equal(bare.members.loc[~per_type], members.loc[~per_type])
    assert per_type.sum() == (len(frame) if n else 0)  # one issue-type scope: every case again


def _old_member_part_table(rows: pd.DataFrame) -> pa.Table:
    """append_members' table as it was: every text value a Python object, then Arrow."""
    from pipeline.insights.incremental import MEMBER_COLUMNS

    t = rows[MEMBER_COLUMNS].reset_index(drop=True).copy()
    for c in ("case_id", "run_id", "scope", "cluster_id"):
        t[c] = t[c].astype(object).where(t[c].notna(), None)
    for c in ("similarity", "x", "y"):
        t[c] = pd.to_numeric(t[c], errors="coerce").astype(np.float64)
    t["is_noise"] = t["is_noise"].astype(bool)
    return pa.Table.from_pandas(t, preserve_index=False)


def _member_rows(n: int, cluster_ids) -> pd.DataFrame:
    half = pd.DataFrame(
        {
            "scope": ["全部"] * n,
            "cluster_id": cluster_ids,
            "is_noise": [c is None for c in cluster_ids],
            "similarity": [None if c is None else 0.5 + i / 1000 for i, c in enumerate(cluster_ids)],
            "case_id": [f"c{i}" for i in range(n)],
        }
    )
    rows = pd.concat([half, half.assign(scope="物流")], ignore_index=True)  # Arrow chunks, as concatenated
    rows["x"], rows["y"] = np.nan, np.nan
    rows.loc[: n - 1, "x"] = np.round(np.linspace(-1, 1, n), 4)
    rows.loc[: n - 1, "y"] = 0.25
    run = pd.Series(pd.array(["r1" if i % 3 else "" for i in range(2 * n)], dtype="str"))
    return rows.assign(run_id=run).set_axis(pd.RangeIndex(5, 5 + 2 * n)).reindex(columns=[*rows.columns, "run_id"])


@pytest.mark.parametrize(
    "case",
    ["clusters and noise", "all noise", "no rows", "object texts", "one row", "missing run id"],
)
def test_member_part_table_from_arrow_texts_is_the_object_forms(tmp_path, case):
    """A membership part's table cast from the members' Arrow text columns is the one their
    Python objects gave (schema, pandas metadata, values, the Parquet file's bytes), and where it
    cannot be (no text column value: Arrow's null type; object columns) the object form is used."""
    from pipeline.insights.membership import _arrow_texts_table, member_part_table
    from pipeline.io import atomic_write_parquet

    n = {"no rows": 0, "one row": 1}.get(case, 50)
    ids = [None if i % 4 == 1 else f"C{i % 3}" for i in range(n)]
    rows = _member_rows(n, [None] * n if case == "all noise" else ids)
    if case == "object texts":
        rows["case_id"] = rows["case_id"].astype(object)
    if case == "missing run id":
        rows["run_id"] = rows["run_id"].where(rows.index % 2 == 0)
    got, want = member_part_table(rows), _old_member_part_table(rows)
    assert got.equals(want, check_metadata=True) and got.schema.metadata == want.schema.metadata
    atomic_write_parquet(tmp_path / "got.parquet", got)
    atomic_write_parquet(tmp_path / "want.parquet", want)
    assert (tmp_path / "got.parquet").read_bytes() == (tmp_path / "want.parquet").read_bytes()
    direct = _arrow_texts_table(rows[got.schema.names].reset_index(drop=True))
    assert (direct is not None) == (case in ("clusters and noise", "one row", "missing run id"))


def test_centroid_and_sims_are_the_whole_clusters_and_gather_a_block_at_a_time():
    """A cluster's centroid and its rows' similarities, read a block of rows at a time: the same
    centroid bit for bit as `centroid_of` of its rows gathered whole, and each similarity the
    one-thread product of the whole matrix (blocks of any length; a one-row tail would be numpy's
    dot and rounds otherwise). No gather is longer than the block."""
    from threadpoolctl import threadpool_limits

    from pipeline.insights.cluster import centroid_and_sims, centroid_of
    from pipeline.insights.row_file import RowFile

    rng = np.random.default_rng(3)
    X = rng.normal(size=(6_000, 24)).astype(np.float32)
    gathered: list[int] = []

    class Counting(RowFile):
        def __getitem__(self, key):
            out = super().__getitem__(key)
            gathered.append(len(out))
            return out

    with Counting(X) as spilled:
        for n in (1, 2, 300, 2_047, 2_048, 2_049, 4_097, 6_000):
            at = np.sort(rng.choice(len(X), n, replace=False))
            whole = X[at]
            want_c = centroid_of(whole)
            with threadpool_limits(limits=1, user_api="blas"):
                want_s = whole @ want_c
            for source in (X, spilled):
                gathered.clear()
                cent, sims = centroid_and_sims(source, at, block=2_048)
                assert np.array_equal(cent, want_c) and cent.dtype == np.float32
                assert np.array_equal(sims, want_s) and sims.dtype == np.float32
                if source is spilled:
                    assert max(gathered) <= 2_049  # a block, or the last block with a one-row tail


def _resident_kib_under(folder) -> int:
    """Resident KiB of this process's maps of files under `folder`, named or not (/proc/self/smaps)."""
    prefix, total, inside = os.path.realpath(folder) + "/", 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                inside = len(head) > 5 and head[5].startswith(prefix)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.parametrize("cases", [0, 1, 40_000])
def test_spilled_token_codes_are_the_codes_mapped_and_let_go_at_release_points(tmp_path, cases):
    """`spilled` keeps the same codes, offsets and vocabulary in an unnamed file, read-only;
    inside `dropping_mapped_pages` of its folder a release point lets their pages go, and a read
    maps them back unchanged. Outside the block they stay."""
    from pipeline.heap import _libc, dropping_mapped_pages, release_unused_memory
    from pipeline.insights.stored_tokens import spilled

    rng = np.random.default_rng(cases)
    lists = [[WORDS[j] for j in rng.integers(0, len(WORDS), int(rng.integers(0, 60)))] for _ in range(cases)]
    tokens = TokenCodes.from_lists(lists)
    folder = tmp_path / "tokens"
    got = spilled(tokens, folder)
    assert list(folder.iterdir()) == []  # unnamed: nothing left behind, even by a crash
    assert got.vocab == tokens.vocab and got.lists() == lists
    assert np.array_equal(got.codes, tokens.codes) and np.array_equal(got.offsets, tokens.offsets)
    assert not got.codes.flags.writeable and not got.offsets.flags.writeable
    idx = np.arange(cases)[::-3]
    assert got.take(idx).lists() == [lists[i] for i in idx]
    if cases < 40_000 or not os.path.exists("/proc/self/smaps") or _libc() is None:
        return
    size_kib = (got.codes.nbytes + got.offsets.nbytes) // 1024  # about 4.8 MiB
    got.codes.sum(), got.offsets.sum()  # every page read
    assert _resident_kib_under(folder) >= size_kib - 64
    release_unused_memory()  # no block: kept
    assert _resident_kib_under(folder) >= size_kib - 64
    with dropping_mapped_pages(folder):
        release_unused_memory()
        assert _resident_kib_under(folder) < 256
        assert got.lists() == lists  # read back from the page cache
        release_unused_memory()
        assert _resident_kib_under(folder) < 256
