"""Root-cause clusters, stable ids, trends, KPIs and the export (pipeline.insights.cluster/trends/kpis/export)."""

from __future__ import annotations

import json
import re
import threading
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.insights.cluster import (ALL_SCOPE, NOISE, CauseLexicon, ClusterParams, ClusterState, ScopeResult,
                              assign_stable_ids, class_tfidf, cluster_cases, cluster_vectors, label_from_terms, match_centroids,
                              select_cases)
from pipeline.embed.fake import HashingEmbedder
from pipeline.insights.kpis import compute_kpis
from pipeline.insights.trends import rise_p_value, root_cause_matrix, week_over_week
from tests.conftest import PII_PATTERNS, all_output_text


def _blobs(n_per: int = 30, k: int = 3, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:k] * 1.0
    X = np.concatenate([c + rng.normal(0, 0.05, (n_per, dim)) for c in centers])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), np.repeat(np.arange(k), n_per)


# -- clustering ---------------------------------------------------------------------------------

def test_cluster_vectors_recovers_separated_groups():
    X, y = _blobs()
    labels = cluster_vectors(X, ClusterParams(pca_components=5, min_cluster_size=5))
    found = labels[labels != NOISE]
    assert len(set(found)) == 3
    # every cluster is pure
    for lab in set(found):
        assert len(set(y[labels == lab])) == 1


def test_too_few_cases_are_all_noise():
    X, _ = _blobs(n_per=2)
    assert (cluster_vectors(X, ClusterParams(min_scope_cases=10)) == NOISE).all()


def test_class_tfidf_prefers_distinctive_terms_and_drops_placeholders():
    tokens = [["快递", "没收到", "<PHONE>", "问题"]] * 5 + [["发票", "抬头", "问题"]] * 5
    labels = [0] * 5 + [1] * 5
    terms = class_tfidf(tokens, labels, top_k=3)
    assert terms[0][0][0] in ("快递", "没收到")
    assert terms[1][0][0] in ("发票", "抬头")
    flat = [t for ts in terms.values() for t, _ in ts]
    assert "<PHONE>" not in flat
    # a word said in every cluster names none of them
    assert "问题" not in flat


def test_class_tfidf_needs_a_term_in_two_cases_and_more_common_than_elsewhere():
    tokens = [["发票", "抬头", "京东"]] * 4 + [["发票", "结婚", "妹子"]] + [["快递", "没收到", "京东"]] * 5
    labels = [0] * 5 + [1] * 5
    got = [t for t, _ in class_tfidf(tokens, labels, top_k=5, min_lift=1.5)[0]]
    assert got[:2] == ["发票", "抬头"]
    assert "结婚" not in got and "妹子" not in got  # one chatty case is an anecdote
    assert "京东" not in got  # as common in the other cluster
    # a scope that is one cluster has nothing to compare against: only the two-case rule applies
    assert {t for t, _ in class_tfidf(tokens[:5], [0] * 5, top_k=5)[0]} == {"发票", "抬头", "京东"}


