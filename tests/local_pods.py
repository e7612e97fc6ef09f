"""Local "pods" for the multi-node tests (not tests): N process trees on this machine, each given
exactly the environment ZenML's Kubernetes step operator gives the pods of a multi-pod command
step (`zenml.integrations.kubernetes.kube_utils.multi_pod_environment`, plus Kubernetes'
`JOB_COMPLETION_INDEX`), with the main address 127.0.0.1 instead of pod 0's DNS name.
What stands in for Kubernetes: the process trees (pods) and this machine's disk (the shared volume)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from zenml.integrations.kubernetes import kube_utils

from ecomcap.launch import free_port  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
ECOMCAP = str(Path(sys.executable).parent / "ecomcap")


def pod_env(index: int, count: int, port: int) -> dict[str, str]:
    """ZenML's own multi-pod environment, pointed at this machine, and this pod's index."""
    env = kube_utils.multi_pod_environment(job_name="ecomcap-test", namespace="ecomcap", pod_count=count)
    assert set(env) == {"ZENML_KUBERNETES_POD_COUNT", "ZENML_KUBERNETES_MAIN_ADDRESS", "ZENML_KUBERNETES_MAIN_PORT"}
    env.update({"ZENML_KUBERNETES_MAIN_ADDRESS": "127.0.0.1", "ZENML_KUBERNETES_MAIN_PORT": str(port),
                "JOB_COMPLETION_INDEX": str(index)})
    return env


def pet_env(index: int, count: int, port: int) -> dict[str, str]:
    """The Kubeflow Trainer's (torchrun's) convention for the same pod: a TrainJob, or by hand."""
    return {"PET_NNODES": str(count), "PET_NODE_RANK": str(index), "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port)}


def base_env(threads: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZENML_KUBERNETES_", "PET_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    return env


def start_pods(args: list[str], count: int, cwd: Path, logs: Path, port: int | None = None,
               only: list[int] | None = None, extra_env: dict[str, str] | None = None,
               raw: bool = False, pet: bool = False) -> dict[int, subprocess.Popen]:
    """`ecomcap <args>` (`raw`: `args` is the whole command) as pods 0..count-1 (or just `only`),
    each in a session of its own, with ZenML's pod environment (`pet`: Kubeflow's); output to
    logs/pod-<i>.log."""
    port = port or free_port()
    logs.mkdir(parents=True, exist_ok=True)
    pods = {}
    for i in only if only is not None else range(count):
        out = open(logs / f"pod-{i}.log", "a", encoding="utf-8")
        env = {**base_env(), **(extra_env or {}), **(pet_env if pet else pod_env)(i, count, port)}
        pods[i] = subprocess.Popen(list(args) if raw else [ECOMCAP, *args], cwd=cwd, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return pods


def wait(pods: dict[int, subprocess.Popen], timeout: float = 900) -> dict[int, int]:
    deadline = time.time() + timeout
    codes = {}
    for i, p in pods.items():
        codes[i] = p.wait(timeout=max(1, deadline - time.time()))
    return codes


def kill_pod(pod: subprocess.Popen) -> None:
    """A lost pod: its whole process tree at once (SIGKILL, no clean-up), as Kubernetes kills a
    pod's container. The tree, not the process group: torchrun starts each rank in a session of
    its own."""
    import psutil

    try:
        tree = [psutil.Process(pod.pid), *psutil.Process(pod.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    pod.wait()


def wait_for(predicate, timeout: float = 600, every: float = 0.2) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)
