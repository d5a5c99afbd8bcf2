from pipeline.config import NormalizeConfig
from pipeline.text.normalize import Normalizer, collapse_repeats, strip_invisible
from pipeline.text.prepare import get_normalizer


def test_width_folding_and_traditional(cfg):
    n = get_normalizer(cfg)
    assert n.normalize("請問我的訂單１２３怎麼還沒發貨？") == "请问我的订单123怎么还没发货?"


def test_invisible_and_bidi_marks_removed(cfg):
    n = get_normalizer(cfg)
    assert n.normalize("快\u200b递\u200f没\u202e到\ufeff") == "快递没到"
    assert strip_invisible("a\x00b\x07c") == "abc"


def test_emoji_flood_and_repeats_bounded(cfg):
    n = get_normalizer(cfg)
    out = n.normalize("太慢了😡😡😡😡" * 3 + "！" * 50)
    assert "😡" not in out and out.endswith("!!!") and "!!!!" not in out
    assert collapse_repeats("？？？？？？", 3) == "？？？"


def test_asr_fillers_and_homophones(cfg):
    n = get_normalizer(cfg)
    assert n.normalize("嗯那个就是说我的快第三天了还没到啊", asr=True) == "我的快递三天了还没到"
    # a demonstrative in the middle of a sentence is content, not a filler
    assert n.normalize("我想问那个订单退宽的事", asr=True) == "我想问那个订单退款的事"
    # chat text keeps 嗯 (it may be the customer's whole answer)
    assert n.normalize("嗯嗯", asr=False) == "嗯嗯"


def test_cjk_spacing_collapsed():
    n = Normalizer(NormalizeConfig(traditional_to_simplified=False))
    assert n.normalize("我 的  快递   没到 ok  good") == "我的快递没到 ok good"
