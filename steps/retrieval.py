"""Thin ZenML steps of the retrieval pipeline: unpack the run config, call `ecomcap.retrieval`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from zenml import step

from ecomcap.retrieval import workflow as wf
from ecomcap.retrieval.config import RetrievalRunConfig
from materializers import EvaluationReport, GalleryDir, ModelDir, RetrievalDataDir
from steps._tracker import TRACKER, run_name


@step
def retrieval_ingest(config: RetrievalRunConfig, source_fingerprint: str) -> tuple[
    Annotated[RetrievalDataDir, "retrieval_train_data"], Annotated[RetrievalDataDir, "retrieval_valid_data"]
]:
    """`source_fingerprint` is only a cache key: new or changed raw files rerun ingest."""
    return (RetrievalDataDir(str(wf.ingest_stage(config, "train"))),
            RetrievalDataDir(str(wf.ingest_stage(config, "valid"))))


@step(experiment_tracker=TRACKER)
def retrieval_validate(config: RetrievalRunConfig, train: RetrievalDataDir,
                       valid: RetrievalDataDir) -> Annotated[dict, "retrieval_validation_report"]:
    return wf.validate_stage({"train": Path(train.path), "valid": Path(valid.path)}, config)


@step(experiment_tracker=TRACKER)
def retrieval_train(config: RetrievalRunConfig, train: RetrievalDataDir,
                    valid: RetrievalDataDir) -> Annotated[ModelDir, "retriever"]:
    return ModelDir(str(wf.train_stage(Path(train.path), Path(valid.path), config, run_name())))


@step(experiment_tracker=TRACKER)
def embed_gallery(config: RetrievalRunConfig, model: ModelDir, valid: RetrievalDataDir) -> Annotated[GalleryDir, "gallery"]:
    return GalleryDir(str(wf.embed_stage(Path(model.path), Path(valid.path), config)))


@step(experiment_tracker=TRACKER)
def retrieval_evaluate(config: RetrievalRunConfig, gallery: GalleryDir, valid: RetrievalDataDir,
                       train: RetrievalDataDir) -> Annotated[EvaluationReport, "retrieval_evaluation"]:
    metrics, eval_fp, html = wf.evaluate_stage(Path(gallery.path), Path(valid.path), Path(train.path), config)
    return EvaluationReport(metrics, eval_fp, html)


@step(experiment_tracker=TRACKER, enable_cache=False)
def retrieval_promote(config: RetrievalRunConfig, gallery: GalleryDir, evaluation: EvaluationReport,
                      valid: RetrievalDataDir, validation_report: dict) -> Annotated[dict, "retrieval_gate_decision"]:
    """Register encoder + index as one model version; `champion` moves only if the gate passes."""
    from zenml import get_step_context

    from ecomcap.retrieval.data.prepare import retrieval_source_fingerprint
    from ecomcap.retrieval.evaluate.promote import promote_retriever

    tags = {"data_fingerprint": "|".join(r["fingerprint"][:16] for r in validation_report.values()),
            "source_fingerprint": retrieval_source_fingerprint(config.data)}
    decision = promote_retriever(Path(gallery.path), Path(valid.path), evaluation.metrics,
                                 evaluation.eval_fingerprint, config, tags)
    if decision.promote:
        get_step_context().model.set_stage("production", force=True)
    return {"promote": decision.promote, "reasons": decision.reasons,
            "candidate_version": decision.candidate_version, "champion_after": decision.champion_after}
