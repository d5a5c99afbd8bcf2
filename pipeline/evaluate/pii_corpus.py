"""A labelled PII set for measuring the masker: generated sentences plus a hand-written set.

Every example is a customer-service sentence whose personal data (to be masked) and must-keep
items (order and tracking numbers, amounts, dates, models, brands, everyday words that look like
names) sit at known positions. Both sets are written in one markup, `[[kind:value]]`, parsed into
character offsets, so a template and a hand-written sentence are read the same way.

The generator is seeded and draws the real-export forms the masker has to cope with: names with and
without cue words, IDs and cards in any grouping, `+86` / `0086` and glued mobiles, 扣扣 and 微信
variants, whole address tails and rural addresses, and order numbers that look like phones or
cards. The hand-written set uses different sentences (written as a tester would), so the figures
are not only the generator measured against itself.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

PII_KINDS: tuple[str, ...] = ("name", "phone", "landline", "id", "card", "account", "email", "address")
KEEP_KINDS: tuple[str, ...] = ("order", "tracking", "amount", "date", "model", "brand", "word")

_MARK_RE = re.compile(r"\[\[([a-z]+):(.+?)\]\]")


@dataclass(frozen=True)
class Mark:
    start: int
    end: int
    kind: str
    text: str


@dataclass(frozen=True)
class Example:
    text: str
    pii: tuple[Mark, ...]
    keep: tuple[Mark, ...]
    source: str = ""


def parse_marked(marked: str, source: str = "") -> Example:
    """`我叫[[name:张伟]]` -> text 我叫张伟 with a name at 2..4."""
    out: list[str] = []
    pii: list[Mark] = []
    keep: list[Mark] = []
    pos = 0
    length = 0
    for m in _MARK_RE.finditer(marked):
        out.append(marked[pos : m.start()])
        length += m.start() - pos
        kind, value = m.group(1), m.group(2)
        if kind not in PII_KINDS and kind not in KEEP_KINDS:
            raise ValueError(f"unknown kind {kind!r} in {marked!r}")
        (pii if kind in PII_KINDS else keep).append(Mark(length, length + len(value), kind, value))
        out.append(value)
        length += len(value)
        pos = m.end()
    out.append(marked[pos:])
    return Example("".join(out), tuple(pii), tuple(keep), source)


# -- value makers ----------------------------------------------------------------------------

# Surnames weighted roughly by population share (the top 20 cover about half of all people);
# the generator has its own list so the masker's configs/surnames.txt is not graded by itself.
_SURNAMES_TOP = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林高罗"
_SURNAMES_MID = (
    "郑梁谢宋唐许邓冯韩曹曾彭萧蔡潘田董袁于余叶蒋杜苏魏程吕丁沈任姚卢傅钟姜崔谭廖范汪陆金石戴贾韦"
    "夏邱方侯邹熊孟秦白江阎薛尹段雷黎史龙陶贺顾毛郝龚邵万钱严赖覃洪武莫孔汤向常温康施文牛樊葛邢"
    "安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒阮柯纪梅童凌毕单季裴霍涂成"
    "苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农司卓古吉缪简车项连芦麦褚娄"
    "窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁沙荣巫寇桑郎甄丛仲虞敖巩"
    "明佘池乜花郁谈"
)
_SURNAMES_COMPOUND = (
    "欧阳",
    "司马",
    "诸葛",
    "上官",
    "东方",
    "皇甫",
    "慕容",
    "令狐",
    "尉迟",
    "公孙",
    "司徒",
    "夏侯",
    "端木",
    "南宫",
    "长孙",
    "宇文",
    "独孤",
    "西门",
)
_GIVEN = (
    "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍红鹏飞建文辉宇浩凯俊帆峰亮晨阳婷雪琳颖倩"
    "慧琪欣怡佳思雨涵梓轩睿博文泽昊然一可心嘉悦彤萱诗瑶璐丹宁斌波林松柏海东晓志永春秋冬梅菊莲凤燕"
    "荣福贵德成光新国庆宏伦龙虎豪振威德奇文武清源远航舟翔鸣鑫淼森林晶莹琴瑞祥云霖露蕾薇蓉茜婧媛"
    "妍雯岚琦晗昕宸逸铭哲楠柯沛茂坤钰铮锋瑾瑜璇玲珊娅娴淑贤雅静君"
)
_GIVEN_DOUBLE_SHARE = 0.7


def _name(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.05:
        surname = rng.choice(_SURNAMES_COMPOUND)
    elif r < 0.55:
        surname = rng.choice(_SURNAMES_TOP)
    else:
        surname = rng.choice(_SURNAMES_MID)
    given = rng.choice(_GIVEN) + (rng.choice(_GIVEN) if rng.random() < _GIVEN_DOUBLE_SHARE else "")
    return surname + given


_MOBILE_PREFIXES = (
    "130",
    "131",
    "132",
    "133",
    "134",
    "135",
    "136",
    "137",
    "138",
    "139",
    "145",
    "147",
    "150",
    "151",
    "152",
    "153",
    "155",
    "156",
    "157",
    "158",
    "159",
    "166",
    "171",
    "173",
    "175",
    "176",
    "177",
    "178",
    "180",
    "181",
    "182",
    "183",
    "185",
    "186",
    "187",
    "188",
    "189",
    "191",
    "193",
    "195",
    "198",
    "199",
)


def _digits(rng: random.Random, k: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(k))


def _mobile_digits(rng: random.Random) -> str:
    return rng.choice(_MOBILE_PREFIXES) + _digits(rng, 8)


def _phone(rng: random.Random) -> str:
    d = _mobile_digits(rng)
    style = rng.choice(
        (
            "plain",
            "plain",
            "plain",
            "space344",
            "dash344",
            "+86",
            "+86 ",
            "0086",
            "0086 ",
            "+86-",
            "86-",
            "glued",
            "space434",
        )
    )
    if style == "space344":
        return f"{d[:3]} {d[3:7]} {d[7:]}"
    if style == "dash344":
        return f"{d[:3]}-{d[3:7]}-{d[7:]}"
    if style == "space434":
        return f"{d[:4]} {d[4:7]} {d[7:]}"
    if style in ("+86", "+86 ", "0086", "0086 ", "+86-", "86-"):
        return style + (d if rng.random() < 0.7 else f"{d[:3]} {d[3:7]} {d[7:]}")
    if style == "glued":
        return d + _mobile_digits(rng)  # two numbers typed without a separator
    return d


_LANDLINE_AREAS = (
    ("010", 8),
    ("021", 8),
    ("020", 8),
    ("022", 8),
    ("023", 8),
    ("0755", 8),
    ("0571", 8),
    ("028", 8),
    ("027", 8),
    ("029", 8),
    ("0731", 7),
    ("0871", 7),
    ("0512", 8),
    ("0532", 8),
)


def _landline(rng: random.Random) -> str:
    area, n = rng.choice(_LANDLINE_AREAS)
    local = str(rng.randint(2, 8)) + _digits(rng, n - 1)
    style = rng.choice(("dash", "plain", "space", "paren", "ext"))
    if style == "dash":
        return f"{area}-{local}"
    if style == "space":
        return f"{area} {local}"
    if style == "paren":
        return f"({area}){local}"
    if style == "ext":
        return f"{area}-{local}-{rng.randint(1, 9999)}"
    return area + local


_ID_AREAS = (
    "110101",
    "110105",
    "310104",
    "310115",
    "440305",
    "440106",
    "330106",
    "320106",
    "510107",
    "500112",
    "420111",
    "430104",
    "610113",
    "210102",
    "230103",
    "370202",
    "350203",
    "410105",
    "120104",
    "130102",
    "522601",
    "452122",
    "640104",
    "150102",
)


def id_check_char(body17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(c) * w for c, w in zip(body17, weights)) % 11]


def _id_number(rng: random.Random) -> str:
    body = (
        rng.choice(_ID_AREAS)
        + str(rng.randint(1950, 2006))
        + f"{rng.randint(1, 12):02d}"
        + f"{rng.randint(1, 28):02d}"
        + _digits(rng, 3)
    )
    pid = body + id_check_char(body)
    if pid.endswith("X") and rng.random() < 0.4:
        pid = pid[:-1] + "x"
    style = rng.choice(("plain", "plain", "space684", "dash684", "space6444"))
    if style == "space684":
        return f"{pid[:6]} {pid[6:14]} {pid[14:]}"
    if style == "dash684":
        return f"{pid[:6]}-{pid[6:14]}-{pid[14:]}"
    if style == "space6444":
        return f"{pid[:6]} {pid[6:10]} {pid[10:14]} {pid[14:]}"
    return pid


def luhn_check_digit(payload: str) -> str:
    total = 0
    for i, c in enumerate(reversed(payload)):
        d = int(c)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


_CARD_PREFIXES = (
    ("622202", 19),
    ("622848", 19),
    ("621700", 19),
    ("622588", 16),
    ("436742", 16),
    ("625911", 16),
    ("622609", 16),
    ("621226", 19),
    ("623058", 19),
    ("518710", 16),
    ("603367", 19),
    ("622760", 19),
)


def _card(rng: random.Random) -> str:
    prefix, n = rng.choice(_CARD_PREFIXES)
    payload = prefix + _digits(rng, n - len(prefix) - 1)
    num = payload + luhn_check_digit(payload)
    style = rng.choice(("plain", "space4", "dash4", "space4", "dash4", "space6"))
    if style in ("space4", "dash4"):
        sep = " " if style == "space4" else "-"
        return sep.join(num[i : i + 4] for i in range(0, len(num), 4))
    if style == "space6":
        return f"{num[:6]} {num[6:]}"
    return num


_WX_WORDS = (
    "zhangwei",
    "lily",
    "xiaoyu",
    "sunny",
    "wang_fang",
    "tom",
    "amy",
    "kevin",
    "liuyang",
    "happy",
    "chen",
    "summer",
    "mia",
    "jack",
    "huahua",
    "dabao",
)


def _qq(rng: random.Random) -> str:
    return str(rng.randint(1, 9)) + _digits(rng, rng.randint(5, 10))


def _wechat(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.2:
        return _mobile_digits(rng)
    if r < 0.35:
        return "wxid_" + "".join(rng.choice("abcdefghijkmnpqrstuvwxyz0123456789") for _ in range(12))
    # WeChat ids are 6-20 characters starting with a letter.
    sep = rng.choice(("", "_", "-", ""))
    return rng.choice(_WX_WORDS) + sep + str(rng.randint(10, 2025))


def _email(rng: random.Random) -> str:
    user = rng.choice(_WX_WORDS).replace("_", ".") + str(rng.randint(1, 999))
    if rng.random() < 0.3:
        user = str(rng.randint(10000, 999999999))
    return (
        f"{user}@{rng.choice(('qq.com', '163.com', '126.com', 'sina.com', 'foxmail.com', 'gmail.com', 'outlook.com'))}"
    )


_PLACES = (
    ("北京市", "", ("朝阳区", "海淀区", "丰台区", "通州区", "昌平区")),
    ("上海市", "", ("浦东新区", "闵行区", "徐汇区", "宝山区")),
    ("广东省", "深圳市", ("南山区", "宝安区", "龙岗区", "福田区")),
    ("广东省", "广州市", ("天河区", "白云区", "番禺区")),
    ("浙江省", "杭州市", ("西湖区", "余杭区", "萧山区")),
    ("江苏省", "南京市", ("鼓楼区", "江宁区", "玄武区")),
    ("四川省", "成都市", ("武侯区", "高新区", "双流区")),
    ("重庆市", "", ("渝北区", "江北区", "九龙坡区")),
    ("湖北省", "武汉市", ("洪山区", "江汉区", "武昌区")),
    ("陕西省", "西安市", ("雁塔区", "未央区", "长安区")),
    ("山东省", "青岛市", ("市南区", "黄岛区", "崂山区")),
    ("河南省", "郑州市", ("金水区", "二七区", "中原区")),
)
_STREETS = (
    "建国路",
    "人民路",
    "解放大道",
    "中山东路",
    "科技园路",
    "长江路",
    "文化街",
    "学府路",
    "新华路",
    "滨江大道",
    "和平街",
    "光明路",
    "金沙江路",
    "天府大道",
    "幸福路",
    "东三环北路",
)
_ESTATES = (
    "龙湖春森彼岸",
    "万科城",
    "碧桂园凤凰城",
    "保利香槟国际",
    "恒大绿洲",
    "融创玖玺台",
    "中海国际社区",
    "绿地世纪城",
    "金地格林小镇",
    "华润二十四城",
    "世茂滨江花园",
    "远洋天地",
    "翠湖天地",
    "幸福里小区",
    "阳光花园",
    "望京西园",
    "天通苑北一区",
    "金色家园",
    "锦绣江南",
    "紫荆公寓",
    "东方明珠大厦",
    "梧桐苑",
    "和谐家园",
    "新城国际",
    "御景湾",
    "蓝湾半岛",
    "春江花月",
    "枫林绿洲",
    "丽都花园",
    "书香门第",
)
_NUMS_CN = "一二三四五六七八九十"
_VILLAGES = ("李家", "王庄", "大河", "石桥", "柳树", "张湾", "新河", "东坡", "马集", "杨柳", "西关", "黄泥")
_TOWNS = ("城关", "太平", "新集", "长乐", "白马", "清河", "永安", "龙泉")
_COUNTIES = ("临泉县", "沭阳县", "固始县", "曹县", "桃源县", "巨野县", "宁乡县", "丰县")


def _building_tail(rng: random.Random) -> str:
    b, u, r = rng.randint(1, 32), rng.randint(1, 8), rng.randint(1, 33) * 100 + rng.randint(1, 6)
    style = rng.choice(("栋单元室", "号楼单元", "栋单元", "幢室", "座", "号楼单元室", "栋-室"))
    if style == "栋单元室":
        return f"{b}栋{u}单元{r}室"
    if style == "号楼单元":
        return f"{b}号楼{u}单元{r}"
    if style == "栋单元":
        return f"{b}栋{u}单元{r}"
    if style == "幢室":
        return f"{b}幢{r}室"
    if style == "座":
        return f"{rng.choice('ABCDE')}座{r}"
    if style == "栋-室":
        return f"{b}栋{u}-{r}"
    return f"{b}号楼{u}单元{r}室"


def _address(rng: random.Random) -> str:
    prov, city, districts = rng.choice(_PLACES)
    district = rng.choice(districts)
    street = f"{rng.choice(_STREETS)}{rng.randint(1, 999)}号"
    estate, tail = rng.choice(_ESTATES), _building_tail(rng)
    style = rng.choice(
        (
            "full",
            "full",
            "no_prov",
            "district_estate",
            "estate_only",
            "street_only",
            "rural",
            "rural_short",
            "district_street_estate",
        )
    )
    if style == "full":
        return prov + city + district + street + estate + tail
    if style == "no_prov":
        return (city or prov) + district + estate + tail
    if style == "district_estate":
        return district + estate + tail
    if style == "district_street_estate":
        return district + street + estate + tail
    if style == "estate_only":
        return estate + tail
    if style == "street_only":
        return (city or prov) + district + street
    group = f"{rng.choice(_NUMS_CN)}组" if rng.random() < 0.7 else f"{rng.randint(1, 12)}组"
    house = f"{rng.randint(1, 99)}号"
    if style == "rural":
        return f"{rng.choice(_COUNTIES)}{rng.choice(_TOWNS)}镇{rng.choice(_VILLAGES)}村{group}{house}"
    return f"{rng.choice(_VILLAGES)}村{group}{house}"


# -- must-keep makers ------------------------------------------------------------------------


def _order(rng: random.Random) -> str:
    style = rng.choice(("jd", "digits12", "phone_like", "taobao19", "digits18", "digits16"))
    if style == "jd":
        return "JD" + _digits(rng, 12)
    if style == "digits12":
        return str(rng.randint(1, 9)) + _digits(rng, 11)
    if style == "phone_like":
        return _mobile_digits(rng)  # 11 digits starting 1[3-9]: the shape the old masker took for a phone
    if style == "taobao19":
        return str(rng.randint(1, 4)) + _digits(rng, 18)
    if style == "digits16":  # sometimes passes Luhn: must still stay after its cue
        payload = "6" + _digits(rng, 14)
        return payload + luhn_check_digit(payload)
    body = rng.choice(_ID_AREAS) + "2025" + f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}" + _digits(rng, 3)
    return body + id_check_char(body)  # an 18-digit number whose checksum holds


def _tracking(rng: random.Random) -> str:
    style = rng.choice(("SF", "YT", "JDV", "zto", "yunda", "ems"))
    if style == "SF":
        return "SF" + _digits(rng, 13)
    if style == "YT":
        return "YT" + _digits(rng, 13)
    if style == "JDV":
        return "JDVA" + _digits(rng, 11)
    if style == "zto":
        return "7" + _digits(rng, 13)
    if style == "yunda":
        return "43" + _digits(rng, 11)
    return "9" + _digits(rng, 12)


def _amount(rng: random.Random) -> str:
    v = rng.choice((rng.randint(5, 999), rng.randint(1000, 19999), round(rng.uniform(1, 999), 2)))
    style = rng.choice(("元", "块", "¥", "¥,", "元整"))
    if style == "¥":
        return f"¥{v}"
    if style == "¥,":
        return f"¥{v:,}"
    return f"{v}{style}"


def _date(rng: random.Random) -> str:
    y, m, d = rng.choice((2024, 2025, 2026)), rng.randint(1, 12), rng.randint(1, 28)
    style = rng.choice(("iso", "cn", "md", "slash", "dot", "time"))
    if style == "iso":
        return f"{y}-{m:02d}-{d:02d}"
    if style == "cn":
        return f"{y}年{m}月{d}日"
    if style == "md":
        return f"{m}月{d}号"
    if style == "slash":
        return f"{y}/{m:02d}/{d:02d}"
    if style == "dot":
        return f"{m}.{d}"
    return f"{y}-{m:02d}-{d:02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"


_MODELS = (
    "iPhone 15 Pro Max",
    "Mate 60 Pro",
    "小米14",
    "Redmi K70",
    "EG100MATE35S",
    "KFR-35GW/N8XHC1",
    "RTX 4060",
    "AirPods Pro 2",
    "ThinkPad X1 Carbon",
    "BCD-470WDPG",
    "P50",
    "nova 12",
    "iPad Air 5",
    "MX Master 3S",
    "XQ-86X85J",
    "JSQ30-16WH5D",
    "G7 Plus",
    "荣耀90",
    "OPPO Reno11",
    "vivo X100",
    "Z9 Turbo",
    "S7-5000",
)
_BRANDS = (
    "华为",
    "小米",
    "海尔",
    "美的",
    "格力",
    "李宁",
    "王老吉",
    "周大福",
    "江小白",
    "方太",
    "安踏",
    "百雀羚",
    "周黑鸭",
    "马应龙",
    "金龙鱼",
    "白象",
    "老板电器",
    "苏泊尔",
    "九阳",
    "飞利浦",
    "戴森",
    "雷蛇",
    "罗技",
    "周生生",
    "康师傅",
    "娃哈哈",
    "陈克明",
    "童年时光",
    "黄天鹅",
)
_WORDS = (
    "小妹",
    "亲",
    "客服",
    "京东",
    "马上",
    "方便",
    "周末",
    "高兴",
    "黄金会员",
    "白条",
    "京豆",
    "白色",
    "金额",
    "万一",
    "于是",
    "常温",
    "师傅",
    "快递小哥",
    "高铁",
    "石头",
    "毛巾",
    "严重",
    "程序",
    "何时",
    "龙虾",
    "包邮",
    "安装师傅",
    "宋体",
    "林子",
    "钱包",
    "孙子",
    "朱红色",
    "陆续",
    "江湖",
    "雷同",
    "谢谢",
    "黄色",
    "陈列",
    "高端",
    "张贴",
    "许可",
    "杨梅",
    "胡萝卜",
    "余额",
    "叶子",
    "汪汪",
    "田园",
    "董事长",
    "袁大头",
    "潘多拉",
)

_QQ_CUES = ("QQ", "qq", "QQ号", "扣扣", "扣扣号", "企鹅号", "Q号", "qq号码是")
_WX_CUES = ("微信", "微信号", "vx", "VX", "wx", "V信", "威信", "薇信", "微信号是", "v", "加v")

MAKERS: dict[str, Callable[[random.Random], str]] = {
    "name": _name,
    "phone": _phone,
    "landline": _landline,
    "id": _id_number,
    "card": _card,
    "qq": _qq,
    "wechat": _wechat,
    "email": _email,
    "address": _address,
    "order": _order,
    "tracking": _tracking,
    "amount": _amount,
    "date": _date,
    "model": lambda r: r.choice(_MODELS),
    "brand": lambda r: r.choice(_BRANDS),
    "word": lambda r: r.choice(_WORDS),
}
# Slot -> labelled kind; cue slots are plain text drawn at random.
_SLOT_KIND = {"qq": "account", "wechat": "account"}
_CUES = {
    "qqcue": _QQ_CUES,
    "wxcue": _WX_CUES,
    "ordercue": ("订单号", "订单号是", "单号：", "订单编号", "订单号:", "订单", "售后单号", "服务单号"),
    "trackcue": ("运单号", "快递单号", "物流单号", "运单号是", "快递单号:", "单号"),
}

# Realistic turns; {slot} is a value, [[word:...]] marks a fixed must-keep word.
TEMPLATES: tuple[str, ...] = (
    # names without any cue word
    "{name} {phone} {address}",
    "{name}，{phone}，{address}",
    "收货信息：{name} {phone}",
    "我是{name}，{date}买的{model}还没发货",
    "{name}",
    "{name}，{phone}",
    "帮我查一下{name}的快递到哪了",
    "东西是给{name}买的，{brand}的{model}",
    "麻烦让{name}给我回个电话，{phone}",
    "[[word:快递小哥]]说放到{name}家门口了，我没看到",
    "上次是{name}帮我处理的，说{date}之前退款{amount}",
    "我老公{name}在家，直接送过去就行",
    "签收的是{name}，不是我本人签的",
    "是{name}下的单，{ordercue}{order}",
    "这个{brand}的{model}是帮{name}买的，[[word:亲]]能开发票吗",
    "找一下{name}，他说好今天给我回电话",
    "{name}的身份证{id}",
    "我朋友{name}也买了，[[word:马上]]要用",
    "跟{name}说了好几次了，还是没人管",
    "写的是{name}，电话{phone}，[[word:方便]]的话下午送",
    # names after cues and before 先生/女士
    "我叫{name}，{ordercue}{order}",
    "收件人{name}，电话{phone}",
    "收货人：{name}，{address}",
    "联系人是{name}，{landline}",
    "{name}先生您好，您的{brand}{model}已经出库了",
    "好的{name}女士，[[word:小妹]]这边给您登记一下",
    "{name}女士，您申请的{amount}退款已经原路返回",
    "您好{name}先生，{trackcue}{tracking}，请注意查收",
    "持卡人{name}，卡号{card}",
    # phones
    "我的手机号是{phone}，有事打这个",
    "电话{phone}，打不通就发短信",
    "联系方式{phone}，[[word:周末]]也可以打",
    "号码是{phone}，{name}",
    "你们打这个{phone}或者{phone}都行",
    "{phone}这是我的号码，[[word:客服]]记一下",
    "打我老婆电话吧{phone}",
    "手机{phone}，{ordercue}{order}，麻烦尽快处理",
    "{ordercue}{order}，手机号{phone}",
    "座机{landline}，白天有人",
    "公司电话{landline}，找前台就行",
    # IDs
    "身份证号{id}，你们核对一下",
    "证件号码是{id}",
    "实名信息：{name} {id}",
    "我的身份证{id}，开发票要用",
    "{id}，这是我身份证",
    # cards
    "退款打到我卡上吧，卡号{card}",
    "银行卡{card}，户名{name}",
    "{card}，这张卡能退吗",
    "钱退到{card}这张卡就行，[[word:谢谢]]",
    "我用尾号不对的卡付的，完整卡号{card}",
    "退到这个账户{card}",
    # accounts
    "加我{qqcue}{qq}，图片发你",
    "{qqcue}：{qq}",
    "我{qqcue}是{qq}，你加一下",
    "加{wxcue}{wechat}吧，{brand}的发票发我",
    "{wxcue}：{wechat}",
    "我的{wxcue}是{wechat}，[[word:亲]]加我发视频",
    "你加我{wxcue} {wechat}，我把照片发你",
    # e-mail
    "电子发票发到{email}，谢谢",
    "邮箱{email}",
    "发我邮箱吧{email}，{brand}那张发票也一起",
    # addresses
    "收货地址是{address}",
    "地址：{address}，{name}，{phone}",
    "送到{address}吧，[[word:白天]]家里有人",
    "我住{address}，你们[[word:安装师傅]]什么时候来",
    "改一下地址，{address}",
    "{address}，放门口就行",
    "寄到{address}，收件人{name}",
    "地址写错了，应该是{address}",
    # must-keep heavy
    "{trackcue}{tracking}，已经{date}显示签收了",
    "{ordercue}{order}，实付{amount}，{date}下的单",
    "[[word:京东]]{ordercue}{order}，{brand}{model}，降价了能保价吗",
    "[[word:黄金会员]]还能用[[word:白条]]吗，{model}多少钱",
    "[[word:小妹]]，{ordercue}{order}，退款{amount}什么时候到",
    "{brand}的{model}[[word:白色]]还有货吗",
    "{ordercue}{order}[[word:马上]]就到了吗",
    "我{date}买的{brand}{model}，[[word:严重]]质量问题",
)


def _fill(template: str, rng: random.Random) -> str:
    def sub(m: re.Match) -> str:
        slot = m.group(1)
        if slot in _CUES:
            return rng.choice(_CUES[slot])
        return f"[[{_SLOT_KIND.get(slot, slot)}:{MAKERS[slot](rng)}]]"

    return re.sub(r"\{(\w+)\}", sub, template)


def generate(n: int = 3000, seed: int = 12) -> list[Example]:
    """`n` labelled sentences, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)] if i < len(TEMPLATES) else rng.choice(TEMPLATES)
        out.append(parse_marked(_fill(template, rng), source=template))
    return out


