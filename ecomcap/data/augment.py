"""Image augmentation for SFT: on the fly, each op switchable, deterministic per (seed, step, image).

RandAugment-style geometry (rotation, translation, scale), colour jitter (brightness, contrast,
saturation) and a random resized crop, all in PIL on the decoded image, so the SFT prompt cache
keeps decoded images and augments after the cache (with augmentation off the image is returned
as it is: the cache's bit-identical check holds). Draws come from a generator seeded by (seed,
step, image index), never from global state: a resumed run augments step k exactly as the
uninterrupted run did.

Left off by default, and why:
- hue: a hue shift turns 红色 into 橙色 or 紫色 while the reference still says 红色, so the model
  learns to name the wrong colour;
- horizontal flip: the silhouettes are symmetric enough, but a flip mirrors every brand word (on
  ~35% of the synthetic images, and on real products and logos) and teaches mirrored brands.
"""
from __future__ import annotations

import hashlib
import random

from PIL import Image, ImageEnhance

from ecomcap.config import AugmentConfig  # noqa: F401  (the config lives with the others)


def _rng(cfg: AugmentConfig, step: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"{cfg.seed}:{step}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _crop(img: Image.Image, rng: random.Random, min_area: float) -> Image.Image:
    if min_area >= 1:
        return img
    w, h = img.size
    area = rng.uniform(min_area, 1.0) * w * h
    ratio = rng.uniform(3 / 4, 4 / 3)
    cw, ch = min(w, round((area * ratio) ** 0.5)), min(h, round((area / ratio) ** 0.5))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)


def _geometry(img: Image.Image, rng: random.Random, cfg: AugmentConfig) -> Image.Image:
    w, h = img.size
    fill = img.getpixel((0, 0))  # the background's colour (a product photo's corner)
    if cfg.scale:
        s = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        scaled = img.resize((nw, nh), Image.BICUBIC)
        canvas = Image.new(img.mode, (w, h), fill)
        canvas.paste(scaled, ((w - nw) // 2, (h - nh) // 2))
        img = canvas
    if cfg.rotate_deg or cfg.translate:
        angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
        dx, dy = (round(rng.uniform(-cfg.translate, cfg.translate) * side) for side in (w, h))
        img = img.rotate(angle, resample=Image.BICUBIC, translate=(dx, dy), fillcolor=fill)
    return img


def _colour(img: Image.Image, rng: random.Random, cfg: AugmentConfig) -> Image.Image:
    ops = [(ImageEnhance.Brightness, cfg.brightness), (ImageEnhance.Contrast, cfg.contrast),
           (ImageEnhance.Color, cfg.saturation)]
    rng.shuffle(ops)
    for op, strength in ops:
        if strength:
            img = op(img).enhance(rng.uniform(1 - strength, 1 + strength))
    if cfg.hue:
        h, s, v = img.convert("HSV").split()
        shift = round(rng.uniform(-cfg.hue, cfg.hue) * 255)
        h = h.point(lambda x: (x + shift) % 256)
        img = Image.merge("HSV", (h, s, v)).convert("RGB")
    return img


def augment(img: Image.Image, cfg: AugmentConfig, step: int, index: int) -> Image.Image:
    """The augmented copy of `img` for training step `step`, image `index` of its batch (the same
    arguments always give the same pixels); `img` itself when augmentation is off."""
    if not cfg.enabled:
        return img
    rng = _rng(cfg, step, index)
    out = img.convert("RGB")
    out = _crop(out, rng, cfg.crop_min_area)
    out = _geometry(out, rng, cfg)
    out = _colour(out, rng, cfg)
    if cfg.hflip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out
