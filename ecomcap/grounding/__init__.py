"""Captions that see: the retrieval job's image–text encoder, trained on the caption train split,
scores captions (CLIP-S, distinctiveness) for the SCST reward and beam reranking; a second,
independently trained encoder only evaluates (caption->image Recall@K), so no stage is judged by
the scorer it optimised against."""