def test_filler_laden_invoice_chats_are_labelled_by_the_invoice(cfg):
    """Hand-written customer problems full of address and courtesy words (亲, 小妹, 妹子, 京东,
    您好, 客服, 请问, 谢谢) in every cluster: the labels come out of the product's own path
    (segmenter tokens, stop words, c-TF-IDF with distinctiveness) and name the matter."""
    from pipeline.insights.export import _stopwords
    from pipeline.text.segment import Segmenter

    invoice = ["亲，小妹您好，请问发票抬头开错了能重开吗谢谢", "妹子你好，京东客服，我要开增值税发票，发票抬头是公司",
               "小妹，请问电子发票在哪里下载，谢谢亲", "您好客服妹子，发票还没收到，发票能补开吗",
               "亲亲，京东的发票抬头写错了，麻烦小妹改一下发票", "请问客服，发票税号填错了要重开发票，谢谢妹子"]
    parcel = ["亲，小妹您好，请问快递三天了还没送到谢谢", "妹子你好，京东客服，我的快递显示签收但没收到",
              "小妹，请问快递怎么还不送，物流不更新，谢谢亲", "您好客服妹子，快递员不送货上门，快递放驿站了",
              "亲亲，京东的快递一直没有物流信息，麻烦小妹催一下", "请问客服，快递地址写错了能改吗，谢谢妹子"]
    frame = select_cases(pd.DataFrame({"case_id": [f"c{i}" for i in range(12)], "problem": invoice + parcel}))
    X, _ = _blobs(n_per=6, k=2)
    lexicon = CauseLexicon.load(cfg)
    params = ClusterParams(pca_components=0, min_cluster_size=3, min_scope_cases=6)
    res = cluster_cases(frame, X, cfg, lexicon, cut=Segmenter(cfg).cut, stopwords=_stopwords(cfg), params=params)
    rows = res[0].clusters.set_index("local_label")
    by_first = {int(res[0].labels[0]): "invoice", int(res[0].labels[6]): "parcel"}
    assert len(by_first) == 2
    filler = {"亲", "亲亲", "小妹", "妹子", "京东", "您好", "你好", "客服", "请问", "谢谢", "麻烦"}
    for lab, kind in by_first.items():
        terms = rows.loc[lab, "top_terms"]
        assert not filler & set(terms), terms
        assert not any(w in rows.loc[lab, "label"] for w in filler), rows.loc[lab, "label"]
    invoice_label = rows.loc[[k for k, v in by_first.items() if v == "invoice"][0], "label"]
    assert "发票" in invoice_label.split("、"), invoice_label
    parcel_label = rows.loc[[k for k, v in by_first.items() if v == "parcel"][0], "label"]
    assert "快递" in parcel_label.split("、"), parcel_label


def test_label_orders_terms_as_in_the_typical_case():
    assert label_from_terms(["签收", "物流"], "物流显示已签收但没收到", 2) == "物流、签收"
    assert label_from_terms([], "x", 3) == "（无明显关键词）"


def test_select_cases_skips_empty_problems_and_fills_issue_type():
    df = pd.DataFrame({"case_id": ["a", "b", "c"], "problem": ["怎么办", "快递三天了还没送到", ""],
                       "customer_text": ["", "", "我的发票一直没有开出来"]})
    sel = select_cases(df, min_chars=4)
    assert sel["case_id"].tolist() == ["b", "c"]
    assert sel["cluster_text"].tolist()[1].startswith("我的发票")
    assert set(sel["issue_type"]) == {"未分类"}


def test_cause_lexicon_attributes_category_as_suggestion(cfg):
    lex = CauseLexicon.load(cfg)
    res = lex.attribute(["快递三天了还没送到", "物流太慢了还没到", "发票抬头错了"], min_share=0.3)
    assert res["cause_phrases"][0] == "配送延误"
    assert res["cause_category"] == "logistics_partner"
    with pytest.raises(ValueError, match="category"):
        CauseLexicon.from_dict({"causes": [{"phrase": "x", "category": "weather", "patterns": ["x"]}]})


# -- stable ids ---------------------------------------------------------------------------------

def test_hungarian_matching_follows_centroids_not_order():
    prev = np.eye(4, dtype=np.float32)[:3]
    new = prev[[2, 0, 1]]
    pairs = match_centroids(prev, new, threshold=0.9)
    assert sorted((p, n) for p, n, _ in pairs) == [(0, 1), (1, 2), (2, 0)]
    assert match_centroids(prev, np.eye(4, dtype=np.float32)[3:], threshold=0.9) == []


def _scope(centroids: list[np.ndarray], labels: list[str], sizes: list[int]) -> ScopeResult:
    rows = pd.DataFrame({"scope": ALL_SCOPE, "local_label": range(len(labels)), "label": labels, "size": sizes})
    return ScopeResult(ALL_SCOPE, rows, np.arange(len(labels)), {i: c for i, c in enumerate(centroids)})


