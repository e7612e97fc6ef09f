"""Streaming ingest: every row lands in a shard or in quarantine with the right reason."""
import json

import pyarrow.parquet as pq
import pytest

from ecomcap.config import CleanConfig, IngestConfig
from ecomcap.data.formats import encode_base64, write_jsonl
from ecomcap.data.ingest import ingest_split
from ecomcap.data.shards import iter_batches, read_references, read_table
from ecomcap.data.validate import enforce, validate_dataset
from ecomcap.errors import EcomcapError
from tests.conftest import make_image


def _write_tsv(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@pytest.fixture()
def dirty_source(tmp_path, bomb_png):
    """One clean row per format variant and one row per bad-row reason; returns (dir, expected)."""
    jpg, png = make_image("red"), make_image("blue", fmt="PNG")
    truncated = jpg[: len(jpg) * 2 // 5]
    lines = [
        f"ok1\t{encode_base64(jpg)}",
        f"ok2\t{encode_base64(png, urlsafe=True, padding=False)}",
        f"ok3\t{encode_base64(jpg)}",
        "bad_b64\t@@@!!",
        "empty\t",
        f"notimg\t{encode_base64(b'hello world, not an image')}",
        f"trunc\t{encode_base64(truncated)}",
        f"bomb\t{encode_base64(bomb_png)}",
        f"tiny\t{encode_base64(make_image(size=(8, 8)))}",
        f"ok1\t{encode_base64(png)}",
        "no_tab_here",
        f"nocap\t{encode_base64(jpg)}",
        f"loop\t{encode_base64(jpg)}",
        f"mixed\t{encode_base64(jpg)}",
    ]
    _write_tsv(tmp_path / "IC_train.tsv", lines)
    write_jsonl(
        tmp_path / "IC_train.jsonl",
        [
            {"image_id": "ok1", "text": ["红色条纹T恤，简约百搭", " ＮＯＶＡ 红色T恤 "]},
            {"image_id": "ok2", "text": ["蓝色帽子。遮阳效果好。面料采用了"]},
            {"image_id": "ok3", "text": "绿色杯子"},
            {"image_id": "bad_b64", "text": ["x"]},
            {"image_id": "empty", "text": ["x"]},
            {"image_id": "notimg", "text": ["x"]},
            {"image_id": "trunc", "text": ["x"]},
            {"image_id": "bomb", "text": ["x"]},
            {"image_id": "tiny", "text": ["x"]},
            {"image_id": "loop", "text": ["好看好看好看好看好看好看", "哈哈哈哈哈哈哈哈哈哈"]},
            {"image_id": "mixed", "text": ["", "好看好看好看好看好看好看"]},
            {"image_id": "orphan", "text": ["孤儿描述"]},
            {"image_id": "ok3", "text": ["重复的记录"]},
        ],
    )
    with open(tmp_path / "IC_train.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    expected = {
        ("IC_train.tsv", "bad_b64"): "bad_base64",
        ("IC_train.tsv", "empty"): "empty_image",
        ("IC_train.tsv", "notimg"): "bad_image",
        ("IC_train.tsv", "trunc"): "bad_image",
        ("IC_train.tsv", "bomb"): "too_many_pixels",
        ("IC_train.tsv", "tiny"): "image_too_small",
        ("IC_train.tsv", "ok1"): "duplicate_id",
        ("IC_train.tsv", "no_tab_here"): "malformed_line",
        ("IC_train.tsv", "nocap"): "no_captions",
        ("IC_train.tsv", "loop"): "caption_looping",
        ("IC_train.tsv", "mixed"): "no_valid_caption",
        ("IC_train.jsonl", "orphan"): "captions_without_image",
        ("IC_train.jsonl", "ok3"): "duplicate_caption_id",
        ("IC_train.jsonl", ""): "bad_json",
    }
    return tmp_path, expected


def test_every_bad_row_quarantined_with_its_reason(dirty_source, tmp_path):
    src, expected = dirty_source
    res = ingest_split(src, "train", tmp_path / "out", IngestConfig(max_bad_rate=1.0))
    rep = res.report
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    got = {}
    for row in q:
        key = (row["source"], row["image_id"] if row["reason"] != "malformed_line" else "no_tab_here")
        got[key] = row["reason"]
    assert got == expected
    assert rep["rows_in"] == 14 + 3 == rep["rows_ok"] + rep["rows_quarantined"]
    assert rep["rows_ok"] == 3 and rep["rows_quarantined"] == len(expected)
    assert sum(rep["reasons"].values()) == rep["rows_quarantined"]
    assert all(row["line_no"] > 0 for row in q)


def test_shard_rows_hold_decoded_bytes_and_cleaned_references(dirty_source, tmp_path):
    src, _ = dirty_source
    ingest_split(src, "train", tmp_path / "out", IngestConfig(max_bad_rate=1.0))
    rows = {r["image_id"]: r for r in read_table(tmp_path / "out").to_pylist()}
    assert set(rows) == {"ok1", "ok2", "ok3"}
    assert rows["ok1"]["image"] == make_image("red") and rows["ok1"]["format"] == "JPEG"
    assert (rows["ok1"]["width"], rows["ok1"]["height"]) == (64, 48)
    assert rows["ok2"]["image"] == make_image("blue", fmt="PNG") and rows["ok2"]["format"] == "PNG"
    assert rows["ok1"]["texts"] == ["红色条纹T恤，简约百搭", "NOVA红色T恤"]
    assert rows["ok2"]["texts"] == ["蓝色帽子。遮阳效果好。"]
    assert rows["ok3"]["texts"] == ["绿色杯子"]
    import hashlib

    assert rows["ok3"]["sha256"] == hashlib.sha256(rows["ok3"]["image"]).hexdigest()
    assert read_references(tmp_path / "out")["ok2"] == ["蓝色帽子。遮阳效果好。"]


def test_bad_rate_gate_and_gx_pass(dirty_source, tmp_path):
    src, _ = dirty_source
    cfg = IngestConfig()  # 5% limit
    res = ingest_split(src, "train", tmp_path / "out", cfg)
    report = validate_dataset(res.out_dir, cfg)
    assert report["gx"]["success"] and report["gx"]["evaluated"] >= 8
    assert (tmp_path / "out" / "gx_result.json").is_file()
    assert not report["passed"]
    with pytest.raises(EcomcapError, match=r"14 of 17 rows quarantined .*limit 5.0%"):
        enforce(report)


def test_gx_failure_is_reported(dirty_source, tmp_path):
    src, _ = dirty_source
    res = ingest_split(src, "train", tmp_path / "out", IngestConfig(max_bad_rate=1.0))
    strict = IngestConfig(max_bad_rate=1.0, min_side=60)  # images are 64x48: height fails
    report = validate_dataset(res.out_dir, strict)
    assert not report["gx"]["success"]
    failed = {(f["expectation"], f["column"]) for f in report["gx"]["failed"]}
    assert ("expect_column_values_to_be_between", "height") in failed
    with pytest.raises(EcomcapError, match="data expectations failed"):
        enforce(report)


def test_shards_roll_over_and_stream_back(tmp_path):
    lines = [f"id{i:03d}\t{encode_base64(make_image((i, 0, 0)))}" for i in range(25)]
    _write_tsv(tmp_path / "IC_valid.tsv", lines)
    write_jsonl(tmp_path / "IC_valid.jsonl", [{"image_id": f"id{i:03d}", "text": [f"第{i}号"]} for i in range(25)])
    cfg = IngestConfig(rows_per_shard=10, rows_per_group=4)
    rep = ingest_split(tmp_path, "valid", tmp_path / "out", cfg).report
    assert rep["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    ids = [i for b in iter_batches(tmp_path / "out", ["image_id"], batch_size=3) for i in b.column(0).to_pylist()]
    assert ids == [f"id{i:03d}" for i in range(25)]
    # re-ingest into the same dir with bigger shards leaves no stale shard behind
    rep2 = ingest_split(tmp_path, "valid", tmp_path / "out", IngestConfig()).report
    assert rep2["shards"] == ["part-00000.parquet"]
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["part-00000.parquet"]
    assert rep2["fingerprint"] == rep["fingerprint"]


def test_test_split_needs_no_text_and_flags_ids_without_image(tmp_path):
    _write_tsv(tmp_path / "IC_test.tsv", [f"t{i}\t{encode_base64(make_image())}" for i in range(3)])
    write_jsonl(tmp_path / "IC_test.jsonl", [{"image_id": f"t{i}"} for i in range(4)])
    rep = ingest_split(tmp_path, "test", tmp_path / "out", IngestConfig(max_bad_rate=0.5)).report
    assert (rep["rows_ok"], rep["reasons"]) == (3, {"id_without_image": 1})
    assert validate_dataset(tmp_path / "out", IngestConfig(max_bad_rate=0.5))["passed"]


def test_ad_format_with_style_rule(tmp_path):
    img = encode_base64(make_image())
    _write_tsv(
        tmp_path / "train.tsv",
        [f"a1\t{img}\t写实风格，一位女士手持红色杯子", f"a2\t{img}\t一位女士手持红色杯子", f"a1\t{img}\t卡通风格，重复"],
    )
    cfg = IngestConfig(max_bad_rate=1.0, clean=CleanConfig(require_style=True))
    rep = ingest_split(tmp_path, "train", tmp_path / "out", cfg).report
    assert rep["format"] == "ad"
    assert rep["reasons"] == {"caption_no_style": 1, "duplicate_id": 1}
    assert read_references(tmp_path / "out") == {"a1": ["写实风格，一位女士手持红色杯子"]}


def test_report_json_matches_return(dirty_source, tmp_path):
    src, _ = dirty_source
    res = ingest_split(src, "train", tmp_path / "out", IngestConfig(max_bad_rate=1.0))
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert on_disk == res.report
    assert on_disk["caption_rules"] == {"cut_truncated": 1, "dropped_caption_empty": 1,
                                        "dropped_caption_looping": 3, "normalized": 1}


def _branded_source(tmp_path, per_brand):
    """A train split whose references name brands `per_brand` times each (plus unbranded rows)."""
    rows, caps = [], []
    for brand, n in per_brand.items():
        for i in range(n):
            image_id = f"{brand}{i}"
            rows.append(f"{image_id}\t{encode_base64(make_image((10 * i % 250, 0, 0)))}")
            caps.append({"image_id": image_id, "text": [f"{brand}红色T恤", f"{brand.lower()}的上衣", "红色T恤"]})
    for i in range(4):
        rows.append(f"plain{i}\t{encode_base64(make_image((0, 10 * i, 0)))}")
        caps.append({"image_id": f"plain{i}", "text": ["蓝色连衣裙"]})
    _write_tsv(tmp_path / "IC_train.tsv", rows)
    write_jsonl(tmp_path / "IC_train.jsonl", caps)
    _write_tsv(tmp_path / "IC_valid.tsv", rows)
    write_jsonl(tmp_path / "IC_valid.jsonl", caps)
    return tmp_path


def test_brand_balance_drops_rare_brands_from_train_and_counts_them(tmp_path):
    from ecomcap.config import BrandBalanceConfig

    src = _branded_source(tmp_path, {"NOVA": 6, "KIKO": 2, "ZEN": 1})
    # 3 of 13 images filtered (23%) pass a 5% bad-rate gate: the filter's drops are a choice, not defects
    cfg = IngestConfig(max_bad_rate=0.05, brand_balance=BrandBalanceConfig(min_images=3, brands=["NOVA", "KIKO", "ZEN"]))
    rep = ingest_split(src, "train", tmp_path / "train", cfg).report
    assert rep["passed"] and rep["bad_rate"] == 0 and rep["rows_filtered"] == 3
    assert rep["rows_in"] == 13 == rep["rows_ok"] + rep["rows_quarantined"]
    assert rep["reasons"] == {"rare_brand": 3} and rep["rows_ok"] == 10
    assert rep["brand_balance"] == {"min_images": 3, "images_per_brand": {"NOVA": 6, "KIKO": 2, "ZEN": 1},
                                    "brands_dropped": ["KIKO", "ZEN"], "images_dropped": 3}
    q = pq.read_table(tmp_path / "train" / "quarantine.parquet").to_pylist()
    assert {r["image_id"] for r in q} == {"KIKO0", "KIKO1", "ZEN0"} and "2 images < brand_balance" in q[0]["detail"]
    valid = ingest_split(src, "valid", tmp_path / "valid", cfg).report  # the evaluation set stays whole
    assert valid["rows_ok"] == 13 and "brand_balance" not in valid
    off = ingest_split(src, "train", tmp_path / "off", IngestConfig()).report
    assert off["rows_ok"] == 13 and "brand_balance" not in off


def test_brand_balance_needs_a_brand_list(tmp_path):
    from ecomcap.config import BrandBalanceConfig

    src = _branded_source(tmp_path, {"NOVA": 2})
    with pytest.raises(EcomcapError, match="brand_balance.brands is empty"):
        ingest_split(src, "train", tmp_path / "t", IngestConfig(brand_balance=BrandBalanceConfig(min_images=3)))


def test_the_synthetic_set_fills_in_its_brands():
    from ecomcap.config import DataConfig
    from ecomcap.data.prepare import ingest_config
    from ecomcap.data.synth_draw import BRANDS

    on = DataConfig.model_validate({"ingest": {"brand_balance": {"min_images": 5}}})
    assert ingest_config(on).brand_balance.brands == list(BRANDS)
    assert ingest_config(DataConfig()).brand_balance.brands == []  # off: nothing to fill
