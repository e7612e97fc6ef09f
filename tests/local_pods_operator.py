"""A ZenML step operator for tests (not a test): it runs a command step the way ZenML's Kubernetes
step operator does — the step's command on `pod_count` pods (the count `on_nodes` puts in the
step's `step_operator.kubernetes` settings), each given ZenML's multi-pod environment and its completion
index — as local process trees (tests/local_pods.py) instead of an Indexed Job. What stands in for
Kubernetes: the API server and its pods; everything from the pipeline's compilation to the
command, environment and pod count is ZenML's own.

    zenml step-operator flavor register tests.local_pods_operator.LocalPodsStepOperatorFlavor
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Type

from zenml.step_operators import BaseStepOperator, BaseStepOperatorConfig, BaseStepOperatorFlavor


def _pod_count(command: List[str]) -> int:
    """The pod count `steps/nodes.py::on_nodes` gives the step's Kubernetes settings, read from the
    run config in the command (ZenML drops settings of a flavor the stack does not have)."""
    from ecomcap.config import RunConfig

    if "--config-json" not in command:
        return 1
    cfg = RunConfig.model_validate_json(command[command.index("--config-json") + 1])
    return cfg.generate.chunks.pods if command[1] == "generate" else cfg.launch.nodes


class LocalPodsStepOperatorConfig(BaseStepOperatorConfig):
    @property
    def is_local(self) -> bool:
        return True


class LocalPodsStepOperator(BaseStepOperator):
    def launch(self, info: Any, entrypoint_command: List[str], environment: Dict[str, str]) -> None:
        """Run the step on its pods, stream nothing, wait for all; a failed pod fails the step."""
        from tests.local_pods import base_env, start_pods, wait

        count = _pod_count(entrypoint_command)
        logs = Path(tempfile.mkdtemp(prefix=f"{info.pipeline_step_name}-pods-"))
        env = {**base_env(), **environment}
        if count == 1:
            codes = {0: subprocess.run(entrypoint_command, env=env).returncode}
        else:
            pods = start_pods(entrypoint_command, count, Path.cwd(), logs, extra_env=environment, raw=True)
            codes = wait(pods, timeout=1800)
        for i in sorted(codes):
            text = (logs / f"pod-{i}.log").read_text(encoding="utf-8") if count > 1 else ""
            shown = text if len(text) < 6000 else f"{text[:1500]}\n[...]\n{text[-4000:]}"
            print(f"--- pod {i} of {count} (exit {codes[i]}) ---\n{shown}", flush=True)
        failed = {i: c for i, c in codes.items() if c != 0}
        if failed:
            raise RuntimeError(f"{info.pipeline_step_name}: pod(s) failed (index: exit code): {failed}")


class LocalPodsStepOperatorFlavor(BaseStepOperatorFlavor):
    @property
    def name(self) -> str:
        return "local_pods"

    @property
    def config_class(self) -> Type[LocalPodsStepOperatorConfig]:
        return LocalPodsStepOperatorConfig

    @property
    def implementation_class(self) -> Type[LocalPodsStepOperator]:
        return LocalPodsStepOperator
