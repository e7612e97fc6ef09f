"""Materializers that store a directory (dataset shards, model weights) as it is.

No pickling of images or weights: the directory is copied into the artifact store and read back
in place on a local store, or downloaded to a temporary directory from a remote one.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, ClassVar

from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from materializers.artifacts import DatasetDir, ModelDir


def _copy_tree(src: str, dst: str) -> None:
    for root, _, files in fileio.walk(src):
        root = str(root)
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else os.path.join(dst, rel)
        fileio.makedirs(target)
        for name in files:
            fileio.copy(os.path.join(root, str(name)), os.path.join(target, str(name)), overwrite=True)


def save_report_view(uri: str, report: dict) -> dict[str, VisualizationType]:
    """An ingest report as the dashboard's JSON view (both jobs' dataset artifacts)."""
    path = os.path.join(uri, "report_view.json")
    with fileio.open(path, "w") as fh:
        fh.write(json.dumps(report, ensure_ascii=False, indent=2))
    return {path: VisualizationType.JSON}


class _DirMaterializer(BaseMaterializer):
    SKIP_REGISTRATION: ClassVar[bool] = True

    def _local_path(self) -> str:
        if self.artifact_store.config.is_local:
            return self.uri
        tmp = tempfile.mkdtemp(prefix="ecomcap-artifact-")
        _copy_tree(self.uri, tmp)
        return tmp

    def save(self, data: Any) -> None:
        _copy_tree(data.path, self.uri)

    def load(self, data_type: type) -> Any:
        return data_type(self._local_path())


class DatasetDirMaterializer(_DirMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple] = (DatasetDir,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def extract_metadata(self, data: DatasetDir) -> dict[str, Any]:
        r = data.report
        return {k: r[k] for k in ("split", "rows_in", "rows_ok", "rows_quarantined", "bad_rate", "fingerprint")}

    def save_visualizations(self, data: DatasetDir) -> dict[str, VisualizationType]:
        return save_report_view(self.uri, data.report)


class ModelDirMaterializer(_DirMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple] = (ModelDir,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def extract_metadata(self, data: ModelDir) -> dict[str, Any]:
        from ecomcap.modeling.load import read_output_marker

        return {k: str(v) for k, v in (read_output_marker(data.path) or {}).items()}
