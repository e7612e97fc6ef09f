"""DeepSpeed ZeRO-2/3 through accelerate with our training loop: real `accelerate launch` of 2
CPU processes (DeepSpeed's CPU accelerator, gloo), compared with 2-process DDP on the same global
batch. The accelerate YAMLs are the shipped ones with 2 processes and fp32 (`mixed_precision: no`;
the shipped bf16 needs a GPU). The run config asks for 2 accumulation steps while the YAMLs say 1:
the run config must win."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ecomcap.modeling.load import load_trained

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
DDP_ARGS = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def zero_yaml(stage: int | str, tmp: Path, **deepspeed_config) -> Path:
    """The shipped ZeRO YAML (`stage` 2, 3 or "3_offload"), for 2 CPU processes in fp32 (and
    `deepspeed_config` changes)."""
    data = yaml.safe_load((ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
    data.update(num_processes=2, mixed_precision="no")
    data["deepspeed_config"].update(deepspeed_config)
    path = tmp / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launch(launcher_args: list[str], data, model_cfg, out: Path, strategy: str, mode: str, ok: bool = True):
    cmd = [ACCELERATE, "launch", *launcher_args, str(ROOT / "tests" / "deepspeed_job.py"), str(data["train"]),
           str(data["valid"]), model_cfg.name_or_path, str(out), strategy, mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    if not ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2  # really two processes, each with its own rank
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the same weights on both ranks
    if "--config_file" in launcher_args:  # really DeepSpeed, not a silent fallback to DDP on CPU
        assert ranks[0]["distributed_type"] == ranks[1]["distributed_type"] == "DistributedType.DEEPSPEED"
    return SimpleNamespace(ranks=ranks, stderr=proc.stderr, model_dir=Path(ranks[0]["model_dir"]))


def curve(run_dir: Path) -> list[dict]:
    return [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def generates(model_dir: Path, model_cfg, small_data) -> str:
    from ecomcap.config import GenerateConfig
    from ecomcap.inference.generate import caption_images
    from ecomcap.training.collate import PromptBuilder
    from ecomcap.training.data import ShardImages

    model, processor = load_trained(model_dir, model_cfg)
    images = ShardImages(small_data["valid"])
    caps = caption_images(model, PromptBuilder(processor, model_cfg.prompt), [images.image(0)],
                          GenerateConfig(num_beams=1, max_new_tokens=6), progress=False)
    assert len(caps) == 1 and isinstance(caps[0], str)
    return caps[0]


@pytest.fixture(scope="module")
def ddp_lora(tiny_model_cfg, small_data, tmp_path_factory):
    return launch(DDP_ARGS, small_data, tiny_model_cfg, tmp_path_factory.mktemp("ddp"), "lora", "sft")


@pytest.mark.parametrize("stage", [2, 3, "3_offload"])
def test_zero_loss_curve_matches_ddp_and_export_loads(stage, ddp_lora, tiny_model_cfg, small_data, tmp_path):
    """(3_offload: the shipped offload YAML, optimizer and parameters on the CPU: accelerate swaps in
    DeepSpeedCPUAdam, built on our AdamW's param groups, so the schedule still drives it.)"""
    run = launch(["--config_file", str(zero_yaml(stage, tmp_path))], small_data, tiny_model_cfg, tmp_path / "out",
                 "lora", "sft")
    assert "gradient_accumulation_steps=1 overridden by the run config's 2" in run.stderr
    for r in (*run.ranks, *ddp_lora.ranks):  # 60 minutes for ranks waiting on rank 0's validation
        assert r["timeout_s"] == 3600.0
    loads = [r["first_load"] for r in run.ranks]
    assert all(not r["first_load"]["partitioned"] for r in ddp_lora.ranks)
    if stage != 2:  # the first load (fresh processes) is already sharded: each rank holds about half
        assert all(ld["partitioned"] for ld in loads)
        assert sum(ld["local"] for ld in loads) == pytest.approx(loads[0]["total"], rel=0.02)
        assert all(ld["local"] <= 0.51 * ld["total"] for ld in loads)
    else:  # ZeRO-2 shards optimizer state and gradients only: the whole model on every rank
        assert all(not ld["partitioned"] and ld["local"] == ld["total"] for ld in loads)
    ours, ref = curve(run.model_dir.parent), curve(ddp_lora.model_dir.parent)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == [1, 2, 3, 4]  # no extra optimizer steps
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the engine's norm, logged
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)  # one scheduler step per optimizer step
    assert ours[0]["loss"] != ours[-1]["loss"]  # it trained
    assert ours[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and ours[-2]["lr"] > 0
    # validation ran (every rank generates under ZeRO-3) and the export holds the real weights
    vals = [json.loads(x) for x in (run.model_dir.parent / "metrics.jsonl").read_text().splitlines() if "val_" in x]
    assert [v["step"] for v in vals] == [2, 4]
    mine = load_file(str(run.model_dir / "adapter_model.safetensors"))
    theirs = load_file(str(ddp_lora.model_dir / "adapter_model.safetensors"))
    assert set(mine) == set(theirs) and all(t.numel() > 0 for t in mine.values())
    for name, t in mine.items():
        torch.testing.assert_close(t, theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    generates(run.model_dir, tiny_model_cfg, small_data)


@pytest.fixture(scope="module")
def ddp_scst(tiny_model_cfg, small_data, tmp_path_factory):
    return launch(DDP_ARGS, small_data, tiny_model_cfg, tmp_path_factory.mktemp("ddp_scst"), "lora", "scst")


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.e2e)])
def test_zero_scst_matches_ddp(stage, ddp_scst, tiny_model_cfg, small_data, tmp_path):
    """SCST's chunked log-prob pass under ZeRO (the deferred path: earlier chunks as non-boundary
    engine backwards, the last in the loop's backward), a checkpoint every step: the same samples,
    rewards, losses and gradient norms as 2-process DDP. Under ZeRO-3 sampling runs on the
    parameters gathered once per pass (`gather_for_generation`). The losses agree to float rounding
    (rel 1e-4): DDP's model runs the matmul patch embedding, a ZeRO-3 partitioned one keeps the
    Conv3d (its weight is only gathered by the conv's own hook)."""
    run = launch(["--config_file", str(zero_yaml(stage, tmp_path))], small_data, tiny_model_cfg, tmp_path / "out",
                 "lora", "scst")
    rows, ref = curve(run.model_dir.parent), curve(ddp_scst.model_dir.parent)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["lr"] == 0.0
    for a, b in zip(rows, ref):
        for key, rel in (("loss", 1e-4), ("reward", 1e-5), ("pg_loss", 1e-4), ("sample_len", 1e-5)):
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-9), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4) and a["grad_norm"] > 0
    adapter = load_file(str(run.model_dir / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # trained


def test_run_config_overrides_the_deepspeed_yaml(caplog):
    """configure_deepspeed on a real DeepSpeedPlugin filled as `accelerate launch` fills it from
    the shipped ZeRO-3 YAML (a stand-in accelerator object: no process group in this process)."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from ecomcap.config import SFTConfig
    from ecomcap.training.zero import configure_deepspeed

    plugin = DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=1, gradient_clipping=1.0,
                             zero3_save_16bit_model=False)
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what accelerate cannot resolve without a dataloader
    acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin),
                          num_processes=4, gradient_accumulation_steps=1)
    with caplog.at_level(logging.WARNING, logger="ecomcap.training.zero"):
        configure_deepspeed(acc, SFTConfig(batch_size=3, grad_accum=2, max_grad_norm=0.5))
    ds = plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (3, 2, 24, 0.5)
    assert not plugin.is_auto("train_micro_batch_size_per_gpu") and plugin.get_value("gradient_accumulation_steps") == 2
    assert acc.gradient_accumulation_steps == 2
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # exports gather
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "gradient_accumulation_steps=1 overridden" in warned and "gradient_clipping=1.0 overridden" in warned
    assert "train_micro_batch_size_per_gpu" not in warned  # "auto" is filled silently


@pytest.mark.parametrize("fmt,stage,resumes", [("deepspeed-zero3", 3, True), ("deepspeed-zero3", 0, False),
                                               ("trainable", 3, False), (None, 0, True), ("deepspeed-zero2", 3, False)])
def test_checkpoint_resumes_only_in_its_own_format(tmp_path, caplog, fmt, stage, resumes):
    """A ZeRO checkpoint holds sharded engine state, ours full trainables: a launch of another kind
    starts over with a warning instead of failing half-way through loading (stand-in accelerator)."""
    from accelerate.utils import DistributedType

    from ecomcap.training.checkpoint import STATE
    from ecomcap.training.loop import TrainLoop

    ckpt = tmp_path / "step-0000002"
    ckpt.mkdir()
    (ckpt / STATE).write_text(json.dumps({"step": 2, "world_size": 2, **({"format": fmt} if fmt else {})}))
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    acc = SimpleNamespace(num_processes=2, state=SimpleNamespace(deepspeed_plugin=plugin),
                          distributed_type=DistributedType.DEEPSPEED if stage else DistributedType.MULTI_CPU)
    loop = SimpleNamespace(acc=acc, stage="sft")
    with caplog.at_level(logging.WARNING):
        got = TrainLoop._resumable(loop, ckpt)
    assert (got == ckpt) is resumes
    assert ("not resumed" in caplog.text) is not resumes