def test_cluster_keeps_its_id_and_label_history_across_nights():
    e = np.eye(8, dtype=np.float32)
    day1, state = assign_stable_ids([_scope([e[0], e[1]], ["快递、没收到", "发票、抬头"], [10, 5])],
                                    ClusterState.empty(), "2025-10-01", 0.85)
    assert day1["is_new"].all()
    ids1 = dict(zip(day1["label"], day1["cluster_id"]))
    # next night: same two causes (slightly moved, other order, one renamed) plus a new one
    moved = [e[1] * 0.98 + e[2] * 0.02, e[0], e[5]]
    moved = [v / np.linalg.norm(v) for v in moved]
    day2, state = assign_stable_ids([_scope(moved, ["发票、抬头", "物流、没收到", "蓝牙、连接"], [6, 20, 7])],
                                    state, "2025-10-02", 0.85)
    ids2 = dict(zip(day2["label"], day2["cluster_id"]))
    assert ids2["发票、抬头"] == ids1["发票、抬头"]
    assert ids2["物流、没收到"] == ids1["快递、没收到"]
    assert ids2["蓝牙、连接"] not in ids1.values()
    assert day2.set_index("label").loc["蓝牙、连接", "is_new"]
    renamed = day2.set_index("cluster_id").loc[ids1["快递、没收到"]]
    assert [h["label"] for h in json.loads(renamed["label_history"])] == ["快递、没收到", "物流、没收到"]
    assert renamed["previous_size"] == 10 and renamed["growth"] == 10
    assert len(state.table) == 3


# -- trends -------------------------------------------------------------------------------------

def test_rise_test_separates_noise_from_real_growth():
    assert rise_p_value(4, 2) > 0.1
    assert rise_p_value(80, 40) < 0.001
    assert rise_p_value(3, 9) == 1.0


def _weekly_cases(counts: dict[str, tuple[int, int]], as_of: date) -> pd.DataFrame:
    rows = []
    for key, (last, this) in counts.items():
        rows += [{"issue_type": key, "date": (as_of - timedelta(days=10)).isoformat()}] * last
        rows += [{"issue_type": key, "date": (as_of - timedelta(days=2)).isoformat()}] * this
    return pd.DataFrame(rows)


def test_week_over_week_alerts_only_on_significant_rises():
    as_of = date(2025, 10, 31)
    df = _weekly_cases({"small": (2, 4), "big": (40, 80), "flat": (30, 30)}, as_of)
    wow = week_over_week(df, "issue_type", "issue_type", as_of, alpha=0.01, min_count=10, new_keys=["flat"])
    by = wow.set_index("key")
    assert not by.loc["small", "alert"] and by.loc["big", "alert"] and not by.loc["flat", "alert"]
    assert (by.loc["big", "this_week"], by.loc["big", "last_week"]) == (80, 40)
    # emerging (alerting or new) rows come first
    assert set(wow["key"].head(2)) == {"big", "flat"}


def test_root_cause_matrix_shares_add_up_per_issue_type():
    members = pd.DataFrame({
        "scope": ["物流配送"] * 10 + [ALL_SCOPE] * 10, "issue_type": ["物流配送"] * 20,
        "cluster_id": ["C0001"] * 7 + [None] * 3 + ["C0009"] * 10,
        "region": ["华东"] * 5 + ["华北"] * 5 + ["华东"] * 10, "product": ["床垫"] * 20})
    clusters = pd.DataFrame({"cluster_id": ["C0001"], "label": ["快递、没收到"], "cause_phrases": [["配送延误"]],
                             "cause_category": ["logistics_partner"], "cause_category_zh": ["物流伙伴"]})
    m = root_cause_matrix(members, clusters, pd.Series({"物流配送": 10}), top=2)
    assert m["share_of_issue_type"].sum() == pytest.approx(1.0)
    top = m.iloc[0]
    assert top["cluster_id"] == "C0001" and top["count"] == 7 and top["top_regions"].startswith("华东 71%")
    assert top["impact"] == "配送延误: 华东 71%"


