"""Evaluate an encoder on an ingested split: full-gallery Recall@K (MUGE rule), chance level,
and product-matching F1 by similarity threshold."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ecomcap.data.shards import iter_batches
from ecomcap.retrieval.data.ingest import read_groups, read_queries
from ecomcap.retrieval.evaluate.metrics import chance_recall, match_f1, ranked_ids, recall_scores
from ecomcap.retrieval.model.encoder import Encoder


@dataclass
class SplitEmbeddings:
    query_ids: list[str]
    query_texts: list[str]
    queries: np.ndarray
    item_ids: list[str]
    items: np.ndarray
    gold: dict[str, list[str]]


def embed_items(encoder: Encoder, items_dir: str | Path, mode: str, batch_size: int = 256
                ) -> tuple[list[str], np.ndarray]:
    ids, parts = [], []
    for batch in iter_batches(items_dir, ["image_id", "image", "texts"], batch_size):
        ids += batch.column("image_id").to_pylist()
        pics = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch.column("image").to_pylist()]
        texts = [t[0] if t else "" for t in batch.column("texts").to_pylist()]
        parts.append(encoder.encode_items(pics, texts, mode=mode))
    return ids, (np.concatenate(parts) if parts else np.zeros((0, 1), np.float32))


def embed_split(encoder: Encoder, split_dir: str | Path, mode: str) -> SplitEmbeddings:
    split_dir = Path(split_dir)
    queries = read_queries(split_dir)
    item_ids, items = embed_items(encoder, split_dir / "items", mode)
    q_emb = encoder.encode_texts([q["query_text"] for q in queries])
    return SplitEmbeddings([q["query_id"] for q in queries], [q["query_text"] for q in queries], q_emb,
                           item_ids, items, {q["query_id"]: q["item_ids"] for q in queries})


def recall_of(emb: SplitEmbeddings, k: int = 10, chunk: int = 1024) -> dict[str, Any]:
    """MUGE scores of the model's top-10, with the chance level and the rankings."""
    ranked = ranked_ids(emb.queries, emb.items, emb.item_ids, k, chunk)
    pred = {q: r[:10] for q, r in zip(emb.query_ids, ranked)}
    scores = recall_scores(pred, emb.gold)
    scores["chance"] = chance_recall(len(emb.item_ids), [len(v) for v in emb.gold.values()])
    scores["ranked"] = pred
    return scores


def best_threshold(f1_by_t: dict[float, float]) -> float:
    return max(f1_by_t, key=lambda t: (f1_by_t[t], -t))


def matching_of(encoder: Encoder, split_dir: str | Path, mode: str, thresholds: Sequence[float],
                threshold: float | None = None, at_least_two: bool = False) -> dict[str, Any] | None:
    """Mean per-posting F1 on a split with product groups; threshold tuned here unless given."""
    groups = read_groups(split_dir)
    if not groups:
        return None
    ids, emb = embed_items(encoder, Path(split_dir) / "items", mode)
    keep = [i for i, item in enumerate(ids) if item in groups]
    labels = [groups[ids[i]] for i in keep]
    ts = list(thresholds) if threshold is None else [threshold]
    f1 = match_f1(emb[keep], labels, ts, at_least_two)
    t = best_threshold(f1) if threshold is None else threshold
    return {"F1": 100.0 * f1[t], "threshold": t, "postings": len(keep), "groups": len(set(labels)),
            "by_threshold": {str(k): round(100.0 * v, 3) for k, v in f1.items()}}
