"""The search page: type a query, see the top items' images and texts (FastAPI + uvicorn).

    ecomcap serve-search --gallery DIR          # or the registry's champion (no --gallery)

Routes: ``/`` (the page, ``?q=...&top=10``), ``/api/search`` (the same results as JSON),
``/images/{item_id}`` (an item's image from the gallery's images.parquet), ``/healthz``.
Handlers are plain functions (FastAPI runs them in its thread pool): the vector store client and
the image lookup are thread-safe.
"""
from __future__ import annotations

import contextlib
import html
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from ecomcap.errors import EcomcapError
from ecomcap.retrieval.index.gallery import ImageLookup
from ecomcap.retrieval.serve.search import MAX_TOP, Searcher

_STYLE = """body{font-family:"Noto Sans CJK SC","WenQuanYi Zen Hei",sans-serif;margin:24px;color:#222}
form{margin-bottom:18px} input[name=q]{font-size:18px;width:420px;padding:6px}
.grid{display:flex;flex-wrap:wrap;gap:14px} .item{width:170px;border:1px solid #ddd;border-radius:6px;padding:8px}
.item img{width:150px;height:150px;object-fit:contain;display:block;margin:auto;background:#f6f6f6}
.text{margin-top:6px;font-size:15px} .meta{color:#777;font-size:12px} .error{color:#b00020}"""


def _magic_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def render_page(q: str, top: int, result: dict | None, error: str | None, items: int) -> str:
    e = html.escape
    head = (f"<!doctype html><html lang=zh><head><meta charset=utf-8><title>ecomcap search</title>"
            f"<style>{_STYLE}</style></head><body><h2>ecomcap product search</h2>"
            f"<form method=get action='/'><input name=q value='{e(q, quote=True)}' placeholder='红色连衣裙' autofocus>"
            f" top <input name=top type=number min=1 max={MAX_TOP} value={top}> <button>search</button></form>")
    if error:
        return head + f"<p class=error id=error>{e(error)}</p></body></html>"
    if result is None:
        return head + f"<p class=meta>{items} items in the gallery</p></body></html>"
    cards = "".join(
        f"<div class=item data-item-id='{e(r['item_id'], quote=True)}'>"
        f"<img src='/images/{quote(r['item_id'], safe='')}' alt='{e(r['item_id'], quote=True)}'>"
        f"<div class=text>{e(r['text'])}</div><div class=meta>#{r['rank']} · {e(r['item_id'])} · {r['score']:.3f}</div></div>"
        for r in result["results"])
    return head + (f"<p class=meta id=summary>top {len(result['results'])} of {items} items for "
                   f"“{e(result['query'])}” in {result['took_ms']:.1f} ms</p><div class=grid>{cards}</div></body></html>")


def parse_top(raw: str) -> int:
    """The `top` query parameter, with the page's own message when it is not a number."""
    try:
        return int(raw)
    except ValueError:
        raise EcomcapError(f"top must be a whole number between 1 and {MAX_TOP}, got {raw!r}") from None


def create_app(searcher: Searcher, images: ImageLookup):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title="ecomcap search", docs_url=None, redoc_url=None)
    n_items = len(searcher.gallery.item_ids)

    @app.get("/", response_class=HTMLResponse)
    def page(q: str = "", top: str = "10"):
        if not q.strip():
            return HTMLResponse(render_page(q, 10, None, None, n_items))
        try:
            k = parse_top(top)
            return HTMLResponse(render_page(q, k, searcher.search(q, k), None, n_items))
        except EcomcapError as exc:  # the page's own error, never FastAPI's 422 JSON
            shown = int(top) if top.strip().lstrip("-").isdigit() else 10
            return HTMLResponse(render_page(q, shown, None, str(exc), n_items), status_code=400)

    @app.get("/api/search")
    def api(q: str, top: str = "10"):
        try:
            return searcher.search(q, parse_top(top))
        except EcomcapError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/images/{item_id:path}")  # item ids may hold "/"
    def image(item_id: str):
        data = images.get(item_id)
        if data is None:
            raise HTTPException(404, f"no image for item {item_id!r}")
        return Response(data, media_type=_magic_type(data), headers={"Cache-Control": "max-age=3600"})

    @app.get("/healthz")
    def healthz():
        return {"items": n_items, "collection": searcher.collection, "store": searcher.store.cfg.uri}

    return app


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8300) -> None:
    """Run the page on one uvicorn process until interrupted."""
    import uvicorn

    app = create_app(searcher, ImageLookup(searcher.gallery.path / "images.parquet"))
    print(f"search page: http://{host}:{port}/?q=红色连衣裙  ({len(searcher.gallery.item_ids)} items, "
          f"store {searcher.store.cfg.uri})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@contextlib.contextmanager
def search_page_process(gallery: str | Path, store_uri: str, port: int | None = None,
                        timeout_s: float = 300.0, log_path: str | Path | None = None,
                        extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """`ecomcap serve-search` in its own process group on 127.0.0.1; yields the base URL once
    /healthz answers (the gallery is in the store by then); the group is killed on exit."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    log_path = Path(log_path or tempfile.mkstemp(prefix="search_page_", suffix=".log")[1])
    cmd = [sys.executable, "-m", "ecomcap.cli", "serve-search", "--gallery", str(gallery), "--store-uri",
           str(store_uri), "--host", "127.0.0.1", "--port", str(port), *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise EcomcapError(f"the search page exited (rc={proc.returncode}): "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=3) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise EcomcapError(f"the search page did not answer within {timeout_s:.0f}s (log: {log_path})")
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
