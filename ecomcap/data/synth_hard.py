"""The hard synthetic set (`data.synth.difficulty: hard`): scenes that look more like product photos.

The easy set is one centred silhouette on a plain light ground; a converged tiny model names 90%
of its attributes, which leaves an improvement little room to show. Here each image varies what
real photos vary: a gradient / wood / fabric ground, a soft shadow, scale, position and rotation,
partial occlusion by a prop, mixed sizes and aspect ratios, JPEG quality, sometimes a second
product (the ad-caption style). Brands come from a list of 30 with a Zipf-like frequency and are
written on the product, on a tag or in a corner at varied sizes; a few brands are always printed
so small that they cannot be read at 64 px (`brand_legible: false` in the ground truth).
T-shirts and dresses show a sleeve length and a neckline, which the references name when drawn.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ecomcap.data.synth_draw import (
    CATEGORIES,
    COLOUR_RGB,
    COLOURS,
    PATTERNS,
    SHAPES,
    _draw_pattern,
    _draw_silhouette,
    _font,
    _jitter,
)

HARD_BRANDS = (
    "NOVA", "LUMI", "ZEN", "KIKO", "AURA", "MODA", "VELA", "ORBI", "PIXO", "RUNA",
    "SOLA", "TERA", "ULTO", "VIVO", "WEST", "YARA", "BOLD", "CASA", "DUNE", "ECHO",
    "FARO", "GALA", "HALO", "IRIS", "JADE", "KORA", "LYNX", "MIRA", "NILO", "OPAL",
)
# Zipf-like frequencies: the first brand ~45x as common as the last.
_BRAND_WEIGHTS = tuple(1.0 / (r ** 1.12) for r in range(1, len(HARD_BRANDS) + 1))
# Printed in fine type only (about 6% of the height: 3-4 px at 64 px) - never readable there.
FINE_PRINT = frozenset(("ECHO", "JADE", "NILO", "ULTO"))
SLEEVES = {"T恤": ("短袖", "长袖"), "连衣裙": ("无袖", "短袖")}
NECKLINES = ("圆领", "V领")
BACKGROUNDS = ("plain", "gradient", "wood", "fabric")
_ASPECTS = (1.0, 1.0, 0.75, 4 / 3, 0.8, 1.25)

# Garment variants in the unit box: extra sleeve and neckline shapes over the base silhouette.
_LONG_SLEEVES = (
    ("poly", (0.0, 0.40, 0.14, 0.16, 0.24, 0.36, 0.20, 0.90, 0.06, 0.90), 255),
    ("poly", (1.0, 0.40, 0.86, 0.16, 0.76, 0.36, 0.80, 0.90, 0.94, 0.90), 255),
)
_DRESS_SLEEVES = (
    ("poly", (0.34, 0.04, 0.22, 0.10, 0.20, 0.26, 0.34, 0.24), 255),
    ("poly", (0.66, 0.04, 0.78, 0.10, 0.80, 0.26, 0.66, 0.24), 255),
)
_NECK_CUT = {
    ("T恤", "圆领"): ("ellipse", (0.42, 0.04, 0.58, 0.20), 0),
    ("T恤", "V领"): ("poly", (0.42, 0.10, 0.58, 0.10, 0.50, 0.30), 0),
    ("连衣裙", "圆领"): ("ellipse", (0.42, 0.08, 0.58, 0.22), 0),
    ("连衣裙", "V领"): ("poly", (0.42, 0.12, 0.58, 0.12, 0.50, 0.34), 0),
}


def hard_attributes(rng: random.Random, brand_rate: float = 0.5) -> dict[str, Any]:
    """Category, colour, pattern, a Zipf-drawn brand (or None), visible garment details, the
    background, where the brand is written, and sometimes a second product."""
    category = rng.choice(CATEGORIES)
    a: dict[str, Any] = {"category": category, "colour": rng.choice(COLOURS), "pattern": rng.choice(PATTERNS),
                         "brand": None}
    if rng.random() < brand_rate:
        a["brand"] = rng.choices(HARD_BRANDS, weights=_BRAND_WEIGHTS)[0]
        a["brand_view"] = rng.choice(("logo", "tag", "corner"))
        a["brand_legible"] = a["brand"] not in FINE_PRINT
    if category in SLEEVES:
        a["sleeve"] = rng.choice(SLEEVES[category])
        a["neckline"] = rng.choice(NECKLINES)
    a["background"] = rng.choice(BACKGROUNDS)
    if rng.random() < 0.15:
        a["second"] = {"category": rng.choice([c for c in CATEGORIES if c != category]),
                       "colour": rng.choice([c for c in COLOURS if c != a["colour"]]), "pattern": "纯色"}
    return a


def _shapes(a: dict[str, Any]) -> tuple:
    """The category's silhouette with the drawn sleeve length and neckline."""
    shapes = SHAPES[a["category"]]
    if a.get("sleeve") == "长袖":
        shapes = shapes + _LONG_SLEEVES
    elif a["category"] == "连衣裙" and a.get("sleeve") == "短袖":
        shapes = shapes + _DRESS_SLEEVES
    cut = _NECK_CUT.get((a["category"], a.get("neckline")))
    return shapes + (cut,) if cut else shapes


