"""Register the candidate and run the promotion gate (the pipeline's last stage).

The registry is checked for reachability before anything is written, so an unreachable MLflow
fails the step with a clear message and changes nothing.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from ecomcap.config import RunConfig
from ecomcap.registry import tracking
from ecomcap.registry.gate import Decision, Gate, Scores
from ecomcap.registry.pyfunc import INFERENCE_FILE, export_merged, log_pyfunc

log = logging.getLogger(__name__)
TRAINED_AS = "trained_as"  # "source_fingerprint/config_hash" pairs this version was produced by


def registry_client(cfg: RunConfig) -> MlflowClient:
    uri = cfg.registry.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri) if uri else MlflowClient()


def _standalone(model_dir: Path) -> bool:
    """Full weights with their inference settings: what `export_merged` writes."""
    from ecomcap.modeling.load import read_output_marker

    return (model_dir / INFERENCE_FILE).is_file() and (read_output_marker(model_dir) or {}).get("kind") == "full"


def model_fingerprint(model_dir: str | Path) -> str:
    """Content hash of a trained output's weights and configs (same weights -> same version)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json") and p.name != "training_config.json":
            h.update(p.relative_to(root).as_posix().encode())
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:24]


def download_model_dir(name: str, version: str, dst: str | Path | None = None) -> Path:
    """The merged model directory inside a registered pyfunc version (downloaded under `dst`)."""
    from ecomcap.errors import EcomcapError

    try:
        root = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(dst or tempfile.mkdtemp(prefix="ecomcap-champion-"))))
    except Exception as exc:  # MLflow raises many types for missing/corrupt artifacts
        raise EcomcapError(f"cannot download version {version} of '{name}': {str(exc).splitlines()[0]}") from None
    found = next(root.rglob(INFERENCE_FILE), None)
    if found is None:
        raise EcomcapError(f"registered version {version} of '{name}' holds no ecomcap model directory")
    return found.parent


def reevaluator(cfg: RunConfig, valid: Path, eval_fp: str):
    """Scores of a registered version on the current eval set (same decoding as the candidate)."""
    def run(version: str) -> Scores:
        import json

        from ecomcap.config import GenerateConfig
        from ecomcap.workflow import evaluate_stage, generate_stage

        with tempfile.TemporaryDirectory(prefix="ecomcap-champion-") as tmp:
            model_dir = download_model_dir(cfg.registry.model_name, version, tmp)
            # the champion is scored with its own prompt and decoding, not the candidate's
            info = json.loads((model_dir / INFERENCE_FILE).read_text(encoding="utf-8"))
            own = cfg.model_copy(update={
                "model": cfg.model.model_copy(update={"prompt": info["prompt"]}),
                "generate": GenerateConfig.model_validate(info["generate"])})
            preds = generate_stage(model_dir, valid, own, log=False)
            metrics, _, _ = evaluate_stage(preds, valid, own, log=False)
        return Scores.from_metrics(metrics, eval_fp)

    return run


def promote_stage(model_dir: Path, metrics: dict, eval_fp: str, valid: Path, cfg: RunConfig,
                  extra_tags: dict[str, str] | None = None) -> Decision:
    """Log + register the candidate, then let the gate decide on `champion`."""
    client = registry_client(cfg)
    gate = Gate(client, cfg.registry)
    gate.check_reachable()
    name = cfg.registry.model_name
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(name, description="ecomcap: Chinese e-commerce captioner")
        except MlflowException as exc:  # a concurrent first run created it: fine
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    fingerprint = model_fingerprint(model_dir)
    same = [v for v in client.search_model_versions(f"name='{name}'")
            if (v.tags or {}).get("model_fingerprint") == fingerprint]
    started = None
    if mlflow.active_run() is None:  # outside a tracked pipeline run: open one for the model
        mlflow.set_experiment(cfg.registry.experiment)
        started = mlflow.start_run(run_name="promote")
    try:
        tracking.log_metrics({k: metrics[k] for k in tracking.HEADLINE if k in metrics})
        trained_as = f"{(extra_tags or {}).get('source_fingerprint', '')}/{tracking.config_hash(cfg)}"
        if same:  # a rerun of the same model: no duplicate version, remember this data/config too
            version = str(same[0].version)
            seen = (same[0].tags or {}).get(TRAINED_AS, "").split(",")
            if trained_as not in seen:
                client.set_model_version_tag(name, version, TRAINED_AS, ",".join([*seen, trained_as][-40:]).strip(","))
            log.info("promote: weights already registered as version %s", version)
        else:
            if _standalone(model_dir):  # the scst step already merged it: log as it is
                info = log_pyfunc(model_dir)
            else:
                with tempfile.TemporaryDirectory(prefix="ecomcap-merged-") as tmp:  # MLflow keeps a copy
                    info = log_pyfunc(export_merged(model_dir, Path(tmp) / "model_dir", cfg.model, cfg.generate))
            tags = {"code_version": tracking.code_version(), "config_hash": tracking.config_hash(cfg),
                    "model_fingerprint": fingerprint, TRAINED_AS: trained_as, **(extra_tags or {})}
            version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
        decision = gate.evaluate_and_promote(version, Scores.from_metrics(metrics, eval_fp),
                                             reevaluate=reevaluator(cfg, valid, eval_fp))
        tracking.set_tags({"gate.decision": "promoted" if decision.promote else "rejected",
                           "gate.candidate_version": str(version),
                           "gate.champion_after": str(decision.champion_after)})
        tracking.log_text(decision.text(), "gate_decision.txt")
    finally:
        if started is not None:
            mlflow.end_run()
    return decision


def champion_model_dir(cfg: RunConfig) -> Path:
    """Download the model behind the `champion` alias (for batch inference)."""
    from ecomcap.errors import EcomcapError

    client = registry_client(cfg)
    gate = Gate(client, cfg.registry)
    gate.check_reachable()
    champ = gate.champion()
    if champ is None:
        raise EcomcapError(f"registered model '{cfg.registry.model_name}' has no champion yet: "
                           "run the training pipeline first")
    return download_model_dir(cfg.registry.model_name, champ.version)
