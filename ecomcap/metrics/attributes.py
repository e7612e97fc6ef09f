"""Are captions *right*? Attribute accuracy against the synthetic set's ground truth.

CIDEr-D rewards matching the references' phrasing; this counts whether a caption names the
drawn category, colour, pattern and (where one is drawn) brand. A solid item counts as right
when the caption says 纯色 or names no other pattern, since references often omit 纯色.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from ecomcap.data.synth_draw import PATTERNS

FIELDS = ("category", "colour", "pattern", "brand")
# Visible details of the hard synthetic set (T-shirts, dresses): reported apart, not in the mean,
# so the mean stays comparable between the easy and the hard set.
DETAILS = ("sleeve", "neckline")


def read_attributes(path: str | Path) -> dict[str, dict]:
    """Ground-truth attributes by image id; unusable lines are skipped and counted in the log."""
    import logging

    out, bad = {}, 0
    for ln in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(ln) if ln.strip() else None
            if r is not None:
                out[str(r["image_id"])] = r
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        logging.getLogger(__name__).warning("%s: %d unusable attribute lines skipped", path, bad)
    return out


def synthetic_attributes(work_dir: str | Path, source: str, split: str) -> dict[str, dict] | None:
    """The synthetic set's ground truth of one split (`<work_dir>/raw/attributes_<split>.jsonl`), or
    None for other data (which has no attribute ground truth)."""
    path = Path(work_dir) / "raw" / f"attributes_{split}.jsonl"
    return read_attributes(path) if source == "synthetic" and path.is_file() else None


def _pattern_ok(caption: str, pattern: str) -> bool:
    if pattern == "纯色":
        return "纯色" in caption or not any(p in caption for p in PATTERNS if p != "纯色")
    return pattern in caption


def attribute_checks(caption: str, a: Mapping) -> dict[str, bool]:
    """field -> whether the caption names the image's true value (brand only where one is drawn)."""
    checks = {
        "category": a["category"] in caption,
        "colour": a["colour"] in caption,
        "pattern": _pattern_ok(caption, a["pattern"]),
    }
    if a.get("brand"):
        checks["brand"] = a["brand"].lower() in caption.lower()
    for f in DETAILS:
        if a.get(f):
            checks[f] = a[f] in caption
    return checks


def attribute_accuracy(preds: Mapping[str, str], attrs: Mapping[str, dict]) -> dict[str, float]:
    """Share of captions naming each true attribute (brand: over branded images only), and the mean of
    the four core fields; sleeve / neckline too where the ground truth has them (hard set)."""
    hits = {f: 0 for f in FIELDS + DETAILS}
    counts = {f: 0 for f in FIELDS + DETAILS}
    for image_id, caption in preds.items():
        a = attrs.get(image_id)
        if a is None:
            continue
        for f, ok in attribute_checks(caption, a).items():
            counts[f] += 1
            hits[f] += int(ok)
    out = {f: hits[f] / counts[f] if counts[f] else 0.0 for f in FIELDS}
    out["mean"] = sum(out[f] for f in FIELDS) / len(FIELDS)
    out.update({f: hits[f] / counts[f] for f in DETAILS if counts[f]})
    out["n"] = counts["category"]
    return out
