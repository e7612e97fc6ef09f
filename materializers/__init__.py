"""ZenML materializers: Parquet dataset directory, model directory, evaluation report (HTML)."""
from materializers.artifacts import DatasetDir, EvaluationReport, ModelDir
from materializers.directory import DatasetDirMaterializer, ModelDirMaterializer
from materializers.report import EvaluationReportMaterializer

__all__ = [
    "DatasetDir", "ModelDir", "EvaluationReport",
    "DatasetDirMaterializer", "ModelDirMaterializer", "EvaluationReportMaterializer",
]
