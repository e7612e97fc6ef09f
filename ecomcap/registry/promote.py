"""Captioning's promotion: merge the candidate, register it as a pyfunc, and run the shared gate.

The registry is checked for reachability before anything is written, so an unreachable MLflow
fails the step with a clear message and changes nothing.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from ecomcap.config import RunConfig
from ecomcap.errors import EcomcapError
from ecomcap.registry import tracking
from ecomcap.registry.gate import Decision, Gate, Scores
from ecomcap.registry.pyfunc import INFERENCE_FILE, as_recorded, export_merged, log_pyfunc
from ecomcap.registry.register import (
    TRAINED_AS,
    champion_version,
    download_version,
    register_and_gate,
    registry_client,
)

log = logging.getLogger(__name__)
__all__ = ["TRAINED_AS", "registry_client", "promote_stage", "champion_model_dir", "caption_scores"]


def _standalone(model_dir: Path) -> bool:
    """Full weights with their inference settings: what `export_merged` writes."""
    from ecomcap.modeling.load import read_output_marker

    return (model_dir / INFERENCE_FILE).is_file() and (read_output_marker(model_dir) or {}).get("kind") == "full"


def caption_scores(metrics: dict, eval_fp: str, cfg: RunConfig) -> Scores:
    """The gate's view of an evaluation: headline metrics and per-image primary scores."""
    names = [cfg.registry.primary_metric, *cfg.registry.guard_metrics]
    missing = [n for n in names if n not in metrics]
    if missing:
        raise EcomcapError(f"the gate guards {', '.join(missing)}, which this evaluation did not measure "
                           "(attr_mean needs data with attribute ground truth; cap2img_R1 needs grounding.enabled)")
    per_item = metrics.get("per_image", {})
    return Scores({n: float(metrics[n]) for n in names}, eval_fp,
                  {k: float(v[cfg.registry.primary_metric]) for k, v in per_item.items()} or None)


def reevaluator(cfg: RunConfig, valid: Path, eval_fp: str, grounding: Path | None = None):
    """Scores of a registered version on the current eval set, with the version's own recorded
    inference settings (prompt, decoding, pixels, dtype) on whatever device this step has (on
    Kubernetes, promote runs on a GPU pod for this: configs/k8s.yaml)."""
    def run(version: str) -> Scores:
        from ecomcap.workflow import evaluate_stage, generate_stage

        with tempfile.TemporaryDirectory(prefix="ecomcap-champion-") as tmp:
            model_dir = download_version(cfg.registry, version, INFERENCE_FILE, tmp)
            own = as_recorded(cfg, model_dir, device="auto", warn=False)
            preds = generate_stage(model_dir, valid, own, log=False)
            metrics, _, _ = evaluate_stage(preds, valid, own, log=False, grounding=grounding)
        return caption_scores(metrics, eval_fp, cfg)

    return run


def promote_stage(model_dir: Path, metrics: dict, eval_fp: str, valid: Path, cfg: RunConfig,
                  extra_tags: dict[str, str] | None = None, grounding: Path | None = None) -> Decision:
    """Merge (unless the scst step already did), register, then let the gate decide on `champion`."""
    Gate(registry_client(cfg.registry), cfg.registry).check_reachable()  # before the merge below
    trained_as = f"{(extra_tags or {}).get('source_fingerprint', '')}/{tracking.config_hash(cfg)}"
    tags = {"config_hash": tracking.config_hash(cfg), **(extra_tags or {})}

    def log_model(path: Path) -> str:
        return log_pyfunc(path).model_uri

    with tempfile.TemporaryDirectory(prefix="ecomcap-merged-") as tmp:
        from ecomcap.inference.rerank import with_grounding_scorer

        merged = model_dir if _standalone(model_dir) else \
            export_merged(model_dir, Path(tmp) / "model_dir", cfg.model, with_grounding_scorer(cfg.generate, grounding))
        inference = json.loads((merged / INFERENCE_FILE).read_text(encoding="utf-8"))
        return register_and_gate(
            cfg.registry, model_dir=merged, inference=inference, log_model=log_model,
            scores=caption_scores(metrics, eval_fp, cfg), reevaluate=reevaluator(cfg, valid, eval_fp, grounding),
            tags=tags, description="ecomcap: Chinese e-commerce captioner", trained_as=trained_as)


def champion_model_dir(cfg: RunConfig) -> Path:
    """Download the model behind the `champion` alias (for batch inference)."""
    return download_version(cfg.registry, champion_version(cfg.registry), INFERENCE_FILE)
