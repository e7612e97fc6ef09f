"""Model loading, the tiny local model and fine-tuning strategies."""
