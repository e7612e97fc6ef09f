"""The artifact types the pipeline passes between steps (paths, not pickles)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DatasetDir:
    """An ingested split: ``shards/*.parquet`` + ``quarantine.parquet`` + ``report.json``."""

    path: str

    @property
    def report(self) -> dict[str, Any]:
        from ecomcap.data.shards import read_report

        return read_report(self.path)


@dataclass(frozen=True)
class ModelDir:
    """A trained model directory (safetensors + processor + ecomcap_model.json + configs)."""

    path: str

    def metrics_log(self) -> Path:
        return Path(self.path) / "metrics.jsonl"


@dataclass
class EvaluationReport:
    """Validation metrics of one model on one eval set, with samples to look at."""

    metrics: dict[str, Any]
    eval_fingerprint: str
    samples_html: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrievalDataDir:
    """An ingested retrieval split: ``items/`` shard dataset, ``queries.parquet``, ``groups.parquet``,
    the two quarantine tables and ``report.json``."""

    path: str

    @property
    def report(self) -> dict[str, Any]:
        import json

        return json.loads((Path(self.path) / "report.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class GalleryDir:
    """A gallery embedding artifact (vectors.npy, items.jsonl, images.parquet, encoder/, index.json)."""

    path: str

    @property
    def index(self) -> dict[str, Any]:
        import json

        return json.loads((Path(self.path) / "index.json").read_text(encoding="utf-8"))
