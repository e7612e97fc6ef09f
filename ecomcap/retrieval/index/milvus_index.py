"""Milvus behind the index interface: the engine for catalogues that outgrow one machine (a
server, k8s/milvus.yaml) or Milvus Lite in a *.db file. The store (`milvus.py`) holds the
client; this adapter turns its hits into the (scores, rows) every index returns."""
from __future__ import annotations

import numpy as np

from ecomcap.retrieval.index.base import as_queries
from ecomcap.retrieval.index.milvus import StoreConfig, VectorStore


class MilvusIndex:
    kind = "milvus"

    def __init__(self, gallery, store: StoreConfig, build: bool = True) -> None:
        self.store = VectorStore(store)
        self.cfg = store
        self.dim, self.size = int(gallery.vectors.shape[1]), len(gallery.item_ids)
        self.approximate = store.index_type != "FLAT"
        self.collection = self.store.ensure(gallery) if build else self.store.collection(gallery)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(queries, self.dim)
        hits = self.store.search(self.collection, q, k)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        rows = np.full((len(q), k), -1, dtype=np.int64)
        for i, hs in enumerate(hits):
            for j, h in enumerate(hs[:k]):
                scores[i, j], rows[i, j] = h.score, h.row
        return scores, rows

    def ready(self) -> tuple[bool, str]:
        check = getattr(self.store, "ready", None)
        if check is None:
            return True, f"Milvus collection {self.collection}"
        return check(self.collection) if _takes_name(check) else check()

    def describe(self) -> dict:
        return {"kind": "milvus", "uri": self.cfg.uri, "index_type": self.cfg.index_type, "items": self.size,
                "collection": self.collection, "approximate": self.approximate}

    def close(self) -> None:
        self.store.close()


def _takes_name(fn) -> bool:
    import inspect

    return len(inspect.signature(fn).parameters) >= 1
