"""Thin ZenML steps of the catalogue index job: unpack the config, call `ecomcap.retrieval.index.catalogue`."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from zenml import step

from ecomcap.retrieval import index_job as job
from ecomcap.retrieval.index import catalogue as cat
from materializers import GalleryDir


@step
def catalogue_ingest(config: cat.IndexJobConfig) -> Annotated[str, "catalogue_items"]:
    """The catalogue through the shared ingest (quarantine, counts); returns its item dataset."""
    return str(cat.ingest_catalogue(config.catalogue))


@step(enable_cache=False)  # the champion and the serving version live in the registry, not in the inputs
def catalogue_embed(config: cat.IndexJobConfig, items: str) -> tuple[
    Annotated[GalleryDir, "catalogue_gallery"], Annotated[str, "encoder_version"]
]:
    """Champion encoder x catalogue, reusing the serving version's vectors of unchanged items."""
    cache = Path(config.catalogue.work_dir) / "versions"
    encoder_dir, encoder_version = job.encoder_of(config.registry, config.catalogue.encoder, cache)
    previous = job.previous_serving(config.registry, cache)
    out = Path(tempfile.mkdtemp(prefix="gallery-", dir=Path(config.catalogue.work_dir))) / "gallery"
    gallery = cat.index_catalogue(encoder_dir, Path(items), out, previous, config.index.model_dump(mode="json"),
                                  config.catalogue.batch_size, config.torch_device())
    return GalleryDir(str(gallery)), encoder_version


@step(enable_cache=False)
def catalogue_register(config: cat.IndexJobConfig, gallery: GalleryDir,
                       encoder_version: str) -> Annotated[dict, "catalogue_index"]:
    """Index recall check (a Milvus index is written here, as the writer), then register the
    version and move `serving` (never `champion`)."""
    recall, described = job.index_recall(Path(gallery.path), config.catalogue.recall_queries, config.catalogue.seed)
    result = job.register_serving(Path(gallery.path), config.registry, encoder_version, recall,
                                  config.index.min_recall)
    return {**result, "index": described}
