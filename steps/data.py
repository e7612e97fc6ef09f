"""Data steps: ingest (shards + quarantine) and validate (GX + bad-row gate)."""
from __future__ import annotations

from typing import Annotated

from zenml import step

from ecomcap.config import DataConfig, RunConfig
from ecomcap.workflow import ingest_stage, validate_stage
from materializers import DatasetDir
from steps._tracker import TRACKER


@step
def ingest(data: DataConfig, source_fingerprint: str) -> tuple[
    Annotated[DatasetDir, "train_data"], Annotated[DatasetDir, "valid_data"]
]:
    """`source_fingerprint` is only a cache key: new or changed raw files rerun ingest. Takes the
    data settings alone, so a change elsewhere in the run config reuses the ingested splits (and
    the steps that depend only on them, such as `grounding`)."""
    return DatasetDir(str(ingest_stage(data, "train"))), DatasetDir(str(ingest_stage(data, "valid")))


@step
def ingest_split_step(data: DataConfig, split: str, source_fingerprint: str) -> Annotated[DatasetDir, "dataset"]:
    return DatasetDir(str(ingest_stage(data, split)))


@step(experiment_tracker=TRACKER)
def validate(config: RunConfig, train: DatasetDir, valid: DatasetDir) -> Annotated[dict, "validation_report"]:
    from pathlib import Path

    return validate_stage({"train": Path(train.path), "valid": Path(valid.path)}, config)
