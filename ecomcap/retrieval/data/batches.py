"""Training batches for contrastive fine-tuning, as pure functions of the step (exact resume).

A training example is a (query, positive item) pair; an epoch shuffles all pairs with a
(seed, epoch) RNG. A batch also carries the mined hard negatives of its queries, and a
positive mask over all its item columns (other ground-truth items of the same query are not
negatives). Item images stream from the shard dataset (`ShardImages`, row-group cached).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
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
    queries: list[int] = field(default_factory=list)  # the query row of each pair (positives, merging)


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
        texts = [rng.choice(self.items.texts[j]) if self.items.texts[j] else "" for j in items]
        queries = [qi for qi, _ in pairs]
        batch = Batch(step, [self.queries[qi]["query_text"] for qi in queries], items, texts,
                      self._pos(queries, items), queries=queries)
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
            batch.sibling_pos = self._same_group([j for _, j in pairs])
        return batch

    def _pos(self, queries: list[int], items: list[int]) -> torch.Tensor:
        """[B, M] bool: item column j is one of query row i's ground-truth items."""
        return torch.tensor([[j in self.pos_sets[qi] for j in items] for qi in queries], dtype=torch.bool)

    def _same_group(self, items: list[int]) -> torch.Tensor:
        """[B, B] bool: same product group (an item without one is only its own)."""
        g = [self.groups[j] if self.groups[j] is not None else f"#{j}" for j in items]
        return torch.tensor([[a == b for b in g] for a in g], dtype=torch.bool)

    def merge(self, parts: list[Batch]) -> Batch:
        """The one batch that the ranks' batches of one micro-step make together, laid out as
        `batch` lays out one: every rank's pairs first (rank order), then every rank's hard
        negatives; the masks are rebuilt over the whole (a query of rank 0 may have a positive
        among rank 1's columns), negative-text owners shifted to their rows. A loss over gathered
        embeddings in this order equals the one-process loss on this batch."""
        b = [len(p.query_texts) for p in parts]
        queries = [q for p in parts for q in p.queries]
        items = [j for p, n in zip(parts, b) for j in p.items[:n]] + [j for p, n in zip(parts, b) for j in p.items[n:]]
        texts = [t for p, n in zip(parts, b) for t in p.item_texts[:n]] + \
            [t for p, n in zip(parts, b) for t in p.item_texts[n:]]
        out = Batch(parts[0].step, [t for p in parts for t in p.query_texts], items, texts,
                    self._pos(queries, items), queries=queries)
        if any(p.negative_texts is not None for p in parts):
            out.negative_texts = [t for p in parts for t in p.negative_texts or []]
            offsets = [sum(b[:r]) for r in range(len(parts))]
            owners = [p.negative_owner + off for p, off in zip(parts, offsets) if p.negative_owner is not None]
            out.negative_owner = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
        if parts[0].siblings is not None:
            out.siblings = [j for p in parts for j in p.siblings]
            out.sibling_texts = [t for p in parts for t in p.sibling_texts]
            out.sibling_pos = self._same_group(items[: len(queries)])
        return out
