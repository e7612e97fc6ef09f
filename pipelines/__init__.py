"""ZenML pipelines (training_pipeline, batch_inference_pipeline): thin wiring of `steps`.

Filled by the pipeline issue; the library they call lives in `ecomcap`.
"""
