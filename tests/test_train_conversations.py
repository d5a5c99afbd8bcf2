"""Training from labelled conversations (`casemine train --labels FILE --transcripts DIR`), the
request-kind rules on hand-written chats, and the review queue read back as training data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.analysis.classify import classify_cases
from pipeline.analysis.classify.conversations import read_conversation_labels
from pipeline.orchestrate.training import train_from_conversations
from pipeline.analysis.classify.data import LabeledDataError
from pipeline.analysis.classify.store import load_task_model, task_dir
from pipeline.analysis.classify.taxonomy import load_taxonomy
from pipeline.config import Config

REPO = Path(__file__).resolve().parents[1]
TASKS = ("issue_type", "request_kind", "outcome")


def _labels_file(sample_labels: list[dict], path: Path) -> Path:
    """Ground truth of the generated sample as a labelling team would hand it over: one row per
    conversation, the first issue's labels."""
    rows = [{"conversation_id": r["conversation_id"], **{t: r["issues"][0][t] for t in TASKS}}
            for r in sample_labels if r.get("issues")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def conv_trained(cfg, sample, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conv")
    transcripts, labels = sample
    c = cfg.with_overrides(classify={"model_dir": str(tmp / "model")})
    lab = _labels_file(labels, tmp / "labels.jsonl")
    fits = train_from_conversations(c, lab, transcripts, encode=_hash_encode)
    return c, fits, lab, transcripts


def _hash_encode(texts: list[str]):
    from pipeline.embed.fake import HashingEmbedder

    return HashingEmbedder().encode(list(texts))


def test_one_model_per_label_column_with_card(conv_trained):
    c, fits, _, _ = conv_trained
    assert [f.task for f in fits] == list(TASKS)
    for f in fits:
        card = json.loads((task_dir(c, f.task) / "model_card.json").read_text(encoding="utf-8"))
        assert card["task"] == f.task and card["input"] == "case"
        cv = card["cv"]
        assert cv["folds"] >= 2 and len(cv["per_fold_macro_f1"]) == cv["folds"]
        assert {"mean", "sd", "min", "max"} <= set(cv["macro_f1"]) and {"mean", "sd"} <= set(cv["accuracy"])
        assert cv["per_class"] and set(cv["per_class"]) <= set(card["training_data"]["label_counts"])
        assert card["training_data"]["conversations"] >= 100
        assert "ingest" in card["training_data"]["steps"]
    # The issue-type model keeps the folder the text model always used.
    assert task_dir(c, "issue_type") == c.resolve(c.classify.model_dir)


def test_models_learn_the_generated_labels(conv_trained):
    """Generated chats are templated: a model that learnt anything gets most of them right."""
    _, fits, _, _ = conv_trained
    cv = {f.task: f.card["cv"] for f in fits}
    assert cv["issue_type"]["accuracy"]["mean"] >= 0.7, cv["issue_type"]
    assert cv["request_kind"]["accuracy"]["mean"] >= 0.6, cv["request_kind"]
    assert cv["outcome"]["accuracy"]["mean"] >= 0.6, cv["outcome"]


def test_run_time_classification_uses_every_trained_model(conv_trained, cfg, monkeypatch, fake_embedder):
    from pipeline.analysis.emotion import add_emotion
    from pipeline.ingest import discover, read_file
    from pipeline.orchestrate.steps import process_batch

    c, fits, _, transcripts = conv_trained
    convs = [conv for p in discover(transcripts) for conv in read_file(p, c.ingest).conversations][:20]
    cases = add_emotion(process_batch(convs, c).cases, c)
    rule_outcomes = cases["outcome"].tolist()
    out = classify_cases(cases, c)
    ids = {f.task: f.card["model_id"] for f in fits}
    assert (out["classifier"] == ids["issue_type"]).all()
    ev = [json.loads(e) for e in out["evidence"]]
    assert all(e["request_kind"]["method"] == "model" and e["request_kind"]["model_id"] == ids["request_kind"] for e in ev)
    # The outcome model overrides the rule outcome and says so, keeping what the rules said.
    assert all(e["outcome"]["model_id"] == ids["outcome"] for e in ev)
    assert [e["outcome"]["rules_said"] for e in ev] == rule_outcomes
    assert out["outcome_evidence"].str.startswith(f"model {ids['outcome']}").all()
    assert set(out["outcome"]) <= {"resolved", "unresolved", "escalated", "unknown"}


def test_stale_task_model_is_refused_not_used(conv_trained, tmp_path):
    c, _, _, _ = conv_trained
    raw = yaml.safe_load((REPO / "configs" / "taxonomy.yaml").read_text(encoding="utf-8"))
    raw["request_kinds"]["kinds"][1]["keywords"].append("新线索")
    tax = tmp_path / "taxonomy.yaml"
    tax.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    c2 = c.with_overrides(classify={"taxonomy": str(tax)})
    from pipeline.analysis.classify import ModelMismatchError

    with pytest.raises(ModelMismatchError, match="request_kind"):
        load_task_model(c2, "request_kind")
    assert load_task_model(c2, "outcome") is not None  # outcome does not depend on the taxonomy's cues


def test_conversation_labels_are_validated(cfg, tmp_path):
    tax = load_taxonomy(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversation_id": "a", "request_kind": "抱怨"}\n', encoding="utf-8")
    with pytest.raises(LabeledDataError, match="抱怨"):
        read_conversation_labels(bad, tax)
    none = tmp_path / "none.csv"
    none.write_text("conversation_id,comment\na,x\n", encoding="utf-8")
    with pytest.raises(LabeledDataError, match="issue_type"):
        read_conversation_labels(none, tax)


# -- request kind rules on hand-written chats -------------------------------------------------

def _chat_cases(cfg: Config, turns: list[tuple[str, str]]) -> pd.DataFrame:
    from pipeline.analysis.emotion import add_emotion
    from pipeline.orchestrate.steps import process_batch
    from pipeline.schema import Conversation, Turn

    conv = Conversation("hand-1", "chat", [Turn(s, t) for s, t in turns], started_at="2026-01-05T10:00:00+08:00")
    return add_emotion(process_batch([conv], cfg).cases, cfg)


@pytest.mark.parametrize("turns", [
    [("customer", "你好，我买的鞋子尺码不合适，想申请退货退款"), ("agent", "您好，可以的，已为您提交退货申请"),
     ("customer", "好的，退款大概几天到账？"), ("agent", "审核通过后1-3个工作日原路退回"), ("customer", "好的谢谢")],
    [("customer", "订单不想要了，帮我取消一下，钱退回来"), ("agent", "已为您取消订单，退款已提交"), ("customer", "好的")],
])
def test_refund_request_without_complaint_is_consultation(cfg, tmp_path, turns):
    c = cfg.with_overrides(classify={"model_dir": str(tmp_path / "none")})
    out = classify_cases(_chat_cases(c, turns), c)
    assert out.loc[0, "request_kind"] == "咨询", out.loc[0, "evidence"]


@pytest.mark.parametrize("turns", [
    [("customer", "你们这什么破服务！快递一个星期了还没到，客服一直敷衍我"), ("agent", "非常抱歉，马上为您催促"),
     ("customer", "太差了，我要投诉，再不给说法就打12315"), ("agent", "理解您的心情")],
    [("customer", "收到的手机屏幕是碎的，太失望了，你们怎么检查的"), ("agent", "很抱歉给您带来不便"),
     ("customer", "气死我了，必须赔偿")],
])
def test_angry_complaint_is_complaint(cfg, tmp_path, turns):
    c = cfg.with_overrides(classify={"model_dir": str(tmp_path / "none")})
    out = classify_cases(_chat_cases(c, turns), c)
    assert out.loc[0, "request_kind"] == "投诉"
    assert json.loads(out.loc[0, "evidence"])["request_kind"]["method"] == "rules"


# -- the review queue closes the loop ---------------------------------------------------------

@pytest.fixture()
def cli(tmp_path):
    from pipeline.cli import _register, app

    _register()
    conf = tmp_path / "configs" / "casemine.yaml"
    conf.parent.mkdir()
    conf.write_text(yaml.safe_dump({
        "paths": {"out": str(tmp_path / "out"), "models": str(REPO / "models")},
        "classify": {"taxonomy": str(REPO / "configs" / "taxonomy.yaml"), "model_dir": str(tmp_path / "model")},
        "segment": {"user_dict": str(REPO / "configs" / "userdict.txt"), "stopwords": str(REPO / "configs" / "stopwords.txt")},
        "mask": {"surnames": str(REPO / "configs" / "surnames.txt")},
        "normalize": {"asr_corrections": str(REPO / "configs" / "asr_corrections.yaml")},
        "cases": {"lexicon": str(REPO / "configs" / "case_lexicon.yaml")},
    }, allow_unicode=True), encoding="utf-8")
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [*args, "--config", str(conf)], catch_exceptions=False)

    return invoke


def test_review_queue_file_trains(cli, cfg, sample, tmp_path, fake_embedder):
    from pipeline.analysis.emotion import add_emotion
    from pipeline.ingest import discover, read_file
    from pipeline.orchestrate.steps import process_batch
    from pipeline.storage.store import write_cases

    transcripts, labels = sample
    convs = [conv for p in discover(transcripts) for conv in read_file(p, cfg.ingest).conversations]
    cases = add_emotion(process_batch(convs, cfg, run_id="r1").cases, cfg)
    write_cases(tmp_path / "out", cases, "r1", 0)
    queue = tmp_path / "queue.csv"
    res = cli("review-queue", "--n", "60", "--out", str(queue))
    assert res.exit_code == 0, res.output
    # A reviewer fills the label columns in a spreadsheet (truth from the generator), leaving a
    # few rows empty, and saves it as CSV again.
    truth = {r["conversation_id"]: r["issues"][0] for r in labels if r.get("issues")}
    q = pd.read_csv(queue, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    assert len(q) >= 30
    for t in TASKS:
        q[t] = [truth.get(cid, {}).get(t, "") for cid in q["conversation_id"]]
    q.loc[q.index[:3], "outcome"] = ""
    q.to_csv(queue, index=False, encoding="utf-8-sig")
    res = cli("train", "--labels", str(queue), "--transcripts", str(transcripts), "--json")
    assert res.exit_code == 0, res.output
    cards = json.loads(res.stdout)["models"]
    assert {c["task"] for c in cards} == set(TASKS)
    outcome = next(c for c in cards if c["task"] == "outcome")
    assert outcome["training_data"]["conversations"] == len(q) - 3  # empty cells are skipped
    assert (tmp_path / "model" / "outcome" / "model_card.json").is_file()
    # The same file, without transcripts, trains issue types from its text column.
    res = cli("train", "--labels", str(queue), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["task"] == "issue_type"


# -- the case model's parts, on small hand-made inputs ---------------------------------------

def _case_inputs() -> tuple[list[dict], list[str]]:
    import numpy as np

    rng = np.random.RandomState(0)
    texts = {"物流配送": "快递怎么还没到 物流不动了", "发票": "发票抬头开错了 税号", "退换货/退款": "我要退货退款"}
    X, y = [], []
    for i in range(30):
        label = list(texts)[i % 3]
        emb = rng.normal(size=8) + (np.arange(8) == i % 3) * 3
        prior = {k: (0.8 if k == label else 0.1) for k in [*texts, "服务态度"]}
        X.append({"customer": texts[label] + f" {i}", "agent": "您好", "signals": [1.0, 0.0],
                  "emb": emb.tolist(), "prior": prior})
        y.append(label)
    # One chat of a type seen once: it cannot be learnt.
    X.append({"customer": "客服态度太差", "agent": "抱歉", "signals": [0.0, 1.0], "emb": rng.normal(size=8).tolist(),
              "prior": {"服务态度": 0.9, "物流配送": 0.1}})
    y.append("服务态度")
    return X, y


def test_case_model_leaves_unlearnable_labels_to_the_rule_vote():
    from pipeline.analysis.classify.case_model import CaseClassifier

    X, y = _case_inputs()
    m = CaseClassifier(C=4.0, min_df=2, emb_scale=2.0, signals_scale=0.0, prior_weight=0.5, min_class_count=2).fit(X, y)
    assert m.unlearnt_ == ["服务态度"]
    assert "服务态度" in set(m.classes_) and "服务态度" not in set(m.model_classes_)
    assert m.predict(X[:3]).tolist() == y[:3]
    # Only the rule vote knows the unlearnt type, and it can still win.
    assert m.predict([X[-1]])[0] == "服务态度"
    ev = m.explain([X[-1], X[0]], ["服务态度", y[0]], signal_names=["a", "b"])
    assert ev[0] and ev[0][0]["term"] == "规则投票"
    # The embedding's dimensions are explained as one term, never as "#3".
    terms = [t["term"] for t in m.explain(X[:6], y[:6], top_k=50)[0]]
    assert not any("#" in t for t in terms)
    assert len(m.feature_names()) == m.clf_.coef_.shape[1]
    proba = m.predict_proba(X[:5])
    assert proba.shape == (5, len(m.classes_)) and abs(proba.sum(axis=1) - 1).max() < 1e-6


def test_case_model_without_prior_or_embedding_is_the_plain_model():
    from pipeline.analysis.classify.case_model import CaseClassifier

    X, y = _case_inputs()
    m = CaseClassifier(C=4.0).fit(X, y)
    assert list(m.classes_) == sorted(set(y)) and m.unlearnt_ == []
    assert not m.emb_used_
    bad = [dict(X[0], signals=[1.0, 0.0, 0.0])]
    with pytest.raises(ValueError, match="retrain"):
        m.predict(bad)


# -- the agent side's rule scores (issue type) ------------------------------------------------

def test_agent_side_rule_scores_are_read_from_the_agent_text(cfg):
    """The agent's restatement ("为您催促物流") moves the agent-side scores, not the customer's."""
    from pipeline.analysis.classify.tasks import build_inputs, signal_names

    taxonomy = load_taxonomy(cfg)
    cases = pd.DataFrame(
        {
            "customer_text": ["东西什么时候到", "东西什么时候到"],
            "agent_text": ["已为您催促快递 物流配送中 请耐心等待", "发票已为您补开 请查收电子发票"],
        }
    )
    X = build_inputs("issue_type", cases, taxonomy, _hash_encode, with_prototypes=True, agent_signals=True)
    n = len(taxonomy.labels)
    assert all(len(x["agent_signals"]) == 2 * n for x in X)  # keyword shares, then prototype similarities
    assert X[0]["signals"] == X[1]["signals"]  # same customer words, same customer signals
    logistics, invoice = taxonomy.labels.index("物流配送"), taxonomy.labels.index("发票")
    assert X[0]["agent_signals"][logistics] > X[1]["agent_signals"][logistics]
    assert X[1]["agent_signals"][invoice] > X[0]["agent_signals"][invoice]
    assert len(signal_names("issue_type", taxonomy, True, True)) == len(X[0]["signals"]) + 2 * n
    # Without the flag (a card written before these signals existed) the inputs carry none.
    old = build_inputs("issue_type", cases, taxonomy, _hash_encode, with_prototypes=True)
    assert all(x["agent_signals"] is None for x in old)
    assert [x["signals"] for x in old] == [x["signals"] for x in X]


def test_trained_issue_model_reads_agent_signals_at_run_time(conv_trained):
    """Training wrote `agent_signals` in the card, the saved model uses them, and run-time inputs
    built as the card says carry exactly as many as the model was trained on."""
    from pipeline.analysis.classify.tasks import build_inputs

    c, fits, _, _ = conv_trained
    model, card = load_task_model(c, "issue_type")
    assert card["agent_signals"] is True and model.agent_signals_used_
    assert "agent-side rule scores" in card["chosen_variant"]["name"]
    assert len(card["signals"]) == model.n_signals_ + model.n_agent_signals_
    assert len(model.feature_names(card["signals"])) == model.clf_.coef_.shape[1]
    rows = pd.DataFrame({"customer_text": ["快递一直不到"], "agent_text": ["已为您催促物流"]})
    X = build_inputs("issue_type", rows, load_taxonomy(c), _hash_encode, with_prototypes=card["uses_prototypes"],
                     agent_signals=card["agent_signals"])
    assert len(X[0]["agent_signals"]) == model.n_agent_signals_
    assert model.predict_proba(X).shape == (1, len(model.classes_))
    # Inputs built without them are refused with a message, never read as zeros.
    with pytest.raises(ValueError, match="agent side"):
        model.predict([dict(X[0], agent_signals=None)])


def test_model_saved_before_agent_signals_still_loads_and_predicts():
    """An old pickle has no agent_signals_scale: it loads as a model that never reads them."""
    import pickle

    from pipeline.analysis.classify.case_model import CaseClassifier

    X, y = _case_inputs()
    m = CaseClassifier(C=4.0, min_df=2, emb_scale=2.0, prior_weight=0.5, min_class_count=2).fit(X, y)
    before = m.predict_proba(X)
    state = m.__getstate__()
    for k in ("agent_signals_scale", "agent_signals_used_", "n_agent_signals_", "extra_model_scale", "extra_model_"):
        state.pop(k)
    old = CaseClassifier.__new__(CaseClassifier)
    old.__setstate__(state)
    old = pickle.loads(pickle.dumps(old))
    assert old.agent_signals_scale == 0.0 and old.extra_model_scale == 0.0 and old.extra_model_ is None
    assert abs(old.predict_proba(X) - before).max() < 1e-12
    assert len(old.feature_names()) == old.clf_.coef_.shape[1]


# -- extra labelled texts (`--extra-labels`) ---------------------------------------------------


def _words_case(text: str) -> dict:
    return {"customer": text, "agent": "", "signals": [0.0]}


def test_extra_texts_teach_wording_the_conversations_never_used():
    """The chats say 快递没到 / 发票开错 only; the extra texts also say 包裹迟迟未送达 / 税号抬头不对.
    Chats worded the second way share no character with any training chat: alone, the model can
    only guess one class for both; reading the extra text model, it gets both right."""
    from pipeline.analysis.classify.case_model import CaseClassifier

    chats = {"物流配送": "快递没到", "发票": "发票开错"}
    X = [_words_case(chats[k] + "了" * (i % 3)) for i in range(12) for k in chats]
    y = [k for _ in range(12) for k in chats]
    extra_texts = {
        "物流配送": ["快递没到", "包裹迟迟未送达", "快递没到 包裹迟迟未送达"],
        "发票": ["发票开错", "税号抬头不对", "发票开错 税号抬头不对"],
    }
    XE = [_words_case(t) for k in extra_texts for t in extra_texts[k]]
    yE = [k for k in extra_texts for _ in extra_texts[k]]
    new = [_words_case("包裹迟迟未送达"), _words_case("税号抬头不对")]

    alone = CaseClassifier(C=4.0, extra_model_scale=2.0).fit(X, y)
    assert alone.extra_model_ is None and alone.predict(new).tolist() != ["物流配送", "发票"]
    m = CaseClassifier(C=4.0, extra_model_scale=2.0).fit(X, y, extra=(XE, yE))
    assert m.predict(new).tolist() == ["物流配送", "发票"]
    assert m.extra_model_.n_rows_ == len(XE)
    names = m.feature_names(["s"])
    assert len(names) == m.clf_.coef_.shape[1] and "外部标注文本模型:物流配送" in set(names)
    assert m.explain(new[:1], ["物流配送"])[0][0]["term"] == "外部标注文本模型:物流配送"
    # Scale 0 (the default): extra texts are ignored, the model is the one trained without them.
    off = CaseClassifier(C=4.0).fit(X, y, extra=(XE, yE))
    assert off.extra_model_ is None
    assert abs(off.predict_proba(new) - CaseClassifier(C=4.0).fit(X, y).predict_proba(new)).max() < 1e-12


def test_extra_labels_train_the_issue_model_and_the_card_lists_them(conv_trained, tmp_path):
    from pipeline.analysis.classify.tasks import build_inputs

    c, fits, lab, transcripts = conv_trained
    extra = tmp_path / "complaints.csv"
    pd.DataFrame(
        {
            "text": [
                "快递三天了还没到",
                "物流一直不更新",
                "发票抬头开错了",
                "电子发票怎么还没开",
                "我要退货退款",
                "退款什么时候到账",
            ],
            "label": ["物流配送", "物流配送", "发票", "发票", "退换货/退款", "退换货/退款"],
        }
    ).to_csv(extra, index=False)
    c2 = c.with_overrides(classify={"model_dir": str(tmp_path / "model")})
    new = train_from_conversations(c2, lab, transcripts, encode=_hash_encode, extra_labels=extra)
    card = next(f.card for f in new if f.task == "issue_type")
    seen = card["training_data"]["extra_labels"]
    assert seen["rows"] == 6 and seen["label_counts"]["发票"] == 2
    assert seen["files"][0]["path"] == str(extra) and len(seen["files"][0]["sha256"]) == 64
    assert "6 extra texts" in card["chosen_variant"]["name"] and "6 extra texts" in card["cv"]["variant"]
    # The other tasks never read them; the card written without them says none.
    assert all(
        "extra_labels" not in f.card["training_data"] or f.card["training_data"]["extra_labels"] is None
        for f in new
        if f.task != "issue_type"
    )
    assert next(f.card for f in fits if f.task == "issue_type")["training_data"]["extra_labels"] is None
    # Saved, loaded and used on run-time inputs like any issue model.
    model, _ = load_task_model(c2, "issue_type")
    assert model.extra_model_ is not None and model.extra_model_.n_rows_ == 6
    rows = pd.DataFrame({"customer_text": ["物流一直不更新"], "agent_text": ["帮您催促"]})
    X = build_inputs(
        "issue_type",
        rows,
        load_taxonomy(c2),
        _hash_encode,
        with_prototypes=card["uses_prototypes"],
        agent_signals=card["agent_signals"],
    )
    assert model.predict_proba(X).shape == (1, len(model.classes_))


def test_extra_labels_need_transcripts_and_a_file(cli, tmp_path):
    res = cli("train", "--extra-labels", str(tmp_path / "x.csv"))
    assert res.exit_code == 2 and "--transcripts" in res.output
    with pytest.raises(LabeledDataError, match="extra labels"):
        train_from_conversations(Config(), tmp_path / "l.jsonl", tmp_path, extra_labels=tmp_path / "none.csv")
    # Named once in the config instead: read (and checked) the same way.
    c = Config().with_overrides(classify={"extra_labels": str(tmp_path / "none.csv")})
    with pytest.raises(LabeledDataError, match="none.csv"):
        train_from_conversations(c, tmp_path / "l.jsonl", tmp_path)
