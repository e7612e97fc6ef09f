"""Register a candidate model and run the gate: the part of promotion both jobs share.

A job supplies its model directory, the inference settings that change its outputs, a function
that logs the directory as an MLflow model, its scores and a way to re-score a registered
version. Identical weights with identical inference settings are registered once; the version
remembers every (source fingerprint, config hash) pair it was produced by.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

import mlflow
from mlflow import MlflowClient

from ecomcap.config import RegistryConfig
from ecomcap.errors import EcomcapError
from ecomcap.registry import tracking
from ecomcap.registry.gate import Decision, Gate, Scores

log = logging.getLogger(__name__)
TRAINED_AS = "trained_as"  # "source_fingerprint/config_hash" pairs this version was produced by


def registry_client(cfg: RegistryConfig) -> MlflowClient:
    uri = cfg.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri) if uri else MlflowClient()


# run records, not model: where it was merged from, how it was trained, its curves, and the
# inference settings (hashed as a canonical dict instead)
RUN_SPECIFIC = {"ecomcap_model.json", "training_config.json", "metrics.jsonl", "inference.json"}


def weights_fingerprint(model_dir: str | Path, inference: dict) -> str:
    """Hash of the model files (weights, model/processor/tokenizer configs, chat template) and of
    the settings that change outputs.

    Nothing run-specific (paths, training configs, curves) goes in: the same weights with the
    same processor decoded the same way are the same version; other decoding is another version.
    """
    h = hashlib.sha256()
    root = Path(model_dir)
    if not any(root.rglob("*.safetensors")):
        raise EcomcapError(f"{root} holds no *.safetensors weights to register")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in RUN_SPECIFIC)
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    h.update(json.dumps(inference, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def download_version(cfg: RegistryConfig, version: str, marker: str, dst: str | Path | None = None) -> Path:
    """The model directory (the folder holding the file `marker`) inside a registered version."""
    try:
        # resolved by a client bound to cfg's registry: `models:/name/v` alone would use the global one
        source = registry_client(cfg).get_model_version_download_uri(cfg.model_name, version)
        root = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=source,
            dst_path=str(dst or tempfile.mkdtemp(prefix="ecomcap-version-")),
            tracking_uri=cfg.tracking_uri))
    except Exception as exc:  # MLflow raises many types for missing/corrupt artifacts
        raise EcomcapError(f"cannot download version {version} of '{cfg.model_name}': "
                           f"{str(exc).splitlines()[0]}") from None
    found = next(root.rglob(marker), None)
    if found is None:
        raise EcomcapError(f"registered version {version} of '{cfg.model_name}' holds no {marker}")
    return found.parent


def _ensure_registered_model(client: MlflowClient, name: str, description: str) -> None:
    if client.search_registered_models(filter_string=f"name='{name}'"):
        return
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:  # a concurrent first run created it: fine
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_and_gate(cfg: RegistryConfig, *, model_dir: Path, inference: dict,
                      log_model: Callable[[Path], str], scores: Scores,
                      reevaluate: Callable[[str], Scores] | None,
                      tags: dict[str, str] | None = None, description: str = "",
                      trained_as: str = "") -> Decision:
    """Register `model_dir` (or reuse the version with identical weights), then let the gate decide."""
    client = registry_client(cfg)
    gate = Gate(client, cfg)
    gate.check_reachable()
    name = cfg.model_name
    _ensure_registered_model(client, name, description)
    fingerprint = weights_fingerprint(model_dir, inference)
    same = [v for v in client.search_model_versions(f"name='{name}'")
            if (v.tags or {}).get("model_fingerprint") == fingerprint]
    started = None
    if mlflow.active_run() is None:  # outside a tracked pipeline run: open one for the model
        mlflow.set_experiment(cfg.experiment)
        started = mlflow.start_run(run_name="promote")
    try:
        tracking.log_metrics(scores.metrics)
        if same:  # a rerun of the same model: no duplicate version, remember this data/config too
            version = str(same[0].version)
            seen = [s for s in (same[0].tags or {}).get(TRAINED_AS, "").split(",") if s]
            if trained_as and trained_as not in seen:
                client.set_model_version_tag(name, version, TRAINED_AS, ",".join([*seen, trained_as][-40:]))
            log.info("promote: weights already registered as version %s", version)
        else:
            uri = log_model(model_dir)
            all_tags = {"code_version": tracking.code_version(), "model_fingerprint": fingerprint,
                        TRAINED_AS: trained_as, **(tags or {})}
            version = str(mlflow.register_model(uri, name, tags=all_tags).version)
        decision = gate.evaluate_and_promote(version, scores, reevaluate=reevaluate)
        log_decision(decision)
    finally:
        if started is not None:
            mlflow.end_run()
    return decision


def log_decision(decision: Decision) -> None:
    """gate.* tags, the gain interval as metrics, and gate_decision.txt on the active run."""
    tracking.set_tags({"gate.decision": "promoted" if decision.promote else "rejected",
                       "gate.candidate_version": decision.candidate_version,
                       "gate.champion_after": str(decision.champion_after)})
    text = decision.text()
    if decision.interval:
        iv = decision.interval
        tracking.log_metrics({"rel_gain": iv["gain"], "rel_gain_low": iv["low"], "rel_gain_high": iv["high"]},
                             prefix="gate.")
        text += (f"\n\nbootstrap: {iv['resamples']} paired resamples of {iv['items']} items, "
                 f"{iv['confidence']:.0%} interval of the relative gain [{iv['low']:+.4f}, {iv['high']:+.4f}], "
                 f"point {iv['gain']:+.4f}")
    tracking.log_text(text + "\n", "gate_decision.txt")


def champion_version(cfg: RegistryConfig) -> str:
    """The version behind the `champion` alias; a clear error when there is none."""
    gate = Gate(registry_client(cfg), cfg)
    gate.check_reachable()
    champ = gate.champion()
    if champ is None:
        raise EcomcapError(f"registered model '{cfg.model_name}' has no champion yet: "
                           "run the training pipeline first")
    return str(champ.version)