def test_kpis_report_how_many_cases_had_timings():
    df = pd.DataFrame({"channel": ["chat", "chat", "call"], "issue_type": ["发票", None, "发票"],
                       "first_response_s": [10.0, None, 30.0], "duration_s": [None, None, 100.0],
                       "outcome": ["resolved", "escalated", "unknown"]})
    k = compute_kpis(df).set_index(["group_by", "group"])
    assert k.loc[("all", "全部"), "n_with_first_response"] == 2
    assert k.loc[("all", "全部"), "n_with_duration"] == 1
    assert k.loc[("all", "全部"), "resolution_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert k.loc[("channel", "chat"), "escalation_rate"] == 0.5
    assert ("issue_type", "未分类") in k.index


# -- the export, end to end (fake embedder: behaviour does not depend on the model) --------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory, cfg):
    from pipeline.insights.export import export_all
    from pipeline.orchestrate.nightly import run_pipeline
    from pipeline.sample.generate import generate

    root = tmp_path_factory.mktemp("export")
    generate(root / "in", n=200, seed=7, labels_out=root / "labels.jsonl")
    run_pipeline(cfg, root / "in", root / "out")
    first = export_all(cfg, root / "out", embedder=HashingEmbedder(), today=date(2025, 11, 1))
    second = export_all(cfg, root / "out", embedder=HashingEmbedder(), today=date(2025, 11, 2))
    return root / "out", first, second


def test_export_writes_every_table_as_parquet_and_csv(exported):
    out, first, second = exported
    folder = Path(second["export_dir"])
    assert folder == out / "exports" / "2025-11-02"
    assert (out / "exports" / "LATEST").read_text().strip() == "2025-11-02"
    for name in ("clusters", "trends", "alerts", "matrix", "kpis"):
        pq_df = pd.read_parquet(folder / f"{name}.parquet")
        csv_df = pd.read_csv(folder / f"{name}.csv", encoding="utf-8-sig")
        assert len(pq_df) == len(csv_df) > 0, name
    # Members as parts, each a Parquet and a CSV of the same rows; the folder reads as one table.
    parts = sorted((folder / "members.parquet").glob("part-*.parquet"))
    assert parts and second["members_parts"] == len(parts)
    csvs = sorted((folder / "members.csv").glob("part-*.csv"))
    assert [p.stem for p in csvs] == [p.stem for p in parts]
    csv_rows = sum(len(pd.read_csv(p, encoding="utf-8-sig")) for p in csvs)
    assert len(pd.read_parquet(folder / "members.parquet")) == csv_rows == second["rows"]["members"] > 0
    assert (out / "state" / "clusters" / "clusters.parquet").is_file()
    assert not list((out / "exports").glob(".*tmp*"))
    json.dumps(second)  # JSON-able


def test_export_clusters_are_labelled_and_stable_between_runs(exported):
    out, first, second = exported
    assert first["n_clusters"] > 0 and first["n_new_clusters"] == first["n_clusters"]
    assert second["n_new_clusters"] == 0
    c1 = pd.read_parquet(out / "exports" / "2025-11-01" / "clusters.parquet")
    c2 = pd.read_parquet(out / "exports" / "2025-11-02" / "clusters.parquet")
    assert set(c1["cluster_id"]) == set(c2["cluster_id"])
    row = c2.iloc[0]
    assert row["label"] and len(row["representative_texts"]) >= 1 and row["cause_suggested"]
    assert not any("<" in t for t in c2["top_terms"].explode().dropna())
    per_type = c2[c2["scope"] != ALL_SCOPE]
    assert (per_type["share_of_scope"] <= 1).all() and len(per_type) > 0


def test_export_members_link_cases_to_clusters(exported):
    out, _, second = exported
    m = pd.read_parquet(Path(second["export_dir"]) / "members.parquet")
    c = pd.read_parquet(Path(second["export_dir"]) / "clusters.parquet")
    clustered = m[m["cluster_id"].notna()]
    assert set(clustered["cluster_id"]) == set(c["cluster_id"])
    sizes = clustered.groupby("cluster_id").size()
    assert (sizes.reindex(c["cluster_id"]).to_numpy() == c["size"].to_numpy()).all()
    assert set(m["scope"]) >= {ALL_SCOPE}


def test_export_never_contains_unmasked_personal_data(exported):
    out, _, second = exported
    # plotly.js itself (inlined in report.html) is full of long float constants: leave it out.
    text = re.sub(r"<script>/\*\*\s*\* plotly\.js.*?</script>", "", all_output_text(Path(second["export_dir"])), flags=re.S)
    assert "Plotly.newPlot" in text and "clusters" in text
    for kind, pat in PII_PATTERNS.items():
        assert not pat.search(text), kind


def test_export_since_filters_cases(exported, cfg):
    from pipeline.insights.export import export_all

    out, _, second = exported
    later = export_all(cfg, out, since=date(2099, 1, 1), embedder=HashingEmbedder(), today=date(2025, 11, 3))
    assert later["n_cases"] == 0 and later["n_clusters"] == 0
    assert (out / "exports" / "LATEST").read_text().strip() == "2025-11-03"


# -- CLI ----------------------------------------------------------------------------------------

def _fake_embedder(monkeypatch):
    import pipeline.embed

    monkeypatch.setattr(pipeline.embed, "Embedder", lambda cfg, **kw: HashingEmbedder())


def test_eval_clusters_json_has_exactly_the_documented_keys(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import _register, app

    _register()
    _fake_embedder(monkeypatch)
    rows = [{"text": f"快递{i}天还没送到，物流不更新", "label": "物流配送"} for i in range(15)]
    rows += [{"text": f"发票抬头开错了第{i}次，要重开", "label": "发票"} for i in range(15)]
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    res = CliRunner().invoke(app, ["eval", "clusters", "--labels", str(path), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(got) == {"nmi", "ari", "n_clusters", "noise_share"}
    assert got["nmi"] > 0.5


def test_mined_cases_take_their_conversations_issue_type(cfg):
    from pipeline.evaluate.clusters import label_mined_cases

    cases = pd.DataFrame({"conversation_id": ["a", "a", "b", "c"], "segment": [0, 1, 0, 0],
                          "problem": ["发票抬头开错了要重开", "快递三天还没送到", "退款一直没到账", "怎么办"],
                          "issue_type": ["其他"] * 4})
    gold = {"a": {"issue_type": "发票"}, "c": {"issue_type": "物流配送"}, "x": {"issue_type": "发票"}}
    got = label_mined_cases(cases, gold, cfg)
    # b has no label; c's problem is too short to cluster; a's two cases both carry a's label
    assert got["text"].tolist() == ["发票抬头开错了要重开", "快递三天还没送到"]
    assert got["label"].tolist() == ["发票", "发票"]


def test_eval_clusters_scores_cases_mined_from_labelled_transcripts(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import _register, app
    from pipeline.sample.generate import generate

    _register()
    _fake_embedder(monkeypatch)
    generate(tmp_path / "in", n=40, seed=3, labels_out=tmp_path / "truth.jsonl")
    # the shape of ../shared/data/jddc-labels: conversation_id -> the conversation's issue type
    truth = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text(encoding="utf-8").splitlines()]
    (tmp_path / "labels.jsonl").write_text("\n".join(
        json.dumps({"conversation_id": t["conversation_id"], "issue_type": t["issues"][0]["issue_type"]},
                   ensure_ascii=False) for t in truth if t.get("issues")), encoding="utf-8")
    args = ["eval", "clusters", "--transcripts", str(tmp_path / "in"), "--labels", str(tmp_path / "labels.jsonl")]
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(got) == {"nmi", "ari", "n_clusters", "noise_share"} and got["n_clusters"] >= 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "issue_type": "发票"}) + "\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["eval", "clusters", "--transcripts", str(tmp_path / "in"), "--labels", str(bad)])
    assert res.exit_code == 1 and "conversation_id" in res.output


def test_clusters_export_cli_fails_clearly_without_cases(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import _register, app

    _register()
    res = CliRunner().invoke(app, ["clusters", "export", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 1
    assert "casemine run" in res.output


def test_clusters_export_cli_rejects_bad_date(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import _register, app

    _register()
    res = CliRunner().invoke(app, ["clusters", "export", "--out", str(tmp_path), "--since", "yesterday"])
    assert res.exit_code == 2


# -- real data ----------------------------------------------------------------------------------

def test_real_complaints_cluster_better_than_chance(shared_data, cfg, tmp_path):
    """The product's clustering on the hand-labelled complaints agrees with the issue types
    clearly above chance (NMI of a random partition is ~0.03 here)."""
    from pipeline.evaluate.clusters import evaluate_clusters

    res = evaluate_clusters(cfg, shared_data / "complaints" / "dev.csv", out_root=tmp_path)
    assert res["rows"] == 413
    assert res["nmi"] > 0.15 and res["n_clusters"] >= 3 and res["noise_share"] < 0.6


def test_real_complaints_cluster_at_least_as_well_as_label_free_kmeans(shared_data, cfg, tmp_path):
    """The product's clustering reaches KMeans with a silhouette-chosen k on the raw embeddings
    (the baseline the product must beat; k never comes from the label count)."""
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from pipeline.embed import Embedder
    from pipeline.evaluate.clusters import load_labelled_texts
    from pipeline.insights.cluster import kmeans_by_silhouette

    df = load_labelled_texts(shared_data / "complaints" / "dev.csv")
    X = np.asarray(Embedder(cfg, out_root=tmp_path).encode_passages(df["text"].tolist()), dtype=np.float32)
    params = ClusterParams.from_config(cfg)
    product = nmi(df["label"], cluster_vectors(X, params))
    baseline = nmi(df["label"], kmeans_by_silhouette(X, min(params.max_clusters, int(np.sqrt(len(X))))))
    assert product >= baseline, (product, baseline)


def test_no_alerts_without_a_baseline_week():
    as_of = date(2025, 10, 31)
    df = _weekly_cases({"a": (0, 80), "b": (0, 40)}, as_of)
    wow = week_over_week(df, "issue_type", "issue_type", as_of, alpha=0.01, min_count=10)
    assert not wow["alert"].any()


def test_fit_cap_fits_on_a_sample_and_still_assigns_every_case():
    X, y = _blobs(n_per=200, k=3)
    full = ClusterParams(pca_components=5, min_cluster_size=5)
    capped = ClusterParams(pca_components=5, min_cluster_size=5, fit_max_cases=100)
    labels = cluster_vectors(X, capped)
    assert len(labels) == len(X) and (labels != NOISE).all()  # rows outside the sample are assigned too
    assert len(set(labels)) == 3 and all(len(set(y[labels == lab])) == 1 for lab in set(labels))
    # at or under the cap nothing changes
    at_cap = ClusterParams(pca_components=5, min_cluster_size=5, fit_max_cases=len(X))
    np.testing.assert_array_equal(cluster_vectors(X, at_cap), cluster_vectors(X, full))


def test_fit_cap_projection_is_fitted_on_the_sample_only(monkeypatch):
    import pipeline.insights.cluster as cl

    seen = []
    real = cl.fit_projection
    monkeypatch.setattr(cl, "fit_projection", lambda X, *a, **k: seen.append(len(X)) or real(X, *a, **k))
    X, _ = _blobs(n_per=200, k=3)
    fit = cl.fit_clusters(X, ClusterParams(pca_components=5, min_cluster_size=5, fit_max_cases=150))
    assert seen == [150] and len(fit.labels) == len(X) and len(fit.centers) == 3


@pytest.mark.parametrize("n_groups", [0, 1, 7, 2**15 - 1, 2**15, 70_000])
def test_group_rows_are_a_groupbys_indices_whatever_the_number_of_groups(n_groups):
    """`group_rows` sorts narrowed codes (radix) below 2**15 groups and wide ones above: either
    way each group's rows in row order, as a groupby's `.indices` holds them."""
    from pipeline.insights.cluster import group_rows

    rng = np.random.default_rng(n_groups)
    codes = rng.integers(-1, max(n_groups, 1), size=50_000) if n_groups else np.full(10, -1)
    if n_groups:
        codes[:3] = [n_groups - 1, -1, 0]  # the widest code present
    got = group_rows(codes, n_groups)
    want = pd.Series(np.arange(len(codes))).groupby(codes).indices
    assert len(got) == n_groups
    for g, rows in enumerate(got):
        assert rows.tolist() == (want[g].tolist() if g in want else []), g


def test_a_recluster_lets_a_loaded_model_go_before_it_fits(exported, tmp_path, monkeypatch, cfg):
    """A re-cluster embeds first (mostly from the cache) and then fits; a model that embedding
    loaded is not needed by the fits and is let go before them, with no reference left."""
    import gc
    import shutil
    import weakref

    import pipeline.insights.export as ex
    from pipeline.embed import embedder as E

    class Model:  # stands in for a loaded SentenceTransformer in the process's table
        pass

    out = tmp_path / "out"
    shutil.copytree(exported[0], out)
    model = Model()
    monkeypatch.setitem(E._MODELS, ("a model the embedding loaded", "cpu"), (model, threading.Lock()))
    held = weakref.ref(model)
    del model
    alive_at_fit: list[bool] = []
    fit = ex.fit_vectors

    def fitting(*args, **kwargs):
        gc.collect()
        alive_at_fit.append(held() is not None)
        return fit(*args, **kwargs)

    monkeypatch.setattr(ex, "fit_vectors", fitting)
    s = ex.export_all(cfg, out, embedder=HashingEmbedder(), today=date(2025, 11, 3), recluster=True)
    assert s["mode"] == "full" and alive_at_fit and not any(alive_at_fit)


def test_export_lets_the_mapped_case_copy_go_at_its_release_points(exported, tmp_path, monkeypatch, cfg):
    """A re-cluster's export maps its copy of the stored cases and its token codes; at each
    release point the pages it read of them are dropped from the process
    (`heap.dropping_mapped_pages`), and only then."""
    import os
    import shutil

    import pipeline.heap as heap
    from pipeline.insights.export import case_cache_path, export_all, token_spill_path

    out = tmp_path / "out"
    shutil.copytree(exported[0], out)
    copy = os.path.realpath(case_cache_path(out))
    tokens = os.path.realpath(token_spill_path(out))  # the re-cluster's token codes (`spilled`)
    seen: list[tuple[list[str], bool, bool]] = []
    real = heap.drop_mapped_pages

    def recording(folders: list[str]) -> int:
        with open("/proc/self/maps", encoding="utf-8") as f:
            lines = f.read()
        seen.append((list(folders), copy + "/" in lines, tokens + "/" in lines))
        return real(folders)

    monkeypatch.setattr(heap, "drop_mapped_pages", recording)
    s = export_all(cfg, out, embedder=HashingEmbedder(), today=date(2025, 11, 3), recluster=True)
    assert s["mode"] == "full"
    assert seen and all(folders == [copy, tokens] for folders, _, _ in seen)
    assert any(mapped for _, mapped, _ in seen)  # the copy was mapped when its pages were dropped
    assert any(codes for _, _, codes in seen)  # and so were the token codes, in their folder
    assert heap._DROPPED_UNDER == []  # the block ended with the export
    n = len(seen)
    heap.release_unused_memory()  # outside it nothing is dropped
    assert len(seen) == n
