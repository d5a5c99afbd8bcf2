from pipeline.text.segment import Segmenter


def test_domain_words_and_placeholders(cfg):
    seg = Segmenter(cfg)
    toks = seg.cut("我要七天无理由退货，电话<PHONE>，开增值税发票")
    assert "七天无理由退货" in toks and "<PHONE>" in toks and "增值税发票" in toks
    assert "我" not in toks and "，" not in toks  # stop words and punctuation out


def test_cut_many_parallel_equals_serial(cfg):
    seg = Segmenter(cfg.with_overrides(segment={"parallel_min_texts": 10}))
    texts = ["快递三天没到，物流不更新", "手机屏幕碎了要换货", "发票抬头开错了"] * 20
    assert seg.cut_many(texts, processes=2) == [seg.cut(t) for t in texts]


def test_keywords_rank_topic_words(cfg):
    seg = Segmenter(cfg)
    kw = seg.keywords(seg.cut("我的快递三天了还没到，物流信息一直不更新，快递员电话也打不通，快递到底在哪"))
    assert kw[0] == "快递" and "物流信息" in kw
