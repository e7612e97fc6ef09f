"""Draw one synthetic product photo: the pixels behind the synthetic MUGE-style benchmark.

Every attribute a caption names must be visible and unambiguous at 112 px, so a tiny model can
learn it: categories are distinct silhouettes, the main colour covers most of the item (the
pattern uses a contrasting secondary colour on well under half of it), and a brand word is
drawn in letters about 28% of the image height on a label below the item.
"""
from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Chinese words exactly as the captions use them (the attribute files use the same words).
CATEGORIES = ("T恤", "连衣裙", "裤子", "帽子", "鞋子", "背包", "杯子", "台灯")
PATTERNS = ("纯色", "条纹", "格子", "波点")
BRANDS = ("NOVA", "LUMI", "ZEN", "KIKO", "AURA", "MODA")

# colour word -> (prototype RGB, secondary RGB used for the pattern)
_WHITE = (245, 245, 245)
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "红色": (210, 30, 35),
    "蓝色": (30, 80, 200),
    "绿色": (30, 150, 60),
    "黄色": (245, 200, 20),
    "黑色": (30, 30, 30),
    "白色": (250, 250, 250),
    "粉色": (245, 140, 180),
    "紫色": (130, 50, 170),
    "橙色": (245, 120, 20),
    "灰色": (128, 128, 128),
}
COLOURS = tuple(COLOUR_RGB)
_SECONDARY = {"黄色": (110, 70, 20), "白色": (60, 80, 140), "粉色": (150, 30, 80)}
_INKS = ((30, 30, 30), (20, 35, 80), (80, 25, 25))  # brand label ink, dark on a light ground

# Silhouettes in a unit box: (op, coords, fill); fill 0 cuts a hole (mug / bag handles).
_Shape = tuple[str, tuple[float, ...], int]


def _poly(*pts: tuple[float, float]) -> _Shape:
    return ("poly", tuple(v for p in pts for v in p), 255)


SHAPES: dict[str, tuple[_Shape, ...]] = {
    "T恤": (_poly((0.36, 0.06), (0.43, 0.13), (0.57, 0.13), (0.64, 0.06), (0.86, 0.16),
                  (1.0, 0.40), (0.82, 0.48), (0.76, 0.36), (0.76, 0.96), (0.24, 0.96),
                  (0.24, 0.36), (0.18, 0.48), (0.0, 0.40), (0.14, 0.16)),),
    "连衣裙": (_poly((0.36, 0.02), (0.41, 0.02), (0.44, 0.14), (0.56, 0.14), (0.59, 0.02),
                  (0.64, 0.02), (0.66, 0.22), (0.60, 0.40), (0.94, 0.97), (0.06, 0.97),
                  (0.40, 0.40), (0.34, 0.22)),),
    "裤子": (_poly((0.22, 0.03), (0.78, 0.03), (0.86, 0.97), (0.58, 0.97), (0.50, 0.36),
                 (0.42, 0.97), (0.14, 0.97)),),
    "帽子": (("chord", (0.20, 0.16, 0.80, 0.96), 255), ("ellipse", (0.0, 0.50, 1.0, 0.80), 255)),
    "鞋子": (_poly((0.03, 0.24), (0.16, 0.21), (0.22, 0.30), (0.34, 0.29), (0.48, 0.40),
                 (0.72, 0.48), (0.86, 0.52), (0.86, 0.70), (0.02, 0.70)),
           ("ellipse", (0.62, 0.46, 0.99, 0.78), 255), ("rrect", (0.0, 0.66, 1.0, 0.80, 0.06), 255),
           ("rrect", (0.03, 0.655, 0.97, 0.67, 0.0), 0)),  # the gap marks off the sole
    "背包": (("ellipse", (0.30, 0.02, 0.70, 0.42), 255), ("ellipse", (0.38, 0.10, 0.62, 0.34), 0),
           ("rrect", (0.14, 0.24, 0.86, 0.98, 0.16), 255)),
    "杯子": (("ellipse", (0.54, 0.30, 0.96, 0.80), 255), ("ellipse", (0.63, 0.42, 0.85, 0.68), 0),
           ("rrect", (0.10, 0.16, 0.68, 0.94, 0.07), 255)),
    "台灯": (_poly((0.30, 0.04), (0.70, 0.04), (0.88, 0.42), (0.12, 0.42)),
           _poly((0.45, 0.40), (0.55, 0.40), (0.55, 0.88), (0.45, 0.88)),
           ("ellipse", (0.22, 0.82, 0.78, 0.98), 255)),
}


def random_attributes(rng: random.Random, brand_rate: float = 0.35) -> dict[str, Any]:
    """Pick category, colour, pattern and (with probability brand_rate) a brand word."""
    return {
        "category": rng.choice(CATEGORIES),
        "colour": rng.choice(COLOURS),
        "pattern": rng.choice(PATTERNS),
        "brand": rng.choice(BRANDS) if rng.random() < brand_rate else None,
    }


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amp: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amp, amp))) for v in rgb)  # type: ignore


def _draw_silhouette(mask: Image.Image, category: str, box: tuple[float, float, float],
                     shapes: tuple[_Shape, ...] | None = None) -> None:
    """Fill the category's silhouette (or `shapes`) into an L mask; box is (left, top, side) in pixels."""
    ox, oy, side = box
    d = ImageDraw.Draw(mask)
    for op, c, fill in shapes or SHAPES[category]:
        if op == "poly":
            d.polygon([(ox + c[i] * side, oy + c[i + 1] * side) for i in range(0, len(c), 2)],
                      fill=fill)
            continue
        xy = (ox + c[0] * side, oy + c[1] * side, ox + c[2] * side, oy + c[3] * side)
        if op == "ellipse":
            d.ellipse(xy, fill=fill)
        elif op == "chord":
            d.chord(xy, 180, 360, fill=fill)
        else:
            d.rounded_rectangle(xy, radius=c[4] * side, fill=fill)


