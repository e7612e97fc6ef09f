"""Milvus behind the index interface: the engine for catalogues that outgrow one machine (a
server, k8s/milvus.yaml) or Milvus Lite in a *.db file. The store (`milvus.py`) holds the
client; this adapter gives it the distinct vectors (`dedup.py`: one product, many sellers is one
row, so duplicates do not crowd its HNSW graph either) and turns its hits into the (scores,
rows) every index returns."""
from __future__ import annotations

import numpy as np

from ecomcap.retrieval.index.base import as_queries
from ecomcap.retrieval.index.dedup import Groups, group_rows
from ecomcap.retrieval.index.milvus import StoreConfig, VectorStore


class DistinctView:
    """A gallery as Milvus holds it: row g = distinct vector g (named by its first item), and a
    fingerprint of its own, so a deduplicated collection is never mistaken for a per-row one."""

    def __init__(self, gallery, groups: Groups) -> None:
        self.vectors = groups.unique
        self.item_ids = [gallery.item_ids[r] for r in groups.first_row]
        fp = gallery.index["fingerprint"]
        self.index = {**gallery.index, "fingerprint": fp if len(groups.unique) == len(groups.rows)
                      else f"{fp}_distinct{len(groups.unique)}"}


class MilvusIndex:
    """`build`: the pipeline / index job (a server's writer role) creates, fills and indexes the
    gallery's collection; otherwise (the page, the server's reader role) it only names it and
    searches, so a page starts while Milvus is down or still building and `ready()` says why.
    Milvus Lite builds on first use either way (one process, no roles)."""

    kind = "milvus"

    def __init__(self, gallery, store: StoreConfig, build: bool = True, dedup: bool = True) -> None:
        self.cfg = store.model_copy(update={"role": "writer" if build else "reader"})  # never the recorded one
        self.groups = group_rows(gallery.vectors, dedup)
        view = DistinctView(gallery, self.groups)
        self.dim, self.size, self.rows = int(gallery.vectors.shape[1]), len(gallery.item_ids), len(view.item_ids)
        self.approximate = store.index_type != "FLAT"
        if build or store.embedded:
            self.store = VectorStore(self.cfg)
            self.collection = self.store.ensure(view)
        else:
            self.store = VectorStore(self.cfg, connect=False)
            self.collection = self.store.open(view)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(queries, self.dim)
        hits = self.store.search(self.collection, q, k)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        groups = np.full((len(q), k), -1, dtype=np.int64)
        for i, hs in enumerate(hits):
            for j, h in enumerate(hs[:k]):
                scores[i, j], groups[i, j] = h.score, h.row
        return self.groups.expand(scores, groups, k)

    def ready(self) -> tuple[bool, str]:
        return self.store.ready(self.collection, self.rows)

    def describe(self) -> dict:
        return {"kind": "milvus", "uri": self.cfg.uri, "index_type": self.cfg.index_type, "items": self.size,
                "distinct": self.rows, "collection": self.collection, "approximate": self.approximate}

    def close(self) -> None:
        self.store.close()
