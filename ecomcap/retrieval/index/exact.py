"""Exact search: one BLAS matmul per query block and a partial sort, both in NumPy's C code
with the GIL released, over the distinct vectors (`dedup.py`). The reference every approximate
index is measured against, and the served index up to `exact_max_items` distinct vectors."""
from __future__ import annotations

import numpy as np

from ecomcap.retrieval.index.base import as_queries
from ecomcap.retrieval.index.dedup import Groups, group_rows

BLOCK = 256  # queries per matmul: [BLOCK, U] float32 scores at a time


def top_groups(sims: np.ndarray, k: int, first_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns per row of `sims`, best first; equal scores: the lower first row first."""
    k = min(k, sims.shape[1])
    if k < sims.shape[1]:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
    s = np.take_along_axis(sims, part, axis=1)
    order = np.lexsort((first_row[part], -s), axis=1)
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(part, order, axis=1)


class ExactIndex:
    kind = "exact"
    approximate = False

    def __init__(self, vectors: np.ndarray, dedup: bool = True, groups: Groups | None = None) -> None:
        self.groups = groups or group_rows(vectors, dedup)
        self.dim = int(vectors.shape[1])
        self.size = len(self.groups.rows)
        self._first = self.groups.first_row

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(queries, self.dim)
        out_s = np.empty((len(q), k), dtype=np.float32)
        out_r = np.empty((len(q), k), dtype=np.int64)
        for i in range(0, len(q), BLOCK):
            sims = q[i:i + BLOCK] @ self.groups.unique.T
            s, g = top_groups(sims, k, self._first)
            if g.shape[1] < k:  # fewer distinct vectors than k: pad, expand fills rows
                pad = k - g.shape[1]
                s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
                g = np.pad(g, ((0, 0), (0, pad)), constant_values=-1)
            out_s[i:i + BLOCK], out_r[i:i + BLOCK] = self.groups.expand(s, g, k)
        return out_s, out_r

    def ready(self) -> tuple[bool, str]:
        return True, f"exact index over {len(self.groups.unique)} distinct of {self.size} vectors"

    def describe(self) -> dict:
        return {"kind": self.kind, "items": self.size, "distinct": int(len(self.groups.unique)),
                "approximate": False}

    def close(self) -> None:
        pass
