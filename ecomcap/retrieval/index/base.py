"""One search-index interface for everything that ranks a gallery: evaluation, the gate, the
registered pyfunc, `ecomcap search` and the search page. What the gate scored is what is served.

An index answers `search(queries [Q, D], k) -> (scores [Q, k], rows [Q, k])`, best first (rows
are gallery positions; -1 pads when the gallery holds fewer than k items). Each kind reports
whether it is approximate; an approximate one is measured against exact search (`recall.py`)
and the gate refuses it below `min_recall`.

Kinds: `exact` (a BLAS matmul + top-k, `exact.py`), `hnsw` / `ivf` (FAISS, `faiss_index.py`),
`milvus` (Milvus Lite or a server, `milvus_index.py`), `auto` (exact up to `exact_max_items`
distinct vectors, HNSW beyond).
"""
from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
from pydantic import Field

from ecomcap.config_base import _Strict
from ecomcap.retrieval.index.milvus import StoreConfig

Kind = Literal["auto", "exact", "hnsw", "ivf", "milvus"]


class IndexConfig(_Strict):
    """How a gallery is searched, recorded in the gallery (index.json "search") so every reader
    of that gallery searches it the same way."""

    kind: Kind = Field("auto", description="auto: exact up to exact_max_items distinct vectors, hnsw beyond")
    exact_max_items: int = Field(200_000, ge=1, description="auto: largest gallery (distinct vectors) searched exactly")
    dedup: bool = Field(True, description="index each distinct vector once (one product, many sellers): "
                        "duplicates do not crowd the approximate index's graph or candidates; a hit expands to "
                        "its rows in row order (the exact ranking)")
    hnsw_m: int = Field(32, ge=2)
    ef_construction: int = Field(200, ge=8)
    ef: int = Field(128, ge=1, description="HNSW search breadth (>= k is used): recall vs speed")
    nlist: int = Field(0, ge=0, description="IVF clusters; 0: 4*sqrt(distinct vectors)")
    nprobe: int = Field(32, ge=1)
    threads: int = Field(1, ge=1, description="FAISS threads per search call (serving: 1; batching does the rest)")
    min_recall: float = Field(0.98, ge=0, le=1, description="the gate refuses an approximate index whose "
                              "recall@10 against exact search on the valid queries is below this")
    milvus: StoreConfig = Field(default_factory=StoreConfig, description="kind milvus: where the collection "
                                "lives (Milvus Lite file or server) and its HNSW/IVF build; the pipeline and "
                                "index job write it (role writer), the page reads it")


class SearchIndex(Protocol):
    kind: str
    approximate: bool

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def ready(self) -> tuple[bool, str]: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


def as_queries(queries, dim: int) -> np.ndarray:
    """float32 C-contiguous [Q, dim]; ValueError naming the shape otherwise."""
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be [Q, {dim}], got {q.shape}")
    return q
