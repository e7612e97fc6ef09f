"""Benchmark: exact full-gallery top-10 (ecomcap.retrieval.evaluate.metrics.topk_search, query blocks)
vs a plain `torch.topk` over the full query x gallery similarity matrix, MUGE-sized by default
(30,000 items, 5,000 queries, D=512 as Chinese-CLIP ViT-B/16), seeded random unit vectors.

Both sides run in this process, alternating, best of `--repeats`; results must be identical.
Memory is the similarity buffer each side allocates (block x N vs Q x N floats).
Run from the repo root: ``python benchmarks/retrieval_topk.py``; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from ecomcap.retrieval.evaluate.metrics import topk_search


def unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plain(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = torch.from_numpy(q) @ torch.from_numpy(g).T
    s, i = torch.topk(sims, k, dim=1)
    return s.numpy(), i.numpy()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=30_000)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gallery, queries = unit(args.items, args.dim, rng), unit(args.queries, args.dim, rng)
    times = {"ours": [], "plain": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        s_ours, i_ours = topk_search(queries, gallery, args.k, args.chunk)
        times["ours"].append(time.perf_counter() - t)
        t = time.perf_counter()
        s_ref, i_ref = plain(queries, gallery, args.k)
        times["plain"].append(time.perf_counter() - t)
    same_ids = float((i_ours == i_ref).mean())
    max_score_diff = float(np.abs(s_ours - s_ref).max())
    ours, ref = min(times["ours"]), min(times["plain"])
    result = {
        "items": args.items, "queries": args.queries, "dim": args.dim, "k": args.k, "chunk": args.chunk,
        "threads": torch.get_num_threads(), "ours_s": round(ours, 3), "plain_topk_s": round(ref, 3),
        "speedup_vs_plain": round(ref / ours, 3), "queries_per_s": round(args.queries / ours, 1),
        "ours_sim_buffer_mb": round(min(args.chunk, args.queries) * args.items * 4 / 2**20, 1),
        "plain_sim_buffer_mb": round(args.queries * args.items * 4 / 2**20, 1),
        "identical_ids": same_ids, "max_score_diff": max_score_diff,
    }
    print(f"top-{args.k} of {args.items} items for {args.queries} queries (D={args.dim}): "
          f"ours {ours:.2f}s vs plain torch.topk {ref:.2f}s (x{ref / ours:.2f}); "
          f"similarity buffer {result['ours_sim_buffer_mb']} MB vs {result['plain_sim_buffer_mb']} MB; "
          f"identical ids {same_ids:.4f}")
    print(json.dumps(result))
    return 0 if same_ids == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
