"""The synthetic set's references: a few templates (easy) or a small grammar (hard).

Every reference names exactly what is drawn (category, colour, pattern, brand where one is drawn),
so attribute accuracy can be checked against the ground truth. The hard grammar composes each
reference from parts in varied orders (opener, attribute order, optional visible details such as
sleeve length and neckline, selling points, background, a `…风格` phrase for two-product scenes),
so references stop being a handful of templates.
"""
from __future__ import annotations

import random
from typing import Any

SELLING = {
    "T恤": ("透气舒适", "版型宽松", "简约百搭", "柔软亲肤", "休闲时尚"),
    "连衣裙": ("优雅显瘦", "温柔气质", "飘逸灵动", "收腰显身材", "清新甜美"),
    "裤子": ("修身显瘦", "宽松舒适", "垂感十足", "百搭休闲", "显腿长"),
    "帽子": ("遮阳防晒", "百搭时尚", "轻便透气", "显脸小", "出游必备"),
    "鞋子": ("轻便舒适", "防滑耐磨", "透气不闷脚", "百搭潮流", "软底好走"),
    "背包": ("大容量", "轻便耐用", "多隔层收纳", "通勤百搭", "减负护脊"),
    "杯子": ("保温保冷", "简约大方", "容量适中", "耐高温", "办公家用"),
    "台灯": ("护眼柔光", "小巧精致", "亮度可调", "节能省电", "学习办公"),
}
# category -> (measure word, verb): "一盏台灯", "适合日常背"
_GRAMMAR = {"T恤": ("件", "穿"), "连衣裙": ("条", "穿"), "裤子": ("条", "穿"), "帽子": ("顶", "戴"),
            "鞋子": ("双", "穿"), "背包": ("个", "背"), "杯子": ("个", "用"), "台灯": ("盏", "用")}
_PLAIN = (
    "这款{c}{p}{k}{s}", "{c}的{p}{k}，{s}", "一{m}{pk}{c}{k}，{s}", "{c}{p}{k}，{s}，{s2}",
    "{s}的{c}{p}{k}", "{c}{p}{k}，{s}，适合日常{v}", "新款{c}{p}{k}，{s}，{s2}",
    "{k}选{c}{p}款，{s}",
)
_BRANDED = (
    "{b}品牌{c}{p}{k}，{s}", "{b}这款{c}{p}{k}{s}", "{b}{c}{p}{k}，{s}，{s2}",
    "来自{b}的{c}{p}{k}，{s}", "{s}的{b}{c}{p}{k}",
)


def _ref(template: str, attrs: dict[str, Any], rng: random.Random) -> str:
    """Fill one template; a solid pattern is named "纯色" only half the time."""
    k, pattern = attrs["category"], attrs["pattern"]
    p = "" if pattern == "纯色" and rng.random() < 0.5 else pattern
    s, s2, s3 = rng.sample(SELLING[k], 3)
    m, v = _GRAMMAR[k]
    text = template.format(c=attrs["colour"], p=p, pk=p + "款" if p else "", k=k, s=s, s2=s2,
                           m=m, v=v, b=attrs["brand"])
    if len(text) < 10:
        text += "，" + s3
    return text + "。" if rng.random() < 0.25 else text


def captions_for(attrs: dict[str, Any], rng: random.Random) -> list[str]:
    """3-5 distinct-template references; when a brand is drawn, at least two name it."""
    n = rng.randint(3, 5)
    n_brand = rng.randint(2, n) if attrs["brand"] else 0
    templates = rng.sample(_BRANDED, n_brand) + rng.sample(_PLAIN, n - n_brand)
    rng.shuffle(templates)
    return [_ref(t, attrs, rng) for t in templates]


