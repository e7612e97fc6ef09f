"""Real (no mocks) checks that the MLflow web UI shows our runs.

Helpers for end-to-end tests: start a real ``mlflow server`` on a free loopback port, render its
React single-page UI with Debian's headless Chromium (``--screenshot`` and ``--dump-dom`` after
``--virtual-time-budget`` lets the app's JavaScript and API calls finish), and assert on the
rendered DOM.

Requires the Debian ``chromium`` package (``apt-get install -y chromium``); it is never installed
from here. Only 127.0.0.1 is used.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"

# Flags this workplace needs (closed network; root; no GPU), plus --disable-dev-shm-usage because
# containers often have a tiny /dev/shm.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]


def ensure_chromium() -> str:
    """The Chromium binary's path; a RuntimeError saying how to install it when it is missing."""
    for cand in (CHROMIUM, shutil.which("chromium")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise RuntimeError(
        "Chromium is needed for the MLflow UI end-to-end check but was not found at "
        f"{CHROMIUM}. Install Debian's package first: apt-get update && apt-get install -y chromium"
    )


# ----------------------------------------------------------------------------- server

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_cmd() -> list[str]:
    script = Path(sys.executable).with_name("mlflow")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "mlflow"]


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left (mlflow's parent ignores SIGTERM
    while its children linger)."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # The group may outlive its leader (workers): always make sure it is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_dir: str, timeout_s: float = 90.0) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1:<free port>; yield its base URL once ``/health`` answers.

    One uvicorn worker, MLflow's job-execution side processes (huey consumers) turned off, the
    default security middleware left on (it allows 127.0.0.1 and localhost as Host and origin).
    The whole process group is terminated on exit, whatever happens.
    """
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = _mlflow_cmd() + [
        "server",
        "--backend-store-uri", backend_store_uri,
        "--default-artifact-root", str(artifacts_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey consumer processes
    env.pop("MLFLOW_TRACKING_URI", None)
    log_dir = Path(tempfile.mkdtemp(prefix="mlflow_server_log_"))
    log_path = log_dir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early (rc={proc.returncode}): "
                                   f"{' '.join(cmd)}\n--- log tail ---\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=3) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer {base}/health within {timeout_s:.0f}s"
                                   f"\n--- log tail ---\n{_tail(log_path)}")
            time.sleep(0.5)
        yield base
    finally:
        _kill_group(proc)
        shutil.rmtree(log_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- browser

def _run_chromium(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium_profile_")  # new, empty --user-data-dir each time
    cmd = [ensure_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc, grace_s=5)
        raise RuntimeError(f"chromium timed out after {timeout_s:.0f}s: {' '.join(cmd)}") from None
    finally:
        # Renderer/GPU helper processes share the group; never leave them behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(profile, ignore_errors=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def render(url: str, out_png: Path, width: int = 1400, height: int = 1000,
           wait_ms: int = 15000) -> str:
    """Screenshot ``url`` into ``out_png`` and return its DOM serialised after the JS ran.

    Two headless Chromium runs (one ``--screenshot``, one ``--dump-dom``) with the same window
    size and ``--virtual-time-budget=wait_ms``: virtual time only advances while the page is idle
    (pending fetches hold it), so the single-page app has loaded its data when the budget ends.
    """
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.unlink(missing_ok=True)
    common = [f"--window-size={width},{height}", f"--virtual-time-budget={int(wait_ms)}"]
    timeout_s = wait_ms / 1000 + 60

    shot = _run_chromium([*common, f"--screenshot={out_png}", url], timeout_s)
    if not out_png.is_file() or out_png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot for {url} (rc={shot.returncode}):\n"
                           f"{shot.stderr.decode(errors='replace')[-2000:]}")

    dump = _run_chromium([*common, "--dump-dom", url], timeout_s)
    dom = dump.stdout.decode("utf-8", errors="replace")
    if dump.returncode != 0 or "<html" not in dom.lower():
        raise RuntimeError(f"chromium --dump-dom failed for {url} (rc={dump.returncode}):\n"
                           f"{dump.stderr.decode(errors='replace')[-2000:]}")
    return dom


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in self._SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def dom_text(dom: str) -> str:
    """The visible text of a dumped DOM (scripts/styles dropped), whitespace-joined."""
    p = _TextExtractor()
    p.feed(dom)
    p.close()
    return " ".join(p.parts)


# ----------------------------------------------------------------------------- URLs and values

def experiment_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table. (Plain ``#/experiments/<id>`` opens the GenAI "Overview" tab
    in MLflow 3 unless the experiment is tagged as model training, which lists no runs.)"""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare-runs route, as the UI builds it (Routes.getCompareRunPageRoute):
    ``#/compare-runs?runs=<JSON list>&experiments=<JSON list>`` (URL-encoded here)."""
    q = urllib.parse.urlencode({"runs": json.dumps(list(run_ids), separators=(",", ":")),
                                "experiments": json.dumps([str(experiment_id)], separators=(",", ":"))},
                               quote_via=urllib.parse.quote)
    return f"{base_url.rstrip('/')}/#/compare-runs?{q}"