def _draw_pattern(layer: Image.Image, pattern: str, box: tuple[float, float, float],
                  ink: tuple[int, int, int], rng: random.Random) -> None:
    """Paint stripes / checks / dots over the item's box (the mask clips them to the item)."""
    if pattern == "纯色":
        return
    ox, oy, side = box
    d = ImageDraw.Draw(layer)
    period = side / rng.uniform(5.0, 6.5)
    off = rng.uniform(0, period)
    steps = [off + i * period for i in range(int(side / period) + 1)]
    if pattern == "波点":
        r = period * 0.25
        for row, y in enumerate(steps):
            for x in steps:
                cx = ox + x + (period / 2 if row % 2 else 0) - period / 2
                d.ellipse((cx - r, oy + y - r, cx + r, oy + y + r), fill=ink)
        return
    width = max(2.0, period * (0.3 if pattern == "条纹" else 0.2))
    vertical = pattern == "格子" or rng.random() < 0.3
    horizontal = pattern == "格子" or not vertical
    for t in steps:
        if horizontal:
            d.rectangle((ox, oy + t, ox + side, oy + t + width - 1), fill=ink)
        if vertical:
            d.rectangle((ox + t, oy, ox + t + width - 1, oy + side), fill=ink)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_brand(img: Image.Image, word: str, rng: random.Random) -> None:
    """Draw the brand large on the label band below the item, squeezed to fit the width."""
    size = img.width
    font = _font(round(size * rng.uniform(0.38, 0.42)))
    stroke = max(1, round(size / 112))
    x0, y0, x1, y1 = font.getbbox(word, stroke_width=stroke)
    glyphs = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(glyphs).text((-x0, -y0), word, font=font, fill=255,
                                stroke_width=stroke, stroke_fill=255)
    max_w = int(size * 0.92)
    if glyphs.width > max_w:
        glyphs = glyphs.resize((max_w, glyphs.height), Image.Resampling.BILINEAR)
    left = (size - glyphs.width) // 2 + rng.randint(-size // 30, size // 30)
    left = max(1, min(size - glyphs.width - 1, left))
    top = size - glyphs.height - rng.randint(2, max(3, size // 20))
    img.paste(rng.choice(_INKS), (left, top, left + glyphs.width, top + glyphs.height), glyphs)


def _item_box(size: int, branded: bool, rng: random.Random) -> tuple[float, float, float]:
    """Item placement: centred with jitter; in the top ~64% when a brand label goes below."""
    if branded:
        side = size * rng.uniform(0.56, 0.62)
        cx, cy = size * (0.5 + rng.uniform(-0.08, 0.08)), size * (0.32 + rng.uniform(-0.01, 0.01))
    else:
        side = size * rng.uniform(0.70, 0.86)
        cx, cy = (size * (0.5 + rng.uniform(-0.06, 0.06)) for _ in range(2))
    left = min(max(cx - side / 2, 1.0), size - side - 1)
    top = min(max(cy - side / 2, 1.0), size - side - 1)
    return left, top, side


# Fixed noise table: each image reads a window at an rng-chosen offset (fast, deterministic).
_NOISE = np.random.default_rng(20240601).integers(-4, 5, size=1 << 20, dtype=np.int16)


def _finish(img: Image.Image, mask: Image.Image, outline: tuple[int, ...],
            rng: random.Random) -> Image.Image:
    """Outline the item one pixel outside its mask (white items on grey need it), add noise."""
    arr = np.asarray(img, dtype=np.int16)
    inside = np.asarray(mask) > 0
    grown = inside.copy()
    grown[1:] |= inside[:-1]
    grown[:-1] |= inside[1:]
    grown[:, 1:] |= inside[:, :-1]
    grown[:, :-1] |= inside[:, 1:]
    arr[grown & ~inside] = outline
    n, off = arr.size, rng.randrange(_NOISE.size)
    if off + n <= _NOISE.size:
        noise = _NOISE[off:off + n]
    else:  # wrap around (always for images over ~590 px)
        noise = np.take(_NOISE, np.arange(off, off + n), mode="wrap")
    arr += noise.reshape(arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def image_for(attrs: dict[str, Any], size: int = 112,
              rng: random.Random | None = None) -> Image.Image:
    """Draw one RGB product image for attrs (category, colour, pattern, brand or None)."""
    rng = rng or random.Random(0)
    colour = attrs["colour"]
    base = 185 if colour == "白色" else 240  # white items need a darker ground to stand out
    bg = _jitter((base,) * 3, rng, 8)
    img = Image.new("RGB", (size, size), bg)
    box = _item_box(size, attrs.get("brand") is not None, rng)
    mask = Image.new("L", (size, size), 0)
    _draw_silhouette(mask, attrs["category"], box)
    main = _jitter(COLOUR_RGB[colour], rng, 10)
    layer = Image.new("RGB", (size, size), main)
    _draw_pattern(layer, attrs["pattern"], box, _jitter(_SECONDARY.get(colour, _WHITE), rng, 6),
                  rng)
    img.paste(layer, (0, 0), mask)
    if attrs.get("brand"):
        _draw_brand(img, attrs["brand"], rng)
    return _finish(img, mask, tuple(int(v * 0.55) for v in main), rng)
