"""A headless Chromium page driven over the DevTools protocol (real browser, no mocks).

`tests/mlflow_ui.py` renders pages with Chromium's one-shot ``--screenshot``/``--dump-dom``
after a virtual-time budget; single-page apps that poll forever (ZenML's dashboard) never let
virtual time run out, and checking a visualisation needs a click. This drives the same Debian
Chromium (same flags, throw-away profile, process group killed on exit) through
``--remote-debugging-port``: navigate, wait until a JavaScript condition holds, click, screenshot.
Only 127.0.0.1 is used.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.mlflow_ui import CHROMIUM_FLAGS, _kill_group, ensure_chromium


class Page:
    """One tab: `goto`, `eval`, `wait_for`, `click_text`, `screenshot`, `text`."""

    def __init__(self, ws) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=120))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def eval(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error in {expression[:80]!r}: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, what: str, timeout_s: float = 60.0) -> None:
        """Poll a JS condition until true; on timeout an AssertionError with the page text."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.eval(f"Boolean({expression})"):
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; page text: "
                             f"{self.text()[:2500]}")

    def click(self, element_js: str, what: str) -> None:
        """A real mouse click (press + release at the centre) on the element `element_js` yields."""
        box = self.eval(f"""(() => {{ const el = ({element_js});
            if (!el) return null; el.scrollIntoView({{block: 'center', inline: 'center'}});
            const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        assert box, f"nothing to click for {what}; page text: {self.text()[:2500]}"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def click_text(self, text: str, selector: str = "*") -> None:
        """Click the innermost visible element matching `selector` whose text is `text`."""
        self.click(f"""[...document.querySelectorAll({json.dumps(selector)})]
              .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null)
              .pop()""", f"text {text!r}")

    def screenshot(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path


@contextlib.contextmanager
def chromium_page(width: int = 1600, height: int = 1000, timeout_s: float = 60.0) -> Iterator[Page]:
    """A fresh headless Chromium with one blank tab, closed (process group killed) on exit."""
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="chromium_cdp_")
    cmd = [ensure_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
           "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port (rc={proc.poll()}): {' '.join(cmd)}")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=timeout_s) as ws:
            page = Page(ws)
            page.call("Page.enable")
            page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
            yield page
    finally:
        _kill_group(proc, grace_s=5)
        shutil.rmtree(profile, ignore_errors=True)
