import random

import pytest

from pipeline.text.mask import id_checksum_ok, luhn_ok
from pipeline.text.prepare import get_masker, prepare_text


def make_id(rng: random.Random) -> str:
    body = f"{rng.randint(110000, 659000)}{rng.randint(1960, 2004)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return body + "10X98765432"[sum(int(c) * w for c, w in zip(body, weights)) % 11]


def make_card(rng: random.Random, n: int = 16) -> str:
    digits = [rng.randint(0, 9) for _ in range(n - 1)]
    for check in range(10):
        if luhn_ok("".join(map(str, digits + [check]))):
            return "".join(map(str, digits + [check]))
    raise AssertionError


def test_checksums():
    rng = random.Random(1)
    for _ in range(50):
        assert id_checksum_ok(make_id(rng))
        assert luhn_ok(make_card(rng, rng.choice([16, 19])))
    assert not id_checksum_ok("110105199003071235") or not id_checksum_ok("110105199003071234")


@pytest.mark.parametrize("text,expected", [
    ("我的手机是13812345678", "我的手机是<PHONE>"),
    ("电话 +86 138-1234-5678 联系我", "电话 <PHONE> 联系我"),
    ("座机010-12345678", "座机<PHONE>"),
    ("邮箱 zhang.wei@example.com 谢谢", "邮箱 <EMAIL> 谢谢"),
    ("我叫张伟，要退货", "我叫<NAME>,要退货"),
    ("李先生您好", "<NAME>先生您好"),
    ("这位先生您好", "这位先生您好"),
    ("收货地址是北京市朝阳区建国路88号院2号楼1单元501", "收货地址是<ADDRESS>"),
    ("送到广东省深圳市南山区科技园路88号3栋1202室吧", "送到<ADDRESS>吧"),
    ("订单号JD240901338812还没到", "订单号JD240901338812还没到"),
    ("微信号 abc_12345 加我", "微信号 <ACCOUNT> 加我"),
    ("[姓名x]您好，订单[订单x]已发货", "<NAME>您好,订单<ORDER>已发货"),
])
def test_mask_examples(cfg, text, expected):
    assert prepare_text(text, cfg) == expected


def test_ids_and_cards_by_checksum(cfg):
    rng = random.Random(7)
    pid, card = make_id(rng), make_card(rng)
    out = prepare_text(f"身份证{pid}，卡号{card[:4]} {card[4:8]} {card[8:12]} {card[12:]}", cfg)
    assert pid not in out and card[:4] not in out
    assert "<ID>" in out and "<CARD>" in out
    # a digit run that is neither (bad checksum, no cue) is left alone: it may be an order number
    assert prepare_text("单号 4000123412341234", cfg).endswith("4000123412341234") or not luhn_ok("4000123412341234")


def test_pii_recall_on_generated_positions(cfg):
    """Insert 400 known PII strings at random positions in filler text: all must be masked."""
    rng = random.Random(3)
    filler = ["你好", "我的快递还没到", "请帮我查一下", "麻烦了", "谢谢", "退款什么时候到账"]
    makers = {
        "phone": lambda: f"1{rng.choice('3456789')}{rng.randint(0, 999999999):09d}",
        "id": lambda: make_id(rng),
        "card": lambda: make_card(rng, rng.choice([16, 17, 18, 19])),
        "email": lambda: f"user{rng.randint(1, 9999)}@{rng.choice(['qq.com', '163.com', 'example.cn'])}",
    }
    masker = get_masker(cfg)
    missed = []
    for i in range(400):
        kind = list(makers)[i % 4]
        value = makers[kind]()
        text = rng.choice(filler) + rng.choice(["，", " ", "：", ""]) + value + rng.choice(["，", "。", " ", ""]) + rng.choice(filler)
        masked, counts = masker.mask(text)
        if value in masked:
            missed.append((kind, value, masked))
    assert not missed, missed[:5]


def test_original_text_masked_through_fold(cfg):
    masker = get_masker(cfg)
    out, counts = masker.mask_original("我叫陳大文，手機１３８１２３４５６７８，謝謝")
    assert out == "我叫<NAME>，手機<PHONE>，謝謝"  # Traditional and full-width kept, PII gone
    assert counts["phone"] == 1 and counts["name"] == 1


