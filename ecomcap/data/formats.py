"""Streaming readers and writers for MUGE E-Commerce IC files and the 3-column ad format.

- `IC_{split}.tsv`: ``image_id<TAB>base64`` (standard or URL-safe, padding optional)
- `IC_{split}.jsonl`: ``{"image_id": ..., "text": [refs]}`` (test: ids only)
- ad format: ``image_id<TAB>base64<TAB>caption``
- predictions: ``caption_gen.jsonl`` with ``{"image_id": ..., "text": "..."}``

Readers never hold a file in memory; they tolerate a UTF-8 BOM, CRLF line ends and blank lines,
and hand malformed lines on (with their line number) instead of raising, so ingest can
quarantine them with a reason.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from ecomcap.errors import EcomcapError
from ecomcap.text import is_encodable, printable

_B64_JUNK = re.compile(r"\s+")


@dataclass(frozen=True)
class Line:
    """One non-blank line of a text file, with its 1-based line number."""

    line_no: int
    text: str


def iter_lines(path: str | Path) -> Iterator[Line]:
    """Yield non-blank lines without BOM or line ends, streaming."""
    with open(path, "r", encoding="utf-8-sig", errors="replace", newline="") as fh:
        for no, raw in enumerate(fh, start=1):
            text = raw.rstrip("\r\n")
            if text.strip():
                yield Line(no, text)


def decode_base64(data: str) -> bytes:
    """Decode standard or URL-safe base64, with or without padding; ValueError if it is not."""
    s = _B64_JUNK.sub("", data)
    if not s:
        return b""
    if "-" in s or "_" in s:
        s = s.replace("-", "+").replace("_", "/")
    s = s.rstrip("=")
    if len(s) % 4 == 1:
        raise ValueError("base64 length is impossible (4n+1 characters)")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from None


def encode_base64(data: bytes, urlsafe: bool = False, padding: bool = True) -> str:
    """Encode bytes the way MUGE files do (standard by default)."""
    out = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode("ascii")
    return out if padding else out.rstrip("=")


def parse_json_line(line: Line) -> dict[str, Any]:
    """Parse one JSONL record; ValueError with a short reason when it is not an object."""
    try:
        obj = json.loads(line.text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("JSON line is not an object")
    return obj


def record_id(obj: dict[str, Any], key: str = "image_id") -> str:
    """A record's id as text: a non-empty string or an integer (MUGE uses both); ValueError
    for other JSON types, lone surrogates or control characters (ids go into TSV/Parquet)."""
    value = obj.get(key)
    if value is None or (isinstance(value, str) and value.strip() == ""):
        raise ValueError(f"record has no {key}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{key} must be a string or an integer, got {type(value).__name__}")
    text = str(value).strip()
    if not is_encodable(text):
        raise ValueError(f"{key} {printable(text, 60)!r} is not valid Unicode (lone surrogate)")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise ValueError(f"{key} {printable(text, 60)!r} contains control characters")
    return text


def caption_record(obj: dict[str, Any], need_text: bool, id_key: str = "image_id") -> tuple[str, list[str] | None]:
    """Validate a caption (or item-text) record's shape: (id, texts or None); ValueError otherwise.

    Texts are returned as they are, also ones that are not valid Unicode: dropping those is a
    per-reference decision of the caller (counted), not a reason to lose the record."""
    image_id = record_id(obj, id_key)
    texts = obj.get("text")
    if texts is None:
        if need_text:
            raise ValueError("record has no 'text' list")
        return image_id, None
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("'text' is not a list of strings")
    return image_id, texts


def count_columns(path: Path) -> int:
    """Number of TAB-separated columns on the first non-blank line (0 for an empty file)."""
    for line in iter_lines(path):
        return len(line.text.split("\t"))
    return 0


# ----------------------------------------------------------------------------- writers
def write_image_tsv(
    path: str | Path, rows: Iterable[tuple[str, bytes]], urlsafe: bool = False
) -> int:
    """Write ``image_id<TAB>base64`` lines; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for image_id, data in rows:
            fh.write(f"{image_id}\t{encode_base64(data, urlsafe=urlsafe)}\n")
            n += 1
    return n


def write_ad_tsv(path: str | Path, rows: Iterable[tuple[str, bytes, str]]) -> int:
    """Write ``image_id<TAB>base64<TAB>caption`` lines (the ad-caption format)."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for image_id, data, caption in rows:
            fh.write(f"{image_id}\t{encode_base64(data)}\t{caption}\n")
            n += 1
    return n


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line, UTF-8, non-ASCII kept readable."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_predictions(path: str | Path, preds: Iterable[tuple[str, str]]) -> int:
    """Write ``caption_gen.jsonl``: one ``{"image_id", "text"}`` per line."""
    return write_jsonl(path, ({"image_id": i, "text": t} for i, t in preds))


def open_tsv_writer(path: str | Path) -> IO[str]:
    """A text handle suitable for appending MUGE TSV lines (LF line ends)."""
    return open(path, "w", encoding="utf-8", newline="\n")


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class SourceLayout:
    """Which files make up one split of a source directory, and in which format."""

    kind: str  # "muge" (tsv + jsonl) or "ad" (3-column tsv)
    images: Path
    captions: Path | None


def detect_layout(src: str | Path, split: str) -> SourceLayout:
    """Find the split's files and tell MUGE pair format from the 3-column ad format.

    Looks for ``IC_{split}.tsv`` (then ``{split}.tsv``); a file path is taken as it is.
    """
    src = Path(src)
    if src.is_file():
        images = src
        base = src.parent
    elif src.is_dir():
        candidates = [src / f"IC_{split}.tsv", src / f"{split}.tsv"]
        images = next((p for p in candidates if p.is_file()), None)  # type: ignore[assignment]
        if images is None:
            raise EcomcapError(
                f"no image file for split '{split}' in {src}: expected IC_{split}.tsv "
                f"(MUGE) or {split}.tsv (ad format)"
            )
        base = src
    else:
        raise EcomcapError(f"source {src} does not exist")
    ncol = count_columns(images)
    if ncol == 0:
        raise EcomcapError(f"{images} is empty")
    if ncol == 3:
        return SourceLayout("ad", images, None)
    if ncol != 2:
        raise EcomcapError(
            f"{images}: first line has {ncol} TAB-separated columns; expected 2 "
            "(image_id, base64) or 3 (image_id, base64, caption)"
        )
    stem = images.name[: -len(".tsv")]
    captions = base / f"{stem}.jsonl"
    if not captions.is_file():
        if split != "test":
            raise EcomcapError(
                f"{captions} is missing: the {split} split needs its captions file"
            )
        captions = None  # type: ignore[assignment]
    return SourceLayout("muge", images, captions)
