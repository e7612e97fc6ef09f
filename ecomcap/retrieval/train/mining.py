"""Hard-negative mining with the current model (FlagEmbedding's recipe).

For each training query, rank the whole training gallery, take the items at ranks
[lo, hi) (default 10..210: the top few are too often unlabelled positives), drop the query's
positives and every item of the same product group as a positive (false-negative masking),
and sample `per_query` of what is left.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from ecomcap.retrieval.evaluate.metrics import topk_search


def mine_hard_negatives(query_emb: np.ndarray, item_emb: np.ndarray, positives: Sequence[Sequence[int]],
                        groups: Sequence[str | None], window: tuple[int, int] = (10, 210), per_query: int = 15,
                        seed: int = 0) -> list[list[int]]:
    """Item indices of the sampled hard negatives of each query (in query order)."""
    lo, hi = window
    _, ranked = topk_search(query_emb, item_emb, k=min(hi, len(item_emb)))
    rng = random.Random(seed)
    out = []
    for qi, row in enumerate(ranked):
        pos = set(positives[qi])
        pos_groups = {groups[j] for j in pos if groups[j] is not None}
        pool = [int(j) for j in row[lo:hi] if j not in pos and (groups[j] is None or groups[j] not in pos_groups)]
        out.append(rng.sample(pool, min(per_query, len(pool))))
    return out