# ----------------------------------------------------------------------------- hard grammar
_MORE_SELLING = {
    "T恤": ("不易变形", "日常通勤", "吸汗速干", "上身显瘦", "夏季必备"),
    "连衣裙": ("约会出游", "气质减龄", "垂坠感好", "度假风情", "法式浪漫"),
    "裤子": ("高腰设计", "弹力舒适", "四季可穿", "直筒显瘦", "通勤休闲"),
    "帽子": ("可折叠", "透气网眼", "四季百搭", "户外运动", "精致小巧"),
    "鞋子": ("缓震回弹", "轻盈透气", "耐磨大底", "日常慢跑", "一脚蹬"),
    "背包": ("防泼水", "电脑隔层", "肩带加宽", "旅行出差", "轻量背负"),
    "杯子": ("长效保温", "一键开盖", "便携防漏", "食品级材质", "颜值很高"),
    "台灯": ("无频闪", "三档调光", "折叠收纳", "卧室床头", "USB充电"),
}
_OPENERS = ("", "", "", "这款", "新款", "今年流行的", "店长推荐的", "经典款", "热卖")
_STYLES = ("简约", "清新", "日系", "韩系", "复古", "北欧", "休闲", "通勤")
_RELATIONS = ("搭配", "和", "配上", "加上")
_BG_WORDS = {"plain": "纯色背景", "gradient": "渐变背景", "wood": "木纹背景", "fabric": "布纹背景"}
_FRAMES = (
    "{o}{np}，{s}", "{o}{np}，{s}，{s2}", "{s}的{np}", "{np}{s}", "{o}{np}，{s}，适合日常{v}",
    "推荐这{m}{np}，{s}", "一{m}{np}，{s}又{s2}", "{np}，主打{s}", "{s}、{s2}的{np}",
    "{o}{np}，{s}，{bg}下更显质感", "{bg}上的{np}，{s}", "入手一{m}{np}，{s}",
)


def _details(attrs: dict[str, Any], rng: random.Random) -> list[str]:
    """The optional visible details, each named in a reference with probability 0.7."""
    return [attrs[k] for k in ("neckline", "sleeve") if attrs.get(k) and rng.random() < 0.7]


def _noun_phrase(a: dict[str, Any], rng: random.Random, brand: bool) -> str:
    """Brand, colour, pattern, details and category in one of several natural orders."""
    pattern = "" if a["pattern"] == "纯色" and rng.random() < 0.5 else a["pattern"]
    details = "".join(_details(a, rng))
    order = rng.randrange(3)
    if order == 0:
        core = a["colour"] + pattern + details + a["category"]
    elif order == 1:
        core = details + a["colour"] + pattern + a["category"]
    else:
        core = a["colour"] + details + a["category"] + ("，" + pattern + "设计" if pattern else "")
    if brand and a.get("brand"):
        core = rng.choice(("{b}", "{b}品牌", "{b}家的", "来自{b}的")).format(b=a["brand"]) + core
    return core


def hard_captions_for(attrs: dict[str, Any], rng: random.Random) -> list[str]:
    """3-5 distinct references from the hard grammar; when a brand is drawn, at least two name it;
    a second product, when drawn, is named with its colour and category and a style phrase."""
    k = attrs["category"]
    pool = SELLING[k] + _MORE_SELLING[k]
    m, v = _GRAMMAR[k]
    n = rng.randint(3, 5)
    n_brand = rng.randint(2, n) if attrs.get("brand") else 0
    out: list[str] = []
    for i in range(40):
        if len(out) == n:
            break
        s, s2 = rng.sample(pool, 2)
        text = rng.choice(_FRAMES).format(o=rng.choice(_OPENERS), np=_noun_phrase(attrs, rng, i < n_brand),
                                          s=s, s2=s2, m=m, v=v, bg=_BG_WORDS[attrs.get("background", "plain")])
        second = attrs.get("second")
        if second:
            text += "，{r}{c}{k}，{st}风格".format(r=rng.choice(_RELATIONS), c=second["colour"],
                                                k=second["category"], st=rng.choice(_STYLES))
        text += "。" if rng.random() < 0.25 else ""
        if text not in out:
            out.append(text)
    rng.shuffle(out)
    return out
