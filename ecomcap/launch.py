"""Run a training stage in its own processes: 1 with plain Python, N under `accelerate launch`.

ZenML cannot wrap a step that takes a pydantic config and artifacts in `run_with_accelerate`
(PITFALLS), so a step calls `launch()` instead: it writes a spec (the function to call and its
JSON arguments), starts the processes on it, streams their output (progress bars, logs), checks
the exit of every rank and returns what rank 0 wrote. The same path serves one process and N,
on the local orchestrator and inside a Kubernetes step pod (N = the pod's GPUs), for DDP and
DeepSpeed alike (`launch.config_file`). Rank 0 logs to the step's MLflow run: its id travels in
the environment. With `launch.nodes` > 1 every pod of a multi-pod job runs this on its own
`num_processes` ranks, joined at pod 0's address (`ecomcap.nodes`); only pod 0 holds rank 0's result.
"""
from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ecomcap.config import LaunchConfig
from ecomcap.errors import EcomcapError
from ecomcap.nodes import Node, world_nodes
from ecomcap.processes import parent_death_signal, worker_threads

log = logging.getLogger(__name__)
ENTRY = "ecomcap.launch"  # `python -m ecomcap.launch SPEC`: what every process runs
TAIL_LINES = 60
ERROR_MARK = "ecomcap-launch-error:"  # each failing rank's one-line reason, found in all the output
# a launch inside a launched process (or a step started by torchrun) must not join that group
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_DEEPSPEED")


def launch(target: str, kwargs: dict[str, Any], cfg: LaunchConfig, *, name: str,
           workdir: str | Path | None = None, node: Node | None = None) -> dict[str, Any] | None:
    """Call `target` ("module:function", JSON kwargs) in `cfg.num_processes` processes; returns
    the JSON-able result rank 0's call returned (None on a pod other than pod 0 of a multi-node
    run: rank 0 is not there). Raises EcomcapError with the failing output."""
    scratch = Path(tempfile.mkdtemp(prefix=f"launch-{name}-", dir=workdir))
    spec = scratch / "spec.json"
    result = scratch / "result.json"
    spec.write_text(json.dumps({"target": target, "kwargs": kwargs, "result": str(result)},
                               ensure_ascii=False, default=str), encoding="utf-8")
    cmd = command(spec, cfg, node)
    log.info("%s: %d process(es)%s: %s", name, cfg.num_processes, f" on {node.describe()}" if node else "",
             " ".join(cmd))
    run_id = os.environ.get("ECOMCAP_MLFLOW_RUN_ID") or _active_run_id()
    try:
        code, tail, reasons = _stream(cmd, _child_env(cfg.num_processes, run_id))
    finally:
        _keep_running(run_id)
    if code != 0:
        why = "".join(f"  {r}\n" for r in dict.fromkeys(reasons)) or "  (no reason printed: see the output)\n"
        where = f" on {node.describe()}" if node else ""
        raise EcomcapError(f"{name}: the training processes failed (exit {code}; {cfg.num_processes} "
                           f"process(es){where}, {cfg.config_file or 'no accelerate config'}):\n{why}Last output:\n"
                           + "".join(tail))
    if node is not None and node.rank > 0:
        shutil.rmtree(scratch, ignore_errors=True)
        return None
    if not result.is_file():
        raise EcomcapError(f"{name}: the processes exited 0 but rank 0 wrote no result ({result})")
    out = json.loads(result.read_text(encoding="utf-8"))
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def command(spec: Path, cfg: LaunchConfig, node: Node | None = None) -> list[str]:
    """The command line: plain Python for one process without an accelerate config, else
    `accelerate launch` (torchrun under it; DeepSpeed's engine when the config file says so).
    On node `node` of several: this pod's `num_processes` ranks of `num_processes x nodes`,
    torchrun's static rendezvous at the main pod (it waits `rendezvous_timeout_s` for the others),
    DeepSpeed through torchrun on each pod (the `standard` launcher: no SSH between pods)."""
    if cfg.num_processes == 1 and not cfg.config_file and node is None:
        return [sys.executable, "-m", ENTRY, str(spec)]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        raise EcomcapError("launch.num_processes > 1 needs the `accelerate` command (pip install accelerate)")
    if node is None:
        cmd = [accelerate, "launch", "--num_processes", str(cfg.num_processes), "--num_machines", "1",
               "--main_process_port", str(cfg.main_process_port or free_port())]
    else:
        cmd = [accelerate, "launch", "--num_processes", str(cfg.num_processes * node.count),
               "--num_machines", str(node.count), "--machine_rank", str(node.rank),
               "--main_process_ip", node.main_address, "--main_process_port", str(node.main_port),
               "--same_network", "--rdzv_conf", f"timeout={cfg.rendezvous_timeout_s}",
               "--deepspeed_multinode_launcher", "standard"]
    if cfg.config_file:
        if not Path(cfg.config_file).is_file():
            raise EcomcapError(f"launch.config_file {cfg.config_file} does not exist")
        cmd += ["--config_file", str(cfg.config_file)]
    else:
        # the torchrun launcher: NCCL on GPUs, gloo on CPU
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["-m", ENTRY, str(spec)]


