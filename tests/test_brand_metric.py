"""Brand accuracy against hand-made cases: per brand, micro vs macro, frequent vs rare, a wrong
brand named, images without a brand."""
import pytest

from ecomcap.metrics.brands import brand_accuracy, brand_counts

ATTRS = {
    "1": {"brand": "NOVA"}, "2": {"brand": "NOVA"}, "3": {"brand": "NOVA"}, "4": {"brand": "NOVA"},
    "5": {"brand": "Kiro"}, "6": {"brand": "Kiro"},
    "7": {"brand": ""}, "8": {},
}
PREDS = {
    "1": "NOVA红色T恤", "2": "nova 蓝色连衣裙", "3": "红色T恤", "4": "Kiro白色卫衣",  # NOVA: 2 of 4, one wrong brand
    "5": "KIRO 黑色外套", "6": "Kiro外套",  # Kiro: 2 of 2
    "7": "纯色衬衫", "8": "NOVA衬衫",  # no brand drawn; 8 names one anyway
    "9": "not in the ground truth",
}


def test_per_brand_micro_macro_and_wrong_brands():
    r = brand_accuracy(PREDS, ATTRS)
    assert r["per_brand"] == {"Kiro": 1.0, "NOVA": 0.5}
    assert r["micro"] == pytest.approx(4 / 6) and r["macro"] == pytest.approx(0.75)
    assert r["n"] == 6 and r["brands"] == 2
    assert r["wrong_brand"] == pytest.approx(2 / 8)  # image 4 (Kiro on a NOVA item), image 8 (no brand drawn)


def test_frequent_and_rare_follow_the_training_counts():
    r = brand_accuracy(PREDS, ATTRS, train_counts={"NOVA": 500, "Kiro": 3}, rare_below=20)
    assert r["frequent"] == pytest.approx(0.5) and r["rare"] == pytest.approx(1.0) and r["rare_brands"] == 1
    r = brand_accuracy(PREDS, ATTRS, train_counts={"NOVA": 500, "Kiro": 300}, rare_below=20)
    assert r["rare"] is None and r["frequent"] == pytest.approx(0.75)


def test_no_branded_images():
    r = brand_accuracy({"7": "纯色衬衫"}, {"7": {"brand": ""}})
    assert r["micro"] is None and r["macro"] is None and r["n"] == 0 and r["wrong_brand"] == 0.0
    assert brand_counts(ATTRS) == {"NOVA": 4, "Kiro": 2}


def test_the_caption_report_carries_brand_recognition():
    from ecomcap.metrics.report import caption_report

    refs = {k: ["红色T恤"] for k in ATTRS}
    attrs = {k: {"category": "T恤", "colour": "红色", "pattern": "纯色", **v} for k, v in ATTRS.items()}
    r = caption_report({k: v for k, v in PREDS.items() if k in ATTRS}, refs, attrs, {"NOVA": 500, "Kiro": 3})
    assert r["brands"]["macro"] == pytest.approx(0.75) and r["brands"]["rare"] == pytest.approx(1.0)
    assert r["attributes"]["brand"] == pytest.approx(4 / 6)  # the attribute figure is the micro one
    assert "brands" not in caption_report({"1": "x"}, {"1": ["y"]})
