"""The vector store behind one small interface: Milvus, embedded or as a server, same client code.

`uri` a local ``*.db`` file: Milvus Lite, in-process, no server (the default; laptops, CI, one
machine). `uri` ``http(s)://host:19530``: a Milvus server (k8s/milvus.yaml) for catalogues that
outgrow one machine; credentials come from the environment variable named by `token_env`, never
from the config. Each gallery version is its own collection, named by the gallery's fingerprint,
so promoting a new index never overwrites the one the champion serves.

Recall is measured with exact search (`metrics.topk_search`, via `tie_recall`); the store's approximate search is reported
against it (`ann_recall`).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ecomcap.errors import EcomcapError

if TYPE_CHECKING:  # annotations only: importing the gallery pulls in the encoder and transformers
    from ecomcap.retrieval.index.gallery import Gallery

log = logging.getLogger(__name__)


class StoreConfig(BaseModel):
    """Where the gallery vectors live and how the approximate index is built."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(".run/retrieval/milvus.db", description="*.db file = embedded Milvus Lite; "
                     "http(s)://host:19530 = Milvus server")
    token_env: str = Field("MILVUS_TOKEN", description="env var holding 'user:password' or an API key (server)")
    collection_prefix: str = "ecomcap_gallery"
    index_type: Literal["HNSW", "IVF_FLAT", "FLAT"] = "HNSW"
    hnsw_m: int = Field(16, ge=2)
    ef_construction: int = Field(200, ge=8)
    ef: int = Field(256, ge=1, description="HNSW search breadth (>= top k); recall vs speed")
    nlist: int = Field(128, ge=1, description="IVF_FLAT clusters")
    nprobe: int = Field(16, ge=1)
    insert_batch: int = Field(2000, ge=1)

    @property
    def embedded(self) -> bool:
        return not re.match(r"^(https?|tcp|grpc)://", self.uri)


@dataclass(frozen=True)
class Hit:
    row: int  # position in the gallery
    item_id: str
    score: float


def _quiet_embedded_logs() -> None:
    """Milvus Lite logs each start/stop and faiss each CPU-feature probe at INFO, and its
    in-process gRPC server logs a traceback for a timestamp call it does not implement (the
    client falls back): keep warnings from them, not that noise."""
    for name in ("faiss.loader", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


class VectorStore:
    """`ensure(gallery)` loads a gallery version (once); `search(name, queries, k)` answers."""

    def __init__(self, cfg: StoreConfig) -> None:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        self.cfg = cfg
        if cfg.embedded:
            Path(cfg.uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            _quiet_embedded_logs()
        try:
            self.client = MilvusClient(uri=cfg.uri, token=os.environ.get(cfg.token_env, ""))
        except MilvusException as exc:
            where = "Milvus Lite file" if cfg.embedded else "Milvus server"
            raise EcomcapError(f"cannot open the {where} {cfg.uri}: {exc.message}") from exc

    def collection(self, gallery: Gallery) -> str:
        return f"{self.cfg.collection_prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', str(gallery.index['fingerprint']))}"

    def ensure(self, gallery: Gallery) -> str:
        """The gallery's collection, built on first use (vectors inserted in batches, indexed)."""
        name = self.collection(gallery)
        if self.client.has_collection(name):
            self.client.load_collection(name)  # a reopened store starts with collections released
            if self.count(name) == len(gallery.item_ids):
                return name
            log.warning("collection %s is incomplete (%d of %d rows): rebuilding", name, self.count(name),
                        len(gallery.item_ids))
            self.client.drop_collection(name)
        self._create(name, gallery.vectors.shape[1])
        for i in range(0, len(gallery.item_ids), self.cfg.insert_batch):
            rows = [{"row": j, "item_id": gallery.item_ids[j], "vector": gallery.vectors[j]}
                    for j in range(i, min(i + self.cfg.insert_batch, len(gallery.item_ids)))]
            self.client.insert(name, rows)
        self.client.flush(name)
        self.client.load_collection(name)
        log.info("vector store %s: %d items in %s (%s)", self.cfg.uri, self.count(name), name, self.cfg.index_type)
        return name

    def _create(self, name: str, dim: int) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("item_id", DataType.VARCHAR, max_length=512)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        params = {"HNSW": {"M": self.cfg.hnsw_m, "efConstruction": self.cfg.ef_construction},
                  "IVF_FLAT": {"nlist": self.cfg.nlist}, "FLAT": {}}[self.cfg.index_type]
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=self.cfg.index_type, metric_type="IP", params=params)
        self.client.create_collection(name, schema=schema, index_params=index)

    def count(self, name: str) -> int:
        return int(self.client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def search(self, name: str, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k items per query row (inner product = cosine on unit vectors), best first."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise ValueError(f"queries must be [Q, D], got {queries.shape}")
        params = {"ef": max(self.cfg.ef, k)} if self.cfg.index_type == "HNSW" else \
            {"nprobe": self.cfg.nprobe} if self.cfg.index_type == "IVF_FLAT" else {}
        res = self.client.search(name, data=list(queries), limit=k, output_fields=["item_id"],
                                 search_params={"metric_type": "IP", "params": params})
        return [[Hit(int(h["row"]), h["entity"]["item_id"], float(h["distance"])) for h in hits] for hits in res]

    def drop(self, name: str) -> None:
        self.client.drop_collection(name)

    def close(self) -> None:
        self.client.close()


def tie_recall(vectors: np.ndarray, queries: np.ndarray, answers: list[list[int]], k: int = 10,
               tie_eps: float = 1e-5) -> float:
    """Recall of approximate top-k `answers` (gallery rows per query) against exact search
    (`metrics.topk_search`), averaged over queries: the share of the k answers that belong to
    the exact top-k (1.0 = exact). An answer scoring as high as the exact k-th counts too: items
    with equal scores (duplicate texts) are interchangeable, and which of them a tie keeps is
    arbitrary. Used by `ann_recall` and the page load benchmark."""
    from ecomcap.retrieval.evaluate.metrics import topk_search

    queries = np.asarray(queries, dtype=np.float32)
    exact_scores, exact = topk_search(queries, vectors, k)
    found = []
    for q, rows, top, floor in zip(queries, answers, exact, exact_scores[:, -1]):
        top_set, scores = set(top.tolist()), np.asarray(vectors[rows]) @ q if rows else []
        found.append(sum(r in top_set or s >= floor - tie_eps for r, s in zip(rows, scores)) / len(top))
    return float(np.mean(found))


def ann_recall(store: VectorStore, name: str, gallery: Gallery, queries: np.ndarray, k: int = 10,
               tie_eps: float = 1e-5) -> float:
    """`tie_recall` of the store's approximate search over `gallery`."""
    approx = store.search(name, np.asarray(queries, dtype=np.float32), k)
    return tie_recall(gallery.vectors, queries, [[h.row for h in hits] for hits in approx], k, tie_eps)
