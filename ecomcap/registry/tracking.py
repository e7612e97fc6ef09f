"""MLflow tracking helpers: params from the run config, a metrics callback for the training
loops, fingerprint/code tags. Every helper is a no-op without an active MLflow run, so the
library runs the same with or without a tracker."""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
from pydantic import BaseModel

from ecomcap.config import SPEED_ONLY
from ecomcap.errors import EcomcapError

log = logging.getLogger(__name__)

MAX_PARAMS_PER_CALL = 100
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
# Final validation metrics, logged unprefixed so they sort to the top of MLflow's tables.
HEADLINE = ("CIDEr-D", "BLEU-4", "ROUGE-L")


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"} with MLflow-sized string values."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(data, ensure_ascii=False) if not isinstance(data, str) else data
    return {k: v[:6000] for k, v in out.items()}


def config_hash(cfg: BaseModel) -> str:
    """What `retrain --if-changed` compares and versions are tagged with: the config minus the
    settings that only change speed (tuning those must not retrain or look like another model)."""
    data = cfg.model_dump(mode="json", exclude=SPEED_ONLY)  # sections a config lacks are ignored
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def code_version() -> str:
    """The git commit of the checkout (with "+dirty"), else the package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"ecomcap-{version('ecomcap')}"


def active() -> bool:
    return mlflow.active_run() is not None


def log_params(params: dict[str, str]) -> None:
    if not active():
        return
    existing = mlflow.active_run().data.params
    fresh = {k: v for k, v in params.items() if k not in existing}
    items = list(fresh.items())
    for i in range(0, len(items), MAX_PARAMS_PER_CALL):
        mlflow.log_params(dict(items[i : i + MAX_PARAMS_PER_CALL]))


def log_config(section: str, cfg: BaseModel) -> None:
    """Log one config section as params "section.key...."."""
    log_params(flatten(cfg, f"{section}."))


class StepMetrics:
    """Per-step training metrics for an MLflow run (default: the active one), stored `every` steps
    in one batch: a synchronous SQLite write costs ~5 ms, i.e. ~5 s of a 950-step first run if
    done per step. Each row keeps the time it was logged at. A store that fails once (a network
    hiccup, a locked database) is logged and the unsent metrics wait for the next write; one that
    fails `max_failures` writes in a row fails the stage. A killed process loses at most the last
    `every - 1` steps (the stage's metrics.jsonl has them all). The loop flushes before each
    checkpoint, at the end of a stage and when a stage fails."""

    def __init__(self, every: int = 25, run_id: str | None = None, max_failures: int = 3):
        run = mlflow.active_run()
        if run_id is None and run is None:
            raise EcomcapError("StepMetrics needs an MLflow run: start one or pass run_id")
        self.every, self.run_id, self.max_failures = every, run_id or run.info.run_id, max_failures
        self.client = mlflow.MlflowClient()
        self._rows: list[tuple[dict[str, float], int, int]] = []
        self._unsent: list = []  # metrics a failed write left behind
        self._failures = 0

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self._rows.append((metrics, step, int(time.time() * 1000)))
        if len(self._rows) >= self.every:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Store what is held; `final` (the stage's last write) retries a failed write, 2 s apart,
        until it succeeds or `max_failures` in a row have failed (then raises)."""
        from mlflow.entities import Metric

        self._unsent += [Metric(k.replace("/", "."), float(v), at, step) for metrics, step, at in self._rows
                         for k, v in metrics.items()]
        self._rows = []
        while self._unsent:
            try:
                self.client.log_batch(self.run_id, metrics=self._unsent[:MAX_METRICS_PER_BATCH])
            except Exception as exc:
                self._failures += 1
                if self._failures >= self.max_failures:
                    raise
                log.warning("MLflow did not store %d step metrics (%s: %s); kept for the next write (%d/%d failed "
                            "writes in a row)", len(self._unsent), type(exc).__name__, str(exc).splitlines()[0][:200],
                            self._failures, self.max_failures)
                if not final:
                    return
                time.sleep(2)
                continue
            self._unsent = self._unsent[MAX_METRICS_PER_BATCH:]
            self._failures = 0


def metrics_callback() -> StepMetrics | None:
    """For `run_sft` / `run_scst`: forwards per-step metrics to the active MLflow run."""
    return StepMetrics() if active() else None


def set_tags(tags: dict[str, str]) -> None:
    if active():
        mlflow.set_tags(tags)


def log_metrics(metrics: dict[str, Any], prefix: str = "") -> None:
    if active():
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if active() and Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path)


def log_text(text: str, name: str) -> None:
    if active():
        mlflow.log_text(text, name)


# MLflow stores a dataset digest in a 36-character column.
MLFLOW_DIGEST_CHARS = 36


def log_dataset(name: str, fingerprint: str, source: str | Path, context: str,
                tags: dict[str, Any] | None = None) -> None:
    """Record a dataset the run used (MLflow's Datasets column and the run's inputs): digest = the
    data fingerprint (cut to MLflow's 36 characters; the full one is an input tag), source = where
    the data lies (local path or object-store URI). Shared by the captioning and retrieval jobs."""
    if not active():
        return
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    if not fingerprint:
        raise ValueError(f"dataset {name!r}: an empty fingerprint cannot identify the data")
    try:
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            src = resolve_dataset_source(str(source))
    except MlflowException:  # not a path/URI MLflow knows (e.g. "synthetic"): keep it as a tag
        src = CodeDatasetSource({"source": str(source)})
    input_tags = {"fingerprint": fingerprint, **{k: str(v) for k, v in (tags or {}).items()}}
    mlflow.log_input(MetaDataset(src, name=name, digest=fingerprint[:MLFLOW_DIGEST_CHARS]),
                     context=context, tags=input_tags)


def last_run_summary(tracking_uri: str, experiment: str = "training_pipeline") -> dict[str, Any] | None:
    """Metrics and gate decision of the newest run of an experiment (for the end of `make run`)."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    r = runs[0]
    return {"run": r.info.run_name, "run_id": r.info.run_id, "experiment_id": exp.experiment_id,
            "artifact_uri": r.info.artifact_uri,
            "metrics": {k: v for k, v in r.data.metrics.items() if k in HEADLINE or k.startswith(("val.", "data.", "gate."))},
            "gate": {k: v for k, v in r.data.tags.items() if k.startswith("gate.")}}
