"""Synthetic MUGE E-Commerce IC data: the project's default data and its learning benchmark.

No real dataset can be downloaded, so we draw products whose attributes are known
(`synth_draw`), write 3-5 paraphrased Chinese references that name exactly what is drawn, and
store the ground truth next to them, so a benchmark can check whether generated captions name
the true category / colour / pattern / brand. Optionally we inject the faults real MUGE dumps
have, and list each one (file, 1-based line, expected quarantine reason) in corruptions.json.

Everything streams row by row (ingest benchmarks use 200k rows) and is deterministic: each
image has its own ``random.Random`` seeded from (seed, split, index), and the faults come from
a separate per-split stream, so clean rows are identical whatever ``corrupt_rate`` is.

Fault conventions, so each injected problem yields exactly one quarantine entry: a row whose
image is bad keeps its caption record (the pair goes under the image's reason); a TSV line with
no TAB has no readable id, so its caption record is left out; ``bad_json``,
``captions_without_image`` and ``duplicate_id`` add an extra line and keep the row itself clean.
"""
from __future__ import annotations

import io
import json
import random
from collections import Counter, deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from ecomcap.data.formats import encode_base64, open_tsv_writer
from ecomcap.data.synth_captions import SELLING, captions_for  # noqa: F401  (re-exported)
from ecomcap.data.synth_draw import (  # noqa: F401  (re-exported: the public constants)
    BRANDS,
    CATEGORIES,
    COLOUR_RGB,
    COLOURS,
    PATTERNS,
    image_for,
    random_attributes,
)
from ecomcap.errors import EcomcapError

SPLITS = ("train", "valid", "test")
REASONS = (
    "bad_base64", "empty_image", "bad_image", "too_many_pixels", "image_too_small",
    "duplicate_id", "no_captions", "captions_without_image", "malformed_line", "bad_json",
    "caption_looping", "caption_garbled", "caption_empty", "caption_too_long",
)
_IMAGE_FAULTS = ("bad_base64", "empty_image", "bad_image", "too_many_pixels", "image_too_small")
_CAPTION_FAULTS = ("caption_looping", "caption_garbled", "caption_empty", "caption_too_long")
_FIXABLE = ("truncated_after_stop", "fullwidth_and_spaces", "special_tokens")

# ----------------------------------------------------------------------------- faults
_LOOP_UNITS = ("好看", "质量很好", "推荐", "喜欢", "不错哦")
_EMPTY_REFS = ("", "  ", "\u3000", "<|endoftext|>", "<|im_start|><|im_end|>")
_TAILS = ("面料采用了", "这款产品的", "搭配上")
_LONG_WORDS = tuple(dict.fromkeys(w for pool in SELLING.values() for w in pool)) + (
    "精选面料", "匠心工艺", "品质保证", "限时特惠", "包邮到家", "七天无理由退换", "官方正品",
    "厂家直销", "新款上市", "人气爆款", "买一送一", "店铺推荐", "四季可用", "男女同款",
    "学生党必备", "送礼佳品", "质感高级", "细节精致", "做工考究", "颜值在线", "性价比高",
    "经典复古", "韩版潮流", "北欧极简", "日系清新", "轻奢风格", "网红同款", "独立包装",
    "环保材质", "无味安全",
)


def _bad_refs(kind: str, refs: list[str], rng: random.Random) -> list[str]:
    """Replace every reference with a caption-level fault of the given kind."""
    out = []
    for ref in refs:
        if kind == "caption_looping":
            out.append(ref[: rng.randint(0, 6)] + rng.choice(_LOOP_UNITS) * rng.randint(7, 12))
        elif kind == "caption_garbled":
            codec = rng.choice(("cp1252", "ascii"))  # mojibake, or a run of U+FFFD
            out.append(ref.encode("utf-8").decode(codec, errors="replace"))
        elif kind == "caption_empty":
            out.append(rng.choice(_EMPTY_REFS))
        else:  # caption_too_long: every phrase once, shuffled - long but not looping
            words = list(_LONG_WORDS)
            rng.shuffle(words)
            out.append("、".join(words))
    return out


