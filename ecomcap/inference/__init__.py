"""Batched caption generation and post-processing."""
