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


def test_sft_validation_logs_brand_accuracy_from_the_references(tiny_model_cfg, small_data, tmp_path):
    """With a brand lexicon, every validation also scores brand recognition (the brand the image's
    references name), so a brand recipe shows its curve per epoch."""
    import json

    from ecomcap.config import FinetuneConfig, GenerateConfig
    from ecomcap.data.synth_draw import BRANDS
    from ecomcap.training.sft import run_sft
    from tests.test_sft import _cfg

    res = run_sft(small_data["train"], small_data["valid"], tiny_model_cfg, FinetuneConfig(strategy="lora"),
                  _cfg(tmp_path / "s", max_steps=2, eval_every=2, eval_images=8, save_every=0),
                  GenerateConfig(num_beams=1, max_new_tokens=6), brands=list(BRANDS))
    rows = [json.loads(line) for line in (res.final_dir.parent / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_CIDEr-D" in r]
    assert [r["step"] for r in evals] == [2]
    # the logged figure is the brand accuracy of the step-2 (final) model's captions of those images
    from ecomcap.data.brand_balance import named_brand
    from ecomcap.data.shards import read_references
    from ecomcap.inference.generate import caption_images
    from ecomcap.modeling.load import load_trained
    from ecomcap.training.collate import PromptBuilder
    from ecomcap.training.data import ShardImages

    valid = ShardImages(small_data["valid"])
    model, processor = load_trained(res.final_dir, tiny_model_cfg)
    caps = caption_images(model, PromptBuilder(processor, tiny_model_cfg.prompt),
                          [valid.image(i) for i in range(len(valid))], GenerateConfig(num_beams=1, max_new_tokens=6),
                          progress=False)
    refs = read_references(small_data["valid"])
    truth = {i: {"brand": named_brand(refs[i], list(BRANDS))} for i in valid.ids}
    want = brand_accuracy(dict(zip(valid.ids, caps)), truth)
    assert want["n"] > 0 and evals[0]["val_brand_micro"] == pytest.approx(want["micro"])
    assert evals[0]["val_brand_macro"] == pytest.approx(want["macro"])
    # full-width brand words (raw references before cleaning) count as the brand
    assert named_brand(["ＮＯＶＡ红色T恤", "红色T恤"], list(BRANDS)) == "NOVA"


def test_without_ground_truth_the_brand_is_the_one_the_references_name():
    """Real data has no attribute labels: with a brand lexicon, brand recognition is scored against
    the brand most of each image's references name (and images naming none are unbranded)."""
    from ecomcap.metrics.brands import brand_counts, brands_from_references
    from ecomcap.metrics.report import caption_report

    refs = {"a": ["NOVA红色T恤", "NOVA的T恤", "红色T恤"], "b": ["ZEN帽子", "帽子"], "c": ["蓝色杯子"]}
    lexicon = ["NOVA", "ZEN"]
    assert brands_from_references(refs, lexicon) == {"a": {"brand": "NOVA"}, "b": {"brand": "ZEN"}, "c": {"brand": None}}
    preds = {"a": "NOVA红色T恤", "b": "NOVA帽子", "c": "蓝色杯子"}
    rep = caption_report(preds, refs, None, {"NOVA": 30, "ZEN": 2}, lexicon)
    assert "attributes" not in rep
    b = rep["brands"]
    assert (b["micro"], b["macro"], b["frequent"], b["rare"]) == (0.5, 0.5, 1.0, 0.0)
    assert b["wrong_brand"] == pytest.approx(1 / 3)  # "b" names NOVA, not ZEN
    assert "brands" not in caption_report(preds, refs)  # no lexicon, no ground truth: not scored
    assert brand_counts(brands_from_references(refs, lexicon)) == {"NOVA": 1, "ZEN": 1}
