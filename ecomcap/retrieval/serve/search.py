"""Text -> product search over a gallery artifact: query encoder + vector store + item texts.

What `ecomcap search` and the search page (`ecomcap.retrieval.serve.page`) share. The gallery comes
from a directory or from the registry's champion (`ecomcap-retriever@champion`, whose version
holds the encoder and its gallery index, promoted together).
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ecomcap.errors import EcomcapError
from ecomcap.retrieval.index.gallery import Gallery, open_gallery
from ecomcap.retrieval.index.milvus import StoreConfig, VectorStore

RETRIEVER = "ecomcap-retriever"
MAX_TOP = 100
MAX_QUERY_CHARS = 200

Encode = Callable[[list[str]], np.ndarray]


def query_encoder(gallery: Gallery) -> Encode:
    """The text tower that made the gallery (index.json `encoder_dir`, relative to the gallery)."""
    from ecomcap.retrieval.index.demo import HASHING_PREFIX, HashingTextEncoder

    name = str(gallery.index["encoder_dir"])
    if name.startswith(HASHING_PREFIX):
        return HashingTextEncoder(int(name[len(HASHING_PREFIX):])).encode_texts
    path = Path(name) if Path(name).is_absolute() else gallery.path / name
    if not path.is_dir():
        raise EcomcapError(f"the gallery's encoder {path} is missing (index.json encoder_dir={name!r})")
    try:
        from ecomcap.retrieval.model.encoder import load_encoder
    except ImportError as exc:
        raise EcomcapError(f"this install cannot load retrieval encoders ({exc})") from None
    return load_encoder(path).encode_texts


class Searcher:
    """One gallery version loaded into the store, answering text queries with ranked items."""

    def __init__(self, gallery: Gallery, store: VectorStore, encode: Encode | None = None) -> None:
        self.gallery = gallery
        self.store = store
        self.encode = encode or query_encoder(gallery)
        self.collection = store.ensure(gallery)

    def search(self, query: str, top: int = 10) -> dict:
        """{"query", "top", "took_ms", "results": [{"rank", "item_id", "text", "score"}]}."""
        query = (query or "").strip()
        if not query:
            raise EcomcapError("empty query: type a few words, e.g. 红色连衣裙")
        if len(query) > MAX_QUERY_CHARS:
            raise EcomcapError(f"query longer than {MAX_QUERY_CHARS} characters")
        if not 1 <= top <= MAX_TOP:
            raise EcomcapError(f"--top must be between 1 and {MAX_TOP}, got {top}")
        t0 = time.perf_counter()
        vec = np.asarray(self.encode([query]), dtype=np.float32)
        if vec.shape != (1, self.gallery.vectors.shape[1]):
            raise EcomcapError(f"query encoder gives {vec.shape}, the gallery holds dim {self.gallery.vectors.shape[1]}: "
                               "encoder and index are from different versions")
        hits = self.store.search(self.collection, vec, top)[0]
        results = [{"rank": r + 1, "item_id": h.item_id, "text": self.gallery.texts[h.row], "score": round(h.score, 4)}
                   for r, h in enumerate(hits)]
        return {"query": query, "top": top, "took_ms": round((time.perf_counter() - t0) * 1000, 2),
                "results": results}


CACHE_DIR = ".run/retrieval/versions"


def champion_gallery(tracking_uri: str | None = None, name: str = RETRIEVER, alias: str = "champion",
                     cache_dir: str | Path = CACHE_DIR) -> Path:
    """The gallery index directory of the registered retriever behind `alias`.

    Downloaded once per (registry, model, version) into `cache_dir` with the shared
    `download_version` and reused by every later search; the global MLflow URIs are left alone.
    """
    import mlflow

    from ecomcap.config import RegistryConfig
    from ecomcap.registry.register import download_version

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:  # MLflow raises RestException / MlflowException variants
        raise EcomcapError(f"no '{alias}' version of registered model '{name}' at "
                           f"{tracking_uri or mlflow.get_tracking_uri()}: {str(exc).splitlines()[0]} "
                           "(run the retrieval pipeline first, or pass --gallery DIR)") from None
    registry = tracking_uri or mlflow.get_tracking_uri()
    key = hashlib.sha256(registry.encode()).hexdigest()[:12]
    dst = Path(cache_dir).expanduser().resolve() / key / name / version
    done = dst / "gallery_dir.txt"  # written last: a half-finished download is not reused
    if done.is_file():
        return dst / done.read_text(encoding="utf-8")
    shutil.rmtree(dst, ignore_errors=True)
    found = download_version(RegistryConfig(model_name=name, tracking_uri=tracking_uri), version,
                             "vectors.npy", dst / "model")
    if not (found / "index.json").is_file():
        raise EcomcapError(f"version {version} of '{name}' holds no gallery index (index.json + vectors.npy)")
    done.write_text(found.relative_to(dst).as_posix(), encoding="utf-8")
    return found


def open_searcher(gallery_dir: str | Path, store: StoreConfig | None = None, encode: Encode | None = None) -> Searcher:
    return Searcher(open_gallery(gallery_dir), VectorStore(store or StoreConfig()), encode)
