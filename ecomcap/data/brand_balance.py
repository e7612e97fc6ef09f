"""The class-balance filter on brands (`ingest.brand_balance`), applied while a train split streams in.

Brands follow a long tail: a few brands on most products, many on a handful. Images of a brand
with fewer than `min_images` are quarantined as `rare_brand` before training (train split only;
the evaluation set stays whole, so the rare brands' accuracy is still measured). Counts come
from the caption records, read once before the images stream: the filter needs no second pass
over the image file.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Iterable

from ecomcap.config import BrandBalanceConfig
from ecomcap.errors import EcomcapError


def named_brand(texts: Iterable[str], brands: list[str]) -> str | None:
    """The lexicon brand most of the references name (ties: lexicon order), or None."""
    votes: Counter = Counter()
    for text in texts:
        low = unicodedata.normalize("NFKC", text).lower()  # ＮＯＶＡ (full width, before cleaning) is NOVA
        votes.update(b for b in brands if unicodedata.normalize("NFKC", b).lower() in low)
    if not votes:
        return None
    best = max(votes.values())
    return next(b for b in brands if votes.get(b) == best)


class BrandBalance:
    """Brand counts of one split's caption records, and which images to drop."""

    def __init__(self, cfg: BrandBalanceConfig, split: str):
        self.cfg = cfg
        self.active = split == "train" and cfg.min_images > 0
        if self.active and not cfg.brands:
            raise EcomcapError("ingest.brand_balance.min_images is set but brand_balance.brands is empty: list the "
                               "brands (the synthetic set fills in its own)")
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()

    def count(self, records: Iterable[list[str] | None]) -> None:
        """Images per brand over every caption record of the split."""
        if self.active:
            self.counts.update(b for texts in records if (b := named_brand(texts or [], self.cfg.brands)))

    def rare(self, texts: list[str]) -> str | None:
        """The image's brand when it is too rare to keep (counted), else None."""
        if not self.active:
            return None
        brand = named_brand(texts, self.cfg.brands)
        if brand is not None and self.counts[brand] < self.cfg.min_images:
            self.dropped[brand] += 1
            return brand
        return None

    def report(self) -> dict | None:
        if not self.active:
            return None
        return {"min_images": self.cfg.min_images, "images_per_brand": dict(self.counts.most_common()),
                "brands_dropped": sorted(self.dropped), "images_dropped": sum(self.dropped.values())}
