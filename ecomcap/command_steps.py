"""What the multi-pod command steps run, and how their inputs and outputs cross to regular steps.

ZenML runs a *command step* on `pod_count` pods (an Indexed Job with a headless Service), but a
command step has no inputs or outputs: its command is fixed when the pipeline is compiled. So:

1. a regular step before it writes the stage's inputs (the paths of the artifacts it was given:
   datasets, the model to start from, the run name) to a handoff file whose path the command
   names (`handoff_path`: on the shared volume, named by a token drawn when the pipeline is
   compiled: one per run, so two runs never share one and ZenML never takes a command step of
   another run's inputs for a cached one);
2. every pod runs the same command, `ecomcap train --stage S --config-json C --inputs H` (or
   `ecomcap generate ...`), and takes its node rank, the node count and the main pod's address
   from the environment (`ecomcap.nodes`); pod 0 (which holds rank 0) writes the result next to
   the handoff;
3. a regular step after it reads that result and hands the model on as its typed artifact, so
   `generate`, `evaluate`, `promote` and MLflow see the lineage of a one-pod run.

A training stage whose inputs (config, datasets, start model) an earlier run already trained is
not trained again: the handoff names that run's result and the pods exit at once, as ZenML's
cache spares a one-pod step.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from ecomcap.config import RunConfig
from ecomcap.errors import EcomcapError

HANDOFF_DIR = "command_steps"
NODE_STAGES = ("sft", "scst", "dpo")  # the training stages that run on several nodes


def new_token() -> str:
    """One per pipeline run (drawn when it is compiled): names its handoff files."""
    return uuid.uuid4().hex[:12]


def handoff_path(cfg: RunConfig, stage: str, token: str) -> Path:
    """Where the stage's inputs wait for its pods: next to the data, on the shared volume."""
    return Path(cfg.data.work_dir).parent / HANDOFF_DIR / f"{stage}-{token}.json"


def _done_path(cfg: RunConfig, stage: str, key: str) -> Path:
    return Path(cfg.data.work_dir).parent / HANDOFF_DIR / "done" / f"{stage}-{key}.json"


def _content(value: Any) -> Any:
    """An input by what it holds: a dataset by its fingerprint, a model directory by its
    configs and weights (each run's model artifact is a copy at a new path), else as it is."""
    from ecomcap.data.shards import read_report
    from ecomcap.training.identity import model_fingerprint

    if not isinstance(value, str) or not Path(value).is_dir():
        return value
    if (Path(value) / "report.json").is_file():
        return read_report(value)["fingerprint"]
    return model_fingerprint(value)


