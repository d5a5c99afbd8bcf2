"""Phrase tables for the synthetic sample generator (`pipeline.sample.generate`).

Kept apart from the generator so the wording can grow without touching its logic. Conventions:

* Text is Simplified Chinese; the Big5 sample converts it with OpenCC, so use common characters
  only (no ～ or emoji here: Big5 cannot encode them; the generator adds emoji itself).
* `{slot}` placeholders are filled per conversation: product, days, amount, amount2, order,
  promise, coupon, courier, agent_no, shop, and the PII slots phone, landline, idcard, card,
  email, address, name, title.
* A problem phrasing that mentions `{amount}` puts money at stake, which makes the case at least
  重要; the generator picks amount-free phrasings for 一般 cases, so keep money talk in `{amount}`
  phrasings only. Agent handlings never mention amounts, for the same reason.
* Sentences carry their own final punctuation; the generator concatenates them.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Catalogue

# Product -> category; categories decide which phrasings and hazards fit the product.
PRODUCTS: dict[str, str] = {
    "手机": "electronic",
    "笔记本电脑": "electronic",
    "平板电脑": "electronic",
    "智能手表": "electronic",
    "蓝牙耳机": "electronic",
    "空气净化器": "appliance",
    "电热水器": "appliance",
    "洗衣机": "appliance",
    "扫地机器人": "appliance",
    "电饭煲": "appliance",
    "运动鞋": "apparel",
    "羽绒服": "apparel",
    "奶粉": "consumable",
    "洗发水": "consumable",
    "床垫": "furniture",
}

REGIONS: tuple[str, ...] = ("华东", "华南", "华北", "华中", "西南", "西北", "东北")

# Region -> (province, city, district); municipalities have no province part.
LOCATIONS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "华东": (
        ("", "上海市", "浦东新区"),
        ("浙江省", "杭州市", "西湖区"),
        ("江苏省", "南京市", "鼓楼区"),
        ("山东省", "青岛市", "市南区"),
        ("福建省", "厦门市", "思明区"),
    ),
    "华南": (("广东省", "深圳市", "南山区"), ("广东省", "广州市", "天河区"), ("广西壮族自治区", "南宁市", "青秀区")),
    "华北": (
        ("", "北京市", "朝阳区"),
        ("", "北京市", "海淀区"),
        ("", "天津市", "南开区"),
        ("河北省", "石家庄市", "长安区"),
    ),
    "华中": (("湖北省", "武汉市", "洪山区"), ("湖南省", "长沙市", "岳麓区"), ("河南省", "郑州市", "金水区")),
    "西南": (("四川省", "成都市", "武侯区"), ("", "重庆市", "渝北区"), ("云南省", "昆明市", "五华区")),
    "西北": (("陕西省", "西安市", "雁塔区"), ("甘肃省", "兰州市", "城关区")),
    "东北": (("辽宁省", "沈阳市", "和平区"), ("黑龙江省", "哈尔滨市", "南岗区"), ("吉林省", "长春市", "朝阳区")),
}
ROADS: tuple[str, ...] = (
    "科技园路",
    "建国路",
    "中山路",
    "人民路",
    "解放大道",
    "长江路",
    "学府路",
    "文化路",
    "和平路",
    "滨江大道",
    "天府大道",
    "新华路",
    "青年路",
    "光明街",
)
COMMUNITIES: tuple[str, ...] = ("阳光花园", "碧水湾", "幸福里", "锦绣家园", "翠湖", "金色家园", "东方明珠苑")

# Weighted with rng.choices; the common ones first.
CHAT_CHANNELS: tuple[tuple[str, float], ...] = (("chat", 0.70), ("app", 0.15), ("social", 0.08), ("email", 0.07))

SHOPS: tuple[str, ...] = ("某某商城", "优选商城", "乐购商城")
COURIERS: tuple[str, ...] = ("顺丰", "中通", "圆通", "韵达", "京东物流", "申通", "邮政")
# Spelled out so ASR rendering (which strips punctuation) keeps their meaning.
PROMISES: tuple[str, ...] = (
    "24小时内",
    "48小时内",
    "一到三个工作日内",
    "三到五个工作日内",
    "今天下班前",
    "明天中午前",
    "两个小时内",
    "七个工作日内",
)
COUPONS: tuple[str, ...] = ("20元无门槛优惠券", "30元优惠券", "50元无门槛券", "满200减30的优惠券", "10元红包")
DAYS: tuple[str, ...] = ("两", "三", "四", "五", "六", "七", "十", "十五")

# ---------------------------------------------------------------------------------------------
# Personal data (all fake, drawn from the seeded RNG)

SURNAMES: tuple[str, ...] = tuple(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦方白邹孟熊秦江尹薛段雷侯龙史陶黎贺顾毛郝龚邵万钱严武戴孔汤"
)
GIVEN_NAMES: tuple[str, ...] = (
    "伟",
    "芳",
    "娜",
    "敏",
    "静",
    "丽",
    "强",
    "磊",
    "军",
    "洋",
    "勇",
    "艳",
    "杰",
    "娟",
    "涛",
    "超",
    "秀英",
    "霞",
    "刚",
    "桂英",
    "建华",
    "志强",
    "晓燕",
    "浩然",
    "子涵",
    "雨桐",
    "俊杰",
    "思远",
    "欣怡",
    "宇航",
    "文博",
    "佳琪",
    "建国",
    "海燕",
    "丽华",
)
EMAIL_USERS: tuple[str, ...] = (
    "zhangwei",
    "wangfang",
    "li.na",
    "liuyang",
    "chenjing",
    "xiaoyu",
    "sunny",
    "lucky",
    "amy",
    "tom",
    "huangmin",
    "zhaolei",
    "kevin",
    "lily",
)
EMAIL_DOMAINS: tuple[str, ...] = ("qq.com", "163.com", "126.com", "sina.com", "outlook.com", "foxmail.com", "gmail.com")
PHONE_PREFIXES: tuple[str, ...] = (
    "130",
    "131",
    "132",
    "133",
    "135",
    "136",
    "137",
    "138",
    "139",
    "150",
    "151",
    "152",
    "155",
    "156",
    "157",
    "158",
    "159",
    "166",
    "170",
    "176",
    "177",
    "180",
    "181",
    "182",
    "185",
    "186",
    "187",
    "188",
    "189",
    "191",
    "199",
)
# (area code, local number length)
LANDLINE_AREAS: tuple[tuple[str, int], ...] = (
    ("010", 8),
    ("021", 8),
    ("020", 8),
    ("022", 8),
    ("023", 8),
    ("0755", 8),
    ("0755", 7),
    ("0571", 8),
    ("028", 8),
    ("027", 8),
    ("029", 8),
    ("024", 8),
    ("0731", 7),
    ("0871", 7),
)
# Six-digit administrative codes (first part of an ID number).
ID_AREA_CODES: tuple[str, ...] = (
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
)
# Bank card (issuer prefix, total length): UnionPay 62..., Visa 4..., Mastercard 5...
CARD_SHAPES: tuple[tuple[str, int], ...] = (
    ("62", 16),
    ("62", 19),
    ("621", 19),
    ("622", 16),
    ("4", 16),
    ("5", 16),
    ("6228", 19),
    ("625", 17),
    ("62", 18),
)

# Customer turns that carry personal data, with the PII slots each uses. Email templates are
# dropped for calls (nobody dictates an e-mail address to ASR that comes out as one).
CUSTOMER_PII: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("我的手机号是{phone}。", ("phone",)),
    ("联系电话{phone}，有问题打这个。", ("phone",)),
    ("收件人{name}，电话{phone}。", ("name", "phone")),
    ("我叫{name}，手机号{phone}，你们查一下。", ("name", "phone")),
    ("收货地址是{address}。", ("address",)),
    ("收件人{name}，电话{phone}，地址{address}。", ("name", "phone", "address")),
    ("地址改成{address}，收件人{name}。", ("address", "name")),
    ("家里座机{landline}，白天打这个也行。", ("landline",)),
    ("你们打我公司电话吧，{landline}。", ("landline",)),
    ("实名认证的身份证号是{idcard}。", ("idcard",)),
    ("身份证号{idcard}，你们核对一下。", ("idcard",)),
    ("钱直接打到我银行卡吧，卡号{card}。", ("card",)),
    ("我的银行卡号是{card}，开户名{name}。", ("card", "name")),
    ("我的邮箱是{email}，有结果发邮件给我。", ("email",)),
    ("资料发到{email}就行。", ("email",)),
    ("我是{title}，之前联系过你们的。", ("title",)),
)
# Agents repeating personal data back (some do, and it must be masked there too).
AGENT_PII: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("跟您核对一下，联系电话{phone}，对吗？", ("phone",)),
    ("好的{title}，跟您确认一下地址：{address}。", ("title", "address")),
    ("{title}您好，已经查到您的信息了。", ("title",)),
    ("好的{title}，我记下了。", ("title",)),
)
AGENT_PII_PROMPTS: tuple[str, ...] = (
    "麻烦留一下您的联系方式，方便后续联系您。",
    "请问收件人信息需要核对一下吗？",
    "为了方便处理，请提供一下您的联系信息。",
)

# ---------------------------------------------------------------------------------------------
# Conversation frame

BOT_GREETINGS: tuple[str, ...] = (
    "您好，我是智能客服小智，请问有什么可以帮您？",
    "欢迎咨询，请简单描述您的问题，我来为您解答。",
    "您好，智能助手为您服务，请输入您的问题。",
)
ASK_HUMAN: tuple[str, ...] = ("转人工", "人工客服", "我要找人工", "转人工客服！")
SYSTEM_TRANSFER: tuple[str, ...] = ("会话已转接人工客服", "正在为您转接人工客服，请稍候")
SYSTEM_END: tuple[str, ...] = ("会话已结束", "用户已离开会话", "客服已结束本次会话")
CHAT_GREETINGS: tuple[str, ...] = (
    "您好，很高兴为您服务，请问有什么可以帮您？",
    "您好，客服{agent_no}号为您服务，请问有什么可以帮您？",
    "亲，您好，在的哦，请问有什么可以帮您？",
    "您好，请问有什么可以帮到您？",
)
CALL_GREETINGS: tuple[str, ...] = (
    "您好，这里是{shop}客服，工号{agent_no}，请问有什么可以帮您？",
    "您好，{shop}客服中心，工号{agent_no}为您服务，请问有什么可以帮您？",
    "您好，很高兴为您服务，我是{agent_no}号客服，请问有什么可以帮您？",
)
# A customer who opens before any greeting.
CUSTOMER_OPENERS: tuple[str, ...] = ("在吗？", "你好", "有人吗？")
AGENT_REPLY_OPENER: tuple[str, ...] = ("在的，请问有什么可以帮您？", "您好，请问有什么可以帮您？")
CUSTOMER_HELLO: tuple[str, ...] = ("你好，", "您好，", "你好，我想问一下，", "您好，请问一下，")

ASK_ORDER: tuple[str, ...] = (
    "请提供一下您的订单号。",
    "麻烦您提供一下订单号，我帮您查询一下。",
    "您好，请问您的订单号是多少？",
    "请您提供一下订单号，我这边帮您核实。",
)
GIVE_ORDER: tuple[str, ...] = ("订单号是{order}。", "订单号{order}", "{order}", "订单{order}，你们查一下。")
VERIFY: tuple[str, ...] = ("好的，请稍等，正在为您查询。", "稍等，我帮您核实一下。", "好的，我这边查一下，请您稍等。")
VERIFIED: tuple[str, ...] = (
    "已经查到您的订单了，您购买的是{product}对吧？",
    "查到了，您的{product}订单信息我这边看到了。",
)
EMPATHY: tuple[str, ...] = (
    "非常抱歉给您带来不好的体验。",
    "真的很抱歉让您久等了。",
    "理解您的心情，我这边马上为您处理。",
    "非常抱歉，给您添麻烦了。",
)
ANYTHING_ELSE: tuple[str, ...] = ("请问还有其他可以帮您的吗？", "还有其他问题需要咨询吗？")
NOTHING_ELSE: tuple[str, ...] = ("没有了，谢谢。", "没有了。", "暂时没有了。")
AGENT_BYE_CHAT: tuple[str, ...] = ("感谢您的咨询，祝您生活愉快，再见！", "不客气，祝您生活愉快！")
AGENT_BYE_CALL: tuple[str, ...] = ("感谢您的来电，祝您生活愉快，再见。", "好的，那不打扰您了，再见。")
SECOND_ISSUE_INTROS: tuple[str, ...] = ("另外还有一个问题，", "对了，还有个事，", "还有一个问题想问一下，")

# Generic exchanges (agent line, customer line) that lengthen a conversation without changing
# what it is about.
GENERIC_EXCHANGES: tuple[tuple[str, str], ...] = (
    ("您别着急，我这边帮您看一下。", "好，你快点。"),
    ("请问您是在哪个平台下的单？", "就在你们官方旗舰店买的。"),
    ("我这边需要核实一下，请您稍等一两分钟。", "嗯，好的。"),
    ("请问您方便提供一下照片吗？", "可以，我等下拍给你。"),
    ("您的问题我已经记录下来了。", "那什么时候能有结果？"),
)

# ---------------------------------------------------------------------------------------------
# Urgency, emotion, request kind and outcome realisations

REPEAT_CONTACT: tuple[str, ...] = (
    "这是我第三次联系了！",
    "这已经是我第三次联系你们了，",
    "我已经打了好几次电话了，这是第三次了。",
)
MONEY_AT_STAKE: tuple[str, ...] = (
    "我花了{amount}块钱买的，不能就这么算了。",
    "{amount}元不是小数目，你们得给我个说法。",
    "钱都付了{amount}元了。",
)
# Legal / media threats: these make a case 紧急.
SEVERE_THREATS: tuple[str, ...] = (
    "今天不给我处理好，我就去网上曝光你们！",
    "我已经咨询过律师了，不行就走法律程序。",
    "再拖下去我就找电视台曝光。",
    "我会保留证据，找律师起诉你们。",
)
# Safety hazards by product category: these make a case 紧急.
HAZARDS: dict[str, tuple[str, ...]] = {
    "electronic": (
        "{product}充电的时候冒烟了，吓死我了。",
        "{product}电池鼓包了，还特别烫，刚才冒烟了。",
        "{product}充着电突然起火了，差点把桌子烧了！",
    ),
    "appliance": (
        "{product}插上电就漏电，我手碰了一下被电到了。",
        "{product}用着用着冒烟了，还有一股烧焦味。",
        "{product}里面突然起火了，幸好发现得早。",
    ),
    "apparel": ("{product}上的金属扣把孩子的手划伤了，流了好多血。",),
    "consumable": ("用了{product}以后家里人过敏住院了。", "孩子用了{product}以后身体不舒服，已经去医院了。"),
    "furniture": ("{product}里面的弹簧戳出来，把孩子的腿划伤了。",),
}
COMPLAINT_MARKERS: tuple[str, ...] = ("我要投诉！", "必须给我一个说法。", "我要投诉这个问题。", "你们必须给我个交代。")
CONSULT_MARKERS: tuple[str, ...] = ("想咨询一下。", "麻烦帮我看看。", "请问怎么处理？")
SUGGESTION_ACK: tuple[str, ...] = ("感谢您的建议，我们会反馈给相关部门改进。", "谢谢您的宝贵意见，已经记录并提交了。")

ANGRY_PREFIXES: tuple[str, ...] = ("气死了！", "什么破服务！", "太过分了！")
EMOTION_SUFFIX: dict[str, tuple[str, ...]] = {
    "angry": ("垃圾！", "什么破服务！！！", "你们这是什么服务？！", "气死我了！！！"),
    "anxious": ("我急用，怎么办？", "着急用，麻烦快点。", "明天就要用了，怎么办啊？"),
    "neutral": (),
    "satisfied": ("麻烦你了，谢谢！", "谢谢，你们服务一直挺好的。", "辛苦了，谢谢！"),
}
EMOJI: dict[str, tuple[str, ...]] = {
    "angry": ("😡", "😤", "💢"),
    "anxious": ("😭", "😰", "🙏"),
    "neutral": ("🙂",),
    "satisfied": ("👍", "😊", "🙏"),
}
FLOODS: tuple[str, ...] = ("😡", "😭", "？", "！", "🙏")

RESOLVED: dict[str, tuple[str, ...]] = {
    "default": ("好的谢谢。", "可以了，谢谢。", "收到了，谢谢你。", "好的，那我等着。", "好的，麻烦你了。"),
    "angry": ("行吧，那就这样，尽快啊。", "好的，这次就算了。", "可以了。"),
    "satisfied": ("太好了，谢谢你，服务真好！", "好的，非常感谢，你们效率真高！", "收到了，谢谢，问题解决了。"),
}
AGENT_AFTER_RESOLVED: tuple[str, ...] = ("不客气，这是我们应该做的。", "好的，有问题随时联系我们。")
UNRESOLVED: tuple[str, ...] = (
    "还是不行。",
    "算了，不用了。",
    "我不满意，你们这样处理不行。",
    "说了半天还是没解决。",
    "那算了吧，我自己想办法。",
)
AGENT_AFTER_UNRESOLVED: tuple[str, ...] = (
    "非常抱歉没能帮到您，您有其他问题可以随时联系我们。",
    "很抱歉，目前只能这样处理，请您谅解。",
)
# Escalation threats that are not legal/media (do not by themselves make a case 紧急).
ESCALATE_THREATS: tuple[str, ...] = (
    "再不解决我就投诉到12315！",
    "我要投诉你们，叫你们主管来跟我说。",
    "解决不了我就投诉到底，叫你们主管来！",
    "我要去12315投诉你们。",
)
ESCALATE_SEVERE: tuple[str, ...] = ("我要找媒体曝光你们！", "那我只能找律师了。", "我要在网上曝光你们！")
ESCALATE_AGENT: tuple[str, ...] = (
    "非常抱歉，已为您升级给专员处理，{promise}会有专人联系您。",
    "我这边马上为您转接主管，请稍等。",
    "已将您的问题升级处理，主管会在{promise}给您回电。",
)

# ---------------------------------------------------------------------------------------------
# Issue types


@dataclass(frozen=True)
class Scenario:
    """One concrete problem within an issue type: ways a customer puts it, and what an agent does
    about it (so the handling always answers the problem that was raised)."""

    problems: tuple[str, ...]
    handlings: tuple[str, ...]
    categories: tuple[str, ...] | None = None  # product categories it fits; None = all


@dataclass(frozen=True)
class IssueTemplates:
    scenarios: tuple[Scenario, ...]
    exchanges: tuple[tuple[str, str], ...]  # (agent, customer) pairs that fit any scenario
    suggestions: tuple[str, ...]  # customer suggestions, for request kind 建议
    kinds: tuple[tuple[str, float], ...]  # request kind weights
    weight: float  # share among first issues
    categories: tuple[str, ...] | None = None  # product categories the issue fits; None = all
    needs_order: bool = True
    safety: bool = False  # a safety hazard is a plausible part of this issue


_GADGETS = ("electronic", "appliance")  # things that can be repaired

ISSUES: dict[str, IssueTemplates] = {
    "物流配送": IssueTemplates(
        scenarios=(
            Scenario(  # delay
                problems=(
                    "我的快递{days}天了还没到，{product}到底什么时候能送到？",
                    "下单的时候说次日达，现在都{days}天了还在路上。",
                    "我买的{product}物流信息{days}天没更新了，是不是卡在哪里了？",
                    "我付了{amount}元加急运费，结果比普通快递还慢。",
                ),
                handlings=(
                    "已为您催促物流，已经联系{courier}加急派送，预计{promise}送达。",
                    "已经联系快递员，{promise}会为您派送，请保持电话畅通。",
                ),
            ),
            Scenario(  # lost parcel
                problems=(
                    "我买的{product}物流信息{days}天没更新了，是不是丢件了？",
                    "物流显示已签收，但是我根本没收到{product}！",
                    "快递员没打电话就把{product}放驿站了，我找了半天都没找到。",
                    "{product}花了{amount}元，说好的两天送到，现在包裹丢了谁负责？",
                ),
                handlings=(
                    "核实到包裹在运输途中丢失，已为您申请补发，新的包裹{promise}发出。",
                    "已为您登记工单，联系站点核实签收情况，{promise}给您回复。",
                ),
            ),
            Scenario(  # wrong address
                problems=(
                    "地址填错了，能不能帮我改一下收货地址？{product}还没发货吧。",
                    "快递送错地址了，{product}被送到别的小区去了。",
                ),
                handlings=(
                    "已为您修改收货地址，快递会按新地址派送，预计{promise}送到。",
                    "已联系{courier}把包裹转寄到正确地址，预计{promise}送到。",
                ),
            ),
        ),
        exchanges=(
            ("请问您最近一次查看物流是什么时候？", "昨天看还是显示在中转站，一直没动。"),
            ("请问快递员有没有联系过您？", "没有，电话也打不通。"),
            ("请问您家附近有快递柜或者驿站吗？", "有，但是我都找过了，没有。"),
        ),
        suggestions=("建议你们换个靠谱点的快递公司。", "建议发货以后及时更新物流信息。"),
        kinds=(("投诉", 0.5), ("咨询", 0.4), ("建议", 0.1)),
        weight=0.18,
    ),
    "商品破损": IssueTemplates(
        scenarios=(
            Scenario(
                problems=(
                    "收到的{product}包装破了，东西也摔坏了。",
                    "{product}到手就是坏的，有明显的破损。",
                    "拆开一看{product}有好几处划痕，跟二手的一样。",
                    "快递箱都压扁了，{product}也被压坏了。",
                    "{product}{amount}块买的，收到就是坏的，这让我怎么用？",
                    "东西破成这样没法用，{amount}元必须全额退给我。",
                ),
                handlings=(
                    "已为您申请补发一件新的{product}，{promise}发出。",
                    "已为您提交退款申请，款项{promise}原路退回。",
                    "已为您登记破损工单，并补偿您一张{coupon}。",
                    "已安排快递上门取件换新，取件后{promise}为您寄出新品。",
                ),
            ),
        ),
        exchanges=(
            ("麻烦您拍一下破损部位和外包装的照片发给我们。", "照片已经发过去了，你看看。"),
            ("请问外包装有没有破损？", "外箱都压扁了，还有水渍。"),
            ("请问签收的时候有没有当面验货？", "快递员放下就走了，没法验。"),
        ),
        suggestions=("建议你们发货前检查一下包装。", "建议包装里面多放点泡沫。"),
        kinds=(("投诉", 0.7), ("咨询", 0.2), ("建议", 0.1)),
        weight=0.08,
        safety=True,
    ),
    "退换货/退款": IssueTemplates(
        scenarios=(
            Scenario(  # wants to return or exchange
                problems=(
                    "我想把{product}退了，七天无理由可以退吗？",
                    "{product}不太合适，想换个型号。",
                    "我想换货，换成别的颜色可以吗？",
                ),
                handlings=(
                    "已为您生成换货单，新商品{promise}发出，退回运费由我们承担。",
                    "可以的，已为您提交退换货申请，快递员{promise}上门取件。",
                ),
            ),
            Scenario(  # refund slow
                problems=(
                    "退款申请{days}天了，{amount}元到现在还没到账。",
                    "退货已经寄回去了，商家一直不处理退款。",
                    "客服之前答应给我退款{amount}元，现在又说不行了。",
                ),
                handlings=(
                    "已为您加急处理退款，预计{promise}到账。",
                    "已为您提交退款申请，款项将在{promise}原路退回。",
                ),
            ),
            Scenario(  # rejected
                problems=("退款申请被驳回了，为什么不给退？", "退货申请一直显示审核中，{days}天了都没人管。"),
                handlings=("已为您重新审核退货申请，审核通过后{promise}退款。",),
            ),
        ),
        exchanges=(
            ("请问商品有没有拆封使用过？", "拆开看了一下，没用过。"),
            ("请问退货的快递单号填写了吗？", "快递单号我已经填了。"),
            ("请问您是用什么方式付款的？", "用花呗付的，退到哪里？"),
        ),
        suggestions=("建议退款流程简化一下，太麻烦了。", "建议退货能上门取件。"),
        kinds=(("投诉", 0.4), ("咨询", 0.55), ("建议", 0.05)),
        weight=0.14,
    ),
    "质量问题": IssueTemplates(
        scenarios=(
            Scenario(
                problems=(
                    "{product}才买了{days}天就出问题了，质量太差了。",
                    "{product}质量有问题，有很大的异味。",
                    "{amount}块买的{product}，质量还不如几十块的。",
                    "{product}做工太粗糙了，跟图片完全不一样。",
                ),
                handlings=(
                    "已为您登记质量问题工单，安排{promise}为您换新。",
                    "已为您提交退款申请，商品寄回后{promise}退款。",
                    "已将问题反馈给质检部门，并补偿您一张{coupon}，{promise}会有专人跟进。",
                    "已为您申请换货，新品{promise}发出。",
                ),
            ),
            Scenario(
                problems=(
                    "{product}用了没几天就坏了，开不了机。",
                    "{product}用着用着就自动关机。",
                    "{product}充不进电，换了充电器也不行。",
                ),
                handlings=("已为您登记质量问题工单，安排{promise}为您换新。", "已为您申请换货，新品{promise}发出。"),
                categories=("electronic",),
            ),
            Scenario(
                problems=("{product}用了一个星期就不工作了。", "{product}噪音特别大，晚上根本没法用。"),
                handlings=(
                    "已为您登记质量问题工单，安排师傅{promise}上门检测，确认是质量问题直接换新。",
                    "已为您申请换货，新品{promise}发出。",
                ),
                categories=("appliance",),
            ),
            Scenario(
                problems=("{product}穿了两次就开胶了。", "{product}洗了一次就掉色，还起球。"),
                handlings=("已为您提交退款申请，商品寄回后{promise}退款。", "已为您申请换货，新品{promise}发出。"),
                categories=("apparel",),
            ),
            Scenario(
                problems=("{product}里面有结块和黑点，是不是过期了？", "{product}的味道跟以前买的不一样，是不是假货？"),
                handlings=("已将批次信息反馈给质检部门，并为您提交退款申请，{promise}退回。",),
                categories=("consumable",),
            ),
            Scenario(
                problems=("{product}睡了一个月就塌了一块。", "{product}有一股很重的胶水味。"),
                handlings=("已为您登记质量问题工单，{promise}安排上门取件换新。",),
                categories=("furniture",),
            ),
        ),
        exchanges=(
            ("请问问题是从什么时候开始出现的？", "买回来第二天就这样了。"),
            ("请问您是按照说明书使用的吗？", "当然是按说明书用的。"),
            ("方便拍个视频给我们看一下吗？", "可以，我录好发给你。"),
        ),
        suggestions=("建议你们加强一下质检。", "建议出厂前好好检查一下。"),
        kinds=(("投诉", 0.7), ("咨询", 0.2), ("建议", 0.1)),
        weight=0.11,
        safety=True,
    ),
    "使用咨询/操作指导": IssueTemplates(
        scenarios=(
            Scenario(  # manual
                problems=("{product}的说明书找不到了，能发一份电子版吗？", "{product}怎么用啊，说明书看不懂。"),
                handlings=(
                    "已为您发送电子版说明书到您的账户消息里，请注意查收。",
                    "我这边把详细的使用说明发给您，您按照步骤操作一下就可以了。",
                ),
            ),
            Scenario(
                problems=(
                    "{product}怎么连接蓝牙？",
                    "新买的{product}怎么恢复出厂设置？",
                    "{product}怎么设置指纹解锁？",
                ),
                handlings=(
                    "我这边把详细的操作步骤发给您，您按照步骤操作一下就可以了。",
                    "已为您登记，{promise}会有技术人员电话指导您操作。",
                ),
                categories=("electronic",),
            ),
            Scenario(
                problems=("{product}怎么连接手机APP？", "{product}的预约功能怎么设置？"),
                handlings=(
                    "您可以在APP里点击我的设备，选择添加设备，按提示操作就可以。",
                    "已为您登记，{promise}会有技术人员电话指导您操作。",
                ),
                categories=("appliance",),
            ),
            Scenario(  # care and storage
                problems=("新买的{product}第一次用需要注意什么？", "{product}平时怎么保养比较好？"),
                handlings=(
                    "我这边把注意事项发给您，您按照说明使用就可以了。",
                    "建议按照说明书上的方法使用和保养，有疑问随时联系我们。",
                ),
            ),
            Scenario(
                problems=("{product}可以机洗吗？", "{product}怎么清洗不容易坏？"),
                handlings=("建议手洗或者用洗衣机的轻柔模式，水温不要超过30度。",),
                categories=("apparel",),
            ),
            Scenario(
                problems=("{product}开封以后能放多久？", "{product}一次用多少合适？"),
                handlings=("开封后建议在一个月内用完，用量可以参考包装上的说明。",),
                categories=("consumable",),
            ),
            Scenario(
                problems=("{product}拆封后多久能睡？", "{product}需要定期翻面吗？"),
                handlings=("拆封后通风一两天就可以使用，建议每三个月翻面一次。",),
                categories=("furniture",),
            ),
        ),
        exchanges=(
            ("请问您现在具体操作到哪一步了？", "到第二步就不会了。"),
            ("请问您的型号是哪一款？", "就是你们店里卖得最多的那款。"),
        ),
        suggestions=("建议说明书写得再详细一点。", "建议出个视频教程。"),
        kinds=(("咨询", 0.9), ("建议", 0.1)),
        weight=0.08,
        needs_order=False,
    ),
    "售后维修": IssueTemplates(
        scenarios=(
            Scenario(  # wants a repair
                problems=("{product}坏了，还在保修期内，怎么申请维修？", "{product}出故障了，能不能安排师傅上门看看？"),
                handlings=(
                    "已为您登记维修工单，安排师傅{promise}上门检测。",
                    "已为您申请寄修，快递会上门取件，维修完成后{promise}寄回。",
                ),
            ),
            Scenario(  # repair late
                problems=(
                    "师傅说好今天上门修{product}，到现在都没来。",
                    "{product}送修{days}天了还没修好，什么时候能寄回来？",
                ),
                handlings=(
                    "已为您催促售后网点，师傅会在{promise}联系您。",
                    "已为您加急处理，维修完成后{promise}寄回。",
                ),
            ),
            Scenario(  # broken again
                problems=("{product}修了又坏，已经修了{days}次了。",),
                handlings=(
                    "已为您登记维修工单，这次安排高级师傅{promise}上门检测。",
                    "已为您申请换新，新品{promise}发出。",
                ),
            ),
            Scenario(  # charged in warranty
                problems=("维修{product}要收我{amount}元，不是说保修期内免费吗？",),
                handlings=("核实到您的产品在保修期内，维修费用全免，已为您安排师傅上门。",),
            ),
        ),
        exchanges=(
            ("请问产品是什么时候购买的？", "去年买的，还在保修期。"),
            ("请问您方便的上门时间是什么时候？", "周末都在家。"),
            ("请问故障具体是什么表现？", "一开就报错，然后就停了。"),
        ),
        suggestions=("建议售后网点多一些，等太久了。", "建议维修进度可以在APP上查。"),
        kinds=(("投诉", 0.4), ("咨询", 0.5), ("建议", 0.1)),
        weight=0.08,
        categories=_GADGETS,
        safety=True,
    ),
    "发票": IssueTemplates(
        scenarios=(
            Scenario(
                problems=("我想开发票，在哪里申请？", "电子发票怎么下载？", "买{product}的发票一直没收到。"),
                handlings=(
                    "已为您开具电子发票，{promise}会发送到您的邮箱。",
                    "电子发票可以在订单详情页点击查看发票下载。",
                ),
            ),
            Scenario(
                problems=("发票抬头开错了，能帮我重新开一张吗？", "{amount}元的发票金额开错了，跟实际付款不一样。"),
                handlings=("已为您提交发票重开申请，原发票作废，新发票{promise}开出。",),
            ),
            Scenario(
                problems=("我需要增值税专用发票，公司报销用的。",),
                handlings=("已为您登记专票申请，{promise}为您开出。",),
            ),
        ),
        exchanges=(
            ("请问发票抬头是个人还是单位？", "单位，抬头是我们公司名字。"),
            ("请问需要纸质发票还是电子发票？", "电子的就行。"),
        ),
        suggestions=("建议下单的时候就能直接选专票。",),
        kinds=(("咨询", 0.85), ("投诉", 0.1), ("建议", 0.05)),
        weight=0.06,
    ),
    "支付/价格/优惠": IssueTemplates(
        scenarios=(
            Scenario(  # price drop
                problems=(
                    "我刚买了{product}就降价了，能不能退差价？",
                    "{product}前天买的{amount}元，今天只要{amount2}元，差价能补吗？",
                ),
                handlings=("已为您申请价格保护，差价{promise}退回到您的账户。",),
            ),
            Scenario(  # charged twice
                problems=("付款的时候扣了两次钱，{amount}元被扣了两遍。", "付款失败了但是钱已经扣了{amount}元。"),
                handlings=(
                    "核实到您的订单重复扣款，已为您提交退款申请，{promise}原路退回。",
                    "已为您核实，多扣的款项会在{promise}自动退回。",
                ),
            ),
            Scenario(  # coupon
                problems=("优惠券为什么用不了？明明没过期。", "活动页面写的满300减50，结算的时候没减。"),
                handlings=(
                    "这张优惠券仅限指定商品使用，已为您补发一张通用券。",
                    "已为您补偿一张{coupon}，下单时可以直接使用。",
                ),
            ),
            Scenario(
                problems=("分期付款怎么申请？",),
                handlings=("结算的时候选择分期付款，按提示选择期数就可以。",),
            ),
        ),
        exchanges=(
            ("请问您是用什么方式支付的？", "微信支付的。"),
            ("请问您领券的时候有没有看使用规则？", "没注意看，页面上也没写清楚。"),
        ),
        suggestions=("建议优惠规则写得清楚一点。", "建议价保时间长一点。"),
        kinds=(("咨询", 0.5), ("投诉", 0.4), ("建议", 0.1)),
        weight=0.08,
    ),
    "账户/会员": IssueTemplates(
        scenarios=(
            Scenario(
                problems=("我的账号登不上去了，一直提示密码错误。",),
                handlings=("已为您重置登录密码，新密码会以短信形式发送给您。",),
            ),
            Scenario(
                problems=("会员自动续费了，我没同意啊，扣了{amount}元。",),
                handlings=("已为您关闭自动续费，并提交退款申请，{promise}退回。",),
            ),
            Scenario(problems=("积分怎么突然清零了？",), handlings=("已为您提交积分恢复申请，{promise}处理完成。",)),
            Scenario(
                problems=("手机号换了，账号绑定的手机收不到验证码。",),
                handlings=("已为您登记换绑申请，审核通过后{promise}完成换绑。",),
            ),
            Scenario(
                problems=("我想注销账号，怎么操作？",),
                handlings=("在设置里点击账号与安全，选择注销账号，按提示操作就可以。",),
            ),
            Scenario(
                problems=("开了会员为什么没有享受到免运费？",),
                handlings=("核实到您的会员权益没有生效，已为您补发运费券，{promise}恢复正常。",),
            ),
        ),
        exchanges=(
            ("请问您最近有没有在其他设备上登录过？", "没有，就用这一个手机。"),
            ("为了保障账户安全，需要先验证一下您的身份。", "可以，怎么验证？"),
        ),
        suggestions=("建议自动续费之前提醒一下。", "建议积分到期前发个通知。"),
        kinds=(("咨询", 0.7), ("投诉", 0.2), ("建议", 0.1)),
        weight=0.06,
        needs_order=False,
    ),
    "服务态度": IssueTemplates(
        scenarios=(
            Scenario(
                problems=(
                    "你们客服态度太差了，问什么都说不知道。",
                    "快递员态度很恶劣，还骂人。",
                    "上次那个客服直接把我电话挂了。",
                    "打了好几次电话都没人接，等了半个小时。",
                    "师傅上门服务态度很差，还乱收费{amount}元。",
                    "在线客服一直机器人回复，根本解决不了问题。",
                ),
                handlings=(
                    "非常抱歉给您带来不好的体验，已为您登记投诉工单，会对相关人员进行处理，{promise}给您回复。",
                    "您反馈的问题已经记录，我们会对相关人员进行培训考核，并补偿您一张{coupon}。",
                    "已将您的反馈提交给负责人，{promise}会有专人联系您。",
                ),
            ),
        ),
        exchanges=(
            ("请问是什么时间发生的事情？", "就昨天下午。"),
            ("请问您还记得对方的工号吗？", "不记得了，反正态度很差。"),
        ),
        suggestions=("建议你们好好培训一下客服。", "建议增加人工客服，机器人根本没用。"),
        kinds=(("投诉", 0.8), ("建议", 0.2)),
        weight=0.05,
    ),
    "售前咨询": IssueTemplates(
        scenarios=(
            Scenario(
                problems=("{product}现在有货吗？什么时候发货？",), handlings=("有现货的，今天下单{promise}发货。",)
            ),
            Scenario(
                problems=("这款{product}和上一代有什么区别？",),
                handlings=("这款是新一代产品，性能和做工都有提升，具体参数我发给您。",),
            ),
            Scenario(
                problems=("{product}支持七天无理由退货吗？",),
                handlings=("支持七天无理由退货，商品不影响二次销售就可以。",),
            ),
            Scenario(
                problems=("现在买{product}有什么优惠活动吗？", "{product}这个价格包邮吗？"),
                handlings=("现在下单可以领取{coupon}，而且全场包邮。",),
            ),
            Scenario(problems=("{product}能送货上门吗？",), handlings=("支持送货上门，大件商品免费安装。",)),
        ),
        exchanges=(
            ("请问您主要是自己用还是送人？", "送给家里老人用的。"),
            ("请问您对颜色有要求吗？", "黑色或者白色都行。"),
        ),
        suggestions=("建议详情页把参数写全一点。",),
        kinds=(("咨询", 0.9), ("建议", 0.1)),
        weight=0.08,
        needs_order=False,
    ),
}

# Issue types that usually come up second, after the first is handled.
SECOND_ISSUE_WEIGHTS: dict[str, float] = {
    "发票": 0.3,
    "支付/价格/优惠": 0.2,
    "账户/会员": 0.15,
    "使用咨询/操作指导": 0.15,
    "售前咨询": 0.1,
    "物流配送": 0.1,
}

# Emotion given request kind, and outcome given emotion (weights).
EMOTION_BY_KIND: dict[str, tuple[tuple[str, float], ...]] = {
    "投诉": (("angry", 0.5), ("anxious", 0.25), ("neutral", 0.25)),
    "咨询": (("neutral", 0.5), ("anxious", 0.25), ("satisfied", 0.2), ("angry", 0.05)),
    "建议": (("neutral", 0.6), ("satisfied", 0.25), ("angry", 0.15)),
}
URGENCY_BY_KIND: dict[str, tuple[tuple[str, float], ...]] = {
    "投诉": (("紧急", 0.15), ("重要", 0.35), ("一般", 0.5)),
    "咨询": (("紧急", 0.03), ("重要", 0.25), ("一般", 0.72)),
    "建议": (("重要", 0.15), ("一般", 0.85)),
}
OUTCOME_BY_EMOTION: dict[str, tuple[tuple[str, float], ...]] = {
    "angry": (("resolved", 0.35), ("unresolved", 0.25), ("escalated", 0.4)),
    "anxious": (("resolved", 0.6), ("unresolved", 0.25), ("escalated", 0.15)),
    "neutral": (("resolved", 0.7), ("unresolved", 0.2), ("escalated", 0.1)),
    "satisfied": (("resolved", 1.0),),
}

# ASR homophone noise: (right, wrong). Every wrong form is listed in configs/asr_corrections.yaml.
HOMOPHONES: tuple[tuple[str, str], ...] = (
    ("快递", "快第"),
    ("退款", "退宽"),
    ("物流", "物六"),
    ("发票", "发飘"),
    ("订单", "定单"),
    ("售后", "售候"),
    ("优惠券", "优惠卷"),
    ("保修", "保休"),
)
ASR_FILLERS: tuple[str, ...] = ("嗯", "啊", "呃", "那个", "就是说", "然后")
