"""The synthetic benchmark must be deterministic, truthful (captions name what is drawn) and
its corruption list must point at exactly the bad lines ingest is expected to quarantine."""
from __future__ import annotations

import io
import json
import random
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecomcap.data.formats import decode_base64
from ecomcap.data.synth import (
    BRANDS,
    CATEGORIES,
    COLOUR_RGB,
    COLOURS,
    PATTERNS,
    REASONS,
    SPLITS,
    generate_synthetic,
    image_for,
    random_attributes,
)
from ecomcap.errors import EcomcapError

SIZES = {"train": 60, "valid": 10, "test": 5}


def _read_lines(path: Path) -> list[str]:
    return path.read_text("utf-8").split("\n")[:-1]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(t) for t in _read_lines(path)]


def _open_image(b64: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(decode_base64(b64)))
        img.load()
    return img


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    generate_synthetic(out, **SIZES, seed=0)
    return out


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dirty")
    counts = generate_synthetic(out, train=240, valid=40, test=5, seed=3, corrupt_rate=0.3)
    return out, counts


def test_files_and_counts(clean_dir: Path) -> None:
    meta = json.loads((clean_dir / "synth.json").read_text("utf-8"))
    assert meta["args"]["train"] == 60 and not (clean_dir / "corruptions.json").exists()
    for split, n in SIZES.items():
        tsv = _read_lines(clean_dir / f"IC_{split}.tsv")
        caps = _jsonl(clean_dir / f"IC_{split}.jsonl")
        attrs = _jsonl(clean_dir / f"attributes_{split}.jsonl")
        assert len(tsv) == len(caps) == len(attrs) == n
        assert meta["counts"][split] == {"images": n, "tsv_rows": n, "jsonl_records": n,
                                         "clean_images": n, "injected": {}, "fixable": 0}
        ids = [t.split("\t")[0] for t in tsv]
        assert ids == [c["image_id"] for c in caps] == [a["image_id"] for a in attrs]
        assert ids[0] == f"syn_{split}_000001"
        if split == "test":
            assert all(set(c) == {"image_id"} for c in caps)


def test_deterministic(clean_dir: Path, tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "same", **SIZES, seed=0)
    for path in clean_dir.iterdir():
        assert (tmp_path / "same" / path.name).read_bytes() == path.read_bytes(), path.name
    generate_synthetic(tmp_path / "other", **SIZES, seed=1)
    for name in ("IC_train.tsv", "IC_train.jsonl"):
        assert (tmp_path / "other" / name).read_bytes() != (clean_dir / name).read_bytes()


def test_refs_name_the_drawn_attributes(clean_dir: Path) -> None:
    for split in ("train", "valid"):
        attrs = {a["image_id"]: a for a in _jsonl(clean_dir / f"attributes_{split}.jsonl")}
        for rec in _jsonl(clean_dir / f"IC_{split}.jsonl"):
            a = attrs[rec["image_id"]]
            refs = rec["text"]
            assert 3 <= len(refs) <= 5 and len(set(refs)) == len(refs)
            for ref in refs:
                assert 10 <= len(ref) <= 30, ref
                assert a["colour"] in ref and a["category"] in ref, (ref, a)
                assert a["pattern"] == "纯色" or a["pattern"] in ref, (ref, a)
                assert not [c for c in COLOURS if c != a["colour"] and c in ref], ref
                assert not [b for b in BRANDS if b != a["brand"] and b in ref], ref
            n_brand = sum(a["brand"] in ref for ref in refs) if a["brand"] else 0
            assert n_brand >= 2 if a["brand"] else n_brand == 0


def test_brand_rate_and_attribute_vocabulary(clean_dir: Path) -> None:
    attrs = _jsonl(clean_dir / "attributes_train.jsonl")
    assert {a["category"] for a in attrs} <= set(CATEGORIES)
    assert {a["pattern"] for a in attrs} <= set(PATTERNS)
    assert 0.15 < sum(a["brand"] is not None for a in attrs) / len(attrs) < 0.6


