"""Which node (pod) of a multi-node job this process is, read from the environment its engine gives.

One command runs on every pod (`ecomcap train ...`, `ecomcap generate ...`); what differs between
pods comes from the environment, in the conventions users' engines already set:

- ZenML's Kubernetes step operator, for a command step on `pod_count` pods (an Indexed Job with a
  headless Service): `ZENML_KUBERNETES_POD_COUNT`, `ZENML_KUBERNETES_MAIN_ADDRESS` (index 0's
  stable DNS name), `ZENML_KUBERNETES_MAIN_PORT`, and Kubernetes' own `JOB_COMPLETION_INDEX`;
- the Kubeflow Trainer's torch runtime (`TrainJob`): `PET_NNODES`, `PET_NODE_RANK`,
  `PET_MASTER_ADDR`, `PET_MASTER_PORT` (torchrun's own variables, as the PyTorchJob sets them);
- by hand on N machines: the same `PET_*` variables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ecomcap.errors import EcomcapError

ZENML = ("ZENML_KUBERNETES_POD_COUNT", "JOB_COMPLETION_INDEX", "ZENML_KUBERNETES_MAIN_ADDRESS",
         "ZENML_KUBERNETES_MAIN_PORT")
KUBEFLOW = ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
DEFAULT_PORT = 29500  # ZenML's MULTI_POD_MAIN_PORT and torchrun's default


@dataclass(frozen=True)
class Node:
    """This pod's place in a job of `count` pods; `main_address:main_port` is pod 0's rendezvous."""

    rank: int
    count: int
    main_address: str
    main_port: int
    source: str  # which convention it was read from (for the one-line account)

    def describe(self) -> str:
        return f"node {self.rank} of {self.count} (main {self.main_address}:{self.main_port}, from {self.source})"


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    if not env.get(key) and default is not None:
        return default
    try:
        return int(env[key])
    except ValueError:
        hint = " (elastic MIN:MAX node ranges are not supported: give a fixed count)" if ":" in env[key] else ""
        raise EcomcapError(f"{key}={env[key]!r} is not an integer{hint}") from None


def current_node(env: Mapping[str, str] | None = None, port: int | None = None) -> Node | None:
    """The node this process runs as, or None outside a multi-pod job (one pod, no variables);
    `port`: the main pod's port where the environment names none (else 29500)."""
    env = os.environ if env is None else env
    if _int(env, ZENML[0], 1) > 1:
        keys, source = ZENML, "ZenML Kubernetes step operator"
    elif _int(env, KUBEFLOW[0], 1) > 1:
        keys, source = KUBEFLOW, "PET_* (Kubeflow TrainJob / torchrun)"
    else:
        return None
    count_key, rank_key, addr_key, port_key = keys
    missing = [k for k in (rank_key, addr_key) if not env.get(k)]
    if missing:
        raise EcomcapError(f"{count_key}={env[count_key]} but {', '.join(missing)} is not set: this pod cannot "
                           "tell its index or the main pod's address (run it as an Indexed Job, see docs/kubernetes.md)")
    node = Node(rank=_int(env, rank_key), count=_int(env, count_key), main_address=env[addr_key],
                main_port=_int(env, port_key, port or DEFAULT_PORT), source=source)
    if not 0 <= node.rank < node.count:
        raise EcomcapError(f"{rank_key}={node.rank} is outside 0..{node.count - 1} ({count_key}={node.count})")
    return node


def require_nodes(expected: int, env: Mapping[str, str] | None = None, processes: int | None = None,
                  port: int | None = None) -> Node:
    """The node of a `launch.nodes: expected` run, refusing a pod count (or, under Kubeflow, a
    processes-per-node count) that disagrees with the config."""
    env = os.environ if env is None else env
    node = current_node(env, port)
    if node is None:
        raise EcomcapError(f"launch.nodes is {expected} but this process is not one of {expected} pods: set "
                           f"{ZENML[0]}/{ZENML[1]}/{ZENML[2]} (ZenML's step operator sets them) or {KUBEFLOW[0]}/"
                           f"{KUBEFLOW[1]}/{KUBEFLOW[2]}, or run with launch.nodes: 1")
    if node.count != expected:
        raise EcomcapError(f"launch.nodes is {expected} but the job has {node.count} pods ({node.source}): "
                           "make the step's pod_count equal launch.nodes")
    per_node = env.get("PET_NPROC_PER_NODE", "")
    if processes is not None and per_node.isdigit() and int(per_node) != processes:
        raise EcomcapError(f"PET_NPROC_PER_NODE={per_node} but launch.num_processes is {processes}: the ranks per "
                           "node come from launch.num_processes; make them equal")
    return node


def world_nodes(env: Mapping[str, str] | None = None) -> int:
    """Machines (pods) the running torchrun job spans: its world over the ranks on this one."""
    env = os.environ if env is None else env
    return max(1, int(env.get("WORLD_SIZE", "1")) // max(1, int(env.get("LOCAL_WORLD_SIZE", "1"))))
