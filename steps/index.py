"""Thin ZenML steps of the catalogue index job: unpack the config, call `ecomcap.retrieval.index.catalogue`."""
from __future__ import annotations

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
    gallery, encoder_version = job.embed_stage(config, Path(items))
    return GalleryDir(str(gallery)), encoder_version


@step(enable_cache=False)
def catalogue_register(config: cat.IndexJobConfig, gallery: GalleryDir,
                       encoder_version: str) -> Annotated[dict, "catalogue_index"]:
    """Index recall check, then register the version and move `serving` (never `champion`)."""
    return job.register_stage(config, Path(gallery.path), encoder_version)