def _dominant_colour(img: Image.Image, branded: bool) -> str:
    """Most frequent prototype among non-background pixels (above the brand label, if any)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    corners = np.concatenate([arr[:2, :2], arr[:2, -2:], arr[-2:, :2], arr[-2:, -2:]])
    bg = np.median(corners.reshape(-1, 3), axis=0)
    if branded:
        arr = arr[: int(arr.shape[0] * 0.62)]
    px = arr.reshape(-1, 3)
    px = px[np.linalg.norm(px - bg, axis=1) > 40]
    protos = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.float32)
    nearest = np.linalg.norm(px[:, None, :] - protos[None], axis=2).argmin(axis=1)
    return COLOURS[np.bincount(nearest, minlength=len(COLOURS)).argmax()]


def test_images_decode_and_main_colour_dominates(clean_dir: Path) -> None:
    formats: Counter[str] = Counter()
    for split in SPLITS:
        attrs = {a["image_id"]: a for a in _jsonl(clean_dir / f"attributes_{split}.jsonl")}
        for line in _read_lines(clean_dir / f"IC_{split}.tsv"):
            image_id, b64 = line.split("\t")
            img = _open_image(b64)
            formats[img.format] += 1
            assert img.size == (112, 112)
            a = attrs[image_id]
            assert _dominant_colour(img, a["brand"] is not None) == a["colour"], a
    assert formats["JPEG"] > formats["PNG"] > 0


def test_base64_variants(dirty) -> None:
    out, _ = dirty
    cols = [t.split("\t")[1] for t in _read_lines(out / "IC_train.tsv") if "\t" in t]
    assert any("-" in c or "_" in c for c in cols)  # URL-safe rows
    assert any(len(c) % 4 for c in cols)  # unpadded rows


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(EcomcapError):
        generate_synthetic(tmp_path, corrupt_rate=1.5)
    with pytest.raises(EcomcapError):
        generate_synthetic(tmp_path, train=-1)


def test_image_for_and_attributes() -> None:
    rng = random.Random(5)
    for size in (64, 160):
        attrs = random_attributes(rng, brand_rate=1.0)
        assert attrs["brand"] in BRANDS
        img = image_for(attrs, size, rng)
        assert img.size == (size, size) and img.mode == "RGB"
    a = {"category": "杯子", "colour": "白色", "pattern": "条纹", "brand": None}
    assert _dominant_colour(image_for(a, 112, random.Random(1)), False) == "白色"


def _check_entry(e: dict, lines: dict[str, list[str]], attrs: dict[str, dict]) -> None:
    """Each recorded fault must be visible on exactly the line it names."""
    text = lines[e["file"]][e["line"] - 1]
    assert e["image_id"] in text
    reason, rid = e["expected_reason"], e["image_id"]
    split = e["split"]
    tsv_ids = [t.split("\t")[0] for t in lines[f"IC_{split}.tsv"] if "\t" in t]
    cap_ids = [json.loads(t)["image_id"] for t in lines[f"IC_{split}.jsonl"]
               if t.endswith("}")]
    if e["file"].endswith(".tsv") and reason != "malformed_line":
        b64 = text.split("\t")[1]
    if reason == "bad_base64":
        with pytest.raises(ValueError):
            decode_base64(b64)
    elif reason == "empty_image":
        assert text == f"{rid}\t"
    elif reason == "bad_image":
        with pytest.raises(OSError):
            _open_image(b64)
    elif reason == "too_many_pixels":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = Image.open(io.BytesIO(decode_base64(b64))).size
        assert w * h > 100_000_000
    elif reason == "image_too_small":
        assert _open_image(b64).size == (8, 8)
    elif reason == "duplicate_id":
        first = lines[e["file"]].index(next(t for t in lines[e["file"]] if t.startswith(rid)))
        assert first < e["line"] - 1 and tsv_ids.count(rid) == 2
        assert _open_image(lines[e["file"]][first].split("\t")[1]).size == (112, 112)
    elif reason == "no_captions":
        assert rid not in cap_ids
    elif reason == "captions_without_image":
        assert rid not in tsv_ids
    elif reason == "malformed_line":
        assert "\t" not in text
    elif reason == "bad_json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    elif reason is None:  # fixable: the repaired ref still names the drawn attributes
        ref = json.loads(text)["text"][e["ref_index"]]
        repair = {
            "truncated_after_stop": lambda r: r[: r.rindex("。") + 1],
            "special_tokens": lambda r: r.removeprefix("<|im_start|>").removesuffix("<|im_end|>"),
            "fullwidth_and_spaces": lambda r: unicodedata.normalize("NFKC", r).replace(" ", ""),
        }[e["note"]]
        fixed = repair(ref)
        assert fixed != ref and attrs[rid]["colour"] in fixed and attrs[rid]["category"] in fixed
    else:
        refs = json.loads(text)["text"]
        checks = {
            "caption_looping": lambda r: any(u * 5 in r for u in ("好看", "质量很好", "推荐",
                                                                   "喜欢", "不错哦")),
            "caption_garbled": lambda r: "\ufffd" in r or "è" in r,
            "caption_empty": lambda r: r.replace("<|endoftext|>", "").replace(
                "<|im_start|>", "").replace("<|im_end|>", "").strip() == "",
            "caption_too_long": lambda r: len(r) > 300 and len(set(r.split("、"))) > 50,
        }
        assert refs and all(checks[reason](r) for r in refs), (reason, refs)


def test_corruptions_point_at_real_lines(dirty) -> None:
    out, counts = dirty
    entries = json.loads((out / "corruptions.json").read_text("utf-8"))
    lines = {p.name: _read_lines(p) for p in out.glob("IC_*")}
    attrs = {a["image_id"]: a for p in out.glob("attributes_*") for a in _jsonl(p)}
    for e in entries:
        _check_entry(e, lines, attrs)
    assert {e["split"] for e in entries} == {"train", "valid"}
    by_split = Counter((e["split"], e["expected_reason"]) for e in entries)
    assert {r for _, r in by_split} == set(REASONS) | {None}
    for split in ("train", "valid"):
        c = counts[split]
        assert c["injected"] == {r: by_split[split, r] for r in REASONS if by_split[split, r]}
        assert c["fixable"] == by_split[split, None]
        assert c["tsv_rows"] == len(lines[f"IC_{split}.tsv"])
        assert c["jsonl_records"] == len(lines[f"IC_{split}.jsonl"])
        lost = sum(n for r, n in c["injected"].items()
                   if r not in ("duplicate_id", "captions_without_image", "bad_json"))
        assert c["clean_images"] == c["images"] - lost
    assert counts["test"]["injected"] == {} and counts["test"]["tsv_rows"] == 5


def test_clean_rows_do_not_depend_on_corrupt_rate(dirty, tmp_path: Path) -> None:
    out, _ = dirty
    generate_synthetic(tmp_path, train=240, valid=40, test=5, seed=3)
    for name in ("attributes_train.jsonl", "IC_test.tsv"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