# -- real export forms (issue 12): each leaked in the tester's hand-written transcripts -----------

@pytest.mark.parametrize("text,expected", [
    # mobiles: 0086 / +86 prefixes, two numbers glued together, grouped digits
    ("电话0086 13912345678", "电话<PHONE>"),
    ("电话：0086-139-1234-5678", "电话:<PHONE>"),
    ("+8615012345678，打这个", "<PHONE>,打这个"),
    ("我两个号码1381234567813987654321", "我两个号码<PHONE><PHONE>"),
    ("13812345678 2号楼", "<PHONE> 2号楼"),
    # IDs and cards in any grouping, cards without a cue word
    ("身份证：110105 19880307 1232", "身份证:<ID>"),
    ("证件号440305-19920815-4318", "证件号<ID>"),
    ("退到6217-0012-3456-7890-122", "退到<CARD>"),
    ("6228 4800 1234 5678 911，农行的", "<CARD>,农行的"),
    # QQ / WeChat slang
    ("扣扣834729103，加我", "扣扣<ACCOUNT>,加我"),
    ("加我威信happy-2019", "加我威信<ACCOUNT>"),
    ("加v zhangwei88", "加v <ACCOUNT>"),
    ("wxid_k2m9x8p3q7r1", "<ACCOUNT>"),
    # the whole address tail, rural addresses without a cue
    ("送到重庆市渝北区龙湖春森彼岸19栋6单元302室", "送到<ADDRESS>"),
    ("万科城四期12栋2单元1801，放驿站", "<ADDRESS>,放驿站"),
    ("张湾村三组27号，放村委会门口", "<ADDRESS>,放村委会门口"),
    ("我家在曹县青岗集镇王堂村五组18号", "我家在<ADDRESS>"),
    # names: two-character given names before 先生/女士, and names without any cue word
    ("林志刚先生吗？这边是京东客服", "<NAME>先生吗?这边是京东客服"),
    ("您好诸葛亮亮先生", "您好<NAME>先生"),
    ("谢谢张先生", "谢谢<NAME>先生"),
    ("刘海涛 139 1234 5678", "<NAME> <PHONE>"),
    ("你好，我是赵春梅，昨天打过电话的", "你好,我是<NAME>,昨天打过电话的"),
    ("请问周子轩的包裹到了没有", "请问<NAME>的包裹到了没有"),
    ("麻烦转告冯凯，我明天再来", "麻烦转告<NAME>,我明天再来"),
    ("收件人改成蒋雯雯", "收件人改成<NAME>"),
    ("我姓韩，韩国的韩", "我姓<NAME>,韩国的韩"),
    ("王光明 13812345678", "<NAME> <PHONE>"),  # 光明 is a brand, but not where a name starts
    ("我很喜欢杨绛先生的书", "我很喜欢<NAME>先生的书"),  # a rare given-name character before a title
])
def test_real_export_forms_are_masked(cfg, text, expected):
    assert prepare_text(text, cfg) == expected


@pytest.mark.parametrize("text", [
    "订单号13812345678，怎么还没发货",          # an 11-digit order number is not a phone after its cue
    "单号17764398210，麻烦查一下",
    "订单编号4312988776655443322，退款¥1,299.00",
    "运单号SF1428347829384，显示9月12号已签收",
    "快递单号：773012345678901",
    "售后单号2109384756",
    "李宁的鞋码偏大吗",                       # brands and words that start with a surname
    "王老吉一箱48元，包邮吗",
    "周大福的金镯子2025年10月3日买的",
    "亲，小妹帮您看一下",
    "马上就要用了，方便的话加急",
    "黄金会员有京豆吗",
    "白条分期1999元怎么算",
    "高铁上不方便接电话",
    "我买的iPhone 15 Pro Max屏幕有问题",
    "美的KFR-35GW/N8XHC1空调不制冷",
    "升级到了vivo V2309A的新系统",
    "我住的房间临街，晚上比较吵",
    "9成新，2包沐浴露，高清80",
])
def test_must_keep_text_is_not_masked(cfg, text):
    masked = prepare_text(text, cfg)
    assert "<" not in masked, masked


