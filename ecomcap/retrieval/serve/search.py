"""Text -> product search over a gallery artifact: query encoder + search index + item texts.

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
from ecomcap.retrieval.index.base import IndexConfig
from ecomcap.retrieval.index.gallery import Gallery, open_gallery
from ecomcap.retrieval.index.milvus import StoreConfig

RETRIEVER = "ecomcap-retriever"
SERVING = "serving"  # the alias the catalogue index job moves; the champion serves until it exists
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
    """One gallery version behind its search index, answering text queries with ranked items.
    `search_many` encodes a batch of queries in one forward pass and searches them in one call
    (the page batches concurrent requests through it)."""

    def __init__(self, gallery: Gallery, index=None, encode: Encode | None = None, gated: bool = True) -> None:
        from ecomcap.retrieval.index.open import open_index

        self.gallery, self.gated = gallery, gated  # gated: the index the gallery records (the gate's)
        self.encode = encode or query_encoder(gallery)
        self.index = index if index is not None else open_index(gallery)
        self.dim = int(gallery.vectors.shape[1])

    @staticmethod
    def check(query: str, top: int) -> str:
        """The stripped query; EcomcapError (the page's 400) for an empty/long query or a bad top."""
        query = (query or "").strip()
        if not query:
            raise EcomcapError("empty query: type a few words, e.g. 红色连衣裙")
        if len(query) > MAX_QUERY_CHARS:
            raise EcomcapError(f"query longer than {MAX_QUERY_CHARS} characters")
        if not 1 <= top <= MAX_TOP:
            raise EcomcapError(f"top must be between 1 and {MAX_TOP}, got {top}")
        return query

    def search(self, query: str, top: int = 10) -> dict:
        """{"query", "top", "took_ms", "results": [{"rank", "item_id", "text", "score"}]}."""
        return self.search_many([self.check(query, top)], [top])[0]

    def search_many(self, queries: list[str], tops: list[int]) -> list[dict]:
        """Checked queries -> one result dict each; one encoder forward, one index call."""
        t0 = time.perf_counter()
        vec = np.asarray(self.encode(list(queries)), dtype=np.float32)
        if vec.shape != (len(queries), self.dim):
            raise EcomcapError(f"query encoder gives {vec.shape[1:]}, the gallery holds dim {self.dim}: "
                               "encoder and index are from different versions")
        scores, rows = self.index.search(vec, max(tops))
        took = round((time.perf_counter() - t0) * 1000, 2)
        out = []
        for query, top, srow, rrow in zip(queries, tops, scores, rows):
            results = [{"rank": r + 1, "item_id": self.gallery.item_ids[j], "text": self.gallery.texts[j],
                        "score": round(float(s), 4)} for r, (s, j) in enumerate(zip(srow[:top], rrow[:top])) if j >= 0]
            out.append({"query": query, "top": top, "took_ms": took, "results": results})
        return out

    def close(self) -> None:
        self.index.close()


CACHE_DIR = ".run/retrieval/versions"


def champion_gallery(tracking_uri: str | None = None, name: str = RETRIEVER, alias: str = "champion",
                     cache_dir: str | Path = CACHE_DIR, fallback: bool = True) -> Path:
    """The gallery index directory of the registered retriever behind `alias` (`registered_gallery`)."""
    return registered_gallery(tracking_uri, name, alias, cache_dir, fallback)[0]


def registered_gallery(tracking_uri: str | None = None, name: str = RETRIEVER, alias: str = "champion",
                       cache_dir: str | Path = CACHE_DIR, fallback: bool = True) -> tuple[Path, str, str]:
    """(gallery directory, version, alias it was found under) of the registered retriever.

    `serving` falls back to `champion` only when no version carries `serving` yet (before the
    first catalogue index; `fallback=False`: never); any other registry error is an error. Downloaded once per (registry,
    model, version) into `cache_dir` with the shared `download_version`; the global MLflow URIs
    are left alone.
    """
    import mlflow

    from ecomcap.config import RegistryConfig
    from ecomcap.registry.register import download_version

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version, aliases, error = None, [alias] + (["champion"] if alias == SERVING and fallback else []), ""
    for wanted in aliases:
        try:
            version, alias = str(client.get_model_version_by_alias(name, wanted).version), wanted
            break
        except Exception as exc:  # MLflow raises RestException / MlflowException variants
            error = str(exc).splitlines()[0]
            if "not found" not in error.lower() and "does not exist" not in error.lower():
                raise EcomcapError(f"registry {tracking_uri or mlflow.get_tracking_uri()}: {error}") from None
    if version is None:
        raise EcomcapError(f"no {' or '.join(repr(a) for a in aliases)} version of registered model '{name}' at "
                           f"{tracking_uri or mlflow.get_tracking_uri()}: {error} "
                           "(run the retrieval pipeline first, or pass --gallery DIR)")
    registry = tracking_uri or mlflow.get_tracking_uri()
    key = hashlib.sha256(registry.encode()).hexdigest()[:12]
    dst = Path(cache_dir).expanduser().resolve() / key / name / version
    done = dst / "gallery_dir.txt"  # written last: a half-finished download is not reused
    if done.is_file():
        return dst / done.read_text(encoding="utf-8"), version, alias
    shutil.rmtree(dst, ignore_errors=True)
    found = download_version(RegistryConfig(model_name=name, tracking_uri=tracking_uri), version,
                             "vectors.npy", dst / "model")
    if not (found / "index.json").is_file():
        raise EcomcapError(f"version {version} of '{name}' holds no gallery index (index.json + vectors.npy)")
    done.write_text(found.relative_to(dst).as_posix(), encoding="utf-8")
    return found, version, alias


def serving_index(gallery: Gallery, kind: str = "recorded", store_uri: str | None = None,
                  ef: int | None = None):
    """(index, gated) for serving `gallery`: the index it records, with `store_uri` saying where
    its Milvus collection lives here; another `kind` or `ef` serves a ranking the gate did not
    score (gated False). Serving only reads (Milvus Lite still builds on first use)."""
    from ecomcap.retrieval.index.open import open_index, recorded_config

    recorded = recorded_config(gallery)
    cfg = recorded if kind == "recorded" else recorded.model_copy(update={"kind": kind})
    if store_uri:
        cfg = cfg.model_copy(update={"milvus": cfg.milvus.model_copy(update={"uri": store_uri})})
    if ef and cfg.kind in ("hnsw", "auto", "milvus"):
        cfg = cfg.model_copy(update={"ef": ef, "milvus": cfg.milvus.model_copy(update={"ef": ef})})
    return open_index(gallery, cfg, build=False), _ranking(cfg) == _ranking(recorded)


def _ranking(cfg: IndexConfig) -> dict:
    """What decides the ranking (not where the collection lives or how to reach it)."""
    connection = {"uri", "role", "token_env", "timeout_s", "build_timeout_s"}
    return {**cfg.model_dump(exclude={"milvus"}), "milvus": cfg.milvus.model_dump(exclude=connection)}


def open_searcher(gallery_dir: str | Path, index: IndexConfig | None = None, store: StoreConfig | None = None,
                  encode: Encode | None = None) -> Searcher:
    """A Searcher over a gallery directory: its recorded index unless `index` overrides it
    (`store` alone means the Milvus store at that URI)."""
    from ecomcap.retrieval.index.open import open_index

    gallery = open_gallery(gallery_dir)
    if store is not None and index is None:
        index = IndexConfig(kind="milvus")
    return Searcher(gallery, open_index(gallery, index, store, build=False), encode)  # serving reads
