"""Thin ZenML steps of the catalogue index job: unpack the config, call `ecomcap.retrieval.index.catalogue`."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from zenml import step

from ecomcap.retrieval.index import catalogue as cat
from materializers import GalleryDir


@step
def catalogue_ingest(config: cat.IndexJobConfig) -> Annotated[str, "catalogue_items"]:
    """The catalogue through the shared ingest (quarantine, counts); returns its item dataset."""
    return str(cat.ingest_catalogue(config.catalogue))


@step(enable_cache=False)  # the champion and the serving version live in the registry, not in the inputs
def catalogue_embed(config: cat.IndexJobConfig, items: str) -> Annotated[GalleryDir, "catalogue_gallery"]:
    """Champion encoder x catalogue, reusing the serving version's vectors of unchanged items."""
    cache = Path(config.catalogue.work_dir) / "versions"
    encoder_dir, _ = cat.encoder_of(config.registry, config.catalogue.encoder, cache)
    previous = cat.previous_serving(config.registry, cache)
    out = Path(tempfile.mkdtemp(prefix="gallery-", dir=Path(config.catalogue.work_dir))) / "gallery"
    return GalleryDir(str(cat.index_catalogue(encoder_dir, Path(items), out, previous,
                                              config.index.model_dump(mode="json"), config.catalogue.batch_size,
                                              config.torch_device())))


@step(enable_cache=False)
def catalogue_register(config: cat.IndexJobConfig, gallery: GalleryDir) -> Annotated[dict, "catalogue_index"]:
    """Index recall check, then register the version and move `serving` (never `champion`)."""
    _, encoder_version = cat.encoder_of(config.registry, config.catalogue.encoder,
                                        Path(config.catalogue.work_dir) / "versions")
    recall, described = cat.index_recall(Path(gallery.path), config.catalogue.recall_queries, config.catalogue.seed)
    result = cat.register_serving(Path(gallery.path), config.registry, encoder_version, recall,
                                  config.index.min_recall)
    return {**result, "index": described}
