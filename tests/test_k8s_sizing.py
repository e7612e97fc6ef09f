"""A GPU step's pod holds its training processes: per process ~12 Gi of host memory, 5 CPUs (the
rank and its 4 DataLoader workers) and 2 Gi of /dev/shm (counted against the memory limit), and the
namespace quota admits its GPUs. Checked for the shipped one-GPU pods, for the 8-GPU block that
docs/kubernetes.md gives, and against the shipped pod given 8 GPUs (it does not fit)."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PER_PROCESS = {"memory_gi": 12, "cpu": 5, "shm_gi": 2}


def _gi(q: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi|Ti)", str(q))
    assert m, q
    return float(m.group(1)) * units[m.group(2)]


def sizing_problems(resources: dict, shm: str, quota_gpus: int) -> list[str]:
    limits, requests = resources["limits"], resources["requests"]
    gpus = int(limits["nvidia.com/gpu"])
    problems = []
    if int(requests["nvidia.com/gpu"]) != gpus:
        problems.append("GPU requests != limits")
    if gpus > quota_gpus:
        problems.append(f"{gpus} GPUs > the namespace quota {quota_gpus}")
    if _gi(limits["memory"]) < gpus * PER_PROCESS["memory_gi"] + _gi(shm):
        problems.append(f"memory limit {limits['memory']} < {gpus} x {PER_PROCESS['memory_gi']} Gi + /dev/shm {shm}")
    if float(limits["cpu"]) < gpus * PER_PROCESS["cpu"]:
        problems.append(f"CPU limit {limits['cpu']} < {gpus} x {PER_PROCESS['cpu']}")
    if _gi(shm) < gpus * PER_PROCESS["shm_gi"]:
        problems.append(f"/dev/shm {shm} < {gpus} x {PER_PROCESS['shm_gi']} Gi")
    return problems


def _quota() -> int:
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "limits.yaml").read_text()))
    quota = next(d for d in docs if d and d.get("kind") == "ResourceQuota")
    return int(quota["spec"]["hard"]["requests.nvidia.com/gpu"])


def _shipped_pod() -> tuple[dict, str]:
    raw = yaml.safe_load((ROOT / "configs" / "k8s.yaml").read_text())
    pod = raw["steps"]["sft"]["settings"]["step_operator.kubernetes"]["pod_settings"]
    shm = next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm")
    return pod["resources"], shm


def test_the_shipped_one_gpu_pods_fit():
    resources, shm = _shipped_pod()
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert sizing_problems(resources, shm, _quota()) == []


def test_the_documented_8_gpu_block_fits_and_the_quota_admits_it():
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    block = re.search(r"```yaml\n\s*# 8 GPUs\n(.*?)```", text, re.S)
    assert block, "docs/kubernetes.md lost its 8-GPU block"
    doc = yaml.safe_load("\n".join(line[2:] if line.startswith("  ") else line for line in block.group(1).splitlines()))
    assert int(doc["resources"]["limits"]["nvidia.com/gpu"]) == 8
    assert sizing_problems(doc["resources"], doc["dshm_size_limit"], _quota()) == []


def test_the_shipped_pod_given_8_gpus_does_not_fit():
    resources, shm = _shipped_pod()
    eight = {k: {**v, "nvidia.com/gpu": "8"} for k, v in resources.items()}
    problems = sizing_problems(eight, shm, _quota())
    assert any("memory limit" in p for p in problems) and any("CPU limit" in p for p in problems)
    assert sizing_problems(eight, shm, 4)[0].startswith("8 GPUs > the namespace quota 4")  # the quota before
