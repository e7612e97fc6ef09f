"""The settings every other settings model builds on: strict models (unknown keys are errors)
and the training loop's shared knobs. Kept apart so the captioning, encoder and grounding
settings can all import them without import circles."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoopConfig(_Strict):
    """What every training stage shares: schedule, batching, evaluation, checkpoints, resume."""

    output_dir: Path = Path(".run/sft")
    max_steps: int = Field(600, ge=0)
    batch_size: int = Field(32, ge=1, description="images per process per micro-batch")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    vision_lr_scale: float = Field(1.0, gt=0, description="the vision tower's learning rate = lr x this "
                                   "(ms-swift's vit_lr): a from-scratch tower learns shape (category) slower")
    weight_decay: float = 0.0
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = 1.0
    eval_every: int = Field(100, ge=0, description="0: evaluate only at the end")
    eval_images: int = Field(200, ge=1)
    eval_beams: int = Field(1, ge=1, description="beam width of the in-training validation")
    data_workers: int | None = Field(
        None, ge=0, description="DataLoader worker processes that prepare micro-batches ahead of the step (stages "
        "with a CPU prepare: SFT); null: none on CPU, up to 4 per process on GPU; 0: inline. Speed only")
    gather_for_generation: bool = Field(
        True, description="ZeRO-3: gather the whole model once per generation pass (validation, SCST/DPO "
        "sampling) instead of every layer per decoded token; needs the whole 16-bit model's memory on each GPU "
        "meanwhile (as TRL's ds3_gather_for_generation). Speed only")
    save_every: int = Field(200, ge=0, description="0: no intermediate checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    resume: bool = True
    stop_after_steps: int | None = Field(None, description="stop as if killed after N steps (tests)")
    dist_timeout_min: int = Field(60, ge=1, description="collective timeout of a multi-process launch (minutes): "
                                  "ranks wait this long while rank 0 validates")