def _fixable(ref: str, note: str, rng: random.Random) -> str:
    """A reference that cleaning should repair rather than drop."""
    if note == "truncated_after_stop":
        return ref.rstrip("。") + "。" + rng.choice(_TAILS)
    if note == "special_tokens":
        return f"<|im_start|>{ref}<|im_end|>"
    wide = "".join(chr(ord(ch) + 0xFEE0) if ch.isascii() and ch.isalnum() else ch for ch in ref)
    cut = len(wide) // 2
    return f" {wide[:cut]}  {wide[cut:]} "


@lru_cache(maxsize=1)
def _bomb_png() -> bytes:
    """A tiny PNG whose header declares 144 megapixels (mode '1' compresses to ~17 KB)."""
    return _encode(Image.new("1", (12000, 12000)), png=True)


def _encode(img: Image.Image, png: bool, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if png:
        img.save(buf, "PNG", compress_level=3)
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _bad_payload(kind: str, img: Image.Image, b64: str, rng: random.Random) -> str:
    """The base64 column of a row whose image is broken in the given way."""
    if kind == "bad_base64":
        return "@@@!!" + b64[:24] + "!!"
    if kind == "empty_image":
        return ""
    if kind == "bad_image":
        if rng.random() < 0.5:
            return encode_base64(b"this is not an image " + rng.randbytes(64))
        jpeg = _encode(img, png=False)
        return encode_base64(jpeg[: int(len(jpeg) * 0.4)])
    if kind == "too_many_pixels":
        return encode_base64(_bomb_png())
    return encode_base64(_encode(img.resize((8, 8)), png=rng.random() < 0.5))


# ----------------------------------------------------------------------------- writing
@dataclass
class _Row:
    image_id: str
    attrs: dict[str, Any]
    refs: list[str]
    img: Image.Image
    b64: str


def _make_row(split: str, index: int, seed: int, size: int, brand_rate: float, hard: bool = False,
              narrow: bool = False) -> _Row:
    """Draw, caption and encode one image from its own seed-derived rng (the hard set: photo-like
    scenes, a grammar of references, JPEG quality 40-95; `narrow`: see `hard_image_for`)."""
    if hard:
        from ecomcap.data.synth_captions import hard_captions_for
        from ecomcap.data.synth_hard import hard_attributes, hard_image_for

        rng = random.Random(f"hard:{seed}:{split}:{index}")
        attrs = hard_attributes(rng, brand_rate)
        if narrow:  # one product on a plain ground: the references must not name a second one
            attrs["background"] = "plain"
            attrs.pop("second", None)
        refs = hard_captions_for(attrs, rng)
        img = hard_image_for(attrs, size, rng, narrow)
        data = _encode(img, png=rng.random() < 0.05, quality=rng.randint(40, 95))
    else:
        rng = random.Random(f"{seed}:{split}:{index}")
        attrs = random_attributes(rng, brand_rate)
        refs = captions_for(attrs, rng)
        img = image_for(attrs, size, rng)
        data = _encode(img, png=rng.random() < 0.1, quality=rng.randint(88, 92))
    b64 = encode_base64(data, urlsafe=rng.random() < 0.1, padding=rng.random() >= 0.05)
    return _Row(f"syn_{split}_{index:06d}", attrs, refs, img, b64)


class _Files:
    """The open files of one split, counting lines so that faults can cite them."""

    def __init__(self, out: Path, split: str):
        self.split = split
        self.names = {"tsv": f"IC_{split}.tsv", "cap": f"IC_{split}.jsonl",
                      "attr": f"attributes_{split}.jsonl"}
        self._fh = {k: open_tsv_writer(out / name) for k, name in self.names.items()}
        self.lines: Counter[str] = Counter()

    def write(self, key: str, text: str) -> int:
        self._fh[key].write(text + "\n")
        self.lines[key] += 1
        return self.lines[key]

    def image(self, image_id: str, payload: str) -> int:
        return self.write("tsv", f"{image_id}\t{payload}")

    def record(self, key: str, obj: dict[str, Any]) -> int:
        return self.write(key, json.dumps(obj, ensure_ascii=False))

    def entry(self, key: str, line: int, image_id: str, reason: str | None) -> dict[str, Any]:
        return {"split": self.split, "image_id": image_id, "line": line,
                "file": self.names[key], "expected_reason": reason}

    def close(self) -> None:
        for fh in self._fh.values():
            fh.close()


class _Injector:
    """Decides which rows get a fault (kinds dealt evenly from shuffled decks) and writes them."""

    def __init__(self, rng: random.Random, rate: float, log: list[dict[str, Any]]):
        self.rng, self.rate, self.log = rng, rate, log
        self.deck: list[str] = []
        self.fix_deck: list[str] = []
        self.recent: deque[str] = deque(maxlen=64)  # clean ids a duplicate may re-use
        self.injected: Counter[str] = Counter()
        self.fixable = 0

    def _deal(self, deck: list[str], kinds: tuple[str, ...]) -> str:
        if not deck:
            deck.extend(kinds)
            self.rng.shuffle(deck)
        return deck.pop()

    def write(self, f: _Files, row: _Row) -> bool:
        """Write one row, maybe faulty; True when it stays a clean image-caption pair."""
        kind = self._deal(self.deck, REASONS) if self.rng.random() < self.rate else None
        if kind == "duplicate_id" and not self.recent:
            self.deck.append(kind)  # nothing to duplicate yet: try again on a later row
            kind = None
        if kind is None:
            return self._clean(f, row)
        self.injected[kind] += 1
        rid = row.image_id
        if kind in _IMAGE_FAULTS:
            line = f.image(rid, _bad_payload(kind, row.img, row.b64, self.rng))
            f.record("cap", {"image_id": rid, "text": row.refs})
            self.log.append(f.entry("tsv", line, rid, kind))
            return False
        if kind == "malformed_line":
            self.log.append(f.entry("tsv", f.write("tsv", f"{rid} {row.b64}"), rid, kind))
            return False
        line = f.image(rid, row.b64)
        if kind == "no_captions":
            self.log.append(f.entry("tsv", line, rid, kind))
            return False
        if kind in _CAPTION_FAULTS:
            line = f.record("cap", {"image_id": rid, "text": _bad_refs(kind, row.refs, self.rng)})
            self.log.append(f.entry("cap", line, rid, kind))
            return False
        rec = {"image_id": rid, "text": row.refs}
        f.record("cap", rec)
        if kind == "duplicate_id":
            first = self.recent[self.rng.randrange(len(self.recent))]
            self.recent.remove(first)
            self.log.append(f.entry("tsv", f.image(first, row.b64), first, kind))
        elif kind == "captions_without_image":
            orphan = rid.replace(f"syn_{f.split}_", f"syn_{f.split}_orphan_")
            line = f.record("cap", {"image_id": orphan, "text": row.refs})
            self.log.append(f.entry("cap", line, orphan, kind))
        else:  # bad_json: a half-written copy of the record on its own line
            text = json.dumps(rec, ensure_ascii=False)
            self.log.append(f.entry("cap", f.write("cap", text[: len(text) // 2]), rid, kind))
        self.recent.append(rid)
        return True

    def _clean(self, f: _Files, row: _Row) -> bool:
        """A clean row; sometimes one reference is made fixable (recorded, reason null)."""
        note, ref_index = None, -1
        if self.rng.random() < self.rate * 0.3:
            note = self._deal(self.fix_deck, _FIXABLE)
            latin = [j for j, r in enumerate(row.refs)
                     if any(ch.isascii() and ch.isalnum() for ch in r)]  # brand or "T恤"
            pool = latin if note == "fullwidth_and_spaces" and latin else range(len(row.refs))
            ref_index = self.rng.choice(list(pool))
            row.refs[ref_index] = _fixable(row.refs[ref_index], note, self.rng)
        f.image(row.image_id, row.b64)
        line = f.record("cap", {"image_id": row.image_id, "text": row.refs})
        if note:
            self.fixable += 1
            self.log.append({**f.entry("cap", line, row.image_id, None),
                             "note": note, "ref_index": ref_index})
        self.recent.append(row.image_id)
        return True


def _write_split(out: Path, split: str, n: int, seed: int, size: int, brand_rate: float,
                 rate: float, log: list[dict[str, Any]], hard: bool = False, narrow: bool = False) -> dict[str, Any]:
    """Generate, encode and write one split row by row; return its counts."""
    inj = _Injector(random.Random(f"{seed}:{split}:corrupt"), rate, log) if rate > 0 else None
    f = _Files(out, split)
    clean = 0
    try:
        for index in range(1, n + 1):
            row = _make_row(split, index, seed, size, brand_rate, hard, narrow)
            f.record("attr", {"image_id": row.image_id, **row.attrs})
            if inj is not None:
                clean += inj.write(f, row)
                continue
            f.image(row.image_id, row.b64)
            text = {} if split == "test" else {"text": row.refs}
            f.record("cap", {"image_id": row.image_id, **text})
            clean += 1
    finally:
        f.close()
    injected = dict(sorted(inj.injected.items())) if inj else {}
    return {"images": n, "tsv_rows": f.lines["tsv"], "jsonl_records": f.lines["cap"],
            "clean_images": clean, "injected": injected, "fixable": inj.fixable if inj else 0}


def generate_synthetic(
    out_dir: str | Path, train: int = 2000, valid: int = 200, test: int = 100, seed: int = 0,
    image_size: int = 112, corrupt_rate: float = 0.0, brand_rate: float = 0.35,
    difficulty: str = "easy", shift: bool = False,
) -> dict[str, Any]:
    """Write the synthetic MUGE-format dataset into out_dir; return per-split counts.

    Files: IC_{split}.tsv / .jsonl, attributes_{split}.jsonl, synth.json and, when
    corrupt_rate > 0, corruptions.json (train and valid only; test stays clean).
    difficulty: "easy" (centred silhouettes, templates) or "hard" (`synth_hard`: photo-like scenes).
    shift (hard only): train images centred, upright, at one scale on a plain ground; valid and
    test keep the full variation - a validation set that differs from training in scale, position
    and background.
    """
    if difficulty not in ("easy", "hard"):
        raise EcomcapError(f"synthetic difficulty must be 'easy' or 'hard', not {difficulty!r}")
    if shift and difficulty != "hard":
        raise EcomcapError("synthetic shift needs difficulty 'hard' (the easy set has one layout)")
    if min(train, valid, test) < 0 or image_size < 32:
        raise EcomcapError("synthetic data needs split sizes >= 0 and image_size >= 32")
    if not (0.0 <= corrupt_rate <= 1.0 and 0.0 <= brand_rate <= 1.0):
        raise EcomcapError("corrupt_rate and brand_rate must be between 0 and 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = {"train": train, "valid": valid, "test": test, "seed": seed,
            "image_size": image_size, "corrupt_rate": corrupt_rate, "brand_rate": brand_rate,
            "difficulty": difficulty, "shift": shift}
    log: list[dict[str, Any]] = []
    counts = {
        split: _write_split(out, split, n, seed, image_size, brand_rate,
                            corrupt_rate if split != "test" else 0.0, log, difficulty == "hard",
                            shift and split == "train")
        for split, n in zip(SPLITS, (train, valid, test))
    }
    corrupt_file = out / "corruptions.json"
    if corrupt_rate > 0:
        corrupt_file.write_text(json.dumps(log, ensure_ascii=False, indent=1) + "\n", "utf-8")
    else:
        corrupt_file.unlink(missing_ok=True)  # a stale list would describe other files
    (out / "synth.json").write_text(
        json.dumps({"args": args, "counts": counts}, ensure_ascii=False, indent=2) + "\n", "utf-8")
    return counts
