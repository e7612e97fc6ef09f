"""Pictures people would rather look at: a samples page and loss curves.

`samples_html` shows each image with its generated caption and references (images inline, so
the page works as a single MLflow or ZenML artifact); `loss_curves_png` plots every stage's
`metrics.jsonl` (training loss, SCST reward, validation CIDEr-D).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Sequence

from PIL import Image


def _thumb(data: bytes, side: int = 160) -> str:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _wrong(sample: dict) -> str:
    """The attributes a caption gets wrong (synthetic ground truth), as 'should be: ...' in red."""
    wrong = sample.get("wrong") or []
    if not wrong:
        return ""
    return "<div class='wrong'>✗ wrong attributes, should be " + html.escape("; ".join(wrong)) + "</div>"


def samples_html(samples: Sequence[dict], metrics: dict, title: str = "ecomcap validation samples") -> str:
    """samples: {"image_id", "image" (bytes), "caption", "references": [...], optional "wrong":
    ["field: true value", ...]} each; wrong attributes are marked in red."""
    head = " · ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                      if not isinstance(v, dict))
    rows = []
    for s in samples:
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in s.get("references", []))
        rows.append(
            f"<tr><td><img src='{_thumb(s['image'])}' alt='{html.escape(s['image_id'])}'></td>"
            f"<td><div class='id'>{html.escape(s['image_id'])}</div>"
            f"<div class='gen'>{html.escape(s['caption']) or '<i>(empty)</i>'}</div>{_wrong(s)}"
            f"<ul class='refs'>{refs}</ul></td></tr>"
        )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} td{{vertical-align:top;padding:6px;border-bottom:1px solid #ddd}}
.gen{{font-size:1.15em;font-weight:bold;margin:4px 0}} .refs{{color:#555;margin:0;padding-left:1.2em}}
.id{{color:#999;font-size:.8em}} .wrong{{color:#b00020;font-weight:bold}}</style></head><body><h2>{html.escape(title)}</h2><p>{html.escape(head)}</p>
<table>{''.join(rows)}</table></body></html>"""


def read_metrics_log(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_curves_png(logs: dict[str, str | Path], out_png: str | Path) -> Path | None:
    """One panel per stage log: its loss (and reward for SCST), validation CIDEr-D on a twin axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = {name: read_metrics_log(p) for name, p in logs.items()}
    stages = {k: v for k, v in stages.items() if v}
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], stages.items()):
        key = "reward" if name == "scst" and any("reward" in r for r in rows) else "loss"
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key, color="tab:blue", linewidth=1)
        ax.set_title(f"{name}: {key}")
        ax.set_xlabel("step")
        val = [(r["step"], r["val_CIDEr-D"]) for r in rows if "val_CIDEr-D" in r]
        if val:
            twin = ax.twinx()
            twin.plot(*zip(*val), "o-", color="tab:red", label="val CIDEr-D")
            twin.set_ylabel("val CIDEr-D", color="tab:red")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
