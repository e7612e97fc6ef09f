"""Qwen2/2.5-VL's patch embedding as one matrix product while the fast path captions.

The vision tower embeds patches with a `Conv3d` whose kernel equals its stride (2 x 14 x 14):
each output is the dot product of one flattened patch with one filter, i.e. a plain linear
layer. On CPU (oneDNN) that convolution took 2.5 s for 16 images of 1,024 patches where the
same product as a matmul takes 0.36 s (measured, one thread; outputs differ by float rounding,
max 6e-6 of 3.2); vLLM runs this layer as a linear layer for the same reason. The weights and
the checkpoint are untouched: only the module's forward is swapped for the duration of a call.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _patch_embed(model):
    """The vision tower's patch embedding under PEFT/accelerate wrappers, if it is a stride=kernel Conv3d."""
    from ecomcap.inference.prefill import generative_model

    inner = getattr(generative_model(model), "model", None)
    pe = getattr(getattr(inner, "visual", None), "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d) or tuple(proj.kernel_size) != tuple(proj.stride) or any(proj.padding):
        return None
    if hasattr(proj.weight, "ds_id"):  # ZeRO-3 gathers the weight in `proj`'s own forward hook: keep it
        return None
    return pe


@contextmanager
def patch_embed_as_matmul(model):
    """Within the block the patch embedding runs as `linear(patches, filters)`; a model without a
    Qwen-VL-style patch embedding is left as it is."""
    pe = _patch_embed(model)
    if pe is None:
        yield
        return
    proj = pe.proj

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w = proj.weight
        flat = hidden_states.reshape(-1, w[0].numel()).to(dtype=w.dtype)
        return torch.nn.functional.linear(flat, w.reshape(w.shape[0], -1), proj.bias)

    pe.forward = forward
    try:
        yield
    finally:
        del pe.forward
