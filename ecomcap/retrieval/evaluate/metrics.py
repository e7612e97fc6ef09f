"""Retrieval metrics: exact full-gallery top-K, MUGE Recall@K / MeanRecall, product-matching F1.

MUGE rule: a submission lists exactly 10 unique item ids per query; a query counts at K when
any of its ground-truth items is among its first K ids; MeanRecall = mean(R@1, R@5, R@10);
reported x100. Matching: each posting's predicted group is every posting whose cosine
similarity reaches a threshold (itself always included); score = mean per-posting F1.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ecomcap.errors import EcomcapError

KS = (1, 5, 10)


def tracking_names(scores: dict[str, Any]) -> dict[str, float]:
    """R@K -> RK: MLflow metric names may not contain '@' (the printed/JSON reports keep R@K)."""
    keep = ("R@1", "R@5", "R@10", "MeanRecall", "index_recall@10")
    return {k.replace("@", ""): float(v) for k, v in scores.items() if k in keep}


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


@torch.no_grad()
def topk_search(queries, gallery, k: int = 10, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, query block by query block: memory O(chunk x N), not Q x N.

    Returns (scores [Q, k], indices [Q, k]) sorted best first (ties: lower index first).
    """
    q, g = _tensor(queries), _tensor(gallery)
    k = min(k, g.shape[0])
    scores = np.empty((q.shape[0], k), dtype=np.float32)
    index = np.empty((q.shape[0], k), dtype=np.int64)
    gt = g.T.contiguous()
    for start in range(0, q.shape[0], chunk):
        sims = q[start:start + chunk] @ gt
        s, i = torch.topk(sims, k, dim=1, sorted=True)
        scores[start:start + len(s)], index[start:start + len(s)] = s.numpy(), i.numpy()
    return scores, index


def ranked_ids(queries, gallery, item_ids: Sequence[str], k: int = 10, chunk: int = 1024) -> list[list[str]]:
    _, idx = topk_search(queries, gallery, k, chunk)
    return [[item_ids[j] for j in row] for row in idx]


def check_submission(pred: Mapping[str, Sequence[str]], gold: Mapping[str, Iterable[str]], n: int = 10) -> None:
    """EcomcapError naming the first problem: unknown query, missing query, wrong count, duplicates."""
    for qid, items in pred.items():
        if qid not in gold:
            raise EcomcapError(f"query {qid}: not in the gold queries")
        if len(items) != n:
            raise EcomcapError(f"query {qid}: {len(items)} item ids, the MUGE rule needs exactly {n}")
        if len(set(items)) != len(items):
            raise EcomcapError(f"query {qid}: duplicate item ids")
    missing = [q for q in gold if q not in pred]
    if missing:
        raise EcomcapError(f"query {missing[0]}: no prediction ({len(missing)} gold queries missing)")


def per_query_hits(pred: Mapping[str, Sequence[str]], gold: Mapping[str, Iterable[str]]) -> dict[str, dict[int, int]]:
    """query -> {K: 1 if any gold item in the top K}."""
    out = {}
    for qid, truth in gold.items():
        truth = set(truth)
        ranked = list(pred[qid])
        first = next((r for r, item in enumerate(ranked) if item in truth), None)
        out[qid] = {k: int(first is not None and first < k) for k in KS}
    return out


def recall_scores(pred: Mapping[str, Sequence[str]], gold: Mapping[str, Iterable[str]],
                  check: bool = True) -> dict[str, Any]:
    """{"R@1", "R@5", "R@10", "MeanRecall"} x100, plus "per_query" MeanRecall (the gate's items)."""
    if check:
        check_submission(pred, gold)
    hits = per_query_hits(pred, gold)
    n = max(len(hits), 1)
    scores = {f"R@{k}": 100.0 * sum(h[k] for h in hits.values()) / n for k in KS}
    scores["MeanRecall"] = sum(scores[f"R@{k}"] for k in KS) / len(KS)
    scores["per_query"] = {q: 100.0 * sum(h.values()) / len(KS) for q, h in hits.items()}
    return scores


def chance_recall(n_items: int, positives: Iterable[int]) -> dict[str, float]:
    """Expected scores of a random ranking: P(any of p positives in a random top K of N)."""
    ps = list(positives)
    out = {}
    for k in KS:
        vals = [1.0 - math.comb(n_items - p, k) / math.comb(n_items, k) if n_items >= k else 1.0 for p in ps]
        out[f"R@{k}"] = 100.0 * sum(vals) / max(len(vals), 1)
    out["MeanRecall"] = sum(out[f"R@{k}"] for k in KS) / len(KS)
    return out


@torch.no_grad()
def match_f1(embeddings, groups: Sequence[str], thresholds: Sequence[float], at_least_two: bool = False,
             chunk: int = 1024) -> dict[float, float]:
    """Mean per-posting F1 of threshold-predicted groups, for each threshold (one pass)."""
    e = _tensor(embeddings)
    labels = np.asarray(groups)
    _, codes = np.unique(labels, return_inverse=True)
    codes_t = torch.from_numpy(codes)
    size = torch.bincount(codes_t).float()[codes_t]  # true group size per posting
    th = torch.tensor(list(thresholds), dtype=torch.float32)
    f1_sum = torch.zeros(len(th))
    n = e.shape[0]
    for start in range(0, n, chunk):
        sims = e[start:start + chunk] @ e.T
        rows = torch.arange(start, min(start + chunk, n))
        sims[torch.arange(len(rows)), rows] = float("inf")  # self always in its group
        same = codes_t[rows][:, None] == codes_t[None, :]
        if at_least_two:  # the nearest other posting always joins
            masked = sims.clone()
            masked[torch.arange(len(rows)), rows] = -float("inf")
            nearest = masked.argmax(dim=1)
        for t_i, t in enumerate(th):
            pred = sims >= t
            if at_least_two:
                pred[torch.arange(len(rows)), nearest] = True
            tp = (pred & same).sum(1).float()
            f1 = 2 * tp / (pred.sum(1).float() + size[rows])
            f1_sum[t_i] += f1.sum()
    return {float(t): float(s) / n for t, s in zip(thresholds, f1_sum)}
