"""The search page: type a query, see the top items' images and texts (FastAPI + uvicorn).

    ecomcap serve-search --gallery DIR          # or the registry's serving/champion version

Routes: ``/`` (the page, ``?q=...&top=10``), ``/api/search`` (the same results as JSON),
``/images/{item_id}`` (an item's image, ETag + Cache-Control: a browser fetches it once),
``/static/page.css``, ``/healthz`` (liveness: the process answers) and ``/readyz`` (readiness:
the index is loaded and built; 503 otherwise). Handlers are async: queries from concurrent
requests are batched into one encoder forward and one index call (`batcher.py`); when more
than `max_pending` wait, a request is answered 503 with Retry-After at once, never queued forever.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from starlette.requests import Request  # module level: FastAPI resolves handler annotations here

from ecomcap.errors import EcomcapError
from ecomcap.retrieval.index.gallery import ImageLookup
from ecomcap.retrieval.serve.batcher import Expired, Overloaded, QueryBatcher
from ecomcap.retrieval.serve.search import MAX_TOP, Searcher

STYLE = """body{font-family:"Noto Sans CJK SC","WenQuanYi Zen Hei",sans-serif;margin:24px;color:#222}
form{margin-bottom:18px} input[name=q]{font-size:18px;width:420px;padding:6px}
.grid{display:flex;flex-wrap:wrap;gap:14px} .item{width:170px;border:1px solid #ddd;border-radius:6px;padding:8px}
.item img{width:150px;height:150px;object-fit:contain;display:block;margin:auto;background:#f6f6f6}
.text{margin-top:6px;font-size:15px} .meta{color:#777;font-size:12px} .error{color:#b00020}"""
BUSY = "the search page is busy: try again in a second"
log = logging.getLogger(__name__)


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
            f"<link rel=stylesheet href='/static/page.css'></head><body><h2>ecomcap product search</h2>"
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


def create_app(searcher: Searcher, images: ImageLookup, max_batch: int = 32, max_pending: int = 256,
               timeout_s: float = 10.0):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    batcher = QueryBatcher(searcher.search_many, max_batch=max_batch, max_pending=max_pending, timeout_s=timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="ecomcap search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    n_items = len(searcher.gallery.item_ids)
    version = str(searcher.gallery.index.get("fingerprint", ""))[:16]
    busy = {"Retry-After": "1"}
    last_warning = [0.0]

    class Unavailable(Exception):
        """The search itself failed (index backend down, timed out, shed): a 503, not the user's fault."""

    async def run(q: str, top: str) -> dict:
        """The result; EcomcapError (400) for bad input, Unavailable (503) for everything after."""
        k = parse_top(top)
        query = Searcher.check(q, k)
        try:
            return await batcher.submit(query, k)
        except (Overloaded, Expired):
            raise Unavailable(BUSY) from None
        except Exception as exc:  # e.g. a Milvus server that timed out: EcomcapError from the store
            if time.monotonic() - last_warning[0] > 10:  # one line per 10 s during an outage, not per request
                last_warning[0] = time.monotonic()
                log.warning("search failed: %s", _short(exc), exc_info=not isinstance(exc, EcomcapError))
            raise Unavailable("search unavailable: the index backend did not answer (the page's log says why)") from None

    @app.get("/", response_class=HTMLResponse)
    async def page(q: str = "", top: str = "10"):
        if not q.strip():
            return HTMLResponse(render_page(q, 10, None, None, n_items))
        try:
            shown = int(top) if len(top) < 6 else 10
        except ValueError:
            shown = 10
        try:
            result = await run(q, top)
        except EcomcapError as exc:  # the page's own error, never FastAPI's 422 JSON
            return HTMLResponse(render_page(q, shown, None, str(exc), n_items), status_code=400)
        except Unavailable as exc:
            return HTMLResponse(render_page(q, shown, None, str(exc), n_items), status_code=503, headers=busy)
        return HTMLResponse(render_page(q, result["top"], result, None, n_items))

    @app.get("/api/search")
    async def api(q: str = "", top: str = "10"):
        try:
            return await run(q, top)
        except EcomcapError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Unavailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers=busy)

    @app.get("/images/{item_id:path}")  # item ids may hold "/"
    async def image(item_id: str, request: Request):
        etag = '"' + hashlib.sha256(f"{version}/{item_id}".encode()).hexdigest()[:24] + '"'
        cache = {"ETag": etag, "Cache-Control": "public, max-age=86400"}
        if item_id in images and request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=cache)
        data = await run_in_threadpool(images.get, item_id)
        if data is None:
            return JSONResponse({"error": f"no image for item {item_id!r}"}, status_code=404)
        return Response(data, media_type=_magic_type(data), headers=cache)

    @app.get("/static/page.css")
    async def css():
        return Response(STYLE, media_type="text/css", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/healthz")
    async def healthz():
        return {"ok": True, "items": n_items, "batches": batcher.stats()}

    @app.get("/readyz")
    async def readyz():
        try:
            ok, reason = await run_in_threadpool(searcher.index.ready)
        except Exception as exc:  # ready() should not raise; a broken backend is "not ready"
            ok, reason = False, _short(exc)
        body = {"ready": ok, "reason": reason, "index": searcher.index.describe(), "items": n_items,
                "gated_index": searcher.gated}  # False: --index / --ef overrode the recorded index
        return JSONResponse(body, status_code=200 if ok else 503)

    return app


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8300, max_pending: int = 256,
          max_batch: int = 32) -> None:
    """Run the page on one uvicorn process (uvloop + httptools when installed) until interrupted."""
    import uvicorn

    app = create_app(searcher, ImageLookup(searcher.gallery.path / "images.parquet"), max_batch=max_batch,
                     max_pending=max_pending)
    print(f"search page: http://{host}:{port}/?q=红色连衣裙  ({len(searcher.gallery.item_ids)} items, "
          f"index {searcher.index.describe()})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


class PageURL(str):
    """The page's base URL, with the pid of the process serving it."""

    def __new__(cls, url: str, pid: int):
        obj = super().__new__(cls, url)
        obj.pid = pid
        return obj


@contextlib.contextmanager
def search_page_process(gallery: str | Path, store_uri: str | None = None, port: int | None = None,
                        timeout_s: float = 300.0, log_path: str | Path | None = None,
                        extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """`ecomcap serve-search` in its own process group on 127.0.0.1 (its recorded index, or the
    Milvus store at `store_uri`); yields the base URL once /readyz answers 200 (the index is
    built by then); the group is killed on exit. The URL's `.pid` is the page process (the
    load benchmark reads its CPU time)."""
    from ecomcap.processes import free_port, serving_process

    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(log_path or tempfile.mkstemp(prefix="search_page_", suffix=".log")[1])
    store = ["--index", "milvus", "--store-uri", str(store_uri)] if store_uri else []
    cmd = [sys.executable, "-m", "ecomcap.cli", "serve-search", "--gallery", str(gallery), *store,
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    with serving_process(cmd, f"{base}/readyz", log_path, timeout_s, "the search page",
                         cwd=Path(__file__).resolve().parents[3]) as proc:
        yield PageURL(base, proc.pid)
