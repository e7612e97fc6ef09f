"""Shared set-up of the multi-node tests (not tests): a small run config on a prepared synthetic
set and the tiny model, the one-node and two-pod runs of `ecomcap train`, and their curves."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml

from tests.local_pods import ECOMCAP, base_env, free_port, kill_pod, start_pods, wait, wait_for

SMALL = {
    "data": {"work_dir": "data", "splits": ["train", "valid"], "synth": {"train": 48, "valid": 8, "test": 0, "seed": 3}},
    "model": {"name_or_path": "tiny", "device": "cpu",
              "tiny": {"text_hidden": 64, "text_layers": 1, "text_heads": 2, "text_kv_heads": 1,
                       "text_intermediate": 128, "vision_depth": 1, "vision_hidden": 32, "vision_heads": 2}},
    "finetune": {"strategy": "full"},
    "sft": {"max_steps": 6, "batch_size": 4, "lr": 3.0e-3, "eval_every": 3, "eval_images": 4, "save_every": 2,
            "label_smoothing": 0.0},
    "generate": {"num_beams": 1, "max_new_tokens": 8, "batch_size": 4},
}
NOT_COMPARED = {"images_per_s", "reward_s"}  # wall-clock figures


def write_config(root: Path, name: str, **launch) -> Path:
    cfg = json.loads(json.dumps(SMALL))
    cfg["sft"]["output_dir"] = f"runs/{name}"
    cfg["launch"] = launch
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"parameters": {"config": cfg}}), encoding="utf-8")
    return path


def prepare(root: Path) -> None:
    """Ingest once (the pipeline's ingest step; pods never ingest)."""
    cfg = write_config(root, "prepare")
    proc = subprocess.run([ECOMCAP, "prepare", "--config", str(cfg)], cwd=root, env=base_env(2), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def one_node(root: Path, name: str, **launch) -> dict:
    """`ecomcap train --stage sft` on one node with `num_processes` ranks: its JSON line."""
    cfg = write_config(root, name, **launch)
    proc = subprocess.run([ECOMCAP, "train", "--stage", "sft", "--config", str(cfg)], cwd=root, env=base_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def two_pods(root: Path, name: str, kill_after_step: int | None = None, pet: bool = False,
             main_late_s: float = 0, **launch) -> tuple[dict, list[str]]:
    """The same command as two local pods (one rank each): pod 0's JSON line and both pods' logs.
    `kill_after_step`: pod 1 is killed once step k's checkpoint exists, then both restart."""
    cfg = write_config(root, name, nodes=2, num_processes=1, **launch)
    args, logs = ["train", "--stage", "sft", "--config", str(cfg)], root / "logs" / name
    if main_late_s:  # pod 1 first, pod 0 (the rendezvous host) later: a slow pod start
        port = free_port()
        pods = start_pods(args, 2, root, logs, port=port, pet=pet, only=[1])
        time.sleep(main_late_s)
        pods = {**start_pods(args, 2, root, logs, port=port, pet=pet, only=[0]), **pods}
    else:
        pods = start_pods(args, 2, root, logs, pet=pet)
    if kill_after_step is not None:
        ckpt = f"step-{kill_after_step:07d}"
        wait_for(lambda: any((root / "runs" / name).glob(f"run-*/checkpoints/{ckpt}")) or
                 any(p.poll() is not None for p in pods.values()))
        kill_pod(pods[1])
        codes = wait(pods)
        assert codes[1] != 0 and codes[0] != 0, codes  # pod 0 fails too: its peer is gone
        pods = start_pods(args, 2, root, logs, pet=pet)  # the Job (the step's retry) starts both again
    codes = wait(pods)
    texts = [(logs / f"pod-{i}.log").read_text(encoding="utf-8") for i in range(2)]
    assert codes == {0: 0, 1: 0}, texts[0][-3000:] + texts[1][-3000:]
    return json.loads(texts[0].strip().splitlines()[-1]), texts


def curve(root: Path, out: dict) -> list[dict]:
    """Every logged figure of every step (loss, grad norm, LR, validation), wall-clock excluded."""
    run = (root / out["model_dir"]).parent
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in rows]