# -- the hand-written set ---------------------------------------------------------------------

# Written one by one in the forms a tester copies from real exports; none of these sentences is a
# generator template. Brands and words that look like names are marked must-keep on purpose.
HANDWRITTEN: tuple[str, ...] = (
    "[[name:刘海涛]] [[phone:139 1234 5678]]",
    "[[name:孙丽]]  [[phone:15801234567]]  [[address:江苏省南京市江宁区双龙大道1222号]]",
    "你好，我是[[name:赵春梅]]，昨天打过电话的",
    "请问[[name:周子轩]]的包裹到了没有",
    "给我妈[[name:黄秀英]]寄的，她不会用手机",
    "[[name:欧阳娜娜]]",
    "就是[[name:郭建军]]，您再查查",
    "[[name:马丽娟]]的单子，[[order:JD258841203391]]这个",
    "[[name:林志刚]]先生吗？这边是[[word:京东]][[word:客服]]",
    "[[name:宋晓燕]]女士您好，您的退款[[amount:86.5元]]已到账",
    "您好[[name:诸葛亮亮]]先生",
    "[[name:唐一鸣]]老师让我来问的",
    "叫[[name:吴彤]]，口天吴",
    "麻烦转告[[name:冯凯]]，我[[date:明天下午]]再来",
    "快递员[[name:曹宇]]态度太差了",
    "收件人改成[[name:蒋雯雯]]",
    "我姓[[name:韩]]，韩国的韩",
    "手机[[phone:+86 186 0123 4567]]",
    "电话：[[phone:0086-13912345678]]",
    "[[phone:+8615012345678]]，打这个",
    "我两个号码[[phone:1381234567813987654321]]",
    "号码[[phone:177-0123-4567]]，微信同号",
    "[[phone:18612345678]]/[[phone:13512345678]]都可以",
    "订单号[[order:13812345678]]，怎么还没发货",
    "单号[[order:17764398210]]，麻烦查一下",
    "运单号[[tracking:SF1428347829384]]，显示[[date:9月12号]]已签收",
    "快递单号：[[tracking:773012345678901]]",
    "订单编号[[order:4312988776655443322]]，退款[[amount:¥1,299.00]]",
    "身份证：[[id:110105 19880307 1232]]",
    "证件号[[id:440305-19920815-4318]]",
    "身份证号码[[id:51010719850101001x]]，核对一下",
    "卡号[[card:6222-0212-3456-7890-128]]",
    "[[card:6228 4800 1234 5678 911]]，农行的",
    "退到[[card:6217-0012-3456-7890-122]]",
    "我的工行卡[[card:6222021234567894]]",
    "扣扣[[account:834729103]]，加我",
    "加下我扣扣号：[[account:20598871]]",
    "我扣扣是[[account:1378899201]]，在线",
    "微信号：[[account:lily_0523]]，截图发你",
    "V信[[account:wxid_k2m9x8p3q7r1]]",
    "加我威信[[account:happy-2019]]",
    "邮箱是[[email:zhao.chunmei@163.com]]",
    "[[email:83726151@qq.com]]，发票发这里",
    "座机[[landline:(021)64381234]]",
    "[[landline:0755-26881234-8012]]，转分机",
    "地址[[address:北京市朝阳区建国路88号院2号楼1单元501]]",
    "送到[[address:重庆市渝北区龙湖春森彼岸19栋6单元302室]]",
    "我家在[[address:曹县青岗集镇王堂村五组18号]]，快递能到吗",
    "[[address:张湾村三组27号]]，放村委会门口",
    "地址是[[address:杭州市余杭区五常街道西溪花园23幢1单元402室]]，[[name:沈佳琪]]收",
    "住[[address:成都市高新区天府三街199号太平洋保险金融大厦A座1608]]",
    "[[address:深圳市南山区科技园路88号3栋1202室]]，找前台",
    "[[address:万科城四期12栋2单元1801]]，放驿站",
    "就在[[address:翠湖天地8号楼3单元602]]",
    # must-keep only
    "[[word:亲]]，[[word:小妹]]帮您看一下",
    "[[brand:李宁]]的鞋码偏大吗",
    "[[brand:王老吉]]一箱[[amount:48元]]，[[word:包邮]]吗",
    "[[brand:周大福]]的金镯子[[date:2025年10月3日]]买的",
    "[[brand:江小白]]是不是假货",
    "[[model:Mate 60 Pro]]什么时候有货",
    "我买的[[model:iPhone 15 Pro Max]]屏幕有问题",
    "[[word:马上]]就要用了，[[word:方便]]的话加急",
    "[[word:黄金会员]]有[[word:京豆]]吗",
    "[[word:白条]]分期[[amount:1999元]]怎么算",
    "[[word:高铁]]上不方便接电话",
    "[[word:周末]]能送吗，[[word:工作日]]没人",
    "[[model:EG100MATE35S]]洗衣机漏水",
    "[[word:师傅]]说[[date:周三]]来装",
    "我[[date:2025-09-01]]下的单，到现在[[word:严重]]超时",
    "[[word:客服]]小王说会回电的",
    "[[brand:方太]]油烟机[[model:CXW-358-EMD1T]]",
    "[[word:石头]]扫地机是你们家的吗",
    "物流单号[[tracking:JDVA23812345678]]",
    "售后单号[[order:2109384756]]",
    "[[word:余额]]不足，用[[word:白条]]付了[[amount:¥268]]",
    # a second batch, written after the masker was tuned on everything above (held out)
    "刚才那个叫[[name:周婷]]的客服挂我电话",
    "我姐[[name:吴敏敏]]下的单，她让我来问",
    "找你们的[[name:罗建平]]经理，他知道这个事",
    "收件：[[name:胡静]] [[phone:158 0012 3456]]",
    "收件人姓名 [[name:唐悦]]",
    "联系人：[[name:欧阳锋]]，[[phone:０１０－８２３４５６７８]]",
    "手机：[[phone:１５９１２３４５６７８]]",
    "[[phone:＋86 138 0013 8000]]是我老公的",
    "请[[name:杨帆]]本人带身份证来取",
    "[[name:钟晓明]]，[[address:广州市天河区天河北路233号中信广场5108]]",
    "寄到：[[address:浙江省宁波市鄞州区首南街道天童南路588号宁波商会国贸中心A座15楼]]",
    "[[address:云南省大理州宾川县金牛镇三家村三组12号]]，[[name:段正明]]收",
    "地址是[[address:长沙市岳麓区麓山南路932号]]，电话[[phone:13907311234]]",
    "[[address:朝阳区望京西园三区312号楼2单元1101]]",
    "证件号码：[[id:330106199205153419]]，姓名[[name:叶文洁]]",
    "银行卡：[[card:6222 6000 1234 5678]]，开户行建设银行",
    "QQ：[[account:10086123]] 微信：[[account:ye_wenjie77]]",
    "您好[[name:贺涛]]先生，您反馈的问题已经登记",
    "[[name:邵佳]]女士，工单[[order:GD2025091200345]]已经转给售后",
    "[[word:亲]]，[[word:小妹]]这边看到您的[[order:JD299812736451]]已经出库啦",
    "订单号：[[order:15934098712]]，这个订单能改地址吗",
    "快递单号[[tracking:YT7512348899001]]，[[brand:圆通]]的",
    "[[brand:周大福]]戒指退款[[amount:3280元]]什么时候到",
    "[[word:马上]][[date:双十一]]了，[[model:小米14]]还会降价吗",
    "[[brand:李宁]]韦德之道[[model:11]]有[[word:白色]]吗",
    "[[word:京东]][[word:客服]]说[[date:三天内]]回复",
    # a third batch, measured before any change it could have prompted
    "您好，我是[[name:程浩然]]的家属，他住院了让我来处理退款",
    "麻烦帮我备注一下：[[name:姜丽]]代收",
    "寄件人[[name:邹杰]]，寄件地址[[address:西安市雁塔区小寨东路126号百隆广场1203]]",
    "[[name:谭雅婷]]（本人）[[phone:186-0290-1234]]",
    "这单是给[[name:龚伟]]买的生日礼物，[[word:包邮]]吗",
    "姓名：[[name:毛晓彤]] 电话：[[phone:15109876543]] 地址：[[address:河南省郑州市金水区经三路15号财信大厦2单元1201]]",
    "我要开发票，抬头是个人，[[name:冉冬梅]]",
    "银行账号[[card:6214 8301 2345 6789]]",
    "微信号就是手机号[[phone:13811112222]]",
    "qq邮箱[[email:1234567@qq.com]]",
    "加我企鹅[[account:55667788]]",
    "[[address:宝安区西乡街道固戍二路8号]]，[[name:黎明辉]] [[phone:13510002000]]",
    "[[order:4201938475612]]这个单号物流一直没更新",
    "能不能让[[name:史明轩]]师傅明天上门",
    "[[name:侯晓]]：好的谢谢",
    "客服[[name:范冰]]：您好，很高兴为您服务",
    "[[date:2025年3月8日]] [[name:龙飞]] 下单",
    "[[name:白雪]]你好，你的快递到了",
    "买了两件[[brand:李宁]]的T恤，[[amount:共计398元]]",
    "[[word:小妹]]说[[word:京东]][[word:白条]]也能退",
)


def handwritten() -> list[Example]:
    return [parse_marked(s, source="handwritten") for s in HANDWRITTEN]
