"""MUGE/ad file readers: base64 variants, BOM/CRLF/blank lines, layout detection."""
import base64

import pytest

from ecomcap.data.formats import (
    Line,
    caption_record,
    decode_base64,
    detect_layout,
    encode_base64,
    iter_lines,
    parse_json_line,
)
from ecomcap.errors import EcomcapError

PAYLOAD = bytes(range(256)) * 3 + b"\xfb\xff\xfe"  # hits '+', '/', '-', '_' in encodings


@pytest.mark.parametrize("urlsafe", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_base64_round_trip_all_variants(urlsafe, padding):
    for n in range(0, 12):
        data = PAYLOAD[: len(PAYLOAD) - n]
        text = encode_base64(data, urlsafe=urlsafe, padding=padding)
        assert decode_base64(text) == data


def test_base64_rejects_garbage_and_impossible_length():
    with pytest.raises(ValueError):
        decode_base64("@@@!!")
    with pytest.raises(ValueError):
        decode_base64(base64.b64encode(b"abcdef").decode()[:-3])  # 4n+1 chars
    assert decode_base64("") == b""


def test_iter_lines_tolerates_bom_crlf_and_blank_lines(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_bytes("\ufeffa\tAAAA\r\n\r\n   \nb\tBBBB\r\n".encode("utf-8"))
    lines = list(iter_lines(p))
    assert [(ln.line_no, ln.text) for ln in lines] == [(1, "a\tAAAA"), (4, "b\tBBBB")]


def test_caption_record_shapes():
    assert caption_record({"image_id": 7, "text": ["a", "b"]}, True) == ("7", ["a", "b"])
    assert caption_record({"image_id": "x", "text": "one"}, True) == ("x", ["one"])
    assert caption_record({"image_id": "x"}, False) == ("x", None)
    for bad in ({"text": ["a"]}, {"image_id": "x"}, {"image_id": "x", "text": [1]}):
        with pytest.raises(ValueError):
            caption_record(bad, True)
    with pytest.raises(ValueError, match="invalid JSON"):
        parse_json_line(Line(3, "{nope"))
    with pytest.raises(ValueError, match="not an object"):
        parse_json_line(Line(3, "[1, 2]"))


def test_detect_layout(tmp_path):
    (tmp_path / "IC_train.tsv").write_text("a\tAAAA\n", encoding="utf-8")
    with pytest.raises(EcomcapError, match="IC_train.jsonl is missing"):
        detect_layout(tmp_path, "train")
    (tmp_path / "IC_train.jsonl").write_text('{"image_id": "a", "text": ["x"]}\n', encoding="utf-8")
    lay = detect_layout(tmp_path, "train")
    assert lay.kind == "muge" and lay.captions.name == "IC_train.jsonl"
    (tmp_path / "IC_test.tsv").write_text("a\tAAAA\n", encoding="utf-8")
    assert detect_layout(tmp_path, "test").captions is None
    (tmp_path / "valid.tsv").write_text("a\tAAAA\t红色风格\n", encoding="utf-8")
    assert detect_layout(tmp_path, "valid").kind == "ad"
    (tmp_path / "IC_bad.tsv").write_text("a\tb\tc\td\n", encoding="utf-8")
    with pytest.raises(EcomcapError, match="4 TAB-separated columns"):
        detect_layout(tmp_path / "IC_bad.tsv", "train")
    with pytest.raises(EcomcapError, match="no image file"):
        detect_layout(tmp_path, "nosuch")
    with pytest.raises(EcomcapError, match="does not exist"):
        detect_layout(tmp_path / "nowhere", "train")
