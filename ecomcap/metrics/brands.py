"""Brand recognition on a long-tailed brand list: per brand, macro-averaged, frequent vs rare.

A caption is right about the brand when it contains the image's brand string (case-insensitive,
as written on the product). Micro accuracy is dominated by the few frequent brands; the macro
average over brands and the rare brands' own average show the long tail. A caption that names
another known brand than the image's is counted apart: a wrong brand is worse than none.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Iterable, Mapping, Sequence


def brand_counts(attrs: Mapping[str, Mapping]) -> Counter:
    """Images per brand (branded images only): the frequency that splits frequent from rare."""
    return Counter(a["brand"] for a in attrs.values() if a.get("brand"))


def brands_from_references(refs: Mapping[str, Sequence[str]], lexicon: Sequence[str],
                           attrs: Mapping[str, Mapping] | None = None) -> dict[str, dict]:
    """image id -> {"brand": ...}: the ground truth where there is one (synthetic), else the lexicon
    brand most of the image's references name (data without attribute labels)."""
    from ecomcap.data.brand_balance import named_brand

    if attrs is not None:
        return {i: {"brand": attrs[i].get("brand")} for i in refs if i in attrs}
    return {i: {"brand": named_brand(texts, list(lexicon))} for i, texts in refs.items()}


def norm(text: str) -> str:
    """How brand names are compared: NFKC (full-width ＮＯＶＡ is NOVA), case-insensitive."""
    return unicodedata.normalize("NFKC", text).lower()


def _named(caption: str, brands: Iterable[str]) -> set[str]:
    low = norm(caption)
    return {b for b in brands if norm(b) in low}


def brand_accuracy(preds: Mapping[str, str], attrs: Mapping[str, Mapping],
                   train_counts: Mapping[str, int] | None = None, rare_below: int = 20) -> dict:
    """{"micro", "macro", "frequent", "rare", "wrong_brand", "n", "brands", "per_brand"}.

    `train_counts`: images per brand in the training data (else counted on `attrs`); a brand with
    fewer than `rare_below` is rare. `frequent`/`rare`: macro accuracy over each group (None when
    the group is empty). `wrong_brand`: share of all captioned images whose caption names a known
    brand that is not the image's."""
    counts = Counter(train_counts) if train_counts is not None else brand_counts(attrs)
    known = set(counts) | set(brand_counts(attrs))
    hits: Counter = Counter()
    seen: Counter = Counter()
    wrong = total = 0
    for image_id, caption in preds.items():
        a = attrs.get(image_id)
        if a is None:
            continue
        total += 1
        truth = a.get("brand") or None
        named = _named(caption, known)
        wrong += bool(named - {truth})
        if truth:
            seen[truth] += 1
            hits[truth] += norm(truth) in norm(caption)
    per_brand = {b: hits[b] / seen[b] for b in sorted(seen)}

    def macro(brands: list[str]) -> float | None:
        return sum(per_brand[b] for b in brands) / len(brands) if brands else None

    frequent = [b for b in per_brand if counts.get(b, 0) >= rare_below]
    rare = [b for b in per_brand if counts.get(b, 0) < rare_below]
    return {"micro": sum(hits.values()) / sum(seen.values()) if seen else None, "macro": macro(list(per_brand)),
            "frequent": macro(frequent), "rare": macro(rare), "wrong_brand": wrong / total if total else None,
            "n": sum(seen.values()), "brands": len(per_brand), "rare_brands": len(rare), "per_brand": per_brand}
