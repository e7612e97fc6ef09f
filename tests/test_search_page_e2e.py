"""End to end: `ecomcap serve-search` in its own process over an embedded Milvus Lite store, a
query typed into the page in headless Chromium, the top items' images loaded and shown.

Needs Debian's chromium. Screenshots land in tmp_path and, when ECOMCAP_SCREENSHOTS is set, in
that directory too.
"""
import os
import shutil
from pathlib import Path

import pytest

from ecomcap.retrieval.index.demo import demo_gallery
from ecomcap.retrieval.serve.page import search_page_process
from tests.browser import chromium_page
from tests.mlflow_ui import ensure_chromium

pytestmark = pytest.mark.e2e

IMAGES_LOADED = ("[...document.querySelectorAll('.item img')].length > 0 && "
                 "[...document.querySelectorAll('.item img')].every(i => i.complete && i.naturalWidth > 0)")


def test_search_page_shows_images_for_a_typed_query(tmp_path):
    ensure_chromium()
    gallery = demo_gallery(tmp_path / "gallery", 2000, seed=7)
    with search_page_process(gallery, str(tmp_path / "milvus.db")) as base, chromium_page(1400, 900) as page:
        page.goto(base + "/")
        page.wait_for("document.querySelector('input[name=q]')", "the search box")
        page.click("document.querySelector('input[name=q]')", "the search box")
        page.call("Input.insertText", text="红色连衣裙")
        for kind in ("keyDown", "keyUp"):
            page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      text="\r" if kind == "keyDown" else "")
        page.wait_for("location.search.includes('q=')", "the results page")
        page.wait_for(IMAGES_LOADED, "every result image decoded", 60)
        cards = page.eval("[...document.querySelectorAll('.item')].map(c => c.querySelector('.text').innerText)")
        sizes = page.eval("[...document.querySelectorAll('.item img')].map(i => [i.naturalWidth, i.naturalHeight])")
        shot = page.screenshot(tmp_path / "search_page.png")
    assert len(cards) == 10 and all("连衣裙" in t for t in cards[:3]), cards
    assert all(w == 64 and h == 64 for w, h in sizes), sizes
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    dest = os.environ.get("ECOMCAP_SCREENSHOTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(dest) / shot.name)
