"""ingest -> validate -> train -> embed gallery -> evaluate -> promote, for product retrieval.

    zenml pipeline run pipelines.retrieval.retrieval_pipeline -c configs/retrieval_local.yaml
"""
from __future__ import annotations

from zenml import Model, pipeline
from zenml.config import CachePolicy

from ecomcap.config_check import pipeline_input
from ecomcap.retrieval.config import RetrievalRunConfig
from ecomcap.retrieval.data.prepare import retrieval_source_fingerprint
from ecomcap.workflow import library_fingerprint
from steps.retrieval import (
    embed_gallery,
    retrieval_evaluate,
    retrieval_ingest,
    retrieval_promote,
    retrieval_train,
    retrieval_validate,
)

# `zenml pipeline run -c`: the YAML's parameters.config checked with one-line errors
CheckedConfig = pipeline_input(RetrievalRunConfig)

MODEL = Model(name="ecomcap-retriever", description="Chinese product search dual encoder + gallery index")


@pipeline(model=MODEL, enable_cache=True, cache_policy=CachePolicy(cache_func=library_fingerprint))
def retrieval_pipeline(config: CheckedConfig = RetrievalRunConfig()) -> None:  # noqa: B008
    train, valid = retrieval_ingest(config=config, source_fingerprint=retrieval_source_fingerprint(config.data))
    report = retrieval_validate(config=config, train=train, valid=valid)
    model = retrieval_train(config=config, train=train, valid=valid, after="retrieval_validate")
    gallery = embed_gallery(config=config, model=model, valid=valid)
    evaluation = retrieval_evaluate(config=config, gallery=gallery, valid=valid, train=train)
    retrieval_promote(config=config, gallery=gallery, evaluation=evaluation, valid=valid, validation_report=report)
