"""The catalogue index job's registry side (the ZenML steps and `ecomcap index-catalogue` call
these): the encoder of a registered version, the previous `serving` gallery to reuse, the index
recall check, and registering the new gallery version with the `serving` alias. It sits above
`index/` and `serve/` (it registers the serving pyfunc), like `workflow.py` for the pipeline."""
from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

from ecomcap.retrieval.index.catalogue import (
    SERVING,
    IndexJobConfig,
    index_catalogue,
    ingest_catalogue,
)

log = logging.getLogger(__name__)


def index_recall(gallery_dir: Path, n_queries: int, seed: int = 0) -> tuple[float, dict]:
    """Recall@10 of the gallery's recorded index against exact search, with item texts as
    queries (a catalogue has no labelled queries); 1.0 for an exact index."""
    import numpy as np

    from ecomcap.retrieval.index.gallery import load_gallery
    from ecomcap.retrieval.index.open import open_index
    from ecomcap.retrieval.index.recall import recall_vs_exact
    from ecomcap.retrieval.serve.search import query_encoder

    gal = load_gallery(gallery_dir)
    rows = random.Random(seed).sample(range(len(gal.texts)), min(n_queries, len(gal.texts)))
    q = np.asarray(query_encoder(gal)([gal.texts[r] for r in rows]), dtype=np.float32)
    index = open_index(gal)
    try:
        return recall_vs_exact(index, gal.vectors, q, 10), index.describe()
    finally:
        index.close()


def register_serving(gallery_dir: Path, registry, encoder_version: str, recall: float, min_recall: float,
                     tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Register the gallery version (encoder + index, the same pyfunc as the gated model) and move
    the `serving` alias to it, unless its index recall is below `min_recall`. The champion alias
    and the gate's eval set are untouched."""
    import mlflow

    from ecomcap.registry.register import registry_client
    from ecomcap.retrieval.serve.pyfunc import log_retriever

    meta = json.loads((gallery_dir / "index.json").read_text(encoding="utf-8"))
    client = registry_client(registry)
    with _store(registry.tracking_uri), mlflow.start_run(
            run_name="index_catalogue", experiment_id=_experiment(client, "retrieval_index")):
        counts = {"items": meta["count"], **{k: meta["embedding"][k] for k in ("embedded", "reused")}}
        mlflow.log_metrics({**counts, "index_recall10": recall})
        uri = log_retriever(gallery_dir)
        all_tags = {"role": "catalogue index", "encoder_version": encoder_version,
                    "gallery_fingerprint": meta["fingerprint"], **(tags or {})}
        version = str(mlflow.register_model(uri, registry.model_name, tags=all_tags).version)
    moved = recall >= min_recall
    if moved:
        client.set_registered_model_alias(registry.model_name, SERVING, version)
    else:
        log.warning("catalogue index recall@10 %.4f < %.2f: version %s registered, '%s' not moved",
                    recall, min_recall, version, SERVING)
    return {"version": version, "alias_moved": moved, "recall": recall, **counts}


@contextlib.contextmanager
def _store(uri: str | None):
    """The registry's store as MLflow's current one for the job's run, the caller's restored after."""
    import mlflow

    before = mlflow.get_tracking_uri() if uri else None
    if uri:
        mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if uri:
            mlflow.set_tracking_uri(before)


def _experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def previous_serving(registry, cache_dir: Path) -> Path | None:
    """The current `serving` version's gallery (downloaded once; before the first index, the
    champion's, whose vectors are as reusable), or None when neither exists."""
    from ecomcap.errors import EcomcapError
    from ecomcap.retrieval.serve.search import champion_gallery

    try:
        return champion_gallery(registry.tracking_uri, registry.model_name, SERVING, cache_dir)
    except EcomcapError:
        return None


def encoder_of(registry, alias: str, cache_dir: Path) -> tuple[Path, str]:
    """(encoder directory, version) of the registered retriever behind `alias`."""
    from ecomcap.retrieval.serve.search import registered_gallery

    gallery, version, _ = registered_gallery(registry.tracking_uri, registry.model_name, alias, cache_dir)
    meta = json.loads((gallery / "index.json").read_text(encoding="utf-8"))
    return gallery / meta["encoder_dir"], version


def embed_stage(cfg: IndexJobConfig, items: Path) -> tuple[Path, str]:
    """(gallery version, encoder version): the configured alias's encoder over the ingested
    catalogue, reusing the current `serving` gallery's vectors of unchanged items."""
    cache = Path(cfg.catalogue.work_dir) / "versions"
    encoder_dir, encoder_version = encoder_of(cfg.registry, cfg.catalogue.encoder, cache)
    previous = previous_serving(cfg.registry, cache)
    out = Path(tempfile.mkdtemp(prefix="gallery-", dir=Path(cfg.catalogue.work_dir))) / "gallery"
    gallery = index_catalogue(encoder_dir, items, out, previous, cfg.index.model_dump(mode="json"),
                              cfg.catalogue.batch_size, cfg.torch_device())
    return gallery, encoder_version


def register_stage(cfg: IndexJobConfig, gallery: Path, encoder_version: str) -> dict[str, Any]:
    """Index recall check (a Milvus index is written here, as the writer), then register the
    version and move `serving` (never `champion`)."""
    recall, described = index_recall(gallery, cfg.catalogue.recall_queries, cfg.catalogue.seed)
    result = register_serving(gallery, cfg.registry, encoder_version, recall, cfg.index.min_recall)
    return {**result, "gallery": str(gallery), "index": described}


def run_job(cfg: IndexJobConfig) -> dict[str, Any]:
    """ingest -> embed (incremental) -> recall check -> register + alias `serving`: the index
    pipeline's three steps in one call (`ecomcap index-catalogue`)."""
    gallery, encoder_version = embed_stage(cfg, ingest_catalogue(cfg.catalogue))
    return register_stage(cfg, gallery, encoder_version)
