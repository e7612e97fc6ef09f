"""Approximate search with FAISS (the library Milvus itself builds on), in process: HNSW
(`IndexHNSWFlat`) or IVF (`IndexIVFFlat`) over the distinct vectors, inner product on unit
vectors. FAISS releases the GIL while it searches, so the page's threads search in parallel."""
from __future__ import annotations

import math

import numpy as np

from ecomcap.processes import available_cpus
from ecomcap.retrieval.index.base import IndexConfig, as_queries
from ecomcap.retrieval.index.dedup import Groups, group_rows


class FaissIndex:
    approximate = True

    def __init__(self, vectors: np.ndarray, cfg: IndexConfig, kind: str = "hnsw",
                 groups: Groups | None = None) -> None:
        import faiss

        self.kind, self.cfg = kind, cfg
        self.groups = groups or group_rows(vectors, cfg.dedup)
        self.dim, self.size = int(vectors.shape[1]), len(self.groups.rows)
        u = self.groups.unique
        faiss.omp_set_num_threads(available_cpus())  # the build uses every core it may; search cfg.threads
        if kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = cfg.ef_construction
            self.index.add(u)
        elif kind == "ivf":
            nlist = cfg.nlist or max(1, min(len(u) // 39, int(4 * math.sqrt(len(u)))))
            quantizer = faiss.IndexFlatIP(self.dim)
            self.index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(u)
            self.index.add(u)
            self.index.nprobe = min(cfg.nprobe, nlist)
            self._quantizer = quantizer  # the IVF index does not own it from Python
        else:
            raise ValueError(f"unknown FAISS index kind {kind!r}")
        faiss.omp_set_num_threads(cfg.threads)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        q = as_queries(queries, self.dim)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.cfg.ef, k))
            s, g = self.index.search(q, k, params=params)
        else:
            s, g = self.index.search(q, k)
        return self.groups.expand(s, g, k)

    def ready(self) -> tuple[bool, str]:
        built = self.index.ntotal == len(self.groups.unique)
        return built, f"FAISS {self.kind}: {self.index.ntotal} of {len(self.groups.unique)} distinct vectors indexed"

    def describe(self) -> dict:
        params = ({"M": self.cfg.hnsw_m, "efConstruction": self.cfg.ef_construction, "ef": self.cfg.ef}
                  if self.kind == "hnsw" else {"nlist": self.index.nlist, "nprobe": self.index.nprobe})
        return {"kind": self.kind, "items": self.size, "distinct": int(len(self.groups.unique)),
                "approximate": True, **params}

    def close(self) -> None:
        pass
