"""Qwen2/2.5-VL's patch embedding as one matrix product, for the model's lifetime.

The vision tower embeds patches with a `Conv3d` whose kernel equals its stride (2 x 14 x 14):
each output is the dot product of one flattened patch with one filter, i.e. a plain linear
layer. On CPU (oneDNN) that convolution took 2.5-2.6 s for 16 images of 1,024 patches where the
same product as a matmul takes 0.36 s (measured, one thread; outputs differ by float rounding,
max 6e-6 of 3.2); vLLM runs this layer as a linear layer too. The weights and the checkpoint
are untouched: only the module's forward is swapped. `load_base` installs it on every load
(`model.patch_embed: matmul`, the default), so training, SCST, validation, inference and
serving all run the same numerics; `conv` keeps the stock layer. Left alone where it cannot
apply: ZeRO-3 partitions (the weight is gathered by the conv's own hook), accelerate hooks.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from ecomcap.modeling.unwrap import generative_model

_LOCK = threading.Lock()
_DEPTH = "_ecomcap_matmul_depth"  # how many blocks use the swap now (nested / concurrent callers)


def _vision_patch_embed(model):
    """`model.visual.patch_embed` under PEFT / DDP wrappers, or None."""
    inner = getattr(generative_model(model), "model", None)
    return getattr(getattr(inner, "visual", None), "patch_embed", None)


def _patch_embed(model):
    """The vision tower's patch embedding under PEFT/accelerate wrappers, if it is a stride=kernel
    Conv3d whose forward can be swapped safely; else None."""
    pe = _vision_patch_embed(model)
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d) or tuple(proj.kernel_size) != tuple(proj.stride) or any(proj.padding):
        return None
    if proj.groups != 1 or any(d != 1 for d in proj.dilation):  # then not one dot product per patch and filter
        return None
    if hasattr(proj.weight, "ds_id"):  # ZeRO-3 gathers the weight in `proj`'s own forward hook: keep it
        return None
    if getattr(pe, _DEPTH, 0) == 0 and "forward" in vars(pe):  # someone else's forward (accelerate's hooks)
        return None
    if any(hasattr(m, "_hf_hook") or m._forward_hooks or m._forward_pre_hooks for m in (pe, proj)):
        return None  # hooks expect `proj` to run (device placement, offload, probes)
    return pe


def _matmul_forward(proj: torch.nn.Conv3d):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w = proj.weight
        flat = hidden_states.reshape(-1, w[0].numel()).to(dtype=w.dtype)
        return torch.nn.functional.linear(flat, w.reshape(w.shape[0], -1), proj.bias)
    return forward


@contextmanager
def patch_embed_as_matmul(model):
    """Within the block the patch embedding runs as `linear(patches, filters)`; a model without a
    swappable Qwen-VL-style patch embedding is left as it is. Nested and concurrent blocks share
    one swap; the last to leave restores the module's own forward."""
    with _LOCK:
        pe = _patch_embed(model)
        if pe is not None:
            depth = getattr(pe, _DEPTH, 0)
            if depth == 0:
                pe.forward = _matmul_forward(pe.proj)
            setattr(pe, _DEPTH, depth + 1)
    try:
        yield
    finally:
        if pe is not None:
            with _LOCK:
                setattr(pe, _DEPTH, getattr(pe, _DEPTH) - 1)
                if getattr(pe, _DEPTH) == 0:
                    del pe.forward


def install_matmul_patch_embed(model) -> bool:
    """The swap for the model's lifetime (a block that never leaves); whether it applied."""
    with _LOCK:
        pe = _patch_embed(model)
        if pe is None:
            return False
        depth = getattr(pe, _DEPTH, 0)
        if depth == 0:
            pe.forward = _matmul_forward(pe.proj)
        setattr(pe, _DEPTH, depth + 1)
    return True


def runs_matmul(model) -> bool:
    """Whether the patch embedding runs as the matmul now."""
    return getattr(_vision_patch_embed(model), _DEPTH, 0) > 0
