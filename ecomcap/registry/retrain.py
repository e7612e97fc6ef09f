"""`ecomcap retrain`: run the training pipeline when data or config changed.

CI calls it on a schedule and on pushes. With --if-changed it looks for a registered version
trained on the same source fingerprint and config hash (promoted or not: a rejected candidate
must not trigger the same training every night) and says why it does or does not retrain.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ecomcap import stores
from ecomcap.config import load_run_config
from ecomcap.registry import tracking
from ecomcap.registry.gate import Gate
from ecomcap.workflow import source_fingerprint


@dataclass
class RetrainPlan:
    run: bool
    reason: str
    source_fingerprint: str
    config_hash: str


def plan(config_path: str | Path, if_changed: bool) -> RetrainPlan:
    from ecomcap.registry.register import TRAINED_AS, registry_client

    cfg = load_run_config(config_path)
    src, chash = source_fingerprint(cfg.data), tracking.config_hash(cfg)
    if not if_changed:
        return RetrainPlan(True, "retraining unconditionally (no --if-changed)", src, chash)
    uri = stores.tracking_uri(config=cfg.registry.tracking_uri, must_exist=False)
    if uri is None and stores.find_checkout() is not None:
        return RetrainPlan(True, "no MLflow store in this checkout yet", src, chash)
    reg = cfg.registry.model_copy(update={"tracking_uri": uri})
    client = registry_client(reg)
    Gate(client, reg).check_reachable()
    name = reg.model_name
    versions = client.search_model_versions(f"name='{name}'") if client.search_registered_models(
        filter_string=f"name='{name}'") else []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = v.tags or {}
        if f"{src}/{chash}" in tags.get(TRAINED_AS, "").split(","):
            return RetrainPlan(False, f"data {src} and config {chash} were already trained as version "
                                      f"{v.version} (gate: {tags.get('gate_decision', 'n/a')}): nothing to do",
                               src, chash)
    latest = max(versions, key=lambda v: int(v.version), default=None)
    if latest is None:
        return RetrainPlan(True, f"no version of '{name}' yet", src, chash)
    tags = latest.tags or {}
    changed = [what for what, mine, theirs in (("data", src, tags.get("source_fingerprint")),
                                               ("config", chash, tags.get("config_hash"))) if mine != theirs]
    return RetrainPlan(True, f"{' and '.join(changed)} changed since version {latest.version}", src, chash)


def retrain(config_path: str | Path, if_changed: bool) -> int:
    p = plan(config_path, if_changed)
    print(f"retrain: {p.reason}", flush=True)
    if not p.run:
        return 0
    cmd = [str(Path(sys.executable).with_name("zenml")), "pipeline", "run",
           "pipelines.training.training_pipeline", "-c", str(config_path)]
    print("retrain: " + " ".join(cmd), flush=True)
    # the checkout's ZenML state when `make` set it up (as scripts/zenml_env.sh does for `make run`)
    return subprocess.call(cmd, env={**os.environ, "ZENML_ANALYTICS_OPT_IN": "false", **stores.zenml_env()})
