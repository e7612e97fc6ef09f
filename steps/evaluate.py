"""Evaluate the candidate on the validation set, then the registry promotion gate."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from zenml import get_step_context, step

from ecomcap.config import RunConfig
from ecomcap.workflow import evaluate_stage
from materializers import DatasetDir, EvaluationReport, ModelDir
from steps._tracker import TRACKER


@step(experiment_tracker=TRACKER)
def evaluate(config: RunConfig, predictions: dict, valid: DatasetDir, sft_model: ModelDir,
             model: ModelDir, grounding: ModelDir | None = None,
             scst_model: ModelDir | None = None) -> Annotated[EvaluationReport, "evaluation"]:
    """`scst_model`: SCST's output when DPO made `model` from it (each stage's curve is drawn)."""
    curves = {"sft": sft_model.metrics_log()}  # each stage that ran, by the config (artifact paths always differ)
    scst_ran = config.scst.enabled and config.scst.max_steps > 0
    dpo_ran = config.dpo.enabled and config.dpo.max_steps > 0
    if scst_ran:
        curves["scst"] = (scst_model if dpo_ran and scst_model is not None else model).metrics_log()
    if dpo_ran:
        curves["dpo"] = model.metrics_log()
    metrics, eval_fp, html = evaluate_stage(predictions, Path(valid.path), config, curves,
                                            grounding=Path(grounding.path) if grounding else None)
    return EvaluationReport(metrics, eval_fp, html)


@step(experiment_tracker=TRACKER, enable_cache=False)
def promote(config: RunConfig, model: ModelDir, evaluation: EvaluationReport, valid: DatasetDir,
            validation_report: dict, grounding: ModelDir | None = None) -> Annotated[dict, "gate_decision"]:
    """Register the candidate; `champion` (and the ZenML model stage) move only if the gate passes."""
    from ecomcap.registry.promote import promote_stage
    from ecomcap.workflow import data_fingerprint, source_fingerprint

    tags = {"data_fingerprint": data_fingerprint({s: r["fingerprint"] for s, r in validation_report.items()}),
            "source_fingerprint": source_fingerprint(config.data)}
    decision = promote_stage(Path(model.path), evaluation.metrics, evaluation.eval_fingerprint,
                             Path(valid.path), config, tags, grounding=Path(grounding.path) if grounding else None)
    if decision.promote:
        get_step_context().model.set_stage("production", force=True)
    return {"promote": decision.promote, "reasons": decision.reasons,
            "candidate_version": decision.candidate_version, "champion_after": decision.champion_after}
