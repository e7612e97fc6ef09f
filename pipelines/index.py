"""The catalogue index job: champion encoder x catalogue -> a gallery version aliased `serving`.

    zenml pipeline run pipelines.index.index_pipeline -c configs/retrieval_index.yaml

Runs after the retrieval pipeline has promoted a champion; re-running it after a catalogue
change embeds only the changed items (item id + content hash against the serving version).
"""
from __future__ import annotations

from zenml import pipeline

from ecomcap.config_check import pipeline_input
from ecomcap.retrieval.index.catalogue import IndexJobConfig
from steps.index import catalogue_embed, catalogue_ingest, catalogue_register

CheckedConfig = pipeline_input(IndexJobConfig)


@pipeline(enable_cache=False)
def index_pipeline(config: CheckedConfig = IndexJobConfig()) -> None:  # noqa: B008
    items = catalogue_ingest(config=config)
    gallery, encoder_version = catalogue_embed(config=config, items=items)
    catalogue_register(config=config, gallery=gallery, encoder_version=encoder_version)
