"""DeepSpeed ZeRO-2/3 under accelerate, for `TrainLoop`: one source of truth for batching,
gathered weights for validation and export, and sharded step checkpoints.

`accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml` hands the loop a
DeepSpeed plugin filled from the YAML. Left alone, that plugin decides things our `LoopConfig`
owns: its `gradient_accumulation_steps` replaces ours (extra optimizer steps per scheduler step),
`train_micro_batch_size_per_gpu: auto` cannot be resolved without a dataloader (we prepare none)
and its `gradient_clipping` ignores `max_grad_norm`. `configure_deepspeed` writes our values into
the plugin before `prepare`; a YAML value that disagrees is overridden with a warning (the
accelerate YAML describes the machines, the run config the experiment; the shipped YAMLs keep the
defaults so a default run warns about nothing).

Under ZeRO-3 each rank holds a shard of every parameter: the engine's hooks all-gather them in
every forward, so every rank must take part in validation generation, and an export must be
gathered on all ranks first (`gathered_state_dict`) before rank 0 writes it. Step checkpoints
are accelerate's `save_state` (engine model and optimizer partitions, every rank writes its own)
plus our scheduler, trainer state and per-rank RNG files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ecomcap.errors import EcomcapError

log = logging.getLogger(__name__)
SCHEDULER = "scheduler.pt"
ENGINE_DIR = "engine"  # accelerate save_state's folder inside our step-NNNNNNN/


def deepspeed_launch() -> bool:
    """Whether `accelerate launch` asked for DeepSpeed (then the Accelerator must not be `cpu=True`,
    which would silently fall back to plain DDP/CPU: DeepSpeed runs on its CPU accelerator here)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fix_cpu_world(group_kwargs: dict | None = None) -> None:
    """On a machine without GPUs accelerate (1.15) has no process-group backend for a DeepSpeed
    launch: it lets DeepSpeed start the (gloo) group but records 1 process, rank 0 on every rank,
    so every rank would train on rank 0's data. Record the real world from torch.distributed.
    Never needed with GPUs (NCCL); here it is what lets DeepSpeed be tested on CPU.
    `group_kwargs`: the Accelerator's process-group arguments (timeout), as it would pass them."""
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(**(group_kwargs or {}))  # starts DeepSpeed's process group
    if dist.is_initialized() and state.num_processes != dist.get_world_size():
        shared = PartialState._shared_state
        shared.update(num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                      local_process_index=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend="gloo")


def zero_stage(acc) -> int:
    """0 without DeepSpeed, else the ZeRO stage of the active plugin."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def checkpoint_format(acc) -> str:
    """What a step checkpoint of this launch holds: ours (full trainables) or a ZeRO engine state."""
    stage = zero_stage(acc)
    return f"deepspeed-zero{stage}" if stage else "trainable"


def configure_deepspeed(acc, cfg) -> None:
    """Our micro batch, accumulation and clipping into the DeepSpeed plugin (before `prepare`)."""
    plugin = acc.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    ours = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": float(cfg.max_grad_norm)}
    for key, value in ours.items():
        theirs = ds.get(key)
        if theirs not in (None, "auto") and float(theirs) != float(value):
            log.warning("DeepSpeed config %s=%s overridden by the run config's %s (the training config is "
                        "the one source of truth for batching and clipping)", key, theirs, value)
        ds[key] = value
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * acc.num_processes
    zero_opt = ds.setdefault("zero_optimization", {})
    if zero_stage(acc) == 3:  # exports gather the 16-bit (or fp32) weights on rank 0
        zero_opt["stage3_gather_16bit_weights_on_model_save"] = True
    # (optimizer offload: accelerate hands DeepSpeed a DeepSpeedCPUAdam built on our AdamW's param
    # groups, so the LR schedule still reaches it; its C++ op is compiled on first use)
    plugin.gradient_accumulation_steps = cfg.grad_accum
    acc.gradient_accumulation_steps = cfg.grad_accum
    log.info("DeepSpeed ZeRO-%d from the run config: micro batch %d per process, %d accumulation steps, "
             "%d processes (global batch %d), gradient clipping %s", zero_stage(acc), cfg.batch_size,
             cfg.grad_accum, acc.num_processes, ds["train_batch_size"], cfg.max_grad_norm)


def grad_norm(acc, model, max_norm: float) -> float | None:
    """Clip (DDP/single process) and return the pre-clip global gradient norm. Under DeepSpeed
    the engine clipped inside its step; accelerate may return None there, so ask the engine."""
    norm = acc.clip_grad_norm_(model.parameters(), max_norm)
    if norm is None and zero_stage(acc) and acc.deepspeed_engine_wrapped is not None:
        norm = acc.deepspeed_engine_wrapped.engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if hasattr(norm, "item") else norm)


def gathered_state_dict(acc, model, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The full weights of a ZeRO-3 engine, gathered layer by layer onto rank 0 (None elsewhere).
    Collective: every rank must call it. `trainable_only`: adapters need no frozen base."""
    engine = acc.deepspeed_engine_wrapped.engine if acc.deepspeed_engine_wrapped else model
    if trainable_only:
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    return acc.get_state_dict(model)


