"""Load on the search page: today's page (an older checkout, --baseline-checkout), Milvus Lite and
the embedded index, same gallery, same run.

Builds a synthetic gallery (default 30,000 drawn products: 2,231 distinct texts, one product
sold by many sellers, like MUGE's pool) with the hashing query encoder, then for each index
starts `ecomcap serve-search` on 127.0.0.1 and, only once /readyz says the index is built:
  1. reference: one client, sequential requests (--ref-seconds);
  2. load: --clients concurrent keep-alive clients (--seconds), each request a full results page
     (GET /?q=...&top=10, HTML), queries cycling over attribute combinations;
  3. recall@10 of the page's answers (/api/search) against exact search over the same vectors
     (tie-aware), on --recall-queries other queries;
  4. CPU-seconds per query of the page's process group and of this load generator, so a
     starved server shows (both share this box's cores).
The embedded index is also measured as FAISS HNSW (the gallery recording `kind: hnsw`) and on a
copy of the gallery with every vector made distinct (nothing for dedup to fold).
With --real-width: a random-init Chinese-CLIP text tower at ViT-B/16's text size (RoBERTa-wwm
base: 12 layers, 768 wide, 3072 FFN, 512-d projection) as the query encoder: its per-query cost
at batch 1 vs batch 16 in process, and the page under load with query batching (--max-batch 32)
and without (--max-batch 1).

    python benchmarks/search_load.py [--items 30000 --clients 16 --seconds 20] [--real-width]

Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
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
from ecomcap.processes import free_port, serving_process  # noqa: E402
from ecomcap.retrieval.index.demo import demo_gallery  # noqa: E402
from ecomcap.retrieval.index.gallery import open_gallery  # noqa: E402
from ecomcap.retrieval.index.recall import tie_recall  # noqa: E402
from ecomcap.retrieval.serve.page import PageURL, search_page_process  # noqa: E402
from ecomcap.retrieval.serve.search import query_encoder  # noqa: E402

MAX_SECONDS = 300
TICK = os.sysconf("SC_CLK_TCK")


def queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    forms = [lambda: rng.choice(COLOURS) + rng.choice(CATEGORIES),
             lambda: f"{rng.choice(BRANDS)} {rng.choice(PATTERNS)}{rng.choice(CATEGORIES)}",
             lambda: f"{rng.choice(COLOURS)} {rng.choice(PATTERNS)} {rng.choice(CATEGORIES)}"]
    return [rng.choice(forms)() for _ in range(n)]


def group_cpu_s(pgid: int) -> float:
    """User + system CPU-seconds of every live process in the process group."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "comm)": state ppid pgrp ...
            total += int(fields[11]) + int(fields[12])
    return total / TICK


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
                err = None if resp.status == 200 and b"class=item" in body else f"HTTP {resp.status}"
            except (OSError, http.client.HTTPException) as exc:
                err = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
            dt = time.perf_counter() - t0
            with lock:
                (errors.append(err) if err else lat.append(dt))
        conn.close()

    server0, client0 = group_cpu_s(base.pid), time.process_time()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    wall = time.perf_counter() - t0
    server_s, client_s = group_cpu_s(base.pid) - server0, time.process_time() - client0
    ms = np.array(lat) * 1000 if lat else np.array([np.nan])
    n = max(len(lat) + len(errors), 1)
    return {"clients": clients, "wall_s": round(wall, 2), "requests": len(lat) + len(errors), "ok": len(lat),
            "errors": len(errors), "error_kinds": sorted(set(errors))[:5], "qps": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "server_cpu_ms_per_query": round(1000 * server_s / n, 2),
            "client_cpu_ms_per_query": round(1000 * client_s / n, 2)}


def page_recall(base: str, gallery_dir: Path, qs: list[str], k: int = 10) -> float:
    """Tie-aware recall@k of the page's answers against exact search over the same vectors."""
    gallery = open_gallery(gallery_dir)
    qv = query_encoder(gallery)(qs)
    index = {item_id: i for i, item_id in enumerate(gallery.item_ids)}
    answers = []
    for q in qs:
        with urllib.request.urlopen(f"{base}/api/search?q={urllib.parse.quote(q)}&top={k}", timeout=30) as r:
            answers.append([index[x["item_id"]] for x in json.load(r)["results"]])
    return tie_recall(gallery.vectors, qv, answers, k)


