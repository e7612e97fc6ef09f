"""Milvus behind the index interface: the engine for catalogues that outgrow one machine (a
server, k8s/milvus.yaml) or Milvus Lite in a *.db file. The store (`milvus.py`) holds the
client; this adapter turns its hits into the (scores, rows) every index returns."""
from __future__ import annotations

import numpy as np

from ecomcap.retrieval.index.base import as_queries
from ecomcap.retrieval.index.milvus import StoreConfig, VectorStore


class MilvusIndex:
    """`build`: the pipeline / index job (a server's writer role) creates, fills and indexes the
    gallery's collection; otherwise (the page, the server's reader role) it only names it and
    searches, so a page starts while Milvus is down or still building and `ready()` says why.
    Milvus Lite builds on first use either way (one process, no roles)."""

    kind = "milvus"

    def __init__(self, gallery, store: StoreConfig, build: bool = True) -> None:
        self.cfg = store.model_copy(update={"role": "writer"}) if build and not store.embedded else store
        self.dim, self.size = int(gallery.vectors.shape[1]), len(gallery.item_ids)
        self.approximate = store.index_type != "FLAT"
        if build or store.embedded:
            self.store = VectorStore(self.cfg)
            self.collection = self.store.ensure(gallery)
        else:
            self.store = VectorStore(self.cfg, connect=False)
            self.collection = self.store.open(gallery)

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
        return self.store.ready(self.collection, self.size)

    def describe(self) -> dict:
        return {"kind": "milvus", "uri": self.cfg.uri, "index_type": self.cfg.index_type, "items": self.size,
                "collection": self.collection, "approximate": self.approximate}

    def close(self) -> None:
        self.store.close()