def _background(w: int, h: int, kind: str, rng: random.Random) -> np.ndarray:
    """A light ground: plain, a two-colour gradient, wood grain or a woven fabric texture."""
    base = np.array(_jitter((228, 226, 220), rng, 20), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "gradient":
        other = np.array(_jitter((200, 210, 228), rng, 25), dtype=np.float32)
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(0.3, 1)) / (w + h)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return base * (1 - t[..., None]) + other * t[..., None]
    if kind == "wood":
        tone = np.array(_jitter((196, 160, 120), rng, 15), dtype=np.float32)
        grain = np.sin(yy / rng.uniform(2.5, 4.5) + 2.5 * np.sin(xx / rng.uniform(9, 20)))
        return tone * (0.9 + 0.08 * grain[..., None])
    if kind == "fabric":
        weave = (np.sin(xx * 1.6) * np.sin(yy * 1.6)) * rng.uniform(5, 10)
        return base + weave[..., None]
    return np.broadcast_to(base, (h, w, 3)).copy()


def _item_layers(a: dict[str, Any], side: int, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """The item drawn on its own square canvas: (RGB colours, L mask), before rotation."""
    mask = Image.new("L", (side, side), 0)
    box = (side * 0.05, side * 0.05, side * 0.9)
    _draw_silhouette(mask, a["category"], box, _shapes(a))
    main = _jitter(COLOUR_RGB[a["colour"]], rng, 10)
    layer = Image.new("RGB", (side, side), main)
    ink = (60, 80, 140) if a["colour"] in ("白色", "黄色", "粉色") else (245, 245, 245)
    _draw_pattern(layer, a["pattern"], box, _jitter(ink, rng, 6), rng)
    edge = tuple(int(v * 0.55) for v in main)
    outline = mask.filter(ImageFilter.MaxFilter(3))
    canvas = Image.new("RGB", (side, side), edge)
    canvas.paste(layer, (0, 0), mask)
    return canvas, outline


def _paste_item(img: Image.Image, a: dict[str, Any], side: int, centre: tuple[float, float],
                rng: random.Random, angle: float | None = None) -> tuple[int, int, int, int]:
    """Rotate the item a little, drop a soft shadow, paste it; returns its pixel box."""
    rgb, mask = _item_layers(a, side, rng)
    angle = rng.uniform(-20, 20) if angle is None else angle
    rgb = rgb.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    left = int(min(max(centre[0] - mask.width / 2, 0), max(img.width - mask.width, 0)))
    top = int(min(max(centre[1] - mask.height / 2, 0), max(img.height - mask.height, 0)))
    shadow = mask.filter(ImageFilter.GaussianBlur(max(1.0, side / 30))).point(lambda v: int(v * 0.45))
    off = max(1, side // 20)
    img.paste((40, 40, 40), (left + off, top + off), shadow)
    img.paste(rgb, (left, top), mask)
    return left, top, left + mask.width, top + mask.height


def _occlude(img: Image.Image, box: tuple[int, int, int, int], rng: random.Random) -> None:
    """A prop (a plain block or disc) over one lower corner of the item: at most ~15% of its box."""
    x0, y0, x1, y1 = box
    w, h = (x1 - x0) * rng.uniform(0.22, 0.38), (y1 - y0) * rng.uniform(0.22, 0.38)
    x = x0 if rng.random() < 0.5 else x1 - w
    shape = (x, y1 - h, x + w, y1)
    fill = _jitter((150, 140, 130), rng, 40)
    d = ImageDraw.Draw(img)
    (d.ellipse if rng.random() < 0.5 else d.rectangle)(shape, fill=fill)


def _brand(img: Image.Image, a: dict[str, Any], box: tuple[int, int, int, int], rng: random.Random) -> None:
    """Write the brand on the product (logo), on a white tag beside it, or in a corner."""
    word, view = a["brand"], a["brand_view"]
    h = img.height
    frac = rng.uniform(0.05, 0.065) if word in FINE_PRINT else {
        "logo": rng.uniform(0.10, 0.16), "tag": rng.uniform(0.12, 0.20), "corner": rng.uniform(0.10, 0.16)}[view]
    font = _font(max(6, round(h * frac)))
    x0, y0, x1, y1 = font.getbbox(word)
    tw, th = x1 - x0, y1 - y0
    d = ImageDraw.Draw(img)
    if view == "logo":
        cx, cy = (box[0] + box[2]) / 2, box[1] + (box[3] - box[1]) * 0.5
        x, y = cx - tw / 2, cy - th / 2
        pad = max(1, th // 5)
        d.rectangle((x - pad, y - pad, x + tw + pad, y + th + pad), fill=(250, 250, 250))
        ink = (20, 20, 20)
    elif view == "tag":
        x = min(max(box[2] - tw * 0.6, 2), img.width - tw - 4)
        y = min(max(box[1] + rng.uniform(0, 0.3) * (box[3] - box[1]), 2), h - th - 4)
        d.rectangle((x - 3, y - 3, x + tw + 3, y + th + 3), fill=(252, 252, 248), outline=(90, 90, 90))
        ink = (30, 30, 30)
    else:
        x = 3 if rng.random() < 0.5 else img.width - tw - 3
        y = 3 if rng.random() < 0.5 else h - th - 3
        ink = (20, 35, 80)
    d.text((x - x0, y - y0), word, font=font, fill=ink)


def hard_image_for(a: dict[str, Any], size: int = 112, rng: random.Random | None = None,
                   narrow: bool = False) -> Image.Image:
    """One photo-like RGB image of attrs `a` (see `hard_attributes`), about size x size pixels.

    `narrow`: the product centred at one scale, upright, unoccluded, on a square canvas (the
    background as `a` says: the caller sets it plain) - training images for a distribution-shift
    benchmark whose validation images keep the full variation."""
    rng = rng or random.Random(0)
    if narrow:
        w = h = size
        img = Image.fromarray(np.clip(_background(w, h, a.get("background", "plain"), rng), 0, 255).astype(np.uint8))
        box = _paste_item(img, a, int(size * 0.62), (w / 2, h / 2), rng, angle=0.0)
        if a.get("brand"):
            _brand(img, a, box, rng)
        return _noisy(img, rng)
    aspect = rng.choice(_ASPECTS)
    scale = rng.uniform(0.85, 1.4)
    w = max(32, round(size * scale * aspect ** 0.5))
    h = max(32, round(size * scale / aspect ** 0.5))
    ground = _background(w, h, a.get("background", "plain"), rng)
    img = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8), "RGB")
    short = min(w, h)
    second = a.get("second")
    if second:
        s2 = int(short * rng.uniform(0.30, 0.40))
        left_side = rng.random() < 0.5
        _paste_item(img, second, s2,
                    (w * (0.78 if left_side else 0.22), h * rng.uniform(0.35, 0.7)), rng)
        side = int(short * rng.uniform(0.48, 0.62))
        centre = (w * (0.36 if left_side else 0.64), h * rng.uniform(0.42, 0.58))
    else:
        side = int(short * rng.uniform(0.45, 0.80))
        centre = (w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7))
    box = _paste_item(img, a, side, centre, rng)
    if rng.random() < 0.25:
        _occlude(img, box, rng)
    if a.get("brand"):
        _brand(img, a, box, rng)
    return _noisy(img, rng)


def _noisy(img: Image.Image, rng: random.Random) -> Image.Image:
    """Sensor-like noise, drawn from the image's own rng."""
    arr = np.asarray(img, dtype=np.int16) + np.asarray(
        np.random.default_rng(rng.getrandbits(32)).integers(-5, 6, size=(img.height, img.width, 3)), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
