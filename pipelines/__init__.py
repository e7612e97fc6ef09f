"""ZenML pipelines: `training_pipeline` and `batch_inference_pipeline` (thin wiring of `steps`)."""