def _js_round(x: float, scale: float) -> float:
    return math.floor(x * scale + 0.5) / scale  # JS Math.round: halves go toward +infinity


def _js_str(x: float) -> str:
    if x == int(x) and abs(x) < 1e21:
        return str(int(x))
    return repr(x)


def format_metric(value: float) -> str:
    """Python port of the MLflow UI's ``Utils.formatMetric`` (compare-runs metrics table, runs
    table): 3 decimals below 10, 2 below 100, 1 above; exponent form below 1e-3."""
    if value == 0:
        return "0"
    a = abs(value)
    if a < 1e-3:
        mant, exp = f"{value:.3e}".split("e")
        return f"{mant}e{int(exp):+d}"  # JS toExponential(3): 1.235e-4
    if a < 10:
        return _js_str(_js_round(value, 1e3))
    if a < 100:
        return _js_str(_js_round(value, 1e2))
    return _js_str(_js_round(value, 1e1))


def value_renderings(value: float) -> list[str]:
    """Ways the UI may print ``value``, the likeliest first: formatMetric, the full repr, then
    rounded to 6..2 decimals (with and without trailing zeros; the parallel-coordinates plot
    prints e.g. 5 decimals)."""
    out = [format_metric(value), repr(float(value))]
    for d in range(6, 1, -1):
        fixed = f"{value:.{d}f}"
        out += [fixed, fixed.rstrip("0").rstrip(".") if "." in fixed else fixed]
    seen: list[str] = []
    for s in out:
        if s and s not in seen and s != "-0":
            seen.append(s)
    return seen


def _find_number(text: str, rendering: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(rendering)}(?![\d])", text) is not None


def _snippet(text: str, limit: int = 2500) -> str:
    return text if len(text) <= limit else text[:limit] + f" ...[{len(text) - limit} more chars]"


# ----------------------------------------------------------------------------- the check

def check_runs_visible(base_url: str, experiment_id: str, run_ids: list[str], metric_key: str,
                       values: list[float], shots_dir: Path, wait_ms: int = 15000,
                       compare_height: int = 2000) -> dict:
    """Open the experiment's runs page and the compare view of ``run_ids``; save
    ``experiment.png`` and ``compare.png`` (and the dumped DOMs as .html) into ``shots_dir``
    (runs with many params/metrics need a larger ``compare_height``);
    assert every run is listed and every value of ``metric_key`` is shown in the compare view.

    Returns {"experiment_png", "compare_png", "experiment_url", "compare_url",
    "found": {value: rendering seen}}. AssertionErrors carry a snippet of the page text.
    """
    shots_dir = Path(shots_dir)
    shots_dir.mkdir(parents=True, exist_ok=True)
    exp_png, cmp_png = shots_dir / "experiment.png", shots_dir / "compare.png"

    # 1. the experiment's runs table: each run is a row (row-id / link carry the run id).
    e_url = experiment_url(base_url, experiment_id)
    e_dom = render(e_url, exp_png, width=1600, height=900, wait_ms=wait_ms)
    (shots_dir / "experiment.html").write_text(e_dom, encoding="utf-8")
    e_text = dom_text(e_dom)
    missing = [r for r in run_ids if r not in e_dom]
    assert not missing, (f"runs {missing} not listed on the experiment page {e_url} "
                         f"(screenshot {exp_png}). Page text: {_snippet(e_text)}")

    # 2. the compare view: run ids, the metric key and every value.
    c_url = compare_url(base_url, experiment_id, run_ids)
    # the compare tables render only rows near the viewport: a tall window shows every metric
    c_dom = render(c_url, cmp_png, width=1400, height=compare_height, wait_ms=wait_ms)
    (shots_dir / "compare.html").write_text(c_dom, encoding="utf-8")
    c_text = dom_text(c_dom)
    problems = [f"run id {r} not shown" for r in run_ids if r not in c_text]
    if metric_key not in c_text:
        problems.append(f"metric key {metric_key!r} not shown")
    found: dict[float, str] = {}
    for v in values:
        hit = next((s for s in value_renderings(v) if _find_number(c_text, s)), None)
        if hit is None:
            problems.append(f"value {v!r} not shown (looked for {value_renderings(v)})")
        else:
            found[v] = hit
    assert not problems, (f"compare view {c_url} (screenshot {cmp_png}): " + "; ".join(problems)
                          + f". Page text: {_snippet(c_text)}")
    return {"experiment_png": exp_png, "compare_png": cmp_png, "experiment_url": e_url,
            "compare_url": c_url, "found": found}
