"""On the cluster every output lies on the mounted volume, so a retried pod resumes its run."""
from pathlib import Path

import pytest
import yaml

from ecomcap.config import load_run_config
from ecomcap.errors import EcomcapError
from ecomcap.paths import off_volume, path_settings, require_durable_paths

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "configs" / "k8s.yaml"


def pvc_mounts(pod_settings: dict) -> set[str]:
    """Mount paths of the pod's persistentVolumeClaim volumes (not emptyDir such as /dev/shm)."""
    pvcs = {v["name"] for v in pod_settings.get("volumes", []) if "persistentVolumeClaim" in v}
    return {m["mountPath"] for m in pod_settings.get("volume_mounts", []) if m["name"] in pvcs}


def test_k8s_paths_are_absolute_and_on_the_pvc_of_every_gpu_step():
    raw = yaml.safe_load(K8S.read_text())
    cfg = load_run_config(K8S)
    settings = path_settings(cfg)
    assert {"data.work_dir", "sft.output_dir", "scst.output_dir"} <= set(settings)
    for step in ("sft", "scst", "generate"):
        pod = raw["steps"][step]["settings"]["step_operator.kubernetes"]["pod_settings"]
        mounts = pvc_mounts(pod)
        assert mounts, step
        assert off_volume(cfg, mounts) == [], step
        assert any(Path(raw["environment"]["HF_HOME"]).is_relative_to(m) for m in mounts)  # weights once
        gpus = int(pod["resources"]["limits"]["nvidia.com/gpu"])
        assert cfg.launch.num_processes <= gpus, f"{step}: launch.num_processes > the pod's GPUs"


def test_relative_paths_are_found_and_refused_in_a_pod(monkeypatch):
    cfg = load_run_config(ROOT / "configs" / "local.yaml")
    assert "sft.output_dir: .run/sft" in off_volume(cfg, ["/data"])
    require_durable_paths(cfg)  # not in a pod: fine
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(EcomcapError, match="sft.output_dir: .run/sft"):
        require_durable_paths(cfg)
    require_durable_paths(load_run_config(K8S))
