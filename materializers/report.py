"""Evaluation report materializer: metrics as JSON, samples as an HTML page in the dashboard."""
from __future__ import annotations

import json
import os
from typing import Any, ClassVar

from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from materializers.artifacts import EvaluationReport


class EvaluationReportMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple] = (EvaluationReport,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def load(self, data_type: type) -> EvaluationReport:
        with fileio.open(os.path.join(self.uri, "report.json"), "r") as fh:
            data = json.loads(fh.read())
        html = ""
        if fileio.exists(os.path.join(self.uri, "samples.html")):
            with fileio.open(os.path.join(self.uri, "samples.html"), "r") as fh:
                html = fh.read()
        return EvaluationReport(data["metrics"], data["eval_fingerprint"], html, data.get("details", {}))

    def save(self, data: EvaluationReport) -> None:
        with fileio.open(os.path.join(self.uri, "report.json"), "w") as fh:
            fh.write(json.dumps({"metrics": data.metrics, "eval_fingerprint": data.eval_fingerprint,
                                 "details": data.details}, ensure_ascii=False, indent=2))
        with fileio.open(os.path.join(self.uri, "samples.html"), "w") as fh:
            fh.write(data.samples_html)

    def save_visualizations(self, data: EvaluationReport) -> dict[str, VisualizationType]:
        return {os.path.join(self.uri, "samples.html"): VisualizationType.HTML}

    def extract_metadata(self, data: EvaluationReport) -> dict[str, Any]:
        return {k: v for k, v in data.metrics.items() if isinstance(v, (int, float))}
