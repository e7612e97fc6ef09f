"""Caption cleaning rules, each on its own and counted."""
from collections import Counter

from ecomcap.config import CleanConfig
from ecomcap.data.clean import (
    clean_reference,
    clean_references,
    cut_truncated,
    garbled_share,
    normalize,
)

CFG = CleanConfig()


def test_normalize_special_tokens_fullwidth_and_spaces():
    assert normalize("<|im_start|> ＮＯＶＡ  红色 Ｔ恤，２０２４新款 <|im_end|>") == "NOVA红色T恤，2024新款"
    assert normalize("Nike  Air 运动鞋") == "Nike Air运动鞋"
    assert normalize("红色\tT恤\u3000百搭") == "红色T恤百搭"


def test_looping_and_garbled_are_dropped():
    assert clean_reference("好看好看好看好看好看好看好看", CFG).reason == "caption_looping"
    assert clean_reference("这款裙子这款裙子这款裙子这款裙子真好", CFG).reason == "caption_looping"
    assert clean_reference("Ã¤Â¸Â­æ–‡红色T恤", CFG).reason == "caption_garbled"
    assert clean_reference("红色\ufffd\ufffd\ufffdT恤", CFG).reason == "caption_garbled"
    assert clean_reference("\ufffd\ufffd\ufffd", CFG).reason == "caption_garbled"  # not "empty"
    assert clean_reference("红色条纹T恤，简约百搭，透气舒适", CFG).reason is None
    assert garbled_share("温度±5°C，尺寸20×30cm") == 0.0  # real symbols are not mojibake


def test_truncated_reference_cut_to_last_sentence_end():
    assert cut_truncated("红色条纹T恤，简约百搭。面料采用了") == "红色条纹T恤，简约百搭。"
    assert cut_truncated("红色T恤，简约百搭") == "红色T恤，简约百搭"  # no sentence end: left alone
    assert cut_truncated("尺寸2.5米的桌布") == "尺寸2.5米的桌布"  # decimal point is not a sentence end
    assert cut_truncated("好看！") == "好看！"
    res = clean_reference("红色条纹T恤，简约百搭。面料采用了", CFG)
    assert res.text == "红色条纹T恤，简约百搭。" and res.changes == ["cut_truncated"]
    off = CFG.model_copy(update={"cut_truncated": False})
    assert clean_reference("红色条纹T恤，简约百搭。面料采用了", off).text.endswith("采用了")


def test_empty_too_long_and_style_rules():
    assert clean_reference("  <|endoftext|> ", CFG).reason == "caption_empty"
    assert clean_reference("！！。。", CFG).reason == "caption_empty"
    long = "".join(chr(0x4E00 + i) for i in range(250))
    assert clean_reference(long, CFG).reason == "caption_too_long"
    style = CFG.model_copy(update={"require_style": True})
    assert clean_reference("写实风格，一只红色杯子", style).text == "写实风格，一只红色杯子"
    assert clean_reference("一只红色杯子", style).reason == "caption_no_style"
    assert clean_reference("一只红色杯子", CFG).reason is None


def test_rules_can_be_switched_off():
    off = CleanConfig(normalize=False, drop_looping=False, drop_garbled=False, cut_truncated=False)
    assert clean_reference("好看好看好看好看好看好看好看", off).text == "好看好看好看好看好看好看好看"
    assert clean_reference(" ＮＯＶＡ ", off).text == " ＮＯＶＡ "


def test_clean_references_counts_and_image_verdict():
    counts = Counter()
    res = clean_references(["红色T恤", " 红色T恤 ", "好看好看好看好看好看", ""], CFG, counts)
    assert res.kept == ["红色T恤"] and res.reason is None
    assert counts == Counter(
        normalized=1, dropped_duplicate_reference=1, dropped_caption_looping=1, dropped_caption_empty=1
    )
    assert clean_references(["", " "], CFG, Counter()).reason == "caption_empty"
    assert clean_references(["", "好看好看好看好看好看"], CFG, Counter()).reason == "no_valid_caption"
    assert clean_references([], CFG, Counter()).reason == "no_captions"
