"""The hard synthetic set: deterministic bytes, photo-like variation, long-tailed brands, references
that name what is drawn (and only visible details), ground truth kept for every image."""
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from ecomcap.data.formats import decode_base64
from ecomcap.data.synth import generate_synthetic
from ecomcap.data.synth_hard import FINE_PRINT, HARD_BRANDS, hard_attributes
from ecomcap.metrics.attributes import attribute_accuracy, attribute_checks


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    generate_synthetic(root, train=300, valid=30, test=5, seed=7, difficulty="hard")
    return root


def _core_hits(text: str, a: dict) -> tuple[int, int]:
    checks = attribute_checks(text, a)
    return sum(checks.get(f, True) for f in ("category", "colour", "pattern", "brand")), sum(checks.values())


def _rows(root: Path, split: str = "train"):
    refs = {r["image_id"]: r["text"] for r in map(json.loads, (root / f"IC_{split}.jsonl").read_text("utf-8").splitlines())}
    attrs = {r["image_id"]: r for r in map(json.loads, (root / f"attributes_{split}.jsonl").read_text("utf-8").splitlines())}
    return refs, attrs


def test_same_seed_same_bytes_other_seed_differs(hard, tmp_path):
    again = tmp_path / "again"
    generate_synthetic(again, train=300, valid=30, test=5, seed=7, difficulty="hard")
    assert _digest(again) == _digest(hard)
    other = tmp_path / "other"
    generate_synthetic(other, train=300, valid=30, test=5, seed=8, difficulty="hard")
    assert _digest(other)["IC_train.tsv"] != _digest(hard)["IC_train.tsv"]
    easy = tmp_path / "easy"
    generate_synthetic(easy, train=300, valid=30, test=5, seed=7)
    assert _digest(easy)["IC_train.tsv"] != _digest(hard)["IC_train.tsv"]
    assert json.loads((hard / "synth.json").read_text())["args"]["difficulty"] == "hard"


def test_images_vary_in_size_aspect_and_quality(hard):
    sizes, jpeg = Counter(), 0
    for line in (hard / "IC_train.tsv").read_text("utf-8").splitlines()[:120]:
        data = decode_base64(line.split("\t")[1])
        img = Image.open(__import__("io").BytesIO(data))
        sizes[img.size] += 1
        jpeg += img.format == "JPEG"
    aspects = {round(w / h, 1) for w, h in sizes}
    assert len(sizes) > 30 and len(aspects) >= 4, sizes  # mixed sizes and aspect ratios
    assert jpeg > 100


def test_references_name_what_is_drawn_and_are_not_templates(hard):
    refs, attrs = _rows(hard)
    assert set(refs) == set(attrs)  # ground truth for every image
    for image_id, texts in refs.items():
        a = attrs[image_id]
        assert 3 <= len(texts) <= 5 and len(set(texts)) == len(texts)
        assert all(a["category"] in t and a["colour"] in t for t in texts)
        if a["brand"]:
            assert sum(a["brand"] in t for t in texts) >= 2
        else:
            assert not any(b in t for b in HARD_BRANDS for t in texts)
        if a.get("second"):
            assert all(a["second"]["category"] in t and "风格" in t for t in texts)
        for detail in ("短袖", "长袖", "无袖", "圆领", "V领"):
            if any(detail in t for t in texts):  # a detail is named only when drawn
                assert detail in (a.get("sleeve"), a.get("neckline")), (texts, a)
    # the reference naming most of the truth scores 1.0 on every core field; details are named often
    perfect = {i: max(texts, key=lambda t: _core_hits(t, attrs[i])) for i, texts in refs.items()}
    acc = attribute_accuracy(perfect, attrs)
    assert acc["category"] == acc["colour"] == 1.0 and acc["brand"] == 1.0
    assert 0.5 < acc["sleeve"] <= 1.0 and 0.5 < acc["neckline"] <= 1.0
    # far more distinct phrasings than the easy set's 13 templates
    shapes = {"".join("X" if "\u4e00" <= ch <= "\u9fff" else ch for ch in t) for ts in refs.values() for t in ts}
    assert len({t for ts in refs.values() for t in ts}) > 1000 and len(shapes) > 20


def test_brands_are_long_tailed_and_fine_print_is_marked():
    rng = random.Random(0)
    drawn = [hard_attributes(rng, brand_rate=1.0) for _ in range(6000)]
    counts = Counter(a["brand"] for a in drawn)
    assert set(counts) == set(HARD_BRANDS)
    top, tail = counts[HARD_BRANDS[0]], counts[HARD_BRANDS[-1]]
    assert top > 20 * tail > 0  # Zipf-like: the head brand dwarfs the tail
    assert all(a["brand_legible"] == (a["brand"] not in FINE_PRINT) for a in drawn)
    assert {a["brand_view"] for a in drawn} == {"logo", "tag", "corner"}
    assert 0.1 < sum("second" in a for a in drawn) / len(drawn) < 0.2


def test_cli_and_config_switch_and_shift(tmp_path, capsys):
    from ecomcap.cli import main
    from ecomcap.config import DataConfig, SynthConfig
    from ecomcap.data.prepare import brand_lexicon
    from ecomcap.errors import EcomcapError

    assert main(["synth", "--out", str(tmp_path / "c"), "--train", "4", "--valid", "2", "--test", "0",
                 "--difficulty", "hard"]) == 0
    assert json.loads((tmp_path / "c" / "synth.json").read_text())["args"]["difficulty"] == "hard"
    assert brand_lexicon(DataConfig(synth=SynthConfig(difficulty="hard"))) == list(HARD_BRANDS)
    with pytest.raises(EcomcapError, match="shift needs difficulty 'hard'"):
        generate_synthetic(tmp_path / "e", train=2, valid=1, test=0, shift=True)
    generate_synthetic(tmp_path / "s", train=20, valid=20, test=0, seed=1, difficulty="hard", shift=True)
    _, train_attrs = _rows(tmp_path / "s", "train")
    _, valid_attrs = _rows(tmp_path / "s", "valid")
    train_refs, _ = _rows(tmp_path / "s", "train")
    assert {a["background"] for a in train_attrs.values()} == {"plain"}  # narrow training images ...
    assert not any("second" in a for a in train_attrs.values())  # one product drawn, one named
    assert not any("风格" in t for ts in train_refs.values() for t in ts)
    assert len({a["background"] for a in valid_attrs.values()}) > 1  # ... full variation on valid
    sizes = {Image.open(__import__("io").BytesIO(decode_base64(line.split("\t")[1]))).size
             for line in (tmp_path / "s" / "IC_train.tsv").read_text("utf-8").splitlines()}
    assert sizes == {(112, 112)}


def test_a_tiny_model_built_on_other_captions_says_which_characters_it_lacks(tmp_path, caplog):
    import logging

    from ecomcap.config import TinyModelConfig
    from ecomcap.modeling.tiny import ensure_tiny_model

    cfg = TinyModelConfig(text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1, text_intermediate=32,
                          vision_depth=1, vision_hidden=32, vision_heads=2, image_size=56)
    ensure_tiny_model(tmp_path / "tiny", ["红色条纹T恤"], cfg)
    with caplog.at_level(logging.WARNING, logger="ecomcap.modeling.tiny"):
        ensure_tiny_model(tmp_path / "tiny", ["红色条纹T恤"], cfg)
        assert "not in its vocabulary" not in caplog.text
        ensure_tiny_model(tmp_path / "tiny", ["红色V领长袖T恤"], cfg)
    assert "3 characters of these (袖长领)" in caplog.text  # V is in the vocabulary (printable ASCII)
