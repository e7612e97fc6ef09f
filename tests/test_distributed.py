"""Distributed training: SFT under `accelerate launch` with 2 CPU processes (gloo), and the
accelerate configs shipped for GPUs (DDP, DeepSpeed ZeRO-2/3)."""
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from ecomcap.modeling.load import load_trained

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_two_process_sft_ranks_agree_and_adapter_loads(tiny_model_cfg, small_data, tmp_path):
    out = tmp_path / "ddp"
    # --multi_gpu selects accelerate's torchrun launcher; the job itself runs on CPU (gloo): --cpu alone
    # would need an MPI launcher for more than one process.
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "ddp_sft_job.py"), str(small_data["train"]), str(small_data["valid"]),
           tiny_model_cfg.name_or_path, str(out)]
    # the job must import this checkout's `ecomcap`, not whichever tree the venv's editable install points at
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [(out / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][2] == ranks[1][2] == "2"  # really two processes
    assert ranks[0][0] == ranks[1][0] == "3"  # same number of optimizer steps
    assert ranks[0][1] == ranks[1][1]  # identical weights on both ranks
    # one scheduler step per optimizer step whatever the process count: the cosine ends at 0
    run = next(out.glob("run-*"))  # the run identity's folder
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line]
    assert len(lrs) == 3 and lrs[0] > lrs[1] > lrs[2] == pytest.approx(0.0, abs=1e-12)
    model, _ = load_trained(run / "model", tiny_model_cfg)
    assert any("lora_" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_are_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig

    data = yaml.safe_load(path.read_text())
    cfg = ClusterConfig(**data)  # unknown keys raise TypeError
    assert cfg.mixed_precision == "bf16"
    if cfg.distributed_type == "DEEPSPEED":
        from accelerate.utils import DeepSpeedPlugin  # noqa: F401  (the plugin these keys feed)

        assert cfg.deepspeed_config["zero_stage"] in (2, 3)


def test_expected_accelerate_configs_exist():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"single_gpu", "multi_gpu_ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"} <= names


@pytest.mark.parametrize("lora_vision", [True, False], ids=["deferred-tower", "chunked-no-sync"])
def test_two_process_scst_chunked_equals_unchunked(tiny_model_cfg, small_data, tmp_path, lora_vision):
    """SCST's chunked log-prob pass under real 2-process DDP (gloo): chunks of 2 rows give the
    all-reduced gradients of one forward over all rows. With a training vision tower this is the
    deferred path (chunks as non-synced micro-steps, the last returned to the loop's backward),
    the one DeepSpeed also takes; without it, chunks are backwarded under no_sync."""
    from safetensors.torch import load_file

    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "ddp_scst_chunk_job.py"), str(small_data["train"]), tiny_model_cfg.name_or_path,
           str(tmp_path), "1" if lora_vision else "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for res in ranks:
        assert res["deferred0"].item() == res["deferred2"].item() == float(lora_vision)
        assert abs(res["loss0"].item() - res["loss2"].item()) < 1e-5
        assert res["rows0"].item() == 6 and res["rows2"].item() == 2  # the chunk size was honoured
        names = [n[3:] for n in res if n.startswith("c0/")]
        assert names and any(".visual." in n for n in names) == lora_vision
        assert {n[3:] for n in res if n.startswith("c2/")} == set(names)
        for n in names:
            torch.testing.assert_close(res[f"c2/{n}"], res[f"c0/{n}"], rtol=1e-4, atol=1e-6, msg=n)
    for n in (k for k in ranks[0] if k.startswith("c")):  # all-reduced: both ranks hold the same
        torch.testing.assert_close(ranks[1][n], ranks[0][n], rtol=1e-5, atol=1e-7, msg=n)
    assert ranks[0]["loss0"].item() != ranks[1]["loss0"].item()  # the ranks really had different data


def test_collective_timeout_is_the_run_configs_even_on_an_earlier_group():
    """Under DDP/ZeRO-2 the other ranks wait at a barrier while rank 0 validates: the group's
    timeout must be `dist_timeout_min` (60 by default, not NCCL's 10 minutes), also when the
    process group already existed before the Accelerator (2 real gloo processes)."""
    from ecomcap.config import LaunchConfig, LoopConfig
    from ecomcap.launch import launch
    from ecomcap.training.accelerator import process_group_kwargs

    assert process_group_kwargs(LoopConfig()).to_kwargs() == {"timeout": timedelta(minutes=60)}
    res = launch("tests.launch_targets:group_timeout_after_accelerator", {"minutes": 45},
                 LaunchConfig(num_processes=2), name="t")
    assert res["before_s"] != 45 * 60 and res["after_s"] == 45 * 60
