"""Training batches for contrastive fine-tuning, as pure functions of the step (exact resume).

A training example is a (query, positive item) pair; an epoch shuffles all pairs with a
(seed, epoch) RNG. A batch also carries the mined hard negatives of its queries, and a
positive mask over all its item columns (other ground-truth items of the same query are not
negatives). Item images stream from the shard dataset (`ShardImages`, row-group cached).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from ecomcap.retrieval.data.ingest import read_queries
from ecomcap.training.data import ShardImages


@dataclass
class Batch:
    step: int
    query_texts: list[str]
    items: list[int]  # item rows: the B pair items, then the hard negatives
    item_texts: list[str]
    pos: torch.Tensor  # [B, M] bool
    siblings: list[int] | None = None  # another view of each pair item's product (matching term)
    sibling_texts: list[str] | None = None
    sibling_pos: torch.Tensor | None = None  # [B, B] bool: same product group
    negative_texts: list[str] | None = None  # attribute-swapped query texts (negatives of their pair's item)
    negative_owner: torch.Tensor | None = None  # [N] long: the pair row each negative text belongs to


class TrainingSet:
    """Queries, items and product groups of one ingested split."""

    def __init__(self, split_dir: str | Path, seed: int = 0, cache_groups: int = 64):
        split_dir = Path(split_dir)
        self.items_dir = split_dir / "items"
        self.items = ShardImages(self.items_dir, cache_groups=cache_groups)
        row = {item_id: i for i, item_id in enumerate(self.items.ids)}
        self.queries = read_queries(split_dir)
        self.positives = [[row[i] for i in q["item_ids"] if i in row] for q in self.queries]
        self.pos_sets = [set(p) for p in self.positives]
        self.pairs = [(qi, j) for qi, pos in enumerate(self.positives) for j in pos]
        groups_file = split_dir / "groups.parquet"
        gmap = {}
        if groups_file.is_file():
            t = pq.read_table(groups_file)
            gmap = dict(zip(t.column("item_id").to_pylist(), t.column("group").to_pylist()))
        self.groups = [gmap.get(i) for i in self.items.ids]
        self.views: dict[str, list[int]] = {}
        for j, g in enumerate(self.groups):
            if g is not None:
                self.views.setdefault(g, []).append(j)
        self.seed = seed
        self.negatives: list[list[int]] | None = None
        self.swapper = None  # an AttributeSwapper: compositional text negatives (train.text_negatives)
        self._orders: dict[int, list[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def texts_for_vocab(self) -> list[str]:
        return [q["query_text"] for q in self.queries] + [t for ts in self.items.texts for t in ts]

    def _order(self, epoch: int) -> list[tuple[int, int]]:
        if epoch not in self._orders:
            order = list(self.pairs)
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def batch(self, step: int, first: int, size: int, negatives_per_example: int = 0,
              siblings: bool = False, text_negatives: int = 0) -> Batch:
        """Pairs [first, first + size) of the endless shuffled stream, plus hard negatives,
        (for the matching term) another view of each pair item's product and up to
        `text_negatives` attribute-swapped versions of each query text."""
        n = len(self.pairs)
        pairs = [self._order(k // n)[k % n] for k in range(first, first + size)]
        rng = random.Random(f"{self.seed}:batch:{step}:{first}")
        items = [j for _, j in pairs]
        if self.negatives is not None and negatives_per_example:
            for qi, _ in pairs:
                pool = self.negatives[qi]
                items += rng.sample(pool, min(negatives_per_example, len(pool)))
        pos = torch.tensor([[j in self.pos_sets[qi] for j in items] for qi, _ in pairs], dtype=torch.bool)
        texts = [rng.choice(self.items.texts[j]) if self.items.texts[j] else "" for j in items]
        batch = Batch(step, [self.queries[qi]["query_text"] for qi, _ in pairs], items, texts, pos)
        if text_negatives and self.swapper is not None:
            negs = [self.swapper.negatives(t, text_negatives, rng) for t in batch.query_texts]
            batch.negative_texts = [t for ts in negs for t in ts]
            batch.negative_owner = torch.tensor([i for i, ts in enumerate(negs) for _ in ts], dtype=torch.long)
        if siblings:
            sib = []
            for _, j in pairs:  # a product seen once is its own sibling
                others = [v for v in self.views.get(self.groups[j], [j]) if v != j]
                sib.append(rng.choice(others) if others else j)
            batch.siblings = sib
            batch.sibling_texts = [rng.choice(self.items.texts[j]) if self.items.texts[j] else "" for j in sib]
            g = [self.groups[j] if self.groups[j] is not None else f"#{j}" for _, j in pairs]
            batch.sibling_pos = torch.tensor([[a == b for b in g] for a in g], dtype=torch.bool)
        return batch
