"""Thin ZenML steps: unpack the one run config, call `ecomcap`, return typed `Annotated` outputs."""
from steps.data import ingest, ingest_split_step, validate
from steps.evaluate import evaluate, promote
from steps.infer import champion_model, generate, generate_share, merge_generated, write_predictions
from steps.train import dpo, grounding, scst, sft

__all__ = ["ingest", "ingest_split_step", "validate", "sft", "scst", "dpo", "grounding", "generate", "evaluate", "promote",
           "champion_model", "write_predictions", "generate_share", "merge_generated"]
