"""Pictures people look at: a few queries with their top-5 images (hit = green, miss = red),
as a PNG for MLflow and as an HTML page for the ZenML dashboard."""
from __future__ import annotations

import base64
import html
import io
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

_CJK_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")


@lru_cache(maxsize=4)
def _font(size: int):
    for path in _CJK_FONTS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # no CJK glyphs: query ids still identify rows


def query_grid(rows: list[dict[str, Any]], images: dict[str, bytes], thumb: int = 96) -> Image.Image:
    """rows: {"query_text", "ranked": [item ids], "gold": set of ids}; one line per query."""
    label_w, pad = 220, 6
    canvas = Image.new("RGB", (label_w + 5 * (thumb + pad) + pad, max(1, len(rows)) * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (thumb + pad)
        draw.text((pad, y + thumb // 3), row["query_text"][:14], fill="black", font=_font(18))
        for c, item in enumerate(row["ranked"][:5]):
            x = label_w + pad + c * (thumb + pad)
            if item in images:
                pic = Image.open(io.BytesIO(images[item])).convert("RGB").resize((thumb - 6, thumb - 6))
                canvas.paste(pic, (x + 3, y + 3))
            colour = (30, 160, 60) if item in row["gold"] else (200, 40, 40)
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), outline=colour, width=3)
    return canvas


def query_html(rows: list[dict[str, Any]], images: dict[str, bytes], metrics: dict[str, float]) -> str:
    head = " · ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    parts = [f"<html><head><meta charset='utf-8'><title>retrieval</title></head><body><h3>{html.escape(head)}</h3>",
             "<table>"]
    for row in rows:
        cells = []
        for item in row["ranked"][:5]:
            src = base64.b64encode(images.get(item, b"")).decode()
            colour = "#1ea03c" if item in row["gold"] else "#c82828"
            cells.append(f"<td style='border:3px solid {colour}'><img width=96 src='data:image/jpeg;base64,{src}'>"
                         f"<br><small>{html.escape(item)}</small></td>")
        parts.append(f"<tr><th>{html.escape(row['query_text'])}</th>{''.join(cells)}</tr>")
    parts.append("</table></body></html>")
    return "".join(parts)
