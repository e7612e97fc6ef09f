"""Load on the search page: N concurrent clients for a bounded time over a MUGE-size gallery.

Builds a synthetic gallery (default 30,000 drawn products, the hashing query encoder), starts
`ecomcap serve-search` on 127.0.0.1 (embedded Milvus Lite), then in the same run:
  1. reference: one client, sequential requests (--ref-seconds);
  2. load: --clients concurrent keep-alive clients (--seconds), each request a full results page
     (GET /?q=...&top=10, HTML) for queries cycling over attribute combinations;
  3. recall of the page's top-10 (the store's approximate search) vs exact brute force over the
     same vectors, on --recall-queries queries. Milvus Lite answers by brute force until its
     background HNSW build is done (about 20 s for 30,000 items here), so this comes last.
Bounded: stops at --seconds or --max-requests, whichever comes first, and the page process is
killed on exit. Reports queries/s, p50/p95/p99 latency, errors, the speed-up over one client.

    python benchmarks/search_load.py [--items 30000 --clients 16 --seconds 30]

Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecomcap.data.synth_draw import BRANDS, CATEGORIES, COLOURS, PATTERNS  # noqa: E402
from ecomcap.retrieval.index.demo import HashingTextEncoder, demo_gallery  # noqa: E402
from ecomcap.retrieval.index.gallery import open_gallery  # noqa: E402
from ecomcap.retrieval.index.milvus import StoreConfig, tie_recall  # noqa: E402
from ecomcap.retrieval.serve.page import search_page_process  # noqa: E402

MAX_SECONDS = 300


def queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    forms = [lambda: rng.choice(COLOURS) + rng.choice(CATEGORIES),
             lambda: f"{rng.choice(BRANDS)} {rng.choice(PATTERNS)}{rng.choice(CATEGORIES)}",
             lambda: f"{rng.choice(COLOURS)} {rng.choice(PATTERNS)} {rng.choice(CATEGORIES)}"]
    return [rng.choice(forms)() for _ in range(n)]


def run_clients(base: str, qs: list[str], clients: int, seconds: float, max_requests: int) -> dict:
    host, port = urllib.parse.urlsplit(base).hostname, urllib.parse.urlsplit(base).port
    lock = threading.Lock()
    lat: list[float] = []
    errors: list[str] = []
    issued = [0]
    deadline = time.perf_counter() + seconds

    def client(idx: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        i = idx
        while time.perf_counter() < deadline:
            with lock:
                if issued[0] >= max_requests:
                    break
                issued[0] += 1
            q = urllib.parse.quote(qs[i % len(qs)])
            i += clients
            t0 = time.perf_counter()
            try:
                conn.request("GET", f"/?q={q}&top=10")
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200 and b"class=item" in body
                err = None if ok else f"HTTP {resp.status}"
            except (OSError, http.client.HTTPException) as exc:
                err = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
            dt = time.perf_counter() - t0
            with lock:
                (errors.append(err) if err else lat.append(dt))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {"clients": clients, "wall_s": round(wall, 2), "requests": len(lat) + len(errors), "ok": len(lat),
            "errors": len(errors), "error_kinds": sorted(set(errors))[:5], "qps": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def page_recall(base: str, gallery_dir: Path, qs: list[str], k: int = 10) -> float:
    """Share of the exact top-k (ties at the k-th score count) that the page returns."""
    gallery = open_gallery(gallery_dir)
    qv = HashingTextEncoder(gallery.vectors.shape[1]).encode_texts(qs)
    index = {item_id: i for i, item_id in enumerate(gallery.item_ids)}
    answers = []
    for q in qs:
        url = f"{base}/api/search?q={urllib.parse.quote(q)}&top={k}"
        with urllib.request.urlopen(url, timeout=30) as r:
            answers.append([index[x["item_id"]] for x in json.load(r)["results"]])
    return tie_recall(gallery.vectors, qv, answers, k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=30000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--ref-seconds", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--recall-queries", type=int, default=200)
    ap.add_argument("--ef", type=int, default=StoreConfig().ef, help="the page's HNSW search breadth")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = ap.parse_args()
    seconds, ref_seconds = min(args.seconds, MAX_SECONDS), min(args.ref_seconds, MAX_SECONDS)

    work = args.work or Path(tempfile.mkdtemp(prefix="search_load_"))
    try:
        run(args, work, seconds, ref_seconds)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, seconds: float, ref_seconds: float) -> None:
    t0 = time.perf_counter()
    gallery = demo_gallery(work / "gallery", args.items, seed=0)
    build_s = time.perf_counter() - t0
    print(f"gallery: {args.items} items in {build_s:.1f}s -> {gallery}", flush=True)
    qs = queries(2000)
    t0 = time.perf_counter()
    with search_page_process(gallery, str(work / "milvus.db"), log_path=work / "page.log",
                             extra_args=("--ef", str(args.ef))) as base:
        start_s = time.perf_counter() - t0
        print(f"page up at {base} after {start_s:.1f}s (store load + index)", flush=True)
        run_clients(base, qs, 2, 2.0, 200)  # warm-up: connections, caches
        ref = run_clients(base, qs, 1, ref_seconds, args.max_requests)
        print(f"reference, 1 client: {ref}", flush=True)
        load = run_clients(base, qs[::-1], args.clients, seconds, args.max_requests)
        print(f"load, {args.clients} clients: {load}", flush=True)
        recall = page_recall(base, gallery, queries(args.recall_queries, seed=1))
    print(json.dumps({"items": args.items, "clients": args.clients, "seconds": seconds, **{
        k: load[k] for k in ("requests", "errors", "qps", "p50_ms", "p95_ms", "p99_ms")},
        "ref_1client_qps": ref["qps"], "ref_1client_p50_ms": ref["p50_ms"],
        "qps_vs_1client": round(load["qps"] / ref["qps"], 2) if ref["qps"] else None,
        "ann_recall@10_vs_exact": round(recall, 4), "gallery_build_s": round(build_s, 1),
        "page_start_s": round(start_s, 1), "store": f"milvus-lite (embedded), HNSW M=16 ef={args.ef}"}))


if __name__ == "__main__":
    main()
