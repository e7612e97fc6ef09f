"""ZenML materializers: Parquet dataset directory, model directory, evaluation report (HTML)."""
from materializers.artifacts import (
    DatasetDir,
    EvaluationReport,
    GalleryDir,
    ModelDir,
    RetrievalDataDir,
)
from materializers.directory import DatasetDirMaterializer, ModelDirMaterializer
from materializers.report import EvaluationReportMaterializer
from materializers.retrieval import GalleryDirMaterializer, RetrievalDataDirMaterializer

__all__ = [
    "DatasetDir", "ModelDir", "EvaluationReport", "RetrievalDataDir", "GalleryDir",
    "RetrievalDataDirMaterializer", "GalleryDirMaterializer",
    "DatasetDirMaterializer", "ModelDirMaterializer", "EvaluationReportMaterializer",
]
