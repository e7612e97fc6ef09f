"""Per-image checks: decode, verify, size bounds; never let PIL allocate a decompression bomb."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class ImageCheck:
    """Outcome of checking one image: its facts when ok, else a reason code and a detail."""

    ok: bool
    format: str = ""
    width: int = 0
    height: int = 0
    reason: str | None = None
    detail: str = ""


MAX_ASPECT_RATIO = 200.0  # Qwen2-VL's image processor refuses anything more elongated


def check_image(data: bytes, *, min_side: int, max_pixels: int, decode: bool = True,
                max_aspect_ratio: float = MAX_ASPECT_RATIO) -> ImageCheck:
    """Open the header, bound the pixel count *before* decoding, then verify and decode.

    Decoding is what catches a truncated JPEG (``verify`` does not); it is bounded by
    `max_pixels`, so memory per image is bounded too. An image more elongated than
    `max_aspect_ratio` would make the model's image processor fail a whole batch.
    """
    if not data:
        return ImageCheck(False, reason="empty_image", detail="0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = (img.format or "").upper(), img.size
    except Image.DecompressionBombError as exc:
        return ImageCheck(False, reason="too_many_pixels", detail=str(exc)[:200])
    except UnidentifiedImageError:
        return ImageCheck(False, reason="bad_image", detail="not an image format PIL can open")
    except (OSError, ValueError, SyntaxError) as exc:
        return ImageCheck(False, reason="bad_image", detail=f"does not open: {exc}"[:200])
    if w * h > max_pixels:
        return ImageCheck(False, fmt, w, h, "too_many_pixels", f"{w}x{h} > {max_pixels} px")
    if min(w, h) < min_side:
        return ImageCheck(False, fmt, w, h, "image_too_small", f"{w}x{h}, min side {min_side}")
    if max(w, h) > max_aspect_ratio * min(w, h):
        return ImageCheck(False, fmt, w, h, "extreme_aspect_ratio", f"{w}x{h}, more than {max_aspect_ratio:g}:1")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        if decode:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        return ImageCheck(False, fmt, w, h, "bad_image", f"fails verify/decode: {exc}"[:200])
    return ImageCheck(True, fmt, w, h)