def test_personal_cue_nearer_than_order_cue_wins(cfg):
    assert prepare_text("订单号和手机号：13812345678", cfg) == "订单号和手机号:<PHONE>"
    assert prepare_text("订单号JD240901338812，手机13812345678", cfg) == "订单号JD240901338812,手机<PHONE>"


def test_mask_original_keeps_full_width_and_traditional(cfg):
    out, counts = get_masker(cfg).mask_original("聯繫人：歐陽鋒，手機＋86 138 0013 8000")
    assert out == "聯繫人：<NAME>，手機<PHONE>"
    assert counts == {"name": 1, "phone": 1}


# -- the labelled PII sets and `casemine eval pii` ----------------------------------------------

def test_generated_set_is_deterministic_and_positions_hold():
    from pipeline.evaluate.pii_corpus import generate

    a, b = generate(400, seed=5), generate(400, seed=5)
    assert a == b and a != generate(400, seed=6)
    for ex in a:
        for m in ex.pii + ex.keep:
            assert ex.text[m.start:m.end] == m.text
    kinds = {m.kind for ex in a for m in ex.pii}
    assert kinds == {"name", "phone", "landline", "id", "card", "account", "email", "address"}


def test_marked_sentences_parse_to_offsets():
    from pipeline.evaluate.pii_corpus import parse_marked

    ex = parse_marked("我叫[[name:张伟]]，订单号[[order:JD123456789012]]")
    assert ex.text == "我叫张伟，订单号JD123456789012"
    assert [(m.start, m.end, m.kind) for m in ex.pii] == [(2, 4, "name")]
    assert [(m.start, m.end, m.kind) for m in ex.keep] == [(8, 22, "order")]
    with pytest.raises(ValueError):
        parse_marked("[[nickname:阿伟]]")


def test_generated_set_meets_the_targets(cfg):
    """The bar of issue 12: every kind at recall >= 0.95 (names >= 0.90), must-keep >= 0.98."""
    from pipeline.evaluate.pii import evaluate_pii

    g = evaluate_pii(cfg, n=3000, seed=12)["generated"]
    for kind, v in g["recall"].items():
        assert v["recall"] >= (0.90 if kind == "name" else 0.95), (kind, v, g["missed"][:5])
    assert g["keep_precision"] >= 0.98, g["overmasked"][:5]
    assert g["recall"]["name"]["recall"] >= 0.95  # measured 0.980; a drop means a regression
    assert g["span_precision"] >= 0.98, g["stray_spans"][:5]
    assert g["meets_targets"]


def test_handwritten_set(cfg):
    """Sentences written like a tester's, not by the generator: nothing may be lost here either."""
    from pipeline.evaluate.pii import evaluate_pii

    h = evaluate_pii(cfg, n=10)["handwritten"]
    assert h["n"] >= 100
    assert h["recall_all"] >= 0.97, h["missed"]
    assert all(v["recall"] >= 0.9 for v in h["recall"].values()), h["missed"]
    assert h["keep_precision"] == 1.0, h["overmasked"]


def test_evaluation_tells_a_weak_masker_from_a_good_one():
    """The evaluation can tell a weak masker from a good one: without names, addresses and grouped
    numbers the same sets score far lower."""
    from pipeline.evaluate.pii import score
    from pipeline.text.mask import Masker
    from pipeline.evaluate.pii_corpus import generate

    bare = Masker(frozenset(), mask_addresses=False, mask_names=False)
    g = score(bare, generate(600, seed=3))
    assert g["recall"]["name"]["recall"] == 0.0 and g["recall"]["address"]["recall"] == 0.0
    assert g["recall"]["phone"]["recall"] >= 0.95 and g["keep_precision"] >= 0.98


def test_cli_eval_pii_json(cfg):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import _register, app

    _register()
    r = CliRunner().invoke(app, ["eval", "pii", "--n", "300", "--json", "--check"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(report) == {"generated", "handwritten", "targets"}
    assert report["generated"]["n"] == 300 and report["generated"]["meets_targets"]
