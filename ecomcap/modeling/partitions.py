"""Whole parameters of a model loaded into DeepSpeed ZeRO-3 partitions (`zero.Init`), where each
rank's own `p` holds an empty shard: merging an adapter, exporting with the class's key mapping.
Model-layer code (loading a trained output) needs these without reaching into training."""
from __future__ import annotations

import contextlib
import contextvars

# set while a ZeRO-3 model's parameters are gathered whole for a generation pass
# (`ecomcap.training.zero.gathered_for_generation`): ranks then decode alone, not in step
_GATHERED = contextvars.ContextVar("ecomcap_generation_gathered", default=False)


def generation_gathered() -> bool:
    """Whether this process's partitioned parameters are whole now (no collective per forward)."""
    return _GATHERED.get()


@contextlib.contextmanager
def marked_gathered():
    token = _GATHERED.set(True)
    try:
        yield
    finally:
        _GATHERED.reset(token)


def merge_adapter(model):
    """`merge_and_unload` that also works on a base loaded into ZeRO-3 partitions (`zero.Init`):
    there each base weight holds an empty shard, so it is gathered while its LoRA delta is added
    (layer by layer, rank 0's result re-partitioned; every rank must call this)."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return model.merge_and_unload()
    import deepspeed
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            with deepspeed.zero.GatheredParameters([module.get_base_layer().weight], modifier_rank=0):
                module.merge()
    return model.unload()  # the merged base without the LoRA modules


@contextlib.contextmanager
def default_key_conversions(model):
    """transformers (5.24) records its legacy and prefix renamings on a model loaded under
    `zero.Init` (ZeRO-3 with zero3_init_flag, i.e. any load after the Accelerator exists);
    `save_pretrained` reverts them all and writes `model.model.*` keys that load as a fresh
    model. Export with the model class's default mapping, as for a normally loaded model."""
    had = "_weight_conversions" in model.__dict__
    saved = model.__dict__.pop("_weight_conversions", None)
    try:
        yield
    finally:
        if had:
            model.__dict__["_weight_conversions"] = saved