def free_port() -> int:
    """Two launches on one machine (two pipelines, tests) must not share a rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _active_run_id() -> str | None:
    try:
        import mlflow

        run = mlflow.active_run()
        return run.info.run_id if run is not None else None
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return None


def _keep_running(run_id: str | None) -> None:
    """Rank 0 resumed the step's MLflow run, and MLflow ends a resumed run as FINISHED when that
    process exits: the step is still running (and may yet fail), so set it back."""
    if run_id is None:
        return
    from mlflow import MlflowClient

    try:
        if MlflowClient().get_run(run_id).info.status != "RUNNING":
            MlflowClient().update_run(run_id, status="RUNNING")
    except Exception as exc:  # tracking is not worth failing a finished training for
        log.warning("could not keep MLflow run %s running: %s", run_id, exc)


def _child_env(processes: int, run_id: str | None) -> dict[str, str]:
    """This environment, plus: the `ecomcap` this process imports, the active MLflow run, and on
    CPU the usable cores split between the processes (torchrun would give each one thread), and
    the CUDA caching allocator's expandable segments (variable-length image batches fragment
    fixed blocks: OOM with free memory); minus the process-group settings of any launch this
    process is itself part of. A value the user set wins."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.setdefault("OMP_NUM_THREADS", str(worker_threads(processes)))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if run_id is not None:
        import mlflow

        env["ECOMCAP_MLFLOW_RUN_ID"] = run_id
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    return env


def _stream(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str], list[str]]:
    """Run, echoing output as it comes (progress shows in the step log); keep the last lines and
    every rank's error line (with N ranks the first failure scrolls out of any tail)."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    reasons: list[str] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1, preexec_fn=parent_death_signal()) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
            if line.startswith(ERROR_MARK):
                reasons.append(line[len(ERROR_MARK):].strip())
        code = proc.wait()
    sys.stdout.flush()
    return code, list(tail), reasons


def main(spec_path: str) -> int:
    """One process's work: call the target; rank 0 records the result (and logs to MLflow)."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    _say_world()
    run_id = os.environ.get("ECOMCAP_MLFLOW_RUN_ID")
    if run_id and rank == 0:
        import mlflow

        mlflow.start_run(run_id=run_id)  # the step's run: stage metrics land beside the step's
    module, func = spec["target"].split(":")
    try:
        out = getattr(importlib.import_module(module), func)(**spec["kwargs"])
    except EcomcapError as exc:  # a clear reason: no traceback
        print(f"{ERROR_MARK} rank {rank}: {exc}".replace("\n", " "), file=sys.stderr, flush=True)
        return 2
    except InterruptedError as exc:  # stop_after_steps: a deliberate stop, resumable
        print(f"{ERROR_MARK} rank {rank}: {exc} (rerun the same config to resume)", file=sys.stderr, flush=True)
        return 3
    except BaseException as exc:
        print(f"{ERROR_MARK} rank {rank}: {type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr,
              flush=True)
        raise
    if rank == 0:
        tmp = Path(spec["result"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(spec["result"])
    leave_group()
    return 0


def _say_world() -> None:
    """Each pod's first rank says in one line what torchrun's rendezvous made of the job."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world > 1 and os.environ.get("LOCAL_RANK", "0") == "0":
        nodes = world_nodes()
        print(f"node {os.environ.get('GROUP_RANK', '0')}: world size {world} over {nodes} "
              f"node{'s' if nodes > 1 else ''} ({local} process(es) here)", flush=True)


def all_ranks(mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `mine`, in rank order (just `[mine]` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def leave_group() -> None:
    """Tear the process group down before exit: an undestroyed gloo/NCCL group can abort a rank
    at interpreter shutdown ("terminate called without an active exception") after a good run."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
