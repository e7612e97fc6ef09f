"""ingest(test) -> generate with the registry's `champion` -> caption_gen.jsonl.

    zenml pipeline run pipelines.inference.batch_inference_pipeline -c configs/local.yaml
"""
from __future__ import annotations

from zenml import pipeline
from zenml.config import CachePolicy

from ecomcap.config import RunConfig
from ecomcap.workflow import library_fingerprint, source_fingerprint
from steps import champion_model, generate, ingest_split_step, write_predictions


@pipeline(enable_cache=True, cache_policy=CachePolicy(cache_func=library_fingerprint))
def batch_inference_pipeline(config: RunConfig = RunConfig(), output: str = ".run/caption_gen.jsonl") -> None:  # noqa: B008
    test = ingest_split_step(config=config, split="test", source_fingerprint=source_fingerprint(config.data))
    model = champion_model(config=config)
    predictions = generate(config=config, model=model, data=test)
    write_predictions(config=config, predictions=predictions, output=output)