@contextlib.contextmanager
def old_page(checkout: Path, gallery: Path, store: str, log: Path, settle_s: float):
    """The page as an older checkout serves it (`git worktree add DIR <commit>`): its own code,
    this gallery, Milvus Lite at `store`. It has no /readyz: after /healthz, wait `settle_s` for
    Milvus Lite's background HNSW build (it answers by brute force until then)."""
    port = free_port()
    cmd = [sys.executable, "-m", "ecomcap.cli", "serve-search", "--gallery", str(gallery), "--store-uri", store,
           "--port", str(port)]
    with serving_process(cmd, f"http://127.0.0.1:{port}/healthz", log, 600, "the old page", cwd=checkout,
                         env={**os.environ, "PYTHONPATH": str(checkout)}) as proc:
        time.sleep(settle_s)
        yield PageURL(f"http://127.0.0.1:{port}", proc.pid)


def measure(name: str, gallery: Path, work: Path, args, extra: tuple[str, ...], store: str | None = None,
            old: Path | None = None) -> dict:
    qs = queries(2000)
    t0 = time.perf_counter()
    log = work / f"page-{name.replace(' ', '_')}.log"
    page = (old_page(old, gallery, store, log, args.settle_s) if old else
            search_page_process(gallery, store, log_path=log, extra_args=extra))
    with page as base:
        ready_s = time.perf_counter() - t0
        if old:
            index = {"kind": "milvus-lite (old page)", "checkout": str(old)}
        else:
            with urllib.request.urlopen(f"{base}/readyz", timeout=10) as r:
                index = json.load(r)["index"]
        print(f"[{name}] ready after {ready_s:.1f}s: {index}", flush=True)
        run_clients(base, qs, 2, 2.0, 200)  # warm-up: connections, caches
        ref = run_clients(base, qs, 1, args.ref_seconds, args.max_requests)
        print(f"[{name}] 1 client: {ref}", flush=True)
        load = run_clients(base, qs[::-1], args.clients, args.seconds, args.max_requests)
        print(f"[{name}] {args.clients} clients: {load}", flush=True)
        recall = page_recall(base, gallery, queries(args.recall_queries, seed=1))
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
            batches = json.load(r).get("batches", {})
    print(f"[{name}] recall@10 vs exact {recall:.4f}; batching {batches}", flush=True)
    return {"index": index, "ready_s": round(ready_s, 1), "ref_1client": ref, "load": load,
            "recall@10_vs_exact": round(recall, 4), "batching": batches}


def variant(src: Path, out: Path, search: dict | None = None, distinct: bool = False) -> Path:
    """A copy of the gallery recording another index (`search`), or with every vector made
    distinct (a 1e-3 perturbation, renormalised: no duplicates left to fold, same neighbours)."""
    shutil.copytree(src, out)
    meta = json.loads((out / "index.json").read_text())
    if search:
        meta["search"] = search
    if distinct:
        v = np.load(out / "vectors.npy")
        v = v + 1e-3 * np.random.default_rng(0).standard_normal(v.shape).astype(np.float32)
        np.save(out / "vectors.npy", (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32))
        meta["fingerprint"] += "-distinct"
    (out / "index.json").write_text(json.dumps(meta))
    return out


