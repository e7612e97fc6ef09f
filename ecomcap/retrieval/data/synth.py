"""Deterministic synthetic retrieval set in MUGE MR format, drawn by the caption generator.

Products are attribute sets (category, colour, pattern, brand) drawn by
`ecomcap.data.synth_draw`; every base product gets `distractors` variants that differ in
exactly one attribute, and each product is drawn 1..max_views times with a different scale,
crop, background and JPEG quality (a product group, for same-product matching). Queries are
attribute combinations ("红色 条纹 T恤", "MODA 连衣裙"); their positives are *all* gallery items
that match, kept when there are 1..10 (as in MUGE). Item texts are the caption references.

Files per split: ``MR_{split}_imgs.tsv``, ``MR_{split}_queries.jsonl``,
``MR_{split}_item_texts.jsonl`` and ``MR_{split}_groups.jsonl`` ({"item_id", "group"}).
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ecomcap.data.formats import open_tsv_writer, write_image_tsv, write_jsonl
from ecomcap.data.synth import captions_for
from ecomcap.data.synth_draw import (
    BRANDS,
    CATEGORIES,
    COLOURS,
    PATTERNS,
    image_for,
    random_attributes,
)
from ecomcap.retrieval.config import RetrievalSynthConfig

_VALUES = {"category": CATEGORIES, "colour": COLOURS, "pattern": PATTERNS, "brand": BRANDS}
_ORDER = ("brand", "colour", "pattern", "category")  # word order of a query
QUERY_SHAPES = (("colour", "category"), ("pattern", "category"), ("colour", "pattern", "category"),
                ("brand", "category"), ("brand", "colour", "category"))


@dataclass
class Product:
    group: str
    attrs: dict[str, Any]
    views: int
    seed: str


def one_attribute_variant(attrs: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The same product with exactly one attribute changed (a hard distractor)."""
    key = rng.choice(("category", "colour", "pattern", "brand"))
    out = dict(attrs)
    out[key] = rng.choice([v for v in _VALUES[key] if v != attrs[key]])
    return out


def draw_view(attrs: dict[str, Any], product_seed: str, view: int, size: int) -> bytes:
    """One photo of a product: view 0 as drawn, later views rescaled/cropped/re-backgrounded."""
    img = image_for(attrs, size, random.Random(product_seed))
    rng = random.Random(f"{product_seed}:view{view}")
    if view > 0:
        side = int(size * rng.uniform(0.78, 1.0))  # crop + rescale
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        img = img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)
        inner = int(size * rng.uniform(0.82, 0.95))  # a new background margin
        canvas = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
        off = ((size - inner) // 2 + rng.randint(-2, 2), (size - inner) // 2 + rng.randint(-2, 2))
        canvas.paste(img.resize((inner, inner), Image.Resampling.BILINEAR), off)
        img = canvas
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90 if view == 0 else rng.randint(45, 95))
    return buf.getvalue()


def products_for(split: str, n_base: int, cfg: RetrievalSynthConfig) -> list[Product]:
    out = []
    for i in range(n_base):
        rng = random.Random(f"{cfg.seed}:{split}:p{i}")
        base = random_attributes(rng, cfg.brand_rate)
        family = [base] + [one_attribute_variant(base, rng) for _ in range(cfg.distractors)]
        for j, attrs in enumerate(family):
            out.append(Product(f"{split}_g{i:05d}_{j}", attrs, rng.randint(1, cfg.max_views),
                               f"{cfg.seed}:{split}:p{i}:{j}"))
    return out


def _matches(attrs: dict[str, Any], query: dict[str, Any]) -> bool:
    return all(attrs.get(k) == v for k, v in query.items())


def queries_for(split: str, products: list[Product], n_base: int, seed: int, shapes_per_product: int,
                max_positives: int) -> list[dict[str, Any]]:
    """Attribute-combination queries per base product; positives = every matching item."""
    seen, out = set(), []
    family = len(products) // max(n_base, 1)
    for i in range(n_base):
        rng = random.Random(f"{seed}:{split}:q{i}")
        attrs = products[i * family].attrs
        shapes = [s for s in QUERY_SHAPES if attrs["brand"] or "brand" not in s]
        for n, shape in enumerate(rng.sample(shapes, min(shapes_per_product, len(shapes)))):
            query = {k: attrs[k] for k in shape}
            text = " ".join(query[k] for k in _ORDER if k in query)
            if text in seen:
                continue
            seen.add(text)
            items = [f"{p.group}_v{v}" for p in products if _matches(p.attrs, query) for v in range(p.views)]
            if 1 <= len(items) <= max_positives:
                out.append({"query_id": f"{split}_q{i:05d}_{n}", "query_text": text, "item_ids": items})
    return out


def generate_retrieval_synthetic(out_dir: str | Path, cfg: RetrievalSynthConfig | None = None,
                                 splits: tuple[str, ...] = ("train", "valid")) -> dict[str, dict[str, int]]:
    """Write the synthetic MR files for `splits`; returns {split: {items, queries, groups}}."""
    cfg = cfg or RetrievalSynthConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits:
        n_base = cfg.train_products if split == "train" else cfg.valid_products
        products = products_for(split, n_base, cfg)
        if split == "train":  # every query shape, more positives allowed: training signal
            queries = queries_for(split, products, n_base, cfg.seed, len(QUERY_SHAPES), cfg.train_max_positives)
        else:  # MUGE-like evaluation: 1..10 positives per query
            queries = queries_for(split, products, n_base, cfg.seed, 2, 10)
        items = [(p, v) for p in products for v in range(p.views)]
        write_image_tsv(out / f"MR_{split}_imgs.tsv",
                        ((f"{p.group}_v{v}", draw_view(p.attrs, p.seed, v, cfg.image_size)) for p, v in items))
        texts = []
        for p, v in items:
            refs = captions_for(p.attrs, random.Random(p.seed))
            texts.append({"item_id": f"{p.group}_v{v}", "text": refs[v % len(refs)]})
        write_jsonl(out / f"MR_{split}_item_texts.jsonl", texts)
        write_jsonl(out / f"MR_{split}_groups.jsonl",
                    ({"item_id": f"{p.group}_v{v}", "group": p.group, **p.attrs} for p, v in items))
        write_jsonl(out / f"MR_{split}_queries.jsonl", queries)
        counts[split] = {"items": len(items), "queries": len(queries), "groups": len(products)}
    (out / "synth.json").write_text(json.dumps({"config": cfg.model_dump(), "counts": counts}, indent=2), "utf-8")
    return counts


__all__ = ["generate_retrieval_synthetic", "draw_view", "one_attribute_variant", "open_tsv_writer"]
