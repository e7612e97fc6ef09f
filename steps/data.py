"""Data steps: ingest (shards + quarantine) and validate (GX + bad-row gate)."""
from __future__ import annotations

from typing import Annotated

from zenml import step

from ecomcap.config import RunConfig
from ecomcap.workflow import ingest_stage, validate_stage
from materializers import DatasetDir
from steps._tracker import TRACKER


@step
def ingest(config: RunConfig, source_fingerprint: str) -> tuple[
    Annotated[DatasetDir, "train_data"], Annotated[DatasetDir, "valid_data"]
]:
    """`source_fingerprint` is only a cache key: new or changed raw files rerun ingest."""
    return DatasetDir(str(ingest_stage(config, "train"))), DatasetDir(str(ingest_stage(config, "valid")))


@step
def ingest_split_step(config: RunConfig, split: str, source_fingerprint: str) -> Annotated[DatasetDir, "dataset"]:
    return DatasetDir(str(ingest_stage(config, split)))


@step(experiment_tracker=TRACKER)
def validate(config: RunConfig, train: DatasetDir, valid: DatasetDir) -> Annotated[dict, "validation_report"]:
    from pathlib import Path

    return validate_stage({"train": Path(train.path), "valid": Path(valid.path)}, config)
