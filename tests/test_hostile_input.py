"""Input from outside that must cost at most one reference (dropped, counted) or one row
(quarantined with a reason), never a split, an evaluation or a serving batch: lone UTF-16
surrogates, ids of other JSON types, nested or non-list text, control characters, mixed
encodings, very long lines, undecodable file names and images."""
import json
import os
import sys

import pyarrow.parquet as pq
import pytest

from ecomcap.data.formats import encode_base64
from ecomcap.data.ingest import ingest_split
from ecomcap.metrics.evaluate import evaluate_files
from ecomcap.text import tokenize, tokenize_many
from tests.conftest import make_image
from tests.test_cli import run_cli

HOSTILE = [  # (caption JSON line, what must happen to the image "x{i}")
    ('{"image_id": "x0", "text": ["红色连衣裙\\ud800", "红色的裙子"]}', "kept"),  # one ref dropped
    ('{"image_id": "x1", "text": ["\\ud800"]}', "caption_bad_unicode"),
    ('{"image_id": "x2", "text": [["嵌套"]]}', "no_captions"),  # record is bad_json
    ('{"image_id": "x3", "text": "单个字符串说明"}', "kept"),
    ('{"image_id": {"x": 1}, "text": ["对象id"]}', None),  # record bad_json, no image line
    ('{"image_id": "x5", "text": ["控制\\u0000字\\u0007符\\u0001的\\u0002说\\u0003明"]}', "caption_garbled"),
    ('{"image_id": "x6", "text": ["' + "".join(chr(0x4E00 + i % 20000) for i in range(19_000)) + '"]}',
     "caption_too_long"),  # a 57 kB line
    ('{"image_id": "x7\\ud800", "text": ["坏id"]}', None),  # record bad_json
    ('{"image_id": "x8", "text": {"a": "b"}}', "no_captions"),
    ('{"image_id": "x9", "text": [1, 2]}', "no_captions"),
    ('{"image_id": 10, "text": ["整数id也可以"]}', "kept"),
    ('{"image_id": true, "text": ["布尔id"]}', None),
]


def test_hostile_captions_cost_a_reference_or_a_row(tmp_path):
    ids = [f"x{i}" for i in range(10)] + ["10"]
    tsv = "".join(f"{i}\t{encode_base64(make_image('red'))}\n" for i in ids)
    (tmp_path / "IC_train.tsv").write_text(tsv, encoding="utf-8")
    with open(tmp_path / "IC_train.jsonl", "wb") as fh:
        fh.write("\n".join(line for line, _ in HOSTILE).encode("utf-8") + b"\n")
        fh.write('{"image_id": "x11", "text": ["caf\xe9 latin-1"]}\n'.encode("latin-1"))  # mixed encodings
    res = ingest_split(tmp_path, "train", tmp_path / "out")
    rep = res.report
    assert rep["rows_in"] == rep["rows_ok"] + rep["rows_quarantined"]
    kept = {r["image_id"]: r["texts"] for r in pq.read_table(res.out_dir / "shards").to_pylist()}
    assert kept == {"x0": ["红色的裙子"], "x3": ["单个字符串说明"], "10": ["整数id也可以"]}
    q = {r["image_id"]: r["reason"] for r in pq.read_table(res.out_dir / "quarantine.parquet").to_pylist()
         if r["image_id"]}
    for i, (_, want) in enumerate(HOSTILE):
        if want not in (None, "kept"):
            assert q[f"x{i}"] == want, (i, q)
    assert rep["caption_rules"]["dropped_caption_bad_unicode"] == 2
    assert rep["reasons"]["bad_json"] == 6  # nested, dict id, surrogate id, dict text, int list, bool id
    json.dumps(rep, ensure_ascii=False).encode("utf-8")  # the report itself is writable


def test_an_extremely_elongated_image_is_quarantined(tmp_path):
    """Qwen2-VL's image processor raises for > 200:1 images, for the whole batch it is in."""
    (tmp_path / "IC_train.tsv").write_text(
        f"ok\t{encode_base64(make_image('red'))}\nthin\t{encode_base64(make_image('red', (3400, 16), 'PNG'))}\n")
    (tmp_path / "IC_train.jsonl").write_text('{"image_id": "ok", "text": ["红色"]}\n{"image_id": "thin", "text": ["红色"]}\n')
    res = ingest_split(tmp_path, "train", tmp_path / "out")
    assert res.report["rows_ok"] == 1 and res.report["reasons"] == {"extreme_aspect_ratio": 1}


def test_evaluation_survives_broken_unicode(tmp_path):
    gold, pred = tmp_path / "gold.jsonl", tmp_path / "pred.jsonl"
    gold.write_text('{"image_id": "a", "text": ["红色连衣裙", "红色\\ud800的裙子"]}\n'
                    '{"image_id": "b", "text": ["\\udfff"]}\n{"image_id": 3, "text": ["蓝色衬衫"]}\n')
    pred.write_text('{"image_id": "a", "text": "红色\\ud800连衣裙"}\n{"image_id": "b", "text": "随便"}\n'
                    '{"image_id": 3, "text": "蓝色衬衫"}\n')
    out = evaluate_files(pred, gold)
    assert out["n"] == 2 and out["input_issues"] == {
        "references_bad_unicode": 2, "gold_images_without_valid_reference": 1, "predictions_bad_unicode": 1}
    rc, stdout, err = run_cli("evaluate", "--pred", pred, "--gold", gold, "--json")
    assert rc == 0 and "Traceback" not in err and json.loads(stdout)["n"] == 2


def test_tokenisers_agree_on_lone_surrogates():
    text = "红色\ud800连衣裙ABC\udfff"
    assert tokenize_many([text, "好"]) == [tokenize(text), ["好"]] and tokenize(text)[-1] == "abc"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names are bytes")
def test_cli_with_an_undecodable_file_name(tmp_path):
    src = os.fsdecode(os.fsencode(str(tmp_path)) + b"/d\xff")
    os.makedirs(src)
    (tmp_path / "IC_train.tsv").write_text(f"a\t{encode_base64(make_image('red'))}\n")
    os.rename(tmp_path / "IC_train.tsv", os.path.join(src, "IC_train.tsv"))
    with open(os.path.join(src, "IC_train.jsonl"), "w", encoding="utf-8") as fh:
        fh.write('{"image_id": "a", "text": ["红色"]}\n')
    rc, stdout, err = run_cli("ingest", "--src", src, "--split", "train", "--out", tmp_path / "o", "--json",
                              "--no-gx", "--max-bad-rate", "1")
    assert rc == 0, err
    assert "Traceback" not in err and json.loads(stdout)["rows_ok"] == 1


def test_attribute_ground_truth_skips_unusable_lines(tmp_path):
    from ecomcap.metrics.attributes import read_attributes

    p = tmp_path / "attributes_valid.jsonl"
    p.write_bytes('{"image_id": "a", "category": "T恤"}\n{not json\n{"no_id": 1}\n'
                  '{"image_id": 7, "category": "帽子"}\n'.encode("utf-8") + b'{"image_id": "\xff"}\n')
    got = read_attributes(p)
    assert set(got) == {"a", "7", "\ufffd"} and got["7"]["category"] == "帽子"
