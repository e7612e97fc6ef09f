"""Directory materializers for the retrieval pipeline (the same copy-as-is storage as datasets)."""
from __future__ import annotations

import json
import os
from typing import Any, ClassVar

from zenml.enums import ArtifactType, VisualizationType

from materializers.artifacts import GalleryDir, RetrievalDataDir
from materializers.directory import _DirMaterializer, save_report_view


class RetrievalDataDirMaterializer(_DirMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple] = (RetrievalDataDir,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def extract_metadata(self, data: RetrievalDataDir) -> dict[str, Any]:
        r = data.report
        out = {"split": r["split"], "format": r["format"], "fingerprint": r["fingerprint"], "groups": r["groups"]}
        for table in ("items", "queries"):
            if table in r:
                out.update({f"{table}_{k}": r[table][k] for k in ("rows_in", "rows_ok", "rows_quarantined")})
        return out

    def save_visualizations(self, data: RetrievalDataDir) -> dict[str, VisualizationType]:
        return save_report_view(self.uri, data.report)


class GalleryDirMaterializer(_DirMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple] = (GalleryDir,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def extract_metadata(self, data: GalleryDir) -> dict[str, Any]:
        with open(os.path.join(data.path, "index.json"), encoding="utf-8") as fh:
            return json.load(fh)