def inputs_key(stage: str, cfg: RunConfig, inputs: dict[str, Any]) -> str:
    """What decides a training stage's result: the library's code, the config and the inputs'
    contents; not the run name or where the artifacts lie."""
    from ecomcap.workflow import library_fingerprint

    launch_file = cfg.launch.config_file and Path(cfg.launch.config_file)  # the DeepSpeed settings, by content
    blob = json.dumps({"stage": stage, "code": library_fingerprint(), "config": cfg.model_dump(mode="json"),
                       "launch_file": launch_file.read_text(encoding="utf-8") if launch_file and launch_file.is_file()
                       else None,
                       "inputs": {k: _content(v) for k, v in inputs.items() if k != "run_name"}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def result_path(handoff: Path) -> Path:
    return Path(handoff).with_name(Path(handoff).stem + ".result.json")


def pod_command(stage: str, cfg: RunConfig, token: str) -> list[str]:
    """The command every pod of the stage's command step runs (the run config travels inline:
    the pods need no file the client has)."""
    handoff = str(handoff_path(cfg, stage, token))
    if stage == "generate":
        return ["ecomcap", "generate", "--config-json", cfg.model_dump_json(), "--inputs", handoff]
    if stage not in NODE_STAGES:
        raise EcomcapError(f"{stage} does not run on several nodes (those that do: {', '.join(NODE_STAGES)})")
    return ["ecomcap", "train", "--stage", stage, "--config-json", cfg.model_dump_json(), "--inputs", handoff]


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # pods share PIDs
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def shared_root(cfg: RunConfig) -> Path:
    """The folder every pod mounts: next to the data (on Kubernetes, the /data volume)."""
    return Path(cfg.data.work_dir).parent


def _share(cfg: RunConfig, token: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Input folders onto the shared volume: with a remote artifact store a step loads each
    artifact into a temporary folder of its own pod, which the stage's pods cannot see."""
    root, out = shared_root(cfg).resolve(), {}
    for key, value in inputs.items():
        if isinstance(value, str) and Path(value).is_dir() and not Path(value).resolve().is_relative_to(root):
            dest = root / HANDOFF_DIR / token / key
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(value, dest)
            value = str(dest)
        out[key] = value
    return out


START = {"scst": "sft_model", "dpo": "start_model"}  # the argument each tuning stage starts from


def stage_handoff(cfg: RunConfig, stage: str, token: str, train: Path, valid: Path, run_name: str,
                  model: Path | None = None, grounding: Path | None = None, *, share: bool = False,
                  reuse: bool = True) -> Path:
    """The `<stage>_inputs` step's work: refuse what cannot run before N pods start, build the tiny
    model and download a hub model once, then write the handoff (datasets, start model, scorer)."""
    from ecomcap.modeling.prepare import ensure_model, prefetch_model
    from ecomcap.training.stages import check_strategy_fits_launch, reward_scorer

    check_strategy_fits_launch(cfg, stage)
    inputs: dict[str, Any] = {"train": str(train), "valid": str(valid), "run_name": run_name}
    if stage == "sft":
        ensure_model(cfg.model, train)
        prefetch_model(cfg.model)
    else:
        scorer = reward_scorer(stage, cfg, grounding)
        inputs.update({START[stage]: str(model), "scorer_dir": str(scorer) if scorer else None})
    return write_handoff(cfg, stage, token, inputs, share=share, reuse=reuse)


def write_handoff(cfg: RunConfig, stage: str, token: str, inputs: dict[str, Any], *, share: bool = False,
                  reuse: bool = True) -> Path:
    """The regular step before the command step: its inputs for the pods (`share`: copied onto the
    shared volume first) and, for a training stage whose inputs an earlier run trained with this
    code, that run's result to reuse (`reuse` off: the run's `enable_cache: false`, train again)."""
    path = handoff_path(cfg, stage, token)
    result_path(path).unlink(missing_ok=True)
    inputs = {k: str(v) if isinstance(v, Path) else v for k, v in inputs.items()}
    data: dict[str, Any] = {"stage": stage, "inputs": inputs}
    if stage != "generate":
        data["key"] = inputs_key(stage, cfg, inputs)
        earlier = _earlier(cfg, stage, data["key"]) if reuse else None
        if earlier is not None:
            data["reuse"] = earlier
    if share and "reuse" not in data:  # nothing to copy for pods that will not train
        data["inputs"] = _share(cfg, token, inputs)
    _atomic_json(path, data)
    return path


def _earlier(cfg: RunConfig, stage: str, key: str) -> dict[str, Any] | None:
    """An earlier run's adopted result of these inputs, if its model is still what it recorded
    (a later run of other code may have retrained into the same folder)."""
    from ecomcap.training.identity import model_fingerprint

    done = _done_path(cfg, stage, key)
    if not done.is_file():
        return None
    record = json.loads(done.read_text(encoding="utf-8"))
    model = Path(record["result"]["model_dir"])
    if not model.is_dir() or model_fingerprint(model) != record["model_fingerprint"]:
        return None
    return record["result"]


def clear_shared(cfg: RunConfig, token: str) -> None:
    """The run's copies of its inputs on the shared volume, once the stage handed its model on."""
    shutil.rmtree(shared_root(cfg) / HANDOFF_DIR / token, ignore_errors=True)


def record_done(cfg: RunConfig, stage: str, token: str) -> None:
    """After the stage's result was checked and handed on: later runs of the same inputs may
    reuse it (a result whose ranks disagree never gets here)."""
    from ecomcap.training.identity import model_fingerprint

    handoff = read_handoff(handoff_path(cfg, stage, token), stage)
    if "key" in handoff and "reuse" not in handoff:
        result = read_result(cfg, stage, token)
        _atomic_json(_done_path(cfg, stage, handoff["key"]),
                     {"result": result, "model_fingerprint": model_fingerprint(result["model_dir"])})


def read_handoff(handoff: str | Path, stage: str) -> dict[str, Any]:
    path = Path(handoff)
    if not path.is_file():
        raise EcomcapError(f"--inputs {path}: no such file (the {stage}_inputs step writes it on the shared volume; "
                           "is it mounted on this pod?)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("stage") != stage:
        raise EcomcapError(f"--inputs {path} holds the inputs of stage {data.get('stage')!r}, not {stage!r}")
    return data


def read_inputs(handoff: str | Path, stage: str) -> dict[str, Any]:
    return read_handoff(handoff, stage)["inputs"]


def write_result(handoff: str | Path, result: dict[str, Any], digest: str | None = None) -> None:
    """Pod 0, after the stage: its result, tied to the handoff it ran on (`digest`: as it read it)."""
    _atomic_json(result_path(Path(handoff)), {"handoff": digest or _digest(Path(handoff)), "result": result})


def read_result(cfg: RunConfig, stage: str, token: str, run_name: str | None = None) -> dict[str, Any]:
    """The regular step after the command step: pod 0's result of this run's handoff (`run_name`:
    refused when the handoff is another run's: runs of one compiled snapshot, e.g. a schedule,
    share its token)."""
    handoff = handoff_path(cfg, stage, token)
    if run_name is not None and handoff.is_file():
        theirs = read_handoff(handoff, stage)["inputs"].get("run_name")
        if theirs not in (None, run_name):
            raise EcomcapError(f"{handoff} holds the inputs of run {theirs}, not of this run ({run_name}): two runs of "
                               "one compiled pipeline overlapped; rerun this one")
    path = result_path(handoff)
    if not path.is_file():
        raise EcomcapError(f"{stage}: the {cfg.launch.nodes} pods of {stage}_nodes left no result at {path}: "
                           "see that step's pod logs")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not handoff.is_file() or data["handoff"] != _digest(handoff):
        raise EcomcapError(f"{path} belongs to another run's inputs than {handoff}: rerun the pipeline")
    return data["result"]


def train_on_this_node(stage: str, cfg: RunConfig, inputs: dict[str, Any],
                       handoff: str | Path | None = None) -> dict[str, Any] | None:
    """One pod's part of a multi-node stage: its ranks join the others'; pod 0 returns (and, with
    a handoff, records) rank 0's result, the other pods None. A handoff that names an earlier
    run's result of the same inputs: nothing to train, pod 0 hands that result on."""
    from ecomcap.nodes import require_nodes
    from ecomcap.training.stages import launch_stage

    node = require_nodes(cfg.launch.nodes, processes=cfg.launch.num_processes, port=cfg.launch.main_process_port)
    data = read_handoff(handoff, stage) if handoff is not None else {}
    # the handoff as this pod read it: a result is tied to these inputs, even if another run
    # rewrites the file meanwhile
    digest = _digest(Path(handoff)) if handoff is not None else None
    done = _finished(handoff, digest) if handoff is not None else None
    if done is not None:  # the Job restarted after pod 0 had finished: nothing left to train
        print(f"{stage}: this run's pods already finished the stage: {done['model_dir']}", flush=True)
        return done if node.rank == 0 else None
    if "reuse" in data:
        print(f"{stage}: these inputs were trained by an earlier run: reusing {data['reuse']['model_dir']}", flush=True)
        res = data["reuse"] if node.rank == 0 else None
    else:
        print(f"{stage}: {node.describe()}, {cfg.launch.num_processes} process(es) here", flush=True)
        res = launch_stage(stage, cfg, node=node, **inputs)
    if res is not None and handoff is not None:
        write_result(handoff, res, digest)
    return res


def _finished(handoff: str | Path, digest: str) -> dict[str, Any] | None:
    """Pod 0's result of exactly these inputs, if it wrote one."""
    path = result_path(Path(handoff))
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["result"] if data["handoff"] == digest else None


def replay_curve(stage: str, model_dir: str | Path) -> int:
    """The stage's per-step metrics (its metrics.jsonl) into the active MLflow run, at their steps:
    the pods had no step run to log to. Returns the rows replayed."""
    from ecomcap.registry import tracking

    path = Path(model_dir) / "metrics.jsonl"
    if not tracking.active() or not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    sink = tracking.StepMetrics(every=len(rows) + 1)
    for row in rows:
        sink({f"{stage}/{k}": float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
             int(row["step"]))
    sink.flush(final=True)
    return len(rows)
