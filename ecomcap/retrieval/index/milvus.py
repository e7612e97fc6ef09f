"""The vector store behind one small interface: Milvus, embedded or as a server, same client code.

`uri` a local ``*.db`` file: Milvus Lite, in-process, no server (the default; laptops, CI, one
machine). `uri` ``http(s)://host:19530``: a Milvus server (k8s/milvus.yaml) for catalogues that
outgrow one machine. Each gallery version and index build is its own collection, named by the
gallery's fingerprint and the index parameters, so promoting a new index (or changing M,
efConstruction, nlist) never overwrites or silently reuses the one the champion serves.

Against a server the client has a `role`. The writer (the index job) creates, inserts, indexes,
loads and drops; the reader (the search page) only searches and queries, and a collection that
is missing, incomplete, unindexed or unloaded is an error naming the index job, never a rebuild at
start-up. Each role authenticates with its own token, read from the env var `token_var`
(MILVUS_READER_TOKEN / MILVUS_WRITER_TOKEN, 'user:password'), never from the config; the users and
their privileges come from `milvus_roles`. Connecting and every serving call are bounded by
`timeout_s` (pymilvus otherwise retries an unreachable server for minutes), and `ready()` answers
a readiness probe without raising. Milvus Lite ignores roles, tokens and timeouts: it is in-process,
and a bound there would only turn a slow CPU into errors. Its approximate search is measured
against exact search by `recall.py`.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ecomcap.errors import EcomcapError

Gallery = Any  # an ecomcap.retrieval.index.gallery.Gallery: not imported, the store sits below it

log = logging.getLogger(__name__)
INDEX_NAME = "vector"  # named explicitly: a server's default index name is not the field's


class StoreConfig(BaseModel):
    """Where the gallery vectors live, who the client is, and how the approximate index is built."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(".run/retrieval/milvus.db", description="*.db file = embedded Milvus Lite; "
                     "http(s)://host:19530 = Milvus server")
    role: Literal["reader", "writer"] = Field("reader", description="server: the reader (search page) only "
                                              "searches; the writer (index job) also creates, loads, drops")
    token_env: str | None = Field(None, description="env var holding the role's 'user:password' (server); "
                                  "default MILVUS_READER_TOKEN / MILVUS_WRITER_TOKEN")
    timeout_s: float = Field(1.0, gt=0, description="server: bound on connecting, each search/query, ready()")
    build_timeout_s: float = Field(600.0, gt=0, description="server, writer: bound on each insert/index/load "
                                   "call and on waiting for the index")
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

    @property
    def token_var(self) -> str:
        return self.token_env or f"MILVUS_{self.role.upper()}_TOKEN"

    @property
    def index_params(self) -> dict:
        return {"HNSW": {"M": self.hnsw_m, "efConstruction": self.ef_construction},
                "IVF_FLAT": {"nlist": self.nlist}, "FLAT": {}}[self.index_type]

    @property
    def index_tag(self) -> str:
        """The build parameters in a collection name: hnsw_m16_efc200, ivf_flat_nlist128, flat."""
        short = {"M": "m", "efConstruction": "efc", "nlist": "nlist"}
        return "_".join([self.index_type.lower()] + [f"{short[k]}{v}" for k, v in self.index_params.items()])


@dataclass(frozen=True)
class Hit:
    row: int  # position in the gallery
    item_id: str
    score: float


def _quiet_logs(embedded: bool) -> None:
    """Milvus Lite logs each start/stop and faiss each CPU-feature probe at INFO, and its
    in-process gRPC server logs a traceback for a timestamp call it does not implement (the
    client falls back). Against a server pymilvus logs a full traceback for every failed call and
    its connection manager one per failed reconnect (a readiness probe every few seconds while
    Milvus is down): our one-line errors carry their message. pymilvus is imported first: its
    import configures logging and resets the levels of its loggers."""
    import pymilvus  # noqa: F401

    names = ("faiss.loader", "milvus_lite") if embedded else ()
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet = ("grpc._server",) if embedded else ("pymilvus.decorators", "pymilvus.client.connection_manager")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def error_line(exc: Exception) -> str:
    """One line of a pymilvus or raw gRPC error (pymilvus re-raises DEADLINE_EXCEEDED as is)."""
    if callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None)):
        return f"{exc.code().name}: {exc.details()}"
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(text).strip().splitlines()[0]


