"""The Accelerator a training stage runs under: mixed precision, the process-group timeout, and
(for ZeRO-3) DeepSpeed's sharded loading.

Made before the model is loaded (`make_accelerator(cfg, dtype=...)`), as HF Trainer and TRL do:
under a ZeRO-3 launch with `zero3_init_flag` the Accelerator's DeepSpeed plugin registers its
config with transformers, so `from_pretrained` loads each parameter straight into this rank's
partition (`zero.Init`) instead of a whole model per rank. Under DDP and one process nothing
else changes: the model is moved to the rank's device as before.
"""
from __future__ import annotations

import logging
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from ecomcap.config import LoopConfig
from ecomcap.errors import EcomcapError
from ecomcap.training import zero

log = logging.getLogger(__name__)


def resolve_precision(requested: str, model: torch.nn.Module | None, bf16_ok: bool,
                      dtypes: set[torch.dtype] | None = None, cuda_ok: bool = False) -> str:
    """accelerate's mixed precision for these weights (`model`'s, or the `dtypes` the model will be
    loaded in). Trainables are fp32 (see `upcast_trainable`); autocast joins them with 16-bit frozen
    weights: bf16 weights need "bf16", fp16 weights (GPUs without bf16: T4, V100, or
    `dtype: float16`) "fp16" (with a GradScaler); fp32 weights: bf16 where the GPU has it, fp16 on
    a GPU without (`cuda_ok`), fp32 on the CPU."""
    if dtypes is None:
        dtypes = {p.dtype for p in model.parameters()} if model is not None else set()
    mp = requested
    if mp == "auto":
        if torch.bfloat16 in dtypes:
            mp = "bf16"
        elif torch.float16 in dtypes:
            mp = "fp16"
        else:
            mp = "bf16" if bf16_ok else "fp16" if cuda_ok else "no"
    if mp == "no" and dtypes & {torch.bfloat16, torch.float16}:
        want = "bf16" if torch.bfloat16 in dtypes else "fp16"
        raise EcomcapError(f"mixed_precision 'no' with 16-bit weights: set mixed_precision to {want} or auto "
                           "(trainable weights are kept in fp32; autocast runs the 16-bit frozen ones)")
    return mp


def process_group_kwargs(cfg: LoopConfig) -> InitProcessGroupKwargs:
    """The collective timeout: under DDP/ZeRO-1/2 the other ranks wait at a barrier while rank 0
    validates (1000 images can take longer than NCCL's default 10 minutes, which kills the job)."""
    return InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist_timeout_min))


def group_timeout() -> timedelta | None:
    """The default process group's collective timeout (None without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    pg = dist.distributed_c10d._get_default_group()
    device = torch.device("cuda") if torch.device("cuda") in pg._device_types else torch.device("cpu")
    return pg._get_backend(device).options._timeout


def _ensure_timeout(timeout: timedelta) -> None:
    """A process group made earlier (a `PartialState()` before this Accelerator) ignored our
    kwargs: set the timeout on it."""
    current = group_timeout()
    if current is not None and current != timeout:
        import torch.distributed as dist

        dist.distributed_c10d._set_pg_timeout(timeout)
        log.info("process-group timeout %s -> %s", current, timeout)


def make_accelerator(cfg: LoopConfig, model: torch.nn.Module | None = None, *,
                     dtype: torch.dtype | None = None) -> Accelerator:
    """The stage's Accelerator; `dtype`: the dtype the model is about to be loaded in (make it
    before loading, so a ZeRO-3 launch loads sharded), else the precision follows `model`."""
    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    mp = resolve_precision(cfg.mixed_precision, model, bf16_ok, {dtype} if dtype is not None else None,
                           cuda_ok=torch.cuda.is_available())
    _forget_other_precision(mp)
    pg = process_group_kwargs(cfg)
    # cpu=True would turn a DeepSpeed launch into plain CPU DDP: DeepSpeed picks its CPU accelerator itself
    if zero.deepspeed_launch() and not torch.cuda.is_available():
        zero.fix_cpu_world(pg.to_kwargs())
    acc = Accelerator(cpu=not torch.cuda.is_available() and not zero.deepspeed_launch(), mixed_precision=mp,
                      gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=[pg])
    _ensure_timeout(pg.timeout)
    if acc.gradient_accumulation_steps != cfg.grad_accum:  # ACCELERATE_GRADIENT_ACCUMULATION_STEPS won
        log.warning("gradient accumulation %d from the accelerate launch config overridden by the run config's %d",
                    acc.gradient_accumulation_steps, cfg.grad_accum)
        acc.gradient_accumulation_steps = cfg.grad_accum
    if zero.zero_stage(acc):
        zero.configure_deepspeed(acc, cfg)
    return acc


def _forget_other_precision(mp: str) -> None:
    """accelerate keeps one process-wide state and refuses a second stage (or test) with another
    mixed precision; drop that part of the state (the process group in PartialState stays)."""
    from accelerate.state import AcceleratorState, DistributedType

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mp) and state.get("distributed_type") != DistributedType.DEEPSPEED:
        AcceleratorState._reset_state()
