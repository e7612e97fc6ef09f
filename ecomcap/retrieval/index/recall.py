"""How close an index's top-k is to exact search: the number the gate guards on."""
from __future__ import annotations

import numpy as np


def tie_recall(vectors: np.ndarray, queries: np.ndarray, answers, k: int = 10, tie_eps: float = 1e-5,
               exact=None) -> float:
    """Share of the k answers (gallery rows per query) in the exact top-k, averaged over queries
    (1.0 = exact). An answer scoring as high as the exact k-th counts too: items with equal scores
    (duplicate texts, one product many sellers) are interchangeable, and which of them a tie
    keeps is arbitrary. `exact`: an ExactIndex over `vectors` to reuse."""
    from ecomcap.retrieval.index.exact import ExactIndex

    queries = np.asarray(queries, dtype=np.float32)
    exact = exact or ExactIndex(np.asarray(vectors))
    exact_scores, top = exact.search(queries, k)
    found = []
    for q, rows, best, scores in zip(queries, answers, top, exact_scores):
        rows = [int(r) for r in rows if r >= 0]
        valid = best[best >= 0]
        floor = scores[len(valid) - 1] if len(valid) else np.inf
        top_set = set(valid.tolist())
        got = np.asarray(vectors[rows], dtype=np.float32) @ q if rows else []
        found.append(sum(r in top_set or s >= floor - tie_eps for r, s in zip(rows, got)) / max(len(valid), 1))
    return float(np.mean(found)) if found else 1.0


def recall_vs_exact(index, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """`tie_recall` of `index`'s answers (exact search over the distinct vectors the index
    already grouped); 1.0 without searching twice when it is exact."""
    from ecomcap.retrieval.index.exact import ExactIndex

    if not index.approximate:
        return 1.0
    _, rows = index.search(queries, k)
    return tie_recall(vectors, queries, rows, k, exact=ExactIndex(vectors, groups=index.groups))


def ann_recall(store, name: str, gallery, queries: np.ndarray, k: int = 10, tie_eps: float = 1e-5) -> float:
    """`tie_recall` of a Milvus store's search of collection `name` over `gallery`."""
    approx = store.search(name, np.asarray(queries, dtype=np.float32), k)
    return tie_recall(gallery.vectors, queries, [[h.row for h in hits] for hits in approx], k, tie_eps)