class VectorStore:
    """`ensure(gallery)` builds (writer) or opens (reader) a gallery version; `search(name, queries, k)`
    answers; `ready()` says whether the opened one can serve."""

    def __init__(self, cfg: StoreConfig, *, connect: bool = True) -> None:
        """`connect=False` defers connecting to the first call (a page that must start, and report
        not-ready, while Milvus is still down); otherwise an unreachable server is an error here."""
        self.cfg = cfg
        self.target: tuple[str, int] | None = None  # (collection, rows) that ensure() opened
        self._client = None
        self._lock = threading.Lock()
        if cfg.embedded:
            Path(cfg.uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        _quiet_logs(cfg.embedded)
        if connect:
            self._connect()

    @property
    def client(self):
        return self._client or self._connect()

    def _connect(self, timeout: float | None = None):
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        cfg = self.cfg
        with self._lock:
            if self._client is not None:
                return self._client
            if cfg.embedded:
                kwargs = {}
            else:  # a dedicated channel: its own connect timeout, and a fresh try after a failure
                kwargs = {"token": os.environ.get(cfg.token_var, ""), "timeout": timeout or cfg.timeout_s,
                          "dedicated": True}
            try:
                self._client = MilvusClient(uri=cfg.uri, **kwargs)
            except MilvusException as exc:
                if cfg.embedded:
                    raise EcomcapError(f"cannot open the Milvus Lite file {cfg.uri}: {error_line(exc)}") from None
                token = "set" if os.environ.get(cfg.token_var) else "not set"
                raise EcomcapError(f"Milvus server {cfg.uri} unreachable within {cfg.timeout_s:g} s as the "
                                   f"{cfg.role} (${cfg.token_var} {token}): {error_line(exc)}") from None
            return self._client

    def _timeout(self, write: bool = False) -> float | None:
        if self.cfg.embedded:
            return None
        return self.cfg.build_timeout_s if write else self.cfg.timeout_s

    def _writer_only(self, action: str, name: str) -> None:
        if self.cfg.role == "reader" and not self.cfg.embedded:
            raise EcomcapError(f"the reader may not {action} collection {name}: run the index job (role: writer)")

    def collection(self, gallery: Gallery) -> str:
        fingerprint = re.sub(r"[^0-9A-Za-z_]", "_", str(gallery.index["fingerprint"]))
        return f"{self.cfg.collection_prefix}_{fingerprint}_{self.cfg.index_tag}"

    def open(self, gallery: Gallery) -> str:
        """The gallery's collection name, remembered for `ready()`, without a call to Milvus: a page
        that must start (and answer 503) before the index job has built it."""
        self.target = (self.collection(gallery), len(gallery.item_ids))
        return self.target[0]

    def ensure(self, gallery: Gallery) -> str:
        """The gallery's collection, ready to search. The writer (and Milvus Lite) builds it on first
        use: vectors inserted in batches, flushed, indexed, loaded; an incomplete one is dropped and
        rebuilt. A server's reader only checks it (`ready`) and raises if it cannot serve."""
        name, rows = self.collection(gallery), len(gallery.item_ids)
        if self.cfg.role == "reader" and not self.cfg.embedded:
            try:
                problem = self._problem(name, rows, time.monotonic() + self.cfg.timeout_s)
            except EcomcapError:
                raise
            except Exception as exc:  # pymilvus / gRPC errors: one line
                raise EcomcapError(f"Milvus server {self.cfg.uri} failing: {error_line(exc)}") from None
            if problem:
                raise EcomcapError(f"collection {name} {problem}: run the index job (role: writer) first")
            self.target = (name, rows)
            return name
        t = self._timeout(write=True)
        if self.client.has_collection(name, timeout=t):
            self.client.load_collection(name, timeout=t)  # a reopened store starts with collections released
            if self.count(name) == rows:
                self._wait_indexed(name, rows)
                self.target = (name, rows)
                return name
            log.warning("collection %s is incomplete (%d of %d rows): rebuilding", name, self.count(name), rows)
            self.client.drop_collection(name, timeout=t)
        self._create(name, gallery.vectors.shape[1])
        for i in range(0, rows, self.cfg.insert_batch):
            batch = [{"row": j, "item_id": gallery.item_ids[j], "vector": gallery.vectors[j]}
                     for j in range(i, min(i + self.cfg.insert_batch, rows))]
            self.client.insert(name, batch, timeout=t)
        self.client.flush(name, timeout=t)
        self._wait_indexed(name, rows)
        self.client.load_collection(name, timeout=t)
        log.info("vector store %s: %d items in %s (%s)", self.cfg.uri, self.count(name), name, self.cfg.index_type)
        self.target = (name, rows)
        return name

    def _create(self, name: str, dim: int) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("item_id", DataType.VARCHAR, max_length=512)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=self.cfg.index_type, index_name=INDEX_NAME, metric_type="IP",
                        params=self.cfg.index_params)
        self.client.create_collection(name, schema=schema, index_params=index, timeout=self._timeout(write=True))

    def _index_problem(self, name: str, rows: int, timeout: float | None) -> str | None:
        """Why the collection's vector index cannot serve `rows` rows yet (None: it can)."""
        info = self.client.describe_index(name, INDEX_NAME, timeout=timeout)
        if not info:
            return "has no vector index"
        if info.get("index_type", self.cfg.index_type) != self.cfg.index_type:
            return f"has a {info['index_type']} index, not {self.cfg.index_type}"
        state, indexed, pending = info.get("state"), int(info.get("indexed_rows", 0)), \
            int(info.get("pending_index_rows", 0))
        if state != "Finished" or pending or indexed < rows:
            return f"is not indexed yet (index state {state}, {indexed} of {rows} rows indexed)"
        return None

    def _wait_indexed(self, name: str, rows: int) -> None:
        """The writer returns only once the server has indexed every row (Lite: at once)."""
        deadline = time.monotonic() + (self._timeout(write=True) or 3600)
        while problem := self._index_problem(name, rows, self._timeout(write=True)):
            if time.monotonic() > deadline:
                raise EcomcapError(f"collection {name} {problem} after {self.cfg.build_timeout_s:g} s: "
                                   "check the Milvus server's logs")
            time.sleep(0.5)

    def ready(self, gallery: Gallery | str | None = None, rows: int | None = None) -> tuple[bool, str]:
        """(ok, reason) for a readiness probe: the collection of `gallery` (a Gallery, a collection
        name, or by default the one `ensure` opened) exists, is loaded, its index is built over
        every row and it holds exactly the gallery's rows (`rows`; unchecked for a bare name that
        `ensure` did not open). Bounded by `timeout_s` in all (server); never raises."""
        if gallery is None and self.target is None:
            return False, "no gallery opened yet"
        if gallery is None or isinstance(gallery, str):
            name = gallery or self.target[0]
            known = self.target[1] if self.target and self.target[0] == name else None
            rows = rows if rows is not None else known
        else:
            name, rows = self.collection(gallery), len(gallery.item_ids)
        try:
            problem = self._problem(name, rows, time.monotonic() + self.cfg.timeout_s)
        except EcomcapError as exc:
            return False, str(exc)
        except Exception as exc:  # gRPC / pymilvus errors of every kind: a probe answers, it never raises
            return False, f"Milvus server {self.cfg.uri} unreachable or failing: {error_line(exc)}"
        if problem:
            return False, f"collection {name} {problem}"
        return True, f"collection {name}: {'' if rows is None else f'{rows} rows, '}{self.cfg.index_type} index " \
                     "built, loaded"

    def _problem(self, name: str, rows: int | None, deadline: float) -> str | None:
        """What keeps collection `name` from serving `rows` rows (None: nothing); each call gets
        what is left of the deadline (server). Raises on an unreachable or failing server."""
        from pymilvus.client.types import LoadState

        def left() -> float | None:
            return None if self.cfg.embedded else max(deadline - time.monotonic(), 0.05)

        client = self._client or self._connect(left())
        state = client.get_load_state(name, timeout=left())["state"]
        if state == LoadState.NotExist:
            return "does not exist"
        if state != LoadState.Loaded:
            return f"is not loaded ({state.name})"
        found = int(client.query(name, filter="", output_fields=["count(*)"], timeout=left())[0]["count(*)"])
        if rows is not None and found != rows:
            return f"holds {found} of {rows} rows"
        return self._index_problem(name, found, left())

    def count(self, name: str) -> int:
        return int(self.client.query(name, filter="", output_fields=["count(*)"],
                                     timeout=self._timeout())[0]["count(*)"])

    def search(self, name: str, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k items per query row (inner product = cosine on unit vectors), best first."""
        import grpc
        from pymilvus.exceptions import MilvusException

        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise ValueError(f"queries must be [Q, D], got {queries.shape}")
        params = {"ef": max(self.cfg.ef, k)} if self.cfg.index_type == "HNSW" else \
            {"nprobe": self.cfg.nprobe} if self.cfg.index_type == "IVF_FLAT" else {}
        try:
            # the primary key asked for as a field: a server's hits name it "id", Milvus Lite's "row"
            res = self.client.search(name, data=list(queries), limit=k, output_fields=["item_id", "row"],
                                     search_params={"metric_type": "IP", "params": params}, timeout=self._timeout())
        except (MilvusException, grpc.RpcError) as exc:
            raise EcomcapError(f"search in {name} failed ({self.cfg.uri}): {error_line(exc)}") from None
        return [[Hit(int(h["entity"]["row"]), h["entity"]["item_id"], float(h["distance"])) for h in hits]
                for hits in res]

    def drop(self, name: str) -> None:
        self._writer_only("drop", name)
        self.client.drop_collection(name, timeout=self._timeout(write=True))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
