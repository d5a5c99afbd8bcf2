import random

import pytest

from pipeline.mask import id_checksum_ok, luhn_ok
from pipeline.textprep import get_masker, prepare_text


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