def whole_trainables(acc, model):
    """(name, full tensor) of each trainable parameter, in name order; under ZeRO-3 gathered one
    at a time on every rank (collective: all ranks iterate to the end), so a model that only fits
    sharded never has to be whole on one GPU."""
    inner = acc.unwrap_model(model)
    params = sorted((n, p) for n, p in inner.named_parameters() if p.requires_grad)
    if zero_stage(acc) != 3:
        yield from params
        return
    import deepspeed

    for name, p in params:
        with deepspeed.zero.GatheredParameters([p]):
            yield name, p


@contextlib.contextmanager
def gathered_for_generation(acc, model, enabled: bool = True):
    """Under ZeRO-3, every parameter gathered once for a whole generation pass, DeepSpeed's
    per-module fetch hooks removed meanwhile (TRL's `unwrap_model_for_generation`): without it
    each decoded token re-gathers every layer, and ranks must step together (`synced_gpus`).
    Inside, each rank decodes alone. Yields whether it gathered (no-op outside ZeRO-3 or when
    `enabled` is off). Costs the whole model's weights on each device while it lasts."""
    if not enabled or zero_stage(acc) != 3:
        yield False
        return
    import deepspeed

    from ecomcap.modeling.partitions import marked_gathered

    engine = acc.deepspeed_engine_wrapped.engine if acc.deepspeed_engine_wrapped is not None else model
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            with marked_gathered():
                yield True
        finally:
            offload._register_deepspeed_module(offload.module)


# ---------------------------------------------------------------- step checkpoints
def save_engine_checkpoint(acc, ckpt_root: Path, step: int, scheduler, state: dict, keep: int) -> Path:
    """All ranks: engine state (sharded optimizer and weights) via accelerate `save_state` into a
    temporary folder; rank 0 then adds the scheduler and trainer state and renames it into place.
    The per-rank RNG files (`save_rng`) must already be written."""
    from ecomcap.training.checkpoint import STATE, collect_rng

    final, tmp = ckpt_root / f"step-{step:07d}", ckpt_root / f".tmp-step-{step:07d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    # trainables only: the frozen base comes from the model load (a LoRA checkpoint stays small)
    acc.save_state(str(tmp / ENGINE_DIR), exclude_frozen_parameters=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER)
        collect_rng(ckpt_root, step, tmp, acc.num_processes)
        payload = {**state, "step": step, "format": checkpoint_format(acc)}
        (tmp / STATE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_engine_checkpoint(acc, path: Path, optimizer, scheduler) -> dict[str, Any]:
    """All ranks: restore the engine (weights, optimizer partitions), the schedule (and the LR it
    put into the optimizer), then this rank's own RNG streams; returns the trainer state."""
    from ecomcap.training.checkpoint import STATE, _restore_rng

    if not (path / ENGINE_DIR).is_dir():
        raise EcomcapError(f"{path} is not a DeepSpeed step checkpoint (no {ENGINE_DIR}/)")
    acc.load_state(str(path / ENGINE_DIR), load_module_strict=False)  # (frozen weights not saved)
    scheduler.load_state_dict(torch.load(path / SCHEDULER, map_location="cpu", weights_only=True))
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    _restore_rng(path, acc.process_index, {"rng": torch.get_rng_state()})
    return json.loads((path / STATE).read_text(encoding="utf-8"))
