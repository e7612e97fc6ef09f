"""The page under load and failure (FastAPI in process): concurrent queries share one encoder
forward and one index call, a full queue sheds with 503 + Retry-After at once, a failing index
backend is a 503 page (never a 500), and /readyz reports the index."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ecomcap.retrieval.index.demo import demo_gallery
from ecomcap.retrieval.index.gallery import ImageLookup
from ecomcap.retrieval.serve.batcher import Overloaded, QueryBatcher
from ecomcap.retrieval.serve.page import create_app
from ecomcap.retrieval.serve.search import open_searcher


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return demo_gallery(tmp_path_factory.mktemp("gallery") / "g", 300, seed=5)


def test_concurrent_queries_are_batched():
    calls = []

    def run(queries, tops):
        calls.append(len(queries))
        time.sleep(0.02)  # a model forward
        return [{"query": q} for q in queries]

    async def main():
        b = QueryBatcher(run, max_batch=32)
        out = await asyncio.gather(*(b.submit(f"q{i}", 10) for i in range(16)))
        b.close()
        return out

    out = asyncio.run(main())
    assert [o["query"] for o in out] == [f"q{i}" for i in range(16)]
    assert sum(calls) == 16 and len(calls) <= 3, calls  # 16 requests, a few forwards


def test_a_full_queue_sheds_at_once():
    release = threading.Event()

    def slow(queries, tops):
        release.wait(5)
        return [{} for _ in queries]

    async def main():
        b = QueryBatcher(slow, max_pending=2)
        waiting = [asyncio.ensure_future(b.submit("a", 1)), asyncio.ensure_future(b.submit("b", 1))]
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        with pytest.raises(Overloaded):
            await b.submit("c", 1)
        shed_s = time.perf_counter() - t0
        release.set()
        await asyncio.gather(*waiting)
        b.close()
        return shed_s, b.stats()

    shed_s, stats = asyncio.run(main())
    assert shed_s < 0.05 and stats["shed"] == 1


def test_page_answers_503_when_busy_or_the_backend_fails(gallery):
    searcher = open_searcher(gallery)
    images = ImageLookup(gallery / "images.parquet")
    busy = TestClient(create_app(searcher, images, max_pending=0))
    r = busy.get("/", params={"q": "红色"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.text
    assert busy.get("/api/search", params={"q": "红色"}).status_code == 503

    class Down:
        kind, approximate = "milvus", True

        def search(self, q, k):
            raise ConnectionError("milvus:19530 unreachable (timed out after 1.0 s)")

        def ready(self):
            return False, "milvus:19530 unreachable"

        def describe(self):
            return {"kind": "milvus"}

        def close(self):
            pass

    searcher.index = Down()  # a named stand-in for a Milvus server that is down
    down = TestClient(create_app(searcher, images))
    page = down.get("/", params={"q": "红色"})
    assert page.status_code == 503 and "search unavailable" in page.text and "19530" not in page.text
    assert down.get("/readyz").status_code == 503 and down.get("/healthz").status_code == 200


def test_readyz_images_cache_and_query_bounds(gallery):
    searcher = open_searcher(gallery)
    client = TestClient(create_app(searcher, ImageLookup(gallery / "images.parquet")))
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["index"]["kind"] == "exact"
    item = searcher.gallery.item_ids[0]
    first = client.get(f"/images/{item}")
    assert first.status_code == 200 and "max-age" in first.headers["cache-control"]
    again = client.get(f"/images/{item}", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content
    assert client.get("/static/page.css").headers["content-type"].startswith("text/css")
    for top in ("0", "101", "-5", "--5", "²", "9" * 40, "1e3"):
        assert client.get("/", params={"q": "红色", "top": top}).status_code == 400
    assert client.get("/", params={"q": "x" * 5000}).status_code == 400
    assert np.all([r["score"] <= 1.0001 for r in client.get("/api/search", params={"q": "红色"}).json()["results"]])


def test_an_unreachable_milvus_server_is_a_503_within_a_second(gallery):
    """The server path against a closed port (no Milvus server can run in this test): the page
    starts, /readyz says why it is not ready, and a search is a 503 page in under a second."""
    import socket

    from ecomcap.retrieval.index.base import IndexConfig
    from ecomcap.retrieval.index.milvus import StoreConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    store = StoreConfig(uri=f"http://127.0.0.1:{port}", timeout_s=1.0)
    searcher = open_searcher(gallery, IndexConfig(kind="milvus", milvus=store))
    client = TestClient(create_app(searcher, ImageLookup(gallery / "images.parquet")))
    t0 = time.perf_counter()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    t1 = time.perf_counter()
    page = client.get("/", params={"q": "红色连衣裙"})
    t2 = time.perf_counter()
    assert page.status_code == 503 and "search unavailable" in page.text and page.headers["retry-after"] == "1"
    assert t1 - t0 <= 1.0 and t2 - t1 <= 1.0, (t1 - t0, t2 - t1)


def test_a_search_that_times_out_is_dropped_not_computed_later():
    """A caller that gave up (timeout) leaves the queue: its search is never run, and what waits
    counts against max_pending only while it waits."""
    seen = []
    gate = threading.Event()

    def run(queries, tops):
        seen.extend(queries)
        gate.wait(2)
        return [{"query": q} for q in queries]

    async def main():
        b = QueryBatcher(run, max_wait_ms=0, timeout_s=0.1)
        first = asyncio.ensure_future(b.submit("slow", 1))  # occupies the worker until the gate opens
        await asyncio.sleep(0.02)
        with pytest.raises(TimeoutError):
            await b.submit("abandoned", 1)  # queued behind "slow", gives up after 0.1 s
        with pytest.raises(TimeoutError):
            await first  # timed out as well, while its search still runs
        assert b.pending == 0  # given up: neither counts against max_pending any more
        gate.set()
        out = await asyncio.wait_for(b.submit("next", 1), 2)
        b.close()
        return out

    assert asyncio.run(main())["query"] == "next"
    assert "abandoned" not in seen, seen


def test_the_page_process_runs_from_the_repo_root(tmp_path):
    """`search_page_process` with a gallery path relative to the checkout (as `ecomcap
    serve-search --gallery .run/...` is typed there): the page's working directory is the repo
    root, not the package directory."""
    import shutil
    import urllib.request
    from pathlib import Path

    from ecomcap.retrieval.serve.page import search_page_process

    root = Path(__file__).resolve().parents[1]
    rel = Path(".run") / f"test_page_cwd_{tmp_path.name}"
    try:
        demo_gallery(root / rel / "g", 50, seed=2)
        with search_page_process(rel / "g", log_path=tmp_path / "page.log", timeout_s=120) as base:
            with urllib.request.urlopen(f"{base}/readyz", timeout=10) as r:
                assert r.status == 200
    finally:
        shutil.rmtree(root / rel, ignore_errors=True)
