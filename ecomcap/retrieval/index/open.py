"""Open the index a gallery records (index.json "search"), the same way for every reader."""
from __future__ import annotations

import logging

import numpy as np

from ecomcap.retrieval.index.base import IndexConfig
from ecomcap.retrieval.index.dedup import group_rows
from ecomcap.retrieval.index.exact import ExactIndex

log = logging.getLogger(__name__)


def recorded_config(gallery) -> IndexConfig:
    """The gallery's recorded index settings; galleries from before the record search exactly."""
    return IndexConfig.model_validate(gallery.index.get("search") or {"kind": "exact"})


def open_index(gallery, cfg: IndexConfig | None = None, store=None, build: bool = True):
    """The SearchIndex for `gallery`: `cfg` (default: what the gallery records); `store` overrides
    its Milvus settings (kind milvus; `build`: write the collection, else only read it). `auto`
    resolves by the number of distinct vectors."""
    cfg = cfg or recorded_config(gallery)
    if cfg.kind == "milvus":
        from ecomcap.retrieval.index.milvus_index import MilvusIndex

        return MilvusIndex(gallery, store or cfg.milvus, build=build, dedup=cfg.dedup)
    vectors = gallery.vectors if hasattr(gallery, "vectors") else np.asarray(gallery)
    groups = group_rows(vectors, cfg.dedup)
    kind = cfg.kind
    if kind == "auto":
        kind = "exact" if len(groups.unique) <= cfg.exact_max_items else "hnsw"
    if kind == "exact":
        index = ExactIndex(vectors, groups=groups)
    else:
        from ecomcap.retrieval.index.faiss_index import FaissIndex

        index = FaissIndex(vectors, cfg, kind, groups=groups)
    log.info("search index: %s", index.describe())
    return index