def real_width_gallery(work: Path, hashing_gallery: Path) -> tuple[Path, dict]:
    """The hashing gallery's items, embedded by a random-init real-width Chinese-CLIP text tower
    (each distinct text once), and that tower's per-query cost at batch 1 vs 16."""
    import torch

    from ecomcap.config_encoders import TinyEncoderConfig
    from ecomcap.retrieval.index.gallery import write_gallery
    from ecomcap.retrieval.model.encoder import load_encoder
    from ecomcap.retrieval.model.tiny import build_tiny_encoder

    src = open_gallery(hashing_gallery)
    distinct = sorted(set(src.texts))
    vocab = distinct + queries(2000) + queries(500, seed=1)
    text_sizes = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=512)
    enc_dir = build_tiny_encoder(work / "real_width_encoder", "chinese_clip", vocab,
                                 TinyEncoderConfig(hidden=64, layers=1, heads=4, projection_dim=512, image_size=32),
                                 text_sizes=text_sizes)
    enc = load_encoder(enc_dir, device="cpu")
    params = sum(p.numel() for p in enc.dual.model.text_model.parameters())
    torch.set_num_threads(1)  # this in-process cost figure: one core, as the page's batch thread has
    vec = {t: v for t, v in zip(distinct, np.concatenate([enc.encode_texts(distinct[i:i + 64])
                                                          for i in range(0, len(distinct), 64)]))}
    qs = queries(256, seed=2)
    cost = {}
    for batch in (1, 16):
        enc.encode_texts(qs[:batch])
        t0 = time.perf_counter()
        for i in range(0, len(qs), batch):
            enc.encode_texts(qs[i:i + batch])
        cost[f"batch{batch}_ms_per_query"] = round(1000 * (time.perf_counter() - t0) / len(qs), 2)
    cost["batching_gain"] = round(cost["batch1_ms_per_query"] / cost["batch16_ms_per_query"], 2)
    cost["text_tower_params_M"] = round(params / 1e6, 1)
    print(f"real-width text tower: {cost}", flush=True)
    vectors = np.stack([vec[t] for t in src.texts]).astype(np.float32)
    out = write_gallery(work / "real_width_gallery", vectors, list(zip(src.item_ids, src.texts)),
                        iter(()), {
                            "item_embedding": "text", "fusion_weight": 0.0, "encoder_dir": str(enc_dir)})
    shutil.copy(hashing_gallery / "images.parquet", out / "images.parquet")
    return out, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=30000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--ref-seconds", type=float, default=5.0)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--recall-queries", type=int, default=200)
    ap.add_argument("--skip-store", action="store_true", help="only the embedded index")
    ap.add_argument("--baseline-checkout", type=Path, default=None,
                    help="an older checkout (git worktree) whose page is measured first, as 'today'")
    ap.add_argument("--settle-s", type=float, default=30.0, help="the old page: wait for Milvus Lite's HNSW build")
    ap.add_argument("--real-width", action="store_true", help="also the real-width text tower runs")
    ap.add_argument("--skip-variants", action="store_true",
                    help="skip the embedded HNSW and no-duplicates galleries")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = ap.parse_args()
    args.seconds, args.ref_seconds = min(args.seconds, MAX_SECONDS), min(args.ref_seconds, MAX_SECONDS)
    work = args.work or Path(tempfile.mkdtemp(prefix="search_load_"))
    try:
        run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    t0 = time.perf_counter()
    gallery = demo_gallery(work / "gallery", args.items, seed=0)
    print(f"gallery: {args.items} items in {time.perf_counter() - t0:.1f}s -> {gallery}", flush=True)
    out: dict = {"items": args.items, "clients": args.clients, "seconds": args.seconds, "cpus": os.cpu_count()}
    if args.baseline_checkout:
        out["baseline"] = measure("baseline", gallery, work, args, (), store=str(work / "old_milvus.db"),
                                  old=args.baseline_checkout.resolve())
    if not args.skip_store:
        out["store"] = measure("milvus-lite", gallery, work, args, (), store=str(work / "milvus.db"))
    out["embedded"] = measure("embedded", gallery, work, args, ())
    if not args.skip_variants:
        hnsw = variant(gallery, work / "gallery_hnsw", search={"kind": "hnsw"})
        out["embedded_hnsw"] = measure("embedded hnsw", hnsw, work, args, ())
        distinct = variant(gallery, work / "gallery_distinct", distinct=True)
        out["embedded_no_duplicates"] = measure("embedded, no duplicates", distinct, work, args, ())
    if "baseline" in out:
        out["qps_ratio_embedded_vs_baseline"] = round(out["embedded"]["load"]["qps"] / max(out["baseline"]["load"]["qps"], 1e-9), 1)
    if "store" in out:
        out["qps_ratio_embedded_vs_store"] = round(out["embedded"]["load"]["qps"] / max(out["store"]["load"]["qps"], 1e-9), 1)
    if args.real_width:
        rw, cost = real_width_gallery(work, gallery)
        out["real_width"] = {"encoder": cost,
                             "batched": measure("real-width batched", rw, work, args, ("--max-batch", "32")),
                             "unbatched": measure("real-width unbatched", rw, work, args, ("--max-batch", "1"))}
        b, u = out["real_width"]["batched"]["load"], out["real_width"]["unbatched"]["load"]
        out["real_width"]["qps_gain_from_batching"] = round(b["qps"] / max(u["qps"], 1e-9), 2)
    summary = {k: v for k, v in out.items() if not isinstance(v, dict)}
    for name in ("baseline", "store", "embedded", "embedded_hnsw", "embedded_no_duplicates"):
        if name in out:
            summary[name] = {**{k: out[name]["load"][k] for k in ("qps", "p50_ms", "p95_ms", "p99_ms", "errors",
                                                                  "server_cpu_ms_per_query", "client_cpu_ms_per_query")},
                             "ref_1client_qps": out[name]["ref_1client"]["qps"],
                             "recall@10_vs_exact": out[name]["recall@10_vs_exact"], "index": out[name]["index"]["kind"]}
    if "real_width" in out:
        rw = out["real_width"]
        summary["real_width"] = {**rw["encoder"], "qps_batched": rw["batched"]["load"]["qps"],
                                 "p95_batched_ms": rw["batched"]["load"]["p95_ms"],
                                 "qps_unbatched": rw["unbatched"]["load"]["qps"],
                                 "p95_unbatched_ms": rw["unbatched"]["load"]["p95_ms"],
                                 "mean_batch": rw["batched"]["batching"]["mean_batch"],
                                 "qps_gain_from_batching": rw["qps_gain_from_batching"]}
    (work / "search_load.json").write_text(json.dumps(out, indent=2, ensure_ascii=False))
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
